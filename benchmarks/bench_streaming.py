"""Streaming mode (``n_samples=None``): what it adds to a no-grad evaluation pass.

The measurement of issue 14: 8 batches of 32 images at 224 x 224 through a CNN of about
ResNet-18's cost (a ResNet-18 built here, random weights: same FLOPs), no-grad eval pass,
torch on 2 threads. Arms, interleaved epoch by epoch so that drifts in machine load hit
both alike (A B A B ...):

  * before: the eval pass alone;
  * after: the same pass with ``EigenCAMMonitor(n_samples=None)`` hooked on ``layer4``,
    ``epoch_end`` inside the timed region (a local sqlite MLflow store, upload on the
    monitor's background thread).

The same images come back every epoch (a validation set), so the first streamed epoch
stores the inputs and later ones only maps: both are printed. Also printed: peak RSS after
each streamed epoch (flat memory) and the artifact bytes per image (inputs once per run,
maps and table rows per epoch), read from the run's artifact folder.

    python benchmarks/bench_streaming.py [--epochs 4] [--batches 8] [--batch-size 32]
           [--threads 2] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (1.8 GFLOPs per 224 x 224 image), built here."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        widths = [64, 128, 256, 512]
        layers, cin = [], 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(_Block(cin, w, stride), _Block(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


OWN_CPU: List[float] = []  # per streamed epoch: the monitor's own CPU s (training + upload thread)


def eval_pass(model: nn.Module, data, monitor=None, epoch: int = 0) -> Tuple[float, float]:
    """(wall s, process CPU s: every thread, torch's and the upload thread's included).

    With a monitor, also appends to OWN_CPU the CPU seconds of its calls on this thread
    (capture, update, epoch_end: the forward hook's copy is inside the forward and not
    counted) plus its upload thread's (the sink's ``worker_cpu_s``).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    own = 0.0
    sink = getattr(getattr(monitor, "_logger", None), "_sink", None)
    worker0 = getattr(sink, "worker_cpu_s", 0.0)
    with torch.no_grad():
        for x, y in data:
            if monitor is None:
                model(x)
            else:
                a = time.thread_time()
                with monitor.capture("eval", "val"):
                    b = time.thread_time()
                    out = model(x)
                    c = time.thread_time()
                    monitor.update(x, y, out)
                own += (b - a) + (time.thread_time() - c)
        if monitor is not None:
            a = time.thread_time()
            monitor.epoch_end(epoch)
            own += time.thread_time() - a
            monitor.logger.flush(120)  # the upload's CPU counts for this epoch
            sink = monitor._logger._sink
            OWN_CPU.append(own + getattr(sink, "worker_cpu_s", 0.0) - worker0)
    return time.perf_counter() - t0, time.process_time() - c0


def folder_bytes(root: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file())


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet18().eval()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.rand(args.batch_size, 3, args.size, args.size, generator=gen),
             torch.randint(0, 1000, (args.batch_size,), generator=gen)) for _ in range(args.batches)]
    n_images = args.batches * args.batch_size

    import mlflow

    from mlflow_eigencam.pytorch import EigenCAMMonitor

    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp:
        tmp_path = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        exp = mlflow.create_experiment("bench", artifact_location=(tmp_path / "artifacts").as_uri())
        os.environ.setdefault("MLFLOW_EIGENCAM_SPOOL_DIR", str(tmp_path / "spool"))
        eval_pass(model, data[:1])  # warm-up: allocator, kernels
        before: List[float] = []
        after: List[float] = []
        cpu_b: List[float] = []
        cpu_a: List[float] = []
        rss: List[float] = []
        with mlflow.start_run(experiment_id=exp) as run:
            monitor = EigenCAMMonitor(model, target_layer="layer4", n_samples=None,
                                      n_components=3, mode="eval")
            for epoch in range(args.epochs):
                for arm, wall, cpu in (("before", before, cpu_b), ("after", after, cpu_a)):
                    w, c = eval_pass(model, data, monitor if arm == "after" else None, epoch)
                    wall.append(w)
                    cpu.append(c)
                rss.append(rss_mb())
                print(f"  epoch {epoch}: before {before[-1]:.2f} s ({cpu_b[-1]:.2f} s CPU), "
                      f"after {after[-1]:.2f} s ({cpu_a[-1]:.2f} s CPU)", file=sys.stderr)
            t0 = time.perf_counter()
            monitor.close()
            close_s = time.perf_counter() - t0
        art = tmp_path / "artifacts" / run.info.run_id / "artifacts" / "eigencam" / "eval" / "val"
        inputs_b = folder_bytes(art, "stream/*")
        epoch_b = [folder_bytes(art, f"epoch_{e:04d}/*") for e in range(args.epochs)]
        maps_b = [folder_bytes(art, f"epoch_{e:04d}/maps.npz") for e in range(args.epochs)]
        table_b = [folder_bytes(art, f"table/epoch_{e:04d}-*.json") for e in range(args.epochs)]
        images_b = folder_bytes(tmp_path / "artifacts" / run.info.run_id / "artifacts", "images/*")

    first = after[0] / before[0] - 1
    later = [a / b - 1 for a, b in zip(after[1:], before[1:])]
    later_med = statistics.median(later) if later else float("nan")
    lines = [
        f"| {n_images} images ({args.batches} x {args.batch_size}) at {args.size}x{args.size}, ResNet-18, "
        f"no-grad eval, {args.threads} torch threads | before: wall (CPU) | after: wall (CPU) | "
        f"added wall | added CPU |",
        "|---|---|---|---|---|",
    ]
    for e in range(args.epochs):
        what = "first epoch (inputs stored)" if e == 0 else f"epoch {e} (maps only)"
        lines.append(f"| {what} | {before[e]:.2f} s ({cpu_b[e]:.2f} s) | {after[e]:.2f} s ({cpu_a[e]:.2f} s) | "
                     f"{(after[e] / before[e] - 1) * 100:+.0f} % | {(cpu_a[e] / cpu_b[e] - 1) * 100:+.0f} % |")
    cpu_first = cpu_a[0] / cpu_b[0] - 1
    cpu_later = statistics.median([a / b - 1 for a, b in zip(cpu_a[1:], cpu_b[1:])]) if later else float("nan")
    lines.append(f"| median of epochs 1.. | {statistics.median(before[1:]):.2f} s | "
                 f"{statistics.median(after[1:]):.2f} s | {later_med * 100:+.0f} % | {cpu_later * 100:+.0f} % |")
    per_image = (statistics.median(after[1:]) - statistics.median(before[1:])) / n_images * 1e3
    own_pct = [o / b * 100 for o, b in zip(OWN_CPU, cpu_b)]
    notes = [
        f"the monitor's own CPU per epoch (its calls on the training thread + its upload thread): "
        f"{', '.join(f'{o:.2f} s' for o in OWN_CPU)} = {', '.join(f'{p:.1f} %' for p in own_pct)} of "
        f"the pass's CPU without it ({statistics.median(OWN_CPU[1:] or OWN_CPU) / n_images * 1e3:.1f} ms "
        f"per image after the first epoch)",
        f"added wall per image after the first epoch: {per_image:.1f} ms; close() {close_s:.2f} s",
        f"peak RSS after each streamed epoch: {', '.join(f'{r:.0f}' for r in rss)} MB",
        f"disk: inputs {inputs_b / n_images / 1e3:.1f} kB per image once per run "
        f"({inputs_b / 1e6:.1f} MB); per epoch maps.npz {statistics.median(maps_b) / n_images:.0f} B "
        f"and table part {statistics.median(table_b) / n_images:.0f} B per image; whole epoch folder "
        f"(maps, grid, {min(16, n_images)} strips) {statistics.median(epoch_b) / 1e6:.2f} MB; image series "
        f"(grid rows only) {images_b / 1e6:.2f} MB for {args.epochs} epochs",
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1-min load average at the end "
        f"{os.getloadavg()[0]:.2f}",
        f"target (issue 14): streaming adds <= 25 % (wall): first epoch "
        f"{'ok' if first <= 0.25 else 'MISSED'}, later epochs {'ok' if later_med <= 0.25 else 'MISSED'}; "
        f"in CPU time (what a loaded machine cannot blur): first {cpu_first * 100:+.0f} %, "
        f"later {cpu_later * 100:+.0f} %",
    ]
    table = "\n".join(lines)
    print(table)
    print()
    print("\n".join(notes))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("# Streaming mode overhead\n\n" + table + "\n\n"
                                 + "\n".join(f"- {n}" for n in notes) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
