"""The explorer's WSGI app (``mlflow_eigencam.explorer._server``) on a real sqlite store,
called as a WSGI server calls it. The page itself, in a browser against ``mlflow server``:
``tests/e2e/test_explorer.py``."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from mlflow_eigencam import EigenCAMLogger
from mlflow_eigencam.explorer import Explorer
from tests.helpers.explorer_page import wsgi_get as _get
from tests.helpers.oracle import blob_batch


def _logged(labels, epochs=1, n=3):
    images, acts, _, logits = blob_batch(n=n, seed=1)
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_components=2, n_samples=n, label_mapping=["circle", "square", "tri"])
        for epoch in range(epochs):
            logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        assert logger.flush(timeout=60)
        logger.close()
    return run.info.run_id




def test_one_malformed_table_is_that_runs_error_and_the_others_are_shown(tracking_uri):
    good = _logged(np.array([0, 1, 2]))
    bad = _logged(np.array([0, 1, 2]))
    # A table part that is JSON but not the logger's (an epoch that is not a number), and
    # one that is not JSON at all: the view still shows the good run.
    client = mlflow.MlflowClient()
    client.log_text(bad, json.dumps({"columns": ["epoch", "sample_id", "image"],
                                     "data": [[[1], "x", ""]]}),
                    "eigencam/eval/val/table/epoch_0007-0000000000000-aa.json")
    worse = _logged(np.array([0, 1, 2]))
    client.log_text(worse, "{not json", "eigencam/eval/val/table/epoch_0003-0000000000000-aa.json")
    app = Explorer(tracking_uri)
    status, body = _get(app, "/api/data", f"runs={good},{bad},{worse}&mode=eval&ds_id=val")
    assert status == 200, body
    runs = {r["requested"]: r for r in json.loads(body)["runs"]}
    assert len(runs[good]["rows"]) == 3 and "error" not in runs[good]
    for rid in (bad, worse):
        assert runs[rid]["error"].startswith(f"run {rid}"), runs[rid]
        assert "rows" not in runs[rid] and runs[rid]["summary"]["run_id"] == rid
    assert "epoch_0003-0000000000000-aa.json is not an EigenCAM table" in runs[worse]["error"]


def test_none_labels_are_null_and_neither_right_nor_wrong(tracking_uri):
    rid = _logged([None, 1, None])
    status, body = _get(Explorer(tracking_uri), "/api/data", f"runs={rid}")
    rows = json.loads(body)["runs"][0]["rows"]
    assert [(r["label"], r["correct"]) for r in rows] == [(None, None), ("square", True), (None, None)]


def test_more_runs_than_one_view_shows_is_a_clear_400_and_the_limit_is_in_the_config(tracking_uri):
    app = Explorer(tracking_uri)
    status, body = _get(app, "/api/config")
    limit = json.loads(body)["max_runs"]
    ids = ",".join(f"{i:032x}" for i in range(limit + 1))
    status, body = _get(app, "/api/data", f"runs={ids}")
    assert status == 400 and f"at most {limit} runs at once" in json.loads(body)["error"]


def test_the_mount_redirect_is_relative_and_a_reader_or_uri_is_required(tracking_uri):
    seen = []
    Explorer(tracking_uri)({"PATH_INFO": "", "SCRIPT_NAME": "/eigencam", "REQUEST_METHOD": "GET"},
                           lambda status, headers: seen.append((status, dict(headers))))
    assert seen[0][0].startswith("301") and seen[0][1]["Location"] == "eigencam/"
    with pytest.raises(ValueError, match="tracking URI or a reader"):
        Explorer()


def test_a_run_the_user_may_not_read_is_never_listed_described_or_served(tracking_uri, tmp_path):
    """``environ[MAY_READ]`` (set by the basic-auth gate) hides the runs of experiments the
    user may not read, in every route, with the message of a run that does not exist; the
    same app answers a request without it (an admin's) in full."""
    from mlflow_eigencam.explorer._server import MAY_READ

    mine = _logged(np.array([0, 1, 2]))
    # Its artifacts in tmp_path (a sqlite store puts a new experiment's in ./mlruns).
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "secret", artifact_location=(tmp_path / "secret").as_uri()))
    secret = _logged(np.array([0, 1, 2]))
    secret_exp = mlflow.get_run(secret).info.experiment_id
    asked: list = []

    def may_read(experiment_id):
        asked.append(experiment_id)
        return experiment_id != secret_exp

    app = Explorer(tracking_uri)
    gated = {MAY_READ: may_read}
    status, body = _get(app, "/api/search", "q=", **gated)
    assert [r["run_id"] for r in json.loads(body)["runs"]] == [mine]
    status, body = _get(app, "/api/runs", f"ids={mine},{secret},{secret[:8]}", **gated)
    answer = json.loads(body)
    assert [r["run_id"] for r in answer["runs"]] == [mine]
    hidden = [e["message"] for e in answer["errors"]]
    assert [e["id"] for e in answer["errors"]] == [secret, secret[:8]]
    assert all("that you may read" in m and "secret" not in m.replace(secret[:8], "") for m in hidden)
    status, body = _get(app, "/api/data", f"runs={mine},{secret}&mode=eval&ds_id=val", **gated)
    runs = json.loads(body)["runs"]
    assert len(runs[0]["rows"]) == 3 and set(runs[1]) == {"requested", "error"}
    q = "mode=eval&ds_id=val&epoch=0&index=0"
    for path, query in (("/api/image", f"run={secret}&{q}&kind=card"),
                        ("/api/image", f"run={secret}&{q}&kind=preview"),
                        ("/api/export", f"runs={mine},{secret}&mode=eval&ds_id=val&epoch=0&format=png")):
        status, body = _get(app, path, query, **gated)
        assert status == 404 and "that you may read" in json.loads(body)["error"], (path, body)
    assert _get(app, "/api/image", f"run={mine}&{q}&kind=card", **gated)[0] == 200
    assert secret_exp in asked
    # The same app, a request without MAY_READ: every run.
    status, body = _get(app, "/api/search", "q=")
    assert sorted(r["run_id"] for r in json.loads(body)["runs"]) == sorted([mine, secret])
    assert _get(app, "/api/image", f"run={secret}&{q}&kind=card")[0] == 200


def test_signals_are_found_from_the_table_and_the_metric_keys(tracking_uri):
    """/api/data names the table's signal columns and gives each row's values in that order;
    /api/metrics gives the per-epoch series of the EigenCAM metrics no table column holds
    (found by key, whatever their name), and the run's parameters come with its summary."""
    from tests.helpers.explorer_runs import PROBE_METRIC, log_run

    rid = log_run(tracking_uri, "eigencam-tests", "s", 2, 3, signals=True)  # artifacts in tmp_path
    app = Explorer(tracking_uri)
    status, body = _get(app, "/api/data", f"runs={rid}&mode=eval&ds_id=val")
    run = json.loads(body)["runs"][0]
    assert run["signals"] == ["map_change", "localization", "pointing_game", "faithfulness", "fixation"]
    assert run["summary"]["params"] == {"quality": "1.0", "seed": "0"}
    from mlflow_eigencam._reader import Reader

    table = Reader(tracking_uri).table(rid, "eval", "val")
    for got, row in zip(run["rows"], table.rows):
        assert got["s"] == [row.get(n) for n in run["signals"]]
    status, body = _get(app, "/api/metrics", f"runs={rid},{'f' * 32}&mode=eval&ds_id=val")
    answer = json.loads(body)["runs"]
    assert answer[0]["metrics"] == {PROBE_METRIC: [[0, 0.5], [1, pytest.approx(0.6)]]}
    assert "error" in answer[1] and "metrics" not in answer[1]


def test_ui_runs_on_gunicorn_and_a_stuck_client_holds_no_other_request(tracking_uri, tmp_path):
    """``mlflow-eigencam ui`` runs on gunicorn (threads, one process), which MLflow installs
    off Windows: eight requests at once are answered while a client that never finishes its
    request holds a connection; SIGTERM stops it with 0."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers import child_env
    from tests.helpers.readback import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow_eigencam", "ui", "--tracking-uri",
                             tracking_uri, "--port", str(port)], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stuck = None
    try:
        line = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}/" in line, proc.stderr.read() if not line else line

        def get(_):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/config", timeout=60) as r:
                return r.headers["Server"], json.loads(r.read())["tracking_uri"]

        get(0)  # the worker is up
        stuck = socket.create_connection(("127.0.0.1", port), timeout=60)
        stuck.sendall(b"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(get, range(8)))
        assert answers == [(answers[0][0], tracking_uri)] * 8 and "gunicorn" in answers[0][0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if stuck is not None:
            stuck.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_a_first_look_downloads_only_the_table_parts_samples_json_does_not_hold(tracking_uri):
    """10 runs x 30 epochs were 310 downloads before the first row; the parts whose rows
    samples.json holds as they are are skipped, and the table is the one every part gives."""
    from mlflow_eigencam import _table
    from mlflow_eigencam._reader import Reader

    rid = _logged(np.array([0, 1, 2]), epochs=3)
    client = mlflow.MlflowClient()
    reader = Reader(tracking_uri)
    downloaded: list = []
    read = reader.read
    reader.read = lambda run_id, path: downloaded.append(path) or read(run_id, path)  # type: ignore[method-assign]

    def every_part() -> list:
        """The table as the rule reads it: every part in order, then samples.json."""
        parts = _table.part_paths(lambda folder: client.list_artifacts(rid, folder), "eval", "val")
        return _table.read([(p, read(rid, p)) for p in parts + ["eigencam/eval/val/samples.json"]])[1]

    table = reader.table(rid, "eval", "val")
    assert downloaded == ["eigencam/eval/val/samples.json"]
    assert table.epochs == [0, 1, 2] and table.rows == every_part()
    # A second writer's part of epoch 1 (another prediction): both parts of that epoch are
    # read, and the first one's row stands, as in the full read.
    first = [p for p in _table.part_paths(lambda f: client.list_artifacts(rid, f), "eval", "val")
             if "/epoch_0001-" in p][0]
    other = json.loads(read(rid, first))
    other["data"][0][other["columns"].index("prediction")] = "tri-by-another-writer"
    client.log_text(rid, json.dumps(other), "eigencam/eval/val/table/epoch_0001-9999999999999-bb.json")
    # samples.json rewritten by a writer that had only epoch 0: epoch 2's part is read too.
    view = json.loads(read(rid, "eigencam/eval/val/samples.json"))
    view["data"] = [v for v in view["data"] if v[0] == 0]
    client.log_text(rid, json.dumps(view), "eigencam/eval/val/samples.json")
    downloaded.clear()
    again = Reader(tracking_uri)
    again.read = reader.read  # type: ignore[method-assign]
    assert again.table(rid, "eval", "val").rows == every_part() == table.rows
    assert sorted(p.rsplit("/", 1)[-1][:11] for p in downloaded) == \
        ["epoch_0001-", "epoch_0001-", "epoch_0002-", "samples.jso"]
