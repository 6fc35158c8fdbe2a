"""The explorer (``mlflow-eigencam ui``) in a real browser against a real ``mlflow server``.

Three runs in two experiments, logged by ``tests/helpers/explorer_runs.py`` into ``mlflow server``: exp-a
"good", exp-b "worse" (learns slower), and exp-b "live", which holds before its last epoch
until the test lets it go. The explorer is served in this process on 127.0.0.1 and driven in
headless Chromium. What the tests check is what a user sees: rows, cells, image sources,
the controls, the URL, a downloaded file. The expected rows come from the runs' tables,
read back through MLflow.

Needs the ``playwright`` package and a Chromium binary (``/usr/bin/chromium`` or
``$MLFLOW_EIGENCAM_CHROMIUM``); never runs ``playwright install``. Without them the browser
tests skip, unless ``MLFLOW_EIGENCAM_REQUIRE_BROWSER=1`` (CI).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterator

import pytest

from tests.helpers import child_env
from tests.helpers.explorer_page import TIMEOUT_MS
from tests.helpers.explorer_page import open_page as _open
from tests.helpers.explorer_page import shown as _shown
from tests.helpers.readback import MlflowServer, free_port

HERE = Path(__file__).resolve().parent
RUNS_SCRIPT = HERE.parent / "helpers" / "explorer_runs.py"
N_SAMPLES = 6

pytestmark = pytest.mark.timeout(300)


class World:
    """The server, the runs, the explorer."""

    def __init__(self, server: MlflowServer, url: str, runs: Dict[str, str], hold: Path,
                 live: subprocess.Popen) -> None:
        self.server, self.url, self.runs, self.hold, self.live = server, url, runs, hold, live

    def page_url(self, **params) -> str:
        from urllib.parse import urlencode

        return self.url + "?" + urlencode(params, safe=",")

    def tables(self, mode: str = "eval", ds_id: str = "val"):
        from mlflow_eigencam._reader import Reader

        reader = Reader(self.server.uri)
        return {name: reader.table(rid, mode, ds_id) for name, rid in self.runs.items()}


def _spawn(uri: str, tmp: Path, *args: str) -> subprocess.Popen:
    env = child_env(MLFLOW_EIGENCAM_SPOOL_DIR=str(tmp / "spool"))
    log = open(tmp / f"run-{len(list(tmp.glob('run-*.log')))}.log", "w")
    proc = subprocess.Popen([sys.executable, str(RUNS_SCRIPT), "--tracking-uri", uri,
                             "--n-samples", str(N_SAMPLES), *args], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def _run_id(proc: subprocess.Popen, marker: str) -> str:
    for line in proc.stdout:
        if line.startswith(marker):
            return line.split()[1]
    proc.wait(timeout=30)
    raise AssertionError(f"run script ended without {marker}: "
                         f"{Path(proc.log_path).read_text()[-3000:]}")


class AppServer(MlflowServer):
    """``mlflow server --app-name eigencam`` (or ``app``): the package's plugin, found
    through its ``mlflow.app`` entry points. A dist-info folder on the server's path declares
    them as pyproject.toml does, as installing the package does."""

    def __init__(self, root: Path, app: str = "eigencam", **env: str) -> None:
        super().__init__(root)
        self.app, self.env = app, env

    def start(self, timeout: float = 120.0) -> None:
        dist = self.root / "ep" / "mlflow_eigencam_entrypoint-0.0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlflow-eigencam-entrypoint\n"
                                       "Version: 0.0\n")
        (dist / "entry_points.txt").write_text(
            "[mlflow.app]\neigencam = mlflow_eigencam.explorer:create_app\n"
            "eigencam-basic-auth = mlflow_eigencam.explorer:create_basic_auth_app\n")
        env = child_env(**self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(dist.parent), env["PYTHONPATH"]])
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", self.app,
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                if _get(self.uri + "/health")[0] == 200:
                    return
            except urllib.error.URLError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not start in {timeout}s")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("explorer")
    server = AppServer(tmp / "server")
    server.start()
    hold = tmp / "go"
    # The run that is still logging runs in its own process; the two finished ones are logged
    # here meanwhile (one import of MLflow instead of three on a busy machine).
    procs = {"live": _spawn(server.uri, tmp, "--experiment", "exp-b", "--run-name", "live",
                            "--epochs", "3", "--seed", "5", "--hold", str(hold))}
    import mlflow

    from tests.helpers.explorer_runs import log_run

    previous = mlflow.get_tracking_uri()
    try:
        runs = {"good": log_run(server.uri, "exp-a", "good", 4, N_SAMPLES),
                "worse": log_run(server.uri, "exp-b", "worse", 4, N_SAMPLES, quality=0.4, seed=3)}
    finally:
        mlflow.set_tracking_uri(previous)
    runs["live"] = _run_id(procs["live"], "HOLDING")
    from mlflow_eigencam.explorer import make_server_for

    httpd = make_server_for(server.uri, "127.0.0.1", free_port())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield World(server, f"http://127.0.0.1:{httpd.server_port}/", runs, hold, procs["live"])
    finally:
        hold.touch()
        httpd.shutdown()
        httpd.server_close()
        try:
            procs["live"].wait(timeout=60)
        finally:
            server.stop()






def _row_at(table, sid: str, epoch: int):
    rows = [r for r in table.rows if r["sample_id"] == sid and int(r["epoch"]) == epoch]
    return rows[0] if rows else None


# ----------------------------------------------------------------------------- the HTTP side


def _get(url: str, host: str = ""):
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_images_are_resolved_from_run_ids_never_from_paths(world):
    good = world.runs["good"]
    q = "mode=eval&ds_id=val&epoch=1&index=0"
    status, headers, body = _get(f"{world.url}api/image?run={good}&{q}&kind=preview")
    assert status == 200 and body[:4] == b"RIFF" and body[8:12] == b"WEBP"
    assert "immutable" in headers["Cache-Control"] and headers.get("ETag")
    status, headers, body = _get(f"{world.url}api/image?run={good}&{q}&kind=card")
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    # A path instead of a run id, a traversal in ds_id, an unknown run: no file is served.
    for bad in (f"run=../../etc&{q}", f"run={good}&mode=eval&ds_id=../../../etc&epoch=1&index=0",
                f"run={'0' * 32}&{q}"):
        status, _, body = _get(f"{world.url}api/image?{bad}&kind=card")
        assert status in (400, 404), (bad, status)
        assert b"error" in body
    status, _, _ = _get(f"{world.url}static/../_server.py")
    assert status == 404


# ----------------------------------------------------------------------------- the page


def test_data_carries_the_panel_boxes_the_logger_recorded(world):
    # The page crops previews at the boxes recorded with each row, never guessed from pixels.
    good = world.runs["good"]
    status, _, body = _get(f"{world.url}api/data?runs={good}&mode=eval&ds_id=val")
    assert status == 200
    run = json.loads(body)["runs"][0]
    row = _row_at(world.tables()["good"], run["rows"][0]["sample_id"], run["rows"][0]["epoch"])
    h, w = row["card"]["size"]
    assert run["geometries"] == [{"w": w, "h": h, "k": len(row["card"]["boxes"]) - 1,
                                  "boxes": [[x / w, y / h, bw / w, bh / h]
                                            for x, y, bw, bh in row["card"]["boxes"]]}]
    assert {r["g"] for r in run["rows"]} == {0}


def test_rows_are_joined_by_sample_id_across_runs_and_experiments(world, page):
    tables = world.tables()
    names = ["good", "worse", "live"]
    _open(page, world.page_url(runs=",".join(world.runs[n] for n in names)))
    heads = page.eval_on_selector_all("#grid thead th.runhead", "hs => hs.map(h => h.dataset.run)")
    assert heads == [world.runs[n] for n in names]
    expected = list(dict.fromkeys(r["sample_id"] for n in names for r in tables[n].rows))
    assert _shown(page) == expected and len(expected) == N_SAMPLES
    # Last common view: epoch 3; the live run has not logged it and says so.
    assert page.text_content("#epoch-label") == "epoch 3"
    live_cells = page.locator(f"#grid tbody td[data-run='{world.runs['live']}']")
    assert live_cells.count() == N_SAMPLES
    assert all("not logged at epoch 3" in t for t in live_cells.all_text_contents())
    assert "exp-a" in page.text_content("#grid thead") and "exp-b" in page.text_content("#grid thead")


def test_the_slider_moves_every_column(world, page):
    ids = [world.runs["good"], world.runs["worse"], world.runs["live"]]
    _open(page, world.page_url(runs=",".join(ids), epoch=3))
    page.wait_for_selector("#grid tbody td[data-state='logged'] img")
    page.click("#prev")
    page.click("#prev")
    assert page.text_content("#epoch-label") == "epoch 1"
    assert "epoch=1" in page.url
    srcs = page.eval_on_selector_all(
        "#grid tbody td[data-state='logged'] img",
        "is => is.map(i => [i.closest('td').dataset.run, (i.getAttribute('src') || i.dataset.src)])")
    assert {run for run, _ in srcs} == set(ids)  # every column, the live one too
    assert len(srcs) == 3 * N_SAMPLES and all("epoch=1&" in s for _, s in srcs)
    # The preview images load (lazily) and are WebP previews, not the cards.
    page.wait_for_function("() => [...document.querySelectorAll('#grid tbody td img')]"
                           ".slice(0, 6).every(i => i.complete && i.naturalWidth > 0)")
    assert all("kind=preview" in s for _, s in srcs)
    # The lower rows' images are given their src once the top rows' have loaded.
    page.wait_for_function("() => [...document.querySelectorAll('#grid tbody td img')]"
                           ".every(i => i.getAttribute('src') === i.dataset.src || !i.dataset.src)")


@pytest.mark.parametrize("flt", ["correct", "wrong", "changed", "label", "pred"])
def test_each_filter_narrows_rows_to_what_the_tables_say(world, page, flt):
    tables = world.tables()
    names = ["good", "worse"]
    epoch, since = 1, 0
    sids = list(dict.fromkeys(r["sample_id"] for n in names for r in tables[n].rows))
    rows = {n: {s: _row_at(tables[n], s, epoch) for s in sids} for n in names}
    before = {n: {s: _row_at(tables[n], s, since) for s in sids} for n in names}
    a_label = rows["good"][sids[0]]["label"]
    a_pred = rows["worse"][sids[-1]]["prediction"]

    def keep(s):
        cells = [(rows[n][s], before[n][s]) for n in names if rows[n][s] is not None]
        if flt == "correct":
            return any(c["correct"] is True for c, _ in cells)
        if flt == "wrong":
            return any(c["correct"] is False for c, _ in cells)
        if flt == "changed":
            return any(b is not None and b["correct"] != c["correct"] for c, b in cells)
        if flt == "label":
            return rows["good"][s]["label"] == a_label
        return any(c["prediction"] == a_pred for c, _ in cells)

    _open(page, world.page_url(runs=",".join(world.runs[n] for n in names), epoch=epoch))
    assert len(_shown(page)) == N_SAMPLES
    # Set the filter with the controls, as a user does.
    if flt in ("label", "pred"):
        page.select_option(f"#{flt}", a_label if flt == "label" else a_pred)
    else:
        page.select_option("#filter", flt)
        if flt == "changed":
            page.select_option("#since", str(since))
    expected = [s for s in sids if keep(s)]
    assert _shown(page) == expected
    assert page.get_attribute("#count", "data-shown") == str(len(expected))
    if expected and flt in ("correct", "wrong"):
        # The cells that match are the ones drawn at full strength.
        want = "true" if flt == "correct" else "false"
        bright = page.eval_on_selector_all(
            "#grid tbody td[data-state='logged'] .cell:not(.dim)",
            "cs => cs.map(c => c.closest('td').dataset.correct)")
        assert bright and set(bright) == {want}
    key = {"label": "label", "pred": "pred"}.get(flt, "filter")
    assert f"{key}=" in page.url


def test_a_deep_link_restores_the_view(world, page):
    ids = ",".join([world.runs["good"], world.runs["worse"]])
    _open(page, world.page_url(runs=ids))
    page.click("#prev")
    page.click("#prev")
    page.select_option("#component", "2")
    page.select_option("#filter", "wrong")
    page.select_option("#sort", "map_change")
    url, rows = page.url, _shown(page)
    for part in ("epoch=1", "component=2", "filter=wrong", "sort=map_change", "mode=eval", "ds_id=val"):
        assert part in url, (part, url)
    fresh = page.context.new_page()
    _open(fresh, url)
    assert _shown(fresh) == rows
    assert fresh.text_content("#epoch-label") == "epoch 1"
    assert fresh.input_value("#component") == "2" and fresh.input_value("#filter") == "wrong"
    assert fresh.input_value("#sort") == "map_change"
    srcs = fresh.eval_on_selector_all("#grid tbody td[data-state='logged'] img",
                                      "is => is.map(i => (i.getAttribute('src') || i.dataset.src))")
    assert srcs and all("epoch=1&" in s for s in srcs)
    fresh.close()


def test_export_writes_png_and_self_contained_html(world, page, tmp_path):
    ids = ",".join([world.runs["good"], world.runs["worse"]])
    _open(page, world.page_url(runs=ids, epoch=2, filter="correct"))
    shown = _shown(page)
    with page.expect_download() as dl:
        page.click("#export-html")
    html_path = tmp_path / "view.html"
    dl.value.save_as(html_path)
    text = html_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text
    assert world.runs["good"] in text and world.runs["worse"] in text
    assert text.count('<tr id="s-') == len(shown)  # the filtered rows, not all of them
    with page.expect_download() as dl:
        page.click("#export-png")
    png_path = tmp_path / "view.png"
    dl.value.save_as(png_path)
    from PIL import Image

    with Image.open(png_path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100


def test_click_shows_the_full_card_with_caption_and_run_link(world, page):
    good = world.runs["good"]
    _open(page, world.page_url(runs=",".join([good, world.runs["worse"]]), epoch=1))
    page.click(f"#grid tbody td[data-run='{good}'] .cell >> nth=0")
    page.wait_for_selector("#detail[open]")
    page.wait_for_function("() => document.getElementById('detail-img').naturalWidth > 0")
    src = page.get_attribute("#detail-img", "src")
    assert "kind=card" in src and "epoch=1" in src
    width = page.eval_on_selector("#detail-img", "i => i.naturalWidth")
    from PIL import Image

    status, _, body = _get(world.url + src)
    assert status == 200 and Image.open(io.BytesIO(body)).width == width
    assert "true:" in page.text_content("#detail-caption")
    href = page.get_attribute("#detail-link", "href")
    assert href.startswith(world.server.uri) and good in href


def test_an_unknown_run_id_is_named_on_the_page(world, page):
    unknown = "0123456789abcdef0123456789abcdef"
    _open(page, world.page_url(runs=f"{world.runs['good']},{unknown}"))
    msg = page.text_content("#messages")
    assert f"no run with id '{unknown}'" in msg
    assert len(_shown(page)) == N_SAMPLES  # the known run is still shown


def test_a_new_epoch_of_a_running_run_appears_without_a_reload(world, page):
    live = world.runs["live"]
    _open(page, world.page_url(runs=live))
    assert "still logging" in page.text_content("#live")
    # One run: the columns are its epochs.
    epochs = page.eval_on_selector_all("#grid thead th.runhead", "hs => hs.map(h => h.dataset.epoch)")
    assert epochs == ["0", "1"]
    world.hold.touch()  # the run logs its last epoch and ends
    page.wait_for_function(
        "() => [...document.querySelectorAll('#grid thead th.runhead')].map(h => h.dataset.epoch)"
        ".join(',') === '0,1,2'", timeout=60_000)
    assert page.text_content("#epoch-label") == "epoch 2"  # it followed the newest epoch
    assert world.live.wait(timeout=60) == 0
    page.wait_for_function("() => !document.getElementById('live').textContent", timeout=30_000)


# ----------------------------------------------------------------------------- mlflow.app plugin


def test_mlflow_server_app_name_eigencam_serves_the_explorer_next_to_the_ui(world):
    """``mlflow server --app-name eigencam`` (the server of every test here) finds the
    ``mlflow.app`` entry point and serves the explorer at /eigencam/, reading through the
    server's own stores."""
    from urllib.parse import urljoin

    base = world.server.uri
    status, headers, body = _get(base + "/eigencam/")
    assert status == 200 and b"EigenCAM explorer" in body, body[:300]
    status, _, body = _get(base + "/eigencam/api/search?q=exp-a")
    found = json.loads(body)["runs"]
    assert status == 200 and [r["run_id"] for r in found] == [world.runs["good"]]
    status, _, body = _get(base + "/eigencam/api/config")
    config = json.loads(body)
    # Run links go to this server's UI, relative to the page (right behind a TLS proxy), and
    # the backend store's URI (it may hold a password) is not shown.
    assert config["mlflow_ui"] == "../" and urljoin(base + "/eigencam/", "../") == base + "/"
    assert "sqlite" not in config["tracking_uri"]
    status, _, body = _get(f"{base}/eigencam/api/image?run={world.runs['good']}&mode=eval"
                           f"&ds_id=val&epoch=0&index=1&kind=preview")
    assert status == 200 and body[8:12] == b"WEBP"
    assert _get(base + "/")[0] == 200  # the MLflow UI is still there


def test_a_forged_host_never_points_the_plugin_at_another_server(tmp_path):
    """The first request to a fresh ``mlflow server --app-name eigencam`` carries
    ``Host: 127.0.0.1:<another server's port>`` (MLflow's host check lets it through): the
    explorer still reads this server's runs only, for that request and every later one."""
    from mlflow.tracking import MlflowClient

    from mlflow_eigencam import _layout

    other, app = MlflowServer(tmp_path / "other"), AppServer(tmp_path / "app")
    other.start()
    try:
        app.start()
        ids = {}
        for name, server in (("theirs", other), ("mine", app)):
            client = MlflowClient(server.uri)
            run = client.create_run(client.create_experiment(f"exp-{name}"), run_name=name)
            client.set_tag(run.info.run_id, _layout.TAG_VERSION, "0")
            ids[name] = run.info.run_id
        forged = f"127.0.0.1:{other.port}"
        for host in (forged, ""):  # the forged one first, then an honest one
            status, _, body = _get(app.uri + "/eigencam/api/search?q=", host)
            assert status == 200 and [r["run_id"] for r in json.loads(body)["runs"]] == [ids["mine"]]
            status, _, body = _get(f"{app.uri}/eigencam/api/runs?ids={ids['theirs']},{ids['mine']}", host)
            answer = json.loads(body)
            assert [r["run_id"] for r in answer["runs"]] == [ids["mine"]]
            assert [e["id"] for e in answer["errors"]] == [ids["theirs"]]
            status, _, body = _get(app.uri + "/eigencam/api/config", host)
            config = json.loads(body)
            assert str(other.port) not in json.dumps(config) and config["mlflow_ui"] == "../"
        # The run the page asked about was never looked up on the other server.
        assert f"/runs/get?run_id={ids['theirs']}" not in (tmp_path / "other" / "server.log").read_text()
    finally:
        app.stop()
        other.stop()


def test_add_all_shown_adds_at_most_the_runs_one_view_shows(world, page):
    """More runs match than one view shows: the first ones are added, a note says how many
    were not, and the view loads (it answered 400 for all of them before)."""
    from mlflow.tracking import MlflowClient

    from mlflow_eigencam import _layout

    client = MlflowClient(world.server.uri)
    exp = client.create_experiment("many-runs")
    for i in range(70):
        run = client.create_run(exp, run_name=f"tag-only-{i}")
        client.set_tag(run.info.run_id, _layout.TAG_VERSION, "0")
    _open(page, world.url)
    page.fill("#search", "many-runs")
    page.click("#search-btn")
    page.wait_for_function("() => document.querySelectorAll('#results input.pick').length === 70")
    page.click("#select-shown")
    page.wait_for_selector("#messages .kept")
    assert "6 run(s) not added: the explorer shows at most 64 runs at once" in \
        page.text_content("#messages")
    assert page.text_content("#picked-count") == "(64 selected)"
    page.wait_for_function("() => document.querySelectorAll('#messages .error').length === 64")
    msgs = page.text_content("#messages")
    assert "cannot read the tables" not in msgs and "has no EigenCAM data" in msgs


# ----------------------------------------------------------------------------- behind basic-auth


def _get_as(url: str, user: str = "", password: str = ""):
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"} if user else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def test_basic_auth_app_serves_the_explorer_only_to_who_may_read(tmp_path, browser, monkeypatch):
    """``mlflow server --app-name eigencam-basic-auth``: MLflow's basic-auth with the explorer
    behind it. No credentials (or wrong ones): 401 for the page, the API and the images, and
    no run id in any answer. A user sees the runs of the experiments they may read, never the
    others' (not in a search, not by id, not as a table, an image or an export); an admin sees
    every run."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF "
                                            "(pip install 'mlflow[auth]')")
    from mlflow.server.auth.client import AuthServiceClient

    from tests.helpers.explorer_runs import log_run

    ini = tmp_path / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
                   "admin_username = admin\nadmin_password = admin-Pass-1234\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    app = AppServer(tmp_path / "server", app="eigencam-basic-auth",
                    MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret")
    app.start()
    import mlflow

    previous = mlflow.get_tracking_uri()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-Pass-1234")
        AuthServiceClient(app.uri).create_user("reader", "reader-Pass-1234")
        # The admin's run in an experiment the reader may not read (default NO_PERMISSIONS);
        # the reader's own (its creator manages its experiment).
        secret = log_run(app.uri, "exp-secret", "secret", 2, 3)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-Pass-1234")
        mine = log_run(app.uri, "exp-mine", "mine", 2, 3)
        base = app.uri + "/eigencam/"
        q = "mode=eval&ds_id=val&epoch=1&index=0"
        urls = ["", "api/config", "api/search?q=", f"api/runs?ids={mine},{secret}",
                f"api/data?runs={mine},{secret}&mode=eval&ds_id=val",
                f"api/image?run={mine}&{q}&kind=preview", f"api/image?run={mine}&{q}&kind=card",
                f"api/export?runs={mine}&mode=eval&ds_id=val&epoch=1&format=html",
                "static/app.js", "static/charts.js"]
        for url in urls:
            for who in (("", ""), ("reader", "wrong"), ("nobody", "reader-Pass-1234")):
                status, headers, body = _get_as(base + url, *who)
                assert status == 401, (url, who, status, body[:200])
                assert "Basic" in headers.get("www-authenticate", "")
                assert mine.encode() not in body and secret.encode() not in body
        reader = ("reader", "reader-Pass-1234")
        for url in urls:
            status, _, body = _get_as(base + url, *reader)
            assert status == 200, (url, status, body[:300])
        status, _, body = _get_as(base + "api/search?q=", *reader)
        assert [r["run_id"] for r in json.loads(body)["runs"]] == [mine]
        status, _, body = _get_as(f"{base}api/runs?ids={mine},{secret},{secret[:8]}", *reader)
        answer = json.loads(body)
        assert [r["run_id"] for r in answer["runs"]] == [mine]
        assert [e["id"] for e in answer["errors"]] == [secret, secret[:8]]
        status, _, body = _get_as(f"{base}api/data?runs={mine},{secret}&mode=eval&ds_id=val", *reader)
        runs = json.loads(body)["runs"]
        assert runs[0]["run_id"] == mine and len(runs[0]["rows"]) == 2 * 3
        assert "rows" not in runs[1] and "that you may read" in runs[1]["error"]
        assert b"exp-secret" not in body and b'"secret"' not in body
        for url in (f"api/image?run={secret}&{q}&kind=preview", f"api/image?run={secret}&{q}&kind=card",
                    f"api/image?run={secret[:8]}&{q}&kind=card",
                    f"api/export?runs={secret}&mode=eval&ds_id=val&epoch=1&format=png"):
            status, _, body = _get_as(base + url, *reader)
            assert status == 404 and b"PNG" not in body[:8] and b"WEBP" not in body[:16], url
        # The admin reads every run.
        status, _, body = _get_as(base + "api/search?q=", "admin", "admin-Pass-1234")
        assert sorted(r["run_id"] for r in json.loads(body)["runs"]) == sorted([mine, secret])
        status, _, body = _get_as(f"{base}api/image?run={secret}&{q}&kind=preview",
                                  "admin", "admin-Pass-1234")
        assert status == 200 and body[8:12] == b"WEBP"
        # MLflow's own routes are still behind basic-auth.
        assert _get_as(app.uri + "/api/2.0/mlflow/experiments/search?max_results=10")[0] == 401
        # In a browser with the reader's credentials, the page shows the reader's run; asked
        # for both, it names the other as a run it cannot read.
        context = browser.new_context(http_credentials={"username": "reader",
                                                        "password": "reader-Pass-1234"})
        try:
            pg = context.new_page()
            pg.set_default_timeout(TIMEOUT_MS)
            _open(pg, f"{base}?runs={mine},{secret}&epoch=1")
            assert len(_shown(pg)) == 3
            pg.wait_for_function("() => [...document.querySelectorAll('#grid tbody td img')]"
                                 ".some(i => i.complete && i.naturalWidth > 0)")
            heads = pg.eval_on_selector_all("#grid thead th.runhead", "hs => hs.map(h => h.dataset.epoch)")
            assert heads == ["0", "1"]  # one readable run: its epochs
            assert "that you may read" in pg.text_content("#messages")
        finally:
            context.close()
        # Without credentials the browser gets the 401 (headless Chromium, asked for
        # credentials it has not got, fails the navigation) and no page.
        from playwright.sync_api import Error as PlaywrightError

        context = browser.new_context()
        try:
            pg = context.new_page()
            try:
                assert pg.goto(base).status == 401
            except PlaywrightError as exc:
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
            assert pg.locator("#grid").count() == 0
        finally:
            context.close()
    finally:
        mlflow.set_tracking_uri(previous)
        app.stop()


# ----------------------------------------------------------------------------- look closer


def _row_crops(page, nth: int):
    """``[zoom, view]`` of every panel of the nth shown row (the input and each cell)."""
    return page.eval_on_selector_all(
        f"#grid tbody tr.sample >> nth={nth} >> .crop",
        "cs => cs.map(c => [c.dataset.zoom, c.dataset.view])")


def test_zoom_and_pan_are_synchronised_across_the_row(world, page):
    ids = ",".join([world.runs["good"], world.runs["worse"]])
    _open(page, world.page_url(runs=ids, epoch=1))
    page.wait_for_function("() => [...document.querySelectorAll('#grid tbody tr.sample:first-child img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    row = page.locator("#grid tbody tr.sample").nth(0)
    crop = row.locator(f"td[data-run='{world.runs['worse']}'] .crop")
    before = crop.screenshot()
    box = crop.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.wheel(0, -300)
    page.wait_for_function("() => document.querySelector('#grid tbody tr.sample').dataset.zoom > 1")
    zoomed = _row_crops(page, 0)
    assert len(zoomed) == 3  # the input and both runs' cells
    assert len({tuple(z) for z in zoomed}) == 1 and float(zoomed[0][0]) > 2
    assert zoomed[0][1] != "0.00,0.00"
    assert {z for z, _ in _row_crops(page, 1)} == {"1.000"}  # another row is not zoomed
    assert crop.screenshot() != before  # the pixels show the closer look
    # A drag pans every panel of the row, and is not a click (no full-size view opens).
    page.mouse.move(box["x"] + 60, box["y"] + 60)
    page.mouse.down()
    page.mouse.move(box["x"] + 30, box["y"] + 40, steps=4)
    page.mouse.up()
    panned = _row_crops(page, 0)
    assert len({tuple(z) for z in panned}) == 1 and panned[0][1] != zoomed[0][1]
    assert panned[0][0] == zoomed[0][0]
    assert not page.eval_on_selector("#detail", "d => d.open")
    # The zoom stays while the slider moves; the row's "reset zoom" resets it.
    page.click("#next")
    assert page.text_content("#epoch-label") == "epoch 2"
    assert _row_crops(page, 0) == panned
    assert page.locator("#grid .unzoom:visible").count() == 1
    row.locator(".unzoom").click()
    assert {z for z, _ in _row_crops(page, 0)} == {"1.000"}
    assert page.locator("#grid .unzoom:visible").count() == 0


def test_full_size_view_steps_epochs_and_samples_with_arrow_keys(world, page):
    good = world.runs["good"]
    _open(page, world.page_url(runs=",".join([good, world.runs["worse"]]), epoch=1, filter="correct"))
    shown = _shown(page)
    assert len(shown) >= 2
    page.locator("#grid tbody tr.sample").nth(0).locator(f"td[data-run='{good}'] .cell").click()
    page.wait_for_selector("#detail[open]")

    def at():
        page.wait_for_function("() => document.getElementById('detail-img').naturalWidth > 0")
        d = page.eval_on_selector("#detail", "d => [d.dataset.sid, d.dataset.epoch]")
        src = page.get_attribute("#detail-img", "src")
        assert f"epoch={d[1]}&" in src and "kind=card" in src
        return d[0], int(d[1])

    assert at() == (shown[0], 1)
    page.keyboard.press("ArrowRight")
    assert at() == (shown[0], 2)
    for _ in range(3):  # past the first logged epoch: it stays there
        page.keyboard.press("ArrowLeft")
    assert at() == (shown[0], 0)
    page.keyboard.press("ArrowDown")  # the next sample the grid shows, same run and epoch
    assert at() == (shown[1], 0)
    assert page.get_attribute("#detail", "data-run") == good
    page.keyboard.press("ArrowUp")
    assert at() == (shown[0], 0)
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.getElementById('detail').open")


def test_before_after_swipe_shows_two_epochs_or_two_runs_on_one_image(world, page):
    from PIL import Image, ImageChops

    good = world.runs["good"]
    _open(page, world.page_url(runs=",".join([good, world.runs["worse"]]), epoch=3))
    page.locator("#grid tbody tr.sample").nth(0).locator(f"td[data-run='{good}'] .cell").click()
    page.wait_for_selector("#detail[open]")
    assert page.locator("#swipe-img").count() == 0  # off until an epoch is chosen
    page.select_option("#swipe-with", "epoch:0")
    page.wait_for_function("() => ['detail-img', 'swipe-img'].every(i => "
                           "document.getElementById(i).complete && document.getElementById(i).naturalWidth > 0)")
    assert "epoch=3&" in page.get_attribute("#detail-img", "src")
    assert "epoch=0&" in page.get_attribute("#swipe-img", "src")
    assert page.get_attribute(".swipe", "data-with") == "epoch:0"

    def shot(pos):
        page.eval_on_selector("#swipe", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(pos))
        return Image.open(io.BytesIO(page.locator(".swipe").screenshot())).convert("RGB")

    after, before, half = shot(0), shot(100), shot(50)
    assert ImageChops.difference(after, before).getbbox() is not None  # the epochs differ
    w, h = half.size
    left, right = (0, 0, w // 2 - 3, h), (w // 2 + 3, 0, w, h)
    # Left of the curtain: epoch 0; right of it: epoch 3.
    assert ImageChops.difference(half.crop(left), before.crop(left)).getbbox() is None
    assert ImageChops.difference(half.crop(right), after.crop(right)).getbbox() is None
    # The arrow keys step the view and keep the comparison with epoch 0.
    page.locator("#detail-close").focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.getElementById('detail').dataset.epoch === '2'")
    assert "epoch=2&" in page.get_attribute("#detail-img", "src")
    assert "epoch=0&" in page.get_attribute("#swipe-img", "src")
    # The same epoch of another run.
    worse = world.runs["worse"]
    page.select_option("#swipe-with", f"run:{worse}")
    page.wait_for_function("() => document.getElementById('swipe-img').naturalWidth > 0")
    src = page.get_attribute("#swipe-img", "src")
    assert f"run={worse}&" in src and "epoch=2&" in src
    assert f"run={good}&" in page.get_attribute("#detail-img", "src")


# ----------------------------------------------------------------------------- the slider


def test_a_typed_epoch_and_the_keyboard_move_the_slider(world, page):
    ids = ",".join([world.runs["good"], world.runs["worse"]])
    _open(page, world.page_url(runs=ids, epoch=3))

    def shown_epoch():
        srcs = page.eval_on_selector_all("#grid tbody td[data-state='logged'] img",
                                         "is => is.map(i => (i.getAttribute('src') || i.dataset.src))")
        epochs = {s.split("epoch=")[1].split("&")[0] for s in srcs}
        assert len(epochs) == 1, epochs
        label = page.text_content("#epoch-label")
        assert label == f"epoch {epochs.pop()}" and f"epoch={label.split()[1]}" in page.url
        return int(label.split()[1])

    page.fill("#epoch-jump", "1")
    page.press("#epoch-jump", "Enter")
    assert shown_epoch() == 1
    page.fill("#epoch-jump", "7")  # past the last logged epoch: the nearest below it
    page.press("#epoch-jump", "Enter")
    assert shown_epoch() == 3 and page.input_value("#epoch-jump") == "3"
    # Keys from the page (not from a form field): left / right step, Home / End the ends.
    page.click("h1")
    page.keyboard.press("ArrowLeft")
    assert shown_epoch() == 2
    page.keyboard.press("Home")
    assert shown_epoch() == 0
    page.keyboard.press("ArrowLeft")  # already the first
    assert shown_epoch() == 0
    page.keyboard.press("ArrowRight")
    assert shown_epoch() == 1
    page.keyboard.press("End")
    assert shown_epoch() == 3
    # A select keeps its arrow keys.
    page.focus("#sort")
    page.keyboard.press("ArrowLeft")
    assert shown_epoch() == 3
