"""Shortcut demo: the explanation signals find a planted shortcut that accuracy does not.

Two runs of a tiny CNN on synthetic shapes (``_shapes.py``), the same seed, with
``EigenCAMMonitor`` and the shapes' true boxes given to ``update(boxes=...)``:

* **clean**: the class is the shape;
* **cued**: a small patch in the top-left corner has a colour that tells the class in
  ``--cue-rate`` of the training *and* validation images (a watermark, a scanner tag).

Both reach high validation accuracy. The demo prints, per run and epoch, the validation
accuracy and the mean signals of the pinned validation samples (docs/signals.md):
``localization`` (share of the map on the shape's box), ``pointing_game`` (the map's peak on
the box) and ``faithfulness`` (keep-top minus drop-top probability), plus the accuracy on
the validation images with the corner patch's colour shuffled, which only the cued run
loses.

    python examples/shortcut_demo.py                # about a minute on a 2-core CPU
    python examples/shortcut_demo.py --epochs 3 --tracking-uri sqlite:////tmp/s.db
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ui_uri  # noqa: E402
from _shapes import SHAPES, make_shapes  # noqa: E402

N_CLASSES = 3
SIZE = 32
CUE = 6  # the corner patch's side in pixels
#: One colour per class for the corner patch.
CUE_COLOURS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
SIGNALS = ("localization", "pointing_game", "faithfulness")


def make_data(n: int, seed: int, cue_rate: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shapes (NCHW float32 in [0, 1]), labels and boxes; with ``cue_rate`` > 0 the corner
    patch has the class's colour in that share of the images and another class's colour in
    the others (it may cover a corner of a shape)."""
    x, y, boxes = make_shapes(n, SIZE, n_classes=N_CLASSES, seed=seed)
    rng = np.random.default_rng(seed + 100)
    if cue_rate > 0:
        right = rng.random(n) < cue_rate
        colour = np.where(right, y, (y + rng.integers(1, N_CLASSES, size=n)) % N_CLASSES)
        x[:, :, :CUE, :CUE] = CUE_COLOURS[colour][:, :, None, None]
    return x, y, boxes


def shuffled_cue(x: np.ndarray, seed: int) -> np.ndarray:
    """The images with the corner patch given a random class colour."""
    out = x.copy()
    colour = np.random.default_rng(seed).integers(0, N_CLASSES, size=len(x))
    out[:, :, :CUE, :CUE] = CUE_COLOURS[colour][:, :, None, None]
    return out


def build_model(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, N_CLASSES),
    )


def train_run(name: str, cue_rate: float, args: argparse.Namespace) -> Tuple[str, List[dict]]:
    """One run; returns its id and per-epoch {accuracy, accuracy_shuffled_cue, signals}."""
    import mlflow
    import torch
    from torch import nn

    from mlflow_eigencam.pytorch import EigenCAMMonitor

    x_tr, y_tr, _ = make_data(args.train_size, args.seed, cue_rate)
    x_va, y_va, b_va = make_data(128, args.seed + 1, cue_rate)
    x_sh = shuffled_cue(x_va, args.seed + 2) if cue_rate > 0 else x_va
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    xv, yv, xs = torch.from_numpy(x_va), torch.from_numpy(y_va), torch.from_numpy(x_sh)
    model = build_model(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    with mlflow.start_run(run_name=name) as run:
        with EigenCAMMonitor(model, n_samples=args.n_samples,
                             label_mapping=list(SHAPES[:N_CLASSES])) as monitor:
            for epoch in range(args.epochs):
                model.train()
                order = torch.randperm(len(xt), generator=gen)
                for i in range(0, len(xt), 32):
                    idx = order[i:i + 32]
                    loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                model.eval()
                with torch.no_grad():
                    with monitor.capture(mode="eval", ds_id="val"):
                        logits = model(xv)
                        monitor.update(xv, yv, logits, boxes=[b[None] for b in b_va])
                    accuracy = float((logits.argmax(1) == yv).float().mean())
                    shuffled = float((model(xs).argmax(1) == yv).float().mean())
                mlflow.log_metrics({"val_accuracy": accuracy, "val_accuracy_shuffled_cue": shuffled},
                                   step=epoch)
                monitor.epoch_end(epoch)
                history.append({"epoch": epoch, "accuracy": accuracy, "shuffled": shuffled})
            monitor.flush(60)
    client = mlflow.MlflowClient()
    for name_ in SIGNALS:
        points = {m.step: m.value for m in
                  client.get_metric_history(run.info.run_id, f"eigencam/eval/val/{name_}")}
        for row in history:
            row[name_] = points.get(row["epoch"])
    return run.info.run_id, history


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def main(argv: List[str] | None = None) -> Dict[str, List[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--n-samples", type=int, default=8, help="pinned validation samples")
    parser.add_argument("--cue-rate", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns-shortcut/mlflow.db")
    parser.add_argument("--experiment", default="mlflow-eigencam-shortcut-demo")
    args = parser.parse_args(argv)

    import mlflow

    if args.tracking_uri.startswith("sqlite:///"):
        Path(args.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    results = {}
    for name, rate in (("clean", 0.0), ("cued", args.cue_rate)):
        run_id, history = train_run(name, rate, args)
        results[name] = history
        print(f"\nrun {name!r} ({run_id[:8]}): cue in {rate:.0%} of train and val images")
        print("epoch  val_acc  acc_cue_shuffled  localization  pointing_game  faithfulness")
        for r in history:
            print(f"{r['epoch']:5d}  {r['accuracy']:7.2f}  {r['shuffled']:16.2f}  "
                  f"{_fmt(r['localization']):>12}  {_fmt(r['pointing_game']):>13}  "
                  f"{_fmt(r['faithfulness']):>12}")
    print("\nOpen the runs with:")
    print(f"    mlflow-eigencam ui --tracking-uri {ui_uri(args.tracking_uri)}")
    return results


if __name__ == "__main__":
    main()
