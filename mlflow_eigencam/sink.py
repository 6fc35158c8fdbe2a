"""The only module that talks to MLflow: a background sender with a write-ahead spool.

Why a spool: a training run must never wait on, or fail because of, the tracking server.
Every item (image, artifact, table, metrics, tags) is handed to one background worker through
a bounded queue; the worker first writes it to a local spool folder, then sends it, then
deletes it. If MLflow cannot be reached the items stay on disk, in order, and are retried with
backoff; nothing is lost even if the process dies. A leftover spool can be sent later with
:func:`send_spool` or ``mlflow-eigencam send-spool PATH``.

Why a health probe: MLflow's own HTTP client retries a down server for minutes. Before sending
to an ``http(s)://`` tracking URI the worker asks ``/health`` with a short timeout, so a down
server costs seconds, not minutes, and only on the worker thread.
"""

from __future__ import annotations

import io
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

import numpy as np

from . import _layout

_log = logging.getLogger("mlflow_eigencam")

#: Environment variable that moves the default spool root.
SPOOL_ENV = "MLFLOW_EIGENCAM_SPOOL_DIR"
_ITEM_FILE = "item.json"
_PAYLOAD_FILE = "payload"


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

    kind is ``image`` (key, step; payload PNG), ``artifact`` (path; payload bytes),
    ``metrics`` (metrics: [[key, value, step, timestamp_ms], ...]), ``tags`` (tags dict) or
    ``table`` (path; payload: full table JSON, uploaded whole so a retry is idempotent).
    """

    kind: str
    run_id: str
    tracking_uri: str
    key: Optional[str] = None
    step: Optional[int] = None
    path: Optional[str] = None
    metrics: Optional[List[list]] = None
    tags: Optional[Dict[str, str]] = None
    payload: Any = None  # bytes, or an (H, W, 3) uint8 array encoded on the worker
    seq: int = 0

    def meta(self) -> dict:
        d = {k: getattr(self, k) for k in ("kind", "run_id", "tracking_uri", "key", "step",
                                            "path", "metrics", "tags", "seq")}
        return d


class PNGPayload:
    """An (H, W, 3) uint8 image encoded to PNG at most once, on first use (on the worker).

    The same strip goes to MLflow twice (the image series and the per-epoch artifact); sharing
    one of these halves the encoding work and keeps it off the training thread.
    """

    __slots__ = ("array", "_data", "_lock")

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self._data: Optional[bytes] = None
        self._lock = threading.Lock()

    def data(self) -> bytes:
        with self._lock:
            if self._data is None:
                from .render import encode_png

                self._data = encode_png(self.array)
                self.array = None  # type: ignore[assignment]  # free the pixels once encoded
            return self._data


def _encode(payload: Any) -> bytes:
    if isinstance(payload, PNGPayload):
        return payload.data()
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, np.ndarray):
        from .render import encode_png

        return encode_png(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    raise TypeError(f"payload must be bytes, str or a uint8 image array, got {type(payload)!r}")


def write_item(spool: Path, item: Item) -> Path:
    """Persist one item in ``spool`` atomically (temp folder, then rename); returns its folder."""
    spool.mkdir(parents=True, exist_ok=True)
    final = spool / f"{item.seq:010d}.{item.kind}"
    tmp = spool / f".tmp-{item.seq:010d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    (tmp / _ITEM_FILE).write_text(json.dumps(item.meta()))
    if item.payload is not None:
        (tmp / _PAYLOAD_FILE).write_bytes(_encode(item.payload))
    os.replace(tmp, final)
    return final


def read_item(folder: Path) -> Item:
    """Load an item written by :func:`write_item` (payload as bytes)."""
    meta = json.loads((folder / _ITEM_FILE).read_text())
    payload_file = folder / _PAYLOAD_FILE
    payload = payload_file.read_bytes() if payload_file.exists() else None
    return Item(payload=payload, **meta)


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
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = _client(item.tracking_uri)
    try:
        if item.kind == "image":
            from PIL import Image

            with Image.open(io.BytesIO(item.payload)) as im:
                im.load()
                client.log_image(item.run_id, im, key=item.key, step=item.step, synchronous=True)
        elif item.kind in ("artifact", "table"):
            _upload_bytes(client, item.run_id, item.path, item.payload)
            if item.kind == "table":
                _register_table(client, item.run_id, item.path)
        elif item.kind == "metrics":
            metrics = [Metric(k, float(v), int(ts), int(s)) for k, v, s, ts in item.metrics or []]
            client.log_batch(item.run_id, metrics=metrics, synchronous=True)
        elif item.kind == "tags":
            for k, v in (item.tags or {}).items():
                client.set_tag(item.run_id, k, v, synchronous=True)
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


def _upload_bytes(client, run_id: str, path: str, data: bytes) -> None:
    directory, name = os.path.split(path)
    with tempfile.TemporaryDirectory(prefix="eigencam-") as tmp:
        local = os.path.join(tmp, name)
        with open(local, "wb") as f:
            f.write(data)
        client.log_artifact(run_id, local, artifact_path=directory or None)


_registered_tables: set = set()


def _register_table(client, run_id: str, path: str) -> None:
    # Same tag that mlflow.log_table writes, so mlflow.load_table and the UI find the table.
    # Once per (run, table) and process: it is a read-modify-write of a run tag.
    if (run_id, path) in _registered_tables:
        return
    run = client.get_run(run_id)
    current = json.loads(run.data.tags.get(_layout.MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": path, "type": "table"}
    if entry not in current:
        current.append(entry)
        client.set_tag(run_id, _layout.MLFLOW_LOGGED_ARTIFACTS, json.dumps(current),
                       synchronous=True)
    _registered_tables.add((run_id, path))


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
        self._stop = False
        self._warned_down = False
        self._down_since: Optional[float] = None
        self._down_message = ""
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.sent = 0

    # -- caller side ---------------------------------------------------------------------
    def submit(self, item: Item) -> None:
        """Queue an item without blocking; if the queue is full, write it to the spool here."""
        with self._seq_lock:
            item.seq = next(self._seq)
        self._ensure_thread()
        self._idle.clear()
        if self._down_since is not None and not self._warned_down:
            # Warn from the caller's thread, where the user (and pytest) sees it.
            self._warned_down = True
            warnings.warn(self._down_message, EigenCAMWarning, stacklevel=3)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            write_item(self.spool_dir, item)
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
            self._persist_queued()
            status = self._drain()
            if status == "down":
                self._wake.wait(timeout=delay)
                self._wake.clear()
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            if self._queue.empty() and not pending_items(self.spool_dir):
                self._idle.set()
            self._wake.wait(timeout=1.0)
            self._wake.clear()

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
