"""A segmenter under Lightning: ``(images, masks)`` batches and a ``forward`` that returns
torchvision's ``{"out": (B, K, H, W)}``; every epoch is logged with masks, IoU and classes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from mlflow_eigencam.errors import EigenCAMWarning  # noqa: E402
from mlflow_eigencam.lightning import EigenCAMCallback  # noqa: E402
from mlflow_eigencam.render import TRUTH_MASK_COLOUR  # noqa: E402
from tests.helpers.readback import load_png  # noqa: E402
from tests.helpers.torch_models import table_rows  # noqa: E402

NAMES = ["background", "square"]


class LitSegmenter(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(8, len(NAMES), 1)

    def forward(self, x):
        logits = self.classifier(self.features(x))
        return {"out": nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear")}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x)["out"], y, ignore_index=255)

    validation_step = training_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _squares(n: int = 8, h: int = 24, w: int = 32):
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.rand(n, 3, h, w, generator=g)
    y = torch.zeros(n, h, w, dtype=torch.int64)
    for i in range(n):
        top, left = 2 + i % 6, 3 + 2 * (i % 5)
        x[i, :, top:top + 10, left:left + 12] += 0.6
        y[i, top:top + 10, left:left + 12] = 1
    y[:, -1] = 255  # an ignored row
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_lightning_segmenter_logs_every_epoch_with_masks(tmp_path, tracking_uri):
    # Named: the last map of the input's geometry is the classifier's K-channel logits.
    callback = EigenCAMCallback(n_samples=2, label_mapping=NAMES, target_layer="features")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=2,
                         limit_val_batches=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, logger=False, default_root_dir=tmp_path,
                         callbacks=[callback], num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many).*")
        warnings.simplefilter("error", EigenCAMWarning)  # no epoch may be lost
        trainer.fit(LitSegmenter(), _squares(), _squares())
    client = MlflowClient()
    run_id = callback.run_id
    rows = table_rows(client, run_id, "eval", "val")
    assert sorted({r["epoch"] for r in rows}) == [0, 1] and len(rows) == 4
    assert all(r["classes"] == NAMES and 0 <= r["iou"] <= 1 for r in rows)
    assert all(r["localization"] is not None for r in rows)
    card = load_png(client, run_id, rows[-1]["image"])
    x, y, w, h = rows[-1]["card"]["boxes"][0]
    assert np.all(card[y:y + h, x:x + w] == TRUTH_MASK_COLOUR, axis=2).any()
