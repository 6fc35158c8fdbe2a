"""The demo: two runs of a small CNN with autolog, a comparison of their epochs, the UI command.

Trains a tiny CNN (Lightning, CPU) on synthetic shapes made on the fly, twice, with two
learning rates, in one MLflow experiment. ``mlflow_eigencam.autolog()`` is the only EigenCAM
line. Then it prints each run's story (validation accuracy rising, ``map_change`` falling as
the explanations settle, the low learning rate learning worse), compares the two runs' epochs
side by side (``compare.html`` / ``compare.png``) and prints the commands that open the
EigenCAM explorer and the MLflow UI.

    python examples/demo.py                 # 25-70 s on a shared 2-core CPU
    python examples/demo.py --epochs 2 --out-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shapes import SHAPES, make_shapes  # noqa: E402


def build_module(lr: float):
    import lightning.pytorch as pl
    import torch
    from torch import nn

    class ShapesCNN(pl.LightningModule):
        """(conv-BN-ReLU-pool) x2 -> conv-BN-ReLU -> global average pool -> linear.

        BatchNorm is what lets lr=0.003 get from chance to ~100% in six epochs (without it
        the same net stalls near 0.6-0.7); lr=0.0003 then visibly learns slower.
        """

        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            )
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, _):
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr)

    return ShapesCNN()


def loaders(n_train: int, n_val: int, size: int):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    xt, yt, _ = make_shapes(n_train, size, seed=1)
    xv, yv, _ = make_shapes(n_val, size, seed=2)
    train = DataLoader(TensorDataset(torch.from_numpy(xt), torch.from_numpy(yt)), batch_size=32,
                       shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(torch.from_numpy(xv), torch.from_numpy(yv)), batch_size=64)
    return train, val


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out-dir", default="mlruns-demo",
                        help="folder for the MLflow store and the comparison (default ./mlruns-demo)")
    parser.add_argument("--tracking-uri", default=None,
                        help="log there instead of a sqlite store in --out-dir")
    parser.add_argument("--lrs", default="0.003,0.0003", help="learning rates, one run each")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--size", type=int, default=40)
    args = parser.parse_args(argv)

    import lightning.pytorch as pl
    import mlflow
    import mlflow.pytorch
    import torch

    import mlflow_eigencam

    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    name = "eigencam-demo"
    if mlflow.get_experiment_by_name(name) is None:
        artifact_location = None if args.tracking_uri else (out / "artifacts").as_uri()
        mlflow.create_experiment(name, artifact_location=artifact_location)
    mlflow.set_experiment(name)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    # MLflow's own autologging for the loss curves (optional; the two coexist in one run).
    mlflow.pytorch.autolog(log_models=False, silent=True)
    # The one EigenCAM line: every Lightning fit from here on logs overlays to MLflow.
    mlflow_eigencam.autolog(n_samples=6, n_components=2, label_mapping=list(SHAPES[:3]))

    run_ids = []
    for lr in (float(v) for v in args.lrs.split(",")):
        pl.seed_everything(0, verbose=False)
        train, val = loaders(args.n_train, 96, args.size)
        with mlflow.start_run(run_name=f"shapes-cnn-lr{lr:g}") as run:
            mlflow.log_param("lr", lr)
            trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, default_root_dir=str(out / "lightning"))
            trainer.fit(build_module(lr), train_dataloaders=train, val_dataloaders=val)
            run_ids.append(run.info.run_id)
        print(_story(uri, run.info.run_id, lr), flush=True)

    last = args.epochs - 1
    epochs = ",".join(str(e) for e in sorted({0, last // 2, last}))
    result_html = mlflow_eigencam.compare([f"{r}@{epochs}" for r in run_ids], mode="eval",
                                          ds_id="val", out=str(out / "compare.html"),
                                          tracking_uri=uri)
    result_png = mlflow_eigencam.compare([f"{r}@{epochs}" for r in run_ids], mode="eval",
                                         ds_id="val", out=str(out / "compare.png"),
                                         tracking_uri=uri)
    print(f"comparison of epochs {epochs} of both runs: {_path(result_html)} and {_path(result_png)}")
    print("the same samples across both runs, every epoch, in the EigenCAM explorer:")
    print(f"  mlflow-eigencam ui --tracking-uri {uri}")
    print(f"  then open http://127.0.0.1:5050/?runs={','.join(run_ids)}&mode=eval&ds_id=val")
    print("open the MLflow UI on these runs with:")
    base = args.tracking_uri.rstrip("/") if args.tracking_uri else "http://127.0.0.1:5000"
    if not args.tracking_uri:
        print(f"  mlflow ui --backend-store-uri {uri} --port 5000")
    exp_id = mlflow.get_experiment_by_name(name).experiment_id
    for rid in run_ids:
        # The run page's 'Model metrics' tab, where the image charts are (MLflow >= 2.9).
        print(f"  {base}/#/experiments/{exp_id}/runs/{rid}/model-metrics")
    print("  (a chart's Configure -> 'Show run parameters' off shows a card whole; MLflow 3 may "
          "open the experiment itself in its GenAI view, where no run is listed: the links above "
          "open the runs directly)")
    return 0


def _story(uri: str, run_id: str, lr: float) -> str:
    """One line per run: validation accuracy and mean map change by epoch (read back)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    def series(key: str) -> dict:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    acc, change = series("val_acc"), series("eigencam/eval/val/map_change")
    epochs = sorted(set(series("eigencam/eval/val/evr_1")))
    accs = " ".join(f"{acc[e]:.2f}" if e in acc else "-" for e in epochs) or "-"
    changes = " ".join(f"{change[e]:.2f}" if e in change else "-" for e in epochs)
    return (f"run {run_id[:8]} (lr={lr:g}): val_acc by epoch {accs} | "
            f"map_change {changes}")


def _path(result) -> str:
    return str(getattr(result, "path", result))


if __name__ == "__main__":
    sys.exit(main())
