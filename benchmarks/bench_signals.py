"""What the explanation signals (docs/signals.md) cost, side by side in one run.

The setting of issue 24: the no-grad eval pass of ``bench_streaming.py`` (8 batches of 32
images at 224 x 224 through a ResNet-18-sized CNN, torch on 2 threads). Arms, interleaved
epoch by epoch so that machine drift hits them alike (A B C D A B C D ...):

  * the eval pass alone;
  * with ``EigenCAMMonitor`` at its defaults (5 pinned samples) and ``faithfulness=False``
    (the pinned forward, EigenCAM, cards, ``map_change``, ``fixation``, ``stable_epoch``);
  * the same with ``faithfulness=(0.5,)`` (F = 1: ``2 n`` perturbed images);
  * the same with ``faithfulness=(0.1, 0.5)`` (F = 2: ``4 n`` perturbed images).

``epoch_end`` and the wait for the upload are inside the timed region (the whole logger).
Printed per arm: median wall and process CPU of epochs 1.. (epoch 0 brings the samples),
what the arm adds to the pass alone, and the monitor's own CPU (its calls on the training
thread + its upload thread), the figure a loaded 2-core machine does not blur. Then
``epoch_end`` alone for 16 pinned samples (faithfulness off / on), and the logger's
``on_epoch_end`` for 16 samples of 224 x 224 with every logger-side signal (map_change,
fixation, localization from boxes). The issue's budget: the whole logger <= 5 % of the eval
pass; ``on_epoch_end`` < 0.5 s for 16 samples.

    python benchmarks/bench_signals.py [--epochs 3] [--threads 2] [--epoch-end-only | --logger-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_streaming  # noqa: E402
from bench_streaming import ResNet18  # noqa: E402

#: arm name -> the monitor's ``faithfulness`` argument (None: no monitor).
ARMS: Dict[str, Any] = {"pass alone": None, "faithfulness off": False,
                        "F=1 (0.5,)": (0.5,), "F=2 (0.1, 0.5)": (0.1, 0.5)}


def epoch_end_times(model, data, n_samples: int, faithfulness: Any, epochs: int,
                    cpu: Optional[List[float]] = None) -> List[float]:
    """Seconds of ``monitor.epoch_end`` at epochs 1.. (pinned: the extra forward, the
    faithfulness pass when on, EigenCAM, rendering; the upload is on its own thread).
    ``cpu`` gets the process CPU seconds of ``epoch_end`` plus the wait for the upload
    (every thread: the whole logger's cost per epoch once the samples are pinned)."""
    from mlflow_eigencam.pytorch import EigenCAMMonitor

    monitor = EigenCAMMonitor(model, target_layer="layer4", n_samples=n_samples,
                              faithfulness=faithfulness)
    times = []
    with torch.no_grad():
        for epoch in range(epochs + 1):
            for x, y in data:
                with monitor.capture("eval", "val"):
                    monitor.update(x, y, model(x))
            t0, c0 = time.perf_counter(), time.process_time()
            monitor.epoch_end(epoch)
            t1 = time.perf_counter()
            monitor.flush(120)
            if epoch:  # epoch 0: the first epoch's batches are not pinned yet
                times.append(t1 - t0)
                if cpu is not None:
                    cpu.append(time.process_time() - c0)
    monitor.close()
    return times


def logger_times(n: int, size: int, epochs: int) -> List[float]:
    """Seconds of the logger's ``on_epoch_end`` for n samples with true boxes (every
    logger-side signal: map_change, fixation, localization, stable_epoch, alarms)."""
    from mlflow_eigencam import EigenCAMLogger

    rng = np.random.default_rng(0)
    images = rng.random((n, 3, size, size), dtype=np.float32)
    true = [np.array([[size / 4, size / 4, size / 2, size / 2]])] * n
    logger = EigenCAMLogger(n_samples=n)
    times = []
    for epoch in range(epochs):
        acts = rng.random((n, 2048, size // 32, size // 32), dtype=np.float32)
        logger.on_batch_end(images, acts, np.zeros(n, int), mode="eval", boxes=true)
        t0 = time.perf_counter()
        logger.on_epoch_end(epoch)
        times.append(time.perf_counter() - t0)
        logger.flush(120)
    logger.close()
    return times


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after epoch 0")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epoch-end-only", action="store_true",
                        help="skip the interleaved full passes (a loaded machine): the pass alone "
                        "once, then each arm's epoch_end + upload CPU on pinned samples")
    parser.add_argument("--logger-only", action="store_true",
                        help="only the logger's on_epoch_end for 16 samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench-signals-")
    os.environ.setdefault("MLFLOW_EIGENCAM_SPOOL_DIR", f"{tmp}/spool")
    import mlflow

    from mlflow_eigencam.pytorch import EigenCAMMonitor

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/bench.db")
    if args.logger_only:
        _logger_line(args)
        return 0
    torch.manual_seed(0)
    model = ResNet18(10).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(args.batch_size, 3, args.size, args.size, generator=g),
             torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(args.batches)]
    bench_streaming.eval_pass(model, data[:1])  # warm-up
    if args.epoch_end_only:
        return _epoch_end_only(model, data, args)
    monitors = {name: None if f is None else EigenCAMMonitor(model, target_layer="layer4", faithfulness=f)
                for name, f in ARMS.items()}
    wall: Dict[str, List[float]] = {name: [] for name in ARMS}
    cpu: Dict[str, List[float]] = {name: [] for name in ARMS}
    own: Dict[str, List[float]] = {name: [] for name in ARMS}
    for epoch in range(args.epochs + 1):
        for name, monitor in monitors.items():
            bench_streaming.OWN_CPU.clear()
            w, c = bench_streaming.eval_pass(model, data, monitor, epoch)
            if epoch:
                wall[name].append(w)
                cpu[name].append(c)
                own[name].append(bench_streaming.OWN_CPU[-1] if bench_streaming.OWN_CPU else 0.0)
            print(f"  epoch {epoch} {name}: {w:.2f} s ({c:.2f} s CPU)", file=sys.stderr)
    for monitor in monitors.values():
        if monitor is not None:
            monitor.close()
    base_w, base_c = statistics.median(wall["pass alone"]), statistics.median(cpu["pass alone"])
    print(f"\neval pass: {args.batches} x {args.batch_size} images at {args.size} px, ResNet-18, "
          f"{args.threads} torch threads, monitor defaults (5 pinned samples, layer4); medians of "
          f"epochs 1..{args.epochs}")
    print(f"{'arm':<18} | {'wall':>7} | {'CPU':>7} | {'added wall':>10} | {'added CPU':>9} | "
          f"{'monitor own CPU / pass CPU':>26}")
    for name in ARMS:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        o = statistics.median(own[name])
        print(f"{name:<18} | {w:>5.2f} s | {c:>5.2f} s | {100 * (w / base_w - 1):>+8.1f} % | "
              f"{100 * (c / base_c - 1):>+7.1f} % | {o:>6.2f} s = {100 * o / base_c:>5.1f} %")
    x16 = data[:1]  # one batch brings 16 samples
    for f in (False, (0.5,), (0.1, 0.5)):
        t = statistics.median(epoch_end_times(model, x16, 16, f, args.epochs))
        print(f"monitor epoch_end, 16 pinned samples, faithfulness={f}: {t:.3f} s")
    _logger_line(args)
    return 0


def _epoch_end_only(model, data, args: argparse.Namespace) -> int:
    """The pass alone's CPU once, then per arm (faithfulness off, F=1, F=2; 5 and 16 pinned
    samples) the process CPU of ``epoch_end`` + the upload, over ``--epochs`` epochs: once
    the samples are pinned that is all the monitor does in an eval pass."""
    wall, cpu = bench_streaming.eval_pass(model, data)
    print(f"\neval pass alone: {args.batches} x {args.batch_size} images at {args.size} px, "
          f"ResNet-18, {args.threads} torch threads: {wall:.2f} s wall, {cpu:.2f} s CPU")
    print(f"{'pinned':>6} | {'faithfulness':<12} | {'epoch_end wall':>14} | {'epoch_end + upload CPU':>22} | "
          f"{'CPU / pass CPU':>14}")
    for n in (5, 16):
        for f in (False, (0.5,), (0.1, 0.5)):
            spent: List[float] = []
            t = statistics.median(epoch_end_times(model, data[:1], n, f, args.epochs, spent))
            c = statistics.median(spent)
            print(f"{n:>6} | {str(f):<12} | {t:>12.3f} s | {c:>20.3f} s | {100 * c / cpu:>12.1f} %")
    _logger_line(args)
    return 0


def _logger_line(args: argparse.Namespace) -> None:
    t16 = logger_times(16, args.size, args.epochs + 2)
    print(f"logger on_epoch_end, 16 samples of {args.size} px, (16, 2048, 7, 7), boxes given: "
          f"median {statistics.median(t16[1:]):.3f} s, max {max(t16[1:]):.3f} s (target < 0.5 s)")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1-min load average at the end "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
