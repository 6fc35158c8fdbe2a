"""The reader of what the logger wrote, and the drift signal (map_change), on a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger
from mlflow_eigencam._reader import Reader, check_tracking_uri
from mlflow_eigencam.metrics import map_change
from tests.helpers import child_env
from tests.helpers.oracle import blob_batch
from tests.helpers.readback import metric_steps

LABELS = ["circle", "square", "tri"]


def _run(epochs=3, noise=lambda e: 0.3 / (1 + 3 * e), n=3):
    """A run whose activations settle: the noise added to them shrinks each epoch."""
    images, acts, labels, logits = blob_batch(n=n, seed=1)
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=2, n_samples=n, label_mapping=LABELS)
        for epoch in range(epochs):
            rng = np.random.default_rng(epoch)
            noisy = acts + rng.uniform(0, noise(epoch), size=acts.shape).astype(np.float32)
            logger.on_batch_end(images, noisy, labels, logits, mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        assert logger.flush(timeout=60)
        logger.close()
    return run.info.run_id


# --------------------------------------------------------------------------- map_change


def test_map_change_is_one_minus_the_correlation_of_the_maps():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 7))
    assert map_change(None, a) is None and map_change(a, None) is None
    assert map_change(a, np.zeros((5, 5))) is None  # another size: nothing to compare
    assert map_change(a, a) == pytest.approx(0.0, abs=1e-9)
    assert map_change(a, 3 * a + 1) == pytest.approx(0.0, abs=1e-9)  # scale and offset
    assert map_change(a, -a) == pytest.approx(2.0)
    b = rng.normal(size=(7, 7))
    expected = 1 - np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert map_change(a, b) == pytest.approx(expected)
    flat = np.ones((7, 7))
    assert map_change(flat, flat) == 0.0 and map_change(flat, a) == 1.0
    before = a.copy()
    map_change(a, b)
    assert np.array_equal(a, before)  # inputs untouched


def test_map_change_column_and_metric_fall_as_maps_settle(tracking_uri):
    rid = _run(epochs=4)
    client = MlflowClient()
    table = Reader(tracking_uri).table(rid, "eval", "val")
    assert "map_change" in table.columns and table.columns[-1] == "image"
    by_epoch = {}
    for row in table.rows:
        by_epoch.setdefault(row["epoch"], []).append(row["map_change"])
    assert by_epoch[0] == [None, None, None]  # nothing to compare with at the first epoch
    assert all(0 <= v <= 2 for e in (1, 2, 3) for v in by_epoch[e])
    history = metric_steps(client, rid, "eigencam/eval/val/map_change")
    assert [s for s, _ in history] == [1, 2, 3]
    means = [v for _, v in history]
    assert means == pytest.approx([float(np.mean(by_epoch[e])) for e in (1, 2, 3)], abs=1e-5)
    assert means[0] > means[-1]  # the maps settle as the noise shrinks
    # mlflow.load_table still reads the table (an empty first-epoch cell included).
    df = mlflow.load_table("eigencam/eval/val/samples.json", run_ids=[rid])
    assert len(df) == 12 and "map_change" in df.columns


# --------------------------------------------------------------------------- the reader


def test_table_reads_the_parts_and_samples_json_is_only_a_view(tracking_uri):
    """samples.json rewritten by another writer (the last upload wins): the parts still
    give every row, and the parts' row of a key stands over the view's."""
    rid = _run(epochs=2)
    reader = Reader(tracking_uri)
    table = reader.table(rid, "eval", "val")
    columns = table.columns
    view = [dict(r, image="from-the-view") for r in table.rows[:1]]  # one row left, changed
    MlflowClient().log_text(rid, json.dumps({"columns": columns, "data": [
        [r.get(c) for c in columns] for r in view]}), "eigencam/eval/val/samples.json")
    again = reader.table(rid, "eval", "val")
    assert again.rows == table.rows and len(again.rows) == 6


def test_table_joins_samples_json_and_per_epoch_parts_without_repeats(tracking_uri, tmp_path):
    rid = _run(epochs=2)
    reader = Reader(tracking_uri)
    table = reader.table(rid, "eval", "val")
    assert table.epochs == [0, 1] and table.n_evr == 2 and len(table.rows) == 6
    # A streamed epoch written as a part (the streaming format): epoch 2, plus a repeat of an
    # epoch-1 row that must not be counted twice, and one sample that was not rendered.
    columns = table.columns
    last = dict(table.rows[-1])
    part_rows = []
    for i in range(3):
        row = dict(last, epoch=2, sample_index=i, image=f"eigencam/eval/val/epoch_0002/sample_{i}.png")
        part_rows.append(row)
    part_rows[2]["image"] = ""
    part_rows.append(dict(last))  # epoch 1 again
    part = tmp_path / "table" / "epoch_0002-0000000000000-aa.json"
    part.parent.mkdir()
    part.write_text(json.dumps({"columns": columns,
                                "data": [[r.get(c) for c in columns] for r in part_rows]}))
    MlflowClient().log_artifact(rid, str(part), "eigencam/eval/val/table")
    table = reader.table(rid, "eval", "val")
    assert table.epochs == [0, 1, 2] and len(table.rows) == 9
    assert [(r["epoch"], r["sample_index"]) for r in table.rows] == \
        [(e, i) for e in range(3) for i in range(3)]
    # The not-rendered row has no card here (no renderer in this build, or nothing stored).
    assert reader.card(rid, "eval", "val", table.rows[-1]) is None
    card = reader.card(rid, "eval", "val", table.rows[0])
    assert card[:8] == b"\x89PNG\r\n\x1a\n"


def test_previews_are_found_by_epoch_and_index(tracking_uri):
    rid = _run(epochs=2)
    reader = Reader(tracking_uri)
    previews = reader.previews(rid, "eval", "val")
    assert sorted(previews) == [(e, i) for e in range(2) for i in range(3)]
    data = reader.read(rid, previews[(1, 2)])
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert reader.previews(rid, "eval", "other") == {}
    with pytest.raises(ValueError, match="not an artifact path"):
        reader.read(rid, "../../etc/passwd")


def test_runs_by_prefix_search_and_available(tracking_uri):
    rid = _run(epochs=1)
    reader = Reader(tracking_uri)
    assert reader.run(rid[:6]).info.run_id == rid
    with pytest.raises(LookupError, match="no run with id 'abcdef01' .or starting with it"):
        reader.run("abcdef01" if not rid.startswith("abcdef01") else "01234567")
    found = reader.search("eigencam-tests")  # the experiment's name
    assert [s.run_id for s in found] == [rid] and found[0].eigencam
    assert reader.search("no such thing") == []
    assert reader.available(reader.run(rid)) == [("eval", "val")]
    # One run-id rule (mlflow_eigencam._layout.parse_run_ref) for the reader, compare and
    # the explorer: text that is no run id is named, and nothing is asked of MLflow.
    with pytest.raises(LookupError, match=r"not a run id: '\.\./x'"):
        reader.run("../x")
    assert reader.run(rid.upper()[:6]).info.run_id == rid  # a prefix, in either case


def test_tracking_uri_checks_never_create_a_store(tmp_path):
    (tmp_path / "file.db").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a tracking store.*sqlite:///"):
        check_tracking_uri(str(tmp_path / "file.db"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")
    with pytest.raises(FileNotFoundError, match="no sqlite database"):
        check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(FileNotFoundError, match="no MLflow store"):
        check_tracking_uri(str(tmp_path / "mlruns"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.db"]
    assert check_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert check_tracking_uri("databricks") == "databricks"


# --------------------------------------------------------------------------- the ui command


def test_ui_command_serves_on_127_0_0_1_and_errors_are_one_line(tracking_uri, tmp_path, capsys):
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    from mlflow_eigencam.cli import main

    (tmp_path / "file.db").write_text("x")
    assert main(["ui", "--tracking-uri", str(tmp_path / "file.db")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a tracking store" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--tracking-uri", tracking_uri, "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env()
    # Started as under `nohup` or a job scheduler, SIGINT ignored: SIGTERM still stops it.
    proc = subprocess.Popen([sys.executable, "-m", "mlflow_eigencam", "ui", "--tracking-uri",
                             tracking_uri, "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}/" in line, proc.stderr.read() if not line else line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/config", timeout=30) as r:
            assert json.loads(r.read())["tracking_uri"] == tracking_uri
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert b"EigenCAM explorer" in r.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:  # never leave a server behind, whatever failed above
            proc.kill()
            proc.wait(timeout=30)


def _raw_get(port: int, path: str, host: str):
    """GET with exactly this Host header (as a rebinding page's request carries it)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("allowed", [None, "explorer.example.org, *.lab.internal:{port}"])
def test_ui_answers_only_the_host_names_it_listens_on(tracking_uri, tmp_path, allowed):
    """DNS rebinding: a page whose own name now resolves to 127.0.0.1 sends its name in Host;
    the explorer answers 403 unless the name is one it listens on or --allowed-hosts names it."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = [] if allowed is None else ["--allowed-hosts", allowed.format(port=port)]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow_eigencam", "ui", "--tracking-uri",
                             tracking_uri, "--port", str(port), *extra], cwd=tmp_path,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}/" in line, proc.stderr.read() if not line else line
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
            status, body = _raw_get(port, "/api/config", host)
            assert status == 200 and json.loads(body)["tracking_uri"] == tracking_uri, host
        forged = [f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "",
                  f"127.0.0.1.evil.example:{port}", f"explorer.example.org.evil:{port}"]
        named = [f"explorer.example.org:{port}", "explorer.example.org", f"a.lab.internal:{port}"]
        if allowed is None:
            forged += named
        for host in forged:
            for path in ("/api/config", "/api/search?q=", "/"):
                status, body = _raw_get(port, path, host)
                assert status == 403, (host, path, status)
                assert b"Invalid Host header" in body and b"tracking_uri" not in body
        for host in ([] if allowed is None else named):
            assert _raw_get(port, "/api/config", host)[0] == 200, host
        if allowed is not None:  # a pattern with a port matches that port only
            assert _raw_get(port, "/api/config", f"a.lab.internal:{port + 1}")[0] == 403
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_allowed_hosts_star_allows_any_and_urls_are_refused():
    from mlflow_eigencam.explorer._hosts import HostCheck, allowed_hosts, parse_allowed_hosts

    assert HostCheck(None, allowed_hosts("127.0.0.1", 5050, parse_allowed_hosts("*"))).allows("x:1")
    check = HostCheck(None, allowed_hosts("10.1.2.3", 5050))
    assert check.allows("10.1.2.3:5050") and not check.allows("10.1.2.3:5051")
    assert not check.allows("x:5050")
    with pytest.raises(ValueError, match="https://h.example.*not a host name"):
        parse_allowed_hosts("https://h.example")
