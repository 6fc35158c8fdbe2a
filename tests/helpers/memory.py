"""Memory measurements of the logger, each run in a fresh process.

``tracemalloc`` counts every thread of the process. Inside a long pytest session, threads
that earlier tests left behind (a sender backing off against a hung server, a proxy's
handlers) can allocate during the window a test measures. :func:`in_fresh_process` runs a
measurement in a spawned interpreter, so the numbers are this logger's alone.
"""

from __future__ import annotations

import gc
import multiprocessing
import tracemalloc
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np


def in_fresh_process(fn: Callable[..., Any], *args: Any, timeout: float = 300) -> Any:
    """``fn(*args)`` in a spawned interpreter (inherits ``os.environ`` and ``sys.path``);
    ``fn`` must be a module-level function of this module."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply_async(fn, args).get(timeout)


def _use_store(uri: str, experiment_id: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)


def outage(tmp: str, port: int) -> Dict[str, Any]:
    """30 epochs with the server down (a closed port): traced memory after epochs 3-5 and
    after 6-29, the peak of each window, and the bundle records left on disk."""
    from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning
    from mlflow_eigencam._records import item_from_record
    from tests.helpers.oracle import blob_batch

    logger = EigenCAMLogger(n_samples=4, run_id="0" * 32, tracking_uri=f"http://127.0.0.1:{port}",
                            spool_dir=Path(tmp) / "spool", close_timeout=0.5)
    # 30 raw records of ~2.2 MB pass the spool's compaction threshold (64 MiB) at epoch 27;
    # from then the sender re-encodes waiting records, one at a time, in its backoff waits,
    # and a measurement taken while it holds one counts ~2 records of working memory (CI
    # saw +4.75 MB). Compaction has its own test; here nothing may be kept per epoch.
    logger._sink._keeper.compact_bytes = 1 << 40

    def epoch(e: int) -> None:
        images, acts, labels, logits = blob_batch(n=4, h=96, w=96, seed=e % 3)
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
        logger.on_epoch_end(e)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EigenCAMWarning)
        for e in range(3):  # warm-up: imports, caches, the first warnings
            epoch(e)
        tracemalloc.start()
        try:
            for e in range(3, 6):
                epoch(e)
            gc.collect()
            early, early_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for e in range(6, 30):
                epoch(e)
            gc.collect()
            late, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        left = logger.close()
    bundles = [str(p) for p in left.records if item_from_record(p).kind == "bundle"]
    return {"early": early, "early_peak": early_peak, "late": late, "peak": peak,
            "bundles": bundles}


def twenty_epochs(uri: str, experiment_id: str) -> List[int]:
    """Traced memory after each of 20 epochs (3 batches of 8 each), flushed to a real store."""
    import mlflow

    from mlflow_eigencam import EigenCAMLogger
    from tests.helpers.oracle import blob_batch

    _use_store(uri, experiment_id)
    images, acts, labels, logits = blob_batch(n=8, h=64, w=64, c=64, hh=8, ww=8)
    sizes = []
    with mlflow.start_run():
        logger = EigenCAMLogger()
        tracemalloc.start()
        for epoch in range(20):
            for _ in range(3):
                logger.on_batch_end(images, acts, labels, logits, mode="eval")
            logger.on_epoch_end(epoch)
            logger.flush(timeout=60)
            sizes.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        logger.close()
    return sizes


def streaming(uri: str, experiment_id: str) -> Dict[str, List[int]]:
    """Streaming mode (``n_samples=None``), 6 epochs of 40 batches of 8 new images: traced
    memory within epoch 0 (after batches 5 and 39) and after each flushed epoch."""
    import mlflow

    from mlflow_eigencam import EigenCAMLogger

    _use_store(uri, experiment_id)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(8, 96, 96, 3), dtype=np.uint8)  # 27 kB each
    acts = rng.uniform(0, 1, size=(8, 16, 6, 6)).astype(np.float32)
    within: List[int] = []
    across: List[int] = []
    with mlflow.start_run():
        logger = EigenCAMLogger(n_samples=None, n_components=2, grid_max_rows=2)
        tracemalloc.start()
        for epoch in range(6):
            for b in range(40):  # 320 images an epoch: 8.8 MB of pixels if they were kept
                shifted = np.roll(images, b, axis=1)  # new sample ids in every batch
                logger.on_batch_end(shifted, acts, mode="eval")
                if epoch == 0 and b in (5, 39):
                    within.append(tracemalloc.get_traced_memory()[0])
            logger.on_epoch_end(epoch)
            assert logger.flush(timeout=60)
            across.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        logger.close()
    return {"within": within, "across": across}

