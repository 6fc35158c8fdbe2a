"""integrations/torch/monitor.py: EigenCAMMonitor in a plain loop: hooks, flags, gradients,
slicing, filters, ranks, pinned samples, warnings, close(), MLflow."""

from __future__ import annotations

import copy
import logging

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlflow_eigencam import _layout
from mlflow_eigencam.errors import EigenCAMWarning
from mlflow_eigencam.pytorch import EigenCAMMonitor
from tests.helpers.readback import image_series
from tests.helpers.torch_models import (
    RecordingLogger,
    TinyClassifierWithDecoder,
    TinyCNN,
    TinyResNet,
    TinyViT,
    all_hooks,
    image_counts,
    table_rows,
)


def _monitor(model, **kwargs):
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in ("mode", "ds_id", "n_samples", "strict")}
    logger = RecordingLogger(**settings, image_layout="NCHW")
    return EigenCAMMonitor(model, logger=logger, n_samples=logger.n_samples, **kwargs), logger


def test_hooks_exist_only_inside_capture(tracking_uri, shapes):
    x, y = shapes
    model = TinyResNet()
    monitor, _ = _monitor(model, n_samples=12)
    assert all_hooks(model) == 0
    with monitor.capture("eval", "val"):
        assert all_hooks(model) > 1  # auto-detection watches every module on the first pass
        out = model(x[:8])
        monitor.update(x[:8], y[:8], out)
    assert all_hooks(model) == 0 and monitor.target_layer == "layer4"
    with monitor.capture("eval", "val"):
        assert all_hooks(model) == 1 and len(model.layer4._forward_hooks) == 1
        monitor.update(x[8:16], y[8:16], model(x[8:16]))
    assert all_hooks(model) == 0
    monitor.epoch_end(0)
    with monitor.capture("eval", "val"):  # pinned: nothing to hook per batch any more
        assert all_hooks(model) == 0
        monitor.update(x[:8], y[:8], model(x[:8]))
    monitor.epoch_end(1)  # the extra forward pass hooks and unhooks
    assert all_hooks(model) == 0
    with monitor.capture("eval", "val"):
        monitor.close()
        assert all_hooks(model) == 0


def test_hooks_removed_when_the_forward_fails(shapes):
    model = TinyCNN()
    monitor, _ = _monitor(model, target_layer="features.3")
    with pytest.raises(RuntimeError):
        with monitor.capture("eval"):
            model(torch.rand(2, 5, 16, 16))  # wrong channel count
    assert all_hooks(model) == 0


def test_training_flags_restored_after_extra_forward(tracking_uri, shapes):
    x, y = shapes
    model = TinyResNet().train()
    model.layer2.bn1.eval()  # a frozen BatchNorm inside a training model
    before = [m.training for m in model.modules()]
    monitor, _ = _monitor(model, mode="train")
    for epoch in range(2):
        with monitor.capture("train", "train"):
            monitor.update(x[:8], y[:8], model(x[:8]))
        monitor.epoch_end(epoch)
        assert [m.training for m in model.modules()] == before


def _train(model, x, y, monitor=None, epochs=2, losses=None):
    """A seeded SGD loop with dropout; the monitor (if any) watches train and eval batches.
    ``losses``: a list that gets every training loss (float)."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        model.train()
        for i in range(0, len(x), 8):
            with monitor.capture("train", "train") if monitor else _null():
                loss = nn.functional.cross_entropy(model(x[i:i + 8]), y[i:i + 8])
                if losses is not None:
                    losses.append(float(loss.detach()))
                if monitor:
                    monitor.update(x[i:i + 8], y[i:i + 8], None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(x), 8):
                with monitor.capture("eval", "val") if monitor else _null():
                    out = model(x[i:i + 8])
                    if monitor:
                        monitor.update(x[i:i + 8], y[i:i + 8], out)
        if monitor:
            monitor.epoch_end(epoch)
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_training_with_monitor_gives_identical_weights(tracking_uri, shapes):
    x, y = shapes
    torch.manual_seed(0)
    base = TinyCNN(dropout=0.3)
    plain = _train(copy.deepcopy(base), x, y)
    watched_model = copy.deepcopy(base)
    monitor = EigenCAMMonitor(watched_model, mode=None, n_samples=3)
    watched = _train(watched_model, x, y, monitor, epochs=2)
    monitor.close()
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name
    assert monitor.run_id is not None  # it did log (train and eval, pinned from epoch 1)


def test_only_kept_samples_are_passed_as_detached_numpy(shapes):
    x, y = shapes
    model = TinyCNN()
    monitor, logger = _monitor(model, n_samples=3, mode="train")
    x = x.clone().requires_grad_(True)
    with monitor.capture("train", "train"):
        out = model(x[:8])
        monitor.update(x[:8], y[:8], out)
        assert monitor._capture.act is None  # the captured activations were released
    assert len(logger.batches) == 1
    batch = logger.batches[0]
    for name in ("images", "activations", "labels", "preds"):
        assert isinstance(batch[name], np.ndarray), name
        assert len(batch[name]) == 3, name
    assert batch["images"].shape == (3, 3, 16, 16) and batch["images"].dtype == np.float32
    assert batch["activations"].shape == (3, 16, 8, 8)
    np.testing.assert_array_equal(batch["images"], x[:3].detach().numpy())
    ref = model.features(x[:3]).detach().numpy()
    np.testing.assert_allclose(batch["activations"], ref, rtol=1e-5, atol=1e-6)
    # Buffer full: the next capture installs no hook at all.
    with monitor.capture("train", "train"):
        assert all_hooks(model) == 0


def test_hook_keeps_a_detached_copy_not_the_graph(shapes):
    x, y = shapes
    model = TinyCNN()
    monitor, _ = _monitor(model, target_layer="features.3", mode="train")
    with monitor.capture("train", "train"):
        out = model(x[:4])
        act = monitor._capture.act
        assert act.requires_grad is False and act.grad_fn is None
        assert act._base is None  # a copy: later in-place ops (ReLU) cannot change it
        pre_relu = model.features[:4](x[:4]).detach()
        torch.testing.assert_close(act, pre_relu)
        monitor.update(x[:4], y[:4], out)


def test_a_failure_while_opening_a_block_leaves_no_hook_and_no_open_block(shapes):
    x, y = shapes

    class FailingOnce(RecordingLogger):
        failed = False

        def room(self, mode, ds_id=None):
            if not self.failed:
                self.failed = True
                raise RuntimeError("room failed")
            return super().room(mode, ds_id)

    model = TinyCNN()
    logger = FailingOnce(n_samples=2, image_layout="NCHW")
    monitor = EigenCAMMonitor(model, logger=logger)
    with pytest.raises(RuntimeError, match="room failed"):
        with monitor.capture("eval", "val"):
            pass
    assert all_hooks(model) == 0
    with monitor.capture("eval", "val"):  # not "cannot be nested": the failed block is closed
        monitor.update(x[:2], y[:2], model(x[:2]))
    assert len(logger.batches) == 1 and all_hooks(model) == 0


def test_filtered_mode_installs_nothing_and_logs_nothing(tracking_uri, shapes):
    x, y = shapes
    model = TinyCNN()
    monitor, logger = _monitor(model)  # default mode "!train"
    with monitor.capture("train", "train"):
        assert all_hooks(model) == 0
        monitor.update(x[:4], y[:4], model(x[:4]))
    monitor.epoch_end(0)
    assert logger.batches == [] and monitor.run_id is None


def test_update_outside_capture_warns(shapes):
    x, y = shapes
    monitor, logger = _monitor(TinyCNN())
    with pytest.warns(EigenCAMWarning, match="outside capture"):
        monitor.update(x[:4], y[:4])
    assert logger.batches == []


def test_bad_arguments_fail_at_construction():
    with pytest.raises(TypeError, match="nn.Module"):
        EigenCAMMonitor("resnet")
    with pytest.raises(ValueError, match="layer9"):
        EigenCAMMonitor(TinyResNet(), target_layer="layer9")
    with pytest.raises(ValueError, match="denormalize"):
        EigenCAMMonitor(TinyCNN(), denormalize=([0.5, 0.5], [0.2]))
    with pytest.raises(ValueError, match="mode"):
        EigenCAMMonitor(TinyCNN(), mode="training")
    with pytest.raises(ValueError, match="mode must be one of"):
        with EigenCAMMonitor(TinyCNN()).capture("validation"):
            pass


def test_denormalize_undoes_the_normalisation(shapes):
    x, y = shapes
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    normed = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    model = TinyCNN()
    monitor, logger = _monitor(model, denormalize=(mean, std))
    with monitor.capture("eval"):
        monitor.update(normed[:4], y[:4], model(normed[:4]))
    np.testing.assert_allclose(logger.batches[0]["images"], x[:4].numpy(), atol=1e-5)


def test_other_ranks_are_a_no_op(tracking_uri, shapes, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    x, y = shapes
    model = TinyCNN()
    monitor = EigenCAMMonitor(model)
    assert monitor.logger is None
    with monitor.capture("eval", "val"):
        assert all_hooks(model) == 0
        monitor.update(x[:4], y[:4], model(x[:4]))
    monitor.epoch_end(0)
    monitor.close()
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_end_to_end_images_tags_and_steps(tracking_uri, shapes, caplog):
    x, y = shapes
    model = TinyResNet()
    caplog.set_level(logging.INFO, logger="mlflow_eigencam")
    with EigenCAMMonitor(model, n_samples=2, label_mapping=["circle", "square", "triangle"]) as monitor:
        for epoch in range(2):
            for ds_id in ("val", "holdout"):
                for i in range(0, 16, 8):
                    with monitor.capture(mode="eval", ds_id=ds_id):
                        logits = model(x[i:i + 8])
                        monitor.update(images=x[i:i + 8], labels=y[i:i + 8], preds=logits)
            monitor.epoch_end(epoch)
        run_id = monitor.run_id
    assert "layer4" in caplog.text
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags[_layout.TAG_TARGET_LAYER] == "layer4 (auto: feature map (B, 32, 2, 2))"
    counts = image_counts(client, run_id)
    expected = {(f"eigencam/eval/{d}/sample_{i}", s) for d in ("val", "holdout") for i in range(2)
                for s in range(2)}
    assert counts == {key: 1 for key in expected}
    rows = table_rows(client, run_id, "eval", "val")
    assert [r["label"] for r in rows[:2]] == [["circle", "square", "triangle"][int(v)] for v in y[:2]]
    assert all(r["prediction"] in ("circle", "square", "triangle") for r in rows)


def test_vit_tokens_end_to_end(tracking_uri):
    from tests.helpers.torch_models import shapes_tensors

    x, y = shapes_tensors(8, (32, 16))  # non-square image: an 8x4 patch grid
    model = TinyViT(registers=2)
    with EigenCAMMonitor(model, n_samples=2) as monitor:
        with monitor.capture("eval", "val"):
            monitor.update(x, y, model(x))
        assert monitor.target_layer == "norm"
        assert monitor._grid_hw == (8, 4)
        monitor.epoch_end(0)
        run_id = monitor.run_id
    assert set(image_series(MlflowClient(), run_id)) == {"eigencam/eval/val/sample_0",
                                                         "eigencam/eval/val/sample_1"}


def test_vit_explicit_layer_with_non_square_grid_reads_the_patch_grid():
    from tests.helpers.torch_models import shapes_tensors

    x, y = shapes_tensors(4, (56, 40))  # 14 x 10 patches + 1 class token
    model = TinyViT()
    # The named token layer is folded onto the patch conv's 14 x 10 grid, as auto-detection does.
    monitor, logger = _monitor(model, target_layer="blocks.1")
    with monitor.capture("eval"):
        monitor.update(x, y, model(x))
    assert logger.batches[0]["activations"].shape == (4, 16, 14, 10)
    assert all_hooks(model) == 0

    def to_grid(t):
        return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], 14, 10)

    monitor, logger = _monitor(model, target_layer="blocks.1", reshape_transform=to_grid)
    with monitor.capture("eval"):
        monitor.update(x, y, model(x))
    assert logger.batches[0]["activations"].shape == (4, 16, 14, 10)


def test_first_forward_without_update_still_detects_the_layer(shapes):
    x, _ = shapes
    model = TinyResNet()
    monitor, logger = _monitor(model)
    with monitor.capture("eval"):
        model(x[:2])
    assert monitor.target_layer == "layer4" and all_hooks(model) == 0 and logger.batches == []


def test_model_without_feature_map_warns_once_logs_nothing_and_training_goes_on(tracking_uri, shapes):
    x, y = shapes
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    monitor = EigenCAMMonitor(model, n_samples=2)
    with pytest.warns(EigenCAMWarning, match="pass target_layer.*training goes on") as record:
        for epoch in range(2):
            for i in range(0, 8, 4):
                with monitor.capture("eval", "val"):
                    if epoch or i:
                        assert all_hooks(model) == 0  # given up: nothing hooked any more
                    monitor.update(x[i:i + 4], y[i:i + 4], model(x[i:i + 4]))
            monitor.epoch_end(epoch)
    assert len([w for w in record if issubclass(w.category, EigenCAMWarning)]) == 1
    assert monitor.close() == 0 and monitor.run_id is None and all_hooks(model) == 0
    assert mlflow.search_runs(search_all_experiments=True).empty  # nothing logged


def test_model_without_feature_map_raises_with_strict(shapes):
    x, y = shapes
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    monitor, _ = _monitor(model, strict=True)
    with pytest.raises(ValueError, match="pass target_layer"):
        with monitor.capture("eval"):
            monitor.update(x[:2], y[:2], model(x[:2]))
    assert all_hooks(model) == 0
    monitor = EigenCAMMonitor(model, strict=True)
    with pytest.raises(ValueError, match="pass target_layer"):
        with monitor.capture("eval"):
            model(x[:2])  # a forward without update(): found out when the block ends
    assert all_hooks(model) == 0


def test_a_decoder_head_is_not_explained_and_the_choice_is_said_once(tracking_uri, shapes):
    x, y = shapes
    model = TinyClassifierWithDecoder()
    with pytest.warns(EigenCAMWarning, match=r"chose 'encoder' and not the last feature map 'decoder' "
                                              r"\(3x16x16\).*Candidates.*encoder \(16x4x4\) <- chosen.*"
                                              r"decoder \(3x16x16\)") as record:
        with EigenCAMMonitor(model, n_samples=2) as monitor:
            for epoch in range(2):
                for i in range(0, 8, 4):
                    with monitor.capture("eval", "val"):
                        logits, _ = model(x[i:i + 4])
                        monitor.update(x[i:i + 4], y[i:i + 4], logits)
                monitor.epoch_end(epoch)
            run_id = monitor.run_id
    assert len([w for w in record if issubclass(w.category, EigenCAMWarning)]) == 1
    tag = MlflowClient().get_run(run_id).data.tags[_layout.TAG_TARGET_LAYER]
    assert tag == "encoder (auto: feature map (B, 16, 4, 4), the last before the model upsamples (a decoder follows))"
    assert image_counts(MlflowClient(), run_id) == {
        (f"eigencam/eval/val/sample_{i}", s): 1 for i in range(2) for s in range(2)}


def test_close_returns_what_was_not_delivered(tmp_path, shapes):
    from tests.helpers.readback import free_port

    x, y = shapes
    model = TinyCNN()
    monitor = EigenCAMMonitor(model, n_samples=2, run_id="b" * 32,
                              tracking_uri=f"http://127.0.0.1:{free_port()}")  # nobody listens
    with monitor.capture("eval", "val"):
        monitor.update(x[:4], y[:4], model(x[:4]))
    monitor.epoch_end(0)
    with pytest.warns(EigenCAMWarning, match="kept in"):
        left = monitor.close(timeout=0.5)
    assert left == 2 and len(left.records) == 2 and all(p.is_file() for p in left.records)
    assert monitor.close() is left  # safe to call twice: the same answer


def test_close_returns_zero_when_everything_arrived_and_on_other_ranks(tracking_uri, shapes, monkeypatch):
    x, y = shapes
    model = TinyCNN()
    monitor = EigenCAMMonitor(model, n_samples=2)
    with monitor.capture("eval", "val"):
        monitor.update(x[:4], y[:4], model(x[:4]))
    monitor.epoch_end(0)
    left = monitor.close()
    assert isinstance(left, int) and left == 0
    monkeypatch.setenv("RANK", "1")
    assert EigenCAMMonitor(model).close() == 0


def test_rank_decided_at_first_capture_when_the_group_starts_later(shapes, monkeypatch):
    """mp.spawn style: MASTER_ADDR set, no RANK, process group not initialised at construction."""
    x, y = shapes
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    model = TinyCNN()
    monitor = EigenCAMMonitor(model)
    assert monitor._logger_ready is False  # not decided yet
    monkeypatch.setenv("RANK", "1")  # what get_rank() would say once the group is up
    with monitor.capture("eval", "val"):
        assert all_hooks(model) == 0
    assert monitor.logger is None


# --------------------------------------------------------------------------- pinned samples


def _run_pinned(x, y, pin: bool, epochs: int = 3):
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    monitor = EigenCAMMonitor(model, n_samples=4, pin_samples=pin)
    for epoch in range(epochs):
        model.train()
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for xb, yb in loader:  # shuffled again every epoch
                with monitor.capture("eval", "val"):
                    monitor.update(xb, yb, model(xb))
        monitor.epoch_end(epoch)
        assert all_hooks(model) == 0
    monitor.close()
    return monitor.run_id


def _ids_by_epoch(client, run_id):
    rows = table_rows(client, run_id, "eval", "val")
    by_epoch = {}
    for row in rows:
        by_epoch.setdefault(row["epoch"], []).append((row["sample_index"], row["sample_id"], row["label"]))
    return {epoch: sorted(v) for epoch, v in by_epoch.items()}


def test_pinned_samples_are_identical_at_every_epoch(tracking_uri, shapes):
    x, y = shapes
    client = MlflowClient()
    run_id = _run_pinned(x, y, pin=True)
    by_epoch = _ids_by_epoch(client, run_id)
    assert sorted(by_epoch) == [0, 1, 2]
    assert len(by_epoch[0]) == 4
    assert by_epoch[0] == by_epoch[1] == by_epoch[2]  # same index, image content and label
    assert image_counts(client, run_id) == {
        (f"eigencam/eval/val/sample_{i}", step): 1 for i in range(4) for step in range(3)}


def test_without_pinning_a_shuffling_loader_shows_other_samples(tracking_uri, shapes):
    x, y = shapes
    by_epoch = _ids_by_epoch(MlflowClient(), _run_pinned(x, y, pin=False))
    ids = [[sid for _, sid, _ in by_epoch[e]] for e in range(3)]
    assert ids[0] != ids[1] or ids[1] != ids[2]


def test_capture_without_ds_id_logs_under_the_splits_id_as_lightning_does(tracking_uri, shapes):
    x, y = shapes
    model = TinyCNN()
    with EigenCAMMonitor(model, n_samples=1, mode=None) as monitor:
        for mode in ("train", "eval", "test"):
            with monitor.capture(mode):
                monitor.update(x[:2], y[:2], model(x[:2]))
        with monitor.capture("eval", "holdout"):  # a named dataset keeps its name
            monitor.update(x[:2], y[:2], model(x[:2]))
        monitor.epoch_end(0)
        run_id = monitor.run_id
    assert set(image_series(MlflowClient(), run_id)) == {
        "eigencam/train/train/sample_0", "eigencam/eval/val/sample_0", "eigencam/test/test/sample_0",
        "eigencam/eval/holdout/sample_0"}


# -- faithfulness (docs/signals.md) -------------------------------------------------------------

def _eigencam_metrics(client, run_id):
    metrics = client.get_run(run_id).data.metrics
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in metrics if key.startswith("eigencam/")}


def test_faithfulness_changes_no_loss_weight_or_other_metric(tracking_uri, shapes):
    """A seeded run's losses and weights are the same without the monitor, with it and with
    its faithfulness pass; the other EigenCAM metrics are the same with and without it."""
    x, y = shapes
    client = MlflowClient()
    torch.manual_seed(0)
    base = TinyCNN(dropout=0.3)
    runs = {}
    for name, kwargs in (("plain", None), ("off", {"faithfulness": False}), ("on", {})):
        model, losses = copy.deepcopy(base), []
        monitor = None if kwargs is None else EigenCAMMonitor(model, mode=None, n_samples=3, **kwargs)
        _train(model, x, y, monitor, epochs=3, losses=losses)
        run_id = None if monitor is None else monitor.run_id
        if monitor is not None:
            monitor.close()
        runs[name] = (losses, model.state_dict(), run_id)
    assert runs["plain"][0] == runs["off"][0] == runs["on"][0]
    for key, value in runs["plain"][1].items():
        assert torch.equal(value, runs["on"][1][key]), key
    off, on = (_eigencam_metrics(client, runs[k][2]) for k in ("off", "on"))
    faith = {k: on.pop(k) for k in list(on) if k.endswith("/faithfulness")}
    assert off == on  # evr_*, map_change: unchanged
    assert sorted(faith) == ["eigencam/eval/val/faithfulness", "eigencam/train/train/faithfulness"]
    assert all([s for s, _ in v] == [0, 1, 2] and all(-1 <= f <= 1 for _, f in v)
               for v in faith.values())
    rows = table_rows(client, runs["on"][2], "eval", "val")
    assert len(rows) == 9 and all(r["faithfulness"] is not None for r in rows)


class _ReadsChecker(nn.Module):
    """Class 1's score: how much fine checkerboard the image has (a 2x2 conv that a blur
    erases). Images carry it in their top-left quarter only, where the feature map fires:
    the map's top region carries the prediction."""

    def __init__(self, ignore_image: bool = False) -> None:
        super().__init__()
        self.ignore = ignore_image
        self.features = nn.Sequential(nn.Conv2d(3, 4, 2, bias=False), nn.ReLU())
        checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
        with torch.no_grad():
            self.features[0].weight.copy_(
                torch.stack([checker, -checker] * 2)[:, None].expand(4, 3, 2, 2))

    def forward(self, x):
        score = self.features(x).mean(dim=(1, 2, 3))
        if self.ignore:
            score = torch.zeros_like(score)
        logit = 40 * (score - 0.02)
        return torch.stack([-logit, logit], dim=1)


def _checker_corner_images(n=4, size=16):
    g = torch.Generator().manual_seed(0)
    x = 0.01 * torch.rand(n, 3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    x[:, :, :8, :8] += ((yy + xx) % 2).float()
    return x


@pytest.mark.parametrize("ignore, low, high", [(False, 0.3, 1.0), (True, -1e-6, 1e-6)])
def test_faithfulness_is_high_when_the_top_region_carries_the_prediction(tracking_uri, ignore, low, high):
    x = _checker_corner_images()
    model = _ReadsChecker(ignore)
    monitor, logger = _monitor(model, target_layer="features", n_samples=4)
    with monitor.capture("eval", "val"):
        monitor.update(x, None, model(x))
    scores = logger.batches[-1]["faithfulness"]
    assert scores.shape == (4,) and ((scores >= low) & (scores <= high)).all(), scores
    monitor.epoch_end(0)
    monitor.close()


def test_faithfulness_off_and_bad_fractions(tracking_uri, shapes):
    x, y = shapes
    model = TinyCNN()
    monitor, logger = _monitor(model, faithfulness=False)
    with monitor.capture("eval", "val"):
        monitor.update(x[:4], y[:4], model(x[:4]))
    assert "faithfulness" not in logger.batches[-1]
    monitor.close()
    streaming, logger = _monitor(model, n_samples=None)  # every sample: not scored
    with streaming.capture("eval", "val"):
        streaming.update(x[:4], y[:4], model(x[:4]))
    assert len(logger.batches) == 1 and "faithfulness" not in logger.batches[-1]
    streaming.close()
    with pytest.raises(ValueError, match=r"fractions must be numbers in \(0, 1\), got \(0.5, 2\)"):
        EigenCAMMonitor(model, faithfulness=(0.5, 2))


def test_true_boxes_given_to_update_are_pinned_and_scored_every_epoch(tracking_uri):
    x = _checker_corner_images()
    model = _ReadsChecker()
    client = MlflowClient()
    with EigenCAMMonitor(model, target_layer="features", n_samples=4) as monitor:
        for epoch in range(2):
            with monitor.capture("eval", "val"):
                monitor.update(x, None, model(x), boxes=[torch.tensor([[0, 0, 8, 8]])] * 4)
            monitor.epoch_end(epoch)  # epoch 1: the pinned pass, boxes kept with the pins
        run_id = monitor.run_id
    rows = table_rows(client, run_id, "eval", "val")
    assert [r["epoch"] for r in rows] == [0] * 4 + [1] * 4
    assert all(r["localization"] > 0.8 and r["pointing_game"] == 1.0 for r in rows)
    history = client.get_metric_history(run_id, "eigencam/eval/val/pointing_game")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 1.0)]
