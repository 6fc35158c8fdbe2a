"""autolog() with Lightning: one call, every validation loader its own dataset id."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlflow_eigencam
from mlflow_eigencam.lightning import EigenCAMCallback
from tests.helpers.readback import image_series
from tests.helpers.torch_models import TinyCNN, shapes_tensors


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyCNN()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(seed=0):
    x, y = shapes_tensors(16, 16, seed=seed)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path, **kw):
    return pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      limit_train_batches=2, default_root_dir=str(tmp_path), **kw)


@pytest.fixture(autouse=True)
def _autolog_off():
    yield
    mlflow_eigencam.autolog(disable=True)
    mlflow.autolog(disable=True)


def _only_run():
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0].info.run_id


def test_autolog_logs_every_validation_loader(tmp_path, tracking_uri):
    mlflow_eigencam.autolog(n_samples=2, silent=True)
    trainer = _trainer(tmp_path)
    trainer.fit(Lit(), train_dataloaders=_loader(), val_dataloaders=[_loader(1), _loader(2)])
    assert not any(isinstance(cb, EigenCAMCallback) for cb in trainer.callbacks)  # left as it was
    rid = _only_run()
    series = image_series(MlflowClient(), rid)
    assert sorted(series) == [f"eigencam/eval/val_{d}/sample_{i}" for d in (0, 1) for i in (0, 1)]
    assert all(sorted(steps) == [0, 1] for steps in series.values())
    assert MlflowClient().get_run(rid).info.status == "FINISHED"


def test_no_duplicate_and_disable(tmp_path, tracking_uri):
    mlflow_eigencam.autolog(n_samples=3, silent=True)
    with mlflow.start_run() as run:
        _trainer(tmp_path, callbacks=[EigenCAMCallback(n_samples=1)]).fit(
            Lit(), train_dataloaders=_loader(), val_dataloaders=_loader(1))
    assert sorted(image_series(MlflowClient(), run.info.run_id)) == ["eigencam/eval/val_0/sample_0"] \
        or sorted(image_series(MlflowClient(), run.info.run_id)) == ["eigencam/eval/val/sample_0"]
    mlflow_eigencam.autolog(disable=True)
    with mlflow.start_run() as run:
        _trainer(tmp_path).fit(Lit(), train_dataloaders=_loader(), val_dataloaders=_loader(1))
    assert image_series(MlflowClient(), run.info.run_id) == {}


def test_an_error_inside_autolog_warns_and_fit_completes(tmp_path, tracking_uri):
    mlflow_eigencam.autolog(layer="model.no_such_layer")
    trainer = _trainer(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Lit(), train_dataloaders=_loader(), val_dataloaders=_loader(1))
    assert trainer.current_epoch == 2
    assert any("no_such_layer" in str(w.message) for w in caught)


@pytest.mark.parametrize("order", ["mlflow_first", "eigencam_first"])
def test_coexists_with_mlflow_pytorch_autolog_in_one_run(tmp_path, tracking_uri, order):
    if order == "mlflow_first":
        mlflow.pytorch.autolog(log_models=False, silent=True)
        mlflow_eigencam.autolog(n_samples=2, silent=True)
    else:
        mlflow_eigencam.autolog(n_samples=2, silent=True)
        mlflow.pytorch.autolog(log_models=False, silent=True)
    _trainer(tmp_path).fit(Lit(), train_dataloaders=_loader(), val_dataloaders=_loader(1))
    rid = _only_run()
    run = MlflowClient().get_run(rid)
    assert "train_loss" in run.data.metrics  # MLflow's autologging
    assert any(k.startswith("eigencam/eval/") for k in run.data.metrics)  # ours
    assert len(image_series(MlflowClient(), rid)) == 2
