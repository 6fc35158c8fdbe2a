"""The explorer's speed: 10 runs x 30 epochs x 16 samples on a local ``mlflow server``.

Logs the runs into a local ``mlflow server`` (sqlite, served artifacts), serves the explorer
as ``mlflow-eigencam ui`` does (a subprocess: gunicorn, one process, 16 threads) and opens a
deep link to every run in headless Chromium (``/usr/bin/chromium``, never ``playwright
install``). "First meaningful paint": from navigation until the table's rows are drawn and
every overlay image in the viewport has loaded (decoded, ``naturalWidth > 0``). Printed:

* cold: the explorer's first request for these runs (a fresh process), a fresh browser;
* warm server: a fresh browser (empty HTTP cache) against the explorer that has read them;
* reload: the same browser again (previews from its HTTP cache, ``immutable``);
* one epoch step to a cached epoch: the slider moved back to an epoch it showed a moment
  ago, timed in the page (``performance.now``) until every image in the viewport is drawn;
* a step to a fresh epoch (read ahead by the page or not), timed the same way;
* fan-out: the 4 epochs x 10 runs grid drawn (a typed ``0,10,20,29``);
* concurrency: 8 preview fetches at once, alone and while a slow request (an HTML export
  of every run) is in progress, on gunicorn and on the standard library's threaded server;
* CPU: seconds of CPU the tracking server (its whole process tree) and the explorer spent
  on a cold paint, a figure that a busy machine inflates less than the wall-clock times.

The 1-minute load average is printed beside the figures. Before each cold paint the
tracking server (and the fresh explorer) are left to settle: a just started ``mlflow
server`` spends several seconds of CPU on its own start (its job runner), which a cold paint
would otherwise be charged with.

``--baseline DIR``: also serve the explorer from another copy of the package (``DIR`` holds
``mlflow_eigencam/``, e.g. ``git archive REV mlflow_eigencam | tar -x -C DIR``), the two
arms taking turns in every repeat, and print both side by side.

    python benchmarks/bench_explorer.py [--runs 10 --epochs 30 --samples 16 --repeat 3
                                         --store DIR --baseline DIR --paint-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from tests.helpers.readback import MlflowServer, free_port, stop_group  # noqa: E402

CHROMIUM = os.environ.get("MLFLOW_EIGENCAM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
# Rows drawn and every image in the viewport loaded.
PAINTED = """() => {
  const rows = document.querySelectorAll('#grid tbody tr.sample');
  if (!rows.length) return false;
  const imgs = [...document.querySelectorAll('#grid tbody img')].filter(i => {
    const r = i.closest('td,th').getBoundingClientRect();
    return r.top < innerHeight && r.bottom > 0 && r.left < innerWidth && r.right > 0;
  });
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""
# In the page: act, then wait (one animation frame at a time) until painted; ms.
TIMED = """async ([act, epoch]) => {
  const painted = %s;
  const t0 = performance.now();
  if (act === 'epoch') { S.epoch = epoch; render(); }
  else if (act === 'fan') { const f = document.getElementById('fanout'); f.value = epoch;
    f.dispatchEvent(new Event('change')); }
  while (!painted()) await new Promise((ok) => requestAnimationFrame(ok));
  return performance.now() - t0;
}""" % PAINTED


def log_runs(uri: str, tmp: Path, runs: int, epochs: int, samples: int) -> list:
    script = ROOT / "tests" / "helpers" / "explorer_runs.py"
    env = dict(os.environ, MLFLOW_EIGENCAM_SPOOL_DIR=str(tmp / "spool"),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    ids = []
    # A few at a time: each waits on the server after every epoch.
    for start in range(0, runs, 5):
        procs = [subprocess.Popen([sys.executable, str(script), "--tracking-uri", uri,
                                   "--experiment", f"bench-{i % 2}", "--run-name", f"run-{i}",
                                   "--epochs", str(epochs), "--n-samples", str(samples),
                                   "--quality", str(round(1.0 - 0.08 * i, 2)), "--seed", str(i),
                                   "--signals"],
                                  cwd=tmp, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
                 for i in range(start, min(start + 5, runs))]
        for p in procs:
            out, _ = p.communicate(timeout=3600)
            if p.returncode != 0:
                raise SystemExit(f"logging a run failed (rc={p.returncode})")
            ids.append([ln.split()[1] for ln in out.splitlines() if ln.startswith("RUN")][0])
    return ids


class Ui:
    """``mlflow-eigencam ui`` in a subprocess (``server``: gunicorn or stdlib)."""

    def __init__(self, uri: str, server: str, root: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + sys.path),
                   MLFLOW_DISABLE_TELEMETRY="true")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow_eigencam", "ui", "--tracking-uri",
                                      uri, "--port", str(self.port), "--server", server],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, cwd=root)  # -m imports from cwd first
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "api/config", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise SystemExit(f"mlflow-eigencam ui --server {server} did not start")

    def stop(self) -> None:
        stop_group(self.proc, timeout=30)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants so far (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    todo, total = [pid], 0.0
    while todo:
        p = todo.pop()
        total += parents.get(p, (0, 0.0))[1]
        todo += [c for c, (pp, _) in parents.items() if pp == p]
    return total


def settle(pids: list, quiet: float = 0.1, limit: float = 60.0) -> None:
    """Wait (up to ``limit`` s) until the processes' trees use under ``quiet`` s of CPU a second."""
    deadline = time.monotonic() + limit
    last = sum(tree_cpu(p) for p in pids)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = sum(tree_cpu(p) for p in pids)
        if now - last < quiet:
            return
        last = now


def load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def paint(browser, url: str, context=None):
    """(seconds to first meaningful paint, the page)."""
    ctx = context or browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_function(PAINTED, timeout=120_000, polling=10)
    return time.perf_counter() - t0, page


def one(browser, server: MlflowServer, ui: Ui, ids: list, last: int, fan: str, r: dict) -> None:
    """One cold paint and what follows it (warm, reload, slider steps, fan-out) into ``r``."""
    assert server.proc is not None
    url = f"{ui.url}?runs={','.join(ids)}&epoch={last}"
    settle([server.proc.pid, ui.proc.pid])
    m0, e0 = tree_cpu(server.proc.pid), tree_cpu(ui.proc.pid)
    sec, page = paint(browser, url)
    r["cold"].append(sec * 1000)
    r["cpu_server"].append(tree_cpu(server.proc.pid) - m0)
    r["cpu_explorer"].append(tree_cpu(ui.proc.pid) - e0)
    page.context.close()
    sec, page = paint(browser, url)
    r["warm"].append(sec * 1000)
    t0 = time.perf_counter()
    page.reload()
    page.wait_for_function(PAINTED, timeout=120_000, polling=10)
    r["reload"].append((time.perf_counter() - t0) * 1000)
    time.sleep(2)  # the page's read-ahead of the neighbouring epochs
    r["fresh"].append(page.evaluate(TIMED, ["epoch", last - 1]))
    r["cached"].append(page.evaluate(TIMED, ["epoch", last]))
    r["fan"].append(page.evaluate(TIMED, ["fan", fan]))
    page.context.close()


def concurrency(ui: Ui, ids: list, epochs: int, samples: int, round_: int) -> tuple:
    """(ms for 8 preview fetches at once alone, the same with an HTML export of every run in
    progress, ms of that export); every fetch names an image the explorer has not read."""
    def read(url: str) -> int:
        with urllib.request.urlopen(url, timeout=600) as r:
            return len(r.read())

    def previews(epoch: int) -> list:
        return [f"{ui.url}api/image?run={ids[k % len(ids)]}&mode=eval&ds_id=val&epoch={epoch}"
                f"&index={k % samples}&kind=preview" for k in range(8)]

    with urllib.request.urlopen(f"{ui.url}api/data?runs={','.join(ids)}&mode=eval&ds_id=val&epoch=0",
                                timeout=600) as r:
        json.loads(r.read())
    time.sleep(3)  # the explorer's own read-ahead of epoch 0 settles
    with ThreadPoolExecutor(9) as pool:
        t0 = time.perf_counter()
        list(pool.map(read, previews(2 + 2 * round_)))
        alone = time.perf_counter() - t0
        export = pool.submit(lambda: (time.perf_counter(), read(
            f"{ui.url}api/export?runs={','.join(ids)}&mode=eval&ds_id=val&epoch={epochs // 2}&format=html"),
            time.perf_counter()))
        time.sleep(0.5)
        t0 = time.perf_counter()
        list(pool.map(read, previews(3 + 2 * round_)))
        beside = time.perf_counter() - t0
        e0, _, e1 = export.result()
    return alone * 1000, beside * 1000, (e1 - e0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--store", default=None,
                    help="keep the logged runs in this folder and reuse them on the next call")
    ap.add_argument("--paint-only", action="store_true",
                    help="leave out the concurrency figures (8 previews beside an export)")
    ap.add_argument("--baseline", default=None,
                    help="a folder holding another copy of mlflow_eigencam/: measured beside this one")
    a = ap.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        print(f"skipped: playwright is not importable ({exc})")
        return
    if not os.access(CHROMIUM, os.X_OK):
        print(f"skipped: no Chromium at {CHROMIUM} (set MLFLOW_EIGENCAM_CHROMIUM)")
        return
    last = a.epochs - 1
    fan = ",".join(str(e) for e in sorted({0, a.epochs // 3, 2 * a.epochs // 3, last}))

    with tempfile.TemporaryDirectory(prefix="bench-explorer-") as d:
        tmp = Path(a.store or d)
        saved = tmp / f"runs-{a.runs}x{a.epochs}x{a.samples}.txt"
        server = MlflowServer(tmp / "server")
        server.start()
        try:
            if saved.exists():
                ids = saved.read_text().split()
            else:
                t = time.perf_counter()
                ids = log_runs(server.uri, tmp, a.runs, a.epochs, a.samples)
                print(f"logged {a.runs} runs x {a.epochs} epochs x {a.samples} samples in "
                      f"{time.perf_counter() - t:.1f} s")
                saved.write_text("\n".join(ids))
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=server.uri)
            for rid in ids:
                client.get_run(rid)
            loads = [load()]
            arms = {"this": ROOT}
            if a.baseline:
                arms = {"baseline": Path(a.baseline).resolve(), "this": ROOT}
            keys = ("cold", "warm", "reload", "cached", "fresh", "fan", "cpu_server", "cpu_explorer")
            r: dict = {arm: {k: [] for k in keys} for arm in arms}
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
                for _ in range(a.repeat):
                    for arm, root in arms.items():
                        ui = Ui(server.uri, "gunicorn", root)
                        try:
                            one(browser, server, ui, ids, last, fan, r[arm])
                        finally:
                            ui.stop()
                    loads.append(load())
                browser.close()
            conc = {}
            for name in () if a.paint_only else ("gunicorn", "stdlib"):
                ui = Ui(server.uri, name)
                try:
                    conc[name] = [concurrency(ui, ids, a.epochs, a.samples, k) for k in range(a.repeat)]
                finally:
                    ui.stop()
        finally:
            server.stop()
    med = statistics.median
    print(f"the explorer, {a.runs} runs x {a.epochs} epochs x {a.samples} samples, mlflow-eigencam ui "
          f"on gunicorn (median of {a.repeat}; 1-min load average {', '.join(loads)}):")
    for arm in arms:
        m = r[arm]

        def line(label: str, key: str, goal: str = "", m: dict = m) -> None:
            print(f"  {label:<44}{med(m[key]):7.0f} ms  (all: {', '.join(f'{x:.0f}' for x in m[key])}){goal}")

        if len(arms) > 1:
            print(f" {arm} ({arms[arm]}):")
        line("first meaningful paint, cold explorer:", "cold", "  goal < 1000 ms")
        line("first meaningful paint, warm explorer:", "warm")
        line("reload (HTTP cache):", "reload")
        line("slider step to a cached epoch:", "cached", "  goal < 100 ms")
        line("slider step to the epoch before:", "fresh")
        line(f"fan-out {fan} x {a.runs} runs drawn:", "fan")
        print(f"  CPU of a cold paint: tracking server {med(m['cpu_server']):.2f} s, "
              f"explorer {med(m['cpu_explorer']):.2f} s")
    for name, rows in conc.items():
        alone, beside, export = (med([x[i] for x in rows]) for i in range(3))
        print(f"  {name:<9} 8 previews at once: {alone:6.0f} ms alone, {beside:6.0f} ms beside an HTML "
              f"export of {a.runs} runs ({export:.0f} ms)")


if __name__ == "__main__":
    main()
