"""_recovery: send-spool treats a spool as untrusted input, and ends the runs it creates."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning, _spool, send_spool
from mlflow_eigencam._records import Item, item_to_record
from mlflow_eigencam.cli import main as cli_main
from tests.helpers.readback import image_series, metric_steps
from tests.helpers.spool import dead_uri, feed_epoch, tree, user_project


def test_send_spool_treats_the_spool_as_untrusted(tracking_uri, tmp_path, capsys, monkeypatch):
    client = MlflowClient()
    rid = client.create_run(mlflow.get_experiment_by_name("eigencam-tests").experiment_id
                            ).info.run_id
    dead = dead_uri()
    logger = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=dead)
    feed_epoch(logger, 0)
    with pytest.warns(EigenCAMWarning):
        assert logger.close(timeout=0.5) == 2
    folder = logger.spool_dir
    root = folder.parent
    real = sorted(folder.glob("*.rec"))

    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    (folder / "00000000000000000000-planted-000000.rec").symlink_to(secret)
    # A folder of the user's, dressed as a spool, reached through a symlink in the root.
    user = tmp_path / "userdir"
    user.mkdir()
    (user / _spool.MARKER).write_text("")
    shutil.copy(real[0], user / real[0].name)
    (user / _spool.RUN_FILE).write_text(f'{{"run_id": "{rid}", "tracking_uri": null}}')
    (root / "linked-folder").symlink_to(user, target_is_directory=True)
    user_before = tree(user)
    # A folder recorded for a foreign URI (a sqlite path that must never be created).
    evil_db = tmp_path / "evil.db"
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / _spool.MARKER).write_text("")
    _spool.write_json(foreign, _spool.RUN_FILE, {"run_id": rid,
                                                 "tracking_uri": f"sqlite:///{evil_db}"})
    shutil.copy(real[0], foreign / real[0].name)
    # Records that name another run, or a path outside the run, in the real folder.
    header, blobs = item_to_record(Item("tags", "d" * 32, None, tags={"planted": "yes"}))
    _spool.write_record(folder, "00000000000000000001-other-run-000000.rec", header, blobs)
    header, blobs = item_to_record(Item("bundle", rid, None, files={"ok.txt": b"x"}))
    header["files"] = {"../../escape.txt": header["files"]["ok.txt"]}
    _spool.write_record(folder, "00000000000000000002-escape-000000.rec", header, blobs)

    # No destination given: refused, with the recorded URIs shown.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert cli_main(["send-spool"]) == 2
    assert dead in capsys.readouterr().err
    # The destination differs from what was recorded: refused, nothing sent.
    assert cli_main(["send-spool", "--tracking-uri", tracking_uri]) == 1
    out = capsys.readouterr().out
    assert f"recorded for {dead}" in out and "recorded for sqlite" in out
    assert image_series(client, rid) == {}
    # Told to send this folder there: the real records go, the planted ones are refused.
    assert cli_main(["send-spool", str(folder), "--tracking-uri", tracking_uri,
                     "--retarget"]) == 1
    out = capsys.readouterr().out
    assert "symlinks not followed" in out and "names run" in out and "escape" in out
    assert sorted(image_series(client, rid)) == ["eigencam/eval/val/sample_0",
                                                 "eigencam/eval/val/sample_1"]
    tags = client.get_run(rid).data.tags
    assert "planted" not in tags
    assert secret.read_text() == "do not upload"
    assert (folder / "00000000000000000000-planted-000000.rec").is_symlink()
    assert tree(user) == user_before
    assert not evil_db.exists()
    assert not list(tmp_path.rglob("escape.txt"))
    assert all(not p.endswith("secret.txt") for p in _all_artifacts(client, rid))
    assert len(list(foreign.glob("*.rec"))) == 1  # not this folder's turn: untouched


def _all_artifacts(client, rid, path=None):
    out = []
    for f in client.list_artifacts(rid, path):
        out += _all_artifacts(client, rid, f.path) if f.is_dir else [f.path]
    return out


def test_send_spool_refuses_a_folder_that_is_not_a_spool(tmp_path, capsys):
    project = user_project(tmp_path / "project")
    before = tree(project)
    assert cli_main(["send-spool", str(project), "--tracking-uri", "sqlite:///x.db"]) == 2
    assert "not a mlflow_eigencam spool" in capsys.readouterr().err
    assert tree(project) == before
    assert not (Path.cwd() / "x.db").exists()


def test_a_run_created_from_a_leftover_spool_is_ended(tracking_uri, tmp_path):
    """The logger could not even create its run (server down): send-spool creates it, sends,
    and ends it FINISHED (it stayed RUNNING forever before)."""
    logger = EigenCAMLogger(n_samples=2, tracking_uri=dead_uri(), spool_dir=tmp_path / "sp")
    for epoch in range(2):
        feed_epoch(logger, epoch)
    with pytest.warns(EigenCAMWarning):
        left = logger.close(timeout=0.5)
    assert left == 3  # tags and two bundles
    lines = []
    sent, still = send_spool(logger.spool_dir, tracking_uri=tracking_uri, retarget=True,
                             report=lines.append)
    assert (sent, still) == (3, 0), lines
    client = MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name("eigencam-tests").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", lines
    rid = runs[0].info.run_id
    assert [s for s, _ in metric_steps(client, rid, "eigencam/eval/val/evr_1")] == [0, 1]
    assert any(f"ended run {rid} (FINISHED)" in line for line in lines)


def test_a_created_run_with_items_left_ends_failed_and_a_users_run_is_never_ended(tracking_uri, tmp_path):
    from mlflow_eigencam import _recovery, _transport

    created = _transport.create_run(tracking_uri, None)
    lines = []
    _recovery._end_created_run(tmp_path, {"creates_run": True}, created, tracking_uri, 2,
                               lines.append)
    assert _transport.run_status(tracking_uri, created) == "FAILED"
    # A later send that delivers the rest ends it as its logger recorded.
    _recovery._end_created_run(tmp_path, {"creates_run": True, "end_status": "FINISHED"},
                               created, tracking_uri, 0, lines.append)
    assert _transport.run_status(tracking_uri, created) == "FINISHED"
    users = _transport.create_run(tracking_uri, None)
    _recovery._end_created_run(tmp_path, {"creates_run": False}, users, tracking_uri, 0,
                               lines.append)
    assert _transport.run_status(tracking_uri, users) == "RUNNING"


def test_send_spool_counts_records_of_a_deleted_run_in_its_exit_status(tracking_uri, capsys):
    client = MlflowClient()
    with mlflow.start_run() as run:
        pass
    rid = run.info.run_id
    logger = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=dead_uri())
    feed_epoch(logger, 0)
    with pytest.warns(EigenCAMWarning):
        assert logger.close(timeout=0.3) == 2
    client.delete_run(rid)
    folder = logger.spool_dir
    assert cli_main(["send-spool", str(folder), "--tracking-uri", tracking_uri,
                     "--retarget"]) == 1
    out = capsys.readouterr().out
    assert "rejected by MLflow, NOT delivered" in out and "2 not delivered" in out, out
    assert len(list((folder / "failed").glob("*.rec"))) == 2


def test_a_planted_failed_symlink_skips_only_its_folder(tracking_uri, tmp_path, capsys):
    client = MlflowClient()
    folders, rids = [], []
    for _ in range(2):
        with mlflow.start_run() as run:
            pass
        rids.append(run.info.run_id)
        logger = EigenCAMLogger(n_samples=2, run_id=run.info.run_id, tracking_uri=dead_uri())
        feed_epoch(logger, 0)
        with pytest.warns(EigenCAMWarning):
            logger.close(timeout=0.3)
        folders.append(logger.spool_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folders[0] / "failed").symlink_to(elsewhere, target_is_directory=True)
    assert cli_main(["send-spool", "--tracking-uri", tracking_uri, "--retarget"]) == 1
    out = capsys.readouterr().out
    assert f"{folders[0]}: skipped: {folders[0] / 'failed'} is a symlink" in out, out
    assert image_series(client, rids[0]) == {}
    assert sorted(image_series(client, rids[1])) == ["eigencam/eval/val/sample_0",
                                                     "eigencam/eval/val/sample_1"]
    assert len(list(folders[0].glob("*.rec"))) == 2 and list(elsewhere.iterdir()) == []


def test_a_run_send_spool_creates_lands_in_the_experiment_active_at_start(tmp_path, monkeypatch):
    """The server was down for the whole training: send-spool creates the run, in the
    experiment that was active when the logger started (it landed in Default before)."""
    from tests.helpers.readback import MlflowServer

    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # restored after the test
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        mlflow.set_tracking_uri(server.uri)
        exp = mlflow.set_experiment("trained-here").experiment_id
        server.stop()
        logger = EigenCAMLogger(n_samples=2, tracking_uri=server.uri, spool_dir=tmp_path / "sp")
        feed_epoch(logger, 0)
        with pytest.warns(EigenCAMWarning):
            assert logger.close(timeout=0.5) == 2
        server.start()
        mlflow.set_experiment(experiment_id="0")  # another experiment is active now
        monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        lines = []
        sent, left = send_spool(logger.spool_dir, tracking_uri=server.uri, report=lines.append)
        assert (sent, left) == (2, 0), lines
        client = MlflowClient(server.uri)
        runs = client.search_runs([exp])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", lines
        assert client.search_runs(["0"]) == []
    finally:
        mlflow.set_tracking_uri(None)
        server.stop()
