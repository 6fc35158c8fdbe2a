"""The spool owns only what it made, says when it cannot keep its promise, logs into one run
whatever the thread, and treats a spool handed to send-spool as untrusted input."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning, _spool
from mlflow_eigencam.cli import main as cli_main
from mlflow_eigencam._records import Item, item_to_record
from tests.helpers.oracle import blob_batch
from tests.helpers.readback import free_port, image_series, load_json, metric_steps


def _epoch(logger, epoch, ds="val"):
    for b in range(2):
        images, acts, labels, logits = blob_batch(seed=b)
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id=ds)
    logger.on_epoch_end(epoch, ds_id=ds)


def _tree(folder: Path) -> dict:
    """{relative path: sha1 or 'dir' or 'link->target'} of everything under ``folder``."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link->" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _user_project(root: Path) -> Path:
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "data").mkdir()
    (root / "data" / "x.bin").write_bytes(os.urandom(1000))
    (root / "0000000001.bundle").mkdir()  # looks like an old spool item: still not ours
    (root / "0000000001.bundle" / "item.json").write_text("{}")
    (root / "notes.txt").write_text("mine")
    return root


def _dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_a_user_folder_as_spool_dir_is_never_touched(tracking_uri, tmp_path):
    project = _user_project(tmp_path / "project")
    before = _tree(project)
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2, spool_dir=project)
        for epoch in range(2):
            _epoch(logger, epoch)
        assert logger.close() == 0
    assert sorted(image_series(MlflowClient(), run.info.run_id)) == [
        "eigencam/eval/val/sample_0", "eigencam/eval/val/sample_1"]
    after = _tree(project)
    ours = {k: v for k, v in after.items() if k.startswith(_spool.SUBDIR)}
    assert {k: v for k, v in after.items() if k not in ours} == before
    assert set(ours) <= {_spool.SUBDIR, f"{_spool.SUBDIR}/{_spool.MARKER}"}

    # Server down: the items stay, inside our sub-folder only; the user's files stay too.
    logger = EigenCAMLogger(n_samples=2, spool_dir=project, run_id="b" * 32,
                            tracking_uri=_dead_uri())
    _epoch(logger, 0)
    with pytest.warns(EigenCAMWarning, match="kept in"):
        left = logger.close(timeout=0.5)
    assert left == 2 and all(project / _spool.SUBDIR in p.parents for p in left.records)
    assert {k: v for k, v in _tree(project).items() if not k.startswith(_spool.SUBDIR)} == before


def test_a_foreign_folder_where_the_spool_would_go_is_refused_at_construction(tmp_path):
    project = _user_project(tmp_path / "project")
    (project / _spool.SUBDIR).mkdir()  # the user's own folder of that name: not ours
    before = _tree(project)
    with pytest.raises(ValueError, match="not made by mlflow_eigencam"):
        EigenCAMLogger(spool_dir=project)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        EigenCAMLogger(spool_dir=tmp_path / "a-file")
    assert _tree(project) == before


def _cannot_mount(reason: str) -> None:
    """Skip where a tmpfs cannot be mounted (a laptop, a container without CAP_SYS_ADMIN),
    but fail in CI (``CI`` set), which must run the disk-full and read-only cases."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this test must run: give the job mount rights")
    pytest.skip(f"{reason} (set CI=true to make this a failure)")


@contextlib.contextmanager
def _mounted_tmpfs(where: Path, size: str, read_only: bool = False):
    where.mkdir()
    if shutil.which("mount") is None:
        _cannot_mount("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        _cannot_mount(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_an_unwritable_spool_warns_once_and_sends_from_memory(tracking_uri, tmp_path, kind):
    with _mounted_tmpfs(tmp_path / "mnt", "2m", read_only=False) as mnt:
        if kind == "full":
            _fill(mnt)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with mlflow.start_run() as run:
            logger = EigenCAMLogger(n_samples=2, spool_dir=mnt)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for epoch in range(3):
                    _epoch(logger, epoch)
                left = logger.close()
        ours = [w for w in caught if w.category is EigenCAMWarning]
        assert len(ours) == 1, [str(w.message) for w in ours]
        errno_name = "ENOSPC" if kind == "full" else "EROFS"
        assert errno_name in str(ours[0].message) and str(mnt) in str(ours[0].message)
        assert left == 0
        client = MlflowClient()
        assert [s for s, _ in metric_steps(client, run.info.run_id,
                                           "eigencam/eval/val/evr_1")] == [0, 1, 2]


def test_what_only_memory_held_is_reported_by_close(tmp_path):
    """Unwritable spool and a dead server: close() says the items are lost, and how many."""
    with _mounted_tmpfs(tmp_path / "mnt", "1m", read_only=True) as mnt:
        logger = EigenCAMLogger(n_samples=2, spool_dir=mnt, run_id="c" * 32,
                                tracking_uri=_dead_uri())
        with pytest.warns(EigenCAMWarning, match="EROFS"):
            _epoch(logger, 0)
        with pytest.warns(EigenCAMWarning, match="only in memory"):
            left = logger.close(timeout=0.5)
        assert left == 2 and left.in_memory == 2 and not left.records


def test_epoch_end_from_another_thread_logs_into_the_users_run(tracking_uri):
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("eigencam-tests").experiment_id
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2)
        for b in range(2):
            images, acts, labels, logits = blob_batch(seed=b)
            logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
        t = threading.Thread(target=logger.on_epoch_end, args=(0,))
        t.start()
        t.join()
        # A whole epoch from a worker thread that has no active run.
        t = threading.Thread(target=_epoch, args=(logger, 1))
        t.start()
        t.join()
        assert logger.close() == 0
    runs = client.search_runs([exp])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    series = image_series(client, run.info.run_id)
    assert all(sorted(s) == [0, 1] for s in series.values()) and len(series) == 2


def test_two_loggers_on_one_run_and_two_threads_on_one_logger_never_collide(tracking_uri):
    client = MlflowClient()
    with mlflow.start_run() as run:
        a, b = EigenCAMLogger(n_samples=2), EigenCAMLogger(n_samples=2)
        jobs = [(a, "val"), (b, "test"), (a, "extra")]  # a is fed by two threads

        def work(logger, ds):
            for epoch in range(3):
                _epoch(logger, epoch, ds)

        threads = [threading.Thread(target=work, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a.spool_dir != b.spool_dir
        assert a.close() == 0 and b.close() == 0
    rid = run.info.run_id
    series = image_series(client, rid)
    assert len(series) == 6 and all(sorted(s) == [0, 1, 2] for s in series.values())
    for ds in ("val", "test", "extra"):
        rows = load_json(client, rid, f"eigencam/eval/{ds}/samples.json")["data"]
        assert [(r[0], r[1]) for r in rows] == [(e, i) for e in range(3) for i in range(2)]


def test_bad_mode_or_ds_id_at_run_time_warn_once_and_skip(tracking_uri):
    images, acts, labels, logits = blob_batch()
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=1)
        with pytest.warns(EigenCAMWarning, match="validation"):
            logger.on_batch_end(images, acts, labels, logits, mode="validation")
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            logger.on_batch_end(images, acts, labels, logits, mode="validation")
        assert not [w for w in again if w.category is EigenCAMWarning]
        with pytest.warns(EigenCAMWarning, match="ds_id must be a string"):
            logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id=3)
        logger.on_batch_end(images, acts, labels, logits, mode="eval")
        logger.on_epoch_end(0)
        assert logger.close() == 0
        strict = EigenCAMLogger(strict=True)
        with pytest.raises(ValueError, match="validation"):
            strict.on_batch_end(images, acts, labels, logits, mode="validation")
        strict.close()
    assert list(image_series(MlflowClient(), run.info.run_id)) == ["eigencam/eval/all/sample_0"]


def test_fewer_channels_than_components_clamps_with_one_warning(tracking_uri):
    images, acts, labels, logits = blob_batch(c=1)
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2)  # n_components=3 by default
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for epoch in range(2):
                logger.on_batch_end(images, acts, labels, logits, mode="eval")
                logger.on_epoch_end(epoch)
            assert logger.close() == 0
    ours = [str(w.message) for w in caught if w.category is EigenCAMWarning]
    assert len(ours) == 1 and "n_components=1" in ours[0], ours
    client = MlflowClient()
    assert [s for s, _ in metric_steps(client, run.info.run_id, "eigencam/eval/all/evr_1")] == [0, 1]


def test_send_spool_treats_the_spool_as_untrusted(tracking_uri, tmp_path, capsys, monkeypatch):
    client = MlflowClient()
    rid = client.create_run(mlflow.get_experiment_by_name("eigencam-tests").experiment_id
                            ).info.run_id
    dead = _dead_uri()
    logger = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=dead)
    _epoch(logger, 0)
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
    user_before = _tree(user)
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
    assert _tree(user) == user_before
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
    project = _user_project(tmp_path / "project")
    before = _tree(project)
    assert cli_main(["send-spool", str(project), "--tracking-uri", "sqlite:///x.db"]) == 2
    assert "not a mlflow_eigencam spool" in capsys.readouterr().err
    assert _tree(project) == before
    assert not (Path.cwd() / "x.db").exists()
