"""Recovery: what is left after a process ends. The ``send-spool`` command
(:func:`send_spool`) sends spools that dead or closed loggers left, and the package's one exit
hook gives the senders still open a short while to finish.

A run the package created (a logger with no run, or ``send-spool`` for a spool recorded before
its run existed) is ended here once its spool is sent: with the status its logger recorded
at ``close()`` when there is one, else ``FINISHED`` when everything arrived and ``FAILED``
when items are left (a later ``send-spool`` that sends them ends it ``FINISHED``).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Set, Tuple

from . import _spool, _transport
from ._records import RUN_ID as _RUN_ID, ForeignRecord, item_from_record
from ._spool import SpoolError, default_spool_root
from ._transport import Failure, SendError

__all__ = ["ATEXIT_TIMEOUT", "send_spool", "spool_folders"]

_log = logging.getLogger("mlflow_eigencam")

#: Seconds the exit hook lets the senders left open finish (their records stay anyway).
ATEXIT_TIMEOUT = 3.0


#: Senders that took an item and were not closed: held strongly, so that a logger a script
#: dropped without close() is still flushed, and reported, at exit.
_open: Set[Any] = set()
_open_lock = threading.Lock()


def track(sink: Any) -> None:
    """``sink`` (a :class:`.sink.MlflowSink`) holds items: close it at exit if still open."""
    with _open_lock:
        _open.add(sink)


def untrack(sink: Any) -> None:
    """``sink`` was closed."""
    with _open_lock:
        _open.discard(sink)


@atexit.register
def _close_at_exit() -> None:
    """The package's one exit hook. A script that never calls close(): give the senders a
    short while to finish, end the runs they created if all arrived, and warn with what is
    left. What they cannot send is on disk already (the record is the guarantee, not this)."""
    deadline = time.monotonic() + ATEXIT_TIMEOUT
    with _open_lock:
        sinks = list(_open)
    for sink in sinks:
        try:
            sink.close(max(0.2, deadline - time.monotonic()), end_run=sink.owns_run)
        except Exception:
            pass


def spool_folders(spool: str | os.PathLike | None = None) -> List[Path]:
    """The per-logger folders to send: every one under the default root (``spool=None``),
    every one under a root given, or the one folder given.

    Raises:
        SpoolError: ``spool`` is not a folder made by mlflow_eigencam.
    """
    if spool is None:
        root = default_spool_root()
        try:
            own = _spool.own_root(root, create=False)
        except SpoolError:
            return []
        return list(_spool.child_folders(own)) if _spool.is_marked(own) else []
    folder = Path(spool)
    if not folder.is_dir():
        raise FileNotFoundError(f"spool folder {str(folder)!r} does not exist")
    if _spool.is_marked(folder):
        if os.path.lexists(folder / _spool.RUN_FILE):
            return [folder]
        return list(_spool.child_folders(folder))
    if _spool.is_marked(folder / _spool.SUBDIR):
        return list(_spool.child_folders(folder / _spool.SUBDIR))
    raise SpoolError(f"{str(folder)!r} is not a mlflow_eigencam spool (no {_spool.MARKER} "
                     f"file): nothing sent, nothing touched")


def send_spool(spool: str | os.PathLike | None = None, *, tracking_uri: Optional[str] = None,
               timeout: Optional[float] = None, retarget: bool = False,
               report: Optional[Callable[[str], None]] = None) -> Tuple[int, int]:
    """Send what dead or closed loggers left in spools, oldest item first.

    The spool is untrusted input: no symlink is followed, only records (which hold their
    files inside them) are read and each is checked, and the destination is
    ``tracking_uri`` or ``$MLFLOW_TRACKING_URI``, never a URI read from the spool. A folder
    recorded for another URI is refused (shown) unless ``retarget=True``; a record naming
    another run than its folder is refused. Folders a live logger holds are skipped.

    Args:
        spool: A folder named in a warning, a spool root, or None for every spool under
            :func:`default_spool_root`.
        tracking_uri: Where to send; default ``$MLFLOW_TRACKING_URI``.
        timeout: Stop after this many seconds (None: until done or the server is unreachable).
        retarget: Send folders recorded for another tracking URI to this one.
        report: Called with one line per folder (the CLI prints them).

    Returns:
        (sent, left): items sent, and items not in MLflow after this call: those still
        waiting plus those this call set aside in ``failed/`` (rejected by MLflow, a deleted
        run, or refused as holding what the logger never writes).

    Raises:
        SpoolError: no destination, or ``spool`` is not a spool of this package.
    """
    say = report or (lambda line: _log.warning("%s", line))
    folders = spool_folders(spool)
    dest = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not dest:
        recorded = set()
        for f in folders:
            try:
                recorded.add(str(_spool.read_json(f / _spool.RUN_FILE).get("tracking_uri")))
            except (OSError, SpoolError, ValueError):
                pass
        raise SpoolError("no destination: pass --tracking-uri URI or set MLFLOW_TRACKING_URI "
                         f"(the spool was recorded for: {', '.join(sorted(recorded)) or '?'})")
    start = time.monotonic()
    sent = left = 0
    root_links: Set[str] = set()
    for parent in {f.parent for f in folders} | ({Path(spool)} if spool else set()):
        root_links.update(str(parent / n) for n in _spool.symlinked_entries(parent))
    for link in sorted(root_links):
        say(f"{link}: a symlink; not followed")
    for folder in folders:
        records = _spool.record_paths(folder)
        links = _spool.symlinked_entries(folder)
        if links:
            say(f"{folder}: symlinks not followed: {', '.join(links)}")
        odd = _spool.odd_entries(folder)
        if odd:
            say(f"{folder}: not regular files, never opened: {', '.join(odd)}")
        if timeout is not None and time.monotonic() - start > timeout:
            left += len(records)
            continue
        problem = _spool.failed_dir_problem(folder)
        if problem:
            say(f"{folder}: skipped: {problem}, so nothing could be set aside safely; "
                f"{len(records)} item(s) kept")
            left += len(records)
            continue
        lock = _spool.FolderLock(folder)
        try:
            got = lock.acquire()
        except (OSError, SpoolError) as exc:
            say(f"{folder}: cannot lock ({exc}); skipped")
            left += len(records)
            continue
        if not got:
            say(f"{folder}: in use by a running logger; skipped")
            left += len(records)
            continue
        try:
            n_sent, n_left = _send_folder(folder, records, dest, retarget, timeout, start, say)
            sent += n_sent
            left += n_left
        finally:
            lock.release()
    return sent, left


def _send_folder(folder: Path, records: List[Path], dest: str, retarget: bool,
                 timeout: Optional[float], start: float, say: Callable[[str], None]
                 ) -> Tuple[int, int]:
    try:
        info = _spool.read_json(folder / _spool.RUN_FILE)
    except (OSError, SpoolError, ValueError) as exc:
        say(f"{folder}: refused: no readable {_spool.RUN_FILE} ({exc})")
        return 0, len(records)
    recorded = info.get("tracking_uri")
    if recorded and recorded != dest and not retarget:
        say(f"{folder}: refused: recorded for {recorded}, not {dest} (pass that URI, or "
            f"--retarget to send it to {dest})")
        return 0, len(records)
    run_id = info.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.match(run_id)):
        say(f"{folder}: refused: bad run id {run_id!r}")
        return 0, len(records)
    sent = aside = 0

    def put_aside(path: Path, why: str, what: str) -> int:
        """Set one record aside in ``failed/`` (it is not in MLflow: counted as left)."""
        try:
            kept = _spool.set_aside(folder, path, why)
        except (OSError, SpoolError) as exc:
            say(f"{path.name}: {what} ({why}); cannot set it aside ({exc}), left in place")
            return 0
        say(f"{path.name}: {what} ({why}); set aside in {kept.parent}")
        return 1

    for i, path in enumerate(records):
        if timeout is not None and time.monotonic() - start > timeout:
            return sent, len(records) - i + aside
        try:
            item = item_from_record(path)
        except ForeignRecord as exc:
            aside += put_aside(path, str(exc), "refused, nothing of it sent")
            continue
        except (OSError, SpoolError) as exc:
            say(f"{path}: refused: {exc}")
            continue
        if item.run_id is not None and run_id is not None and item.run_id != run_id:
            aside += put_aside(path, f"names run {item.run_id}, its folder is for run {run_id}",
                               "refused, nothing of it sent")
            continue
        if run_id is None:
            try:
                # The experiment that was active when the logger started; an id recorded
                # for another server (--retarget) means nothing here.
                same = not recorded or recorded == dest
                run_id = _transport.create_run(
                    dest, info.get("experiment_id") if same else None,
                    info.get("experiment_name") if same else None)
            except SendError as exc:
                say(f"{folder}: cannot create a run at {dest}: {exc}")
                return sent, len(records) - i + aside
            info.update(run_id=run_id, tracking_uri=dest, creates_run=True)
            _spool.write_json(folder, _spool.RUN_FILE, info)
            say(f"{folder}: created run {run_id} at {dest}")
        item.run_id, item.tracking_uri = run_id, dest
        try:
            _transport.send_item(item, workdir=folder)
        except SendError as exc:
            if exc.kind is Failure.REPEAT:  # the run has this epoch: the first one stands
                say(f"{path.name}: not sent: {exc} (the first logged epoch is kept)")
                _spool._unlink_quiet(path)
                continue
            if exc.kind is Failure.REJECTED:
                aside += put_aside(path, str(exc), "rejected by MLflow, NOT delivered")
                continue
            say(f"{folder}: stopped: {exc}; {len(records) - i} item(s) kept")
            _end_created_run(folder, info, run_id, dest, len(records) - i + aside, say)
            return sent, len(records) - i + aside
        _spool._unlink_quiet(path)
        sent += 1
    _spool.fsync_dir(folder)
    remaining = len(_spool.record_paths(folder))
    say(f"{folder}: run {run_id} at {dest}: sent {sent}, {remaining} left"
        + (f", {aside} set aside in {folder / _spool.FAILED_DIR} (NOT delivered)" if aside
           else ""))
    _end_created_run(folder, info, run_id, dest, remaining + aside, say)
    if not remaining:
        _spool.remove_folder_if_done(folder)
    return sent, remaining + aside


def _end_created_run(folder: Path, info: dict, run_id: Optional[str], dest: str, left: int,
                     say: Callable[[str], None]) -> None:
    """End a run the package created (else it stays RUNNING forever): as its logger's
    ``close()`` recorded (``end_status`` in the folder's run file), else ``FINISHED`` when
    nothing is left and ``FAILED`` when items are. A run that already ended keeps its end
    unless this send completed it. The user's own runs are never touched."""
    if not info.get("creates_run") or run_id is None:
        return
    recorded = info.get("end_status")
    status = recorded if recorded in ("FINISHED", "FAILED", "KILLED") else (
        "FAILED" if left else "FINISHED")
    current = _transport.run_status(dest, run_id)
    if current is None or (current != "RUNNING" and not (left == 0 and current == "FAILED")):
        return
    try:
        _transport.end_run(dest, run_id, status)
    except SendError as exc:
        say(f"{folder}: cannot end run {run_id}: {exc}")
        return
    say(f"{folder}: ended run {run_id} ({status})")
