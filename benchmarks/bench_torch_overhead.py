"""Overhead of EigenCAMMonitor (default settings) on a small CNN's epochs, plain PyTorch loop.

Runs the same seeded training (train + eval per epoch) with and without the monitor,
interleaved (A B B A ...) so that drifts in machine load hit both arms alike, and prints the
medians and the overhead in percent. Everything the monitor costs is inside the timed region:
hooking the validation batches, the extra forward pass on the pinned samples, EigenCAM and
rendering at each epoch end, the background upload to a local sqlite MLflow store, and the
final flush in ``close()``.

    python benchmarks/bench_torch_overhead.py              # target: overhead <= 3 %
    python benchmarks/bench_torch_overhead.py --repeats 7 --epochs 3 --train-size 8192
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


def run(data, epochs: int, batch_size: int, with_monitor: bool) -> tuple:
    """``(wall s, wall s inside monitor calls, process CPU s)`` for ``epochs`` epochs of
    train + eval.

    The monitor is built, used and closed inside the timed region. The second figure sums the
    wall time of the monitor's own calls on the training thread (capture enter/exit, update,
    epoch_end, close): less noisy than the A/B difference on a busy machine, but it misses the
    hook inside the forward pass and the upload thread's competition for the cores. The
    third figure, CPU time of the whole process (every thread, upload included), is the
    least sensitive to other processes competing for the machine.
    """
    (x_train, y_train), (x_val, y_val) = data
    model = build_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inside = 0.0
    cpu_start = time.process_time()
    start = time.perf_counter()
    monitor = EigenCAMMonitor(model) if with_monitor else None
    inside += time.perf_counter() - start
    with mlflow.start_run():
        for epoch in range(epochs):
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
                        t0 = time.perf_counter()
                        capture = monitor.capture(mode="eval", ds_id="val")
                        capture.__enter__()
                        t1 = time.perf_counter()
                        logits = model(xb)
                        t2 = time.perf_counter()
                        monitor.update(images=xb, labels=yb, preds=logits)
                        capture.__exit__(None, None, None)
                        inside += (t1 - t0) + (time.perf_counter() - t2)
            if monitor is not None:
                t0 = time.perf_counter()
                monitor.epoch_end(epoch)
                inside += time.perf_counter() - t0
        if monitor is not None:
            t0 = time.perf_counter()
            monitor.close()  # waits for the upload: its cost is counted
            inside += time.perf_counter() - t0
    return time.perf_counter() - start, inside, time.process_time() - cpu_start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per arm (interleaved)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=4096)
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
    times = {False: [], True: []}
    cpu = {False: [], True: []}
    inside = []
    order = [False, True, True, False] * ((args.repeats + 1) // 2)
    for with_monitor in order[: 2 * args.repeats]:
        seconds, in_monitor, cpu_seconds = run(data, args.epochs, args.batch_size, with_monitor)
        times[with_monitor].append(seconds)
        cpu[with_monitor].append(cpu_seconds)
        if with_monitor:
            inside.append(in_monitor)
    base, monitored = statistics.median(times[False]), statistics.median(times[True])
    overhead = 100.0 * (monitored - base) / base
    inside_pct = 100.0 * statistics.median(inside) / base
    cpu_base, cpu_monitored = statistics.median(cpu[False]), statistics.median(cpu[True])
    cpu_pct = 100.0 * (cpu_monitored - cpu_base) / cpu_base
    epoch_base = base / args.epochs
    print(f"small CNN, {args.train_size} train + {args.val_size} eval images of "
          f"{args.size}x{args.size} per epoch, {args.epochs} epochs per run, "
          f"{args.repeats} interleaved runs per arm, torch threads {torch.get_num_threads()}")
    print(f"{'':22}{'median s/run':>14}{'s/epoch':>10}{'runs (s)':>40}")
    for label, key in (("without monitor", False), ("with EigenCAMMonitor", True)):
        med = statistics.median(times[key])
        runs = " ".join(f"{t:.2f}" for t in times[key])
        print(f"{label:22}{med:14.3f}{med / args.epochs:10.3f}{runs:>40}")
    print(f"overhead: {overhead:+.2f} %  ({(monitored - base) / args.epochs * 1000:.0f} ms per "
          f"epoch of {epoch_base:.2f} s; target <= 3 %)")
    print(f"CPU time (all threads): {cpu_base:.2f} s -> {cpu_monitored:.2f} s per run, "
          f"overhead {cpu_pct:+.2f} %")
    print(f"time inside monitor calls: {inside_pct:.2f} % of the plain run "
          f"({statistics.median(inside) / args.epochs * 1000:.0f} ms per epoch)")
    return {"base_s": base, "monitored_s": monitored, "overhead_pct": overhead,
            "cpu_overhead_pct": cpu_pct, "inside_pct": inside_pct}


if __name__ == "__main__":
    main()
