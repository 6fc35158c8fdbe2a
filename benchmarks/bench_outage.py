"""Memory and disk of a training process while the MLflow server is down.

A logger with ``n_samples=5`` logs epochs of 224x224 images to a tracking URI that is a
closed port (nothing is ever delivered), and the script prints the process's resident memory
(RSS) before the first epoch, after it (imports, first-use caches) and after the last, its
peak, and the bytes of the spool. Runs
this checkout ("new") and, when git can produce it, the package at ``OLD`` ("old": its
sender kept in-memory copies of up to 32 items already on disk and had no spool cap), each
in its own process. Figures from one run; rerun on your machine. Usage::

    python benchmarks/bench_outage.py                 # 50 epochs, both
    python benchmarks/bench_outage.py --epochs 200 --cap-mb 100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD = "0360d44"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(epochs: int, cap_mb: float) -> None:
    import numpy as np

    from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning

    warnings.simplefilter("ignore", EigenCAMWarning)
    spool = Path(tempfile.mkdtemp(prefix="bench-outage-"))
    kw = {"spool_max_bytes": int(cap_mb * 1e6)} if cap_mb > 0 else {}
    logger = EigenCAMLogger(n_samples=5, run_id="0" * 32, spool_dir=spool, close_timeout=0.5,
                            tracking_uri=f"http://127.0.0.1:{_closed_port()}", **kw)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(5, 3, 224, 224)).astype(np.float32)
    acts = rng.uniform(0, 1, size=(5, 64, 14, 14)).astype(np.float32)
    labels, logits = np.arange(5) % 3, rng.normal(size=(5, 3)).astype(np.float32)
    before = _rss_mb()
    start = time.perf_counter()
    first = before
    for epoch in range(epochs):
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
        logger.on_epoch_end(epoch)
        if epoch == 0:  # imports and first-use caches: not what the outage adds
            first = _rss_mb()
    elapsed = time.perf_counter() - start
    after = _rss_mb()
    spool_bytes = sum(p.stat().st_size for p in spool.rglob("*.rec"))
    left = logger.close()
    print(json.dumps({"rss_before_mb": before, "rss_first_mb": first, "rss_after_mb": after,
                      "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "spool_mb": spool_bytes / 1e6, "epoch_s": elapsed / epochs,
                      "undelivered": int(left),
                      "images_not_kept": getattr(left, "images_not_kept", 0)}))


def _run(pythonpath: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, __file__, "--child", "--epochs", str(args.epochs),
                          "--cap-mb", str(args.cap_mb)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--cap-mb", type=float, default=0, help="spool_max_bytes in MB (new only; "
                   "0: the default, 1 GiB)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.epochs, args.cap_mb)
        return
    results = {"new": _run(str(REPO), args)}
    with tempfile.TemporaryDirectory() as old:
        try:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD, "mlflow_eigencam"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
            results["old"] = _run(old, argparse.Namespace(epochs=args.epochs, cap_mb=0))
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"(old at {OLD} not measured: {exc})")
    print(f"{args.epochs} epochs of 5 samples at 224x224, server down (a closed port)")
    print(f"{'':6} {'RSS before':>11} {'1st epoch':>10} {'RSS after':>10} {'peak':>8} "
          f"{'spool':>9} {'epoch':>8}")
    for name, r in results.items():
        print(f"{name:6} {r['rss_before_mb']:8.0f} MB {r['rss_first_mb']:7.0f} MB "
              f"{r['rss_after_mb']:7.0f} MB "
              f"{r['rss_peak_mb']:5.0f} MB {r['spool_mb']:6.0f} MB {1000 * r['epoch_s']:5.0f} ms"
              + (f"  ({r['images_not_kept']} epochs without images)"
                 if r.get("images_not_kept") else ""))


if __name__ == "__main__":
    main()
