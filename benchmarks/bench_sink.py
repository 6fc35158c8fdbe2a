"""What the write-ahead sink costs the training thread, and how far uploads lag under load.

Prints, for this checkout ("new") and, when git can produce it, the package at 70350d7
("old", an in-memory queue that a nice-10 worker spooled and sent):

1. The training thread's cost of handing one epoch's bundle to the sink (``submit``: for
   "new" the whole write-ahead step, record written and renamed (the sender fsyncs it); for "old" a queue put,
   with nothing on disk), and of the whole ``on_epoch_end``.
2. Upload lag with every core busy: epochs of 1 s of busy training on the main thread, one
   busy-loop process per core beside it; lag = time from ``submit`` to MLflow confirming the
   bundle. Also how many bundles arrived before training ended.

Each implementation runs in its own process against its own sqlite store (``--server``: a
real ``mlflow server``). Usage::

    python benchmarks/bench_sink.py            # both, 12 loaded epochs
    python benchmarks/bench_sink.py --epochs 20 --server
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD = "70350d7"


def _batch(seed: int, n: int = 8):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, size=(n, 3, 64, 64)).astype(np.float32)
    acts = rng.uniform(0, 1, size=(n, 64, 8, 8)).astype(np.float32)
    return images, acts, rng.integers(0, 10, size=n), rng.normal(size=(n, 10)).astype(np.float32)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def worker(args: argparse.Namespace) -> dict:
    """Runs inside the process of one implementation; returns its figures."""
    import mlflow

    import mlflow_eigencam
    import mlflow_eigencam._transport as sink_mod
    from mlflow_eigencam import EigenCAMLogger

    tmp = Path(args.tmp)
    if args.uri:
        uri = args.uri
    else:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-sink")
    batches = [_batch(b) for b in range(2)]
    submits, confirms = [], []
    orig_send = sink_mod.send_item

    def timed_send(item, *a, **k):
        orig_send(item, *a, **k)
        if item.kind == "bundle":
            confirms.append(time.perf_counter())

    sink_mod.send_item = timed_send
    busy = []
    out: dict = {"impl": args.impl, "file": mlflow_eigencam.__file__}
    with mlflow.start_run():
        logger = EigenCAMLogger(n_samples=5, spool_dir=tmp / "spool")
        submit_ms, epoch_ms = [], []

        def wrap(sink):
            orig = sink.submit

            def timed_submit(item, *a, **k):
                t = time.perf_counter()
                orig(item, *a, **k)
                if item.kind == "bundle":
                    submit_ms.append((time.perf_counter() - t) * 1e3)
                    submits.append(time.perf_counter())

            sink.submit = timed_submit

        def epoch(e: int) -> None:
            for images, acts, labels, logits in batches:
                logger.on_batch_end(images, acts, labels, logits, mode="eval")
            t = time.perf_counter()
            logger.on_epoch_end(e)
            epoch_ms.append((time.perf_counter() - t) * 1e3)

        epoch(0)  # warm-up: run, sink and thread start
        logger.flush(120)
        wrap(logger._sink)
        submit_ms.clear(), epoch_ms.clear(), submits.clear(), confirms.clear()
        # 1. Cost on an idle machine: the sender keeps up, each epoch measured alone.
        for e in range(1, args.cost_epochs + 1):
            epoch(e)
            logger.flush(60)
        out["submit_ms"] = sorted(submit_ms)
        out["epoch_end_ms"] = sorted(epoch_ms)
        submit_ms.clear(), epoch_ms.clear(), submits.clear(), confirms.clear()
        # 2. Lag with every core busy.
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 1)]
        try:
            time.sleep(0.5)
            start = time.perf_counter()
            for e in range(100, 100 + args.epochs):
                _busy(args.epoch_seconds)
                epoch(e)
            end = time.perf_counter()
            during = len(confirms)
            logger.flush(300)
        finally:
            for p in busy:
                p.kill()
        lags = [c - s for s, c in zip(submits, confirms)]
        out.update(loaded_submit_ms=sorted(submit_ms), loaded_epoch_end_ms=sorted(epoch_ms),
                   lags=lags, delivered_during=during, epochs=args.epochs,
                   train_s=end - start, busy=len(busy))
        logger.close()
    return out


def _old_tree(tmp: Path) -> Path | None:
    dest = tmp / "old"
    dest.mkdir()
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD, "mlflow_eigencam"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"(no old figures: git archive {OLD} failed: {exc})")
        return None
    return dest


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _p90(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12, help="loaded epochs")
    parser.add_argument("--epoch-seconds", type=float, default=1.0)
    parser.add_argument("--cost-epochs", type=int, default=15)
    parser.add_argument("--server", action="store_true", help="a real mlflow server")
    parser.add_argument("--only", choices=["new", "old"], default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--uri", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-sink-") as d:
        tmp = Path(d)
        impls = {"new": REPO}
        if args.only != "new":
            old = _old_tree(tmp)
            if old is not None:
                impls["old"] = old
        if args.only == "old":
            impls.pop("new")
        server = None
        if args.server:
            sys.path.insert(0, str(REPO / "tests"))
            from readback import MlflowServer

            server = MlflowServer(tmp / "server")
            server.start(timeout=300)
        try:
            for name, path in impls.items():
                work = tmp / name / "work"
                work.mkdir(parents=True)
                env = dict(os.environ, PYTHONPATH=str(path), MLFLOW_EIGENCAM_SPOOL_DIR=str(work))
                cmd = [sys.executable, __file__, "--worker", "--impl", name, "--tmp", str(work),
                       "--epochs", str(args.epochs), "--epoch-seconds", str(args.epoch_seconds),
                       "--cost-epochs", str(args.cost_epochs)]
                if server is not None:
                    cmd += ["--uri", server.uri]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    print(f"{name}: failed:\n{proc.stderr[-3000:]}")
                    continue
                results[name] = json.loads(lines[-1][len("RESULT "):])
        finally:
            if server is not None:
                server.stop()

    store = "mlflow server" if args.server else "sqlite store"
    print(f"mlflow_eigencam sink: {os.cpu_count()} cores, {store}, bundles of 5 strips "
          f"(64x64 images, 64 channels), Python {sys.version.split()[0]}")
    print("\n1. training-thread cost per epoch (idle machine; median / p90 ms)")
    print(f"   {'impl':<5} {'submit (write-ahead step)':>28} {'whole on_epoch_end':>22}")
    for name, r in results.items():
        note = "record written + renamed" if name == "new" else "queue put, nothing on disk"
        print(f"   {name:<5} {_median(r['submit_ms']):>9.2f} / {_p90(r['submit_ms']):>6.2f}"
              f" ({note}) {_median(r['epoch_end_ms']):>8.1f} / {_p90(r['epoch_end_ms']):>6.1f}")
    print(f"\n2. upload lag, every core busy ({args.epochs} epochs of {args.epoch_seconds:g} s "
          f"+ one busy process per core)")
    print(f"   {'impl':<5} {'lag median':>10} {'lag max':>8} {'arrived during training':>25} "
          f"{'on_epoch_end med/max ms':>24}")
    for name, r in results.items():
        lags = r["lags"]
        print(f"   {name:<5} {_median(lags):>9.2f}s {max(lags) if lags else float('nan'):>7.2f}s "
              f"{r['delivered_during']:>12d} of {r['epochs']:<10d} "
              f"{_median(r['loaded_epoch_end_ms']):>11.1f} / "
              f"{max(r['loaded_epoch_end_ms']):.1f}")
    if "new" in results and "old" in results:
        n, o = results["new"], results["old"]
        print(f"\n   max lag new/old: {max(n['lags']) / max(o['lags']):.2f}; "
              f"write-ahead step / old queue put: "
              f"{_median(n['submit_ms']) / max(_median(o['submit_ms']), 1e-6):.0f}x")


if __name__ == "__main__":
    main()
