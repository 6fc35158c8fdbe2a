"""The explorer's HTTP side: a small read-only WSGI app over :class:`~mlflow_eigencam._reader.Reader`.

Routes (relative to where the app is mounted; ``mlflow-eigencam ui`` mounts it at ``/``, the
``mlflow.app`` plugin at ``/eigencam``):

* ``GET /``: the page; ``GET /static/app.js``, ``charts.js``, ``views.js`` and ``app.css``:
  its code (a fixed list).
* ``GET /api/config``: the tracking URI, the MLflow UI's address (for run links) and the
  most runs one view shows.
* ``GET /api/search?q=TEXT``: runs with EigenCAM data whose experiment, name, id or a tag
  contains TEXT.
* ``GET /api/runs?ids=A,B``: what each run has (modes, dataset ids); unknown ids are named.
* ``GET /api/data?runs=A,B&mode=M&ds_id=D``: the joined tables, epochs and the cards' panel
  boxes (as the logger recorded them with each row).
* ``GET /api/metrics?runs=A,B&mode=M&ds_id=D``: per-epoch series of the runs' signal metrics
  that their tables do not hold (a label-free one such as ``fixation``).
* ``GET /api/image?run=A&mode=M&ds_id=D&epoch=E&index=I&kind=preview|card``: one image.
* ``GET /api/export?runs=A,B&mode=M&ds_id=D&epoch=E&component=C&samples=S1,S2&format=png|html``:
  the current view through ``compare``'s renderer, as a download.
* ``GET /api/overlay``, ``/api/input``, ``/api/maps``: a row's boxes, raw input and maps,
  composited by the page (:mod:`._media`).

Behind an authenticating middleware (``mlflow server --app-name eigencam-basic-auth``), the
request's ``environ[MAY_READ]`` says which experiments its user may read: a run of another
experiment is never listed (search), described (runs, data) or served (image, export); the
page is told the same as for a run that does not exist.

Safety: an image or export names a run id, a mode, a dataset id and integers; the artifact
path is built from the layout (or taken from what MLflow listed for that run), so nothing in
a URL reaches the filesystem. Nothing is written to MLflow. The page sets every text with
``textContent``; JSON answers are ``application/json`` with ``nosniff``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs

from .. import _layout
from .._reader import Reader, card_boxes, cell_bool, cell_text
from . import _media

__all__ = ["Explorer", "MAY_READ"]

_STATIC = Path(__file__).with_name("static")
_FILES = {"app.js": "text/javascript; charset=utf-8", "charts.js": "text/javascript; charset=utf-8",
          "app.css": "text/css; charset=utf-8", "overlay.js": "text/javascript; charset=utf-8"}
_FILES["views.js"] = "text/javascript; charset=utf-8"  # fan-out, grouping, signal sorts
_SAMPLE_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
# A finished run's table and listing do not change; a running run's are re-read this often.
_LIVE_TTL_S = 2.0
_IMMUTABLE = "public, max-age=31536000, immutable"
# Rows whose previews are read ahead when a table is served: the top ones, what a first
# paint waits for (the page fetches them first too, and the rows below them lazily: read
# ahead here, those competed with these). Made from their cards (the path is
# in the table) while the run's image listing is not read yet: a listing is one request, but
# of every image of the run (960 entries for 30 epochs x 16 samples, ~60 ms of CPU between
# the two servers); the preview made from the card is the logged one, byte for byte (the
# logger made it with the same encoder from the same card).
_PREFETCH_ROWS = 2
# Runs one request may name (the page adds no more than this to a view).
MAX_RUNS = 64
#: WSGI environ key an authenticating middleware sets: ``may_read(experiment_id: str) ->
#: bool`` for the request's user (absent: every run the reader reaches may be read).
MAY_READ = "mlflow_eigencam.may_read"

StartResponse = Callable[..., Any]


class HTTPError(Exception):
    """An answer other than 200, with a one-line message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Explorer:
    """The explorer as a WSGI application (read-only).

    Args:
        tracking_uri: Where the runs live (opened now: a bad URI fails here).
        mlflow_ui: Base address of the MLflow UI for run links, absolute or relative to the
            page; default the tracking URI when it is ``http(s)://``, else none.
        reader: Instead of ``tracking_uri``: makes the reader at the first request (the
            ``mlflow.app`` plugin: over the server's own stores, once the server is set up).
            Nothing a request carries (its ``Host``) ever chooses where the explorer reads.
    """

    def __init__(self, tracking_uri: Optional[str] = None, *, mlflow_ui: Optional[str] = None,
                 reader: Optional[Callable[[], Reader]] = None) -> None:
        if (tracking_uri is None) == (reader is None):
            raise ValueError("Explorer needs a tracking URI or a reader (one of them), got "
                             f"tracking_uri={tracking_uri!r}, reader={reader!r}")
        self._reader: Optional[Reader] = Reader(tracking_uri) if tracking_uri else None
        self._make_reader = reader
        self._ui = mlflow_ui
        self._lock = threading.Lock()
        self._cache: Dict[Tuple[Any, ...], Tuple[float, Any, bool]] = {}
        self._known: Dict[str, Any] = {}  # run id -> Run, for runs the page asked about
        # One progress bar per downloaded preview would flood the server's terminal.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # As many as the runs of a large view: with fewer, the last runs' tables of a cold
        # first look start only when the first ones are read.
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="eigencam-explorer")
        # The runs' image listings (a few hundred entries each: the slowest read of a first
        # look), started once the runs' tables are read (data()). Their own pool: the
        # prefetches wait for them.
        self._listings = ThreadPoolExecutor(max_workers=8, thread_name_prefix="eigencam-list")
        self._background = ThreadPoolExecutor(max_workers=4, thread_name_prefix="eigencam-prefetch")
        self._images = _LRU(max_bytes=256 * 2 ** 20)
        self._inflight: Dict[Tuple[Any, ...], Future] = {}
        # The request's MAY_READ, for the request's own thread (checks never run in a pool).
        self._request = threading.local()
        # Pillow's WebP encoder is loaded (~80 ms) by the first /api/data, beside the tables:
        # not here, where no thread may start (gunicorn forks its worker after this; a child
        # forked during an import in another thread deadlocks on that module's lock).
        self._warm = False

    # -- WSGI ------------------------------------------------------------------------------
    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path and environ.get("SCRIPT_NAME"):  # /eigencam -> /eigencam/ (relative links)
            # Relative to the request (RFC 7231): right behind a proxy that adds a prefix or
            # terminates TLS, where neither this server's address nor its path is the user's.
            last = environ["SCRIPT_NAME"].rstrip("/").rsplit("/", 1)[-1]
            start_response("301 Moved Permanently", [("Location", f"{last}/"),
                                                     ("Content-Length", "0")])
            return [b""]
        path = path or "/"
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        try:
            if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
                raise HTTPError(405, "the explorer is read-only")
            if self._reader is None:
                self._open_reader()
            self._request.may_read = environ.get(MAY_READ)
            status, headers, body = self._route(path, query, environ)
        except HTTPError as exc:
            status, headers, body = exc.status, _json_headers(), _dumps({"error": str(exc)})
            headers.append(("Cache-Control", "no-store"))
        except Exception as exc:  # an MLflow or network failure: say it on the page
            status, headers, body = 502, _json_headers(), _dumps(
                {"error": f"{type(exc).__name__}: {exc}"})
            headers.append(("Cache-Control", "no-store"))
        etag = next((v for k, v in headers if k == "ETag"), None)
        if status == 200 and etag and environ.get("HTTP_IF_NONE_MATCH") == etag:
            status, body = 304, b""
        headers.append(("Content-Length", str(len(body))))
        headers.append(("X-Content-Type-Options", "nosniff"))
        start_response(_STATUS.get(status, f"{status} Error"), headers)
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    def _open_reader(self) -> None:
        assert self._make_reader is not None
        with self._lock:
            if self._reader is None:
                self._reader = self._make_reader()

    def _may_read(self) -> Optional[Callable[[str], bool]]:
        return getattr(self._request, "may_read", None)

    def _gate(self, rid: str, found: Any, may_read: Optional[Callable[[str], bool]]) -> Any:
        """``found`` (a Run, or the message of a failed lookup) as the request's user may see
        it: a run of an experiment they may not read, and any failed lookup (a prefix's
        matches name other runs), become one message that says nothing about it."""
        if may_read is None:
            return found
        if isinstance(found, str) or not may_read(str(found.info.experiment_id)):
            return (f"no run with id {rid!r} (or starting with it) that you may read on "
                    f"{self.reader.uri}")
        return found

    def _readable_run(self, rid: str):
        """The Run of ``rid`` when the request's user may read it (HTTP 404 otherwise)."""
        may_read = self._may_read()
        try:
            found = self._gate(rid, self._run(rid), may_read)
        except HTTPError as exc:
            if may_read is None:
                raise
            found = self._gate(rid, str(exc), may_read)
        if isinstance(found, str):
            raise HTTPError(404, found)
        return found

    @property
    def reader(self) -> Reader:
        assert self._reader is not None
        return self._reader

    def _route(self, path: str, q: Dict[str, str], environ: Dict[str, Any]):
        if path in ("/", "/index.html"):
            return 200, [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-cache")], \
                (_STATIC / "index.html").read_bytes()
        if path == "/favicon.ico":
            return 204, [("Cache-Control", "max-age=86400")], b""
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            if name not in _FILES:
                raise HTTPError(404, f"no file {name!r}")
            body = (_STATIC / name).read_bytes()
            return 200, [("Content-Type", _FILES[name]), ("Cache-Control", "no-cache"),
                         ("ETag", _etag(body))], body
        handlers = {"/api/config": self.config, "/api/search": self.search,
                    "/api/runs": self.runs, "/api/data": self.data, "/api/image": self.image,
                    "/api/export": self.export, "/api/metrics": self.metrics}
        handlers.update(_media.routes(self))
        handler = handlers.get(path)
        if handler is None:
            raise HTTPError(404, f"no page {path!r}")
        return handler(q)

    # -- API -------------------------------------------------------------------------------
    def config(self, q: Dict[str, str]):
        ui = self._ui or (self.reader.uri if self.reader.remote else None)
        return _json({"tracking_uri": self.reader.uri, "mlflow_ui": ui, "max_runs": MAX_RUNS})

    def search(self, q: Dict[str, str]):
        found = self.reader.search(q.get("q", ""), max_results=_int(q, "max", 200))
        may_read = self._may_read()
        if may_read is not None:
            found = [s for s in found if may_read(str(s.experiment_id))]
        return _json({"runs": [_summary_json(s) for s in found]})

    def runs(self, q: Dict[str, str]):
        ids = _ids(q.get("ids", ""))
        out, errors = [], []
        may_read = self._may_read()
        for rid, res in zip(ids, self._pool.map(self._resolve_or_error, ids)):
            res = self._gate(rid, res, may_read)
            if isinstance(res, str):
                errors.append({"id": rid, "message": res})
                continue
            s = self.reader.summary(res)
            entry = _summary_json(s)
            entry["requested"] = rid
            entry["available"] = [{"mode": m, "ds_id": d} for m, d in self._available(res)]
            out.append(entry)
        return _json({"runs": out, "errors": errors}, cache="no-cache")

    def data(self, q: Dict[str, str]):
        """The tables of the runs for (mode, ds_id), with each run's summary and what it has.
        Without ``mode`` / ``ds_id`` the first pair the runs have is taken (``eval`` first)."""
        ids = _ids(q.get("runs", ""))
        may_read = self._may_read()
        # Each run's table is started as soon as that run is resolved (and checked, here in
        # the request's thread), for the pair it would show alone: on a cold explorer the
        # slowest of 10 get_run calls took ~500 ms, and the tables waited for all of them.
        # The pair chosen for all the runs below is the same unless the runs differ; a
        # table read for another pair is only a cache entry.
        pending = {self._pool.submit(self._resolve_or_error, rid): i for i, rid in enumerate(ids)}
        resolved: List[Any] = [None] * len(ids)
        for fut in as_completed(pending):
            i = pending[fut]
            found = resolved[i] = self._gate(ids[i], fut.result(), may_read)
            if not isinstance(found, str):
                own_mode, own_ds = _choose(self._available(found), q.get("mode"), q.get("ds_id"))
                self._pool.submit(_quietly, self._table, found.info.run_id, own_mode,
                                  None if own_ds == _layout.ALL_DS else own_ds)
        pairs: List[Tuple[str, str]] = []
        for res in resolved:
            if not isinstance(res, str):
                pairs += [p for p in self._available(res) if p not in pairs]
        mode, ds_id = _choose(pairs, q.get("mode"), q.get("ds_id"))
        seg = None if ds_id == _layout.ALL_DS else ds_id
        if not self._warm:
            self._warm = True
            self._background.submit(_quietly, _preview_of, _TINY_PNG)
        for res in resolved:  # the runs' experiments' names, beside the tables
            if not isinstance(res, str):
                self._listings.submit(_quietly, self._experiment, str(res.info.experiment_id))
        # A run that could not be found (or may not be read) is its message; the others'
        # tables are read in parallel.
        read = iter(self._pool.map(lambda rid: self._run_data(rid, mode, seg),
                                   [rid for rid, res in zip(ids, resolved) if not isinstance(res, str)]))
        results: List[Dict[str, Any]] = [
            {"requested": rid, "error": res} if isinstance(res, str) else next(read)
            for rid, res in zip(ids, resolved)]
        body = _dumps({"mode": mode, "ds_id": ds_id, "runs": results})
        # The page asks for these previews next: start fetching them (the epoch it shows,
        # default the last logged one), in row order so the top of the table comes first.
        epochs = [e for r in results for e in r.get("epochs", [])]
        if epochs:
            want = _int(q, "epoch", max(epochs))
            # Row by row, as the page draws them: the top of the table first. The input
            # column shows each sample's first logged row.
            jobs: Dict[str, List[Tuple[str, int, int]]] = {}
            for r in results:
                firsts: Dict[str, dict] = {}
                for row in r.get("rows", []):
                    firsts.setdefault(row["sample_id"], row)
                    if row["epoch"] == want:
                        jobs.setdefault(row["sample_id"], []).append((r["run_id"], want, row["index"]))
                for sid, row in firsts.items():
                    if sid not in jobs or jobs[sid][0][0] != r["run_id"]:
                        continue
                    jobs[sid].insert(0, (r["run_id"], row["epoch"], row["index"]))
            # Only the top rows. The neighbouring epochs (a slider step) are the page's to read
            # ahead, once the rows on screen have their images: read here, they competed with
            # those rows for the tracking server, and a cold first paint waited for them.
            for sid in list(jobs)[:_PREFETCH_ROWS]:
                for rid, e, index in dict.fromkeys(jobs[sid]):
                    self._prefetch(rid, mode, seg, e, index, from_card=True)
        # The previews' listings are not needed for this answer, only for the images the page
        # asks for next: started once the tables are read (beside them, they held the tables
        # up at the tracking server, and the answer with them).
        for res in resolved:
            if not isinstance(res, str):
                self._listings.submit(_quietly, self._previews, res.info.run_id, mode, seg)
        return 200, _json_headers() + [("Cache-Control", "no-cache"), ("ETag", _etag(body))], body

    def metrics(self, q: Dict[str, str]):
        """Per-epoch series of the runs' signal metrics for (mode, ds_id) that their tables
        do not hold (``eigencam/{mode}/{ds_id}/<name>``, ``evr_*`` and the table's columns
        left out: the page has those from ``/api/data``), found from each run's metric keys:
        ``{"runs": [{"run_id", "metrics": {name: [[epoch, value], ...]}}]}``."""
        ids = _ids(q.get("runs", ""))
        mode, ds_id = _mode_ds(q)
        prefix = _layout.prefix(mode, ds_id) + "/"

        def one(run: Any) -> Dict[str, Any]:
            full = run.info.run_id
            if self._live(full):
                run = self._run(full, fresh=True)
            try:
                in_table = set(signal_columns(self._table(full, mode, ds_id)))
            except Exception:  # no table: the metrics are still this run's
                in_table = set()
            names = sorted(k[len(prefix):] for k in run.data.metrics
                           if k.startswith(prefix) and "/" not in k[len(prefix):]
                           and not _EVR.match(k[len(prefix):]) and k[len(prefix):] not in in_table)
            def history(key: str) -> List[Tuple[int, float]]:
                return self._cached(("metric", full, key), full,
                                    lambda: self.reader.metric_history(full, key))

            series = {n: history(prefix + n) for n in names}
            return {"run_id": full, "metrics": {n: [[e, v] for e, v in h if _number(v) is not None]
                                                for n, h in series.items()}}

        # Who may read what is checked here, in the request's thread; the reads in the pool.
        found: List[Any] = []
        for rid in ids:
            try:
                found.append(self._readable_run(rid))
            except HTTPError as exc:
                found.append(str(exc))
        read = iter(self._pool.map(one, [f for f in found if not isinstance(f, str)]))
        out = [{"requested": rid, "error": f} if isinstance(f, str) else dict(next(read), requested=rid)
               for rid, f in zip(ids, found)]
        return _json({"runs": out}, cache="no-cache")

    def image(self, q: Dict[str, str]):
        rid = self._readable_run(q.get("run", "")).info.run_id
        mode, ds_id = _mode_ds(q)
        epoch, index = _int(q, "epoch"), _int(q, "index")
        kind = q.get("kind", "preview")
        row = self._row(rid, mode, ds_id, epoch, index)
        if kind == "card":
            data = self.reader.card(rid, mode, ds_id, row)
            if data is None:
                raise HTTPError(404, _not_there(rid, row))
            return 200, [("Content-Type", "image/png"), ("Cache-Control", _IMMUTABLE),
                         ("ETag", _etag(data))], data
        if kind != "preview":
            raise HTTPError(400, f"kind must be 'preview' or 'card', got {kind!r}")
        data = self._preview(rid, mode, ds_id, row)
        if data is None:
            raise HTTPError(404, _not_there(rid, row))
        return 200, [("Content-Type", "image/webp"), ("Cache-Control", _IMMUTABLE),
                     ("ETag", _etag(data))], data

    def _preview(self, rid: str, mode: str, ds_id: Optional[str], row: dict, *,
                 from_card: bool = False) -> Optional[bytes]:
        """A row's WebP preview, kept in memory (a logged point never changes). A request
        for a preview that a prefetch is already fetching waits for that one. ``from_card``:
        made from the row's card when the run's image listing is not read yet."""
        epoch, index = int(row["epoch"]), int(row.get("sample_index", -1))
        key = (rid, mode, ds_id, epoch, index)
        data = self._images.get(key)
        if data is not None:
            return data

        def make() -> Optional[bytes]:
            data = None
            card_path = row.get(_layout.TABLE_IMAGE_COLUMN)
            if from_card and card_path and self._peek(("previews", rid, mode, ds_id)) is None:
                card = self.reader.read_or_none(rid, str(card_path))
                data = None if card is None else _preview_of(card)
            if data is None:
                path = self._previews(rid, mode, ds_id).get((epoch, index))
                data = self.reader.read_or_none(rid, path) if path else None
            if data is None:  # no preview logged (streamed, or an older version): make one
                card = self.reader.card(rid, mode, ds_id, row)
                data = None if card is None else _preview_of(card)
            if data is not None:
                self._images.put(key, data)
            return data

        return self._single_flight(key, make)

    def _single_flight(self, key: Tuple[Any, ...], make: Callable[[], Any]) -> Any:
        """``make()``, run once however many threads ask for ``key`` at the same time: the
        others wait for its result (or its exception) instead of asking MLflow again."""
        with self._lock:
            found = self._inflight.get(key)
            fut = found if found is not None else Future()
            if found is None:
                self._inflight[key] = fut
        if found is not None:
            return fut.result(timeout=300)
        try:
            value = make()
            fut.set_result(value)
            return value
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _prefetch(self, rid: str, mode: str, ds_id: Optional[str], epoch: int, index: int, *,
                  from_card: bool = False) -> None:
        key = (rid, mode, ds_id, epoch, index)
        with self._lock:
            if key in self._inflight:
                return
        if self._images.get(key) is not None:
            return

        def run() -> None:
            try:
                self._preview(rid, mode, ds_id, self._row(rid, mode, ds_id, epoch, index),
                              from_card=from_card)
            except Exception:  # a prefetch is only a guess
                pass
        self._background.submit(run)

    def export(self, q: Dict[str, str]):
        from ..compare import compare

        ids = _ids(q.get("runs", ""))
        if not ids:
            raise HTTPError(400, "export needs runs=RUN_ID,...")
        mode, ds_id = _mode_ds(q)
        fmt = q.get("format", "html")
        if fmt not in ("png", "html"):
            raise HTTPError(400, f"format must be 'png' or 'html', got {fmt!r}")
        component = _int(q, "component", 1)
        resolved = [self._readable_run(r).info.run_id for r in ids]
        if len(resolved) == 1:
            specs = [f"{resolved[0]}@all"]
        else:
            epoch = _int(q, "epoch")
            specs = [f"{r}@{epoch}" for r in resolved
                     if epoch in self._table(r, mode, ds_id).epochs]
            if not specs:
                raise HTTPError(404, f"no selected run logged epoch {epoch}")
        samples = None  # no filter: every matched sample
        if "samples" in q:  # the page's filtered rows, in its order
            samples = [s for s in q["samples"].split(",") if _SAMPLE_ID.match(s)]
            if not samples:
                raise HTTPError(400, "no sample is shown: nothing to export")
        with tempfile.TemporaryDirectory(prefix="mlflow-eigencam-export-") as tmp:
            out = Path(tmp) / f"eigencam-{mode}-{ds_id or 'all'}.{fmt}"
            try:
                compare(specs, mode=mode, ds_id=ds_id, component=component, out=out,
                        reader=self.reader, sample_ids=samples)
            except (LookupError, ValueError) as exc:
                raise HTTPError(400, str(exc)) from exc
            body = out.read_bytes()
        ctype = "image/png" if fmt == "png" else "text/html; charset=utf-8"
        return 200, [("Content-Type", ctype), ("Cache-Control", "no-store"),
                     ("Content-Disposition", f'attachment; filename="{out.name}"')], body

    # -- reading, cached -------------------------------------------------------------------
    def _resolve_or_error(self, rid: str):
        try:
            return self._run(rid)
        except HTTPError as exc:
            return str(exc)

    def _run(self, rid: str, *, fresh: bool = False):
        """The Run of an id the page asked about (prefixes resolved), cached by id."""
        try:
            _layout.parse_run_ref(rid or "")
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        with self._lock:
            run = self._known.get(rid)
        if run is not None and not fresh:
            return run
        try:
            run = self.reader.run(rid)
        except LookupError as exc:
            raise HTTPError(404, str(exc)) from exc
        with self._lock:
            self._known[rid] = self._known[run.info.run_id] = run
        return run

    def _live(self, rid: str) -> bool:
        with self._lock:
            run = self._known.get(rid)
        return run is None or run.info.status in ("RUNNING", "SCHEDULED")

    def _cached(self, key: Tuple[Any, ...], rid: Optional[str], make: Callable[[], Any]) -> Any:
        """What ``make`` returns, kept for good when it was read from a finished run (or
        ``rid`` is None), for ``_LIVE_TTL_S`` when the run was still logging (its last read
        after it finished is kept). Callers that want a value being made wait for it
        instead of asking MLflow again."""
        now = time.monotonic()
        hit = self._hit(key, now)
        if hit is not None:
            return hit[1]

        def make_and_keep() -> Any:
            live = rid is not None and self._live(rid)
            value = make()
            with self._lock:
                self._cache[key] = (now, value, live)
            return value

        return self._single_flight(key, make_and_keep)

    def _hit(self, key: Tuple[Any, ...], now: float) -> Optional[Tuple[float, Any, bool]]:
        """The cache's ``(time, value, live)`` for ``key`` while it holds: for good when read
        from a finished run, for ``_LIVE_TTL_S`` when the run was still logging."""
        with self._lock:
            hit = self._cache.get(key)
        return hit if hit is not None and (not hit[2] or now - hit[0] < _LIVE_TTL_S) else None

    def _peek(self, key: Tuple[Any, ...]) -> Any:
        """What :meth:`_cached` holds for ``key`` now (None: nothing, or out of date)."""
        hit = self._hit(key, time.monotonic())
        return None if hit is None else hit[1]

    def _available(self, run) -> List[Tuple[str, str]]:
        rid = run.info.run_id
        # The table tag is enough for the page (a listing is several requests per run).
        return self._cached(("available", rid), rid,
                            lambda: self.reader.available(run, list_artifacts=False))

    def _table(self, rid: str, mode: str, ds_id: Optional[str]):
        return self._cached(("table", rid, mode, ds_id), rid,
                            lambda: self.reader.table(rid, mode, ds_id))

    def _previews(self, rid: str, mode: str, ds_id: Optional[str]) -> Dict[Tuple[int, int], str]:
        return self._cached(("previews", rid, mode, ds_id), rid,
                            lambda: self.reader.previews(rid, mode, ds_id))

    def _row(self, rid: str, mode: str, ds_id: Optional[str], epoch: int, index: int) -> dict:
        try:
            table = self._table(rid, mode, ds_id)
        except LookupError as exc:
            raise HTTPError(404, str(exc)) from exc
        for row in table.rows:
            if int(row["epoch"]) == epoch and int(row.get("sample_index", -1)) == index:
                return row
        raise HTTPError(404, f"run {rid} logged no sample {index} at epoch {epoch} for "
                             f"mode={mode!r}, ds_id={ds_id!r}")

    def _experiment(self, eid: str) -> str:
        # The reader keeps the names; this only makes concurrent first asks one request.
        return self._single_flight(("experiment", eid), lambda: self.reader.experiment_name(eid))

    def _about(self, run) -> Dict[str, Any]:
        """The run's summary and what it has, for the page's chips, headers and selects (its
        experiment's name read here, in the run's own thread, once per experiment)."""
        self._experiment(str(run.info.experiment_id))
        summary = _summary_json(self.reader.summary(run))
        summary["params"] = dict(run.data.params)  # what the page can group runs by
        return {"summary": summary,
                "available": [{"mode": m, "ds_id": d} for m, d in self._available(run)]}

    def _run_data(self, rid: str, mode: str, ds_id: Optional[str]) -> Dict[str, Any]:
        try:
            run = self._run(rid, fresh=self._live(rid))
        except HTTPError as exc:
            return {"requested": rid, "error": str(exc)}
        full = run.info.run_id
        base = {"requested": rid, "run_id": full, "status": run.info.status}
        try:
            table = self._table(full, mode, ds_id)
        except LookupError:
            have = ", ".join(f"{m}/{d}" for m, d in self._available(run)) or "nothing"
            return dict(base, error=f"run {full} has no EigenCAM data for mode={mode!r}, "
                                    f"ds_id={ds_id!r}; it has: {have}", **self._about(run))
        except Exception as exc:  # a malformed table: this run's error, the others' data
            return dict(base, error=_unreadable(full, mode, ds_id, exc), **self._about(run))
        try:
            # A finished run's rows as the page reads them, made once (a warm first look
            # answered 10 runs' 4800 rows in 130 ms, most of it here).
            shown = _rows_json(table) if self._live(full) else self._cached(
                ("rows", full, mode, ds_id), full, lambda: _rows_json(table))
        except Exception as exc:  # a row that is not the logger's
            return dict(base, error=_unreadable(full, mode, ds_id, exc), **self._about(run))
        return dict(base, **shown, **self._about(run))


def _unreadable(run_id: str, mode: str, ds_id: Optional[str], exc: Exception) -> str:
    """One line for a run whose table cannot be read (the reader's own message names the
    run and the file)."""
    if isinstance(exc, ValueError) and run_id in str(exc):
        return str(exc)
    return (f"run {run_id}: its table for mode={mode!r}, ds_id={ds_id!r} cannot be read "
            f"({type(exc).__name__}: {exc})")


def _rows_json(table) -> Dict[str, Any]:
    """A table as the page reads it: epochs, components, the distinct card geometries and
    one entry per row.

    Raises:
        ValueError, TypeError, KeyError: A row that is not the logger's (a malformed table).
    """
    rows: List[Dict[str, Any]] = []
    # The panel boxes recorded with each row, as fractions of the card; the distinct
    # ones once (a run's cards share one unless its images differ in size), rows by index.
    geometries: List[Dict[str, Any]] = []
    seen: Dict[str, int] = {}
    signals = signal_columns(table)
    for row in table.rows:
        evr = [row.get(f"evr_{c}") for c in range(1, table.n_evr + 1)]
        k = sum(1 for v in evr if v is not None)
        epoch, index = int(row["epoch"]), int(row.get("sample_index", -1))
        rows.append({"epoch": epoch, "index": index, "sample_id": str(row["sample_id"]),
                     "label": cell_text(row.get("label")),
                     "prediction": cell_text(row.get("prediction")),
                     "correct": cell_bool(row.get("correct")), "evr": evr, "k": k,
                     "map_change": row.get(_layout.TABLE_MAP_CHANGE_COLUMN),
                     "rendered": bool(row.get(_layout.TABLE_IMAGE_COLUMN)),
                     "g": _geometry_index(row, geometries, seen),
                     "s": [_number(row.get(name)) for name in signals]})
    return {"epochs": table.epochs, "n_evr": table.n_evr, "geometries": geometries,
            "signals": signals, "rows": rows}


# Table columns that are not a per-sample signal: the fixed ones, the card, the boxes' counts
# and the image; ``evr_*`` too (the page has them as ``evr``).
_NOT_SIGNALS = frozenset(_layout.TABLE_COLUMNS + _layout.TABLE_BOX_COLUMNS
                         + (_layout.TABLE_IMAGE_COLUMN, _layout.TABLE_CARD_COLUMN))
_EVR = re.compile(r"^evr_\d+$")


def signal_columns(table) -> List[str]:
    """The table's per-sample signal columns, in the logged order: ``map_change``, the
    signals of :data:`~mlflow_eigencam._layout.TABLE_SIGNAL_COLUMNS` and any numeric column a
    newer logger adds (found from the table, not from a list, so that a new one shows up)."""
    out = []
    for name in table.columns:
        if name in _NOT_SIGNALS or _EVR.match(name):
            continue
        values = [row.get(name) for row in table.rows]
        if all(v is None or _number(v) is not None for v in values) and \
                any(v is not None for v in values):
            out.append(name)
    return out


def _number(v: Any) -> Optional[float]:
    """A finite number of a table cell, else None (empty, NaN, text)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if f == f and abs(f) != float("inf") else None


# ------------------------------------------------------------------------------- helpers


class _LRU:
    """Bytes by key, least recently used dropped past ``max_bytes`` (thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        from collections import OrderedDict

        self._data: "OrderedDict[Any, bytes]" = OrderedDict()
        self._size = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    def get(self, key: Any) -> Optional[bytes]:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            self._size += len(value) - (len(old) if old is not None else 0)
            self._data[key] = value
            while self._size > self._max and self._data:
                _, dropped = self._data.popitem(last=False)
                self._size -= len(dropped)

_STATUS = {200: "200 OK", 204: "204 No Content", 304: "304 Not Modified", 400: "400 Bad Request", 404: "404 Not Found",
           405: "405 Method Not Allowed", 502: "502 Bad Gateway"}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str).encode("utf-8")


def _json_headers() -> List[Tuple[str, str]]:
    return [("Content-Type", "application/json; charset=utf-8")]


def _json(obj: Any, cache: str = "no-store"):
    return 200, _json_headers() + [("Cache-Control", cache)], _dumps(obj)


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha1(body).hexdigest()[:20] + '"'


def _ids(text: str) -> List[str]:
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if len(ids) > MAX_RUNS:
        raise HTTPError(400, f"at most {MAX_RUNS} runs at once, got {len(ids)}")
    return list(dict.fromkeys(ids))


def _int(q: Dict[str, str], name: str, default: Optional[int] = None) -> int:
    raw = q.get(name)
    if raw is None or raw == "":
        if default is None:
            raise HTTPError(400, f"missing parameter {name}")
        return default
    try:
        return int(raw)
    except ValueError:
        raise HTTPError(400, f"{name} must be an integer, got {raw!r}") from None


def _mode_ds(q: Dict[str, str]) -> Tuple[str, Optional[str]]:
    mode = q.get("mode") or "eval"
    ds = q.get("ds_id")
    # "all" is how samples logged without a ds_id are stored (layout segment).
    return mode, (None if ds in (None, "", _layout.ALL_DS) else ds)


def _geometry_index(row: dict, geometries: List[Dict[str, Any]], seen: Dict[str, int]
                    ) -> Optional[int]:
    """Index in ``geometries`` of the row's recorded card geometry ``{w, h, k, boxes}``
    (boxes as fractions of the card, input first), added when new; None without one."""
    found = card_boxes(row)
    if found is None:
        return None
    (h, w), boxes = found
    key = json.dumps([h, w, boxes])
    if key not in seen:
        seen[key] = len(geometries)
        geometries.append({"w": w, "h": h, "k": len(boxes) - 1,
                           "boxes": [[x / w, y / h, bw / w, bh / h] for x, y, bw, bh in boxes]})
    return seen[key]


def _summary_json(s) -> Dict[str, Any]:
    return {"run_id": s.run_id, "run_name": s.run_name, "experiment_id": s.experiment_id,
            "experiment": s.experiment, "status": s.status, "start_time": s.start_time,
            "tags": s.tags}


def _choose(pairs: List[Tuple[str, str]], mode: Optional[str], ds_id: Optional[str]) -> Tuple[str, str]:
    """The (mode, ds_id) to show of ``pairs`` (what the runs have): the asked ones where
    the runs have them, else ``eval`` first and its first dataset id."""
    if not mode or not any(m == mode for m, _ in pairs):
        mode = next((m for m, _ in pairs if m == "eval"), pairs[0][0] if pairs else mode or "eval")
    if not ds_id or (mode, ds_id) not in pairs:
        ds_id = next((d for m, d in pairs if m == mode), ds_id or _layout.ALL_DS)
    return mode, ds_id


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` for a read ahead: its failure is the later request's to report."""
    try:
        fn(*args)
    except Exception:
        pass


def _not_there(rid: str, row: dict) -> str:
    what = "was not rendered" if not row.get(_layout.TABLE_IMAGE_COLUMN) else "is missing"
    return (f"the card of sample {row.get('sample_index')} at epoch {row.get('epoch')} of run "
            f"{rid} {what}")


# A 1 x 1 PNG: warms up _preview_of.
_TINY_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
                          "0000000c4944415478da63f8ffff3f0005fe02fe0dbfa6b40000000049454e44ae426082")


def _preview_of(png: bytes) -> bytes:
    from PIL import Image
    import numpy as np

    from ..render import encode_webp_preview

    with Image.open(io.BytesIO(png)) as im:
        return encode_webp_preview(np.asarray(im.convert("RGB")))
