"""Logger benchmarks: epoch-end latency and memory (streaming and capped).

Prints, in one run:
  * on_epoch_end for 16 samples at 224x224 with (16, 2048, 7, 7) activations: render +
    hand to the sink, not counting the upload (which runs on the background worker);
  * RSS of n_samples=None (streaming) over 1k vs 5k samples at 64x64, each in a fresh process;
  * RSS over 20 epochs with the default cap (growth after warm-up).

Usage: python benchmarks/bench_logger.py [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup_mlflow(tmp: str):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    exp = mlflow.create_experiment("bench", artifact_location=f"file://{tmp}/artifacts")
    mlflow.set_experiment(experiment_id=exp)
    os.environ["MLFLOW_EIGENCAM_SPOOL_DIR"] = f"{tmp}/spool"
    return mlflow


def bench_epoch_end(repeats: int = 5) -> dict:
    from mlflow_eigencam import EigenCAMLogger

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(16, 3, 224, 224)).astype(np.float32)
    acts = np.maximum(rng.normal(size=(16, 2048, 7, 7)), 0).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    logits = rng.normal(size=(16, 10)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow = _setup_mlflow(tmp)
        with mlflow.start_run():
            logger = EigenCAMLogger(n_samples=16)
            times = []
            for epoch in range(repeats + 1):
                logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
                t = time.perf_counter()
                logger.on_epoch_end(epoch)
                times.append(time.perf_counter() - t)
                logger.flush(timeout=120)  # keep uploads out of the next measurement
            logger.close()
    return {"median_s": statistics.median(times[1:]), "max_s": max(times[1:])}


def _child_stream(n: int) -> None:
    from mlflow_eigencam import EigenCAMLogger

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow = _setup_mlflow(tmp)
        with mlflow.start_run():
            logger = EigenCAMLogger(n_samples=None, n_components=2)
            base = _rss_mb()
            peak = base
            batch = 50
            for _ in range(0, n, batch):
                images = rng.uniform(size=(batch, 3, 64, 64)).astype(np.float32)
                acts = np.maximum(rng.normal(size=(batch, 64, 8, 8)), 0).astype(np.float32)
                logger.on_batch_end(images, acts, rng.integers(0, 3, batch), mode="eval")
                peak = max(peak, _rss_mb())
            logger.on_epoch_end(0)
            peak = max(peak, _rss_mb())
            logger.close(timeout=600)
            peak = max(peak, _rss_mb())
    print(json.dumps({"n": n, "base_mb": base, "peak_mb": peak}))


def _child_epochs(epochs: int) -> None:
    from mlflow_eigencam import EigenCAMLogger

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(32, 3, 64, 64)).astype(np.float32)
    acts = np.maximum(rng.normal(size=(32, 128, 8, 8)), 0).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow = _setup_mlflow(tmp)
        with mlflow.start_run():
            logger = EigenCAMLogger()
            rss = []
            for epoch in range(epochs):
                for _ in range(4):
                    logger.on_batch_end(images, acts, mode="eval")
                logger.on_epoch_end(epoch)
                logger.flush(timeout=120)
                rss.append(_rss_mb())
            logger.close()
    print(json.dumps({"rss": rss}))


def _run_child(arg: str, value: int) -> dict:
    out = subprocess.run([sys.executable, __file__, arg, str(value)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--child-stream", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-epochs", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_stream:
        return _child_stream(args.child_stream)
    if args.child_epochs:
        return _child_epochs(args.child_epochs)

    lines = ["| benchmark | figure | target |", "|---|---|---|"]
    ee = bench_epoch_end()
    lines.append(f"| on_epoch_end, 16 x 224x224, (16,2048,7,7), k=3 | median {ee['median_s']:.3f} s, "
                 f"max {ee['max_s']:.3f} s | < 0.5 s |")
    s1, s5 = _run_child("--child-stream", 1000), _run_child("--child-stream", 5000)
    lines.append(f"| n_samples=None, 1k vs 5k samples at 64x64: peak RSS | {s1['peak_mb']:.0f} MB vs "
                 f"{s5['peak_mb']:.0f} MB (difference {s5['peak_mb'] - s1['peak_mb']:.0f} MB) | < 100 MB apart |")
    ep = _run_child("--child-epochs", 20)["rss"]
    lines.append(f"| 20 epochs, default cap: RSS after epoch 5 vs 20 | {ep[4]:.0f} MB vs {ep[-1]:.0f} MB "
                 f"(growth {ep[-1] - ep[4]:+.1f} MB) | no growth |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
