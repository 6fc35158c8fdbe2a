"""A detector's batches through Lightning: lists of images and target dicts, boxes drawn,
counts in the table, the backbone's last stage by default."""

from __future__ import annotations

import warnings

import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")

from mlflow_eigencam import _layout  # noqa: E402
from mlflow_eigencam.lightning import EigenCAMCallback, default_batch_to_xy  # noqa: E402
from tests.helpers.torch_models import (  # noqa: E402
    TinyDetector,  # noqa: E402
    all_hooks,
    image_counts,
    table_rows,
)


class LitDetector(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = TinyDetector()

    def forward(self, images):
        return self.model(images)

    def training_step(self, batch, batch_idx):
        self(batch[0])
        return self.model.head.weight.sum() * 0.0  # lr 0: the weights stay as they are

    def validation_step(self, batch, batch_idx):
        images, _ = batch
        self(images)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _data(n=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(3, 32, 48, generator=g),
             {"boxes": torch.tensor([[1.0, 1.0, 30.0, 30.0]] * (1 + i % 2)),
              "labels": torch.ones(1 + i % 2, dtype=torch.int64)})
            for i in range(n)]


def _collate(batch):  # torchvision's detection recipe: tuples of images and of targets
    return tuple(zip(*batch))


def test_default_batch_to_xy_takes_a_detection_batch():
    images, targets = _collate(_data(2))
    x, y = default_batch_to_xy((images, targets))
    assert x is images and y is targets


def test_lightning_detector_logs_boxes_with_counts(tmp_path, tracking_uri):
    loader = DataLoader(_data(4), batch_size=2, collate_fn=_collate)
    model = LitDetector()
    callback = EigenCAMCallback(n_samples=2, label_mapping=["bg", "thing"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many).*")
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=1,
                             limit_val_batches=2, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, logger=False,
                             default_root_dir=tmp_path, callbacks=[callback],
                             num_sanity_val_steps=0)
        trainer.fit(model, loader, loader)
    assert all_hooks(model) == 0
    client = MlflowClient()
    run = client.get_run(callback.run_id)
    assert run.data.tags[_layout.TAG_TARGET_LAYER].startswith(
        "model.backbone.body (auto: feature map (B, 16, 8, 12), last feature map of the detection")
    rows = table_rows(client, callback.run_id, "eval", "val")
    assert [(r["epoch"], r["prediction"], r["label"], r["n_boxes"], r["n_true_boxes"]) for r in rows] == [
        (0, "1 box", "1 box", 1, 1), (0, "1 box", "2 boxes", 1, 2),
        (1, "1 box", "1 box", 1, 1), (1, "1 box", "2 boxes", 1, 2)]
    assert image_counts(client, callback.run_id) == {
        (f"eigencam/eval/val/sample_{i}", s): 1 for i in range(2) for s in range(2)}
