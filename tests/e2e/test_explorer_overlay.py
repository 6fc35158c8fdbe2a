"""The explorer's overlay view in Chromium against a real ``mlflow server``: the page
composites the raw input, one component's map and the boxes on a canvas, from the files the
logger logged (``tests/helpers/overlay_runs.py``: a small detector run).

What is checked is what a user sees: the canvas's pixels (opacity 0 and no boxes: the raw
input; each box toggle and the component picker change them) and the files the explorer
serves (the logged input and maps). Needs playwright and Chromium, as ``test_explorer.py``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from mlflow_eigencam import _layout
from tests.helpers.overlay_runs import CLASSES, K, N_SAMPLES, log_detector_run
from tests.helpers.readback import MlflowServer, free_port

pytestmark = pytest.mark.timeout(300)


class World:
    def __init__(self, uri: str, url: str, run_id: str, images: np.ndarray, old: str) -> None:
        self.uri, self.url, self.run_id, self.images, self.old = uri, url, run_id, images, old


def _log(mlflow) -> tuple:
    from mlflow_eigencam import EigenCAMLogger

    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=K, n_samples=N_SAMPLES, label_mapping=list(CLASSES))
        images = log_detector_run(logger)
        assert logger.flush(timeout=60)
        logger.close()
    return run.info.run_id, images


def _as_before_overlays(mlflow, rid: str) -> None:
    """Rewrite a run's table files without the ``overlay`` column: a run logged before
    overlays existed."""
    from mlflow_eigencam import _table

    client = mlflow.MlflowClient()
    prefix = _layout.prefix("eval", "val")
    paths = [f.path for f in client.list_artifacts(rid, f"{prefix}/table")] + [f"{prefix}/samples.json"]
    for path in paths:
        table = _table.loads(Path(client.download_artifacts(rid, path)).read_bytes())
        at = table["columns"].index(_layout.TABLE_OVERLAY_COLUMN)
        table = {"columns": table["columns"][:at] + table["columns"][at + 1:],
                 "data": [r[:at] + r[at + 1:] for r in table["data"]]}
        client.log_text(rid, _table.dumps(table).decode("utf-8"), path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    import mlflow

    from mlflow_eigencam.explorer import make_server_for

    server = MlflowServer(tmp_path_factory.mktemp("overlay") / "server")
    server.start()
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_experiment("overlay")
        rid, images = _log(mlflow)
        old, _ = _log(mlflow)
        _as_before_overlays(mlflow, old)
        httpd = make_server_for(server.uri, "127.0.0.1", free_port())
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield World(server.uri, f"http://127.0.0.1:{httpd.server_port}/", rid, images, old)
        finally:
            httpd.shutdown()
            httpd.server_close()
    finally:
        mlflow.set_tracking_uri(previous)
        server.stop()




def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB") if im.mode in ("RGBA", "P") else im)


def test_the_served_input_and_maps_are_the_logged_ones(world):
    from mlflow_eigencam._reader import Reader

    reader = Reader(world.uri)
    for index in range(N_SAMPLES):
        q = f"run={world.run_id}&mode=eval&ds_id=val&epoch=1&index={index}"
        row = json.loads(_get(f"{world.url}api/overlay?{q}"))
        assert np.array_equal(_png(_get(f"{world.url}api/input?{q}")), world.images[index])
        logged = _png(reader.read(world.run_id, _layout.overlay_maps_path("eval", "val", 1)))
        k, h, w = row["layers"][""]
        assert (k, h, w) == (K, 8, 8)
        served = _png(_get(f"{world.url}api/maps?{q}"))
        assert np.array_equal(served, logged[index * k * h:(index + 1) * k * h])
        assert len(row["pred"]) == len(row["true"]) == 1


def _canvas(page) -> np.ndarray:
    url = page.eval_on_selector("#grid tbody canvas.overlay", "c => c.toDataURL('image/png')")
    return _png(base64.b64decode(url.split(",", 1)[1]))


def _drawn(page, expected: str) -> None:
    """Wait until the first overlay canvas was drawn with these settings."""
    try:
        page.wait_for_function(
            "e => { const c = document.querySelector('#grid tbody canvas.overlay');"
            " return c && c.dataset.drawn === e; }", arg=expected, timeout=10_000)
    except Exception as exc:
        seen = page.evaluate("() => [...document.querySelectorAll('#grid tbody canvas.overlay')]"
                             ".map(c => c.dataset.drawn)")
        raise AssertionError(f"canvas not drawn as {expected!r}; canvases: {seen}") from exc


def _toggle(page, which: str, on: bool) -> None:
    if page.is_checked(f"#ov-{which}") != on:
        page.click(f"#ov-{which}")


def _opacity(page, percent: int) -> None:
    page.eval_on_selector("#ov-opacity", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }",
                          percent)


def test_toggles_opacity_and_component_change_the_composited_pixels(world, page):
    page.goto(world.url + f"?runs={world.run_id}&mode=eval&ds_id=val&epoch=1")
    page.wait_for_selector("body[data-ready='1']")
    page.click("#ov-on")
    _drawn(page, "heat|pred|true|0.5|1|")
    index = page.eval_on_selector("#grid tbody canvas.overlay", "c => c._ov.row.index")
    raw = world.images[index]
    everything = _canvas(page)
    assert everything.shape == raw.shape and not np.array_equal(everything, raw)

    # Opacity 0, no boxes: exactly the raw input's pixels.
    _toggle(page, "pred", False)
    _toggle(page, "true", False)
    _opacity(page, 0)
    _drawn(page, "|||0|1|")
    assert np.array_equal(_canvas(page), raw)

    # Each box toggle draws its boxes (and only changes pixels on their outlines' rows).
    _toggle(page, "true", True)
    _drawn(page, "||true|0|1|")
    with_true = _canvas(page)
    assert not np.array_equal(with_true, raw)
    _toggle(page, "true", False)
    _toggle(page, "pred", True)
    _drawn(page, "|pred||0|1|")
    with_pred = _canvas(page)
    assert not np.array_equal(with_pred, raw) and not np.array_equal(with_pred, with_true)

    # The heat map at full opacity, then another component: other pixels.
    _toggle(page, "pred", False)
    _opacity(page, 100)
    _drawn(page, "heat|||1|1|")
    pc1 = _canvas(page)
    assert not np.array_equal(pc1, raw)
    page.select_option("#component", "2")
    _drawn(page, "heat|||1|2|")
    pc2 = _canvas(page)
    assert not np.array_equal(pc2, pc1)
    # Heat off: the input again, whatever the opacity.
    _toggle(page, "heat", False)
    _drawn(page, "|||1|2|")
    assert np.array_equal(_canvas(page), raw)

    # A deep link keeps the overlay view and its settings.
    assert all(p in page.url for p in ("overlay=1", "ov_off=heat,pred,true", "ov_opacity=100",
                                       "component=2")), page.url
    page.goto(page.url)
    page.wait_for_selector("body[data-ready='1']")
    _drawn(page, "|||1|2|")
    assert page.is_checked("#ov-on") and not page.is_checked("#ov-heat")
    assert page.eval_on_selector("#ov-opacity", "e => e.value") == "100"


def test_rows_logged_before_overlays_keep_their_card(world, page):
    page.goto(world.url + f"?runs={world.run_id},{world.old}&mode=eval&ds_id=val&epoch=1")
    page.wait_for_selector("body[data-ready='1']")
    page.click("#ov-on")
    new, old = (f"#grid tbody td[data-run='{r}']" for r in (world.run_id, world.old))
    page.wait_for_function("s => document.querySelectorAll(s).length === " + str(N_SAMPLES),
                           arg=f"{old} .cell img")
    assert page.locator(f"{old} canvas").count() == 0
    assert page.locator(f"{new} canvas.overlay").count() == N_SAMPLES
    # The old rows have no overlay to serve.
    q = f"run={world.old}&mode=eval&ds_id=val&epoch=1&index=0"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{world.url}api/overlay?{q}", timeout=30)
    assert err.value.code == 404


def test_zoom_and_pan_apply_to_the_overlay_canvases(world, page):
    page.goto(world.url + f"?runs={world.run_id}&mode=eval&ds_id=val&epoch=1&overlay=1")
    page.wait_for_selector("body[data-ready='1']")
    _drawn(page, "heat|pred|true|0.5|1|")
    row = page.locator("#grid tbody tr.sample").nth(0)
    page.wait_for_function("() => document.querySelector('#grid tbody tr.sample .ov.crop')")
    wrap = row.locator(".ov.crop").first
    before = wrap.screenshot()
    box = wrap.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.wheel(0, -300)
    page.wait_for_function("() => document.querySelector('#grid tbody tr.sample').dataset.zoom > 1")
    # Every panel of the row, the input and each composited canvas, shows the same closer look.
    views = row.locator(".crop").evaluate_all("cs => cs.map(c => [c.className, c.dataset.zoom, c.dataset.view])")
    canvases = [v for v in views if "ov" in v[0].split()]
    assert canvases and len(canvases) == row.locator("canvas.overlay").count()
    assert len({tuple(v[1:]) for v in views}) == 1 and float(views[0][1]) > 2
    assert wrap.screenshot() != before  # the canvas is drawn larger, cut to its cell
    cv = row.locator("canvas.overlay").first.bounding_box()
    assert cv["width"] > 2 * box["width"] and wrap.bounding_box()["width"] == box["width"]
    # A drag pans the canvases with the rest of the row; the row's reset shows them whole.
    page.mouse.move(box["x"] + 60, box["y"] + 60)
    page.mouse.down()
    page.mouse.move(box["x"] + 30, box["y"] + 40, steps=4)
    page.mouse.up()
    panned = row.locator(".crop").evaluate_all("cs => cs.map(c => c.dataset.view)")
    assert len(set(panned)) == 1 and panned[0] != views[0][2]
    row.locator(".unzoom").click()
    assert set(row.locator(".crop").evaluate_all("cs => cs.map(c => c.dataset.zoom)")) == {"1.000"}
    assert row.locator("canvas.overlay").first.bounding_box()["width"] == box["width"]
