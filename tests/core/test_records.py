"""_records: an item as a spool record and back; the epoch grid travels as a recipe."""

from __future__ import annotations

import io
import warnings

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning, _layout, _spool
from mlflow_eigencam._records import (Encoded, ForeignRecord, Item, compose_grids, item_from_record,
                                      item_to_record)
from mlflow_eigencam.render import PNGBand, encode_png, render_grid
from tests.helpers.oracle import blob_batch
from tests.helpers.readback import free_port, load_png


def load_card(item):
    """Pixels of the first card of a bundle, decoded when it was stored as PNG bytes."""
    with Image.open(io.BytesIO(_bytes(item.files["eigencam/eval/val/epoch_0000/sample_0.png"]))) as im:
        return np.asarray(im.convert("RGB"))


def _bytes(payload):
    return payload.data() if isinstance(payload, Encoded) else bytes(payload)


def _epoch(logger, epoch):
    for b in range(2):
        images, acts, labels, logits = blob_batch(seed=b)
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
    logger.on_epoch_end(epoch)


def test_a_record_holds_the_cards_pixels_once_and_no_grid_pixels(tmp_path):
    """The training thread neither draws the grid nor writes its pixels: the record has one
    pixel array per card and a recipe for the grid."""
    logger = EigenCAMLogger(n_samples=3, run_id="d" * 32, spool_dir=tmp_path,
                            tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.warns(EigenCAMWarning):
        _epoch(logger, 0)
        left = logger.close(timeout=0.2)
    bundles = [r for r in left.records if item_from_record(r).kind == "bundle"]
    assert len(bundles) == 1
    header, _data, _blobs = _spool.read_record(bundles[0])
    grid = "eigencam/eval/val/epoch_0000/grid.png"
    assert grid not in header["files"]
    assert header["grids"] == {grid: {"epoch": 0, "mode": "eval", "ds_id": "val", "cards": [
        f"eigencam/eval/val/epoch_0000/sample_{i}.png" for i in range(3)]}}
    # At most one pixel array per card (PNG, preview and card share it; a card the sender
    # encoded before the record was written is stored as PNG bytes), none the grid's size.
    # (Beside them: the overlays' raw inputs, once per run, and the epoch's maps.)
    overlay = {n for path, f in header["files"].items() for n in f.get("png", [])
               if "/inputs/" in path or path.endswith("/maps.png")}
    assert len(overlay) == 3 + 1
    shapes = [tuple(shape) for n, (_blob, shape) in enumerate(header["arrays"]) if n not in overlay]
    assert len(shapes) <= 3 and len(set(shapes)) <= 1, shapes
    if shapes:
        card = load_card(item_from_record(bundles[0]))
        assert shapes[0] == card.shape
    item = item_from_record(bundles[0])
    compose_grids(item)
    assert grid in item.files and item.grids is None


def test_the_logged_grid_is_the_grid_of_the_logged_cards(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=3)
        _epoch(logger, 0)
        assert logger.close() == 0
    rid = run.info.run_id
    cards = [load_png(client, rid, f"eigencam/eval/val/epoch_0000/sample_{i}.png") for i in range(3)]
    grid = load_png(client, rid, "eigencam/eval/val/epoch_0000/grid.png")
    assert np.array_equal(grid, render_grid(cards, epoch=0, mode="eval", ds_id="val"))


def test_cards_encoded_before_spooling_are_decoded_for_the_grid():
    cards = [np.full((6, 5, 3), 40 * i, np.uint8) for i in range(1, 4)]
    files = {"a.png": Encoded([PNGBand(cards[0])]), "b.png": encode_png(cards[1]),
             "c.png": Encoded(cards[2])}
    item = Item("bundle", None, None, files=files,
                grids={"g.png": {"epoch": 2, "mode": "eval", "ds_id": None,
                                 "cards": ["a.png", "b.png", "c.png"]}})
    compose_grids(item)
    with Image.open(io.BytesIO(item.files["g.png"].data())) as im:
        drawn = np.asarray(im.convert("RGB"))
    assert np.array_equal(drawn, render_grid(cards, epoch=2, mode="eval", ds_id=None))


def test_a_record_round_trips_and_bad_grids_are_refused(tmp_path):
    card = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    c, g, k = (_layout.card_path("eval", "v", 1, 0), _layout.grid_path("eval", "v", 1),
               _layout.metric_key("eval", "v", 1))
    item = Item("bundle", "e" * 32, "sqlite:///x.db", files={c: Encoded([PNGBand(card)])},
                metrics=[[k, 0.5, 1, 2]], grids={g: {"epoch": 1, "mode": "eval",
                                                     "ds_id": "v", "cards": [c]}},
                once=[k, 1])
    header, blobs = item_to_record(item)
    path = _spool.write_record(tmp_path, "x.rec", header, blobs)
    back = item_from_record(path)
    assert back.grids == item.grids and back.once == [k, 1] and back.metrics == item.metrics
    header["grids"] = {g: {"epoch": 1, "mode": "eval", "ds_id": "v", "cards": ["../x.png"]}}
    bad = _spool.write_record(tmp_path, "y.rec", header, blobs)
    with pytest.raises(_spool.SpoolError, match="bad grid"):
        item_from_record(bad)


def test_every_path_key_and_tag_the_logger_builds_is_its_own_and_nothing_else_is():
    own_paths = [_layout.grid_path("eval", "val", 3), _layout.card_path("eval", None, 0, 2),
                 _layout.table_path("train", "a b"), _layout.stream_maps_path("eval", "v", 12),
                 _layout.stream_inputs_path("eval", "v", "0123456789ab"),
                 _layout.table_part_path("test", "v", 7, 1700000000000, "0123abcd4567"),
                 _layout.input_path("eval", "val", "0123456789ab"),
                 _layout.input_path("eval", None, "a sample/../id"),
                 _layout.overlay_maps_path("eval", "val", 3),
                 _layout.overlay_maps_path("eval", "val", 3, "backbone.layer4"),
                 *_layout.image_series_files(_layout.image_key("eval", "a/b", 4), 3, 1700000000000,
                                             "2b3c4d5e-0000-4000-8000-123456789abc")]
    assert all(_layout.is_own_artifact_path(p) for p in own_paths), own_paths
    for p in ["model/MLmodel", "model/model.pkl", "eigencam/../model/MLmodel", "eigencam/x",
              "eigencam/eval/val/.hidden", "images/accuracy+step+1+timestamp+1+u.png",
              "/eigencam/eval/val/grid.png", "eigencam/eval/val/epoch_0001/../../../x.png"]:
        assert not _layout.is_own_artifact_path(p), p
    assert _layout.is_own_metric_key(_layout.metric_key("eval", "val", 2))
    assert _layout.is_own_metric_key(_layout.map_change_key("eval", None))
    assert not _layout.is_own_metric_key("accuracy")
    assert not _layout.is_own_metric_key("eigencam/eval/val/accuracy")
    for tag in [_layout.TAG_VERSION, _layout.TAG_DS_ID, _layout.MLFLOW_LOGGED_IMAGES]:
        assert _layout.is_own_tag_key(tag)
    for tag in ["mlflow.user", "mlflow.source.name", _layout.MLFLOW_LOGGED_ARTIFACTS, "team"]:
        assert not _layout.is_own_tag_key(tag)
    assert _layout.user_tag_problem("team") is None
    assert "namespace" in _layout.user_tag_problem("mlflow.user")
    assert "MLflow accepts" in _layout.user_tag_problem("bad key!")


def _planted(rid):
    """A bundle built by the package's own writer for ``rid``: the logger's own files plus a
    model file, MLflow's tags and a metric the logger never writes."""
    card = np.full((8, 8, 3), 200, np.uint8)
    own = _layout.card_path("eval", "val", 0, 0)
    return Item("bundle", rid, None,
                files={own: Encoded([PNGBand(card)]), "model/MLmodel": b"flavors: {evil: {}}",
                       "model/model.pkl": b"pickle"},
                metrics=[[_layout.metric_key("eval", "val", 1), 0.5, 0, 1], ["accuracy", 1.0, 0, 1]],
                tags={"mlflow.user": "mallory", "mlflow.source.name": "evil.py",
                      _layout.MLFLOW_LOGGED_IMAGES: "True"})


def _write_planted(folder, rid):
    header, blobs = item_to_record(_planted(rid))
    return _spool.write_record(folder, "00000000000000000000-planted-000000.rec", header, blobs)


def test_a_planted_record_is_refused_by_send_spool_and_nothing_of_it_reaches_the_run(
        tracking_uri, capsys):
    from mlflow_eigencam.cli import main as cli_main

    client = MlflowClient()
    with mlflow.start_run() as run:
        mlflow.set_tag("mlflow.user", "alice")
    rid = run.info.run_id
    before = client.get_run(rid).data
    logger = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.warns(EigenCAMWarning):
        _epoch(logger, 0)
        assert logger.close(timeout=0.3) == 2
    folder = logger.spool_dir
    planted = _write_planted(folder, rid)
    with pytest.raises(ForeignRecord, match="model/MLmodel"):
        item_from_record(planted)
    assert cli_main(["send-spool", str(folder), "--tracking-uri", tracking_uri,
                     "--retarget"]) == 1  # the real records went; the planted one is counted
    out = capsys.readouterr().out
    assert "planted" in out and "refused" in out and "model/MLmodel" in out, out
    assert (folder / "failed" / planted.name).is_file()
    assert "mlflow.user" in (folder / "failed" / (planted.name[:-4] + ".err")).read_text()
    data = client.get_run(rid).data
    assert data.tags["mlflow.user"] == "alice"
    assert data.tags.get("mlflow.source.name") == before.tags.get("mlflow.source.name")
    assert "accuracy" not in data.metrics
    assert [f.path for f in client.list_artifacts(rid, "model")] == []
    assert "eigencam/eval/val/evr_1" in data.metrics  # the logger's own records arrived


def test_a_planted_record_taken_over_by_a_live_logger_is_refused_and_reported(tracking_uri):
    """A new logger on the run takes over leftover folders: a planted record there is set
    aside, named in a warning and in close()'s count, and nothing of it is sent."""
    client = MlflowClient()
    with mlflow.start_run() as run:
        pass
    rid = run.info.run_id
    dead = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=tracking_uri)
    dead._resolve_run(first_use=True)
    folder = dead._sink._keeper.ensure_folder()
    _write_planted(folder, rid)
    dead._sink._keeper.folder_lock.release()  # as if its process had died
    logger = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=tracking_uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _epoch(logger, 0)
        left = logger.close(timeout=60)
    said = [str(w.message) for w in caught if w.category is EigenCAMWarning]
    assert any(f"refused a record found in {folder}" in m and "model/MLmodel" in m
               for m in said), said
    assert left == 1 and len(left.set_aside) == 1 and left.set_aside[0].parent.name == "failed"
    assert "set aside" in left.message()
    data = client.get_run(rid).data
    assert "accuracy" not in data.metrics
    assert data.tags.get("mlflow.source.name") != "evil.py"
    assert data.tags.get("mlflow.user") != "mallory"
    assert [f.path for f in client.list_artifacts(rid, "model")] == []
    assert "eigencam/eval/val/evr_1" in data.metrics


def test_a_bad_extra_tags_key_is_left_out_alone(tracking_uri):
    """One key MLflow rejects made it reject the whole tags record, and with it every run tag
    of the package; a key in MLflow's namespace would make the sender refuse the record.
    Each such key is now left out alone, with a warning that names it."""
    with pytest.warns(EigenCAMWarning) as caught:
        logger = EigenCAMLogger(n_samples=2, extra_tags={"team": "vision", "bad key!": "x",
                                                         "mlflow.user": "me"})
    said = " ".join(str(w.message) for w in caught)
    assert "'bad key!'" in said and "'mlflow.user'" in said and "'team'" not in said
    with mlflow.start_run() as run:
        _epoch(logger, 0)
        assert logger.close() == 0
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["team"] == "vision" and _layout.TAG_VERSION in tags
    assert "bad key!" not in tags and tags.get("mlflow.user") != "me"
