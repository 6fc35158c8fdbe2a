"""transformers.Trainer: autolog() and EigenCAMCallback, read back from a real MLflow store."""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import mlflow_eigencam
from mlflow_eigencam import _layout
from mlflow_eigencam.transformers import EigenCAMCallback
from tests.helpers.hf_models import ShapesDataset, make_trainer, tiny_resnet, tiny_vit
from tests.helpers.readback import image_series, load_json, metric_steps

KEYS2 = ["eigencam/eval/val/sample_0", "eigencam/eval/val/sample_1"]


def _only_run() -> str:
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0].info.run_id


def _eval_steps(rid: str) -> list:
    return [step for step, _ in metric_steps(MlflowClient(), rid, "eval_loss")]


def test_autolog_one_line_logs_into_trainers_run_at_its_eval_steps(tmp_path, tracking_uri):
    mlflow_eigencam.autolog(n_samples=2, silent=True)
    trainer = make_trainer(tiny_vit(), tmp_path / "out")
    trainer.train()
    assert not any(isinstance(cb, EigenCAMCallback) for cb in trainer.callback_handler.callbacks)
    rid = _only_run()  # Trainer's MLflowCallback run: no second run
    run = MlflowClient().get_run(rid)
    assert run.info.status == "FINISHED"
    series = image_series(MlflowClient(), rid)
    assert sorted(series) == KEYS2
    # 16 images / batch 8 = 2 steps per epoch: evaluations at global steps 2 and 4, where
    # Trainer logs eval_loss; the slider and the eval curve share their steps.
    assert _eval_steps(rid) == [2, 4]
    assert all(sorted(steps) == [2, 4] for steps in series.values())
    assert run.data.tags[_layout.TAG_TARGET_LAYER].startswith("vit.layernorm (auto: tokens")
    assert "global_step" in run.data.tags["mlflow_eigencam.step"]
    assert "train_epoch" in run.data.tags["mlflow_eigencam.step"]
    table = load_json(MlflowClient(), rid, _layout.table_path("eval", "val"))
    assert table["columns"][:2] == ["epoch", "train_epoch"]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    # The step (global_step) and the epoch Trainer logs its metrics with, side by side.
    assert sorted({(r["epoch"], r["train_epoch"]) for r in rows}) == [(2, 1.0), (4, 2.0)]
    assert {(s, e) for s, e in metric_steps(MlflowClient(), rid, "epoch") if s in (2, 4)} == {(2, 1.0), (4, 2.0)}
    val = ShapesDataset(8, seed=2)
    names = ("circle", "square", "triangle")
    assert [r["label"] for r in rows if r["epoch"] == 2] == [names[int(val.labels[i])] for i in (0, 1)]
    assert {r["prediction"] for r in rows} <= set(names)


def test_explicit_callback_without_report_to_starts_and_ends_its_own_run(tmp_path, tracking_uri):
    callback = EigenCAMCallback(n_samples=1, target_layer="resnet.encoder.stages.0")
    make_trainer(tiny_resnet(), tmp_path / "out", callbacks=[callback], report_to="none").train()
    rid = _only_run()
    assert callback.run_id == rid
    run = MlflowClient().get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.tags[_layout.TAG_TARGET_LAYER] == "resnet.encoder.stages.0"
    assert {k: sorted(v) for k, v in image_series(MlflowClient(), rid).items()} == {
        "eigencam/eval/val/sample_0": [2, 4]}


def test_a_run_the_user_started_is_used_and_not_ended(tmp_path, tracking_uri):
    mlflow_eigencam.autolog(n_samples=2, silent=True)
    with mlflow.start_run() as run:
        make_trainer(tiny_resnet(), tmp_path / "out").train()
        assert mlflow.active_run() is not None and mlflow.active_run().info.run_id == run.info.run_id
        assert MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"
    assert _only_run() == run.info.run_id
    assert sorted(image_series(MlflowClient(), run.info.run_id)) == KEYS2


def test_evaluation_every_n_steps_logs_each_at_its_own_step(tmp_path, tracking_uri):
    callback = EigenCAMCallback(n_samples=1)
    trainer = make_trainer(tiny_resnet(), tmp_path / "out", callbacks=[callback],
                           eval_strategy="steps", eval_steps=1)
    trainer.train()
    rid = _only_run()
    assert _eval_steps(rid) == [1, 2, 3, 4]
    assert sorted(image_series(MlflowClient(), rid)["eigencam/eval/val/sample_0"]) == [1, 2, 3, 4]
    table = load_json(MlflowClient(), rid, _layout.table_path("eval", "val"))
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["epoch"], r["train_epoch"]) for r in rows] == [(1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0)]
    # evaluate() after train(): Trainer logs it at global step 4 again, which the last in-train
    # evaluation has: the images go to the step after the last one (5), in the training run
    # (Trainer's MLflowCallback ended it; its metrics of this evaluate() go to a new run).
    trainer.evaluate()
    assert callback.run_id == rid
    assert sorted(image_series(MlflowClient(), rid)["eigencam/eval/val/sample_0"]) == [1, 2, 3, 4, 5]


def _table_rows(rid: str, mode: str, ds_id: str) -> list:
    table = load_json(MlflowClient(), rid, _layout.table_path(mode, ds_id))
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_autolog_logs_evaluate_after_train_into_the_training_run(tmp_path, tracking_uri):
    mlflow_eigencam.autolog(n_samples=2, silent=True, faithfulness=False)
    model = tiny_resnet()
    trainer = make_trainer(model, tmp_path / "out")
    trainer.train()  # evaluations at global steps 2 and 4; Trainer's MLflowCallback ends its run
    client = MlflowClient()
    (rid,) = [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    assert _no_hooks(model)
    trainer.evaluate()  # Trainer logs it at global step 4 again: the images at step 5
    assert _no_hooks(model)
    test = ShapesDataset(4, seed=5)
    metrics = trainer.evaluate(test, metric_key_prefix="test")  # a new dataset: step 4
    assert _no_hooks(model)
    assert "test_loss" in metrics
    assert not any(isinstance(cb, EigenCAMCallback) for cb in trainer.callback_handler.callbacks)
    run = client.get_run(rid)  # the training run (its params are Trainer's), still FINISHED
    assert run.info.status == "FINISHED" and "learning_rate" in run.data.params
    assert {k: sorted(v) for k, v in image_series(client, rid).items()} == {
        **{key: [2, 4, 5] for key in KEYS2},
        "eigencam/test/test/sample_0": [4], "eigencam/test/test/sample_1": [4]}
    # Step 5 is the evaluation after training: its epoch is training's last, as at step 4.
    assert [(r["epoch"], r["train_epoch"]) for r in _table_rows(rid, "eval", "val")] == [
        (2, 1.0), (2, 1.0), (4, 2.0), (4, 2.0), (5, 2.0), (5, 2.0)]
    names = ("circle", "square", "triangle")
    assert [(r["epoch"], r["label"]) for r in _table_rows(rid, "test", "test")] == [
        (4, names[int(test.labels[i])]) for i in (0, 1)]
    assert "already logged" in run.data.tags["mlflow_eigencam.step"]


@pytest.mark.parametrize("how", ["autolog", "callback"])
def test_evaluate_without_train_logs_into_trainers_run(tmp_path, tracking_uri, how):
    callbacks = None
    if how == "autolog":
        mlflow_eigencam.autolog(n_samples=1, silent=True, faithfulness=False)
    else:
        callbacks = [EigenCAMCallback(n_samples=1, faithfulness=False)]
    model = tiny_resnet()
    trainer = make_trainer(model, tmp_path / "out", callbacks=callbacks)
    trainer.evaluate()
    assert _no_hooks(model)
    trainer.evaluate(ShapesDataset(2, seed=5), metric_key_prefix="test")
    assert _no_hooks(model)
    trainer.predict(ShapesDataset(2, seed=6))  # predict() is not captured (no key, no step)
    assert _no_hooks(model)
    rid = _only_run()  # the run Trainer's MLflowCallback started for its eval metrics: no second one
    assert _eval_steps(rid) == [0]
    assert [s for s, _ in metric_steps(MlflowClient(), rid, "test_loss")] == [0]
    assert {k: sorted(v) for k, v in image_series(MlflowClient(), rid).items()} == {
        "eigencam/eval/val/sample_0": [0], "eigencam/test/test/sample_0": [0]}


def _history(trainer) -> list:
    return [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k}
            for entry in trainer.state.log_history]


@pytest.mark.parametrize("make_model", [lambda: tiny_vit(dropout=0.1), tiny_resnet], ids=["vit", "resnet"])
def test_training_and_the_model_are_unchanged(tmp_path, tracking_uri, make_model):
    # Dropout in training and a random transform on the eval set: pinning the eval images
    # (which reads them) must not move the random stream the next training steps draw from.
    histories, states = [], []
    for with_callback in (False, True):
        model = make_model()
        callbacks = [EigenCAMCallback(n_samples=2)] if with_callback else None
        trainer = make_trainer(model, tmp_path / f"out{with_callback}", callbacks=callbacks,
                               val=ShapesDataset(8, seed=2, augment=True),
                               eval_strategy="steps", eval_steps=1, report_to="none")
        trainer.train()
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        # evaluate() after train(), on the eval set and a test set: logged (checked elsewhere);
        # same metrics, same random stream afterwards.
        trainer.evaluate()
        trainer.evaluate(ShapesDataset(4, seed=5, augment=True), metric_key_prefix="test")
        histories.append(_history(trainer))
        states.append((model.training, [m.training for m in model.modules()],
                       {k: v.clone() for k, v in model.state_dict().items()}, torch.rand(3)))
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert histories[0] == histories[1]
    assert any("eval_loss" in entry for entry in histories[1])
    assert any("test_loss" in entry for entry in histories[1])
    (flag0, flags0, params0, rng0), (flag1, flags1, params1, rng1) = states
    assert flag0 == flag1 and flags0 == flags1
    assert params0.keys() == params1.keys()
    assert all(torch.equal(params0[k], params1[k]) for k in params0)
    assert torch.equal(rng0, rng1)  # the global random stream after training is the same


def test_autolog_with_a_bad_layer_warns_and_training_completes(tmp_path, tracking_uri):
    mlflow_eigencam.autolog(layer="resnet.no_such_layer")
    trainer = make_trainer(tiny_resnet(), tmp_path / "out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == 4
    assert any("no_such_layer" in str(w.message) for w in caught)
    assert image_series(MlflowClient(), _only_run()) == {}


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="n_samples"):
        EigenCAMCallback(n_samples=0)
    with pytest.raises(ValueError, match="log_every_n_evals"):
        EigenCAMCallback(log_every_n_evals=0)
    with pytest.raises(ValueError, match="denormalize"):
        EigenCAMCallback(denormalize=(0.5,))
    with pytest.raises(ValueError, match="alpha"):
        EigenCAMCallback(alpha=3)


def _layer_after_one_evaluation(tmp_path, model, size=32) -> str:
    callback = EigenCAMCallback(n_samples=2)
    trainer = make_trainer(model, tmp_path / "out", callbacks=[callback], report_to="none",
                           val=ShapesDataset(4, size=size, seed=2))
    trainer.evaluate()  # standalone: global step 0; its images are in MLflow when it returns
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    rid = callback.run_id
    assert {k: sorted(v) for k, v in image_series(MlflowClient(), rid).items()} == {
        key: [0] for key in KEYS2}
    return MlflowClient().get_run(rid).data.tags[_layout.TAG_TARGET_LAYER]


def _config_models():
    from transformers import (ConvNextConfig, ConvNextForImageClassification, DeiTConfig,
                              DeiTForImageClassificationWithTeacher, SwinConfig,
                              SwinForImageClassification)

    return {
        "convnext": (lambda size: ConvNextForImageClassification(ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
            "convnext.encoder.stages.1 (auto: feature map (B, 16, {h}, {w}))"),
        "deit": (lambda size: DeiTForImageClassificationWithTeacher(DeiTConfig(
            image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, num_labels=3)),
            "deit.layernorm (auto: tokens (B, {n2}, 32) folded to a {h2}x{w2} patch grid (2 prefix tokens dropped))"),
        "swin": (lambda size: SwinForImageClassification(SwinConfig(
            image_size=size, patch_size=4, embed_dim=16, depths=[1, 1, 1], num_heads=[2, 2, 2],
            window_size=2, num_labels=3)), "swin.encoder.layers.2"),
        "vit": (lambda size: tiny_vit(size),
                "vit.layernorm (auto: tokens (B, {n1}, 32) folded to a {h2}x{w2} patch grid (1 prefix token dropped))"),
        "resnet": (lambda size: tiny_resnet(), "resnet.encoder.stages.1 (auto: feature map (B, 16, {h}, {w}))"),
    }


@pytest.mark.parametrize("name, size", [(name, 32) for name in ("resnet", "convnext", "vit", "deit", "swin")]
                         + [("vit", (32, 48)), ("swin", (32, 48))])
def test_default_layer_of_each_model_family(tmp_path, tracking_uri, name, size):
    h, w = (size, size) if isinstance(size, int) else size
    make, expected = _config_models()[name]
    # Stride 8 for the conv nets' last stage here, patch 8 for ViT / DeiT; Swin's last stage
    # is folded by the callback onto its own grid (stride 16), CLS/distillation tokens dropped.
    tag = _layer_after_one_evaluation(tmp_path, make(size), size)
    assert tag == expected.format(h=h // 8, w=w // 8, h2=h // 8, w2=w // 8,
                                  n1=h * w // 64 + 1, n2=h * w // 64 + 2)


def test_images_are_drawn_denormalised_with_the_image_processors_mean_and_std(tmp_path, tracking_uri):
    from transformers import ViTImageProcessor

    from tests.helpers.readback import load_png

    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.2]
    cards = {}
    for how in ("processor", "explicit", "min-max"):
        callback = EigenCAMCallback(n_samples=1, denormalize=(mean, std) if how == "explicit" else None)
        processor = ViTImageProcessor(image_mean=mean, image_std=std) if how == "processor" else None
        trainer = make_trainer(tiny_resnet(), tmp_path / how, callbacks=[callback], report_to="none",
                               processing_class=processor,
                               val=ShapesDataset(2, seed=2, normalize=(mean, std)))
        trainer.evaluate()
        callback.close()
        series = image_series(MlflowClient(), callback.run_id)
        cards[how] = load_png(MlflowClient(), callback.run_id, series[KEYS2[0]][0])
    # The processor's mean / std undo the normalisation exactly as the explicit ones do; without
    # either, each image is min-max scaled (other colours, same heat maps and captions).
    assert np.array_equal(cards["processor"], cards["explicit"])
    assert not np.array_equal(cards["processor"], cards["min-max"])


def test_each_evaluation_dataset_is_named_after_trainers_metric_prefix(tmp_path, tracking_uri):
    callback = EigenCAMCallback(n_samples=1)
    trainer = make_trainer(tiny_resnet(), tmp_path / "out", callbacks=[callback], report_to="none",
                           val={"clean": ShapesDataset(2, seed=2), "other": ShapesDataset(2, seed=3)})
    trainer.evaluate()  # metric prefixes eval_clean, eval_other
    trainer.evaluate(ShapesDataset(2, seed=4), metric_key_prefix="test")
    trainer.evaluate(ShapesDataset(2, seed=5), metric_key_prefix="test")  # another dataset
    callback.close()
    assert {k: sorted(v) for k, v in image_series(MlflowClient(), callback.run_id).items()} == {
        "eigencam/eval/val_clean/sample_0": [0], "eigencam/eval/val_other/sample_0": [0],
        "eigencam/test/test/sample_0": [0], "eigencam/test/test_1/sample_0": [0]}


def test_images_come_from_trainers_own_evaluation_loop(tmp_path, tracking_uri):
    # A forward pre-hook counts the model's calls in training (True) and eval mode (False):
    # the callback adds none; with the faithfulness signal (on by default) one scoring forward
    # of perturbed copies per logged evaluation, nothing else.
    val = {"clean": ShapesDataset(8, seed=2), "other": ShapesDataset(4, seed=3)}
    forwards, callbacks = {}, {}
    for arm in ("without", "with", "faithfulness"):
        model = tiny_resnet()
        callback = None if arm == "without" else EigenCAMCallback(n_samples=2, faithfulness=arm == "faithfulness")
        trainer = make_trainer(model, tmp_path / arm, callbacks=[callback] if callback else None, report_to="none",
                               val=val, eval_strategy="steps", eval_steps=2)
        calls: list = []
        handle = model.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(module.training))
        trainer.train()
        handle.remove()
        forwards[arm] = (calls.count(True), calls.count(False))
        callbacks[arm] = callback
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert forwards["without"] == (4, 2 * (1 + 1))  # 4 steps; 2 evaluations of 8 + 4 images, batch 8
    assert forwards["with"] == forwards["without"]
    assert forwards["faithfulness"] == (4, forwards["without"][1] + 4)  # 2 datasets x 2 evaluations
    rid = callbacks["with"].run_id
    series = {k: sorted(v) for k, v in image_series(MlflowClient(), rid).items()}
    assert series == {f"eigencam/eval/val_{name}/sample_{i}": [2, 4] for name in val for i in (0, 1)}
    # The first two images of each dataset's eval loader, at every evaluation.
    for name, dataset in val.items():
        table = load_json(MlflowClient(), rid, _layout.table_path("eval", f"val_{name}"))
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        names = ("circle", "square", "triangle")
        assert [(r["epoch"], r["label"]) for r in rows] == [
            (step, names[int(dataset.labels[i])]) for step in (2, 4) for i in (0, 1)]


def test_the_heat_lies_on_the_objects(tmp_path, tracking_uri):
    # True boxes of the shapes (known by construction) make the logger score localization: the
    # share of the PC1 map's positive mass inside the box, read back from MLflow.
    val = ShapesDataset(8, seed=2)
    callback = EigenCAMCallback(n_samples=8, faithfulness=False,
                                true_boxes=lambda ds_id, i: val.boxes[i][None].astype(float))
    make_trainer(tiny_resnet(), tmp_path / "out", callbacks=[callback], report_to="none", val=val,
                 train=ShapesDataset(32, seed=1), num_train_epochs=3).train()
    box_share = float(np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in val.boxes])) / (32 * 32)
    steps = metric_steps(MlflowClient(), callback.run_id, "eigencam/eval/val/localization")
    print("localization", steps, "box share", round(box_share, 3))
    assert [s for s, _ in steps] == [4, 8, 12]
    assert all(value > box_share for _, value in steps)
