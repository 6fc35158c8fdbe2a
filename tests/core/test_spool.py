"""The spool owns only what it made and says when it cannot keep its promise (disk full,
read-only: the items go from memory, and close() says what only memory held)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning, _spool
from tests.helpers.readback import image_series, metric_steps
from tests.helpers.spool import dead_uri, feed_epoch, tree, user_project


def test_a_user_folder_as_spool_dir_is_never_touched(tracking_uri, tmp_path):
    project = user_project(tmp_path / "project")
    before = tree(project)
    with mlflow.start_run() as run:
        logger = EigenCAMLogger(n_samples=2, spool_dir=project)
        for epoch in range(2):
            feed_epoch(logger, epoch)
        assert logger.close() == 0
    assert sorted(image_series(MlflowClient(), run.info.run_id)) == [
        "eigencam/eval/val/sample_0", "eigencam/eval/val/sample_1"]
    after = tree(project)
    ours = {k: v for k, v in after.items() if k.startswith(_spool.SUBDIR)}
    assert {k: v for k, v in after.items() if k not in ours} == before
    assert set(ours) <= {_spool.SUBDIR, f"{_spool.SUBDIR}/{_spool.MARKER}"}

    # Server down: the items stay, inside our sub-folder only; the user's files stay too.
    logger = EigenCAMLogger(n_samples=2, spool_dir=project, run_id="b" * 32,
                            tracking_uri=dead_uri())
    feed_epoch(logger, 0)
    with pytest.warns(EigenCAMWarning, match="kept in"):
        left = logger.close(timeout=0.5)
    assert left == 2 and all(project / _spool.SUBDIR in p.parents for p in left.records)
    assert {k: v for k, v in tree(project).items() if not k.startswith(_spool.SUBDIR)} == before


def test_a_foreign_folder_where_the_spool_would_go_is_refused_at_construction(tmp_path):
    project = user_project(tmp_path / "project")
    (project / _spool.SUBDIR).mkdir()  # the user's own folder of that name: not ours
    before = tree(project)
    with pytest.raises(ValueError, match="not made by mlflow_eigencam"):
        EigenCAMLogger(spool_dir=project)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        EigenCAMLogger(spool_dir=tmp_path / "a-file")
    assert tree(project) == before


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
                    feed_epoch(logger, epoch)
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
                                tracking_uri=dead_uri())
        with pytest.warns(EigenCAMWarning, match="EROFS"):
            feed_epoch(logger, 0)
        with pytest.warns(EigenCAMWarning, match="only in memory"):
            left = logger.close(timeout=0.5)
        assert left == 2 and left.in_memory == 2 and not left.records




def test_a_fifo_in_the_spool_hangs_neither_send_spool_nor_a_new_logger(tracking_uri, tmp_path):
    """Opening a FIFO for reading waits for a writer that never comes: each is skipped with a
    message instead. Subprocesses with a timeout, so a regression fails instead of hanging."""
    import sys

    from tests.helpers import child_env

    root = tmp_path / "sp"
    with mlflow.start_run() as run:
        pass
    rid = run.info.run_id
    logger = EigenCAMLogger(n_samples=2, run_id=rid, tracking_uri=dead_uri(), spool_dir=root)
    feed_epoch(logger, 0)
    with pytest.warns(EigenCAMWarning):
        assert logger.close(timeout=0.3) == 2
    real = logger.spool_dir
    os.mkfifo(real / "00000000000000000000-fifo-000000.rec")
    planted = _spool.own_root(root, create=False) / f"{rid}-1x1"
    planted.mkdir()
    (planted / _spool.MARKER).write_text("")
    os.mkfifo(planted / _spool.RUN_FILE)
    os.mkfifo(planted / _spool.LOCK_FILE)
    env = child_env()
    out = subprocess.run([sys.executable, "-m", "mlflow_eigencam", "send-spool", str(root),
                          "--tracking-uri", tracking_uri, "--retarget"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert "a FIFO" in out.stdout and "sent 2 item(s)" in out.stdout, out.stdout + out.stderr
    assert sorted(image_series(MlflowClient(), rid)) == ["eigencam/eval/val/sample_0",
                                                         "eigencam/eval/val/sample_1"]
    code = f"""
import numpy as np
from mlflow_eigencam import EigenCAMLogger
logger = EigenCAMLogger(n_samples=1, run_id={rid!r}, tracking_uri={tracking_uri!r},
                        spool_dir={str(root)!r})
rng = np.random.default_rng(0)
logger.on_batch_end(rng.uniform(size=(2, 3, 16, 16)).astype(np.float32),
                    rng.uniform(size=(2, 4, 4, 4)).astype(np.float32), mode="eval")
logger.on_epoch_end(5)
print("LEFT", int(logger.close(timeout=60)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=180)
    assert "LEFT 0" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "not a regular file (a FIFO)" in out.stderr, out.stderr[-3000:]


def test_items_dropped_at_the_memory_cap_are_counted_by_close(tmp_path):
    """The spool cannot be written (its parent is a file): items live in memory, those beyond
    ``memory_items`` are dropped, and close() counts every one of them."""
    from mlflow_eigencam._records import Item
    from mlflow_eigencam.sink import MlflowSink

    (tmp_path / "a-file").write_text("x")
    sink = MlflowSink(tmp_path / "a-file" / "spool", run_id="c" * 32, tracking_uri=dead_uri(),
                      memory_items=2, backoff=(5.0, 5.0))
    with pytest.warns(EigenCAMWarning):
        for i in range(5):
            sink.submit(Item("tags", "c" * 32, None, tags={"mlflow_eigencam.version": str(i)}))
        left = sink.close(timeout=0.3)
    assert left == 5 and left.in_memory == 2 and left.dropped == 3 and left.records == []
    assert "3 item(s) were dropped" in left.message()
