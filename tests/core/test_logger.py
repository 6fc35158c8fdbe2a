"""EigenCAMLogger against a real MLflow sqlite store: what a user sees in the run."""

from __future__ import annotations

import statistics
import threading
import warnings

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning
from mlflow_eigencam import _table
from tests.helpers import memory
from tests.helpers.memory import in_fresh_process
from tests.helpers.oracle import blob_batch
from tests.helpers.readback import image_series, list_all, load_json, load_png, metric_steps
from tests.helpers.spool import feed_epoch


def test_epochs_land_as_keys_steps_grid_table_metrics_tags(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=2, n_samples=3, label_mapping=["circle", "square", "tri"],
                                target_layer="layer4")
        for epoch in range(2):
            for b in range(3):
                images, acts, labels, logits = blob_batch(seed=b)
                logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        assert logger.flush(timeout=60)
        logger.close()
    rid = run.info.run_id
    series = image_series(client, rid)
    assert sorted(series) == [f"eigencam/eval/val/sample_{i}" for i in range(3)]
    assert all(sorted(steps) == [0, 1] for steps in series.values())
    strip = load_png(client, rid, series["eigencam/eval/val/sample_0"][1])
    # A near-square card: input and PC1 over PC2 (k=2), panels of 128 px.
    assert strip.dtype == np.uint8 and strip.shape[0] > 2 * 128 and 0.7 <= strip.shape[1] / strip.shape[0] <= 1.5

    files = list_all(client, rid, "eigencam")
    assert "eigencam/eval/val/epoch_0000/grid.png" in files
    assert "eigencam/eval/val/epoch_0001/grid.png" in files
    assert "eigencam/eval/val/epoch_0001/sample_2.png" in files
    grid = load_png(client, rid, "eigencam/eval/val/epoch_0001/grid.png")
    assert grid.shape[1] >= 3 * strip.shape[1] and grid.shape[0] > strip.shape[0]  # 3 cards in a row

    table = load_json(client, rid, "eigencam/eval/val/samples.json")
    cols = table["columns"]
    assert cols[:6] == ["epoch", "sample_index", "sample_id", "label", "prediction", "correct"]
    assert "evr_1" in cols and "evr_2" in cols and cols[-1] == "image"
    rows = [dict(zip(cols, r)) for r in table["data"]]
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert {r["label"] for r in rows} <= {"circle", "square", "tri"}
    # The same images at both epochs: sample ids (content hashes) match.
    assert [r["sample_id"] for r in rows[:3]] == [r["sample_id"] for r in rows[3:]]
    assert rows[4]["image"] == "eigencam/eval/val/epoch_0001/sample_1.png"
    # mlflow.load_table reads it (the tag that log_table writes is set).
    df = mlflow.load_table("eigencam/eval/val/samples.json", run_ids=[rid])
    assert len(df) == 6

    evr1 = metric_steps(client, rid, "eigencam/eval/val/evr_1")
    assert [s for s, _ in evr1] == [0, 1] and all(0 < v <= 1 for _, v in evr1)
    tags = client.get_run(rid).data.tags
    assert tags["mlflow_eigencam.target_layer"] == "layer4"
    assert tags["mlflow_eigencam.n_components"] == "2"
    assert tags["mlflow_eigencam.version"]
    assert "train" in tags["mlflow_eigencam.mode"]


def test_image_series_files_are_the_ones_log_image_writes(tracking_uri):
    """The package writes MLflow's image-series files itself (one upload per epoch): same
    names, same full-size PNG, a WebP preview of the same size, the same run tag."""
    from PIL import Image

    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=2, n_samples=1)
        images, acts, labels, logits = blob_batch(n=1, h=24, w=40)
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
        logger.on_epoch_end(3)
        assert logger.flush(timeout=60)
        logger.close()
        rid = run.info.run_id
        ours = load_png(client, rid, image_series(client, rid)["eigencam/eval/val/sample_0"][3])
        mlflow.log_image(ours, key="reference", step=3, synchronous=True)
    names = sorted(f.path for f in client.list_artifacts(rid, "images"))
    assert len(names) == 4
    kinds = {}
    for name in names:
        key, rest = name[len("images/"):].split("+step+", 1)
        assert rest.startswith("3+timestamp+")
        kinds.setdefault(key, set()).add("preview" if name.endswith("+compressed.webp")
                                         else rest.rsplit(".", 1)[1])
    assert kinds == {"eigencam~eval~val~sample_0": {"png", "preview"},
                     "reference": {"png", "preview"}}
    series = image_series(client, rid)
    assert np.array_equal(load_png(client, rid, series["reference"][3]), ours)
    previews = {}
    for name in names:
        if name.endswith("+compressed.webp"):
            local = client.download_artifacts(rid, name)
            with Image.open(local) as im:
                previews[name.split("+", 1)[0]] = (im.format, im.size)
    assert previews["images/eigencam~eval~val~sample_0"] == previews["images/reference"]
    assert previews["images/reference"][0] == "WEBP"
    assert client.get_run(rid).data.tags["mlflow.loggedImages"] == "True"


def test_filtered_modes_cost_nothing_and_log_nothing(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(mode="!train", ds_id="!noisy")
        assert not logger.wants("train", None) and logger.room("train", None) == 0
        images, acts, labels, logits = blob_batch()
        logger.on_batch_end(images, acts, labels, logits, mode="train")
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="noisy")
        logger.on_epoch_end(0)
        logger.close()
    assert image_series(client, run.info.run_id) == {}
    assert list_all(client, run.info.run_id) == []


def test_hostile_ids_stay_inside_the_run_and_distinct(tracking_uri):
    client = MlflowClient()
    ids = ["../../evil", "a b", "a/b", "naïve", None]
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=1)
        for ds in ids:
            images, acts, labels, logits = blob_batch(n=1)
            logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id=ds)
        logger.on_epoch_end(0)
        logger.close()
    series = image_series(client, run.info.run_id)
    assert len(series) == len(ids)
    assert all(k.startswith("eigencam/eval/") and ".." not in k for k in series)
    assert "eigencam/eval/all/sample_0" in series
    files = list_all(client, run.info.run_id, "eigencam")
    grids = [f for f in files if f.endswith("grid.png")]
    assert len(grids) == len(ids)
    assert all(f.count("/") == 4 for f in grids)  # eigencam/eval/<id>/epoch_0000/grid.png


def test_starts_a_run_when_none_is_active_and_ends_it(tracking_uri):
    logger = EigenCAMLogger(n_samples=2)
    images, acts, labels, logits = blob_batch()
    logger.on_batch_end(images, acts, labels, logits, mode="test")
    logger.on_epoch_end(0)
    rid = logger.run_id
    assert rid is not None
    logger.close()
    assert mlflow.active_run() is None
    client = MlflowClient()
    assert client.get_run(rid).info.status == "FINISHED"
    assert sorted(image_series(client, rid)) == ["eigencam/test/all/sample_0", "eigencam/test/all/sample_1"]


def test_explicit_run_id_through_the_client(tracking_uri):
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("eigencam-tests").experiment_id
    rid = client.create_run(exp).info.run_id
    with EigenCAMLogger(n_samples=1, run_id=rid) as logger:
        images, acts, labels, logits = blob_batch()
        logger.on_batch_end(images, acts, labels, logits, mode="eval")
        logger.on_epoch_end(3)
    assert mlflow.active_run() is None
    assert list(image_series(client, rid)) == ["eigencam/eval/all/sample_0"]
    assert list(image_series(client, rid)["eigencam/eval/all/sample_0"]) == [3]


def test_non_square_images_keep_their_shape(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=1, n_components=1)
        images, acts, labels, logits = blob_batch(n=1, h=20, w=36, hh=5, ww=9, nchw=False)
        logger.on_batch_end(images, acts, mode="eval")
        logger.on_epoch_end(0)
        logger.close()
    path = image_series(client, run.info.run_id)["eigencam/eval/all/sample_0"][0]
    strip = load_png(client, run.info.run_id, path)
    # Two panels (image + 1 component), each upscaled to short side >= 128 keeping 20:36.
    assert strip.shape[1] >= 2 * round(128 * 36 / 20) - 8


@pytest.mark.parametrize("kwargs, match", [
    ({"n_components": 0}, "n_components"),
    ({"n_components": 1.5}, "n_components"),
    ({"n_samples": 0}, "n_samples"),
    ({"alpha": 2}, "alpha"),
    ({"colormap": "nope"}, "nope"),
    ({"log_every_n_epochs": 0}, "log_every_n_epochs"),
    ({"image_layout": "CHW"}, "image_layout"),
    ({"mode": "validation"}, "validation"),
    ({"mode": "!"}, "!"),
])
def test_bad_parameters_fail_at_construction_naming_the_value(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EigenCAMLogger(**kwargs)


def test_runtime_failures_warn_and_never_raise_unless_strict(tracking_uri):
    images, acts, labels, logits = blob_batch()
    with mlflow.start_run():
        logger = EigenCAMLogger()
        with pytest.warns(EigenCAMWarning, match="batch sizes differ"):
            logger.on_batch_end(images, acts[:2], labels, logits, mode="eval")
        with pytest.warns(EigenCAMWarning, match="layout"):
            logger.on_batch_end(np.zeros((2, 3, 5, 3)), acts[:2], mode="eval")
        logger.close()
        strict = EigenCAMLogger(strict=True)
        with pytest.raises(ValueError, match="batch sizes differ"):
            strict.on_batch_end(images, acts[:2], labels, logits, mode="eval")
        strict.close()


def test_streaming_keeps_every_sample(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=None, n_components=1)
        assert logger.room("eval", None) is None
        for b in range(3):
            images, acts, labels, logits = blob_batch(seed=b)
            logger.on_batch_end(images, acts, labels, logits, mode="eval")
        logger.on_epoch_end(0)
        logger.close()
    rid = run.info.run_id
    series = image_series(client, rid)
    assert len(series) == 12
    parts = _table.part_paths(lambda p: client.list_artifacts(rid, p), "eval", None)
    assert len(parts) == 1
    table = load_json(client, rid, parts[0])  # streamed: a part
    assert [r[1] for r in table["data"]] == list(range(12))


def test_log_every_n_epochs(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=1, log_every_n_epochs=2)
        for epoch in range(5):
            images, acts, labels, logits = blob_batch()
            logger.on_batch_end(images, acts, labels, logits, mode="eval")
            logger.on_epoch_end(epoch)
        logger.close()
    assert sorted(image_series(client, run.info.run_id)["eigencam/eval/all/sample_0"]) == [0, 2, 4]


def test_twenty_epochs_do_not_grow_memory(tracking_uri):
    # In a fresh process: tracemalloc counts other tests' leftover threads too.
    sizes = in_fresh_process(memory.twenty_epochs, tracking_uri,
                             mlflow.get_experiment_by_name("eigencam-tests").experiment_id)
    # After warm-up, 15 more epochs may only add table rows (a few hundred bytes each). A leak
    # grows at every epoch, so it shows in both halves; a one-off step does not (on MLflow
    # 2.10, CI saw traced memory step once by +3.9 MB between epochs 5 and 15, then stay
    # flat: a cache or lazy import of MLflow's, filled once). Medians of four epochs each.
    early, mid, late = (statistics.median(sizes[i:i + 4]) for i in (4, 10, 16))
    assert min(mid - early, late - mid) < 500_000, sizes


def _epoch(logger, epoch, seed=0):
    for b in range(2):
        images, acts, labels, logits = blob_batch(seed=seed + b)
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
    logger.on_epoch_end(epoch)


def _one_per_step(client, rid, steps):
    """One metric point, one image per sample and one table row per sample at each step."""
    assert [s for s, _ in metric_steps(client, rid, "eigencam/eval/val/evr_1")] == steps
    series = image_series(client, rid)
    assert all(sorted(v) == steps for v in series.values())
    counts = {}
    for f in list_all(client, rid, "images"):
        if f.endswith(".png"):
            key = f.split("+step+")[0]
            step = int(f.split("+step+")[1].split("+")[0])
            counts[(key, step)] = counts.get((key, step), 0) + 1
    assert set(counts.values()) == {1}, counts
    table = load_json(client, rid, "eigencam/eval/val/samples.json")
    keys = [(r[0], r[1]) for r in table["data"]]
    assert len(keys) == len(set(keys)) and sorted({k[0] for k in keys}) == steps


def test_an_epoch_ended_twice_is_logged_once_with_one_warning(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2)
        _epoch(logger, 0)
        with pytest.warns(EigenCAMWarning, match="logged already; the first stays"):
            _epoch(logger, 0, seed=5)
            _epoch(logger, 0, seed=7)  # warned once: pytest.warns sees one or more
        _epoch(logger, 1)
        assert logger.close() == 0
    rid = run.info.run_id
    _one_per_step(client, rid, [0, 1])


def test_a_second_fit_continues_the_steps_after_begin_fit(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2)
        assert logger.begin_fit() is None  # nothing logged yet
        for epoch in range(2):
            _epoch(logger, epoch)
        assert logger.begin_fit() == 1
        for epoch in range(2):  # the second phase counts from 0 again: steps 2, 3
            _epoch(logger, epoch)
        assert logger.step_offset == 2
        assert logger.close() == 0
        # A new logger on the same run (a new callback per fit) learns the steps from MLflow.
        other = EigenCAMLogger(n_samples=2)
        assert other.begin_fit() == 3
        _epoch(other, 0)
        assert other.close() == 0
    _one_per_step(client, run.info.run_id, [0, 1, 2, 3, 4])


def test_a_resumed_fit_keeps_its_epochs_as_steps(tracking_uri):
    """A fit that starts after the last logged epoch (Keras' initial_epoch, a checkpoint)
    logs its epochs at their own steps: begin_fit() shifts only a fit that starts over."""
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2)
        logger.begin_fit()
        for epoch in range(3):
            _epoch(logger, epoch)
        assert logger.close() == 0
        resumed = EigenCAMLogger(n_samples=2)
        assert resumed.begin_fit() == 2
        for epoch in (3, 4):
            _epoch(resumed, epoch)
        assert resumed.step_offset == 0 and resumed.close() == 0
    _one_per_step(client, run.info.run_id, [0, 1, 2, 3, 4])


def test_a_repeat_from_another_logger_is_dropped_by_the_sender(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        first = EigenCAMLogger(n_samples=2)
        _epoch(first, 0)
        assert first.close() == 0
        second = EigenCAMLogger(n_samples=2)  # no begin_fit(): epoch 0 again
        with pytest.warns(EigenCAMWarning, match="already has epoch 0"):
            _epoch(second, 0, seed=5)
            assert second.flush(timeout=60)
            second.close()
    _one_per_step(client, run.info.run_id, [0])


def test_close_returns_what_was_not_delivered_every_time(tracking_uri):
    from mlflow_eigencam.sink import Undelivered

    logger = EigenCAMLogger(n_samples=2)
    first = logger.close()
    assert isinstance(first, Undelivered) and first == 0 and logger.close() is first
    with mlflow.start_run():
        logger = EigenCAMLogger(n_samples=2)
        _epoch(logger, 0)
        done = logger.close()
    assert isinstance(done, Undelivered) and done == 0 and done.records == []


def test_epoch_end_from_another_thread_logs_into_the_users_run(tracking_uri):
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("eigencam-tests").experiment_id
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2)
        for b in range(2):
            images, acts, labels, logits = blob_batch(seed=b)
            logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
        t = threading.Thread(target=logger.on_epoch_end, args=(0,))
        t.start()
        t.join()
        # A whole epoch from a worker thread that has no active run.
        t = threading.Thread(target=feed_epoch, args=(logger, 1))
        t.start()
        t.join()
        assert logger.close() == 0
    runs = client.search_runs([exp])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    series = image_series(client, run.info.run_id)
    assert all(sorted(s) == [0, 1] for s in series.values()) and len(series) == 2


def test_two_loggers_on_one_run_and_two_threads_on_one_logger_never_collide(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        a, b = EigenCAMLogger(n_samples=2), EigenCAMLogger(n_samples=2)
        jobs = [(a, "val"), (b, "test"), (a, "extra")]  # a is fed by two threads

        def work(logger, ds):
            for epoch in range(3):
                feed_epoch(logger, epoch, ds)

        threads = [threading.Thread(target=work, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a.spool_dir != b.spool_dir
        assert a.close() == 0 and b.close() == 0
    rid = run.info.run_id
    series = image_series(client, rid)
    assert len(series) == 6 and all(sorted(s) == [0, 1, 2] for s in series.values())
    for ds in ("val", "test", "extra"):
        rows = load_json(client, rid, f"eigencam/eval/{ds}/samples.json")["data"]
        assert [(r[0], r[1]) for r in rows] == [(e, i) for e in range(3) for i in range(2)]


def test_bad_mode_or_ds_id_at_run_time_warn_once_and_skip(tracking_uri):
    images, acts, labels, logits = blob_batch()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=1)
        with pytest.warns(EigenCAMWarning, match="validation"):
            logger.on_batch_end(images, acts, labels, logits, mode="validation")
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            logger.on_batch_end(images, acts, labels, logits, mode="validation")
        assert not [w for w in again if w.category is EigenCAMWarning]
        with pytest.warns(EigenCAMWarning, match="ds_id must be a string"):
            logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id=3)
        logger.on_batch_end(images, acts, labels, logits, mode="eval")
        logger.on_epoch_end(0)
        assert logger.close() == 0
        strict = EigenCAMLogger(strict=True)
        with pytest.raises(ValueError, match="validation"):
            strict.on_batch_end(images, acts, labels, logits, mode="validation")
        strict.close()
    assert list(image_series(MlflowClient(), run.info.run_id)) == ["eigencam/eval/all/sample_0"]


def test_fewer_channels_than_components_clamps_with_one_warning(tracking_uri):
    images, acts, labels, logits = blob_batch(c=1)
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2)  # n_components=3 by default
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for epoch in range(2):
                logger.on_batch_end(images, acts, labels, logits, mode="eval")
                logger.on_epoch_end(epoch)
            assert logger.close() == 0
    ours = [str(w.message) for w in caught if w.category is EigenCAMWarning]
    assert len(ours) == 1 and "n_components=1" in ours[0], ours
    client = MlflowClient()
    assert [s for s, _ in metric_steps(client, run.info.run_id, "eigencam/eval/all/evr_1")] == [0, 1]
