"""What the logger logs for the explorer's overlays (a real sqlite store): each raw input once
per run, each epoch's maps at the layer's own resolution, the boxes as data in the row; and
the explorer's routes that serve them, behind the same read check as the cards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

from mlflow_eigencam import EigenCAMLogger, _layout
from mlflow_eigencam._reader import Reader
from mlflow_eigencam.explorer import Explorer
from mlflow_eigencam.explorer._server import MAY_READ
from tests.helpers.explorer_page import wsgi_get as _get
from tests.helpers.overlay_runs import CLASSES, EPOCHS, K, N_SAMPLES, log_detector_run


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)




def _run(epochs: int = EPOCHS):
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=K, n_samples=N_SAMPLES, label_mapping=list(CLASSES))
        images = log_detector_run(logger, epochs=epochs)
        assert logger.flush(timeout=60)
        logger.close()
    return run.info.run_id, images


def test_inputs_once_and_maps_per_epoch_with_their_shapes(tracking_uri):
    rid, images = _run()
    reader = Reader(tracking_uri)
    table = reader.table(rid, "eval", "val")
    assert len(table.rows) == EPOCHS * N_SAMPLES
    for row in table.rows:
        cell = row[_layout.TABLE_OVERLAY_COLUMN]
        i, epoch = int(row["sample_index"]), int(row["epoch"])
        assert cell["at"] == i and cell["layers"] == {"": [K, 8, 8]}  # the layer's 8 x 8 grid
        # The raw input, as logged: the image the logger kept (uint8 RGB).
        raw = reader.read(rid, _layout.input_path("eval", "val", row["sample_id"]))
        assert np.array_equal(_png(raw), images[i])
        # Boxes as data: the truth, and the prediction (shifted 3 px) with its score.
        (tx1, ty1, tx2, ty2, tname), = cell["true"]
        (px1, py1, px2, py2, pname, score), = cell["pred"]
        assert tname == pname and tname in CLASSES
        assert [px1 - tx1, py2 - ty2] == [3, 3] and score == 0.9
        # Its maps: rows (i * k + c) * h of the epoch's grayscale PNG, each peaking at 255.
        maps = _png(reader.read(rid, _layout.overlay_maps_path("eval", "val", epoch)))
        assert maps.dtype == np.uint8 and maps.shape == (N_SAMPLES * K * 8, 8)
        mine = maps[i * K * 8:(i + 1) * K * 8].reshape(K, 8, 8)
        assert [int(m.max()) for m in mine] == [255] * K
    inputs = reader.listing(rid, f"{_layout.prefix('eval', 'val')}/inputs")
    assert len(inputs) == N_SAMPLES


def test_an_input_is_not_logged_again_at_later_epochs(tracking_uri):
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=K, n_samples=N_SAMPLES, label_mapping=list(CLASSES))
        log_detector_run(logger, epochs=1)
        assert logger.flush(timeout=60)
        # Remove the logged inputs from the store: a later epoch that sent them again
        # would bring them back.
        root = Path(mlflow.get_artifact_uri().replace("file://", ""))
        folder = root / _layout.prefix("eval", "val") / "inputs"
        assert len(list(folder.iterdir())) == N_SAMPLES
        for f in folder.iterdir():
            f.unlink()
        log_detector_run(logger, epochs=1, start=1)
        assert logger.flush(timeout=60)
        logger.close()
    assert list(folder.iterdir()) == []
    assert (root / _layout.overlay_maps_path("eval", "val", 1)).is_file()  # maps: every epoch
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics  # the run logged


def test_routes_serve_what_was_logged_and_only_to_readers(tracking_uri):
    rid, images = _run(epochs=1)
    app = Explorer(tracking_uri)
    q = f"run={rid}&mode=eval&ds_id=val&epoch=0&index=1"
    status, body = _get(app, "/api/input", q)
    assert status == 200 and np.array_equal(_png(body), images[1])
    status, body = _get(app, "/api/maps", q)
    assert status == 200 and _png(body).shape == (K * 8, 8)
    status, body = _get(app, "/api/overlay", q)
    assert status == 200 and json.loads(body)["layers"] == {"": [K, 8, 8]}
    assert _get(app, "/api/maps", q + "&layer=nope")[0] == 404
    # A user who may not read the experiment gets no input, map or boxes.
    for route in ("/api/input", "/api/maps", "/api/overlay"):
        status, body = _get(app, route, q, **{MAY_READ: lambda eid: False})
        assert status == 404 and b"that you may read" in body, route
