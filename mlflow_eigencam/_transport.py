"""Talking to MLflow: the health probe, what an error means, sending one item (a bundle's
files, table merge and metrics; a set of tags) and creating a run.

Every call here is synchronous and runs on the sender thread (:mod:`.sink`) or in the
``send-spool`` command (:mod:`._recovery`), never on the training thread. This is the only
module that imports MLflow's client to write.

Why a health probe: MLflow's own HTTP client retries a down server for minutes. Before sending
to an ``http(s)://`` tracking URI the sender asks ``/health`` with a short timeout.

What an error means is one explicit :class:`Failure` per :class:`SendError` (no meaning is
carried by exception subclassing): the sender and ``send-spool`` decide on ``exc.kind``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import functools
import json
import logging
import os
import queue
import random
import re
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from . import _layout, _spool, _table
from ._records import Encoded, Item, _FILES_DIR, _safe_relative, compose_grids, write_payload
from ._spool import SpoolError

_log = logging.getLogger("mlflow_eigencam")

__all__ = ["Failure", "SendError", "active_experiment", "bounded", "create_run", "end_run", "logged_steps", "probe",
           "run_status", "send_item"]


class Failure(enum.Enum):
    """What a failed send means for the item."""

    #: The server did not answer (or 5xx): keep the item, retry with backoff.
    UNREACHABLE = "unreachable"
    #: MLflow said 401/403: keep the item (never set aside), say so, retry with backoff.
    REFUSED = "refused"
    #: Neither the network nor MLflow's verdict: retry a few times, then set the item aside
    #: (so one bad item cannot hold the others back forever).
    UNEXPECTED = "unexpected"
    #: MLflow refused the item for good (bad run id, bad value): set it aside, go on.
    REJECTED = "rejected"
    #: The run already has this epoch (a repeated epoch, a resumed run): the item is dropped,
    #: so the first logged epoch stands (one metric point, one image, one row per step).
    REPEAT = "repeat"


class SendError(Exception):
    """A send that failed; ``kind`` says what to do with the item."""

    def __init__(self, kind: Failure, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def kept(self) -> bool:
        """True when the item stays in the spool and is retried (not set aside at once)."""
        return self.kind in (Failure.UNREACHABLE, Failure.REFUSED, Failure.UNEXPECTED)


#: The health probe's timeout: it starts at PROBE_TIMEOUT and adapts per server (see probe).
PROBE_TIMEOUT = 2.0
#: The longest a probe waits for one answer: a server slower than this is taken as down.
PROBE_MAX_TIMEOUT = 30.0
#: A server whose answers take longer than this (seconds, recent median) is "slow".
SLOW_S = 1.0
#: Files of one bundle uploaded at a time (per process) to a server that is not local.
UPLOAD_THREADS = 32

_timeouts: Dict[str, float] = {}
_latency: Dict[str, "collections.deque[float]"] = {}
_latency_lock = threading.Lock()


def _measured(tracking_uri: str, seconds: float) -> None:
    """Record how long one answer of ``tracking_uri`` took (the probe's and the API's)."""
    with _latency_lock:
        _latency.setdefault(tracking_uri, collections.deque(maxlen=32)).append(seconds)


def response_time(tracking_uri: str) -> Optional[float]:
    """Median seconds of the server's recent answers (None before the first)."""
    with _latency_lock:
        recent = sorted(_latency.get(tracking_uri, ()))
    return recent[len(recent) // 2] if recent else None


def is_slow(tracking_uri: str) -> bool:
    """True when the server answers, but its recent answers took over ``SLOW_S`` seconds."""
    if not tracking_uri.startswith(("http://", "https://")):
        return False  # a local store is busy, not slow: the back-pressure handles it
    t = response_time(tracking_uri)
    return t is not None and t > SLOW_S


def probe(tracking_uri: str, timeout: Optional[float] = None) -> bool:
    """True when ``tracking_uri`` is a local store or an HTTP server that answers ``/health``.

    The timeout adapts (``timeout=None``): it starts at :data:`PROBE_TIMEOUT` and, while the
    server accepts the connection and does not answer in time, the probe asks again at once
    with four times the timeout, up to :data:`PROBE_MAX_TIMEOUT`; the next probe starts from
    three times the last answer's time. A slow server that answers (a fixed 2 s took one
    that needs 2-5 s for down, forever) is slow, not down; a refused connection or a 5xx is
    down at once; one that never answers is down after about 40 s.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    url = tracking_uri.rstrip("/") + "/health"
    wait = timeout if timeout is not None else _timeouts.get(tracking_uri, PROBE_TIMEOUT)
    while True:
        start = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=wait) as resp:  # noqa: S310 (user's URI)
                ok = resp.status < 500
        except urllib.error.HTTPError as exc:
            ok = exc.code < 500
        except Exception as exc:
            if timeout is None and _timed_out(exc) and wait < PROBE_MAX_TIMEOUT:
                wait = min(4 * wait, PROBE_MAX_TIMEOUT)  # it accepted us: give it longer
                continue
            return False
        took = time.monotonic() - start
        if ok:
            _measured(tracking_uri, took)
            if timeout is None:
                _timeouts[tracking_uri] = min(max(PROBE_TIMEOUT, 3 * took), PROBE_MAX_TIMEOUT)
        return ok


def _timed_out(exc: BaseException) -> bool:
    """A connection made but not answered in time (not a refused or unresolvable one)."""
    reason = getattr(exc, "reason", exc)  # urllib wraps socket errors in URLError
    return isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason)


_clients: Dict[str, Any] = {}
_clients_lock = threading.Lock()


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    with _clients_lock:
        if tracking_uri not in _clients:
            _clients[tracking_uri] = MlflowClient(tracking_uri=tracking_uri)
            _own_randomness(tracking_uri)
        return _clients[tracking_uri]


#: MLflow modules that draw retry jitter from the global ``random`` module (the REST client's
#: backoff, the SQL store's retry of concurrent tag inserts).
_JITTER_MODULES = ("mlflow.utils.rest_utils", "mlflow.utils.request_utils",
                   "mlflow.store.tracking.sqlalchemy_store")
_jitter = random.Random()


def _own_randomness(tracking_uri: str) -> None:
    """Give MLflow's retry jitter a generator of its own instead of the global ``random``.

    The sender calls MLflow on a background thread at moments the training loop does not
    choose; a retry there (a busy server, two writers on one run) drew from the global
    ``random`` and so could change the user's augmentations mid-epoch (the suspected cause
    of a seeded Ultralytics loss that differed in 2 of 8 runs; the run names MLflow
    generates draw from it too, see create_run). Jitter needs no reproducibility, so MLflow's
    modules get a private generator; nothing else about them changes.
    """
    if tracking_uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (what this store uses)
    import mlflow.utils.request_utils  # noqa: F401
    import mlflow.utils.rest_utils  # noqa: F401

    for name in _JITTER_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "random", None) is random:
            module.random = _jitter  # type: ignore[attr-defined]


_AUTH = re.compile(r"\b(401|403)\b|PERMISSION_DENIED|UNAUTHENTICATED|Unauthorized|Forbidden")


def _classify(exc: BaseException) -> SendError:
    """The sender's view of an error from MLflow (or from reading the item)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, SendError):
        return exc
    text = f"{type(exc).__name__}: {exc}"[:500]
    code = getattr(exc, "error_code", "")
    if _AUTH.search(str(exc)) or code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return SendError(Failure.REFUSED, text)
    if isinstance(exc, MlflowException):
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE",
                    "BAD_REQUEST"):
            return SendError(Failure.REJECTED, text)
        return SendError(Failure.UNREACHABLE, text)
    if isinstance(exc, SpoolError):
        return SendError(Failure.REJECTED, text)
    if isinstance(exc, OSError):  # refused sockets, disk errors on a local store
        return SendError(Failure.UNREACHABLE, text)
    if type(exc).__module__.startswith(("requests", "urllib3")):
        return SendError(Failure.UNREACHABLE, text)
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        # What the item holds is wrong: retrying will not help.
        return SendError(Failure.REJECTED, text)
    # E.g. "can't register atexit after shutdown": keep the item a few more tries.
    return SendError(Failure.UNEXPECTED, text)


def send_item(item: Item, *, workdir: Optional[Path] = None) -> None:
    """Send one item to MLflow synchronously (from the sender thread or ``send-spool``).

    Args:
        item: What to send; ``run_id`` and ``tracking_uri`` must be set.
        workdir: Folder to lay the upload out in (the spool folder: same filesystem as a
            local artifact store, so files are moved, not copied); default the system's.

    Raises:
        SendError: its ``kind`` says whether the item is kept and retried or set aside.
    """
    if not item.tracking_uri or not item.run_id:
        raise SendError(Failure.REJECTED, "item has no tracking URI or run id")
    if not probe(item.tracking_uri):
        raise SendError(Failure.UNREACHABLE, f"no answer from {item.tracking_uri}/health")
    try:
        client = _client(item.tracking_uri)
        if item.kind == "bundle":
            _send_bundle(client, item, workdir)
        elif item.kind == "tags":
            _log_batch(client, *_where(item), [], item.tags or {})
        else:
            raise SendError(Failure.REJECTED, f"unknown item kind {item.kind!r}")
    except Exception as exc:
        raise _classify(exc) from exc


_run_locks: Dict[Tuple[str, str], threading.Lock] = collections.defaultdict(threading.Lock)
_run_locks_lock = threading.Lock()
#: The samples.json view of each (uri, run, path) as this process last uploaded it: merged
#: into, never re-read. Another process on the run rewrites it from its own copy (the last
#: upload wins); no row is lost because every row also travels in a part of its own, which
#: readers merge (see :mod:`._table`).
_table_cache: Dict[Tuple[str, str, str], dict] = {}


def _where(item: Item) -> Tuple[str, str]:
    """(tracking URI, run id) of an item that :func:`send_item` checked has both."""
    assert item.tracking_uri is not None and item.run_id is not None
    return item.tracking_uri, item.run_id


def _run_lock(item: Item) -> threading.Lock:
    with _run_locks_lock:
        return _run_locks[_where(item)]


def _send_bundle(client, item: Item, workdir: Optional[Path]) -> None:
    from mlflow.entities import Metric

    staging: Optional[Path] = None
    try:
        # One bundle of a run at a time prepares (repeat check, grid, table merge); the
        # uploads of two bundles may then overlap (the sender keeps two in flight).
        with _run_lock(item):
            if item.once is not None and _already_logged(client, item):
                raise SendError(Failure.REPEAT, f"the run already has epoch {item.once[1]} of "
                                                f"{item.once[0].rsplit('/', 1)[0]}")
            compose_grids(item)
            tables: Dict[str, int] = {}
            if item.files:
                staging = _spool.make_staging(workdir)
                files = staging / _FILES_DIR
                files.mkdir()
                written: Dict[int, Path] = {}
                for path, payload in item.files.items():
                    target = files / _safe_relative(path)
                    if path in (item.tables or []):
                        key = (*_where(item), path)
                        # Merged into this process's view now, so a bundle prepared next
                        # holds these rows too (its upload may land first; see _put_table).
                        merged = _table.merge(_current_table(client, item, path),
                                              _load_table(payload))
                        _table_cache[key] = merged
                        tables[path] = _table_version[key] = _table_version.get(key, 0) + 1
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(_table.dumps(merged))
                    else:
                        write_payload(target, payload, written)
        if staging is not None:
            local = _local_artifact_dir(client, item)
            if local is not None:
                for path, version in tables.items():  # the newest view stays (_put_table)
                    _put_table(_LocalRepo(local), item, path, version,
                               str(staging / _FILES_DIR / _safe_relative(path)),
                               path.rsplit("/", 1)[0] if "/" in path else None)
                    os.unlink(staging / _FILES_DIR / _safe_relative(path))
                _move_into(staging / _FILES_DIR, local)
            else:
                _upload(client, item, staging / _FILES_DIR, tables)
    finally:
        if staging is not None:
            _spool.remove_staging(staging)
    tags = {k: v for k, v in (item.tags or {}).items()
            if _tags_sent.get((item.run_id, k)) != v}
    new_tables = [p for p in item.tables or [] if (item.run_id, p) not in _registered_tables]
    if new_tables:
        with _run_lock(item):
            # The tag mlflow.log_table writes, so mlflow.load_table and the UI find the
            # tables. Read-modify-write of a run tag: once per (run, table) and process,
            # written under the lock (two bundles in flight must not drop each other's).
            current = json.loads(client.get_run(item.run_id).data.tags.get(
                _layout.MLFLOW_LOGGED_ARTIFACTS, "[]"))
            entries = [{"path": p, "type": "table"} for p in new_tables]
            if any(e not in current for e in entries):
                _log_batch(client, *_where(item), [], {_layout.MLFLOW_LOGGED_ARTIFACTS: json.dumps(
                    current + [e for e in entries if e not in current])})
            _registered_tables.update((item.run_id, p) for p in new_tables)
    # Metrics last: a bundle cut short before them is not taken for a repeat (_already_logged).
    metrics = [Metric(k, float(v), int(ts), int(s)) for k, v, s, ts in item.metrics or []]
    _log_batch(client, *_where(item), metrics, tags)
    if item.once is not None:
        _steps_cache.setdefault((*_where(item), item.once[0]), set()).add(int(item.once[1]))
    _tags_sent.update(((item.run_id, k), v) for k, v in (item.tags or {}).items())


#: Per (uri, run, table path): the version of the table view last merged, and last uploaded.
_table_version: Dict[Tuple[str, str, str], int] = {}
_table_uploaded: Dict[Tuple[str, str, str], int] = {}
_upload_pool: Optional["DaemonPool"] = None
_upload_pool_lock = threading.Lock()
_repos: Dict[Tuple[str, str], Any] = {}


def _pool() -> "DaemonPool":
    global _upload_pool
    with _upload_pool_lock:
        if _upload_pool is None:
            _quiet_pool_warnings()
            _upload_pool = DaemonPool(UPLOAD_THREADS, _UPLOAD_THREAD)
        return _upload_pool


class DaemonPool:
    """Up to ``size`` daemon threads running submitted calls, each returning a Future.

    Not :class:`concurrent.futures.ThreadPoolExecutor`: its threads are joined at exit, so
    one request to a hung server would hold the user's process at exit (the sender's exit
    is bounded by ``close()``'s deadline; what is not confirmed stays in the spool)."""

    def __init__(self, size: int, name: str,
                 initializer: Optional[Callable[[], None]] = None) -> None:
        self._size, self._name, self._init = size, name, initializer
        self._jobs: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._threads: list = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> "concurrent.futures.Future[Any]":
        future: "concurrent.futures.Future[Any]" = concurrent.futures.Future()
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._size:
                t = threading.Thread(target=self._work, daemon=True,
                                     name=f"{self._name}-{len(self._threads)}")
                self._threads.append(t)
                t.start()
            else:
                self._idle -= 1 if self._idle else 0
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Let the threads end once the calls already submitted are done."""
        with self._lock:
            for _ in self._threads:
                self._jobs.put((None, None, ()))
            self._threads, self._idle = [], 0

    def _work(self) -> None:
        if self._init is not None:
            self._init()
        while True:
            future, fn, args = self._jobs.get()
            if future is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the caller
                    future.set_exception(exc)
            del future, fn, args
            with self._lock:
                self._idle += 1


def _upload(client, item: Item, folder: Path, tables: Dict[str, int]) -> None:
    """Upload the staged files of one bundle to a remote artifact store, up to
    :data:`UPLOAD_THREADS` at a time (one request per file: MLflow has no batch upload, and
    ``log_artifacts`` sends them one after the other: 51 files of 16 samples took 51 round
    trips in a row, 3 minutes at 2-5 s each). Every file keeps its fixed path, so a retry
    rewrites, never duplicates. Raises the first error once every upload has ended."""
    repo = _repo(client, item)
    jobs = []
    for dirpath, _dirs, names in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        artifact_dir = None if rel == "." else rel.replace(os.sep, "/")
        for name in names:
            local = os.path.join(dirpath, name)
            path = name if artifact_dir is None else f"{artifact_dir}/{name}"
            if path in tables:
                job = functools.partial(_put_table, repo, item, path, tables[path], local,
                                        artifact_dir)
            else:
                job = functools.partial(_timed, item, repo.log_artifact, local, artifact_dir)
            jobs.append(_pool().submit(job))
    errors = [f.exception() for f in jobs]  # waits for all: no upload outlives its staging
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _timed(item: Item, fn: Callable[..., Any], *args: Any) -> None:
    start = time.monotonic()
    fn(*args)
    _measured(_where(item)[0], time.monotonic() - start)


def _put_table(repo, item: Item, path: str, version: int, local: str,
               artifact_dir: Optional[str]) -> None:
    """Upload one view of a table unless a newer one (which holds its rows) is up already:
    two bundles in flight must not leave the older view last."""
    key = (*_where(item), path)
    with _table_lock(key):
        if _table_uploaded.get(key, 0) >= version:
            return
        _timed(item, repo.log_artifact, local, artifact_dir)
        _table_uploaded[key] = version


_table_locks: Dict[Tuple[str, str, str], threading.Lock] = collections.defaultdict(threading.Lock)


def _table_lock(key: Tuple[str, str, str]) -> threading.Lock:
    with _run_locks_lock:
        return _table_locks[key]


def _repo(client, item: Item):
    """The run's artifact repository, made once per run (``MlflowClient.log_artifact``
    may ask the server for the run again at every call in older MLflow versions)."""
    key = _where(item)
    if key not in _repos and _artifact_uri(client, item).startswith("mlflow-artifacts:"):
        # Resolved against the item's server: MLflow 2.x resolves ``mlflow-artifacts:``
        # against the process's global tracking URI (another server, or a sqlite URI that it
        # then refuses).
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
        from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

        _repos[key] = HttpArtifactRepository(
            MlflowArtifactsRepository.resolve_uri(_artifact_uri(client, item), key[0]))
    if key not in _repos:
        get = getattr(getattr(client, "_tracking_client", None), "_get_artifact_repo", None)
        _repos[key] = get(key[1]) if get is not None else _ClientRepo(client, key[1])
    return _repos[key]


class _LocalRepo:
    """``log_artifact`` into a run's folder on this machine's disk: a rename."""

    def __init__(self, root: str) -> None:
        self._root = root

    def log_artifact(self, local: str, artifact_dir: Optional[str]) -> None:
        folder = self._root if artifact_dir is None else os.path.join(self._root, artifact_dir)
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(local, os.path.join(folder, os.path.basename(local)))


class _ClientRepo:
    """The run's artifacts through the public client (where the private repository is gone)."""

    def __init__(self, client, run_id: str) -> None:
        self._client, self._run_id = client, run_id

    def list_artifacts(self, path: Optional[str]) -> list:
        return list(self._client.list_artifacts(self._run_id, path))

    def download_artifacts(self, path: str, dst: str) -> str:
        return str(self._client.download_artifacts(self._run_id, path, dst))

    def log_artifact(self, local: str, artifact_dir: Optional[str]) -> None:
        self._client.log_artifact(self._run_id, local, artifact_dir)


_UPLOAD_THREAD = "mlflow-eigencam-upload"


class _OwnUploads(logging.Filter):
    """urllib3 warns "Connection pool is full, discarding connection" when more requests run
    at once than MLflow's HTTP pool keeps (10): expected for the package's upload and send
    threads (their extra connections are closed after use), noise in the user's log. Only
    theirs is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (threading.current_thread().name.startswith("mlflow-eigencam")
                    and "Connection pool is full" in str(record.msg))


def _quiet_pool_warnings() -> None:
    logging.getLogger("urllib3.connectionpool").addFilter(_OwnUploads())


#: Steps of each (uri, run, metric key) that are in MLflow, as this process last knew them.
_steps_cache: Dict[Tuple[str, str, str], set] = {}


def _already_logged(client, item: Item) -> bool:
    """True when the run already has ``item.once``'s metric at its step: the bundle repeats
    an epoch that was logged (by this process or another) and must not add a second point,
    image and table row at that step. Metrics are sent last, so a bundle cut short before
    them is not taken for a repeat and is sent again whole."""
    assert item.once is not None
    key, step = item.once
    cache = (*_where(item), str(key))
    if cache not in _steps_cache:
        _steps_cache[cache] = {int(m.step) for m in client.get_metric_history(item.run_id, key)}
    return int(step) in _steps_cache[cache]


def logged_steps(tracking_uri: str, run_id: str, prefix: str = _layout.ROOT) -> Dict[str, int]:
    """``{metric key: last step}`` of the run's metrics under ``prefix`` (the EigenCAM ones):
    what a second ``fit`` in the run continues after."""
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    last: Dict[str, int] = {}
    for key in run.data.metrics:
        if key.startswith(prefix + "/"):
            steps = [int(m.step) for m in client.get_metric_history(run_id, key)]
            if steps:
                last[key] = max(steps)
    return last


def _load_table(payload: Any) -> dict:
    if isinstance(payload, Encoded):
        payload = payload.data()
    elif isinstance(payload, Path):
        payload = payload.read_bytes()
    try:
        return _table.loads(payload)
    except ValueError as exc:
        raise SendError(Failure.REJECTED, str(exc)) from exc


def _current_table(client, item: Item, path: str) -> Optional[dict]:
    """The run's table at ``path`` as this process last wrote it, else as MLflow has it."""
    key = (*_where(item), path)
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
        repo = _repo(client, item)
        if any(f.path == path for f in repo.list_artifacts(parent)):
            import tempfile

            with tempfile.TemporaryDirectory(prefix="mlflow-eigencam-table-") as d:
                raw = Path(repo.download_artifacts(path, d)).read_bytes()
    if raw is None:
        return None
    try:
        return _table.loads(raw)
    except ValueError:
        return None


_local_dirs: Dict[Tuple[str, str], Optional[str]] = {}
_artifact_uris: Dict[Tuple[str, str], str] = {}


def _artifact_uri(client, item: Item) -> str:
    """The run's artifact URI, asked once per run."""
    key = _where(item)
    if key not in _artifact_uris:
        _artifact_uris[key] = str(client.get_run(key[1]).info.artifact_uri)
    return _artifact_uris[key]


def _local_artifact_dir(client, item: Item) -> Optional[str]:
    """The run's artifact folder when MLflow keeps artifacts on this machine's disk, else None.

    Asked once per run. Only a plain path or ``file:`` URI counts (what MLflow serves with
    its ``LocalArtifactRepository``): a server that proxies artifacts (``mlflow-artifacts:``)
    or a cloud store always goes through ``log_artifacts``.
    """
    key = _where(item)
    if key not in _local_dirs:
        from urllib.parse import urlparse

        from mlflow.utils.file_utils import local_file_uri_to_path

        uri = _artifact_uri(client, item)
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
# a server round trip (a sqlite commit on a local store). A tag is sent again when its value
# differs from the last one this process sent (stable_epoch may return to an earlier value).
_registered_tables: set = set()
_tags_sent: Dict[Tuple[Optional[str], str], str] = {}


def _log_batch(client, uri: str, run_id: str, metrics: list, tags: Dict[str, str]) -> None:
    """Metrics and tags in one call (one commit on a local store, one request to a server)."""
    if metrics or tags:
        from mlflow.entities import RunTag

        start = time.monotonic()
        client.log_batch(run_id, metrics=metrics,
                         tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)
        _measured(uri, time.monotonic() - start)


def active_experiment() -> Tuple[Optional[str], Optional[str]]:
    """(id, name) of the experiment a new run would go to in this process, as far as it is
    known without a request: ``mlflow.set_experiment``'s choice (when mlflow is imported),
    else ``$MLFLOW_EXPERIMENT_ID`` / ``$MLFLOW_EXPERIMENT_NAME``. Recorded in the spool when
    the logger starts, so a run ``send-spool`` creates later lands there, not in Default."""
    fluent = sys.modules.get("mlflow.tracking.fluent")
    exp_id = getattr(fluent, "_active_experiment_id", None) if fluent is not None else None
    exp_id = exp_id or os.environ.get("MLFLOW_EXPERIMENT_ID") or None
    name = None if exp_id else (os.environ.get("MLFLOW_EXPERIMENT_NAME") or None)
    return (str(exp_id) if exp_id else None), name


def create_run(tracking_uri: str, experiment_id: Optional[str],
               experiment_name: Optional[str] = None) -> str:
    """Create a run as ``mlflow.start_run()`` would (active experiment, context tags), but
    through the client, so it works from any thread and never becomes a thread's active run.

    ``experiment_id`` (else the experiment named ``experiment_name``, else this process's
    active experiment) is where the run goes."""
    import mlflow
    from mlflow.tracking.context.registry import resolve_tags

    if not probe(tracking_uri):
        raise SendError(Failure.UNREACHABLE, f"no answer from {tracking_uri}/health")
    try:
        if experiment_id is None and experiment_name:
            exp = _client(tracking_uri).get_experiment_by_name(experiment_name)
            if exp is None:
                raise SendError(Failure.REJECTED,
                                f"no experiment named {experiment_name!r} at {tracking_uri}")
            experiment_id = exp.experiment_id
        if experiment_id is None:
            experiment_id = mlflow.tracking.fluent._get_experiment_id()
        # A name of our own: MLflow's generated names draw from the global `random` (on the
        # client for local stores), which would change the user's random stream.
        client = _client(tracking_uri)
        tags = resolve_tags()
        name = tags.get("mlflow.runName") or f"eigencam-{uuid.uuid4().hex[:8]}"
        run = client.create_run(str(experiment_id or "0"), tags=tags, run_name=name)

    except Exception as exc:
        raise _classify(exc) from exc
    return run.info.run_id



def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run the package created as ended (``FINISHED``, ``FAILED`` or ``KILLED``).

    Raises:
        SendError: as :func:`send_item`.
    """
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    if not probe(tracking_uri):
        raise SendError(Failure.UNREACHABLE, f"no answer from {tracking_uri}/health")
    try:
        _client(tracking_uri).set_terminated(run_id, status=status)
    except Exception as exc:
        raise _classify(exc) from exc


def run_status(tracking_uri: str, run_id: str) -> Optional[str]:
    """The run's status (``RUNNING``, ``FINISHED``, ...), or None when it cannot be read."""
    try:
        return str(_client(tracking_uri).get_run(run_id).info.status)
    except Exception:
        return None


def bounded(fn: Callable[[], Any], timeout: float) -> bool:
    """Run ``fn`` (a call to MLflow) on a helper thread and wait at most ``timeout`` s for it:
    a hanging server must not hold the caller. Errors are logged, not raised. Returns whether
    ``fn`` finished in time."""
    def run() -> None:
        try:
            fn()
        except Exception as exc:
            _log.warning("mlflow_eigencam: %s", exc)

    t = threading.Thread(target=run, daemon=True, name="mlflow-eigencam-bounded")
    t.start()
    t.join(timeout)
    return not t.is_alive()
