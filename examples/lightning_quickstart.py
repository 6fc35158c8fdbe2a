"""Lightning quickstart: a tiny CNN on synthetic shapes, EigenCAM overlays in the MLFlowLogger's run.

Nothing is downloaded: the images are generated (``_shapes.py``, next to this file). Run

    python examples/lightning_quickstart.py --epochs 5

then open the MLflow UI with the command it prints, and look at the run's "Images" tab
(keys ``eigencam/eval/val/sample_*``, one step per epoch, next to Lightning's own metrics).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shapes import SHAPES, make_shapes  # noqa: E402
from _common import ui_uri  # noqa: E402

N_CLASSES = 4


def build_module(seed: int):
    """A LightningModule around conv(16) -> pool -> conv(32) -> global average pool -> linear."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    class ShapesClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            )
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, N_CLASSES))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)  # the callback reads the predictions off this forward call
            self.log("val_accuracy", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    return ShapesClassifier()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow tracking URI (default: a sqlite file in the current folder)")
    parser.add_argument("--experiment", default="mlflow-eigencam-lightning-quickstart")
    parser.add_argument("--n-samples", type=int, default=5, help="validation images to explain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=512, help="training images per epoch")
    parser.add_argument("--root-dir", default=None, help="Lightning's default_root_dir")
    args = parser.parse_args(argv)

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    from mlflow_eigencam.lightning import EigenCAMCallback

    size = 32
    data = []
    for n, s in ((args.train_size, args.seed), (64, args.seed + 1)):
        x, y, _ = make_shapes(n, size, n_classes=N_CLASSES, seed=s)
        data.append(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)))
    train_loader = DataLoader(data[0], batch_size=32, shuffle=True)
    val_loader = DataLoader(data[1], batch_size=32)

    mlflow_logger = MLFlowLogger(experiment_name=args.experiment, tracking_uri=args.tracking_uri,
                                 run_name="lightning-quickstart")
    # The callback finds the MLFlowLogger and logs into its run; target_layer=None picks
    # "features" (the last module with a spatial output) on the first validation batch.
    eigencam = EigenCAMCallback(n_samples=args.n_samples, label_mapping=list(SHAPES[:N_CLASSES]))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1,
                         logger=mlflow_logger, callbacks=[eigencam], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=4, default_root_dir=args.root_dir)
    trainer.fit(build_module(args.seed), train_loader, val_loader)

    print(f"\nLogged EigenCAM overlays to run {mlflow_logger.run_id}.")
    print("Open the MLflow UI with:")
    print(f"    mlflow ui --backend-store-uri {ui_uri(args.tracking_uri)}")
    return mlflow_logger.run_id


if __name__ == "__main__":
    main()
