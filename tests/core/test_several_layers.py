"""EigenCAMLogger with several layers (``activations={layer: array}``): one card row per
layer, the first layer's table columns and metrics as with one layer, each further layer's
under its own prefix (``late/evr_1``, ``eigencam/eval/val/late/evr_1``), its own signals."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger, _layout
from mlflow_eigencam.compare import compare
from mlflow_eigencam.eigencam import eigencam
from mlflow_eigencam.explorer import Explorer
from mlflow_eigencam.images import to_rgb_uint8
from mlflow_eigencam.render import card_geometry, render_card
from tests.helpers.oracle import low_rank
from tests.helpers.readback import load_json, load_png, metric_steps

N, K = 3, 2  # kept samples, components


def _data(seed=0):
    """Images (4, 3, 32, 32) float32, an early layer (4, 4, 16, 16), a late one (4, 8, 4, 4)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, size=(4, 3, 32, 32)).astype(np.float32)
    return images, low_rank(rng, 4, 4, 16, 16), low_rank(rng, 4, 8, 4, 4), np.arange(4) % 2


def _rows(client, rid):
    table = load_json(client, rid, "eigencam/eval/val/samples.json")
    return table["columns"], [dict(zip(table["columns"], r)) for r in table["data"]]


def _crop(png, box):
    x, y, w, h = box
    return png[y:y + h, x:x + w]


def test_two_layers_share_one_card_and_table_with_their_own_columns_and_metrics(tracking_uri, tmp_path):
    client = MlflowClient()
    images, early, late, labels = _data()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=K, n_samples=N)
        for epoch in range(2):
            for rows in (slice(0, 2), slice(2, 4)):  # the 4th sample is not kept
                logger.on_batch_end(images[rows], {"early": early[rows], "late": late[rows]},
                                    labels[rows], labels[rows], mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        assert logger.close() == 0
    rid = run.info.run_id

    columns, rows = _rows(client, rid)
    assert columns == ["epoch", "sample_index", "sample_id", "label", "prediction", "correct",
                       "evr_1", "evr_2", "map_change", "fixation", "late/evr_1", "late/evr_2",
                       "late/map_change", "overlay", "card", "image"]
    # The explorer's overlays get each layer's maps: maps.png (the first), maps-late.png.
    assert rows[0]["overlay"]["layers"] == {"": [K, 16, 16], "late": [K, 4, 4]}
    epoch_dir = _layout.epoch_dir("eval", "val", 0)
    listed = {f.path for f in client.list_artifacts(rid, epoch_dir)}
    assert {f"{epoch_dir}/maps.png", f"{epoch_dir}/maps-late.png"} <= listed
    assert [(r["epoch"], r["sample_index"]) for r in rows] == [(e, i) for e in (0, 1) for i in range(N)]
    want = {"early": eigencam(early[:N], K), "late": eigencam(late[:N], K)}
    for r in rows:
        i = r["sample_index"]
        np.testing.assert_allclose([r["evr_1"], r["evr_2"]],
                                   want["early"].explained_variance_ratio[i], atol=1e-5)
        np.testing.assert_allclose([r["late/evr_1"], r["late/evr_2"]],
                                   want["late"].explained_variance_ratio[i], atol=1e-5)
        # Same activations at both epochs: no drift, in either layer.
        if r["epoch"] == 0:
            assert r["map_change"] is None and r["late/map_change"] is None
        else:
            assert r["map_change"] == pytest.approx(0, abs=1e-3)
            assert r["late/map_change"] == pytest.approx(0, abs=1e-3)

    # The card: row 1 the input and the early layer's panels, row 2 the late layer's; each
    # panel the same pixels as a one-layer card of that layer draws.
    r = rows[N + 1]
    geo = r["card"]
    assert geo["titles"] == ["input", "early PC1", "early PC2", "late PC1", "late PC2"]
    boxes = geo["boxes"]
    assert boxes[0][1] == boxes[1][1] == boxes[2][1] < boxes[3][1] == boxes[4][1]
    assert boxes[3][0] == boxes[1][0] and boxes[4][0] == boxes[2][0]
    png = load_png(client, rid, r["image"])
    assert list(png.shape[:2]) == geo["size"]
    assert geo == card_geometry((32, 32), K, layers=[("early", K), ("late", K)])
    i = r["sample_index"]
    image = to_rgb_uint8(images[i], "CHW")
    one = {name: render_card(image, res.maps[i], sample_id=r["sample_id"]) for name, res in want.items()}
    one_boxes = card_geometry((32, 32), K)["boxes"]
    np.testing.assert_array_equal(_crop(png, boxes[0]), _crop(one["early"], one_boxes[0]))
    for c in range(K):
        for name, at in (("early", 1 + c), ("late", 1 + K + c)):
            got = _crop(png, boxes[at]).astype(int)
            ref = _crop(one[name], one_boxes[1 + c]).astype(int)
            assert np.abs(got - ref).max() <= 1, (name, c)  # float32 vs a second SVD call
    assert not np.array_equal(_crop(png, boxes[1]), _crop(png, boxes[3]))  # two layers, two maps

    # Metrics: the first layer's keys as with one layer; the late layer's under its segment.
    for c in (1, 2):
        assert [s for s, _ in metric_steps(client, rid, f"eigencam/eval/val/evr_{c}")] == [0, 1]
        late_evr = metric_steps(client, rid, f"eigencam/eval/val/late/evr_{c}")
        assert [s for s, _ in late_evr] == [0, 1]
        assert late_evr[0][1] == pytest.approx(want["late"].explained_variance_ratio[:, c - 1].mean(), abs=1e-5)
    assert [s for s, _ in metric_steps(client, rid, "eigencam/eval/val/map_change")] == [1]
    assert [s for s, _ in metric_steps(client, rid, "eigencam/eval/val/late/map_change")] == [1]
    tags = client.get_run(rid).data.tags
    assert tags[_layout.TAG_TARGET_LAYER] == "early, late"

    # compare reads the run: the first layer's panels, every card found.
    result = compare(rid, out=tmp_path / "cmp.png", ds_id="val", component=2)
    assert result.columns == [(rid, 0), (rid, 1)] and len(result.matched) == N
    assert not [n for n in result.notes if "missing" in n.lower()]
    # The explorer's data view of the run: every row, the first layer's columns.
    seen = []
    body = b"".join(Explorer(tracking_uri)(
        {"PATH_INFO": "/api/data", "QUERY_STRING": f"runs={rid}&mode=eval&ds_id=val",
         "REQUEST_METHOD": "GET", "SCRIPT_NAME": ""}, lambda status, headers: seen.append(status)))
    assert seen[0].startswith("200"), body[:300]
    view = json.loads(body)["runs"][0]
    assert "error" not in view and len(view["rows"]) == 2 * N


def test_one_layer_as_a_mapping_is_the_one_layer_layout(tracking_uri):
    client = MlflowClient()
    images, early, _, labels = _data()
    got = {}
    for name, acts in (("array", early), ("mapping", {"early": early})):
        with mlflow.start_run() as run:
            logger = EigenCAMLogger(n_components=K, n_samples=N, target_layer="early")
            logger.on_batch_end(images, acts, labels, labels, mode="eval", ds_id="val")
            logger.on_epoch_end(0)
            logger.close()
        columns, rows = _rows(client, run.info.run_id)
        png = load_png(client, run.info.run_id, rows[0]["image"])
        got[name] = (columns, rows[0]["card"], png, sorted(client.get_run(run.info.run_id).data.metrics))
    assert got["array"][:2] == got["mapping"][:2]
    np.testing.assert_array_equal(got["array"][2], got["mapping"][2])
    assert got["array"][3] == got["mapping"][3]


def test_each_layer_has_its_own_signals(tracking_uri):
    client = MlflowClient()
    images, early, late, labels = _data()
    boxes = [np.array([[0, 0, 16, 16]])] * 4
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=K, n_samples=N)
        logger.on_batch_end(images, {"early": early, "late": late}, labels, labels, boxes=boxes,
                            faithfulness={"early": [0.5] * 4, "late": [0.25, 0.25, None, 0.0]},
                            mode="eval", ds_id="val")
        logger.on_epoch_end(0)
        logger.close()
    rid = run.info.run_id
    columns, rows = _rows(client, rid)
    for name in ("localization", "pointing_game", "faithfulness"):
        assert name in columns and f"late/{name}" in columns
    assert [r["faithfulness"] for r in rows] == [0.5] * N
    assert [r["late/faithfulness"] for r in rows] == [0.25, 0.25, None]
    assert all(0 <= r["late/localization"] <= 1 for r in rows)
    metrics = client.get_run(rid).data.metrics
    assert metrics["eigencam/eval/val/faithfulness"] == pytest.approx(0.5)
    assert metrics["eigencam/eval/val/late/faithfulness"] == pytest.approx(0.25)
    assert "eigencam/eval/val/late/localization" in metrics
    assert "eigencam/eval/val/late/pointing_game" in metrics


def test_layers_must_stay_the_same_and_need_a_cap(tracking_uri):
    images, early, late, labels = _data()
    logger = EigenCAMLogger(n_components=K, n_samples=N, strict=True)
    logger.on_batch_end(images[:1], {"early": early[:1], "late": late[:1]}, mode="eval")
    with pytest.raises(ValueError, match=r"\['early'\].*\['early', 'late'\]"):
        logger.on_batch_end(images[:1], {"early": early[:1]}, mode="eval")
    with pytest.raises(ValueError, match="late.*got shape"):
        logger.on_batch_end(images[:2], {"early": early[:2], "late": late[:1]}, mode="eval")
    stream = EigenCAMLogger(n_samples=None, strict=True)
    with pytest.raises(ValueError, match="several layers need a capped n_samples"):
        stream.on_batch_end(images[:1], {"early": early[:1], "late": late[:1]}, mode="eval")
    assert logger.close() == 0 and stream.close() == 0


def test_layer_metric_keys_are_the_loggers_own():
    key = _layout.layer_metric_key("eval", "val", "blocks.3/norm", "evr_1")
    assert key.startswith("eigencam/eval/val/blocks_3_norm-") and key.endswith("/evr_1")
    assert _layout.is_own_metric_key(key)
    assert _layout.is_own_metric_key(_layout.layer_metric_key("eval", None, "layer4", "map_change"))
    assert not _layout.is_own_metric_key("eigencam/eval/val/layer4/accuracy")
    assert not _layout.is_own_metric_key("eigencam/eval/val/a/b/evr_1")
    assert _layout.layer_column("layer4", "evr_2") == "layer4/evr_2"
    assert _layout.layer_metric_key("eval", "val", "layer4.1.conv2", "evr_1") == \
        "eigencam/eval/val/layer4.1.conv2/evr_1"
    assert _layout.is_own_metric_key("eigencam/eval/val/layer4.1.conv2/evr_1")
    for bad in (".", "..", ".hidden"):
        assert not _layout.layer_segment(bad).startswith(".")
        assert not _layout.is_own_metric_key(f"eigencam/eval/val/{bad}/evr_1")
