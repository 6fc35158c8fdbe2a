"""The only module that talks to MLflow: a write-ahead spool on disk that a sender drains.

The promise, and how it is kept:

* **Nothing returned is lost.** :meth:`MlflowSink.submit` writes the item to the spool before
  it returns: one record file, written under a temporary name and renamed (see
  :mod:`._spool`), which outlives the process; the sender fsyncs it a moment later, against
  an OS crash. The training thread pays for that write (raw pixel arrays, no encoding:
  about 1.5 ms per epoch) and for nothing else. A background sender encodes the images,
  uploads, and deletes the record only once MLflow confirmed it. A process that is killed,
  crashes or never calls ``close()`` leaves its records; the next logger on the same run
  sends them, and ``mlflow-eigencam send-spool`` (no argument) sends every spool left.
* **Nothing of the user's is touched.** Spools live in folders the package created and
  marked; only our own file names inside them are ever deleted.
* **Loud when the promise cannot be kept.** A spool that cannot be written warns once (folder
  and errno) and items are sent from memory; 401/403 keep the items and say so; ``close()``
  returns an :class:`Undelivered` count that says what is left and where.
* **Never blocks training.** ``import mlflow``, run creation, the ``/health`` probe and every
  request run on the sender thread.
* **Bounded lag.** When items pile up (cores saturated, slow server) the training thread
  encodes the images itself instead of queueing more work for a starved sender
  (``lag_limit``), and early encodes stop.

Items and their records are in :mod:`._records`, the folders and files on disk in
:mod:`._spool`; this module sends, and is the only one that imports MLflow.

Why a health probe: MLflow's own HTTP client retries a down server for minutes. Before sending
to an ``http(s)://`` tracking URI the sender asks ``/health`` with a short timeout.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple


from . import _layout
from . import _spool
from ._records import (RECORD_FORMAT as _RECORD_FORMAT, RUN_ID as _RUN_ID, Encoded, Item,
                       _FILES_DIR, _checked_file, _safe_relative, _write_payload,
                       item_from_record, item_to_record, read_item, write_item)
from ._spool import SpoolError

__all__ = ["EigenCAMWarning", "Encoded", "Item", "MlflowSink", "Undelivered",
           "default_spool_root", "item_from_record", "item_to_record", "probe", "read_item",
           "send_item", "send_spool", "write_item"]

from .errors import EigenCAMWarning

_log = logging.getLogger("mlflow_eigencam")

#: Environment variable that moves the default spool root.
SPOOL_ENV = "MLFLOW_EIGENCAM_SPOOL_DIR"


def default_spool_root() -> Path:
    """Root folder of spools: ``$MLFLOW_EIGENCAM_SPOOL_DIR`` or ``~/.cache/mlflow_eigencam/spool``."""
    env = os.environ.get(SPOOL_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "mlflow_eigencam" / "spool"


# -- MLflow ---------------------------------------------------------------------------------
class Unreachable(Exception):
    """The tracking server did not answer; the item stays in the spool."""


class Refused(Unreachable):
    """MLflow said 401/403: the items are kept (never set aside) and retried with backoff."""


class Unexpected(Unreachable):
    """An error that is neither the network nor MLflow's verdict: retried a few times, then
    the item is set aside (so one bad item cannot hold the others back forever)."""


class PermanentError(Exception):
    """MLflow refused the item for good (bad run id, bad value); it is set aside."""


def probe(tracking_uri: str, timeout: float = 2.0) -> bool:
    """True when ``tracking_uri`` is a local store or an HTTP server that answers ``/health``."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user's URI)
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except Exception:
        return False


_clients: Dict[str, Any] = {}
_clients_lock = threading.Lock()


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    with _clients_lock:
        if tracking_uri not in _clients:
            _clients[tracking_uri] = MlflowClient(tracking_uri=tracking_uri)
        return _clients[tracking_uri]


_AUTH = re.compile(r"\b(401|403)\b|PERMISSION_DENIED|UNAUTHENTICATED|Unauthorized|Forbidden")


def _classify(exc: BaseException) -> Exception:
    """The sink's view of an error from MLflow: Refused, Unreachable or PermanentError."""
    from mlflow.exceptions import MlflowException

    text = f"{type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, (Unreachable, PermanentError)):
        return exc
    if _AUTH.search(str(exc)) or getattr(exc, "error_code", "") in ("PERMISSION_DENIED",
                                                                      "UNAUTHENTICATED"):
        return Refused(text)
    if isinstance(exc, MlflowException):
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST",
                                              "INVALID_PARAMETER_VALUE", "INVALID_STATE",
                                              "BAD_REQUEST"):
            return PermanentError(text)
        return Unreachable(text)
    if isinstance(exc, SpoolError):
        return PermanentError(text)
    if isinstance(exc, OSError):  # refused sockets, disk errors on a local store
        return Unreachable(text)
    if type(exc).__module__.startswith(("requests", "urllib3")):
        return Unreachable(text)
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        return PermanentError(text)  # what the item holds is wrong: retrying will not help
    return Unexpected(text)  # e.g. "can't register atexit after shutdown": keep the item


def send_item(item: Item, *, workdir: Optional[Path] = None) -> None:
    """Send one item to MLflow synchronously (from the sender thread or ``send-spool``).

    Args:
        item: What to send; ``run_id`` and ``tracking_uri`` must be set.
        workdir: Folder to lay the upload out in (the spool folder: same filesystem as a
            local artifact store, so files are moved, not copied); default the system's.

    Raises:
        Refused: 401/403 (keep the item, say so, retry later).
        Unreachable: the server is down or answered 5xx (keep the item, retry later).
        PermanentError: MLflow rejected the item (set it aside, go on).
    """
    if not item.tracking_uri or not item.run_id:
        raise PermanentError("item has no tracking URI or run id")
    if not probe(item.tracking_uri):
        raise Unreachable(f"no answer from {item.tracking_uri}/health")
    try:
        client = _client(item.tracking_uri)
        if item.kind == "bundle":
            _send_bundle(client, item, workdir)
        elif item.kind == "tags":
            _log_batch(client, item.run_id, [], item.tags or {})
        else:
            raise PermanentError(f"unknown item kind {item.kind!r}")
    except Exception as exc:
        raise _classify(exc) from exc


_run_locks: Dict[Tuple[str, str], threading.Lock] = collections.defaultdict(threading.Lock)
_run_locks_lock = threading.Lock()
#: The table of each (uri, run, path) as this process last uploaded it: merged into, never
#: replaced (a resumed run, a second logger on the run and a retry all append).
_table_cache: Dict[Tuple[str, str, str], dict] = {}


def _run_lock(item: Item) -> threading.Lock:
    with _run_locks_lock:
        return _run_locks[(item.tracking_uri, item.run_id)]


def _send_bundle(client, item: Item, workdir: Optional[Path]) -> None:
    from mlflow.entities import Metric

    with _run_lock(item):  # one bundle of a run at a time per process: table merges serialise
        merged: Dict[str, dict] = {}
        if item.files:
            parent = workdir if workdir is not None else (
                item.files_dir.parent.parent if item.files_dir is not None else None)
            staging = _spool.make_staging(parent)
            try:
                files = staging / _FILES_DIR
                files.mkdir()
                written: Dict[int, Path] = {}
                for path, payload in item.files.items():
                    target = files / _safe_relative(path)
                    if path in (item.tables or []):
                        new = _load_table(payload, item)
                        merged[path] = merge_tables(_current_table(client, item, path), new)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_text(json.dumps(merged[path]), encoding="utf-8")
                    elif item.files_dir is not None:
                        _stage_legacy(item.files_dir, path, target, written)
                    else:
                        _write_payload(target, payload, written)
                local = _local_artifact_dir(client, item)
                if local is not None:
                    _move_into(files, local)
                else:
                    client.log_artifacts(item.run_id, str(files))
            finally:
                _spool.remove_staging(staging)
        for path, table in merged.items():
            _table_cache[(item.tracking_uri, item.run_id, path)] = table
        tags = {k: v for k, v in (item.tags or {}).items()
                if (item.run_id, k, v) not in _tags_set}
        tables = [p for p in item.tables or [] if (item.run_id, p) not in _registered_tables]
        if tables:
            # The tag mlflow.log_table writes, so mlflow.load_table and the UI find the tables.
            # Read-modify-write of a run tag: once per (run, table) and process.
            current = json.loads(client.get_run(item.run_id).data.tags.get(
                _layout.MLFLOW_LOGGED_ARTIFACTS, "[]"))
            entries = [{"path": p, "type": "table"} for p in tables]
            if any(e not in current for e in entries):
                tags[_layout.MLFLOW_LOGGED_ARTIFACTS] = json.dumps(
                    current + [e for e in entries if e not in current])
        metrics = [Metric(k, float(v), int(ts), int(s)) for k, v, s, ts in item.metrics or []]
        _log_batch(client, item.run_id, metrics, tags)
        _registered_tables.update((item.run_id, p) for p in tables)
        _tags_set.update((item.run_id, k, v) for k, v in (item.tags or {}).items())


def _stage_legacy(files_dir: Path, path: str, target: Path, written: Dict[int, Path]) -> None:
    """Move (or copy) one listed file of a legacy folder item into the staging folder."""
    src = _checked_file(files_dir, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, target)
    except OSError:
        shutil.copyfile(src, target, follow_symlinks=False)


def _load_table(payload: Any, item: Item) -> dict:
    if isinstance(payload, Path):
        payload = _checked_file(item.files_dir, os.path.relpath(payload, item.files_dir)) \
            .read_bytes() if item.files_dir is not None else payload.read_bytes()
    elif isinstance(payload, Encoded):
        payload = payload.data()
    data = json.loads(payload if isinstance(payload, str) else bytes(payload).decode("utf-8"))
    if not _is_table(data):
        raise PermanentError("a table file is not MLflow's split-orient JSON")
    return data


def _is_table(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("columns"), list)
            and isinstance(data.get("data"), list)
            and all(isinstance(r, list) and len(r) == len(data["columns"]) for r in data["data"]))


def _current_table(client, item: Item, path: str) -> Optional[dict]:
    """The run's table at ``path`` as this process last wrote it, else as MLflow has it."""
    key = (item.tracking_uri, item.run_id, path)
    if key in _table_cache:
        return _table_cache[key]
    local = _local_artifact_dir(client, item)
    raw: Optional[bytes] = None
    if local is not None:
        p = Path(local) / path
        if p.is_file():
            raw = p.read_bytes()
    else:
        parent = path.rsplit("/", 1)[0] if "/" in path else None
        if any(f.path == path for f in client.list_artifacts(item.run_id, parent)):
            import tempfile

            with tempfile.TemporaryDirectory(prefix="mlflow-eigencam-table-") as d:
                raw = Path(client.download_artifacts(item.run_id, path, d)).read_bytes()
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    return data if _is_table(data) else None


def merge_tables(old: Optional[dict], new: dict) -> dict:
    """Rows of ``old`` then ``new``; a row of ``new`` with the same (epoch, sample_index)
    as an earlier one replaces it in place. Columns: ``new``'s, plus any only ``old`` had
    (before the image column)."""
    if old is None:
        old = {"columns": [], "data": []}
    columns = list(new["columns"])
    for c in old["columns"]:
        if c not in columns:
            at = columns.index(_layout.TABLE_IMAGE_COLUMN) if _layout.TABLE_IMAGE_COLUMN in \
                columns else len(columns)
            columns.insert(at, c)
    rows: Dict[Any, dict] = {}
    for n, table in enumerate((old, new)):
        for i, values in enumerate(table["data"]):
            row = dict(zip(table["columns"], values))
            key = (row.get("epoch"), row.get("sample_index"))
            if None in key:
                key = ("#", n, i)
            rows[key] = row  # dicts keep first-insertion order: a replaced row stays in place
    return {"columns": columns, "data": [[r.get(c) for c in columns] for r in rows.values()]}


_local_dirs: Dict[Tuple[str, str], Optional[str]] = {}


def _local_artifact_dir(client, item: Item) -> Optional[str]:
    """The run's artifact folder when MLflow keeps artifacts on this machine's disk, else None.

    Asked once per run. Only a plain path or ``file:`` URI counts (what MLflow serves with
    its ``LocalArtifactRepository``): a server that proxies artifacts (``mlflow-artifacts:``)
    or a cloud store always goes through ``log_artifacts``.
    """
    key = (item.tracking_uri, item.run_id)
    if key not in _local_dirs:
        from urllib.parse import urlparse

        from mlflow.utils.file_utils import local_file_uri_to_path

        uri = client.get_run(item.run_id).info.artifact_uri
        scheme = urlparse(uri).scheme
        local = scheme in ("", "file") or (os.name == "nt" and len(scheme) == 1)  # C:\...
        _local_dirs[key] = local_file_uri_to_path(uri) if local else None
    return _local_dirs[key]


def _move_into(src_dir: Path, dst_dir: str) -> None:
    """Put the staged files where ``LocalArtifactRepository.log_artifacts`` would copy them.

    A rename each instead of a copy (the staging folder is removed next anyway); across
    filesystems it copies. The staging folder is ours, so nothing in it is a symlink.
    """
    for dirpath, _dirs, names in os.walk(src_dir):
        rel = os.path.relpath(dirpath, src_dir)
        target = dst_dir if rel == "." else os.path.join(dst_dir, rel)
        os.makedirs(target, exist_ok=True)
        for name in names:
            src, dst = os.path.join(dirpath, name), os.path.join(target, name)
            try:
                os.replace(src, dst)
            except OSError:  # another filesystem (EXDEV), say
                shutil.copyfile(src, dst)


# What this process already set, per run: a bundle carries them at every epoch, and each costs
# a server round trip (a sqlite commit on a local store).
_registered_tables: set = set()
_tags_set: set = set()


def _log_batch(client, run_id: str, metrics: list, tags: Dict[str, str]) -> None:
    """Metrics and tags in one call (one commit on a local store, one request to a server)."""
    if metrics or tags:
        from mlflow.entities import RunTag

        client.log_batch(run_id, metrics=metrics,
                         tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)


def _create_run(tracking_uri: str, experiment_id: Optional[str]) -> str:
    """Create a run as ``mlflow.start_run()`` would (active experiment, context tags), but
    through the client, so it works from any thread and never becomes a thread's active run."""
    import mlflow
    from mlflow.tracking.context.registry import resolve_tags

    if not probe(tracking_uri):
        raise Unreachable(f"no answer from {tracking_uri}/health")
    try:
        if experiment_id is None:
            experiment_id = mlflow.tracking.fluent._get_experiment_id()
        run = _client(tracking_uri).create_run(str(experiment_id or "0"), tags=resolve_tags())
    except Exception as exc:
        raise _classify(exc) from exc
    return run.info.run_id


class Undelivered(int):
    """What :meth:`MlflowSink.close` could not deliver: the count, where it is, and why.

    Compares and adds as an int (0 when everything arrived).
    """

    records: List[Path]
    in_memory: int
    folder: Optional[Path]
    reason: str

    def __new__(cls, records: List[Path], in_memory: int, folder: Optional[Path],
                reason: str = "") -> "Undelivered":
        obj = super().__new__(cls, len(records) + in_memory)
        obj.records, obj.in_memory = list(records), in_memory
        obj.folder, obj.reason = folder, reason
        return obj

    def message(self) -> str:
        if not self:
            return "mlflow_eigencam: everything was delivered to MLflow"
        parts = []
        if self.records:
            parts.append(f"{len(self.records)} item(s) kept in {self.folder}; send them with: "
                         f"mlflow-eigencam send-spool {self.folder} --tracking-uri URI "
                         f"(or start a logger on the same run)")
        if self.in_memory:
            parts.append(f"{self.in_memory} item(s) only in memory (the spool could not be "
                         f"written) were NOT delivered and are lost when this process ends")
        reason = f" Last error: {self.reason}." if self.reason else ""
        return "mlflow_eigencam: " + "; ".join(parts) + "." + reason


@dataclass
class _Entry:
    item: Optional[Item]  # None: only on disk (adopted from a dead process, or evicted)
    path: Optional[Path]  # None: only in memory (the spool could not be written)
    submitted: float


#: Sinks that took an item and were not closed: held strongly, so that a logger a script
#: dropped without close() is still flushed, and reported, at exit.
_live_sinks: "set[MlflowSink]" = set()
_live_lock = threading.Lock()
#: Seconds the exit handler lets the sinks left open finish sending (records stay anyway).
ATEXIT_TIMEOUT = 3.0


class MlflowSink:
    """Write-ahead spool on disk -> background sender -> MLflow, in submit order.

    Args:
        spool_dir: Spool root (default :func:`default_spool_root`). A folder that exists and
            was not made by the package is used through its sub-folder
            ``mlflow-eigencam-spool``; nothing else in it is touched.
        run_id: The run items go to; None with ``create_run=True``: the sender creates one.
        tracking_uri: Where the run lives; None: ``mlflow.get_tracking_uri()`` on the sender.
        create_run: Create a run (on the sender) when ``run_id`` is None.
        backoff: (first, max) seconds between retries while MLflow is unreachable.
        lag_limit: Items waiting for the sender beyond which the submitting thread encodes
            images itself (bounded lag instead of a growing backlog).
        memory_items: In-memory copies kept of items waiting to be sent (more are re-read
            from their record; items the spool could not take beyond this are dropped,
            counted and reported).
        max_queue: Ignored (kept for compatibility).
    """

    def __init__(self, spool_dir: str | os.PathLike | None = None, *,
                 run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
                 create_run: bool = False, experiment_id: Optional[str] = None,
                 backoff: Tuple[float, float] = (0.5, 10.0), lag_limit: int = 2,
                 memory_items: int = 32, max_queue: Optional[int] = None) -> None:
        self.root = Path(spool_dir) if spool_dir is not None else default_spool_root()
        self.uid = f"{os.getpid()}x{uuid.uuid4().hex[:10]}"
        self._run_id = run_id
        self._tracking_uri = tracking_uri
        self._create = create_run and run_id is None
        self._experiment_id = experiment_id
        self.owns_run = False
        self._run_known = threading.Event()
        if run_id is not None and tracking_uri is not None:
            self._run_known.set()
        self._backoff = backoff
        self.lag_limit = lag_limit
        self._memory_items = memory_items
        self.folder: Optional[Path] = None
        self._root_used: Optional[Path] = None
        self._folder_lock: Optional[_spool.FolderLock] = None
        self._items: Dict[str, _Entry] = {}
        self._seq = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._adopted = False
        self._dir_dirty = False
        #: Records written by the training thread whose data the sender has not fsynced yet.
        self._unsynced: List[Path] = []
        self._disk_error: Optional[str] = None
        self._disk_retry_at = 0.0
        self._state = "ok"  # "down", "refused"
        self._down_since: Optional[float] = None
        self._last_error = ""
        self._pending_warnings: List[str] = []
        self._warned: set = set()
        self._early: "collections.deque[Encoded]" = collections.deque()
        self._failures: Dict[str, int] = {}
        self._niced = False
        self.sent = 0
        self.dropped = 0
        self.set_aside: List[Path] = []
        #: (submitted, confirmed) monotonic seconds of each delivered item, for benchmarks.
        self.delivered: List[Tuple[float, float]] = []
        #: CPU seconds the sender thread used (encoding, sending): what the sink costs the
        #: machine beside training, for benchmarks and diagnostics.
        self.worker_cpu_s = 0.0

    # -- what the logger asks --------------------------------------------------------------
    @property
    def run_id(self) -> Optional[str]:
        return self._run_id

    def wait_run(self, timeout: float) -> Optional[str]:
        """The run id, waiting at most ``timeout`` s for the sender to create it."""
        if self._run_id is None and self._create:
            self._ensure_thread()
            self._wake.set()
            self._run_known.wait(timeout)
        return self._run_id

    @property
    def tracking_uri(self) -> Optional[str]:
        return self._tracking_uri

    @property
    def spool_dir(self) -> Path:
        """This sink's folder once it wrote something, else the root it will use."""
        if self.folder is not None:
            return self.folder
        try:
            return _spool.own_root(self.root, create=False)
        except SpoolError:
            return self.root

    # -- caller side (the training thread) -------------------------------------------------
    def submit(self, item: Item, *, spool_now: bool = False) -> None:
        """Write ``item`` to the spool (atomically) and hand it to the sender.

        When this returns the item is on disk, unless the spool cannot be written (then a
        warning said so once and the item is sent from memory). Never raises for disk or
        network trouble. ``spool_now`` is accepted for compatibility: every item is.
        """
        self._reopen()
        with _live_lock:
            _live_sinks.add(self)
        self._materialize(item)
        with self._lock:
            name = f"{time.time_ns():020d}-{self.uid}-{next(self._seq):06d}{_spool.RECORD_SUFFIX}"
            backlog = len(self._items)
        if backlog >= self.lag_limit and self._state == "ok":
            self._help_encode(item)
        path = self._write_ahead(name, item)
        with self._lock:
            self._items[name] = _Entry(item, path, time.monotonic())
            self._idle.clear()
            self._trim_memory()
        self._ensure_thread()
        self._wake.set()
        self._warn_pending(stacklevel=3)

    def encode_soon(self, *images: Encoded) -> None:
        """Start encoding ``images`` on the sender now, before their item is submitted.

        Only while the sender keeps up: with items waiting, early encodes would only add to
        its backlog, so they are skipped (the images get encoded when sent, or by the
        training thread under back-pressure).
        """
        if self._items or len(self._early) > 64:
            return
        self._early.extend(images)
        self._ensure_thread()
        self._wake.set()

    def pending(self) -> int:
        """Items not yet confirmed by MLflow (on disk or in memory)."""
        return len(self._items)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything was sent (True) or ``timeout`` seconds passed (False)."""
        if not self._items:
            return True
        self._ensure_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._items:
            self._wake.set()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self._idle.wait(0.05 if remaining is None else min(0.05, remaining))
            if self._thread is None or not self._thread.is_alive():
                break
        return not self._items

    def close(self, timeout: Optional[float] = 30.0, *, end_run: bool = False) -> Undelivered:
        """Flush for at most ``timeout`` seconds, stop the sender; returns what is left.

        ``end_run``: mark the run FINISHED if the sender created it and all was sent.
        What is left stays in the spool and a warning names the folder and the command.
        """
        start = time.monotonic()
        done = self.flush(timeout)
        self._warn_pending(stacklevel=2)
        if end_run and done and self.owns_run and self._run_id:
            left_s = None if timeout is None else max(0.5, timeout - (time.monotonic() - start))
            self._bounded(lambda: _client(self._tracking_uri).set_terminated(self._run_id),
                          min(10.0, left_s or 10.0))
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        stuck = self._thread is not None and self._thread.is_alive()
        with self._lock:
            # Items that only lived in memory: one more try at putting them on disk.
            for name, entry in list(self._items.items()):
                if entry.path is None and entry.item is not None:
                    entry.path = self._write_ahead(name, entry.item, warn=False)
            records = sorted(e.path for e in self._items.values() if e.path is not None)
            in_memory = sum(1 for e in self._items.values() if e.path is None)
        self._sync_dir()  # what is left must outlast an OS crash too
        report = Undelivered(records, in_memory, self.folder, self._last_error if
                             (records or in_memory) else "")
        self._closed = True
        with _live_lock:
            _live_sinks.discard(self)
        if report:
            msg = report.message()
            warnings.warn(msg, EigenCAMWarning, stacklevel=2)
            _log.warning(msg)
        if not stuck:
            if self.folder is not None and not records:
                _spool.remove_folder_if_done(self.folder)
            if self._folder_lock is not None:
                self._folder_lock.release()
                self._folder_lock = None
            if self.folder is not None and not os.path.isdir(self.folder):
                self.folder = None
        return report

    # -- the write-ahead step ----------------------------------------------------------------
    def _materialize(self, item: Item) -> None:
        """Read local-file payloads now: the caller deletes them after submit returns."""
        if not item.files:
            return
        read: Dict[int, bytes] = {}
        for path, payload in list(item.files.items()):
            if isinstance(payload, Path):
                if id(payload) not in read:
                    read[id(payload)] = payload.read_bytes()
                item.files[path] = read[id(payload)]

    def _help_encode(self, item: Item) -> None:
        """Back-pressure: the sender is behind, so this thread encodes the images of this
        item and of the waiting ones (the sender then only uploads, and records are smaller)."""
        with self._lock:
            waiting = [e.item for e in self._items.values() if e.item is not None]
        for it in [*waiting, item]:
            for payload in (it.files or {}).values():
                if isinstance(payload, Encoded) and not payload.ready:
                    try:
                        payload.encode_unless_busy()
                    except Exception:  # the send reports a bad image
                        pass

    def _write_ahead(self, name: str, item: Item, warn: bool = True) -> Optional[Path]:
        if self._disk_error is not None and time.monotonic() < self._disk_retry_at:
            return None
        try:
            folder = self._ensure_folder()
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
        self._dir_dirty = True
        if self._disk_error is not None:
            _log.warning("mlflow_eigencam: the spool %s can be written again", self.folder)
            self._disk_error = None
        return path

    def _disk_failed(self, exc: BaseException, warn: bool) -> None:
        code = getattr(exc, "errno", None)
        import errno as _errno

        name = _errno.errorcode.get(code, str(code)) if code is not None else type(exc).__name__
        where = self.folder or self.root
        self._disk_error = f"{name}: {getattr(exc, 'strerror', None) or exc}"
        self._disk_retry_at = time.monotonic() + 30.0
        msg = (f"mlflow_eigencam: cannot write the spool in {where} ({self._disk_error}); "
               f"EigenCAM items are sent to MLflow from memory, so what is not sent yet is "
               f"lost if this process dies. Free space or pass a writable spool_dir.")
        _log.warning(msg)
        if warn:
            self._queue_warning("disk", msg)

    def _ensure_folder(self) -> Path:
        with self._lock:
            if self.folder is None or not os.path.isdir(self.folder):
                root = _spool.own_root(self.root, create=True)
                folder = _spool.new_folder(root, self._run_id, self.uid)
                lock = _spool.FolderLock(folder)
                lock.acquire()
                self._folder_lock = lock
                self.folder, self._root_used = folder, root
                self._write_run_file()
            return self.folder

    def _write_run_file(self) -> None:
        if self.folder is None:
            return
        _spool.write_json(self.folder, _spool.RUN_FILE, {
            "format": _RECORD_FORMAT, "tracking_uri": self._tracking_uri,
            "run_id": self._run_id, "experiment_id": self._experiment_id,
            "creates_run": self._create, "pid": os.getpid(), "created": time.time()})

    def _trim_memory(self) -> None:
        """Keep at most ``memory_items`` in-memory copies: drop the copies of items that are
        on disk first (re-read when sent); items only in memory beyond that are dropped."""
        with_copy = [n for n, e in sorted(self._items.items()) if e.item is not None]
        excess = len(with_copy) - self._memory_items
        for n in with_copy:
            if excess <= 0:
                break
            entry = self._items[n]
            if entry.path is not None:
                entry.item = None
                excess -= 1
        for n in with_copy:
            if excess <= 0:
                break
            entry = self._items[n]
            if entry.path is None and entry.item is not None:
                del self._items[n]
                self.dropped += 1
                excess -= 1
                self._queue_warning("dropped", (
                    f"mlflow_eigencam: the spool cannot be written and more than "
                    f"{self._memory_items} items wait for MLflow; the oldest are dropped"))

    def _queue_warning(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self._pending_warnings.append(msg)

    def _warn_pending(self, stacklevel: int) -> None:
        # Warnings are raised from the caller's thread, where the user (and pytest) sees them.
        while self._pending_warnings:
            warnings.warn(self._pending_warnings.pop(0), EigenCAMWarning,
                          stacklevel=stacklevel + 1)

    def _reopen(self) -> None:
        if self._closed:
            self._closed = False
            self._stop = False

    # -- sender side -------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="mlflow-eigencam-sink",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        # Imported now, not at the first upload: a module that registers an exit hook
        # (MLflow's HTTP artifact uploads use a thread pool) cannot be imported once the
        # interpreter is shutting down, which is when the exit handler may send.
        import concurrent.futures.thread  # noqa: F401

        if self._niced:
            _lower_thread_priority()
        delay = self._backoff[0]
        while True:
            cpu = time.thread_time()
            try:
                self._sync_dir()
                self._encode_early()
                status = self._drain()
            except Exception as exc:  # a bug here must not kill the sender silently
                _log.exception("mlflow_eigencam: sender error: %s", exc)
                self._last_error = f"{type(exc).__name__}: {exc}"
                status = "down"
            self.worker_cpu_s += time.thread_time() - cpu
            if self._stop:
                return
            if status == "down":
                self._wake.wait(timeout=delay)
                delay = min(delay * 2, self._backoff[1])
            else:
                delay = self._backoff[0]
                with self._lock:
                    if not self._items:
                        self._idle.set()
                self._wake.wait(timeout=1.0)
            self._wake.clear()

    def _sync_dir(self) -> None:
        with self._lock:
            unsynced, self._unsynced = self._unsynced, []
        for path in unsynced:  # the data first, then the folder that names them
            _spool.fsync_file(path)
        if self._dir_dirty and self.folder is not None:
            self._dir_dirty = False
            _spool.fsync_dir(self.folder)  # the renames of the records just written

    def _encode_early(self) -> None:
        while self._early and not self._stop:
            try:
                self._early.popleft().data()  # kept by the Encoded object for its item
            except IndexError:
                return
            except Exception as exc:  # the item's own send reports a bad image
                _log.debug("mlflow_eigencam: early encoding failed: %s", exc)

    def _resolve(self) -> None:
        """Tracking URI and run, on this thread: import mlflow, create the run if asked."""
        if self._run_known.is_set():
            return
        if self._tracking_uri is None:
            import mlflow

            self._tracking_uri = str(mlflow.get_tracking_uri())
        if self._run_id is None:
            if not self._create:
                raise PermanentError("no run to log to")
            self._run_id = _create_run(self._tracking_uri, self._experiment_id)
            self.owns_run = True
        with self._lock:
            if self.folder is not None:
                try:
                    self._write_run_file()
                except OSError as exc:
                    _log.warning("mlflow_eigencam: cannot update %s: %s", self.folder, exc)
        self._run_known.set()

    def _drain(self) -> str:
        with self._lock:
            if not self._items and not self._early:
                return "ok"
        if not self._items:
            return "ok"
        try:
            self._resolve()
        except (Unreachable, PermanentError) as exc:  # kept on disk, retried with backoff
            self._mark_down(exc, refused=isinstance(exc, Refused))
            return "down"
        if not self._niced:
            # Only now: the one-off work (import mlflow, the store's first connection, the
            # run) at a low priority took minutes on a loaded machine; uploads can wait.
            self._niced = True
            _lower_thread_priority()
        if not self._adopted:
            self._adopted = True
            try:
                self._adopt()
            except Exception as exc:  # leftovers are a bonus; never stop on them
                _log.warning("mlflow_eigencam: could not take over leftover spools: %s", exc)
        with self._lock:
            names = sorted(self._items)
        for name in names:
            if self._stop and self._closed:
                return "stopped"
            with self._lock:
                entry = self._items.get(name)
            if entry is None:
                continue
            try:
                item = entry.item if entry.item is not None else item_from_record(entry.path)
            except (OSError, SpoolError) as exc:
                self._give_up(name, entry, f"unreadable record: {exc}")
                continue
            if item.run_id not in (None, self._run_id):
                self._give_up(name, entry, f"record for run {item.run_id}, not {self._run_id}")
                continue
            item.run_id, item.tracking_uri = self._run_id, self._tracking_uri
            try:
                send_item(item, workdir=self.folder if self._disk_error is None else None)
            except Refused as exc:
                self._mark_down(exc, refused=True)
                return "down"
            except Unexpected as exc:
                self._failures[name] = self._failures.get(name, 0) + 1
                if self._failures[name] >= 3:
                    self._give_up(name, entry, f"failed 3 times: {exc}")
                    continue
                self._mark_down(exc)
                return "down"
            except Unreachable as exc:
                self._mark_down(exc)
                return "down"
            except PermanentError as exc:
                self._give_up(name, entry, str(exc))
                continue
            # Drop this thread's references first: once the entry is gone, flush() returns,
            # and the item's arrays must not outlive it here.
            del item
            entry.item = None
            with self._lock:
                self._items.pop(name, None)
                if entry.path is not None:
                    _spool._unlink_quiet(entry.path)
                    self._dir_dirty = True
            self.sent += 1
            self.delivered.append((entry.submitted, time.monotonic()))
            if self._state != "ok":
                _log.warning("mlflow_eigencam: MLflow reachable again after %.1f s; sending "
                             "the spool in %s", time.monotonic() - (self._down_since or 0),
                             self.folder)
                self._state, self._down_since = "ok", None
        return "ok"

    def _give_up(self, name: str, entry: _Entry, reason: str) -> None:
        """MLflow refused an item for good: keep its record in ``failed/`` of our folder."""
        with self._lock:
            self._items.pop(name, None)
        where = "it is dropped (it was only in memory)"
        if entry.path is not None and self.folder is not None:
            try:
                kept = _spool.set_aside(entry.path.parent, entry.path, reason)
                self.set_aside.append(kept)
                where = f"kept in {kept.parent}"
            except OSError as exc:
                where = f"left in {entry.path} ({exc})"
        msg = f"mlflow_eigencam: MLflow rejected an item ({reason[:300]}); {where}"
        _log.warning(msg)
        self._queue_warning("rejected", msg)

    def _mark_down(self, exc: BaseException, refused: bool = False) -> None:
        self._last_error = str(exc)[:300]
        where = self.folder or self.spool_dir
        if self._disk_error is not None:
            where = f"memory (the spool in {where} cannot be written: {self._disk_error})"
        if refused:
            self._state = "refused"
            msg = (f"mlflow_eigencam: MLflow refused the upload ({self._last_error}); check "
                   f"your credentials. Items are kept in {where} and retried; nothing is set "
                   f"aside.")
            self._queue_warning("refused", msg)
        else:
            if self._state == "ok":
                self._down_since = time.monotonic()
            self._state = "down"
            what = ("cannot start the MLflow run" if isinstance(exc, PermanentError)
                    else "cannot reach MLflow")
            msg = (f"mlflow_eigencam: {what} ({self._last_error[:200]}); training "
                   f"goes on. EigenCAM images, tables and metrics are kept in {where} and "
                   f"retried with backoff.")
            self._queue_warning("down", msg)
        if f"logged-{self._state}" not in self._warned:
            self._warned.add(f"logged-{self._state}")
            _log.warning(msg)

    def _adopt(self) -> None:
        """Take over the records that dead loggers left for this run (same run, same URI)."""
        if self._run_id is None:
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
            except (OSError, SpoolError, ValueError):
                continue
            if info.get("run_id") != self._run_id or info.get("tracking_uri") not in (
                    None, self._tracking_uri):
                continue
            lock = _spool.FolderLock(other)
            if not lock.acquire():
                continue  # a live logger's folder
            try:
                records = _spool.record_paths(other)
                if records:
                    mine = self._ensure_folder()
                for rec in records:
                    target = mine / rec.name
                    os.rename(rec, target)
                    with self._lock:
                        self._items[rec.name] = _Entry(None, target, time.monotonic())
                if records:
                    _log.warning("mlflow_eigencam: sending %d item(s) a previous process left "
                                 "in %s", len(records), other)
                    self._dir_dirty = True
                _spool.remove_folder_if_done(other)
            finally:
                lock.release()

    @staticmethod
    def _bounded(fn: Callable[[], Any], timeout: float) -> None:
        """Run ``fn`` on a helper thread and wait at most ``timeout`` s for it."""
        def run() -> None:
            try:
                fn()
            except Exception as exc:
                _log.warning("mlflow_eigencam: %s", exc)

        t = threading.Thread(target=run, daemon=True, name="mlflow-eigencam-bounded")
        t.start()
        t.join(timeout)


def _lower_thread_priority() -> None:
    """Let the training threads win the CPU: uploads can wait, an epoch should not (the
    back-pressure in :meth:`MlflowSink.submit` keeps the wait bounded).

    On Linux a thread is a task with its own nice value; elsewhere this does nothing.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


@atexit.register
def _close_at_exit() -> None:
    """A script that never calls close(): give the senders a short while to finish, end the
    runs they created if all arrived, and warn with what is left. What they cannot send is on
    disk already (the record is the guarantee, not this)."""
    deadline = time.monotonic() + ATEXIT_TIMEOUT
    with _live_lock:
        sinks = list(_live_sinks)
    for sink in sinks:
        try:
            sink.close(max(0.2, deadline - time.monotonic()), end_run=sink.owns_run)
        except Exception:
            pass


# -- send-spool ----------------------------------------------------------------------------
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
        (sent, left): items sent and items still waiting.

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
    root_links = set()
    for parent in {f.parent for f in folders} | ({Path(spool)} if spool else set()):
        root_links.update(str(parent / n) for n in _spool.symlinked_entries(parent))
    for link in sorted(root_links):
        say(f"{link}: a symlink; not followed")
    for folder in folders:
        records = _spool.record_paths(folder)
        links = _spool.symlinked_entries(folder)
        if links:
            say(f"{folder}: symlinks not followed: {', '.join(links)}")
        if timeout is not None and time.monotonic() - start > timeout:
            left += len(records)
            continue
        lock = _spool.FolderLock(folder)
        try:
            got = lock.acquire()
        except OSError as exc:
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
    sent = 0
    for i, path in enumerate(records):
        if timeout is not None and time.monotonic() - start > timeout:
            return sent, len(records) - i
        try:
            item = item_from_record(path)
        except (OSError, SpoolError) as exc:
            say(f"{path}: refused: {exc}")
            continue
        if item.run_id is not None and run_id is not None and item.run_id != run_id:
            say(f"{path}: refused: names run {item.run_id}, its folder is for run {run_id}")
            continue
        if run_id is None:
            try:
                run_id = _create_run(dest, info.get("experiment_id"))
            except (Unreachable, PermanentError) as exc:
                say(f"{folder}: cannot create a run at {dest}: {exc}")
                return sent, len(records) - i
            info.update(run_id=run_id, tracking_uri=dest)
            _spool.write_json(folder, _spool.RUN_FILE, info)
            say(f"{folder}: created run {run_id} at {dest}")
        item.run_id, item.tracking_uri = run_id, dest
        try:
            send_item(item, workdir=folder)
        except Unreachable as exc:
            say(f"{folder}: stopped: {exc}; {len(records) - i} item(s) kept")
            return sent, len(records) - i
        except PermanentError as exc:
            kept = _spool.set_aside(folder, path, str(exc))
            say(f"{path.name}: rejected by MLflow ({exc}); kept in {kept.parent}")
            continue
        _spool._unlink_quiet(path)
        sent += 1
    _spool.fsync_dir(folder)
    remaining = len(_spool.record_paths(folder))
    say(f"{folder}: run {run_id} at {dest}: sent {sent}, {remaining} left")
    if not remaining:
        _spool.remove_folder_if_done(folder)
    return sent, remaining
