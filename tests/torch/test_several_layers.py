"""``layers=[early, late]`` through EigenCAMMonitor (plain loop, pinned samples) and the
Lightning callback: both layers hooked only inside capture, their maps the per-sample SVD of
each layer's output, one card row and one set of table columns and metrics per layer."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from mlflow_eigencam import _layout
from mlflow_eigencam.eigencam import eigencam
from mlflow_eigencam.pytorch import EigenCAMMonitor
from tests.helpers.oracle import rel_errors, textbook
from tests.helpers.torch_models import RecordingLogger, TinyCNN, TinyResNet, all_hooks, shapes_tensors, table_rows

EARLY, LATE = "features.1", "features.4"  # TinyCNN: (8, 16, 16) after the first ReLU, (16, 8, 8)
K = 2


def _layer_outputs(model, x):
    with torch.no_grad():
        return {EARLY: model.features[:2](x).numpy(), LATE: model.features(x).numpy()}


def test_monitor_logs_an_early_and_a_late_layer_side_by_side(tracking_uri, shapes):
    x, y = shapes
    model = TinyCNN().eval()
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = RecordingLogger(n_components=K, n_samples=4, image_layout="NCHW")
        monitor = EigenCAMMonitor(model, layers=[EARLY, LATE], logger=logger, n_samples=4,
                                  faithfulness=False)
        assert monitor.layers == [EARLY, LATE] and monitor.target_layer == EARLY
        for epoch in range(2):
            for rows in (slice(0, 3), slice(3, 6)):
                with monitor.capture("eval", "val"):
                    if epoch == 0 and rows.start == 3:  # (the first also reads the grid)
                        assert len(model.features[1]._forward_hooks) == 1
                        assert len(model.features[4]._forward_hooks) == 1
                    monitor.update(x[rows], y[rows], model(x[rows]))
                assert all_hooks(model) == 0
            monitor.epoch_end(epoch)  # epoch 1: the pinned pass hooks both layers
            assert all_hooks(model) == 0
        assert monitor.close() == 0
    rid = run.info.run_id

    # What the logger got: each layer's own output for the kept rows, first layer first.
    first, second = logger.batches[:2]
    want = _layer_outputs(model, x[:4])
    assert list(first["activations"]) == [EARLY, LATE]
    for name in (EARLY, LATE):
        got = np.concatenate([first["activations"][name], second["activations"][name]])
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6)
        # The logger's maps: the per-sample SVD of that layer (sign fixed by the package).
        maps_ref, ratios_ref, _ = textbook(want[name], K)
        assert rel_errors(eigencam(got, K).maps, maps_ref).max() < 1e-3
    pinned = logger.batches[-1]["activations"]
    assert list(pinned) == [EARLY, LATE] and pinned[LATE].shape == (4, 16, 8, 8)

    rows = table_rows(client, rid, "eval", "val")
    assert [(r["epoch"], r["sample_index"]) for r in rows] == [(e, i) for e in (0, 1) for i in range(4)]
    for name, prefix in ((EARLY, ""), (LATE, f"{LATE}/")):
        _, ratios_ref, _ = textbook(want[name], K)
        for r in rows:
            np.testing.assert_allclose([r[f"{prefix}evr_1"], r[f"{prefix}evr_2"]],
                                       ratios_ref[r["sample_index"]], atol=1e-4)
    assert all(r[f"{LATE}/map_change"] == pytest.approx(0, abs=1e-3) for r in rows[4:])
    assert rows[0]["card"]["titles"] == ["input", f"{EARLY} PC1", f"{EARLY} PC2",
                                         f"{LATE} PC1", f"{LATE} PC2"]
    metrics = client.get_run(rid).data.metrics
    for key in ("evr_1", "evr_2", f"{LATE}/evr_1", f"{LATE}/evr_2", f"{LATE}/map_change", "map_change"):
        assert f"eigencam/eval/val/{key}" in metrics
    assert client.get_run(rid).data.tags[_layout.TAG_TARGET_LAYER] == f"{EARLY}, {LATE}"


def test_faithfulness_is_scored_per_layer(tracking_uri, shapes):
    x, y = shapes
    model = TinyCNN().eval()
    with mlflow.start_run() as run:
        monitor = EigenCAMMonitor(model, layers=[EARLY, LATE], n_components=1, n_samples=3)
        with monitor.capture("eval", "val"):
            monitor.update(x[:3], y[:3], model(x[:3]))
        monitor.epoch_end(0)
        assert monitor.close() == 0
    rows = table_rows(MlflowClient(), run.info.run_id, "eval", "val")
    assert all(np.isfinite(r["faithfulness"]) and np.isfinite(r[f"{LATE}/faithfulness"]) for r in rows)


def test_target_layer_and_layers_together_are_refused():
    with pytest.raises(ValueError, match=r"target_layer='features.4'.*layers=\['features.1'\]"):
        EigenCAMMonitor(TinyCNN(), target_layer=LATE, layers=[EARLY])
    with pytest.raises(ValueError, match="empty"):
        EigenCAMMonitor(TinyCNN(), layers=[])
    with pytest.raises(TypeError, match="layers must be a list"):
        EigenCAMMonitor(TinyCNN(), layers="features.1")
    with pytest.raises(ValueError, match="twice"):
        EigenCAMMonitor(TinyCNN(), layers=[LATE, "features.4"])
    with pytest.raises(ValueError, match="not a submodule"):
        EigenCAMMonitor(TinyCNN(), layers=[EARLY, "features.9"])


def test_lightning_callback_logs_several_layers(tracking_uri, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from mlflow_eigencam.lightning import EigenCAMCallback

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyResNet(width=4)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    with pytest.raises(ValueError, match="not both"):
        EigenCAMCallback(target_layer="net.layer4", layers=["net.layer1"])
    x, y = shapes_tensors(16, 16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    callback = EigenCAMCallback(layers=["net.layer1", "net.layer4"], n_components=1, n_samples=3,
                                faithfulness=False)
    with mlflow.start_run() as run:
        pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=1,
                   limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, logger=False,
                   default_root_dir=tmp_path, callbacks=[callback]).fit(Lit(), loader, loader)
    assert callback.undelivered == 0
    rid = run.info.run_id
    rows = table_rows(MlflowClient(), rid, "eval", "val")
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert all(r["evr_1"] is not None and r["net.layer4/evr_1"] is not None for r in rows)
    assert rows[0]["card"]["titles"] == ["input", "net.layer1 PC1", "net.layer4 PC1"]
    run_data = MlflowClient().get_run(rid).data
    assert "eigencam/eval/val/net.layer4/map_change" in run_data.metrics
    assert run_data.tags[_layout.TAG_TARGET_LAYER] == "net.layer1, net.layer4"
