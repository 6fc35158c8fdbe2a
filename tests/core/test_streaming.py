"""Streaming mode (n_samples=None) against a real MLflow sqlite store: inputs stored once per
run, per-epoch maps and table parts, the grid rows rendered now and the rest on demand."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from mlflow_eigencam import EigenCAMLogger, _layout, eigencam
from mlflow_eigencam._reader import Reader
from mlflow_eigencam._streaming import quantize_maps, render_stored, stored_strip
from mlflow_eigencam._table import part_paths as table_part_paths
from mlflow_eigencam.metrics import map_change
from mlflow_eigencam.samples import SampleBuffer
from tests.helpers import memory
from tests.helpers.memory import in_fresh_process
from tests.helpers.readback import image_series, list_all, load_json, load_png, metric_steps

N, BATCH, ROWS = 10, 4, 3  # 10 images in batches of 4, 3 grid rows


def dataset(seed=0):
    """The same N validation images every epoch; activations that drift a little."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(N, 40, 48, 3), dtype=np.uint8)  # non-square
    acts = rng.uniform(0, 1, size=(N, 6, 5, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=N)
    return images, acts, labels


def run_epochs(epochs, **kwargs):
    images, acts, labels = dataset()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=None, n_components=2, grid_max_rows=ROWS,
                                label_mapping=["a", "b", "c"], **kwargs)
        for epoch in range(epochs):
            drift = np.float32(1 + 0.1 * epoch)
            for i in range(0, N, BATCH):
                preds = np.eye(3)[(labels[i:i + BATCH] + epoch) % 3]
                logger.on_batch_end(images[i:i + BATCH], acts[i:i + BATCH] * drift ** np.arange(6)[:, None, None],
                                    labels[i:i + BATCH], preds, mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        assert logger.flush(timeout=60)
        logger.close()
    return run.info.run_id


def reader(client, run_id):
    def read_artifact(path):
        with tempfile.TemporaryDirectory() as d:
            try:
                return Path(client.download_artifacts(run_id, path, d)).read_bytes()
            except Exception as exc:  # MLflow raises its own errors for a missing artifact
                raise FileNotFoundError(path) from exc
    return read_artifact


def png_pixels(data):
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_inputs_once_per_run_maps_and_table_parts_per_epoch(tracking_uri):
    client = MlflowClient()
    rid = run_epochs(3)
    files = list_all(client, rid, "eigencam")
    inputs = [f for f in files if f.startswith("eigencam/eval/val/stream/inputs_")]
    assert len(inputs) == 3  # the three batches of epoch 0; epochs 1 and 2 add none
    ids = []
    read = reader(client, rid)
    for path in inputs:
        with zipfile.ZipFile(io.BytesIO(read(path))) as z:
            ids += z.namelist()
    assert len(ids) == len(set(ids)) == N  # each image once in the run
    parts = table_part_paths(lambda p: client.list_artifacts(rid, p), "eval", "val")
    assert len(parts) == 3  # one per epoch, in epoch order
    for epoch, path in enumerate(parts):
        assert path.startswith(f"{_layout.table_parts_dir('eval', 'val')}/epoch_{epoch:04d}-")
        assert _layout.stream_maps_path("eval", "val", epoch) in files
        assert _layout.grid_path("eval", "val", epoch) in files
        part = load_json(client, rid, path)
        cols = part["columns"]
        rows = [dict(zip(cols, r)) for r in part["data"]]
        assert [r["sample_index"] for r in rows] == list(range(N))
        assert all(r["epoch"] == epoch for r in rows)
        rendered = [r["image"] for r in rows]
        assert rendered[:ROWS] == [_layout.card_path("eval", "val", epoch, i) for i in range(ROWS)]
        assert rendered[ROWS:] == [""] * (N - ROWS)
        assert {"evr_1", "evr_2", "label", "prediction", "correct", "sample_id"} <= set(cols)
    # only the grid rows are image series; the per-epoch strips exist for them only
    series = image_series(client, rid)
    assert sorted(series) == [f"eigencam/eval/val/sample_{i}" for i in range(ROWS)]
    assert all(sorted(v) == [0, 1, 2] for v in series.values())
    assert not any(f.endswith(f"sample_{ROWS}.png") for f in files)
    # samples.json carries no streamed rows
    assert load_json(client, rid, _layout.table_path("eval", "val"))["data"] == []
    assert table_part_paths(lambda p: client.list_artifacts(rid, p), "eval", "other") == []


def test_render_stored_round_trip_equals_live_strips(tracking_uri):
    client = MlflowClient()
    rid = run_epochs(2)
    read = reader(client, rid)
    series = image_series(client, rid)
    for epoch in range(2):
        for i in range(ROWS):  # rendered live: the stored form gives the same strip
            data = render_stored(read, "eval", "val", epoch, i)
            live = load_png(client, rid, _layout.card_path("eval", "val", epoch, i))
            np.testing.assert_array_equal(png_pixels(data), live)
            np.testing.assert_array_equal(load_png(client, rid, series[f"eigencam/eval/val/sample_{i}"][epoch]), live)
            assert data == read(_layout.card_path("eval", "val", epoch, i))  # same bytes too
    # a row that was never rendered: the strip the live code would have drawn
    images, acts, labels = dataset()
    drift = np.float32(1.1)
    scaled = acts * drift ** np.arange(6)[:, None, None]
    res = eigencam(scaled, 2)
    buf = SampleBuffer(None, ["a", "b", "c"])
    s = buf.add("eval", "val", images[8:9], scaled[8:9], labels[8:9], np.eye(3)[(labels[8:9] + 1) % 3])[0]
    expected = stored_strip(images[8], quantize_maps(res.maps[8:9])[0], res.explained_variance_ratio[8],
                            label=s.label, pred=s.pred, correct=s.correct, sample_id=s.sample_id,
                            colormap="jet", alpha=0.5)
    got = png_pixels(render_stored(read, "eval", "val", 1, 8))
    np.testing.assert_array_equal(got, expected)
    assert got.shape[0] > 2 * 128 and 0.7 <= got.shape[1] / got.shape[0] <= 1.5  # a 2 x 2 card
    # not stored in streaming form, or no such sample: None
    assert render_stored(read, "eval", "val", 5, 0) is None
    assert render_stored(read, "eval", "val", 1, N) is None
    assert render_stored(read, "train", None, 0, 0) is None


def test_streamed_rows_carry_map_change_and_its_mean_metric(tracking_uri):
    client = MlflowClient()
    rid = run_epochs(3)
    table = Reader(tracking_uri).table(rid, "eval", "val")
    by_epoch = {}
    for row in table.rows:
        by_epoch.setdefault(row["epoch"], {})[row["sample_id"]] = row["map_change"]
    assert list(by_epoch[0].values()) == [None] * N  # nothing to compare with yet
    # The drift itself, from the maps the logger computed: 1 - corr(PC1 at e-1, PC1 at e).
    images, acts, labels = dataset()
    maps = [eigencam(acts * np.float32(1 + 0.1 * e) ** np.arange(6)[:, None, None], 2).maps[:, 0]
            for e in range(3)]
    ids = list(by_epoch[0])
    for e in (1, 2):
        expected = [map_change(maps[e - 1][i], maps[e][i]) for i in range(N)]
        assert [by_epoch[e][sid] for sid in ids] == pytest.approx(expected, abs=1e-3)
        assert any(v > 1e-4 for v in expected)  # the activations really drift
    history = metric_steps(client, rid, "eigencam/eval/val/map_change")
    assert [s for s, _ in history] == [1, 2]
    assert [v for _, v in history] == pytest.approx(
        [float(np.mean(list(by_epoch[e].values()))) for e in (1, 2)], abs=1e-5)


def test_streamed_map_change_of_large_activations_stays_finite(tracking_uri):
    # PC1 values of ~2e5 do not fit float16 (max 65504): the kept maps must be scaled first.
    images, acts, labels = dataset()
    big = [acts * np.float32(1e5), acts * np.float32(1e5) * (1 + 0.3 * np.arange(6, dtype=np.float32))[:, None, None]]
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=None, n_components=2, grid_max_rows=ROWS)
        for epoch, a in enumerate(big):
            logger.on_batch_end(images, a, labels, np.eye(3)[labels], mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        assert logger.flush(timeout=60)
        logger.close()
    rows = [r for r in Reader(tracking_uri).table(run.info.run_id, "eval", "val").rows if r["epoch"] == 1]
    maps = [eigencam(a, 2).maps[:, 0] for a in big]
    assert np.abs(maps[0]).max() > 65504
    expected = [map_change(maps[0][i], maps[1][i]) for i in range(N)]
    assert [r["map_change"] for r in rows] == pytest.approx(expected, abs=1e-3)
    assert all(np.isfinite(r["map_change"]) for r in rows)


def test_skipped_epochs_store_inputs_in_the_next_logged_one(tracking_uri):
    client = MlflowClient()
    rid = run_epochs(3, log_every_n_epochs=2)  # epochs 0 and 2 logged, 1 discarded
    read = reader(client, rid)
    assert render_stored(read, "eval", "val", 1, 0) is None
    for epoch in (0, 2):
        assert render_stored(read, "eval", "val", epoch, N - 1) is not None


def test_quantize_maps():
    m = np.array([[[[-1.0, 0.0], [0.5, 2.0]], [[-3.0, -1.0], [-2.0, -0.5]]]], np.float32)
    q = quantize_maps(m)
    assert q.dtype == np.uint8
    np.testing.assert_array_equal(q[0, 0], [[0, 0], [64, 255]])
    np.testing.assert_array_equal(q[0, 1], 0)


def test_memory_stays_flat_over_batches_and_epochs(tracking_uri):
    """Images go to files, not to lists: memory does not grow with the batches of an epoch
    (beyond a table row and index entry per sample), nor with the epochs. Measured in a
    fresh process: tracemalloc counts other tests' leftover threads too."""
    got = in_fresh_process(memory.streaming, tracking_uri,
                           mlflow.get_experiment_by_name("eigencam-tests").experiment_id)
    within, across = got["within"], got["across"]
    assert within[1] - within[0] < 1_500_000, within  # 272 rows and index entries, no pixels
    assert across[-1] - across[1] < 1_000_000, across
