"""The sender: a write-ahead spool on disk that a background thread drains to MLflow.

The promise, and how it is kept:

* **Nothing returned is lost.** :meth:`MlflowSink.submit` writes the item to the spool before
  it returns: one record file, written under a temporary name and renamed (see
  :mod:`._spool`), which outlives the process; the sender fsyncs it a moment later, against
  an OS crash. The training thread pays for that write (raw pixel arrays, no encoding:
  about 1.5 ms per epoch) and for nothing else. A background sender encodes the images,
  draws the epoch grids, uploads, and deletes the record only once MLflow confirmed it. A
  process that is killed, crashes or never calls ``close()`` leaves its records; the next
  logger on the same run sends them, and ``mlflow-eigencam send-spool`` (no argument) sends
  every spool left (:mod:`._recovery`).
* **Nothing of the user's is touched.** Spools live in folders the package created and
  marked; only our own file names inside them are ever deleted.
* **Loud when the promise cannot be kept.** A spool that cannot be written warns once (folder
  and errno) and items are sent from memory; 401/403 keep the items and say so; ``close()``
  returns an :class:`Undelivered` count that says what is left and where.
* **Never blocks training.** ``import mlflow``, run creation, the ``/health`` probe and every
  request run on the sender thread.
* **Bounded lag.** When items pile up on a starved sender (cores saturated) the training
  thread encodes the images itself instead of queueing more work (``lag_limit``), and early
  encodes stop. A slow server (:attr:`State.SLOW`) is latency, not work: up to
  ``IN_FLIGHT`` items are sent at once, each uploading its files on several threads
  (:mod:`._transport`), and the training thread never encodes for it.
* **A bounded spool.** Past ``COMPACT_BYTES`` (:mod:`._keeping`) while MLflow cannot be
  reached, the sender rewrites waiting records with their images encoded;
  ``spool_max_bytes`` caps the rest.

Items and their records are in :mod:`._records`, the folders and files on disk in
:mod:`._spool`, what one sink keeps there (write-ahead, cap, compaction, its folder and run
file, in-memory copies) in :mod:`._keeping`, every MLflow call in :mod:`._transport`; this
module decides what to send when.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import logging
import os
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _recovery, _spool, _transport
from ._keeping import Entry, SpoolKeeper
from ._records import Encoded, ForeignRecord, Item, item_from_record
from ._spool import SpoolError, default_spool_root
from ._transport import Failure, SendError
from .errors import EigenCAMWarning

__all__ = ["DEFAULT_SPOOL_MAX_BYTES", "EigenCAMWarning", "MlflowSink", "State", "Undelivered"]

_log = logging.getLogger("mlflow_eigencam")

#: Items sent at once (each uploads its files on up to ``_transport.UPLOAD_THREADS``).
IN_FLIGHT = 3

#: Default cap on a sink's spooled records (see ``MlflowSink(spool_max_bytes=...)``): 1 GiB.
DEFAULT_SPOOL_MAX_BYTES = 1 << 30


class State(enum.Enum):
    """What the sender last saw of MLflow."""

    OK = "ok"  #: items go through
    #: items go through, but the server's answers take over ``_transport.SLOW_S`` seconds:
    #: no copy kept in memory beyond those in flight, the training thread never encodes for
    #: the sender (it waits on the network, not on a CPU), the probe waits longer
    SLOW = "slow"
    DOWN = "down"  #: unreachable (or the run cannot be created): retried with backoff
    REFUSED = "refused"  #: 401/403: items kept, retried with backoff, never set aside


class Drain(enum.Enum):
    """How one pass of the sender over the waiting items ended."""

    DONE = "done"  #: nothing left that can be sent now
    BACKOFF = "backoff"  #: MLflow unreachable or refusing: wait, then try again
    STOPPED = "stopped"  #: closed while sending


class Undelivered(int):
    """What :meth:`MlflowSink.close` could not deliver: the count, where it is, and why.

    Every item not in MLflow counts: records left in the spool (``records``), items only in
    memory (``in_memory``), records set aside in ``failed/`` (``set_aside``: MLflow rejected
    them, a deleted run, or refused as not the logger's own) and items dropped at the
    in-memory cap (``dropped``). Compares and adds as an int (0 when everything arrived).
    """

    records: List[Path]
    in_memory: int
    folder: Optional[Path]
    reason: str
    set_aside: List[Path]
    dropped: int
    #: Bundles spooled without their images because the spool was at ``spool_max_bytes``.
    images_not_kept: int

    def __new__(cls, records: List[Path], in_memory: int, folder: Optional[Path],
                reason: str = "", *, set_aside: Sequence[Path] = (),
                dropped: int = 0, images_not_kept: int = 0) -> "Undelivered":
        obj = super().__new__(cls, len(records) + in_memory + len(set_aside) + dropped + images_not_kept)
        obj.records, obj.in_memory = list(records), in_memory
        obj.folder, obj.reason = folder, reason
        obj.set_aside, obj.dropped = list(set_aside), dropped
        obj.images_not_kept = images_not_kept
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
        if self.set_aside:
            names = ", ".join(str(p) for p in self.set_aside[:3])
            more = f" and {len(self.set_aside) - 3} more" if len(self.set_aside) > 3 else ""
            parts.append(f"{len(self.set_aside)} item(s) were NOT delivered: MLflow rejected "
                         f"them (a deleted run, an invalid value) or they were refused; set "
                         f"aside with a .err note: {names}{more}")
        if self.dropped:
            parts.append(f"{self.dropped} item(s) were dropped (only in memory, beyond the "
                         f"cap, or rejected) and are NOT in MLflow")
        if self.images_not_kept:
            parts.append(f"the images (cards, image series, grid) of {self.images_not_kept} "
                         f"epoch bundle(s) were NOT kept because the spool was full "
                         f"(spool_max_bytes); their table rows and metrics were")
        reason = f" Last error: {self.reason}." if self.reason else ""
        return "mlflow_eigencam: " + "; ".join(parts) + "." + reason


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
        memory_items: Items kept only in memory (the spool could not be written) beyond
            which the oldest are dropped, counted and reported. An item that is a record on
            disk keeps no in-memory copy while MLflow is unreachable (it is re-read from its
            record when sent), and at most ``lag_limit`` copies while it is reachable.
        spool_max_bytes: Cap on the bytes of this sink's records (default 1 GiB; None: no
            cap). At 80 % one warning; at the cap one more, and a bundle keeps its images
            only when its epoch (step) is a multiple of ``thin_every`` (its table rows,
            metrics and tags always), at twice the cap never. Every bundle spooled without
            images is counted in :meth:`close`'s :class:`Undelivered` (``images_not_kept``).
        thin_every: See ``spool_max_bytes``.
    """

    def __init__(self, spool_dir: str | os.PathLike | None = None, *,
                 run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
                 create_run: bool = False, experiment_id: Optional[str] = None,
                 backoff: Tuple[float, float] = (0.5, 10.0), lag_limit: int = 2,
                 memory_items: int = 32, spool_max_bytes: Optional[int] = DEFAULT_SPOOL_MAX_BYTES,
                 thin_every: int = 10) -> None:
        if spool_max_bytes is not None and int(spool_max_bytes) <= 0:
            raise ValueError(f"spool_max_bytes must be a positive number of bytes or None, "
                             f"got {spool_max_bytes!r}")
        if int(thin_every) < 1:
            raise ValueError(f"thin_every must be >= 1, got {thin_every!r}")
        self._run_id = run_id
        self._tracking_uri = tracking_uri
        self._create = create_run and run_id is None
        self._experiment_id = experiment_id
        self._experiment_name: Optional[str] = None
        if self._create and experiment_id is None:
            # The experiment active now (no request): where the run goes, even when it is
            # created later by the sender or by send-spool in another process.
            self._experiment_id, self._experiment_name = _transport.active_experiment()
        self.owns_run = False
        self._run_known = threading.Event()
        if run_id is not None and tracking_uri is not None:
            self._run_known.set()
        self._backoff = backoff
        self.lag_limit = lag_limit
        self._lock = threading.RLock()
        self._pending_warnings: List[str] = []
        self._warned: set = set()
        #: The spool-keeping half: folder, records, cap, compaction, in-memory copies. It
        #: shares this sink's lock, and its entries are this sink's ``_items`` (one dict).
        self._keeper = SpoolKeeper(
            Path(spool_dir) if spool_dir is not None else default_spool_root(),
            f"{os.getpid()}x{uuid.uuid4().hex[:10]}", self._lock, run_info=self._run_info,
            queue_warning=self._queue_warning, memory_items=memory_items,
            spool_max_bytes=None if spool_max_bytes is None else int(spool_max_bytes),
            thin_every=int(thin_every))
        self._items = self._keeper.items
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._pool: Optional[_transport.DaemonPool] = None
        self._adopted = False
        self._state = State.OK
        self._down_since: Optional[float] = None
        self._last_error = ""
        self._early: "collections.deque[Encoded]" = collections.deque()
        self._failures: Dict[str, int] = {}
        self._niced = False
        self.sent = 0
        self.dropped = 0
        #: Items dropped because the run already had their epoch (see :meth:`_drop_repeat`).
        self.repeats = 0
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
        return self._keeper.spool_dir

    @property
    def folder(self) -> Optional[Path]:
        """This sink's spool folder, once it wrote something (None before)."""
        return self._keeper.folder

    def _run_info(self) -> Dict[str, Any]:
        """The run the records go to, as the spool's run file records it."""
        return {"tracking_uri": self._tracking_uri, "run_id": self._run_id,
                "experiment_id": self._experiment_id, "experiment_name": self._experiment_name,
                "creates_run": self._create}

    # -- caller side (the training thread) -------------------------------------------------
    def submit(self, item: Item) -> None:
        """Write ``item`` to the spool (atomically) and hand it to the sender.

        When this returns the item is on disk, unless the spool cannot be written (then a
        warning said so once and the item is sent from memory). Never raises for disk or
        network trouble.
        """
        self._reopen()
        _recovery.track(self)
        self._materialize(item)
        self._keeper.apply_cap(item)
        with self._lock:
            name = self._keeper.new_name()
            backlog = len(self._items)
        if backlog >= self.lag_limit and self._state is State.OK:
            self._help_encode(item)
        path = self._keeper.write_ahead(name, item)
        with self._lock:
            self._items[name] = Entry(item, path, time.monotonic())
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
        # One deadline for the whole close (flush, ending the run, stopping the sender): a
        # hung server must not stretch an exit past a preemption's grace period.
        deadline = None if timeout is None else time.monotonic() + timeout

        def left_s(cap: float) -> float:
            return cap if deadline is None else max(0.1, min(cap, deadline - time.monotonic()))

        done = self.flush(timeout)
        self._warn_pending(stacklevel=2)
        if end_run and not done and self._create:
            self._keeper.update_run_file(end_status="FINISHED")
        uri, run_id = self._tracking_uri, self._run_id
        if end_run and done and self.owns_run and uri and run_id:
            _transport.bounded(lambda: _transport.end_run(uri, run_id), left_s(10.0))
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=left_s(5.0))
        stuck = self._thread is not None and self._thread.is_alive()
        records, in_memory = self._keeper.leftovers()
        self._keeper.sync()  # what is left must outlast an OS crash too
        report = Undelivered(records, in_memory, self.folder,
                             self._last_error if (records or in_memory or self.set_aside
                                                  or self.dropped) else "",
                             set_aside=self.set_aside, dropped=self.dropped,
                             images_not_kept=self._keeper.images_not_kept)
        self._closed = True
        _recovery.untrack(self)
        if report:
            msg = report.message()
            warnings.warn(msg, EigenCAMWarning, stacklevel=2)
            _log.warning(msg)
        if not stuck:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            self._keeper.release(records_left=bool(records))
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
            # A snapshot: the sender may be adding this item's grid to its files right now
            # (compose_grids), and iterating the live dict then raised mid-epoch.
            for payload in list((it.files or {}).values()):
                if isinstance(payload, Encoded) and not payload.ready:
                    try:
                        payload.encode_unless_busy()
                    except Exception:  # the send reports a bad image
                        pass

    def _trim_memory(self) -> None:
        """While MLflow is unreachable no copy of an item that is a record (re-read when
        sent), else the oldest ``lag_limit`` (see :meth:`.SpoolKeeper.trim_memory`)."""
        with self._lock:
            self.dropped += self._keeper.trim_memory(self.lag_limit if self._state is State.OK else 0)

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
                self._keeper.sync()
                self._encode_early()
                status = self._drain()
            except Exception as exc:  # a bug here must not kill the sender silently
                _log.exception("mlflow_eigencam: sender error: %s", exc)
                self._last_error = f"{type(exc).__name__}: {exc}"
                status = Drain.BACKOFF
            self.worker_cpu_s += time.thread_time() - cpu
            if self._stop:
                return
            if status is Drain.BACKOFF:
                until = time.monotonic() + delay
                while (not self._stop and not self._wake.is_set()
                       and time.monotonic() < until and self._keeper.compact_one()):
                    pass  # the wait is spent encoding what waits on disk
                self._wake.wait(timeout=max(0.0, until - time.monotonic()))
                delay = min(delay * 2, self._backoff[1])
            else:
                delay = self._backoff[0]
                with self._lock:
                    if not self._items:
                        self._idle.set()
                self._wake.wait(timeout=1.0)
            self._wake.clear()

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
                raise SendError(Failure.REJECTED, "no run to log to")
            self._run_id = _transport.create_run(self._tracking_uri, self._experiment_id,
                                                 self._experiment_name)
            self.owns_run = True
        self._keeper.update_run_file()
        self._run_known.set()

    def _drain(self) -> Drain:
        if not self._items:
            return Drain.DONE
        try:
            self._resolve()
        except SendError as exc:  # kept on disk, retried with backoff
            self._mark_down(exc)
            return Drain.BACKOFF
        if not self._niced:
            # Only now: the one-off work (import mlflow, the store's first connection, the
            # run) at a low priority took minutes on a loaded machine; uploads can wait.
            self._niced = True
            _lower_thread_priority()
        if not self._adopted:
            self._adopted = True
            try:
                self._keeper.adopt(self._run_id, self._tracking_uri)
            except Exception as exc:  # leftovers are a bonus; never stop on them
                _log.warning("mlflow_eigencam: could not take over leftover spools: %s", exc)
        with self._lock:
            names = sorted(self._items)
        # Up to IN_FLIGHT items are sent at once (the next epoch's files upload while the
        # last one's metrics go out: a slow server is latency, not work); their results are
        # taken in submit order, and a record is deleted only once its item was confirmed.
        flight: "collections.deque[Tuple[str, Entry, Item, concurrent.futures.Future]]" = \
            collections.deque()
        status, i = Drain.DONE, 0
        while True:
            # A local store has no latency to hide, and sqlite serialises writers anyway.
            depth = IN_FLIGHT if str(self._tracking_uri).startswith(("http://", "https://")) else 1
            while status is Drain.DONE and i < len(names) and len(flight) < depth:
                if self._stop and self._closed:
                    status = Drain.STOPPED
                    break
                name = names[i]
                with self._lock:
                    entry = self._items.get(name)
                if entry is None:
                    i += 1
                    continue
                item = self._load(name, entry)
                if item is None:
                    i += 1
                    continue
                if item.once is not None and any(f[2].once == item.once for f in flight):
                    break  # the same epoch twice (a repeat): after the first one's answer
                i += 1
                item.run_id, item.tracking_uri = self._run_id, self._tracking_uri
                flight.append((name, entry, item, self._executor().submit(self._send, item)))
                del item
            if not flight:
                return status
            name, entry, item, future = flight.popleft()
            error = future.exception()
            del item, future
            if error is None:
                self._delivered(name, entry)
                continue
            failed = error if isinstance(error, SendError) else SendError(Failure.UNEXPECTED,
                                                                          str(error))
            if failed.kind is Failure.REJECTED:
                self._give_up(name, entry, str(failed))
            elif failed.kind is Failure.REPEAT:
                self._drop_repeat(name, entry, str(failed))
            elif failed.kind is Failure.UNEXPECTED and self._count_failure(name) >= 3:
                self._give_up(name, entry, f"failed 3 times: {failed}")
            else:
                self._mark_down(failed)  # UNREACHABLE, REFUSED, UNEXPECTED: kept, retried
                if status is Drain.DONE:
                    status = Drain.BACKOFF

    def _load(self, name: str, entry: Entry) -> Optional[Item]:
        """The entry's item (its copy, else read back from its record), or None when it is
        set aside (unreadable, refused, another run's)."""
        try:
            if entry.item is not None:
                item = entry.item
            elif entry.path is not None:
                item = item_from_record(entry.path)
            else:  # neither in memory nor on disk: cannot happen, say so if it does
                raise SpoolError("an item with neither a copy nor a record")
        except ForeignRecord as exc:
            self._give_up(name, entry, str(exc), refused=True)
            return None
        except (OSError, SpoolError) as exc:
            self._give_up(name, entry, f"unreadable record: {exc}")
            return None
        if item.run_id not in (None, self._run_id):
            self._give_up(name, entry, f"record for run {item.run_id}, not {self._run_id}",
                          refused=True)
            return None
        return item

    def _executor(self) -> _transport.DaemonPool:
        if self._pool is None:
            self._pool = _transport.DaemonPool(IN_FLIGHT, "mlflow-eigencam-send",
                                               _lower_thread_priority)
        return self._pool

    def _send(self, item: Item) -> None:
        """One item to MLflow (on a thread of :meth:`_executor`)."""
        cpu = time.thread_time()
        try:
            _transport.send_item(item, workdir=self.folder if self._keeper.disk_error is None else None)
        finally:
            with self._lock:
                self.worker_cpu_s += time.thread_time() - cpu

    def _count_failure(self, name: str) -> int:
        self._failures[name] = self._failures.get(name, 0) + 1
        return self._failures[name]

    def _delivered(self, name: str, entry: Entry) -> None:
        """MLflow confirmed the item: delete its record, note the state of the server."""
        entry.item = None
        self._keeper.delete(name, entry)
        self.sent += 1
        self.delivered.append((entry.submitted, time.monotonic()))
        uri = self._tracking_uri or ""
        state = State.SLOW if _transport.is_slow(uri) else State.OK
        if self._state in (State.DOWN, State.REFUSED):
            _log.warning("mlflow_eigencam: MLflow %s again after %.1f s; sending the "
                         "spool in %s", "accepts uploads" if self._state is State.REFUSED
                         else "reachable", time.monotonic() - (self._down_since
                                                               or time.monotonic()),
                         self.folder)
            self._down_since = None
        if state is State.SLOW and self._state is not State.SLOW and "slow" not in self._warned:
            self._warned.add("slow")
            _log.warning("mlflow_eigencam: MLflow at %s answers slowly (%.1f s per request); "
                         "uploads go on, %d files at a time, and the health probe waits "
                         "longer", uri, _transport.response_time(uri) or 0.0,
                         _transport.UPLOAD_THREADS)
        self._state = state

    def _give_up(self, name: str, entry: Entry, reason: str, refused: bool = False) -> None:
        """MLflow refused an item for good, or the record is not one the logger would write
        (``refused``): keep its record in ``failed/`` of our folder, count it, say so."""
        self._keeper.forget(name)
        where = "it is dropped (it was only in memory)"
        if entry.path is not None and self.folder is not None:
            try:
                kept = _spool.set_aside(entry.path.parent, entry.path, reason)
                self.set_aside.append(kept)
                where = f"kept in {kept.parent}"
            except (OSError, SpoolError) as exc:
                self.set_aside.append(entry.path)
                where = f"left in {entry.path} ({exc})"
        else:
            self.dropped += 1
        if refused:
            came = entry.origin or (entry.path.parent if entry.path is not None else None)
            msg = (f"mlflow_eigencam: refused a record found in {came} ({reason[:300]}); "
                   f"nothing of it was sent, {where}")
        else:
            msg = f"mlflow_eigencam: MLflow rejected an item ({reason[:300]}); {where}"
        _log.warning(msg)
        self._queue_warning("refused-record" if refused else "rejected", msg)

    def _drop_repeat(self, name: str, entry: Entry, reason: str) -> None:
        """The run already has this epoch: drop the item, so the first logged epoch stands
        (one metric point, one image and one table row per step; see :mod:`._table`)."""
        self._keeper.delete(name, entry)
        entry.item = None
        self.repeats += 1
        msg = (f"mlflow_eigencam: {reason}; this repeat of it was not logged (the first "
               f"logged epoch is kept). A second fit in the same run continues after the last "
               f"logged epoch when its integration calls EigenCAMLogger.begin_fit().")
        _log.warning(msg)
        self._queue_warning("repeat", msg)

    def _mark_down(self, exc: SendError) -> None:
        self._last_error = str(exc)[:300]
        where = str(self.folder or self.spool_dir)
        if self._keeper.disk_error is not None:
            where = f"memory (the spool in {where} cannot be written: {self._keeper.disk_error})"
        if self._state in (State.OK, State.SLOW):
            self._down_since = time.monotonic()
        if exc.kind is Failure.REFUSED:
            self._state = State.REFUSED
            msg = (f"mlflow_eigencam: MLflow refused the upload ({self._last_error}); check "
                   f"your credentials. Items are kept in {where} and retried; nothing is set "
                   f"aside.")
            self._queue_warning("refused", msg)
        else:
            self._state = State.DOWN
            what = ("cannot start the MLflow run" if exc.kind is Failure.REJECTED
                    else "cannot reach MLflow")
            msg = (f"mlflow_eigencam: {what} ({self._last_error[:200]}); training "
                   f"goes on. EigenCAM images, tables and metrics are kept in {where} and "
                   f"retried with backoff.")
            self._queue_warning("down", msg)
        if f"logged-{self._state.value}" not in self._warned:
            self._warned.add(f"logged-{self._state.value}")
            _log.warning(msg)
        self._trim_memory()  # not sending now: what is on disk is re-read when sent


def _lower_thread_priority() -> None:
    """Let the training threads win the CPU: uploads can wait, an epoch should not (the
    back-pressure in :meth:`MlflowSink.submit` keeps the wait bounded).

    On Linux a thread is a task with its own nice value; elsewhere this does nothing.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
