"""What a second layer (``layers=["layer1", "layer4"]``, docs/layers.md) costs per logged
epoch, side by side with one layer.

The setting of issue 24: a ResNet-18-sized CNN at 224 x 224 (``bench_streaming.ResNet18``,
torch on 2 threads), ``EigenCAMMonitor`` with pinned samples and the default faithfulness
pass. Arms, interleaved run by run so that machine drift hits both alike:

  * ``layers=["layer4"]``: one layer, exactly ``target_layer="layer4"``;
  * ``layers=["layer1", "layer4"]``: plus layer1 (64 x 56 x 56): its EigenCAM, a second
    row of panels, its own faithfulness pass (``2F n`` images more).

Printed: median seconds of the no-grad eval pass alone (8 batches of 32), of ``epoch_end``
per arm (the pinned forward, faithfulness, EigenCAM, cards; the upload runs on its own
thread), the difference, and the difference as a share of the eval pass.

    python benchmarks/bench_layers.py [--epochs 4] [--samples 5 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_streaming import ResNet18  # noqa: E402


def eval_pass(model, data) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in data:
            model(x)
    return time.perf_counter() - t0


def epoch_end_times(model, batch, n_samples: int, layers: Sequence[str], epochs: int) -> List[float]:
    """Seconds of ``monitor.epoch_end`` at epochs 1.. (pinned samples: no per-batch work)."""
    from mlflow_eigencam.pytorch import EigenCAMMonitor

    monitor = EigenCAMMonitor(model, layers=list(layers), n_samples=n_samples)
    x, y = batch
    times = []
    with torch.no_grad():
        for epoch in range(epochs + 1):
            with monitor.capture("eval", "val"):
                monitor.update(x, y, model(x))
            t0 = time.perf_counter()
            monitor.epoch_end(epoch)
            if epoch:  # epoch 0: the first epoch's batch is not pinned yet
                times.append(time.perf_counter() - t0)
            monitor.flush(120)
    monitor.close()
    return times


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
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
    print(f"{'samples':>7} | {'layer4':>9} | {'layer1+4':>9} | {'added':>7} | {'added / eval pass':>17}")
    for n in args.samples:
        one: List[float] = []
        two: List[float] = []
        for _ in range(2):  # interleaved: one, two, one, two
            one += epoch_end_times(model, data[0], n, ["layer4"], args.epochs)
            two += epoch_end_times(model, data[0], n, ["layer1", "layer4"], args.epochs)
        m1, m2 = statistics.median(one), statistics.median(two)
        print(f"{n:>7} | {m1:>7.3f} s | {m2:>7.3f} s | {m2 - m1:>5.3f} s | "
              f"{100 * (m2 - m1) / base:>16.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
