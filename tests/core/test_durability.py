"""What returned is never lost: SIGKILLed training processes, a script without close(), a
server that is down or hangs or refuses, a spool that is full or read-only. Real processes,
a real ``mlflow server``, nothing mocked."""

from __future__ import annotations

import collections
import http.server
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning
from mlflow_eigencam.cli import main as cli_main
from tests.helpers import child_env
from tests.helpers.oracle import blob_batch
from tests.helpers.readback import MlflowServer, free_port, list_all, load_json, metric_steps

CHILD = Path(__file__).with_name("_durability_child.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("durability-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _new_run(uri: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("durability")
    exp_id = exp.experiment_id if exp else client.create_experiment("durability")
    return client.create_run(exp_id).info.run_id


class _Child:
    """A training subprocess whose stdout lines are read on a thread."""

    def __init__(self, uri: str, run_id: str, first: int, n: int, seconds: float,
                 close: bool = True) -> None:
        env = child_env()
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), uri, run_id, str(first), str(n), str(seconds),
             "1" if close else "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.returned: list = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise AssertionError(f"child exited: {self.proc.stderr.read()[-3000:]}") from None
                continue
            if line.startswith("RETURNED "):
                self.returned.append(int(line.split()[1]))
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} within {timeout} s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        time.sleep(0.1)
        while not self.lines.empty():  # lines printed before the kill still count
            line = self.lines.get()
            if line.startswith("RETURNED "):
                self.returned.append(int(line.split()[1]))


def _arrived(client: MlflowClient, rid: str, ds: str = "val", n_samples: int = 2) -> set:
    """Epochs that reached the run, checking that none arrived twice (table rows, image
    files per key and step, metric points)."""
    files = list_all(client, rid, "eigencam")
    if f"eigencam/eval/{ds}/samples.json" not in files:
        return set()
    rows = load_json(client, rid, f"eigencam/eval/{ds}/samples.json")["data"]
    per_epoch = collections.Counter(r[0] for r in rows)
    assert all(c == n_samples for c in per_epoch.values()), per_epoch
    pngs = collections.Counter()
    for f in client.list_artifacts(rid, "images"):
        if f.path.endswith(".png"):
            key, rest = f.path.split("+step+", 1)
            pngs[(key, int(rest.split("+", 1)[0]))] += 1
    assert all(c == 1 for c in pngs.values()), pngs
    steps = [s for s, _ in metric_steps(client, rid, f"eigencam/eval/{ds}/evr_1")]
    assert len(steps) == len(set(steps)), steps
    epochs = set(per_epoch)
    assert set(steps) == epochs and {s for _, s in pngs} == epochs
    grids = {f for f in files if f.endswith("grid.png")}
    assert len(grids) == len(epochs)
    return epochs


def _recover_with_next_logger(uri: str, rid: str) -> None:
    """A new logger on the run (a resumed training) sends what the dead one left."""
    logger = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=uri, close_timeout=60)
    for b in range(2):
        images, acts, labels, logits = blob_batch(seed=b)
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
    logger.on_epoch_end(100)
    assert logger.close() == 0


def test_sigkill_at_random_points_loses_no_returned_epoch(server):
    """Every epoch whose on_epoch_end returned arrives after the next process (a new logger
    on the run, or send-spool with no path), none twice; server up, then unreachable."""
    rng = random.Random(1234)
    uri = server.uri
    client = MlflowClient(uri)
    trials = []  # (run id, epochs returned, recovered by the next logger)

    def trial(kill_after_line: bool) -> tuple:
        rid = _new_run(uri)
        child = _Child(uri, rid, 0, 12, 0.15)
        child.wait_for("READY")
        if kill_after_line:  # right after on_epoch_end returned
            child.wait_for(f"RETURNED {rng.randint(0, 3)}")
        else:
            time.sleep(rng.uniform(0.1, 1.5))
        child.kill()
        return rid, set(child.returned)

    # Server up: the sender was sending while the process died.
    for kill_after_line, by_logger in ((True, True), (False, False), (False, True)):
        rid, returned = trial(kill_after_line)
        trials.append((rid, returned, by_logger))
    # Server unreachable: frozen (SIGSTOP), so connections hang and /health times out; a
    # server that is killed and restarted is tests/core/test_server_faults.py's case (a
    # restart costs this machine tens of seconds). Everything returned is only in the spools.
    down_runs = [_new_run(uri), _new_run(uri)]
    os.killpg(server.proc.pid, signal.SIGSTOP)
    try:
        for rid, kill_after_line in zip(down_runs, (True, False)):
            child = _Child(uri, rid, 0, 12, 0.15)
            child.wait_for("READY")
            if kill_after_line:
                child.wait_for(f"RETURNED {rng.randint(1, 3)}")
            else:
                time.sleep(rng.uniform(0.3, 1.5))
            child.kill()
            trials.append((rid, set(child.returned), False))
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    assert any(returned for _, returned, _ in trials)

    for rid, _returned, by_logger in trials:
        if by_logger:
            _recover_with_next_logger(uri, rid)
    assert cli_main(["send-spool", "--tracking-uri", uri]) == 0
    for rid, returned, by_logger in trials:
        arrived = _arrived(client, rid)
        assert returned <= arrived, (rid, sorted(returned), sorted(arrived))
        if by_logger:
            assert 100 in arrived  # the resumed logger's own epoch, appended to the table


def test_script_without_close_loses_nothing(server):
    uri = server.uri
    rid = _new_run(uri)
    child = _Child(uri, rid, 0, 3, 0.0, close=False)
    child.wait_for("RETURNED 2")
    child.proc.wait(timeout=60)
    stderr = child.proc.stderr.read()
    arrived = _arrived(MlflowClient(uri), rid)
    if arrived != {0, 1, 2}:  # the exit handler ran out of time: it must have said so
        assert "send-spool" in stderr, stderr[-2000:]
        assert cli_main(["send-spool", "--tracking-uri", uri]) == 0
        arrived = _arrived(MlflowClient(uri), rid)
    assert arrived == {0, 1, 2}


def test_resume_in_a_new_process_appends_to_the_table(tracking_uri):
    rid = MlflowClient().create_run(
        mlflow.get_experiment_by_name("eigencam-tests").experiment_id).info.run_id
    child = _Child(tracking_uri, rid, 0, 2, 0.0)
    assert child.wait_for("CLOSED") == "CLOSED 0"
    # Resumed from the checkpoint of epoch 0: epoch 1 is logged again, then 2.
    logger = EigenCAMLogger(n_samples=2, run_id=rid)
    for epoch in (1, 2):
        for b in range(2):
            images, acts, labels, logits = blob_batch(seed=b)
            logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
        logger.on_epoch_end(epoch)
    assert logger.close() == 0
    table = load_json(MlflowClient(), rid, "eigencam/eval/val/samples.json")
    assert [(r[0], r[1]) for r in table["data"]] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    # The epoch logged again is not a second point or image at its step: the first stands.
    assert [st for st, _ in metric_steps(MlflowClient(), rid, "eigencam/eval/val/evr_1")] == [0, 1, 2]
    pngs = [f for f in list_all(MlflowClient(), rid, "images") if f.endswith(".png")]
    assert len(pngs) == 2 * 3  # two samples, three steps, one image each


def _epoch(logger, epoch, ds="val"):
    for b in range(2):
        images, acts, labels, logits = blob_batch(seed=b)
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id=ds)
    start = time.perf_counter()
    logger.on_epoch_end(epoch)
    return time.perf_counter() - start


class _TinyServer:
    """Answers /health; on /api it hangs (``mode="hang"``) or says 403 (``mode="403"``)."""

    def __init__(self, mode: str) -> None:
        self.release = threading.Event()
        self.api_calls = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                if self.path.startswith("/health"):
                    body, code = b"OK", 200
                else:
                    outer.api_calls += 1
                    if mode == "hang":
                        outer.release.wait(60)
                        body, code = b"{}", 503
                    else:
                        body = json.dumps({"error_code": "PERMISSION_DENIED",
                                           "message": "Permission denied"}).encode()
                        code = 403
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _answer

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_hanging_server_costs_the_training_thread_milliseconds():
    """No run yet, /health answers, the API hangs: epochs still end at once (the run is
    created on the sender), close() gives up after its timeout and says what is kept."""
    srv = _TinyServer("hang")
    try:
        logger = EigenCAMLogger(n_samples=2, tracking_uri=srv.uri, close_timeout=1.0)
        durations = [_epoch(logger, e) for e in range(3)]
        assert max(durations) < 0.5, durations  # generous: the figure is in bench_sink.py
        start = time.monotonic()
        with pytest.warns(EigenCAMWarning, match="kept in"):
            left = logger.close()
        assert time.monotonic() - start < 10
        assert left == 4 and len(left.records) == 4  # run tags + 3 epochs, all on disk
        assert all(p.is_file() for p in left.records)
        assert srv.api_calls >= 1
    finally:
        srv.stop()


def test_403_keeps_items_and_says_so():
    srv = _TinyServer("403")
    try:
        logger = EigenCAMLogger(n_samples=2, run_id="a" * 32, tracking_uri=srv.uri,
                                close_timeout=1.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _epoch(logger, 0)
            time.sleep(0.5)
            _epoch(logger, 1)
            left = logger.close()
        text = " ".join(str(w.message) for w in caught if w.category is EigenCAMWarning)
        assert "refused" in text and "credentials" in text and "nothing is set aside" in text
        assert left == 3 and ("403" in left.reason or "PERMISSION_DENIED" in left.reason)
        folder = logger.spool_dir
        assert not (folder / "failed").exists()
        assert len(list(folder.glob("*.rec"))) == 3
    finally:
        srv.stop()


def test_import_mlflow_happens_off_the_training_thread(tmp_path):
    """A script that never imported mlflow: the logger imports it on its sender thread."""
    code = f"""
import sys, threading, json, time
first = {{}}
def hook(event, args):
    if event == "import" and args[0] == "mlflow" and "mlflow" not in first:
        first["mlflow"] = threading.current_thread().name
sys.addaudithook(hook)
import numpy as np
from mlflow_eigencam import EigenCAMLogger
assert "mlflow" not in sys.modules
logger = EigenCAMLogger(n_samples=1, tracking_uri={f"sqlite:///{tmp_path / 'm.db'}"!r})
rng = np.random.default_rng(0)
images = rng.uniform(size=(2, 3, 16, 16)).astype(np.float32)
acts = rng.uniform(size=(2, 4, 4, 4)).astype(np.float32)
logger.on_batch_end(images, acts, mode="eval")
logger.on_epoch_end(0)
left = logger.close(timeout=120)
print(json.dumps({{"thread": first.get("mlflow"), "left": int(left)}}))
"""
    env = child_env()
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)  # mlflow.set_experiment in other tests exports the id
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"thread": "mlflow-eigencam-sink", "left": 0}, out.stderr[-3000:]


@pytest.mark.parametrize("server", ["hung API", "black hole"])
def test_five_loggers_open_at_exit_exit_within_one_deadline(tmp_path, server):
    """A server whose API hangs (``/health`` answers), or that accepts connections and never
    answers at all: five loggers left open at exit share one deadline
    (``_recovery.ATEXIT_TIMEOUT``) instead of waiting for each sender in turn (41 s before;
    a preemption's grace period is often 30 s). Their records stay."""
    import socket

    if server == "black hole":
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(128)  # connections complete in the backlog; nothing reads or answers
        uri, stop = f"http://127.0.0.1:{hole.getsockname()[1]}", hole.close
    else:
        srv = _TinyServer("hang")
        uri, stop = srv.uri, srv.stop
    code = f"""
import sys, time
import numpy as np
from mlflow_eigencam import EigenCAMLogger
rng = np.random.default_rng(0)
loggers = [EigenCAMLogger(n_samples=1, run_id=f"{{i:032x}}", tracking_uri={uri!r},
                          spool_dir={str(tmp_path / 'sp')!r}) for i in range(5)]
for logger in loggers:
    logger.on_batch_end(rng.uniform(size=(2, 3, 16, 16)).astype(np.float32),
                        rng.uniform(size=(2, 4, 4, 4)).astype(np.float32), mode="eval")
    logger.on_epoch_end(0)
time.sleep(1.0)  # every sender is now inside a request that never returns
print("EXITING", flush=True)
"""
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=child_env())
        line = proc.stdout.readline()
        start = time.monotonic()
        assert line.strip() == "EXITING", proc.stderr.read()[-3000:]
        _out, err = proc.communicate(timeout=120)
        took = time.monotonic() - start
    finally:
        stop()
    print(f"{server}: exit took {took:.1f} s")
    assert took < 10, (took, err[-3000:])  # 29 s (hung API) before one deadline
    assert err.count("send-spool") >= 5, err[-3000:]  # each one said what it kept
    assert len(list((tmp_path / "sp").rglob("*.rec"))) == 10  # run tags + one epoch each
