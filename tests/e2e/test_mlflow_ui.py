"""The MLflow UI in a real browser: a run logged into `mlflow server` shows the EigenCAM images.

The test starts `mlflow server` on 127.0.0.1, logs a run into it (the PyTorch quickstart, or a
numpy-only logger script when that example is missing or fails), opens the run in headless
Chromium and checks what a user would do:

* the "Model metrics" tab has a section titled ``eigencam/{mode}/{ds}`` with one image chart per
  sample key, and moving a chart's step slider shows another epoch's image (the ``src`` names the
  new step and the pixels differ);
* the "Artifacts" tab expands ``eigencam/{mode}/{ds}/epoch_0000`` and previews ``grid.png`` at
  the size it was logged.

The run gets the parameters ``mlflow.pytorch.autolog`` logs (they share the page with the
charts), and the sample's card must be displayed at least ~200 x 180 CSS px, near square.

It saves the two screenshots the docs use (``docs/images/mlflow_ui_images.png`` and
``docs/images/mlflow_ui_grid.png``) only when ``MLFLOW_EIGENCAM_DOCS_SCREENSHOTS=1``;
otherwise they go to the test's tmp dir, so that a test run does not change tracked files.

Needs the ``playwright`` package and a Chromium binary (``/usr/bin/chromium``, or
``$MLFLOW_EIGENCAM_CHROMIUM``); never runs ``playwright install``. Without them the test skips,
unless ``MLFLOW_EIGENCAM_REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Tuple
from urllib.parse import unquote

import numpy as np
import pytest

from tests.helpers.readback import image_series, list_all, load_png

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pytorch_quickstart.py"
FALLBACK = ROOT / "tests" / "helpers" / "logger_run.py"
DOCS_IMAGES = ROOT / "docs" / "images"
VIEWPORT = {"width": 1400, "height": 900}
EPOCHS = 3
# The UI is a large single-page app; its first load on a busy 2-core machine can take a while.
UI_TIMEOUT_MS = 60_000
# Set before the app's scripts run: the "Model training" view (not GenAI), and no assistant
# panel opening over a third of the page on the first visit. Unknown keys are harmless, so a
# later MLflow that renames them only makes the screenshots busier.
INIT_SCRIPT = """
try {
  localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
} catch (e) {}
"""

pytestmark = pytest.mark.timeout(420)


def _log_run(uri: str, tmp_path: Path) -> Tuple[str, str, str]:
    """Log a 3-epoch run into the server; returns (experiment_id, run_id, what logged it)."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri,
               MLFLOW_EIGENCAM_SPOOL_DIR=str(tmp_path / "spool"))
    attempts: List[Path] = [EXAMPLE, FALLBACK] if EXAMPLE.exists() else [FALLBACK]
    for script in attempts:
        proc = subprocess.run(
            [sys.executable, str(script), "--tracking-uri", uri, "--epochs", str(EPOCHS)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
        if script is FALLBACK:
            raise AssertionError(f"{script.name} failed:\n{proc.stderr[-3000:]}")
        warnings.warn(f"{script.name} failed (rc={proc.returncode}), using {FALLBACK.name}: "
                      f"{proc.stderr[-1500:]}", stacklevel=2)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(exp_ids, order_by=["attributes.start_time DESC"])
            if "mlflow_eigencam.version" in r.data.tags]
    assert runs, f"{script.name} logged no run with EigenCAM tags"
    run = runs[0]
    assert run.info.status == "FINISHED", run.info.status
    return run.info.experiment_id, run.info.run_id, str(script.relative_to(ROOT))


def _shot_path(name: str, tmp_path: Path) -> Path:
    """docs/images/<name> only when MLFLOW_EIGENCAM_DOCS_SCREENSHOTS=1, else the tmp dir (a
    test run never writes into the checkout)."""
    if os.environ.get("MLFLOW_EIGENCAM_DOCS_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        return DOCS_IMAGES / name
    return tmp_path / name


#: The parameters ``mlflow.pytorch.autolog`` (Lightning) logs for an Adam optimizer: a run
#: page with them is where the sample images used to be pushed into a thin band.
AUTOLOG_PARAMS = {
    "epochs": "3", "optimizer_name": "Adam", "lr": "0.001", "betas": "(0.9, 0.999)",
    "eps": "1e-08", "weight_decay": "0", "amsgrad": "False", "foreach": "None",
    "maximize": "False", "capturable": "False", "differentiable": "False", "fused": "None",
    "batch_size": "32", "accumulate_grad_batches": "1", "max_epochs": "3",
    "precision": "32-true",
}


def _log_autolog_params(client, run_id: str) -> None:
    """Add the autolog parameters the run does not have yet (a logged value cannot change)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    client.log_batch(run_id, params=[Param(k, v) for k, v in AUTOLOG_PARAMS.items()
                                     if k not in have])


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _step_in_src(src: str) -> int:
    """The step MLflow's image chart shows: its ``src`` names ``<key>+step+<n>+timestamp+...``."""
    m = re.search(r"\+step\+(\d+)\+", unquote(src or ""))
    assert m, f"no step in image src {src!r}"
    return int(m.group(1))


def _wait_loaded(page, img) -> None:
    """Until the <img> has decoded pixels (not only a src)."""
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=img.element_handle(),
                           timeout=UI_TIMEOUT_MS)


def test_run_page_shows_eigencam_images_slider_and_grid(browser, mlflow_server, tmp_path):
    # `browser` first: without one the test skips before the server starts.
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import expect

    uri = mlflow_server.uri
    exp_id, run_id, source = _log_run(uri, tmp_path)
    print(f"run logged by {source}")
    client = MlflowClient(uri)
    _log_autolog_params(client, run_id)
    assert len(client.get_run(run_id).data.params) >= len(AUTOLOG_PARAMS)
    series: Dict[str, Dict[int, str]] = image_series(client, run_id)
    multi = sorted(k for k, steps in series.items() if len(steps) >= 2)
    assert multi, f"no image key with two or more steps: { {k: sorted(v) for k, v in series.items()} }"
    # Prefer an eval section (the default mode filter), then its first sample.
    key = next((k for k in multi if k.startswith("eigencam/eval/")), multi[0])
    prefix = key.rsplit("/", 1)[0]
    section_keys = sorted(k for k in series if k.rsplit("/", 1)[0] == prefix)
    steps = sorted(series[key])
    grid = f"{prefix}/epoch_{steps[0]:04d}/grid.png"
    assert grid in list_all(client, run_id, prefix)
    grid_h, grid_w = load_png(client, run_id, grid).shape[:2]

    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    context.add_init_script(INIT_SCRIPT)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    try:
        # -- the run page, "Model metrics" tab: a section per key prefix ------------------
        page.goto(f"{uri}/#/experiments/{exp_id}/runs/{run_id}")
        page.get_by_role("tab", name="Model metrics").click()
        expect(page).to_have_url(re.compile(r"/model-metrics"))
        header = page.get_by_test_id("experiment-view-compare-runs-section-header").filter(
            has=page.get_by_text(prefix, exact=True))
        expect(header).to_be_visible()
        # Only this section's image charts (the search box filters charts by key), so the
        # screenshot shows the overlays rather than the metric plots next to them.
        page.get_by_placeholder("Search metric charts").fill(f"{prefix}/sample_")
        cards = page.get_by_test_id("experiment-view-compare-runs-card")
        expect(cards).to_have_count(len(section_keys))
        expect(header).to_contain_text(f"({len(section_keys)})")

        card = cards.filter(has=page.get_by_role("heading", name=key, exact=True))
        card.scroll_into_view_if_needed()
        img = card.locator("img")
        slider = card.get_by_role("slider")
        expect(img).to_be_visible()
        _wait_loaded(page, img)
        before_step = _step_in_src(img.get_attribute("src"))
        assert before_step in steps
        assert slider.get_attribute("aria-valuemin") == str(steps[0])
        assert slider.get_attribute("aria-valuemax") == str(steps[-1])
        assert slider.get_attribute("aria-valuenow") == str(before_step)
        before = _png(img.screenshot())
        # The card is legible at the chart's default size: displayed at least ~200 x 180 CSS
        # px, and the preview MLflow loads (longer side 256) is near square, not a thin band.
        box = img.bounding_box()
        assert box and box["width"] >= 200 and box["height"] >= 180, box
        natural_h, natural_w = img.evaluate("e => [e.naturalHeight, e.naturalWidth]")
        assert max(natural_h, natural_w) == 256 and 0.7 <= natural_w / natural_h <= 1.5, \
            (natural_w, natural_h)

        # MLflow lists the run's parameters above the image inside the chart's scrolling body
        # (its default; with autolog's ~16 parameters they fill half of it). The chart's
        # Configure -> "Show run parameters" switch, which the docs point to, hides them:
        # then the card's panels are in view without scrolling.
        card.get_by_test_id("experiment-view-compare-runs-card-menu").click()
        page.get_by_role("menuitem", name="Configure").click()
        switch = page.get_by_role("switch")
        expect(switch).to_have_attribute("aria-checked", "true")
        switch.click()
        expect(switch).to_have_attribute("aria-checked", "false")
        page.get_by_role("button", name="Save changes").click()
        expect(card.get_by_text("optimizer_name=Adam")).to_have_count(0)
        visible = img.evaluate("""e => {
            let p = e.parentElement;
            while (p && !['auto', 'scroll'].includes(getComputedStyle(p).overflowY)) p = p.parentElement;
            if (!p) return null;
            p.scrollTop = 0;
            const r = e.getBoundingClientRect(), q = p.getBoundingClientRect();
            return (Math.min(r.bottom, q.bottom) - Math.max(r.top, q.top)) / r.height;
        }""")
        assert visible is not None and visible >= 0.75, visible
        _wait_loaded(page, img)
        before = _png(img.screenshot())  # the layout moved: the same step, taken again

        # Move the slider to the other end with the keyboard. MLflow's slider moves one logged
        # step per arrow key; Home/End do nothing and an arrow past the end shows "Infinity",
        # so press exactly as many arrows as there are steps in between.
        target = steps[-1] if before_step != steps[-1] else steps[0]
        key_name = "ArrowRight" if target > before_step else "ArrowLeft"
        slider.focus()
        for _ in range(abs(steps.index(target) - steps.index(before_step))):
            page.keyboard.press(key_name)
        expect(slider).to_have_attribute("aria-valuenow", str(target))
        expect(img).to_have_attribute("src", re.compile(rf"(\+|%2B)step(\+|%2B){target}(\+|%2B)"))
        _wait_loaded(page, img)
        assert _step_in_src(img.get_attribute("src")) == target
        after = _png(img.screenshot())
        assert before.shape == after.shape
        diff = np.abs(before - after).mean()
        assert diff > 1.0, f"the image did not change between steps {before_step} and {target}"
        assert after.std() > 10, "the image at the new step looks blank"

        shot = _shot_path("mlflow_ui_images.png", tmp_path)
        page.screenshot(path=str(shot))
        assert _png(shot.read_bytes()).shape == (VIEWPORT["height"], VIEWPORT["width"], 3)

        # -- "Artifacts" tab: expand eigencam/<mode>/<ds>/epoch_0000 and preview grid.png --
        page.get_by_role("tab", name="Artifacts").click()
        expect(page).to_have_url(re.compile(r"/artifacts"))
        scope = page
        for name in grid.split("/"):
            # Each folder is an <li> that holds its children, so searching inside the last one
            # finds this level's node even when a folder and its child share a name.
            node = scope.get_by_test_id("artifact-tree-node").and_(
                page.get_by_label(name, exact=True)).first
            node.click()
            scope = node.locator("xpath=ancestor::li[1]")
        preview = page.get_by_role("img", name=grid, exact=True)
        expect(preview).to_be_visible()
        _wait_loaded(page, preview)
        natural = preview.evaluate("e => [e.naturalHeight, e.naturalWidth]")
        assert natural == [grid_h, grid_w], (natural, (grid_h, grid_w))
        expect(page.get_by_text(grid, exact=True)).to_be_visible()  # the preview's title

        shot = _shot_path("mlflow_ui_grid.png", tmp_path)
        page.screenshot(path=str(shot))
        assert _png(shot.read_bytes()).shape == (VIEWPORT["height"], VIEWPORT["width"], 3)
    except BaseException:
        failure = tmp_path / "failure.png"
        try:
            page.screenshot(path=str(failure))
            print(f"screenshot at failure: {failure}")
        except Exception as shot_exc:  # the page may be gone; the original error matters
            print(f"no screenshot at failure: {shot_exc}")
        raise
    finally:
        context.close()
