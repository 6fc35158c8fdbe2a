"""First meaningful paint of the explorer: 5 runs x 20 epochs x 16 samples on a local server.

Logs the runs into a local ``mlflow server`` (sqlite, served artifacts), serves the explorer
(``mlflow-eigencam ui``, in this process) and opens a deep link to all 5 runs in headless
Chromium. "First meaningful paint": from navigation until the table's rows are drawn and
every overlay image in the viewport has loaded (decoded, ``naturalWidth > 0``). Printed:

* cold: the explorer's first request for these runs (its caches empty), a fresh browser;
* warm server: a fresh browser (empty HTTP cache) against the explorer that has read them;
* reload: the same browser again (previews from its HTTP cache, ``immutable``);
* one epoch step: a click on the slider's "previous" button until the viewport has loaded;
* bytes: what the viewport's previews weigh against the strip PNGs they stand for;
* CPU: seconds of CPU the tracking server (its whole process tree: uvicorn and MLflow's
  job runner too) and this process (the explorer) spent on a cold paint, a figure that a
  busy machine inflates less than the wall-clock times.

The tracking server answers one ``get_run`` per run before the first measurement (a server
that has just started answers its first requests several times slower); the explorer's own
caches are empty for every cold paint. The 1-minute load average is printed beside the
figures.

    python benchmarks/bench_explorer.py [--runs 5 --epochs 20 --samples 16 --repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from readback import MlflowServer, free_port  # noqa: E402

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


def log_runs(uri: str, tmp: Path, runs: int, epochs: int, samples: int) -> list:
    script = ROOT / "tests" / "e2e" / "_explorer_runs.py"
    env = dict(os.environ, MLFLOW_EIGENCAM_SPOOL_DIR=str(tmp / "spool"),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    procs = [subprocess.Popen([sys.executable, str(script), "--tracking-uri", uri,
                               "--experiment", f"bench-{i % 2}", "--run-name", f"run-{i}",
                               "--epochs", str(epochs), "--n-samples", str(samples),
                               "--quality", str(1.0 - 0.15 * i), "--seed", str(i)],
                              cwd=tmp, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for i in range(runs)]
    ids = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"logging a run failed (rc={p.returncode})")
        ids.append([ln.split()[1] for ln in out.splitlines() if ln.startswith("RUN")][0])
    return ids


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


def self_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--store", default=None,
                    help="keep the logged runs in this folder and reuse them on the next call")
    a = ap.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        print(f"skipped: playwright is not importable ({exc})")
        return
    if not os.access(CHROMIUM, os.X_OK):
        print(f"skipped: no Chromium at {CHROMIUM} (set MLFLOW_EIGENCAM_CHROMIUM)")
        return

    from mlflow_eigencam.explorer import make_server_for

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
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
                cold, warm, reload_, steps, cpu_server, cpu_explorer = [], [], [], [], [], []
                for _ in range(a.repeat):
                    httpd = make_server_for(server.uri, "127.0.0.1", free_port())
                    threading.Thread(target=httpd.serve_forever, daemon=True).start()
                    url = f"http://127.0.0.1:{httpd.server_port}/?runs={','.join(ids)}&epoch={a.epochs - 1}"
                    m0, e0 = tree_cpu(server.proc.pid), self_cpu()
                    s, page = paint(browser, url)
                    cold.append(s)
                    cpu_server.append(tree_cpu(server.proc.pid) - m0)
                    cpu_explorer.append(self_cpu() - e0)
                    page.context.close()
                    s, page = paint(browser, url)
                    warm.append(s)
                    t0 = time.perf_counter()
                    page.reload()
                    page.wait_for_function(PAINTED, timeout=120_000, polling=10)
                    reload_.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    page.click("#prev")
                    page.wait_for_function(f"() => document.getElementById('epoch-label').dataset.epoch"
                                           f" === '{a.epochs - 2}' && ({PAINTED})()", polling=10)
                    steps.append(time.perf_counter() - t0)
                    n_imgs = page.eval_on_selector_all("#grid tbody img", "is => is.length")
                    sizes = page.evaluate("""async () => {
                      const imgs = [...document.querySelectorAll('#grid tbody td img')].slice(0, 10);
                      let webp = 0, png = 0;
                      for (const i of imgs) {
                        webp += (await (await fetch(i.src)).arrayBuffer()).byteLength;
                        const r = await fetch(i.src.replace('kind=preview', 'kind=card'));
                        png += (await r.arrayBuffer()).byteLength;
                      }
                      return [webp, png];
                    }""")
                    page.context.close()
                    httpd.shutdown()
                    httpd.server_close()
                    loads.append(load())
                browser.close()
        finally:
            server.stop()
    med = statistics.median
    print(f"first meaningful paint, {a.runs} runs x {a.epochs} epochs x {a.samples} samples "
          f"(median of {a.repeat}; {n_imgs} images on the page, lazy; 1-min load average "
          f"{', '.join(loads)}):")
    print(f"  cold explorer, fresh browser:   {med(cold) * 1000:7.0f} ms  (all: "
          f"{', '.join(f'{x * 1000:.0f}' for x in cold)})")
    print(f"  warm explorer, fresh browser:   {med(warm) * 1000:7.0f} ms")
    print(f"  reload (HTTP cache):            {med(reload_) * 1000:7.0f} ms")
    print(f"  one epoch step (slider):        {med(steps) * 1000:7.0f} ms")
    print(f"  CPU of a cold paint:            tracking server {med(cpu_server):.2f} s, "
          f"explorer {med(cpu_explorer):.2f} s")
    webp, png = sizes
    print(f"  10 previews {webp / 1024:.0f} KiB vs their strip PNGs {png / 1024:.0f} KiB "
          f"({png / max(webp, 1):.1f}x smaller)")


if __name__ == "__main__":
    main()
