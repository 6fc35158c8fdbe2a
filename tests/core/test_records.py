"""_records: an item as a spool record and back; the epoch grid travels as a recipe."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning, _spool
from mlflow_eigencam._records import Encoded, Item, compose_grids, item_from_record, item_to_record
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
    shapes = [tuple(shape) for _blob, shape in header["arrays"]]
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
    item = Item("bundle", "e" * 32, "sqlite:///x.db", files={"c.png": Encoded([PNGBand(card)])},
                metrics=[["k", 0.5, 1, 2]], grids={"g.png": {"epoch": 1, "mode": "eval",
                                                             "ds_id": "v", "cards": ["c.png"]}},
                once=["k", 1])
    header, blobs = item_to_record(item)
    path = _spool.write_record(tmp_path, "x.rec", header, blobs)
    back = item_from_record(path)
    assert back.grids == item.grids and back.once == ["k", 1] and back.metrics == item.metrics
    header["grids"] = {"g.png": {"epoch": 1, "mode": "eval", "ds_id": "v", "cards": ["../x.png"]}}
    bad = _spool.write_record(tmp_path, "y.rec", header, blobs)
    with pytest.raises(_spool.SpoolError, match="bad grid"):
        item_from_record(bad)
