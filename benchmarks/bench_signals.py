"""What the explanation signals (docs/signals.md) cost per logged epoch, side by side.

The setting of issue 24: the no-grad eval pass of ``bench_streaming.py`` (8 batches of 32
images at 224 x 224 through a ResNet-18-sized CNN, torch on 2 threads) with
``EigenCAMMonitor`` at its defaults (5 pinned samples), and ``epoch_end`` alone for 16
samples. Arms, interleaved epoch by epoch so that machine drift hits both alike:

  * ``faithfulness=False``: the monitor as before (the pinned forward, EigenCAM, cards);
  * ``faithfulness=True`` (default fractions ``metrics.DEFAULT_FRACTIONS``): plus one quiet
    forward of ``2F n`` perturbed images (the pinned pass gives the clean row);
  * localization is priced on the logger alone (boxes given with the batch vs none): it
    is numpy on the kept samples, no model call.

Printed: median seconds of the eval pass alone, of ``epoch_end`` per arm, the difference,
and the difference as a share of the eval pass (the issue's budget: the whole logger <= 5 %
of the eval pass; ``epoch_end`` < 0.5 s for 16 samples).

    python benchmarks/bench_signals.py [--epochs 5] [--samples 5 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_streaming import ResNet18  # noqa: E402


def eval_pass(model, data) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in data:
            model(x)
    return time.perf_counter() - t0


def epoch_end_times(model, data, n_samples: int, faithfulness: bool, epochs: int) -> List[float]:
    """Seconds of ``monitor.epoch_end`` at epochs 1.. (pinned: the extra forward, the
    faithfulness pass when on, EigenCAM, rendering; the upload is on its own thread)."""
    from mlflow_eigencam.pytorch import EigenCAMMonitor

    monitor = EigenCAMMonitor(model, target_layer="layer4", n_samples=n_samples,
                              faithfulness=faithfulness)
    times = []
    with torch.no_grad():
        for epoch in range(epochs + 1):
            for x, y in data:
                with monitor.capture("eval", "val"):
                    monitor.update(x, y, model(x))
            t0 = time.perf_counter()
            monitor.epoch_end(epoch)
            if epoch:  # epoch 0: the first epoch's batches are not pinned yet
                times.append(time.perf_counter() - t0)
            monitor.flush(120)
    monitor.close()
    return times


def localization_times(n: int, size: int, epochs: int, boxes: bool) -> List[float]:
    """Seconds of the logger's ``on_epoch_end`` for n samples, with true boxes or without."""
    from mlflow_eigencam import EigenCAMLogger

    rng = np.random.default_rng(0)
    images = rng.random((n, 3, size, size), dtype=np.float32)
    acts = rng.random((n, 512, size // 32, size // 32), dtype=np.float32)
    true = [np.array([[size / 4, size / 4, size / 2, size / 2]])] * n
    logger = EigenCAMLogger(n_samples=n)
    times = []
    for epoch in range(epochs):
        logger.on_batch_end(images, acts, np.zeros(n, int), mode="eval",
                            boxes=true if boxes else None)
        t0 = time.perf_counter()
        logger.on_epoch_end(epoch)
        times.append(time.perf_counter() - t0)
        logger.flush(120)
    logger.close()
    return times


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, nargs="+", default=[5, 16])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MLFLOW_EIGENCAM_SPOOL_DIR", tempfile.mkdtemp())
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    torch.manual_seed(0)
    model = ResNet18(10).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(args.batch_size, 3, args.size, args.size, generator=g),
             torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(args.batches)]
    base = statistics.median(eval_pass(model, data) for _ in range(3))
    print(f"eval pass alone ({args.batches} x {args.batch_size} at {args.size} px, "
          f"{args.threads} threads): {base:.3f} s")
    print(f"{'samples':>7} | {'epoch_end off':>13} | {'epoch_end on':>12} | {'added':>7} | "
          f"{'added / eval pass':>17}")
    for n in args.samples:
        off, on = [], []
        for _ in range(2):  # interleaved: off, on, off, on
            off += epoch_end_times(model, data, n, False, args.epochs)
            on += epoch_end_times(model, data, n, True, args.epochs)
        m_off, m_on = statistics.median(off), statistics.median(on)
        print(f"{n:>7} | {m_off:>11.3f} s | {m_on:>10.3f} s | {m_on - m_off:>5.3f} s | "
              f"{100 * (m_on - m_off) / base:>16.1f} %")
    for n in args.samples:
        plain = statistics.median(localization_times(n, args.size, args.epochs, False))
        boxed = statistics.median(localization_times(n, args.size, args.epochs, True))
        print(f"logger on_epoch_end, {n} samples: {plain:.3f} s without boxes, {boxed:.3f} s "
              f"with (localization + pointing game: {boxed - plain:+.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
