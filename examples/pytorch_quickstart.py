"""PyTorch quickstart: a tiny CNN on synthetic shapes, with EigenCAM overlays logged to MLflow.

Nothing is downloaded: the images are generated (``_shapes.py``, next to this file). Run

    python examples/pytorch_quickstart.py --epochs 5

then open the MLflow UI with the command it prints, and look at the run's "Images" tab
(keys ``eigencam/eval/val/sample_*``: the same validation images at every epoch, the step
slider shows the heat maps settle on the shapes) and its artifacts
(``eigencam/eval/val/epoch_*/grid.png``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shapes import SHAPES, make_shapes  # noqa: E402
from _common import ui_uri  # noqa: E402

N_CLASSES = 4
#: The inputs are normalised like ImageNet-style pipelines do; the monitor undoes it for display.
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def build_model(seed: int):
    """conv(16) -> pool -> conv(32) -> global average pool -> linear over the shapes."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, N_CLASSES),
    )


def loaders(size: int, seed: int, train_size: int = 512, batch_size: int = 32):
    """Shuffled training and validation loaders of normalised shapes."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    out = []
    for n, s in ((train_size, seed), (64, seed + 1)):
        x, y, _ = make_shapes(n, size, n_classes=N_CLASSES, seed=s)
        data = TensorDataset((torch.from_numpy(x) - mean) / std, torch.from_numpy(y))
        # The validation loader shuffles too: pinned samples keep the same images in view.
        out.append(DataLoader(data, batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(s)))
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow tracking URI (default: a sqlite file in the current folder)")
    parser.add_argument("--experiment", default="mlflow-eigencam-pytorch-quickstart")
    parser.add_argument("--n-samples", type=int, default=5, help="validation images to explain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=512, help="training images per epoch")
    args = parser.parse_args(argv)

    import mlflow
    import torch
    from torch import nn

    from mlflow_eigencam.pytorch import EigenCAMMonitor

    size = 32
    train_loader, val_loader = loaders(size, args.seed, args.train_size)
    model = build_model(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name="pytorch-quickstart") as run:
        mlflow.log_params({"epochs": args.epochs, "image_size": size, "seed": args.seed})
        # target_layer=None: the monitor picks the last layer with a spatial output (the
        # second ReLU, 16x16) on the first captured forward pass, and logs into the active run.
        with EigenCAMMonitor(model, n_samples=args.n_samples, denormalize=(MEAN, STD),
                             label_mapping=list(SHAPES[:N_CLASSES])) as monitor:
            for epoch in range(args.epochs):
                model.train()
                for x, y in train_loader:  # mode "train" is filtered out by default: no hooks
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                model.eval()
                correct = 0
                with torch.no_grad():
                    for x, y in val_loader:
                        with monitor.capture(mode="eval", ds_id="val"):
                            logits = model(x)
                            monitor.update(images=x, labels=y, preds=logits)
                        correct += int((logits.argmax(1) == y).sum())
                accuracy = correct / len(val_loader.dataset)
                mlflow.log_metric("val_accuracy", accuracy, step=epoch)
                print(f"epoch {epoch}: loss {loss.item():.3f}  val_accuracy {accuracy:.3f}")
                monitor.epoch_end(epoch)
            layer = monitor.target_layer

    print(f"\nLogged EigenCAM overlays of layer {layer!r} to run {run.info.run_id}.")
    print("Open the MLflow UI with:")
    print(f"    mlflow ui --backend-store-uri {ui_uri(args.tracking_uri)}")
    return run.info.run_id


if __name__ == "__main__":
    main()
