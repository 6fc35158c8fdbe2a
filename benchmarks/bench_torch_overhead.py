"""Overhead of EigenCAMMonitor (default settings) on a small CNN's epochs, plain PyTorch loop.

Runs the same seeded training (train + eval per epoch) with and without the monitor,
interleaved (A B B A ...) so that drifts in machine load hit both arms alike, and prints the
medians and the overhead in percent: per epoch (the target), and per run with the one-off
costs (constructor, and ``close()`` waiting for the last upload). Everything the monitor
costs is inside the timed regions: hooking the validation batches, the extra forward pass
on the pinned samples, EigenCAM and rendering at each epoch end, and the background upload
to a local sqlite MLflow store competing with training for the cores.

    python benchmarks/bench_torch_overhead.py              # target: overhead <= 3 %
    python benchmarks/bench_torch_overhead.py --train-size 4096   # shorter epochs: larger share
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from torch import nn

from mlflow_eigencam.pytorch import EigenCAMMonitor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _shapes import make_shapes  # noqa: E402


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4),
    )


def batches(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


def run(data, epochs: int, batch_size: int, with_monitor: bool) -> dict:
    """One seeded training run of ``epochs`` epochs (train + eval), with or without the monitor.

    Returns wall seconds of the whole run (monitor built and closed inside it, so the final
    flush is counted), of each epoch (train + eval + ``epoch_end``: the upload thread's
    competition for the cores lands in the next epoch's time), of the one-off calls (the
    monitor's constructor and ``close()``), and the process CPU seconds (every thread).
    """
    (x_train, y_train), (x_val, y_val) = data
    model = build_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    epoch_times = []
    main_cpu = worker_cpu = 0.0  # CPU s of the monitor's calls / of the upload thread
    cpu_start = time.process_time()
    start = time.perf_counter()
    monitor = EigenCAMMonitor(model) if with_monitor else None
    one_off = time.perf_counter() - start
    with mlflow.start_run():
        for epoch in range(epochs):
            t_epoch = time.perf_counter()
            model.train()
            for xb, yb in batches(x_train, y_train, batch_size):
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                for xb, yb in batches(x_val, y_val, batch_size):
                    if monitor is None:
                        model(xb)
                    else:
                        c0 = time.thread_time()
                        with monitor.capture(mode="eval", ds_id="val"):
                            c1 = time.thread_time()
                            logits = model(xb)
                            c2 = time.thread_time()
                            monitor.update(images=xb, labels=yb, preds=logits)
                        main_cpu += (c1 - c0) + (time.thread_time() - c2)
            if monitor is not None:
                c0 = time.thread_time()
                monitor.epoch_end(epoch)
                main_cpu += time.thread_time() - c0
            epoch_times.append(time.perf_counter() - t_epoch)
        if monitor is not None:
            t0 = time.perf_counter()
            sink = monitor._logger._sink  # read before close(): its CPU counter
            monitor.close()  # waits for the upload: its cost is counted
            one_off += time.perf_counter() - t0
            worker_cpu = sink.worker_cpu_s if sink is not None else 0.0
    return {"wall": time.perf_counter() - start, "epochs": epoch_times, "one_off": one_off,
            "cpu": time.process_time() - cpu_start, "main_cpu": main_cpu,
            "worker_cpu": worker_cpu}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6, help="runs per arm (interleaved)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=8192)
    parser.add_argument("--val-size", type=int, default=512)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench-torch-"))
    os.environ.setdefault("MLFLOW_EIGENCAM_SPOOL_DIR", str(tmp / "spool"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "bench-torch", artifact_location=(tmp / "artifacts").as_uri()))

    data = []
    for n, seed in ((args.train_size, 0), (args.val_size, 1)):
        x, y, _ = make_shapes(n, args.size, n_classes=4, seed=seed)
        data.append((torch.from_numpy(x), torch.from_numpy(y)))

    run(data, 1, args.batch_size, True)  # warm-up: imports, allocator, sqlite schema
    runs: dict = {False: [], True: []}
    order = [False, True, True, False] * ((args.repeats + 1) // 2)  # pairs: (F,T), (T,F), ...
    for with_monitor in order[: 2 * args.repeats]:
        runs[with_monitor].append(run(data, args.epochs, args.batch_size, with_monitor))

    def median(arm: bool, field: str) -> float:
        if field == "epochs":
            return statistics.median(t for r in runs[arm] for t in r["epochs"])
        return statistics.median(r[field] for r in runs[arm])

    def pct(a: float, b: float) -> float:
        return 100.0 * (a - b) / b

    epoch0, epoch1 = median(False, "epochs"), median(True, "epochs")
    wall0, wall1 = median(False, "wall"), median(True, "wall")
    cpu0, cpu1 = median(False, "cpu"), median(True, "cpu")
    one_off = median(True, "one_off")
    print(f"small CNN, {args.train_size} train + {args.val_size} eval images of "
          f"{args.size}x{args.size} per epoch, {args.epochs} epochs per run, "
          f"{args.repeats} interleaved runs per arm, torch threads {torch.get_num_threads()}")
    print(f"{'':22}{'median epoch s':>15}{'median run s':>14}{'run CPU s':>11}   epochs (s)")
    for label, arm in (("without monitor", False), ("with EigenCAMMonitor", True)):
        epochs = " ".join(f"{t:.2f}" for r in runs[arm] for t in r["epochs"])
        print(f"{label:22}{median(arm, 'epochs'):15.3f}{median(arm, 'wall'):14.3f}"
              f"{median(arm, 'cpu'):11.2f}   {epochs}")
    # Paired: each run with the monitor against the plain run next to it in time, so that the
    # machine's drift (often larger than the effect) cancels; the median over the pairs.
    pairs = [pct(statistics.median(a["epochs"]), statistics.median(b["epochs"]))
             for a, b in zip(runs[True], runs[False])]
    paired = statistics.median(pairs)
    print(f"overhead per epoch: {paired:+.2f} % (median of {len(pairs)} adjacent pairs: "
          f"{', '.join(f'{p:+.1f}' for p in pairs)}; pooled medians {pct(epoch1, epoch0):+.2f} %, "
          f"{(epoch1 - epoch0) * 1000:.0f} ms of {epoch0:.2f} s); target <= 3 %")
    print(f"whole run incl. one-off costs: {pct(wall1, wall0):+.2f} %  (constructor + close(), "
          f"which waits for the last epoch's upload: {one_off * 1000:.0f} ms per run)")
    print(f"CPU time of the process (all threads): {pct(cpu1, cpu0):+.2f} % per run")
    main_ms = median(True, "main_cpu") / args.epochs * 1000
    worker_ms = median(True, "worker_cpu") / args.epochs * 1000
    print(f"the monitor's own CPU per epoch: {main_ms:.0f} ms in its calls on the training "
          f"thread + {worker_ms:.0f} ms on the upload thread = "
          f"{(main_ms + worker_ms) / epoch0 / 10:.2f} % of an epoch")
    return {"epoch_overhead_pct": paired, "run_overhead_pct": pct(wall1, wall0),
            "cpu_overhead_pct": pct(cpu1, cpu0), "one_off_s": one_off}


if __name__ == "__main__":
    main()
