"""Read back what :class:`~mlflow_eigencam.logger.EigenCAMLogger` wrote, through MLflow only.

The one reader of the layout in :mod:`mlflow_eigencam._layout`: ``compare`` and the explorer
both use it, so neither holds a second copy of the paths. Every read names a run id and an
artifact path that this module built from the layout (or that MLflow listed for that run);
nothing read from a URL or a table reaches the filesystem directly.

What it reads, per run and (mode, ds_id):

* the table: the parts ``eigencam/{mode}/{ds}/table/epoch_{e:04d}-{ms}-{writer}.json``
  (one per bundle, every writer's) plus ``eigencam/{mode}/{ds}/samples.json`` (same MLflow
  "split" format), joined and deduplicated by ``(epoch, sample_index)`` (:mod:`._table`);
* the WebP previews MLflow's UI shows (``images/...+compressed.webp``), by (epoch, index);
* the card PNG a row points to; a row whose ``image`` is ``""`` was not rendered while
  training, and is rendered on demand by ``mlflow_eigencam._streaming.render_stored`` when
  that module exists;
* the card's panel boxes the logger recorded with each row (``card``: :func:`card_boxes`).
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote, urlparse

from . import _layout, _table

__all__ = ["Reader", "RunSummary", "Table", "card_boxes", "cell_bool", "cell_text",
           "check_tracking_uri"]

# images/{key with / -> ~}+step+{step}+timestamp+{ms}+{uid}+compressed.webp (and .png)
_SERIES = re.compile(r"^(?P<key>.+?)\+step\+(?P<step>\d+)\+timestamp\+(?P<ts>\d+)\+"
                     r"(?P<uid>[0-9A-Za-z-]+?)(?P<webp>\+compressed\.webp|\.png)$")
_SAMPLE_KEY = re.compile(r"^(?P<prefix>.+)/sample_(?P<index>\d+)$")
# Requests one reader keeps in flight at once against an http(s):// server.
_REMOTE_READS = 8


def check_tracking_uri(uri: str) -> str:
    """Fail with one clear line for a tracking URI that a reader must not open.

    A reader never creates a store: a sqlite database or a store folder that does not exist
    is an error here, where MLflow would create it (``./mlflow.db`` by default in MLflow 3).

    Args:
        uri: A tracking URI or a path.

    Returns:
        The URI to give MLflow.

    Raises:
        FileNotFoundError: The sqlite file, its folder, or the store folder does not exist.
        ValueError: A file that is not a store was given as a path.
    """
    text = str(uri)
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if text in ("databricks", "databricks-uc", "uc"):  # profiles, not paths
        return text
    if scheme in ("http", "https", "databricks", "databricks-uc", "uc") or (
            scheme and scheme not in ("sqlite", "file") and len(scheme) > 1):
        return text
    if scheme == "sqlite":
        # sqlite:///relative.db, sqlite:////abs.db; in-memory databases are fine.
        raw = text.split(":///", 1)[1] if ":///" in text else ""
        if raw in ("", ":memory:"):
            return text
        db = Path(unquote(raw.split("?", 1)[0]))
        if not db.parent.is_dir():
            raise FileNotFoundError(f"tracking URI {text}: folder {db.parent} does not exist "
                                    f"(no sqlite database there; nothing was created)")
        if not db.is_file():
            raise FileNotFoundError(f"tracking URI {text}: no sqlite database at {db} "
                                    f"(a reader does not create one); pass --tracking-uri or set "
                                    f"MLFLOW_TRACKING_URI")
        return text
    path = Path(unquote(parsed.path) if scheme == "file" else text)
    if path.is_file():
        hint = (f"; for an MLflow sqlite database pass --tracking-uri sqlite:///{path.resolve()}"
                if path.suffix.lower() in (".db", ".sqlite", ".sqlite3") else "")
        raise ValueError(f"tracking URI {text!r} is a file, not a tracking store{hint}")
    if not path.is_dir():
        raise FileNotFoundError(f"tracking URI {text!r}: no MLflow store at {path} "
                                f"(the folder does not exist; nothing was created)")
    return text


def cell_bool(v: Any) -> Optional[bool]:
    """A table cell read as a bool (``correct``): None stays None; MLflow's table may give
    back "True" / "false" / "1" as text."""
    if v is None:
        return None
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def cell_text(v: Any) -> Optional[str]:
    """A table cell read as one line of text (label, prediction): None stays None."""
    return None if v is None else " ".join(str(v).split())


Box = Tuple[int, int, int, int]  # x, y, width, height


def card_boxes(row: dict) -> Optional[Tuple[List[int], List[Box]]]:
    """``([H, W], [(x, y, w, h), ...])``: the card's size and its panel boxes (input first),
    as the logger recorded them with the row (``card``); None when the row has none or they
    do not fit in the card."""
    geo = row.get(_layout.TABLE_CARD_COLUMN)
    if isinstance(geo, str):  # a table read back through pandas may hold it as text
        try:
            geo = json.loads(geo)
        except ValueError:
            return None
    if not isinstance(geo, dict):
        return None
    try:
        height, width = (int(v) for v in geo["size"])
        boxes = [(int(x), int(y), int(w), int(h)) for x, y, w, h in geo["boxes"]]
    except (TypeError, KeyError, ValueError):
        return None
    if not boxes or any(x < 0 or y < 0 or w < 1 or h < 1 or x + w > width or y + h > height
                        for x, y, w, h in boxes):
        return None
    return [height, width], boxes


@dataclass(frozen=True)
class RunSummary:
    """What a run list shows about a run.

    Attributes:
        run_id: The MLflow run id.
        run_name: The run's name ("" when it has none).
        experiment_id: Its experiment's id.
        experiment: Its experiment's name.
        status: ``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED`` or ``SCHEDULED``.
        start_time: Milliseconds since the epoch (0 when unknown).
        eigencam: Whether the logger wrote to it (its version tag is set).
        tags: The run's tags, MLflow's own ``mlflow.*`` tags left out.
    """

    run_id: str
    run_name: str
    experiment_id: str
    experiment: str
    status: str
    start_time: int
    eigencam: bool
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class Table:
    """One run's table for one (mode, ds_id).

    Attributes:
        columns: Column names, in the logged order (parts may add columns at the end).
        rows: ``{column: value}`` per row, ordered by (epoch, sample_index).
        n_evr: Components with an ``evr_*`` column.
    """

    columns: List[str]
    rows: List[dict]
    n_evr: int

    @property
    def epochs(self) -> List[int]:
        """Logged epochs, ascending."""
        return sorted({int(r["epoch"]) for r in self.rows})


class Reader:
    """Everything the package asks MLflow when it reads back, through one client.

    Args:
        tracking_uri: Where the runs live; default ``mlflow.get_tracking_uri()``. Checked by
            :func:`check_tracking_uri` first (a reader never creates a store).
        client: A client made elsewhere (inside ``mlflow server``: one over the server's own
            store); ``tracking_uri`` is then only the name messages give the store.
    """

    def __init__(self, tracking_uri: Optional[str] = None, *, client: Any = None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        from mlflow.exceptions import MlflowException

        if client is not None:
            self.uri, self.client = str(tracking_uri), client
        else:
            self.uri = check_tracking_uri(str(tracking_uri or mlflow.get_tracking_uri()))
            try:
                self.client = MlflowClient(tracking_uri=self.uri)
                getattr(getattr(self.client, "_tracking_client", None), "store", None)  # opens it
            except MlflowException as exc:  # e.g. MLflow 3 refusing a folder store: one line
                first = str(exc.message if hasattr(exc, "message") else exc).split(". ")[0]
                raise ValueError(f"tracking URI {self.uri}: {first}") from exc
        self._experiments: Dict[str, str] = {}
        self._repos: Dict[str, Any] = {}
        self._artifact_uris: Dict[str, str] = {}
        self._lock = threading.Lock()
        self._io: Any = None  # a thread pool for remote reads, made when first needed

    @property
    def remote(self) -> bool:
        """True for an ``http(s)://`` server (one request per file: read a few at a time)."""
        return self.uri.startswith(("http://", "https://"))

    # -- runs and experiments --------------------------------------------------------------
    def run(self, run_id: str):
        """The MLflow ``Run`` of a full run id or of a unique prefix (4+ hex digits).

        Raises:
            LookupError: No such run, or a prefix that several runs share (they are named).
        """
        from mlflow.exceptions import MlflowException

        try:
            text, is_prefix = _layout.parse_run_ref(run_id)
        except ValueError as exc:
            raise LookupError(f"{exc} at tracking URI {self.uri}") from None
        try:
            if is_prefix:
                run = self._by_prefix(text)
            else:
                run = self.client.get_run(text)
            with self._lock:  # _repo needs it: no second get_run
                self._artifact_uris[run.info.run_id] = run.info.artifact_uri
            return run
        except MlflowException as exc:
            code = getattr(exc, "error_code", "")
            if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND",
                        "BAD_REQUEST"):
                raise LookupError(f"no run with id {text!r} at tracking URI {self.uri}") from exc
            raise

    def _by_prefix(self, prefix: str):
        from mlflow.entities import ViewType
        from mlflow.exceptions import MlflowException

        ids = [e.experiment_id for e in self._all_experiments()]
        found: List[Any] = []
        if ids:
            try:
                found = list(self.client.search_runs(
                    ids, filter_string=f"attributes.run_id LIKE '{prefix}%'",
                    run_view_type=ViewType.ALL, max_results=5))
            except MlflowException:  # a store without LIKE on run ids: scan
                found = [r for r in self._scan(ids) if r.info.run_id.startswith(prefix)][:5]
        if not found:
            raise LookupError(f"no run with id {prefix!r} (or starting with it) at tracking URI "
                              f"{self.uri}")
        if len(found) > 1:
            names = ", ".join(r.info.run_id for r in found)
            raise LookupError(f"run id prefix {prefix!r} matches several runs ({names}); "
                              f"give more characters")
        return found[0]

    def _scan(self, ids: List[str]):
        from mlflow.entities import ViewType

        token = None
        while True:
            page = self.client.search_runs(ids, run_view_type=ViewType.ALL, max_results=1000,
                                           page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def _all_experiments(self) -> List[Any]:
        out, token = [], None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def experiment_name(self, experiment_id: str) -> str:
        """The experiment's name (its id when it cannot be read: a name is only decoration)."""
        from mlflow.exceptions import MlflowException

        with self._lock:
            if experiment_id in self._experiments:
                return self._experiments[experiment_id]
        try:
            name = self.client.get_experiment(experiment_id).name
        except (MlflowException, OSError):
            return str(experiment_id)
        with self._lock:
            self._experiments[experiment_id] = name
        return name

    def summary(self, run) -> RunSummary:
        """A :class:`RunSummary` of an MLflow ``Run``."""
        tags = dict(run.data.tags)
        name = tags.get("mlflow.runName") or getattr(run.info, "run_name", None) or ""
        return RunSummary(run.info.run_id, str(name), str(run.info.experiment_id),
                          self.experiment_name(run.info.experiment_id), str(run.info.status),
                          int(run.info.start_time or 0), _layout.TAG_VERSION in tags,
                          {k: v for k, v in tags.items() if not k.startswith("mlflow.")})

    def search(self, query: str = "", *, max_results: int = 200,
               eigencam_only: bool = True) -> List[RunSummary]:
        """Runs of every experiment whose experiment name, run name, run id or a tag
        (``key`` or ``key=value``) contains ``query`` (case-insensitive), newest first."""
        from mlflow.entities import ViewType

        experiments = self._all_experiments()
        with self._lock:
            self._experiments.update({e.experiment_id: e.name for e in experiments})
        ids = [e.experiment_id for e in experiments]
        if not ids:
            return []
        q = str(query or "").strip().lower()
        out: List[RunSummary] = []
        token = None
        while len(out) < max_results:
            page = self.client.search_runs(ids, run_view_type=ViewType.ACTIVE_ONLY,
                                           order_by=["attributes.start_time DESC"],
                                           max_results=500, page_token=token)
            for run in page:
                s = self.summary(run)
                if eigencam_only and not s.eigencam:
                    continue
                hay = [s.experiment, s.run_name, s.run_id] + [f"{k}={v}" for k, v in s.tags.items()]
                if not q or any(q in h.lower() for h in hay):
                    out.append(s)
                    if len(out) >= max_results:
                        break
            token = page.token
            if not token:
                break
        return out

    def latest_run_with_data(self, name: str, mode: str, ds_id: Optional[str]):
        """The latest active run of experiment ``name`` with a table for (mode, ds_id).

        Raises:
            LookupError: No such experiment (the message lists some), or none of its runs has
                that table.
        """
        from mlflow.entities import ViewType

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            names = sorted(e.name for e in self.client.search_experiments(max_results=50))
            raise LookupError(f"no experiment named {name!r} at tracking URI {self.uri}; "
                              f"experiments: {', '.join(repr(n) for n in names) or 'none'}")
        searched, token = 0, None
        while True:
            page = self.client.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                                           order_by=["attributes.start_time DESC"],
                                           max_results=200, page_token=token)
            for run in page:
                searched += 1
                tags = run.data.tags
                # Runs the logger never touched have neither tag: skip without listing artifacts.
                if (_layout.TAG_VERSION in tags or _layout.MLFLOW_LOGGED_ARTIFACTS in tags) \
                        and self.has_table(run, mode, ds_id):
                    return run
            token = page.token
            if not token:
                break
        raise LookupError(f"experiment {name!r} has no run with EigenCAM data for mode={mode!r}, "
                          f"ds_id={ds_id!r} ({_layout.table_path(mode, ds_id)}); "
                          f"{searched} run(s) searched")

    # -- artifacts -------------------------------------------------------------------------
    def listing(self, run_id: str, path: Optional[str]) -> List[Any]:
        """``FileInfo``s under ``path`` of the run ([] when the folder does not exist)."""
        try:
            # Through the run's repository: MlflowClient.list_artifacts asks for the run (and
            # searches its logged models) before every listing.
            return list(self._repo(run_id).list_artifacts(path))
        except OSError:  # a local store raises when the folder does not exist
            return []

    def read(self, run_id: str, path: str) -> bytes:
        """The bytes of one artifact of one run, downloaded through MLflow.

        Raises:
            OSError, MlflowException: It is not there.
        """
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"not an artifact path: {path!r}")
        with tempfile.TemporaryDirectory(prefix="mlflow-eigencam-read-") as tmp:
            repo = self._repo(run_id)
            download = getattr(repo, "_download_file", None)
            if download is None:  # an artifact store plugin without it: the public way
                return Path(self.client.download_artifacts(run_id, path, tmp)).read_bytes()
            # One request per file: MlflowClient.download_artifacts asks for the run and
            # lists the path (is it a folder?) before each download, three round trips per
            # preview image on a remote server.
            local = Path(tmp) / "file"
            download(remote_file_path=path, local_path=str(local))
            return local.read_bytes()

    def _repo(self, run_id: str):
        """The run's artifact repository, made once per run (its URI needs a get_run)."""
        with self._lock:
            repo = self._repos.get(run_id)
        if repo is None:
            with self._lock:
                uri = self._artifact_uris.get(run_id)
            repo = self._open_repo(uri or self.client.get_run(run_id).info.artifact_uri)
            with self._lock:
                self._repos[run_id] = repo
        return repo

    def _open_repo(self, artifact_uri: str):
        """The artifact repository of a run's artifact root (resolved against this reader's
        tracking URI; the explorer inside ``mlflow server`` resolves it as the server does)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            return get_artifact_repository(artifact_uri, tracking_uri=self.uri)
        except TypeError:  # MLflow < 3.2 resolves mlflow-artifacts: by the global URI
            return _legacy_artifact_repository(get_artifact_repository, artifact_uri, self.uri)

    def _map(self, fn: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        """``[fn(x) for x in items]``, a few at a time against a remote server (in order)."""
        if not self.remote or len(items) < 2:
            return [fn(x) for x in items]
        with self._lock:
            if self._io is None:
                from concurrent.futures import ThreadPoolExecutor

                self._io = ThreadPoolExecutor(max_workers=_REMOTE_READS,
                                              thread_name_prefix="eigencam-read")
        return list(self._io.map(fn, items))

    def _both(self, a: Callable[[], Any], b: Callable[[], Any]) -> Tuple[Any, Any]:
        """``(a(), b())``, at once against a remote server."""
        first, second = self._map(lambda f: f(), [a, b])
        return first, second

    def read_or_none(self, run_id: str, path: str) -> Optional[bytes]:
        """:meth:`read`, or None when the artifact is missing."""
        try:
            return self.read(run_id, path)
        except OSError:
            return None
        except Exception as exc:  # MlflowException for an artifact that never arrived
            if type(exc).__name__ == "MlflowException":
                return None
            raise

    def has_table(self, run, mode: str, ds_id: Optional[str]) -> bool:
        """Whether the run has a table for (mode, ds_id) (its tag, else its artifacts)."""
        path = _layout.table_path(mode, ds_id)
        logged = run.data.tags.get(_layout.MLFLOW_LOGGED_ARTIFACTS)
        if logged:
            try:
                if any(e.get("path") == path for e in json.loads(logged)):
                    return True
            except (ValueError, AttributeError):
                pass
        folder = path.rsplit("/", 1)[0]
        return any(f.path == path or f.path == f"{folder}/table"
                   for f in self.listing(run.info.run_id, folder))

    def available(self, run, *, list_artifacts: bool = True) -> List[Tuple[str, str]]:
        """``(mode, ds segment)`` pairs that have a table, from the table tag and the artifacts.
        The ds segment is ``"all"`` for samples logged without a ds_id.

        Args:
            run: An MLflow ``Run``.
            list_artifacts: Also list the artifacts (a few requests) when the tag named
                some; when it named none they are always listed.
        """
        found = set()
        pattern = re.compile(rf"^{_layout.ROOT}/([^/]+)/([^/]+)/samples\.json$")
        try:
            for e in json.loads(run.data.tags.get(_layout.MLFLOW_LOGGED_ARTIFACTS, "[]")):
                m = pattern.match(str(e.get("path", "")))
                if m:
                    found.add((m.group(1), m.group(2)))
        except (ValueError, AttributeError):
            pass
        if found and not list_artifacts:
            return sorted(found)
        rid = run.info.run_id
        for mode_dir in self.listing(rid, _layout.ROOT):
            if not mode_dir.is_dir:
                continue
            for ds_dir in self.listing(rid, mode_dir.path):
                if ds_dir.is_dir and any(f.path.endswith(("/samples.json", "/table"))
                                         for f in self.listing(rid, ds_dir.path)):
                    found.add(tuple(ds_dir.path.split("/")[1:3]))
        return sorted(found)

    def table(self, run_id: str, mode: str, ds_id: Optional[str]) -> Table:
        """The run's table for (mode, ds_id): its parts (``_table.part_paths``, every
        writer's rows) merged with ``samples.json`` by ``_table.read``'s one rule.

        Raises:
            LookupError: Neither exists.
            ValueError: A file that is not an EigenCAM table.
        """
        main = _layout.table_path(mode, ds_id)
        # samples.json and the parts' listing at once, then the parts a few at a time: on a
        # remote server each is a round trip, and one after the other they add up.
        first, listed = self._both(lambda: self.read_or_none(run_id, main),
                                   lambda: self.listing(run_id, _layout.table_parts_dir(mode, ds_id)))
        paths = _table.part_paths(lambda _folder: listed, mode, ds_id)
        # The parts whose rows samples.json holds as they are are not downloaded (one round
        # trip each; _table.held_by_view says which, and why that gives the same table).
        held = {p.rsplit("/", 1)[-1] for p in _table.held_by_view(listed, first)}
        paths = [p for p in paths if p.rsplit("/", 1)[-1] not in held]
        # The parts first, in their order (the rows' home, see _table), then samples.json:
        # a view that the last writer rewrote, read only for rows no part has.
        sources: List[Tuple[str, bytes]] = []
        for path, data in zip(paths, self._map(lambda path: self.read_or_none(run_id, path), paths)):
            if data is not None:
                sources.append((path, data))
        if first is not None:
            sources.append((main, first))
        if not sources:
            raise LookupError(f"run {run_id} has no table {main}")
        try:
            columns, rows = _table.read(sources)
        except ValueError as exc:
            raise ValueError(f"run {run_id}: {exc}") from exc
        n_evr = sum(1 for c in columns if re.fullmatch(r"evr_\d+", c))
        return Table(columns, rows, n_evr)

    def previews(self, run_id: str, mode: str, ds_id: Optional[str]) -> Dict[Tuple[int, int], str]:
        """``{(epoch, sample_index): path}`` of the WebP previews of (mode, ds_id), the
        newest when a point was logged twice."""
        want = _layout.prefix(mode, ds_id)
        best: Dict[Tuple[int, int], Tuple[int, str]] = {}
        for f in self.listing(run_id, "images"):
            m = _SERIES.match(f.path.rsplit("/", 1)[-1])
            if not m or not m.group("webp").endswith(".webp"):
                continue
            k = _SAMPLE_KEY.match(m.group("key").replace("~", "/"))
            if not k or k.group("prefix") != want:
                continue
            point = (int(m.group("step")), int(k.group("index")))
            ts = int(m.group("ts"))
            if point not in best or ts > best[point][0]:
                best[point] = (ts, f.path)
        return {p: v[1] for p, v in best.items()}

    def card(self, run_id: str, mode: str, ds_id: Optional[str], row: dict) -> Optional[bytes]:
        """The card PNG of a table row; rendered on demand when the row was not rendered
        while training (``image == ""``) and ``mlflow_eigencam._streaming`` can; None when
        it is missing or cannot be rendered."""
        path = row.get(_layout.TABLE_IMAGE_COLUMN)
        if path:
            return self.read_or_none(run_id, str(path))
        return self.render_stored(run_id, mode, ds_id, int(row["epoch"]),
                                  int(row.get("sample_index", -1)))

    def render_stored(self, run_id: str, mode: str, ds_id: Optional[str], epoch: int,
                      index: int) -> Optional[bytes]:
        """A not-yet-rendered sample's card PNG, from what streaming mode stored (None when
        this build cannot render it)."""
        try:
            from ._streaming import render_stored  # written on another branch; optional
        except ImportError:
            return None
        read: Callable[[str], bytes] = lambda path: self.read(run_id, path)  # noqa: E731
        try:
            return render_stored(read, mode, ds_id, epoch, index)
        except Exception:  # a sample that cannot be rendered is "not rendered", not a crash
            return None

    def metric_history(self, run_id: str, key: str) -> List[Tuple[int, float]]:
        """``[(step, value), ...]`` of a metric, by step."""
        return sorted((int(m.step), float(m.value))
                      for m in self.client.get_metric_history(run_id, key))


def _legacy_artifact_repository(factory, uri: str, tracking_uri: str):
    """``get_artifact_repository(uri)`` on MLflow < 3.2, with ``tracking_uri`` as the URI it
    resolves ``mlflow-artifacts:`` against (it takes no ``tracking_uri`` argument there)."""
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:
        return factory(uri)
    with _use_tracking_uri(tracking_uri):
        return factory(uri)
