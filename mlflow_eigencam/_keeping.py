"""What a sink keeps until MLflow confirmed it: its spool folder and the items waiting in it.

:class:`SpoolKeeper` is the spool-keeping half of :class:`.sink.MlflowSink` (the other half,
the sink itself, decides what to send when): the write-ahead record of each submitted item,
the cap on the spool's bytes (``spool_max_bytes``), the compaction of waiting records while
MLflow cannot take them, the sink's folder with its lock and run file, the folders dead
loggers left for the same run, and how many in-memory copies are kept. The formats and the
folder rules are in :mod:`._records` and :mod:`._spool`; this is the state of one sink.

Both halves share one lock (the sink's ``RLock``, handed to the keeper): :attr:`items` is
read and changed by the training thread (``submit``) and the sender alike, always under it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _layout, _spool, _table
from ._records import RECORD_FORMAT as _RECORD_FORMAT, Encoded, Item, item_from_record, item_to_record
from ._spool import SpoolError

__all__ = ["COMPACT_BYTES", "Entry", "SpoolKeeper"]

_log = logging.getLogger("mlflow_eigencam")

#: Spool bytes kept as raw pixels (cheap for the training thread to write); beyond them, while
#: MLflow is unreachable, the sender encodes waiting records in place.
COMPACT_BYTES = 64 << 20


@dataclass
class Entry:
    """One item waiting for MLflow: its copy in memory, its record on disk, or both."""

    item: Optional[Item]  # None: only on disk (adopted from a dead process, or evicted)
    path: Optional[Path]  # None: only in memory (the spool could not be written)
    submitted: float
    origin: Optional[Path] = None  # the dead logger's folder an adopted record came from


class SpoolKeeper:
    """The items of one sink, on disk and in memory, and the folder that holds them.

    Args:
        root: Spool root (a folder the package made, or one it uses a sub-folder of).
        uid: Unique per sink and process: in its folder's and its records' names.
        lock: The sink's lock: :attr:`items` and the byte counts are only touched under it.
        run_info: The run the records go to, as the run file records it (``tracking_uri``,
            ``run_id``, ``experiment_id``, ``experiment_name``, ``creates_run``); asked
            each time the file is written (the sender may create the run later).
        queue_warning: ``(kind, message)``: a warning for the user, once per kind.
        memory_items, spool_max_bytes, thin_every: As in :class:`.sink.MlflowSink`.
    """

    def __init__(self, root: Path, uid: str, lock: threading.RLock, *,
                 run_info: Callable[[], Dict[str, Any]], queue_warning: Callable[[str, str], None],
                 memory_items: int, spool_max_bytes: Optional[int], thin_every: int) -> None:
        self.root, self.uid = root, uid
        self._lock = lock
        self._run_info = run_info
        self._queue_warning = queue_warning
        self._memory_items = memory_items
        self.spool_max_bytes, self.thin_every = spool_max_bytes, thin_every
        #: Items not yet confirmed by MLflow, by record name (submit order).
        self.items: Dict[str, Entry] = {}
        self._seq = itertools.count()
        #: Bytes of the records this sink holds on disk (written or taken over, not yet sent).
        self.spool_bytes = 0
        self._record_bytes: Dict[str, int] = {}
        #: Bundles spooled without their images at the cap (reported by close()).
        self.images_not_kept = 0
        self.folder: Optional[Path] = None
        self._root_used: Optional[Path] = None
        self.folder_lock: Optional[_spool.FolderLock] = None
        self.end_status: Optional[str] = None
        #: Spool bytes beyond which, while MLflow is unreachable, the sender encodes the
        #: images of waiting records in place (see :meth:`compact_one`).
        self.compact_bytes = COMPACT_BYTES
        self.compacted: set = set()
        self.dir_dirty = False
        #: Records written by the training thread whose data the sender has not fsynced yet.
        self._unsynced: List[Path] = []
        #: Why the spool cannot be written (None: it can): items are then kept in memory.
        self.disk_error: Optional[str] = None
        self._disk_retry_at = 0.0
        self._logged: set = set()

    @property
    def spool_dir(self) -> Path:
        """This sink's folder once it wrote something, else the root it will use."""
        if self.folder is not None:
            return self.folder
        try:
            return _spool.own_root(self.root, create=False)
        except SpoolError:
            return self.root

    def new_name(self) -> str:
        """The record name of the next item: sorts in submit order (under the lock)."""
        return f"{time.time_ns():020d}-{self.uid}-{next(self._seq):06d}{_spool.RECORD_SUFFIX}"

    # -- the training thread's side ---------------------------------------------------------
    def apply_cap(self, item: Item) -> None:
        """The spool cap (``spool_max_bytes``), on a bundle about to be spooled: one warning
        at 80 %; at the cap its images (cards, image-series files, grid) are kept only when
        its epoch is a multiple of ``thin_every``, at twice the cap never. Its table rows
        (``image`` then ``""``), metrics and tags are always kept. Never silent: a warning
        at the cap, and every bundle spooled without its images is counted for close()."""
        cap = self.spool_max_bytes
        if cap is None or item.kind != "bundle" or not item.files:
            return
        used, where = self.spool_bytes, self.folder or self.spool_dir
        if used >= 0.8 * cap:
            self._queue_warning("spool-80", (
                f"mlflow_eigencam: the spool {where} holds {used / 1e6:.0f} MB that MLflow has "
                f"not confirmed, {100 * used / cap:.0f} % of spool_max_bytes={cap}; at the cap "
                f"an epoch keeps its images only when it is a multiple of {self.thin_every} "
                f"(table rows and metrics always), at twice the cap none"))
        epoch = int(item.once[1]) if item.once is not None else None
        if used < cap or (used < 2 * cap and epoch is not None and epoch % self.thin_every == 0):
            return
        files: Dict[str, Any] = {}
        for path, payload in item.files.items():
            name = path.rsplit("/", 1)[-1]
            if path.endswith((".png", ".webp")):
                continue
            if isinstance(payload, bytes) and (path in (item.tables or [])
                                               or _layout.TABLE_PART_RE.match(name)):
                payload = _table.without_images(payload)
            files[path] = payload
        item.files, item.grids = files, None
        self.images_not_kept += 1
        msg = (f"mlflow_eigencam: the spool {where} is at spool_max_bytes={cap} "
               f"({used / 1e6:.0f} MB) while MLflow has not confirmed its items; epochs are "
               f"now spooled without their images except every {self.thin_every}th (their "
               f"table rows and metrics are kept); close() counts the epochs without images")
        self._queue_warning("spool-cap", msg)
        if "logged-spool-cap" not in self._logged:
            self._logged.add("logged-spool-cap")
            _log.warning(msg)

    def _count_record(self, name: str, path: Path) -> None:
        """Add a record's size to :attr:`spool_bytes` (under the lock)."""
        try:
            size = path.stat().st_size
        except OSError:
            return
        self.spool_bytes += size - self._record_bytes.get(name, 0)
        self._record_bytes[name] = size

    def write_ahead(self, name: str, item: Item, warn: bool = True) -> Optional[Path]:
        """Write ``item``'s record (renamed into place, not fsynced yet); None when the spool
        cannot be written (said once; retried 30 s later)."""
        if self.disk_error is not None and time.monotonic() < self._disk_retry_at:
            return None
        try:
            folder = self.ensure_folder()
            header, blobs = item_to_record(item)
            # Written and renamed here, fsynced by the sender a moment later: once renamed,
            # the record survives the death of this process (SIGKILL, OOM kill, a crash), which
            # is the promise; the fsync only guards against an OS crash or power loss, and it
            # was half of the training thread's cost (about 3.5 of 7 ms per epoch).
            path = _spool.write_record(folder, name, header, blobs, fsync=False)
        except (OSError, SpoolError) as exc:
            self._disk_failed(exc, warn)
            return None
        with self._lock:
            self._unsynced.append(path)
            self._count_record(name, path)
        self.dir_dirty = True
        if self.disk_error is not None:
            _log.warning("mlflow_eigencam: the spool %s can be written again", self.folder)
            self.disk_error = None
        return path

    def _disk_failed(self, exc: BaseException, warn: bool) -> None:
        code = getattr(exc, "errno", None)
        import errno as _errno

        name = _errno.errorcode.get(code, str(code)) if code is not None else type(exc).__name__
        where = self.folder or self.root
        self.disk_error = f"{name}: {getattr(exc, 'strerror', None) or exc}"
        self._disk_retry_at = time.monotonic() + 30.0
        msg = (f"mlflow_eigencam: cannot write the spool in {where} ({self.disk_error}); "
               f"EigenCAM items are sent to MLflow from memory, so what is not sent yet is "
               f"lost if this process dies. Free space or pass a writable spool_dir.")
        _log.warning(msg)
        if warn:
            self._queue_warning("disk", msg)

    def trim_memory(self, keep: int) -> int:
        """Keep nothing in memory that is on disk beyond what the sender is about to send:
        the oldest ``keep`` copies of items that are records (the sink passes 0 while MLflow
        is unreachable: re-read when sent; else ``lag_limit``, their early-encoded images
        are used). Items only in memory beyond ``memory_items`` are dropped and reported;
        returns how many were dropped (the sink counts them)."""
        dropped = 0
        with self._lock:
            on_disk = [e for _, e in sorted(self.items.items())
                       if e.item is not None and e.path is not None]
            for entry in on_disk[keep:]:
                entry.item = None
            only_here = [n for n, e in sorted(self.items.items())
                         if e.item is not None and e.path is None]
            for n in only_here[:max(0, len(only_here) - self._memory_items)]:
                del self.items[n]
                dropped += 1
                self._queue_warning("dropped", (
                    f"mlflow_eigencam: the spool cannot be written and more than "
                    f"{self._memory_items} items wait for MLflow; the oldest are dropped"))
        return dropped

    # -- the folder and its run file ----------------------------------------------------------
    def ensure_folder(self) -> Path:
        """This sink's folder, made (marked, locked, with its run file) on first use."""
        with self._lock:
            if self.folder is None or not os.path.isdir(self.folder):
                root = _spool.own_root(self.root, create=True)
                folder = _spool.new_folder(root, self._run_info()["run_id"], self.uid)
                lock = _spool.FolderLock(folder)
                lock.acquire()
                self.folder_lock = lock
                self.folder, self._root_used = folder, root
                self.write_run_file()
            return self.folder

    def write_run_file(self) -> None:
        if self.folder is None:
            return
        _spool.write_json(self.folder, _spool.RUN_FILE, {
            "format": _RECORD_FORMAT, **self._run_info(), "end_status": self.end_status,
            "pid": os.getpid(), "created": time.time()})

    def update_run_file(self, end_status: Optional[str] = None) -> None:
        """Rewrite the run file when there is a folder (the run is known now); with
        ``end_status``: items are left in a run the sink creates, so say how the run should
        end once ``send-spool`` (:mod:`._recovery`) delivered them."""
        with self._lock:
            if self.folder is None:
                return
            try:
                if end_status is not None:
                    self.end_status = end_status
                self.write_run_file()
            except OSError as exc:
                _log.warning("mlflow_eigencam: cannot update %s: %s", self.folder, exc)

    def leftovers(self) -> Tuple[List[Path], int]:
        """At close: one more try at putting items that only live in memory on disk; returns
        the records left and the count of items still only in memory."""
        with self._lock:
            for name, entry in list(self.items.items()):
                if entry.path is None and entry.item is not None:
                    entry.path = self.write_ahead(name, entry.item, warn=False)
            records = sorted(e.path for e in self.items.values() if e.path is not None)
            in_memory = sum(1 for e in self.items.values() if e.path is None)
        return records, in_memory

    def release(self, records_left: bool) -> None:
        """At close, once the sender stopped: remove the folder when nothing is left in it,
        let go of its lock."""
        if self.folder is not None and not records_left:
            _spool.remove_folder_if_done(self.folder)
        if self.folder_lock is not None:
            self.folder_lock.release()
            self.folder_lock = None
        if self.folder is not None and not os.path.isdir(self.folder):
            self.folder = None

    # -- the sender's side ------------------------------------------------------------------
    def sync(self) -> None:
        """fsync the records written since the last call, then the folder naming them."""
        with self._lock:
            unsynced, self._unsynced = self._unsynced, []
        for path in unsynced:  # the data first, then the folder that names them
            _spool.fsync_file(path)
        if self.dir_dirty and self.folder is not None:
            self.dir_dirty = False
            _spool.fsync_dir(self.folder)  # the renames of the records just written

    def forget(self, name: str) -> None:
        """The item is no longer this sink's to send (its record, if any, is left alone)."""
        with self._lock:
            self.items.pop(name, None)
            self.spool_bytes -= self._record_bytes.pop(name, 0)

    def delete(self, name: str, entry: Entry) -> None:
        """The item is done with (delivered, or a repeat): forget it and delete its record."""
        with self._lock:
            self.forget(name)
            if entry.path is not None:
                _spool._unlink_quiet(entry.path)
                self.dir_dirty = True

    def compact_one(self) -> bool:
        """While MLflow cannot take them and the spool holds over :attr:`compact_bytes`:
        rewrite one record that holds raw pixels with its images encoded (PNG / WebP),
        under the same name (temporary name, fsync, rename: a crash leaves the old record or
        the new one). Measured at 5 samples of 224x224: 2.9 -> 0.9 MB per epoch for smooth
        images, 4.9 -> 3.1 MB for noise; 0.04-0.6 s of encoding, paid here and not on the
        training thread. Returns whether a record was rewritten."""
        if self.spool_bytes <= self.compact_bytes:
            return False
        with self._lock:
            todo = [(n, e.path) for n, e in sorted(self.items.items())
                    if e.path is not None and n not in self.compacted]
        for name, path in todo:
            self.compacted.add(name)
            try:
                item = item_from_record(path)
                raw = [v for v in (item.files or {}).values()
                       if isinstance(v, Encoded) and not v.ready]
                if not raw:
                    continue
                for payload in raw:
                    payload.data()
                header, blobs = item_to_record(item)
                del item, raw
                with self._lock:
                    if name not in self.items:
                        return True
                    _spool.write_record(path.parent, path.name, header, blobs, fsync=True)
                    self._count_record(name, path)
                    self.dir_dirty = True
            except (OSError, SpoolError, ValueError, TypeError) as exc:  # its send reports it
                _log.debug("mlflow_eigencam: not compacted %s: %s", path, exc)
                continue
            return True
        return False

    def adopt(self, run_id: Optional[str], tracking_uri: Optional[str]) -> None:
        """Take over the records that dead loggers left for this run (same run, same URI)."""
        if run_id is None:
            return
        try:
            root = _spool.own_root(self.root, create=False)
        except SpoolError:
            return
        if not _spool.is_marked(root):
            return
        for other in _spool.child_folders(root):
            if other == self.folder:
                continue
            try:
                info = _spool.read_json(other / _spool.RUN_FILE)
            except SpoolError as exc:  # a FIFO, a symlink, garbage: never waited on
                _log.warning("mlflow_eigencam: skipped spool folder %s: %s", other, exc)
                continue
            except (OSError, ValueError):
                continue
            if info.get("run_id") != run_id or info.get("tracking_uri") not in (None, tracking_uri):
                continue
            lock = _spool.FolderLock(other)
            try:
                if not lock.acquire():
                    continue  # a live logger's folder
            except (OSError, SpoolError) as exc:
                _log.warning("mlflow_eigencam: skipped spool folder %s: %s", other, exc)
                continue
            try:
                records = _spool.record_paths(other)
                if records:
                    mine = self.ensure_folder()
                for rec in records:
                    target = mine / rec.name
                    os.rename(rec, target)
                    with self._lock:
                        self.items[rec.name] = Entry(None, target, time.monotonic(), other)
                        self._count_record(rec.name, target)
                if records:
                    _log.warning("mlflow_eigencam: sending %d item(s) a previous process left "
                                 "in %s", len(records), other)
                    self.dir_dirty = True
                _spool.remove_folder_if_done(other)
            finally:
                lock.release()
