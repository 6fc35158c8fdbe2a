"""The only module that talks to MLflow: a background sender with a write-ahead spool.

Why a spool: a training run must never wait on, or fail because of, the tracking server.
Every item (one epoch's files, metrics and table for a (mode, ds_id), or run tags) is handed
to one background worker through a bounded queue; the worker first writes it to a local spool
folder, then sends it, then deletes it. If MLflow cannot be reached the items stay on disk,
in order, and are retried with backoff; nothing is lost even if the process dies. A leftover
spool can be sent later with :func:`send_spool` or ``mlflow-eigencam send-spool PATH``.

Why a health probe: MLflow's own HTTP client retries a down server for minutes. Before sending
to an ``http(s)://`` tracking URI the worker asks ``/health`` with a short timeout, so a down
server costs seconds, not minutes, and only on the worker thread.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


from . import _layout

_log = logging.getLogger("mlflow_eigencam")

#: Environment variable that moves the default spool root.
SPOOL_ENV = "MLFLOW_EIGENCAM_SPOOL_DIR"
_ITEM_FILE = "item.json"
_FILES_DIR = "files"


class EigenCAMWarning(UserWarning):
    """Warnings from mlflow_eigencam (unreachable server, skipped epochs, leftovers)."""


def default_spool_root() -> Path:
    """Root folder of spools: ``$MLFLOW_EIGENCAM_SPOOL_DIR`` or ``~/.cache/mlflow_eigencam/spool``."""
    env = os.environ.get(SPOOL_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "mlflow_eigencam" / "spool"


@dataclass
class Item:
    """One unit of work for MLflow.

    kind ``tags``: ``tags`` set on the run. kind ``bundle``: everything one (mode, ds_id)
    logs at one epoch, sent together: ``files`` ({artifact path: payload}) uploaded in one
    ``log_artifacts`` call, then one ``log_batch`` with ``metrics``
    ([[key, value, step, timestamp_ms], ...]) and the tags this process has not set yet:
    ``tags`` and the registration of ``tables`` as tables of the run. Every part is
    idempotent (fixed file names, whole tables, tags), so a bundle retried after a partial
    send duplicates nothing.
    """

    kind: str
    run_id: str
    tracking_uri: str
    files: Optional[Dict[str, Any]] = None  # path -> bytes, str, Encoded or a local Path
    metrics: Optional[List[list]] = None
    tables: Optional[List[str]] = None
    tags: Optional[Dict[str, str]] = None
    seq: int = 0
    #: Set by :func:`read_item`: the spooled folder that holds ``files`` under their paths.
    files_dir: Optional[Path] = None

    def meta(self) -> dict:
        d = {k: getattr(self, k) for k in ("kind", "run_id", "tracking_uri", "metrics",
                                            "tables", "tags", "seq")}
        d["files"] = sorted(self.files) if self.files else None
        return d


class Encoded:
    """An image encoded on first use, on the worker, not the training thread.

    ``fmt`` ``png``: ``source`` is an (H, W, 3) uint8 array or a list of
    :class:`render.PNGBand` (a strip's band is compressed once for its own PNG and the grid).
    ``webp-preview``: ``source`` is an (H, W, 3) uint8 array, see
    :func:`render.encode_webp_preview`. One object may back several files: it is encoded once.
    """

    __slots__ = ("_data", "_lock", "fmt", "source")

    def __init__(self, source: Any, fmt: str = "png") -> None:
        if fmt not in ("png", "webp-preview"):
            raise ValueError(f"fmt must be 'png' or 'webp-preview', got {fmt!r}")
        self.source = source
        self.fmt = fmt
        self._data: Optional[bytes] = None
        self._lock = threading.Lock()

    def data(self) -> bytes:
        with self._lock:
            if self._data is None:
                from .render import encode_png, encode_webp_preview

                encode = encode_png if self.fmt == "png" else encode_webp_preview
                self._data = encode(self.source)
            return self._data


def _write_payload(target: Path, payload: Any, written: Dict[int, Path]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # One payload under two names (an image in the epoch folder and in the image series,
    # encoded or a streamed file): write it once, link the second name.
    first = written.get(id(payload))
    if first is not None:
        try:
            os.link(first, target)
            return
        except OSError:  # no hard links on this filesystem
            pass
    written[id(payload)] = target
    if isinstance(payload, Path):
        shutil.copyfile(payload, target)
    elif isinstance(payload, Encoded):
        target.write_bytes(payload.data())
    elif isinstance(payload, (bytes, bytearray)):
        target.write_bytes(bytes(payload))
    elif isinstance(payload, str):
        target.write_text(payload, encoding="utf-8")
    else:
        raise TypeError(f"a file payload must be bytes, str, Encoded or Path, got "
                        f"{type(payload)!r}")


def write_item(spool: Path, item: Item) -> Path:
    """Persist one item in ``spool`` atomically (temp folder, then rename); returns its folder.

    Files go under ``files/`` at their artifact paths, so the folder is what gets uploaded.
    """
    spool.mkdir(parents=True, exist_ok=True)
    final = spool / f"{item.seq:010d}.{item.kind}"
    tmp = spool / f".tmp-{item.seq:010d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    (tmp / _ITEM_FILE).write_text(json.dumps(item.meta()))
    written: Dict[int, Path] = {}
    for path, payload in (item.files or {}).items():
        _write_payload(tmp / _FILES_DIR / _safe_relative(path), payload, written)
    os.replace(tmp, final)
    return final


def _safe_relative(path: str) -> Path:
    rel = Path(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"artifact path must be relative without '..', got {path!r}")
    return rel


def read_item(folder: Path) -> Item:
    """Load an item written by :func:`write_item`; its files stay on disk (``files_dir``)."""
    meta = json.loads((folder / _ITEM_FILE).read_text())
    files = meta.pop("files", None)
    item = Item(**meta)
    if files:
        item.files = {p: folder / _FILES_DIR / p for p in files}
        item.files_dir = folder / _FILES_DIR
    return item


def pending_items(spool: Path) -> List[Path]:
    """Spooled item folders in send order."""
    if not spool.is_dir():
        return []
    return sorted(p for p in spool.iterdir() if p.is_dir() and not p.name.startswith("."))


class Unreachable(Exception):
    """The tracking server did not answer; the item stays in the spool."""


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


def send_item(item: Item) -> None:
    """Send one item to MLflow synchronously.

    Raises:
        Unreachable: the server is down or answered 5xx (keep the item, retry later).
        PermanentError: MLflow rejected the item (set it aside, go on).
    """
    if not probe(item.tracking_uri):
        raise Unreachable(item.tracking_uri)
    from mlflow.exceptions import MlflowException

    client = _client(item.tracking_uri)
    try:
        if item.kind == "bundle":
            _send_bundle(client, item)
        elif item.kind == "tags":
            _log_batch(client, item.run_id, [], item.tags or {})
        else:
            raise PermanentError(f"unknown item kind {item.kind!r}")
    except MlflowException as exc:
        code = getattr(exc, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE",
                    "PERMISSION_DENIED", "BAD_REQUEST"):
            raise PermanentError(str(exc)) from exc
        raise Unreachable(str(exc)) from exc
    except (PermanentError, Unreachable):
        raise
    except OSError as exc:  # connection errors, refused sockets, disk errors on a local store
        raise Unreachable(str(exc)) from exc
    except Exception as exc:  # requests' errors and anything else transient-looking
        if type(exc).__module__.startswith(("requests", "urllib3")):
            raise Unreachable(str(exc)) from exc
        raise PermanentError(f"{type(exc).__name__}: {exc}") from exc


def _send_bundle(client, item: Item) -> None:
    from mlflow.entities import Metric

    if item.files and item.files_dir is None:
        # Not spooled (send_item called directly): spool it to a temporary folder first, so
        # the files are written by write_item alone.
        with tempfile.TemporaryDirectory(prefix="eigencam-") as tmp:
            _send_bundle(client, read_item(write_item(Path(tmp), item)))
        return
    if item.files:
        local = _local_artifact_dir(client, item)
        if local is not None:
            _move_into(item.files_dir, local)
        else:
            client.log_artifacts(item.run_id, str(item.files_dir))
    tags = {k: v for k, v in (item.tags or {}).items() if (item.run_id, k, v) not in _tags_set}
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
    """Put the spooled files where ``LocalArtifactRepository.log_artifacts`` would copy them.

    A rename each instead of a copy: the spool is deleted after sending anyway, and copying
    the bytes was a sixth of the sender's CPU. Across filesystems it copies. A retry after a
    partial move finds the moved files gone from the spool and moves the rest.
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


def send_spool(spool: str | os.PathLike, *, tracking_uri: Optional[str] = None,
               timeout: Optional[float] = None) -> Tuple[int, int]:
    """Send a leftover spool folder to MLflow, oldest item first.

    Args:
        spool: The folder named in the warning (``.../spool/<run_id>``).
        tracking_uri: Send there instead of the URI recorded with each item.
        timeout: Stop after this many seconds (None: until done or the server is unreachable).

    Returns:
        (sent, left): items sent and items still in the folder.
    """
    folder = Path(spool)
    if not folder.is_dir():
        raise FileNotFoundError(f"spool folder {str(folder)!r} does not exist")
    start = time.monotonic()
    sent = 0
    for path in pending_items(folder):
        if timeout is not None and time.monotonic() - start > timeout:
            break
        item = read_item(path)
        if tracking_uri:
            item.tracking_uri = tracking_uri
        try:
            send_item(item)
        except Unreachable:
            break
        except PermanentError as exc:
            _set_aside(folder, path, str(exc))
            continue
        shutil.rmtree(path, ignore_errors=True)
        sent += 1
    return sent, len(pending_items(folder))


def _set_aside(spool: Path, path: Path, reason: str) -> None:
    failed = spool.parent / (spool.name + ".failed")
    failed.mkdir(parents=True, exist_ok=True)
    (path / "error.txt").write_text(reason)
    os.replace(path, failed / path.name)
    warnings.warn(f"mlflow_eigencam: MLflow rejected {path.name} ({reason}); kept in {failed}",
                  EigenCAMWarning, stacklevel=2)


def _lower_thread_priority() -> None:
    """Let the training threads win the CPU: uploads can wait, an epoch should not.

    On Linux a thread is a task with its own nice value; elsewhere this does nothing.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class MlflowSink:
    """Background sender: bounded queue -> spool on disk -> MLflow, in order.

    Args:
        spool_dir: Folder for this run's spool (created on first use).
        max_queue: Items held in memory before the caller writes them to disk itself.
        backoff: (first, max) seconds between retries while MLflow is unreachable.
    """

    def __init__(self, spool_dir: str | os.PathLike, *, max_queue: int = 64,
                 backoff: Tuple[float, float] = (0.5, 10.0)) -> None:
        self.spool_dir = Path(spool_dir)
        self._queue: "queue.Queue[Optional[Item]]" = queue.Queue(maxsize=max_queue)
        self._seq = itertools.count(int(time.time() * 1000) * 1000)
        self._seq_lock = threading.Lock()
        self._backoff = backoff
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._idle_lock = threading.Lock()
        self._stop = False
        self._warned_down = False
        self._down_since: Optional[float] = None
        self._down_message = ""
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.sent = 0
        #: CPU seconds the worker thread used (encoding, spooling, sending): what the sink
        #: costs the machine beside training, for benchmarks and diagnostics.
        self.worker_cpu_s = 0.0
        self._early: "collections.deque[Encoded]" = collections.deque()

    # -- caller side ---------------------------------------------------------------------
    def submit(self, item: Item, *, spool_now: bool = False) -> None:
        """Queue an item without blocking; if the queue is full, write it to the spool here.

        ``spool_now``: write it to the spool in the caller's thread before returning (for
        items whose files are local paths that the caller deletes next).
        """
        with self._seq_lock:
            item.seq = next(self._seq)
        self._ensure_thread()
        if self._down_since is not None and not self._warned_down:
            # Warn from the caller's thread, where the user (and pytest) sees it.
            self._warned_down = True
            warnings.warn(self._down_message, EigenCAMWarning, stacklevel=3)
        # Under the lock the worker takes to declare itself idle: it either sees this item
        # or goes idle before it, never in between (flush would return with the item unsent).
        with self._idle_lock:
            self._idle.clear()
            if spool_now:
                write_item(self.spool_dir, item)
            else:
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    write_item(self.spool_dir, item)
        self._wake.set()

    def encode_soon(self, *images: Encoded) -> None:
        """Start encoding ``images`` on the worker now, before their item is submitted.

        Called while the caller renders the next image at an epoch end: the training
        framework is idle there, so the encoding (zlib and libwebp run without the GIL) uses
        a core that would otherwise wait, instead of competing with the next epoch.
        """
        self._early.extend(images)
        self._ensure_thread()
        self._wake.set()

    def pending(self) -> int:
        """Items not yet confirmed by MLflow (queued or spooled)."""
        return self._queue.qsize() + len(pending_items(self.spool_dir))

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until everything was sent (True) or ``timeout`` seconds passed (False)."""
        if self._thread is None:
            return self.pending() == 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._wake.set()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return self.pending() == 0
            if self._idle.wait(timeout=0.05 if remaining is None else min(0.05, remaining)):
                if self.pending() == 0:
                    return True

    def close(self, timeout: Optional[float] = 30.0) -> int:
        """Flush for at most ``timeout`` seconds, stop the worker; returns items left on disk.

        Whatever is still queued is written to the spool, and a warning names the folder and
        the command that sends it later.
        """
        self.flush(timeout)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        # The worker may still be stuck inside an MLflow call: persist anything queued.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                write_item(self.spool_dir, item)
        left = len(pending_items(self.spool_dir))
        if left:
            msg = (f"mlflow_eigencam: {left} item(s) could not be sent to MLflow; they are kept "
                   f"in {self.spool_dir}. Send them later with: "
                   f"mlflow-eigencam send-spool {self.spool_dir}")
            warnings.warn(msg, EigenCAMWarning, stacklevel=2)
            _log.warning(msg)
        elif self.spool_dir.is_dir():
            shutil.rmtree(self.spool_dir, ignore_errors=True)
        return left

    # -- worker side ---------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="mlflow-eigencam-sink",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        _lower_thread_priority()
        delay = self._backoff[0]
        while not self._stop:
            cpu = time.thread_time()
            self._encode_early()
            self._persist_queued()
            status = self._drain()
            self.worker_cpu_s += time.thread_time() - cpu
            if status == "down":
                self._wake.wait(timeout=delay)
                self._wake.clear()
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            with self._idle_lock:
                if self._queue.empty() and not pending_items(self.spool_dir):
                    self._idle.set()
            self._wake.wait(timeout=1.0)
            self._wake.clear()

    def _encode_early(self) -> None:
        while self._early:
            try:
                self._early.popleft().data()  # kept by the Encoded object for its item
            except Exception as exc:  # the item's own send reports a bad image
                _log.debug("mlflow_eigencam: early encoding failed: %s", exc)

    def _persist_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is None:
                continue
            try:
                write_item(self.spool_dir, item)
            except Exception as exc:  # disk full etc.: say so, never raise into training
                _log.warning("mlflow_eigencam: could not spool %s: %s", item.kind, exc)

    def _drain(self) -> str:
        for path in pending_items(self.spool_dir):
            if self._stop:
                return "stopped"
            try:
                item = read_item(path)
                send_item(item)
            except Unreachable as exc:
                self._mark_down(str(exc))
                return "down"
            except PermanentError as exc:
                _set_aside(self.spool_dir, path, str(exc))
                continue
            except Exception as exc:  # a corrupt spool entry must not stop the worker
                _set_aside(self.spool_dir, path, f"{type(exc).__name__}: {exc}")
                continue
            shutil.rmtree(path, ignore_errors=True)
            self.sent += 1
            if self._down_since is not None:
                _log.warning("mlflow_eigencam: MLflow reachable again after %.1f s; sending the "
                             "spool in %s", time.monotonic() - self._down_since, self.spool_dir)
                self._down_since = None
            self._persist_queued()  # keep submit order: new items go behind older spooled ones
        return "ok"

    def _mark_down(self, reason: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._down_message = (
                f"mlflow_eigencam: cannot reach MLflow ({reason[:200]}); training goes on. "
                f"EigenCAM images, tables and metrics are kept in {self.spool_dir} and "
                f"retried with backoff.")
            _log.warning(self._down_message)
