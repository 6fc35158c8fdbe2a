"""integrations/lightning.py: EigenCAMCallback with a real Lightning Trainer (classifier and
detector batches), read back from a real MLflow store."""

from __future__ import annotations

import warnings

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader, Dataset, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import MLFlowLogger  # noqa: E402

from mlflow_eigencam import _layout  # noqa: E402
from mlflow_eigencam.errors import EigenCAMWarning  # noqa: E402
from mlflow_eigencam.lightning import EigenCAMCallback  # noqa: E402
from mlflow_eigencam.pytorch import default_batch_to_xy  # noqa: E402
from tests.helpers.torch_models import (  # noqa: E402
    TinyDetector,
    TinyResNet,
    all_hooks,
    image_counts,
    shapes_tensors,
    table_rows,
)

NAMES = ["circle", "square", "triangle"]


class LitShapes(pl.LightningModule):
    def __init__(self, batch_to_xy=default_batch_to_xy):
        super().__init__()
        self.net = TinyResNet(width=4)
        self.to_xy = batch_to_xy

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = self.to_xy(batch)
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = self.to_xy(batch)
        return torch.nn.functional.cross_entropy(self(x), y)

    test_step = validation_step

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(self.to_xy(batch)[0]).softmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class DictShapes(Dataset):
    def __init__(self, n=16, seed=0):
        self.x, self.y = shapes_tensors(n, 16, seed)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def _loader(n=16, seed=0, shuffle=False, batch_size=8):
    x, y = shapes_tensors(n, 16, seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def _trainer(tmp_path, callback, logger=False, epochs=2, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=2,
                      limit_val_batches=2, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, logger=logger, default_root_dir=tmp_path,
                      callbacks=[callback], **kwargs)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|shuffle|does not have many).*")
        yield


def test_fit_logs_validation_into_the_mlflow_logger_run(tmp_path, tracking_uri):
    uri = f"sqlite:///{tmp_path / 'lightning.db'}"  # not the global one: the run's URI must win
    mlf = MLFlowLogger(experiment_name="lit", tracking_uri=uri,
                       artifact_location=(tmp_path / "lit-artifacts").as_uri())
    model = LitShapes()
    model.net.layer2.bn1.eval()
    callback = EigenCAMCallback(n_samples=3, label_mapping=NAMES)
    trainer = _trainer(tmp_path, callback, logger=mlf)
    before = [m.training for m in model.modules()]
    # A shuffling validation loader: pinning still shows the same samples at both epochs.
    trainer.fit(model, _loader(32), _loader(16, seed=1, shuffle=True))
    assert all_hooks(model) == 0
    client = MlflowClient(uri)
    counts = image_counts(client, mlf.run_id)
    # Steps 0 and 1 once each: the sanity-check pass (also at epoch 0) logged nothing.
    assert counts == {(f"eigencam/eval/val/sample_{i}", s): 1 for i in range(3) for s in range(2)}
    tags = client.get_run(mlf.run_id).data.tags
    assert tags[_layout.TAG_TARGET_LAYER].startswith("net.layer4 (auto: feature map (B, ")
    rows = table_rows(client, mlf.run_id, "eval", "val")
    by_epoch = {e: [(r["sample_id"], r["label"]) for r in rows if r["epoch"] == e] for e in (0, 1)}
    assert by_epoch[0] == by_epoch[1] and len(by_epoch[0]) == 3
    assert all(r["prediction"] in NAMES for r in rows)
    # The faithfulness pass (on by default) scored every kept sample at every epoch.
    assert all(-1 <= r["faithfulness"] <= 1 for r in rows)
    faith = client.get_metric_history(mlf.run_id, "eigencam/eval/val/faithfulness")
    assert sorted(m.step for m in faith) == [0, 1]
    # Nothing went to the globally set tracking URI.
    other = MlflowClient(tracking_uri)
    runs = other.search_runs([e.experiment_id for e in other.search_experiments()])
    assert not [r for r in runs if _layout.TAG_VERSION in r.data.tags]
    # Lightning puts each module back in its own mode after validation; the extra forward
    # pass on the pinned samples must not have changed that (the frozen BatchNorm stays frozen).
    assert model.net.layer2.bn1.training is False
    assert [m.training for m in model.modules()] == before


def test_a_second_fit_in_one_run_continues_the_steps(tmp_path, tracking_uri):
    """Two-phase fine-tuning with one callback and a new Trainer per phase, in one run: the
    second phase's epochs 0, 1 are logged at steps 2, 3 (never two images at one step)."""
    model = LitShapes()
    callback = EigenCAMCallback(n_samples=2)
    with mlflow.start_run() as run:
        for _ in range(2):
            _trainer(tmp_path, callback).fit(model, _loader(16), _loader(8))
    counts = image_counts(MlflowClient(), run.info.run_id)
    assert counts == {(f"eigencam/eval/val/sample_{i}", s): 1 for i in range(2) for s in range(4)}


def test_several_validation_loaders_list_and_dict(tmp_path, tracking_uri):
    callback = EigenCAMCallback(n_samples=1)
    with mlflow.start_run() as run:
        trainer = _trainer(tmp_path, callback)
        trainer.validate(LitShapes(), [_loader(8, 1), _loader(8, 2)], verbose=False)
        trainer.validate(LitShapes(), {"clean": _loader(8, 1), "noisy": _loader(8, 2)}, verbose=False)
    keys = {key for key, _ in image_counts(MlflowClient(), run.info.run_id)}
    assert keys == {f"eigencam/eval/{d}/sample_0" for d in ("val_0", "val_1", "clean", "noisy")}


def test_train_mode_dict_batches_and_test_stage_share_a_started_run(tmp_path, tracking_uri):
    callback = EigenCAMCallback(n_samples=2, mode=None)
    model = LitShapes()
    trainer = _trainer(tmp_path, callback, epochs=1)
    dict_loader = DataLoader(DictShapes(16), batch_size=8)
    trainer.fit(model, dict_loader, DataLoader(DictShapes(8, 3), batch_size=8))
    run_id = callback.run_id
    assert run_id is not None and mlflow.active_run() is None  # started here, ended at teardown
    trainer.test(model, DataLoader(DictShapes(8, 4), batch_size=8), verbose=False)
    trainer.predict(model, DataLoader(DictShapes(8, 5), batch_size=8))
    assert callback.run_id == run_id
    keys = {key for key, _ in image_counts(MlflowClient(), run_id)}
    assert keys == {f"eigencam/{m}/{d}/sample_{i}" for m, d in
                    [("train", "train"), ("eval", "val"), ("test", "test"), ("infer", "predict")]
                    for i in range(2)}
    rows = table_rows(MlflowClient(), run_id, "infer", "predict")
    assert all(r["label"] is not None and r["prediction"] is not None for r in rows)


def test_custom_batch_to_xy(tmp_path, tracking_uri):
    def to_xy(batch):
        meta, x, y = batch
        return x, y

    x, y = shapes_tensors(8, 16)
    loader = DataLoader(TensorDataset(torch.arange(8), x, y), batch_size=8)
    callback = EigenCAMCallback(n_samples=2, batch_to_xy=to_xy, target_layer="net.layer3")
    with mlflow.start_run() as run:
        _trainer(tmp_path, callback).validate(LitShapes(to_xy), loader, verbose=False)
    client = MlflowClient()
    assert client.get_run(run.info.run_id).data.tags[_layout.TAG_TARGET_LAYER] == "net.layer3"
    assert len(image_counts(client, run.info.run_id)) == 2


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="bogus"):
        EigenCAMCallback(mode="bogus")
    with pytest.raises(TypeError, match="batch_to_xy"):
        EigenCAMCallback(batch_to_xy=3)
    with pytest.raises(ValueError, match="alpha"):
        EigenCAMCallback(alpha=2.0)
    with pytest.raises(ValueError, match=r"fractions must be numbers in \(0, 1\), got \(0,\)"):
        EigenCAMCallback(faithfulness=(0,))


def test_unknown_layer_warns_and_training_goes_on(tmp_path, tracking_uri):
    model = LitShapes()
    trainer = _trainer(tmp_path, EigenCAMCallback(target_layer="net.layer9"), epochs=1)
    with pytest.warns(EigenCAMWarning, match=r"'net.layer9'.*close names: net.layer"):
        trainer.fit(model, _loader(16), _loader(8))
    assert trainer.current_epoch == 1 and all_hooks(model) == 0
    strict = _trainer(tmp_path, EigenCAMCallback(target_layer="net.layer9", strict=True), epochs=1)
    with pytest.raises(ValueError, match="net.layer9"):
        strict.fit(LitShapes(), _loader(16), _loader(8))


def test_unreadable_batch_warns_once_and_removes_hooks(tmp_path, tracking_uri):
    x, y = shapes_tensors(8, 16)
    loader = DataLoader(TensorDataset(torch.arange(8), x, y), batch_size=4)  # (meta, x, y)

    def to_xy(batch):
        return batch[1], batch[2]

    model = LitShapes(to_xy)
    # The default batch_to_xy would take the 1-D meta tensor for the images.
    with pytest.warns(EigenCAMWarning, match=r"on_validation_batch_end.*\(4,\) tensor.*batch_to_xy"):
        _trainer(tmp_path, EigenCAMCallback()).validate(model, loader, verbose=False)
    assert all_hooks(model) == 0


# --------------------------------------------------------------------------- detectors


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


def _detection_data(n=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(3, 32, 48, generator=g),
             {"boxes": torch.tensor([[1.0, 1.0, 30.0, 30.0]] * (1 + i % 2)),
              "labels": torch.ones(1 + i % 2, dtype=torch.int64)})
            for i in range(n)]


def _collate(batch):  # torchvision's detection recipe: tuples of images and of targets
    return tuple(zip(*batch))


def test_lightning_detector_logs_boxes_with_counts(tmp_path, tracking_uri):
    loader = DataLoader(_detection_data(4), batch_size=2, collate_fn=_collate)
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


def test_undelivered_is_what_the_stage_left_behind(tmp_path, tracking_uri):
    from tests.helpers.readback import free_port

    assert EigenCAMCallback().undelivered is None  # no stage ended yet
    callback = EigenCAMCallback(n_samples=2, run_id="b" * 32, close_timeout=0.5,
                                tracking_uri=f"http://127.0.0.1:{free_port()}")  # nobody listens
    with pytest.warns(EigenCAMWarning, match="kept in"):
        _trainer(tmp_path, callback).validate(LitShapes(), _loader(8), verbose=False)
    left = callback.undelivered
    assert left == 2 and len(left.records) == 2 and all(p.is_file() for p in left.records)
    callback = EigenCAMCallback(n_samples=2)
    _trainer(tmp_path, callback).validate(LitShapes(), _loader(8), verbose=False)
    assert callback.undelivered == 0 and isinstance(callback.undelivered, int)


class LitFlat(pl.LightningModule):
    """No layer outputs an image-shaped map: nothing to explain."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


def test_no_usable_layer_warns_once_and_validation_goes_on(tmp_path, tracking_uri):
    model = LitFlat()
    with pytest.warns(EigenCAMWarning, match="pass target_layer.*training goes on") as record:
        _trainer(tmp_path, EigenCAMCallback(n_samples=2)).validate(model, _loader(16, batch_size=4),
                                                                     verbose=False)
    assert len([w for w in record if issubclass(w.category, EigenCAMWarning)]) == 1
    assert all_hooks(model) == 0 and mlflow.search_runs(search_all_experiments=True).empty
    with pytest.raises(ValueError, match="pass target_layer"):
        _trainer(tmp_path, EigenCAMCallback(strict=True)).validate(LitFlat(), _loader(8), verbose=False)
