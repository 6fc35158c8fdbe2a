"""Upload time per epoch against a slow server: every response of a real ``mlflow server``
delayed 2-5 s (uniform, drawn per response, seeded) by a proxy on 127.0.0.1.

A logger with ``n_samples=16`` logs epochs of 224x224 images, one every ``--interval`` s
(the goal: keep up with one epoch every 10 s), and the script prints per implementation:
epochs delivered, the upload time per epoch (time from the previous epoch's confirmation, or
its own submit if later, to its own confirmation: what one epoch costs the sender) and the
lag of the first and last epochs (submit to confirmation; a lag that grows with each epoch
does not keep up). Runs this checkout ("new") and the package at ``OLD`` ("old": a fixed 2 s
``/health`` timeout and one upload request after the other), each in its own process; "old"
twice: with ``/health`` delayed like the rest (it takes the server for down) and with a fast
``/health`` (what its sequential uploads cost). Usage::

    python benchmarks/bench_slow_server.py                 # 8 epochs new, 1 epoch old
    python benchmarks/bench_slow_server.py --epochs 12 --interval 10
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
OLD = "c31b74e"


def child(uri: str, epochs: int, interval: float, close_timeout: float) -> None:
    import warnings

    import numpy as np
    from mlflow.tracking import MlflowClient

    from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning

    warnings.simplefilter("ignore", EigenCAMWarning)
    client = MlflowClient(uri)
    rid = client.create_run(client.create_experiment(f"slow-{time.time_ns()}")).info.run_id
    logger = EigenCAMLogger(n_samples=16, run_id=rid, tracking_uri=uri,
                            spool_dir=tempfile.mkdtemp(prefix="bench-slow-"))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(16, 3, 224, 224)).astype(np.float32)
    acts = rng.uniform(0, 1, size=(16, 64, 14, 14)).astype(np.float32)
    labels, logits = np.arange(16) % 3, rng.normal(size=(16, 3)).astype(np.float32)
    start = time.monotonic()
    for epoch in range(epochs):
        time.sleep(max(0.0, start + epoch * interval - time.monotonic()))
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
        logger.on_epoch_end(epoch)
    time.sleep(max(0.0, start + epochs * interval - time.monotonic()))
    left = logger.close(timeout=close_timeout)
    sink = logger._sink
    delivered = list(sink.delivered)[1:] if sink is not None else []  # [0]: the run's tags
    print(json.dumps({"delivered": delivered, "left": int(left)}))


def _run(pythonpath: str, uri: str, epochs: int, interval: float, close_timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, MLFLOW_DISABLE_TELEMETRY="true")
    out = subprocess.run([sys.executable, __file__, "--child", uri, "--epochs", str(epochs),
                          "--interval", str(interval), "--close-timeout", str(close_timeout)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["epochs"] = epochs
    return result


def _summary(r: dict) -> dict:
    pairs = sorted(r["delivered"], key=lambda p: p[1])
    upload, last = [], None
    for submitted, confirmed in pairs:
        upload.append(confirmed - max(submitted, last if last is not None else submitted))
        last = confirmed
    lags = [c - s for s, c in pairs]
    return {"n": len(pairs), "upload": statistics.median(upload) if upload else None,
            "lag_first": lags[0] if lags else None, "lag_last": lags[-1] if lags else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--old-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--close-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.epochs, args.interval, args.close_timeout)
        return
    sys.path.insert(0, str(REPO))
    from tests.helpers.proxy import DelayProxy
    from tests.helpers.readback import MlflowServer

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = MlflowServer(Path(tmp) / "server")
        server.start()
        try:
            proxy = DelayProxy(server.port, delay=(2.0, 5.0), seed=args.seed)
            fast = DelayProxy(server.port, delay=(2.0, 5.0), seed=args.seed, fast_health=True)
            try:
                results["new"] = _run(str(REPO), proxy.uri, args.epochs, args.interval, 180)
                old = Path(tmp) / "old"
                old.mkdir()
                try:
                    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD,
                                              "mlflow_eigencam"], capture_output=True,
                                             check=True).stdout
                    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
                    results["old"] = _run(str(old), proxy.uri, args.old_epochs, args.interval,
                                          30)
                    results["old, fast /health"] = _run(
                        str(old), fast.uri, args.old_epochs, args.interval,
                        300 * args.old_epochs)
                except (subprocess.CalledProcessError, OSError) as exc:
                    print(f"(old at {OLD} not measured: {exc})")
            finally:
                proxy.stop()
                fast.stop()
        finally:
            server.stop()
    print(f"16 samples of 224x224 per epoch, one epoch every {args.interval:g} s; every "
          f"response delayed 2-5 s (seed {args.seed})")
    print(f"{'':18} {'delivered':>10} {'upload/epoch':>13} {'lag 1st':>8} {'lag last':>9}  keeps up")
    for name, r in results.items():
        s = _summary(r)

        def sec(v):
            return f"{v:7.1f} s" if v is not None else "      -  "

        keeps = (s["n"] == r["epochs"] and s["upload"] is not None
                 and s["upload"] <= args.interval)
        print(f"{name:18} {s['n']:>4} of {r['epochs']:<3} {sec(s['upload']):>13} "
              f"{sec(s['lag_first']):>8} {sec(s['lag_last']):>9}  {'yes' if keeps else 'no'}")


if __name__ == "__main__":
    main()
