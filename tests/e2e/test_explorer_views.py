"""The explorer's views over several runs, in Chromium against a real ``mlflow server``: the
epochs x runs fan-out, runs grouped by a parameter, the per-epoch charts (accuracy and every
explanation signal), the signals as sorts and filters, the run header's stable epoch and
alarm, and deep links that keep them. (The grid, filters, zoom and the servers:
``test_explorer.py``.)

Three small runs of ``tests/helpers/explorer_runs.py`` with its signals (masks for
``localization`` / ``pointing_game``, a ``faithfulness`` score, and a metric-only ``probe``
signal): "a" and "b" at quality 1.0, "c" at 0.4 (the parameter the runs are grouped by).
The expected values are computed from the runs' tables and metrics, read back through
MLflow. Browser: see ``conftest.py`` (never ``playwright install``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.helpers.explorer_page import open_page as _open
from tests.helpers.explorer_page import shown as _shown
from tests.helpers.readback import MlflowServer, free_port

N_SAMPLES = 4
EPOCHS = 3
STABLE = "mlflow_eigencam.stable_epoch"
ALARM = "mlflow_eigencam.alarm"

pytestmark = pytest.mark.timeout(300)


class World:
    def __init__(self, server: MlflowServer, url: str, runs: Dict[str, str]) -> None:
        self.server, self.url, self.runs = server, url, runs
        from mlflow_eigencam._reader import Reader

        reader = Reader(server.uri)
        self.tables = {n: reader.table(rid, "eval", "val") for n, rid in runs.items()}

    def page_url(self, **params) -> str:
        from urllib.parse import urlencode

        return self.url + "?" + urlencode(params, safe=",:")

    def ids(self, *names: str) -> str:
        return ",".join(self.runs[n] for n in names)

    def rows_at(self, name: str, epoch: int) -> Dict[str, dict]:
        return {r["sample_id"]: r for r in self.tables[name].rows if int(r["epoch"]) == epoch}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    import mlflow

    from tests.helpers.explorer_runs import log_run

    tmp = tmp_path_factory.mktemp("explorer-views")
    server = MlflowServer(tmp / "server")
    server.start()
    previous = mlflow.get_tracking_uri()
    httpd = None
    try:
        runs = {"a": log_run(server.uri, "views", "a", EPOCHS, N_SAMPLES, signals=True),
                "b": log_run(server.uri, "views", "b", EPOCHS, N_SAMPLES, seed=1, signals=True),
                "c": log_run(server.uri, "views", "c", EPOCHS, N_SAMPLES, quality=0.4, seed=3,
                             signals=True)}
        client = mlflow.MlflowClient(server.uri)
        client.set_tag(runs["a"], STABLE, "1")
        client.set_tag(runs["a"], ALARM, "fixation 0.91 at epoch 2 while accuracy rose (samples 0, 3)")
        # Run b shows no header marks: the logger may have tagged its own stable epoch.
        for tag in (STABLE, ALARM):
            if tag in client.get_run(runs["b"]).data.tags:
                client.delete_tag(runs["b"], tag)
        from mlflow_eigencam.explorer import make_server_for

        httpd = make_server_for(server.uri, "127.0.0.1", free_port())
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield World(server, f"http://127.0.0.1:{httpd.server_port}/", runs)
    finally:
        mlflow.set_tracking_uri(previous)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        server.stop()






def _heads(page) -> List[tuple]:
    return [tuple(h) for h in page.eval_on_selector_all(
        "#grid thead th.runhead", "hs => hs.map(h => [h.dataset.run, h.dataset.epoch])")]


def _cell_epochs(page) -> List[tuple]:
    """(run, epoch of the image's src) of every logged cell of the first row, in order."""
    return [tuple(c) for c in page.eval_on_selector_all(
        "#grid tbody tr.sample:first-child td[data-state='logged'] img",
        "is => is.map(i => [i.closest('td').dataset.run,"
        " (i.getAttribute('src') || i.dataset.src).split('epoch=')[1].split('&')[0]])")]


def _screenshot(page, name: str, tmp_path: Path) -> Path:
    """The page's top as docs/images/<name> when MLFLOW_EIGENCAM_DOCS_SCREENSHOTS=1 (how the
    docs' pictures are made), else in tmp_path (the same code runs either way)."""
    root = Path(__file__).resolve().parents[2]
    out = (root / "docs" / "images" if os.environ.get("MLFLOW_EIGENCAM_DOCS_SCREENSHOTS") == "1"
           else tmp_path) / name
    page.wait_for_function("() => [...document.querySelectorAll('#grid img')].slice(0, 24)"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(out), full_page=False)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- fan-out


def test_fanout_shows_every_run_at_each_chosen_epoch(world, page):
    a, b = world.runs["a"], world.runs["b"]
    _open(page, world.page_url(runs=world.ids("a", "b"), epoch=1))
    assert _heads(page) == [(a, ""), (b, "")]  # one column per run: the slider's epoch
    page.fill("#fanout", "0, 2")
    page.press("#fanout", "Enter")
    want = [(a, "0"), (a, "2"), (b, "0"), (b, "2")]
    assert _heads(page) == want
    assert _cell_epochs(page) == want  # each cell shows its column's epoch
    assert page.locator("#grid tbody tr.sample").count() == N_SAMPLES
    assert "epochs=0,2" in page.url
    # Shift-click on a chart adds that epoch (and the "+" beside the slider the slider's).
    chart = page.locator("#charts svg[data-metric='acc']")
    x = float(page.get_attribute("#charts svg[data-metric='acc'] circle[data-epoch='1']", "cx"))
    box = chart.bounding_box()
    chart.click(position={"x": x * box["width"] / 360, "y": box["height"] / 2}, modifiers=["Shift"])
    assert _heads(page) == [(a, "0"), (a, "1"), (a, "2"), (b, "0"), (b, "1"), (b, "2")]
    assert page.text_content("#epoch-label") == "epoch 1"  # the slider stays
    assert page.get_attribute("#fanout", "data-epochs") == "0,1,2"
    page.click("#fan-add")  # the slider's epoch (1) is shown: it leaves the fan-out
    assert _heads(page) == want
    # A typed epoch that was not logged: the nearest logged one below it; empty: off.
    page.fill("#fanout", "0,9")
    page.press("#fanout", "Enter")
    assert _heads(page) == want
    page.fill("#fanout", "")
    page.press("#fanout", "Enter")
    assert _heads(page) == [(a, ""), (b, "")] and "epochs=" not in page.url


# ----------------------------------------------------------------------------- groups


def test_runs_grouped_by_a_parameter_with_a_summary_row_per_group(world, page):
    _open(page, world.page_url(runs=world.ids("a", "c", "b"), epoch=2))
    assert page.locator("#groups").is_hidden()
    page.select_option("#group", "quality")
    # Columns by group (numbers in numeric order), the selection's order within a group.
    assert [r for r, _ in _heads(page)] == [world.runs[n] for n in ("c", "a", "b")]
    heads = page.eval_on_selector_all("#grid thead tr.grouphead th[data-group]",
                                      "hs => hs.map(h => [h.dataset.group, h.colSpan])")
    assert heads == [["0.4", 1], ["1.0", 2]]
    page.wait_for_selector("#groups td[data-col='probe']")  # the metrics come after the tables
    got = page.eval_on_selector_all(
        "#groups tbody tr", "rs => rs.map(r => [r.dataset.group, Object.fromEntries("
        "[...r.querySelectorAll('td')].map(td => [td.dataset.col, td.dataset.value]))])")
    assert [g for g, _ in got] == ["0.4", "1.0"]
    for (group, cells), names in zip(got, (["c"], ["a", "b"])):
        rows = [r for n in names for r in world.rows_at(n, 2).values()]
        assert cells["runs"] == str(len(names))
        assert float(cells["acc"]) == pytest.approx(sum(r["correct"] is True for r in rows) / len(rows))
        for signal in ("map_change", "localization", "pointing_game", "faithfulness"):
            assert float(cells[signal]) == pytest.approx(_mean([r.get(signal) for r in rows])), (group, signal)
        from mlflow.tracking import MlflowClient

        probe = [m.value for n in names
                 for m in MlflowClient(world.server.uri).get_metric_history(world.runs[n], "eigencam/eval/val/probe")
                 if m.step == 2]
        assert float(cells["probe"]) == pytest.approx(sum(probe) / len(probe))
    assert "group=quality" in page.url


# ----------------------------------------------------------------------------- signals


def test_charts_show_each_runs_numbers_per_epoch_and_follow_the_slider(world, page):
    """The charts' points are the share of correct rows and the mean map change of each run
    at each epoch, as its table says; the marker follows the slider, a click on a chart
    moves the slider."""
    tables = world.tables
    names = ["a", "c"]
    _open(page, world.page_url(runs=world.ids(*names), epoch=2))
    for metric in ("acc", "map_change"):
        for n in names:
            got = page.eval_on_selector_all(
                f"#charts svg[data-metric='{metric}'] g.series[data-run='{world.runs[n]}'] circle",
                "cs => cs.map(c => [+c.dataset.epoch, +c.dataset.value])")
            want = []
            for e in tables[n].epochs:
                rows = [r for r in tables[n].rows if int(r["epoch"]) == e]
                if metric == "acc":
                    want.append((e, sum(r["correct"] is True for r in rows) / len(rows)))
                else:
                    vals = [r["map_change"] for r in rows if r.get("map_change") is not None]
                    if vals:
                        want.append((e, sum(vals) / len(vals)))
            assert [e for e, _ in got] == [e for e, _ in want], (metric, n)
            assert [v for _, v in got] == pytest.approx([v for _, v in want]), (metric, n)

    def marker():
        return page.eval_on_selector_all("#charts .marker",
                                         "ms => ms.map(m => [m.dataset.epoch, +m.getAttribute('x1')])")

    def x_of(epoch):
        return float(page.get_attribute(f"#charts svg[data-metric='acc'] circle[data-epoch='{epoch}']", "cx"))

    n_charts = page.locator("#charts svg.chart").count()
    assert [m[0] for m in marker()] == ["2"] * n_charts and marker()[0][1] == pytest.approx(x_of(2), abs=0.1)
    page.click("#prev")
    assert [m[0] for m in marker()] == ["1"] * n_charts and marker()[0][1] == pytest.approx(x_of(1), abs=0.1)
    # A click on the chart near epoch 0 moves the slider there.
    chart = page.locator("#charts svg[data-metric='acc']")
    box = chart.bounding_box()
    chart.click(position={"x": x_of(0) * box["width"] / 360 + 2, "y": box["height"] / 2})
    assert page.text_content("#epoch-label") == "epoch 0"
    assert [m[0] for m in marker()] == ["0"] * n_charts and "epoch=0" in page.url
    # Every epoch is named on the x axis (epoch 0 too).
    ticks = page.eval_on_selector_all("#charts svg[data-metric='acc'] text.tick[text-anchor='middle']",
                                      "ts => ts.map(t => t.textContent)")
    assert ticks == ["0", "1", "2"]


def test_charts_cover_every_signal_and_follow_the_slider(world, page):
    _open(page, world.page_url(runs=world.ids("a", "c"), epoch=2))
    page.wait_for_selector("#charts svg[data-metric='probe']")  # read after the tables
    metrics = page.eval_on_selector_all("#charts svg.chart", "cs => cs.map(c => c.dataset.metric)")
    assert metrics == ["acc", "map_change", "localization", "pointing_game", "faithfulness", "fixation",
                       "probe"]
    for n in ("a", "c"):
        got = page.eval_on_selector_all(
            f"#charts svg[data-metric='localization'] g.series[data-run='{world.runs[n]}'] circle",
            "cs => cs.map(c => [+c.dataset.epoch, +c.dataset.value])")
        want = [(e, _mean([r["localization"] for r in world.rows_at(n, e).values()])) for e in range(EPOCHS)]
        assert [e for e, _ in got] == [e for e, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want])
    page.click("#prev")
    markers = page.eval_on_selector_all("#charts .marker", "ms => ms.map(m => m.dataset.epoch)")
    assert markers == ["1"] * len(metrics)


def test_sorting_by_a_signal_orders_the_samples(world, page):
    names, epoch = ("a", "c"), 1
    _open(page, world.page_url(runs=world.ids(*names), epoch=epoch))
    sids = _shown(page)
    cells = {s: [world.rows_at(n, epoch)[s]["faithfulness"] for n in names] for s in sids}
    orders = []
    for value in ("faithfulness", "faithfulness:asc"):  # most first, least first
        page.select_option("#sort", value)
        key = {s: max(v) if value == "faithfulness" else -min(v) for s, v in cells.items()}
        want = sorted(sids, key=lambda s: (-key[s], sids.index(s)))
        assert _shown(page) == want, value
        orders.append(want)
    assert sids not in orders or orders[0] != orders[1]  # a sort that moved the rows
    caps = page.eval_on_selector_all("#grid tbody tr.sample:first-child .cap", "cs => cs.map(c => c.textContent)")
    assert any("faithfulness" in c for c in caps)  # the value stands in the caption


def test_filtering_by_a_signal_keeps_the_samples_in_its_range(world, page):
    names, epoch = ("a", "c"), 2
    _open(page, world.page_url(runs=world.ids(*names), epoch=epoch))
    page.select_option("#signal", "localization")
    values = {s: [world.rows_at(n, epoch)[s]["localization"] for n in names] for s in _shown(page)}
    cut = sorted(v for vs in values.values() for v in vs)[len(names) * N_SAMPLES // 2]
    page.fill("#signal-min", str(cut))
    page.press("#signal-min", "Enter")
    want = [s for s, vs in values.items() if any(v >= cut for v in vs)]
    assert _shown(page) == want and 0 < len(want) < N_SAMPLES
    bright = page.eval_on_selector_all("#grid tbody td[data-state='logged'] .cell:not(.dim)",
                                       "cs => cs.map(c => [c.closest('tr').dataset.sid, c.closest('td').dataset.run])")
    inv = {v: k for k, v in world.runs.items()}
    assert bright and all(world.rows_at(inv[r], epoch)[s]["localization"] >= cut for s, r in bright)


def test_the_run_header_shows_the_stable_epoch_and_an_alarm(world, page):
    a, b = world.runs["a"], world.runs["b"]
    _open(page, world.page_url(runs=world.ids("a", "b")))
    head_a = page.locator(f"#grid thead th.runhead[data-run='{a}']")
    assert head_a.locator(".stable").text_content() == "stable from epoch 1"
    alarm = head_a.locator(".alarm")
    assert alarm.is_visible() and "fixation 0.91 at epoch 2" in alarm.text_content()
    assert page.locator(f"#grid thead th.runhead[data-run='{b}'] .stable, "
                        f"#grid thead th.runhead[data-run='{b}'] .alarm").count() == 0


# ----------------------------------------------------------------------------- deep links


def test_a_deep_link_keeps_fanout_grouping_sort_and_signal_filter(world, page, tmp_path):
    _open(page, world.page_url(runs=world.ids("a", "b", "c"), epoch=2))
    page.fill("#fanout", "0,2")
    page.press("#fanout", "Enter")
    page.select_option("#group", "quality")
    page.select_option("#sort", "localization:asc")
    page.select_option("#signal", "pointing_game")
    page.fill("#signal-min", "0.5")
    page.press("#signal-min", "Enter")
    url, rows, heads = page.url, _shown(page), _heads(page)
    for part in ("epochs=0,2", "group=quality", "sort=localization:asc", "signal=pointing_game", "min=0.5"):
        assert part in url, (part, url)
    fresh = page.context.new_page()
    _open(fresh, url)
    assert _shown(fresh) == rows and _heads(fresh) == heads and len(heads) == 6
    assert fresh.input_value("#fanout") == "0,2" and fresh.input_value("#group") == "quality"
    assert fresh.input_value("#sort") == "localization:asc" and fresh.input_value("#signal") == "pointing_game"
    assert fresh.input_value("#signal-min") == "0.5"
    assert fresh.locator("#groups tbody tr").count() == 2
    fresh.wait_for_selector("#charts svg[data-metric='probe']")
    fresh.evaluate("() => { document.getElementById('picker').open = false; }")
    _screenshot(fresh, "explorer_views.png", tmp_path)
    fresh.close()
