"""Shortcut demo: the explanation signals find a planted shortcut that accuracy does not.

Two runs of a tiny CNN on synthetic shapes (``_shapes.py``), the same seed, with
``EigenCAMMonitor`` and the shapes' true boxes given to ``update(boxes=...)``:

* **clean**: the class is the shape;
* **cued**: a small checkered tag in the top-left corner has a colour that tells the class
  in ``--cue-rate`` of the training *and* validation images (a watermark, a scanner tag).

Both reach high validation accuracy. The demo prints, per run and epoch, the validation
accuracy and the mean signals of the pinned validation samples (docs/signals.md):
``localization`` (share of the map on the shape's box), ``pointing_game`` (the map's peak on
the box), ``fixation`` (label-free: do the maps of different images sit at one place),
``faithfulness`` (keep-top minus drop-top probability) and ``map_change``, plus the
accuracy on the validation images with the tag's colour shuffled, which only the cued run
loses; then each run's ``stable_epoch`` and alarm tags, and the epoch at which the signals
separate the runs against the epoch at which accuracy reaches 0.9.

    python examples/shortcut_demo.py    # 19 s on an idle 2-core CPU (6 min at a load average of 10-25)
    python examples/shortcut_demo.py --figure docs/images/shortcut_cued.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ui_uri  # noqa: E402
from _shapes import SHAPES, make_shapes  # noqa: E402

N_CLASSES = 3
SIZE = 32
CUE = 8  # the corner tag's side in pixels
#: One colour per class for the corner tag.
CUE_COLOURS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
SIGNALS = ("localization", "pointing_game", "fixation", "faithfulness", "map_change")
#: Accuracy counted as "high" (saturated), and the gap in a signal that separates the runs.
HIGH_ACCURACY = 0.9
SEPARATION = 0.3


def cue_tag(colour: np.ndarray) -> np.ndarray:
    """The corner tags ``(n, 3, CUE, CUE)``: a checkerboard of 2-pixel squares in each
    image's class colour and black (a texture nothing else in the images has)."""
    yy, xx = np.mgrid[0:CUE, 0:CUE]
    checker = ((yy // 2 + xx // 2) % 2).astype(np.float32)
    return CUE_COLOURS[colour][:, :, None, None] * checker[None, None]


def make_data(n: int, seed: int, cue_rate: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shapes (NCHW float32 in [0, 1]), labels and boxes; with ``cue_rate`` > 0 the corner
    tag has the class's colour in that share of the images and another class's colour in
    the others (it may cover a corner of a shape)."""
    x, y, boxes = make_shapes(n, SIZE, n_classes=N_CLASSES, seed=seed)
    rng = np.random.default_rng(seed + 100)
    if cue_rate > 0:
        right = rng.random(n) < cue_rate
        colour = np.where(right, y, (y + rng.integers(1, N_CLASSES, size=n)) % N_CLASSES)
        x[:, :, :CUE, :CUE] = cue_tag(colour)
    return x, y, boxes


def shuffled_cue(x: np.ndarray, seed: int) -> np.ndarray:
    """The images with the corner tag given a random class colour."""
    out = x.copy()
    out[:, :, :CUE, :CUE] = cue_tag(np.random.default_rng(seed).integers(0, N_CLASSES, size=len(x)))
    return out


def build_model(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, N_CLASSES),
    )


def train_run(name: str, cue_rate: float, args: argparse.Namespace) -> Tuple[str, List[dict], Dict[str, str]]:
    """One run; returns its id, per-epoch {accuracy, shuffled, signals} and its tags."""
    import mlflow
    import torch
    from torch import nn

    from mlflow_eigencam.pytorch import EigenCAMMonitor

    torch.set_num_threads(args.threads)
    x_tr, y_tr, _ = make_data(args.train_size, args.seed, cue_rate)
    x_va, y_va, b_va = make_data(args.val_size, args.seed + 1, cue_rate)
    x_sh = shuffled_cue(x_va, args.seed + 2) if cue_rate > 0 else x_va
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    xv, yv, xs = torch.from_numpy(x_va), torch.from_numpy(y_va), torch.from_numpy(x_sh)
    model = build_model(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
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
    tags = client.get_run(run.info.run_id).data.tags
    return run.info.run_id, history, {k: tags.get(f"mlflow_eigencam.{k}", "-")
                                      for k in ("stable_epoch", "alarm")}


def first_epoch(rows: List[dict], test) -> Optional[int]:
    """The first epoch whose row passes ``test``, or None."""
    return next((r["epoch"] for r in rows if test(r)), None)


def separation(clean: List[dict], cued: List[dict]) -> Tuple[Optional[int], str]:
    """The first epoch at which a signal differs by :data:`SEPARATION` or more between the
    runs, and which signals do."""
    for a, b in zip(clean, cued):
        gaps = [f"{n} {a[n]:.2f} vs {b[n]:.2f}" for n in ("localization", "fixation")
                if a[n] is not None and b[n] is not None and abs(a[n] - b[n]) >= SEPARATION]
        if gaps:
            return a["epoch"], ", ".join(gaps)
    return None, ""


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--val-size", type=int, default=256)
    parser.add_argument("--n-samples", type=int, default=8, help="pinned validation samples")
    parser.add_argument("--cue-rate", type=float, default=0.95)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns-shortcut/mlflow.db")
    parser.add_argument("--experiment", default="mlflow-eigencam-shortcut-demo")
    parser.add_argument("--figure", type=Path, help="also write the cued run's comparison PNG "
                        "over its epochs here (mlflow_eigencam.compare)")
    args = parser.parse_args(argv)

    import mlflow

    if args.tracking_uri.startswith("sqlite:///"):
        Path(args.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    results: Dict[str, Any] = {}
    run_ids = {}
    for name, rate in (("clean", 0.0), ("cued", args.cue_rate)):
        run_id, history, tags = train_run(name, rate, args)
        results[name], run_ids[name] = history, run_id
        print(f"\nrun {name!r} ({run_id[:8]}): tag in {rate:.0%} of train and val images")
        print("epoch  val_acc  acc_tag_shuffled  localization  pointing_game  fixation  "
              "faithfulness  map_change")
        for r in history:
            print(f"{r['epoch']:5d}  {r['accuracy']:7.2f}  {r['shuffled']:16.2f}  "
                  f"{_fmt(r['localization']):>12}  {_fmt(r['pointing_game']):>13}  "
                  f"{_fmt(r['fixation']):>8}  {_fmt(r['faithfulness']):>12}  {_fmt(r['map_change']):>10}")
        print(f"tags: stable_epoch={tags['stable_epoch']}  alarm={tags['alarm']}")
    high = {n: first_epoch(results[n], lambda r: r["accuracy"] >= HIGH_ACCURACY) for n in results}
    sep, gaps = separation(results["clean"], results["cued"])
    results["high_accuracy_epoch"], results["separation_epoch"] = high, sep
    print(f"\nvalidation accuracy first >= {HIGH_ACCURACY}: clean at epoch {high['clean']}, "
          f"cued at epoch {high['cued']}")
    print(f"the signals separate the runs at epoch {sep}" + (f" ({gaps})" if gaps else ""))
    if args.figure is not None:
        from mlflow_eigencam import compare

        last = args.epochs - 1
        epochs = ",".join(str(e) for e in sorted({0, 1, last // 2, last}))
        compare([f"{run_ids['cued']}@{epochs}"], mode="eval", ds_id="val", out=args.figure)
        print(f"\nwrote {args.figure}")
    print("\nOpen the runs with:")
    print(f"    mlflow-eigencam ui --tracking-uri {ui_uri(args.tracking_uri)}")
    return results


if __name__ == "__main__":
    main()
