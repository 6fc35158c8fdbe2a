"""Where things land in an MLflow run: keys, artifact paths, tags, table columns.

Everything that names something in MLflow lives here, so the sink, the compare feature and
the docs agree on one layout.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import types
from typing import Mapping, Optional

#: Root of every key and artifact path the package writes.
ROOT = "eigencam"
#: The one spelling of "no dataset id" (samples logged with ``ds_id=None``): the key and path
#: segment, and what error messages, the explorer and ``compare`` show. ``--ds-id all`` and
#: ``ds_id="all"`` read that data back; a dataset really named ``"all"`` shares its folder.
ALL_DS = "all"
#: The dataset-id convention (docs/dataset-ids.md): the id each integration gives a mode's
#: data when the user names none. Validation data is ``"val"``, training data ``"train"``,
#: test data ``"test"``, whatever the framework (Keras callback and autolog, Lightning
#: callback and autolog); a framework's own names (Lightning's several dataloaders ``val_0``,
#: ``val_1``, a ``{ds_id: data}`` mapping) replace these.
DEFAULT_DS_IDS: Mapping[str, str] = types.MappingProxyType(
    {"train": "train", "eval": "val", "test": "test", "infer": "predict"})

#: Run tags.
TAG_VERSION = "mlflow_eigencam.version"
TAG_TARGET_LAYER = "mlflow_eigencam.target_layer"
TAG_N_COMPONENTS = "mlflow_eigencam.n_components"
TAG_N_SAMPLES = "mlflow_eigencam.n_samples"
TAG_MODE = "mlflow_eigencam.mode"
TAG_DS_ID = "mlflow_eigencam.ds_id"
#: The first logged epoch after which every (mode, ds_id)'s mean ``map_change`` stays below
#: ``metrics.STABLE_MAP_CHANGE`` (an int as text; ``"none"`` while it does not, once set).
TAG_STABLE_EPOCH = "mlflow_eigencam.stable_epoch"
#: The alarms raised (docs/signals.md): ``"; "``-joined texts naming epoch, mode/ds_id,
#: signal, value, threshold and sample ids, the first of each (signal, mode, ds_id).
TAG_ALARM = "mlflow_eigencam.alarm"
#: MLflow's own tag that lists a run's tables (what ``mlflow.log_table`` sets).
MLFLOW_LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"
#: MLflow's own tag that tells its UI a run has image series (what ``log_image`` sets).
MLFLOW_LOGGED_IMAGES = "mlflow.loggedImages"

#: Fixed table columns; ``evr_1`` .. ``evr_k`` follow ``correct``, then ``image``.
TABLE_COLUMNS = ("epoch", "sample_index", "sample_id", "label", "prediction", "correct")
TABLE_IMAGE_COLUMN = "image"
#: The framework's own (fractional) epoch when the step is another counter (transformers'
#: ``global_step``); right after ``epoch``, only in tables whose rows have it.
TABLE_TRAIN_EPOCH_COLUMN = "train_epoch"
#: Explanation drift: 1 - Pearson correlation of the PC1 map with the previous logged epoch's
#: (empty at the first epoch); between the ``evr_*`` columns and ``image``.
TABLE_MAP_CHANGE_COLUMN = "map_change"
#: Per-sample explanation signals (docs/signals.md), after ``map_change`` when a sample has
#: any: ``localization`` (share of the PC1 map's positive mass inside the true boxes / mask),
#: ``pointing_game`` (1 / 0: the map's peak inside them), ``faithfulness`` (keep-top minus
#: drop-top probability of the predicted class), ``fixation`` (label-free: correlation of
#: the map with the other samples' mean map). Each also has a mean metric (:func:`signal_key`).
SIGNAL_LOCALIZATION = "localization"
SIGNAL_POINTING_GAME = "pointing_game"
SIGNAL_FAITHFULNESS = "faithfulness"
SIGNAL_FIXATION = "fixation"
TABLE_SIGNAL_COLUMNS = (SIGNAL_LOCALIZATION, SIGNAL_POINTING_GAME, SIGNAL_FAITHFULNESS,
                        SIGNAL_FIXATION)
#: Where the card's panels are, in card pixels: ``{"size": [H, W], "boxes": [[x, y, w, h],
#: ...], "titles": ["input", "PC1", ...]}`` (``render.card_geometry``); before ``image``.
TABLE_CARD_COLUMN = "card"
#: Detectors only (boxes as preds / labels): boxes predicted and true per image, after
#: ``correct`` (``label`` and ``prediction`` then read "3 boxes").
TABLE_BOX_COLUMNS = ("n_boxes", "n_true_boxes")
#: What the explorer composites in the page (docs/explorer.md, "Overlays"), before ``card``:
#: ``{"at": i, "layers": {layer: [k, h, w]}}`` (row ``i`` of the epoch's maps PNG, layer
#: ``""`` the logger's one layer), plus ``"extent": [fy, fx]`` (``render.overlay``) and, for
#: detectors, ``"pred": [[x1, y1, x2, y2, name, score], ...]`` and ``"true": [[x1, y1, x2,
#: y2, name], ...]`` in input pixels. Absent in rows logged before it (the card is shown).
TABLE_OVERLAY_COLUMN = "overlay"
#: Segmenters only (per-pixel preds / labels): the mean IoU of the predicted and true masks
#: (``samples.mask_iou``) and the class names in the true mask (a list), after ``correct``
#: (``label`` and ``prediction`` then name the classes present, joined).
TABLE_MASK_COLUMNS = ("iou", "classes")
#: Classifiers whose integration gives the predicted class's probability (``on_batch_end``'s
#: ``pred_scores``): that probability, after ``correct``; the card writes it after the class.
TABLE_CONFIDENCE_COLUMN = "confidence"

_SAFE = re.compile(r"[^A-Za-z0-9_\-]")


def safe_segment(name: str | None) -> str:
    """Turn a mode or dataset id into one safe key / path segment.

    Only ``[A-Za-z0-9_-]`` survive; anything else (slashes, dots, spaces, non-ASCII) becomes
    ``_``. When that changed the name, a short hash of the original is appended so that two ids
    which sanitise alike (``"a b"`` and ``"a/b"``) stay distinct.

    Args:
        name: The id; None (no dataset id) maps to :data:`ALL_DS`.

    Returns:
        A non-empty string safe both as an MLflow metric/image key segment and a path segment.
    """
    if name is None:
        return ALL_DS
    text = str(name)
    cleaned = _SAFE.sub("_", text)
    if cleaned != text or not cleaned:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cleaned = f"{cleaned[:48]}-{digest}"
    return cleaned


def default_ds_id(mode: str) -> str:
    """The dataset id of ``mode``'s data when the user names none (:data:`DEFAULT_DS_IDS`).

    Raises:
        ValueError: ``mode`` is not ``"train"``, ``"eval"``, ``"test"`` or ``"infer"``.
    """
    try:
        return DEFAULT_DS_IDS[mode]
    except KeyError:
        raise ValueError(f"no default dataset id for mode {mode!r}; "
                         f"expected one of {sorted(DEFAULT_DS_IDS)}") from None


def ds_label(ds_id: Optional[str]) -> str:
    """How a dataset id is written in messages and pickers: the id itself, :data:`ALL_DS` for
    None (as in the paths)."""
    return ALL_DS if ds_id is None else str(ds_id)


def ds_id_from_label(label: Optional[str]) -> Optional[str]:
    """The inverse of :func:`ds_label` for readers: ``"all"``, ``""`` and None -> None."""
    return None if label in (None, "", ALL_DS) else label


def prefix(mode: str, ds_id: str | None) -> str:
    """``eigencam/{mode}/{ds_id}``: the key prefix that groups a section in the MLflow UI."""
    return f"{ROOT}/{safe_segment(mode)}/{safe_segment(ds_id)}"


def image_key(mode: str, ds_id: str | None, index: int) -> str:
    """Key of the per-sample image series (``log_image(key=..., step=epoch)``)."""
    return f"{prefix(mode, ds_id)}/sample_{index}"


def image_series_files(key: str, step: int, timestamp_ms: int, uid: str) -> tuple[str, str]:
    """Artifact paths of one image-series point, exactly as ``MlflowClient.log_image`` names
    them (MLflow 2.16+ UI): ``images/{key, / -> ~}+step+{step}+timestamp+{ms}+{uid}`` with
    ``.png`` (full size) and ``+compressed.webp`` (the preview the UI loads).

    The package writes these files itself, in one upload per epoch, instead of calling
    ``log_image`` per sample: that call re-encodes the PNG at zlib's default level and sets a
    run tag each time (about 17 ms of CPU per image beside the user's training). A fixed
    ``uid`` chosen at epoch end also makes a retried upload overwrite, never duplicate.
    """
    stem = f"images/{key.replace('/', '~')}+step+{int(step)}+timestamp+{int(timestamp_ms)}+{uid}"
    return f"{stem}.png", f"{stem}+compressed.webp"


def epoch_dir(mode: str, ds_id: str | None, epoch: int) -> str:
    """Artifact folder of one epoch: ``eigencam/{mode}/{ds_id}/epoch_{epoch:04d}``."""
    return f"{prefix(mode, ds_id)}/epoch_{epoch:04d}"


def grid_path(mode: str, ds_id: str | None, epoch: int) -> str:
    """Artifact path of an epoch's grid PNG."""
    return f"{epoch_dir(mode, ds_id, epoch)}/grid.png"


def card_path(mode: str, ds_id: str | None, epoch: int, index: int) -> str:
    """Artifact path of one sample's strip PNG at one epoch (what the table points to)."""
    return f"{epoch_dir(mode, ds_id, epoch)}/sample_{index}.png"


def input_path(mode: str, ds_id: str | None, sample_id: str) -> str:
    """Artifact path of a kept sample's raw input, logged once per run:
    ``eigencam/{mode}/{ds_id}/inputs/{sample_id}.png`` (RGB)."""
    return f"{prefix(mode, ds_id)}/inputs/{safe_segment(sample_id)}.png"


def overlay_maps_path(mode: str, ds_id: str | None, epoch: int, layer: str = "") -> str:
    """Artifact path of an epoch's maps for the explorer's overlays:
    ``epoch_{epoch:04d}/maps.png`` (``maps-{layer}.png`` for a named layer), one grayscale
    (n * k * h, w) uint8 PNG: sample ``i``'s component ``c`` is rows ``(i * k + c) * h`` on,
    quantised as ``_streaming.quantize_maps`` (ReLU, peak 255)."""
    name = f"maps-{safe_segment(layer)}" if layer else "maps"
    return f"{epoch_dir(mode, ds_id, epoch)}/{name}.png"


def table_path(mode: str, ds_id: str | None) -> str:
    """Artifact path of the per-(mode, ds_id) table, one row per sample per epoch."""
    return f"{prefix(mode, ds_id)}/samples.json"


def metric_key(mode: str, ds_id: str | None, component: int) -> str:
    """Mean explained-variance ratio of component ``component`` (1-based)."""
    return f"{prefix(mode, ds_id)}/evr_{component}"


# -- several layers (``layers=[...]``): the first layer keeps the names above ---------------

_LAYER_SAFE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,99}$")


def layer_segment(layer: str) -> str:
    """A layer name as one key segment: a dotted name (``layer4.1.conv2``) as it is, anything
    else as :func:`safe_segment` makes it (never ``.`` nor ``..``)."""
    text = str(layer)
    return text if _LAYER_SAFE.match(text) else safe_segment(text)


def layer_column(layer: str, name: str) -> str:
    """Table column of a further layer's ``name`` (``evr_1``, ``map_change``, a signal):
    ``{layer_segment(layer)}/{name}``, e.g. ``layer4/evr_1``. The first layer has no prefix."""
    return f"{layer_segment(layer)}/{name}"


def layer_metric_key(mode: str, ds_id: str | None, layer: str, name: str) -> str:
    """Metric of a further layer: ``eigencam/{mode}/{ds_id}/{layer}/{name}`` (``name`` as in
    :func:`layer_column`; the first layer's metrics have no layer segment)."""
    return f"{prefix(mode, ds_id)}/{layer_column(layer, name)}"


# -- streaming mode (n_samples=None): what is kept to render on demand ----------------------

#: Name pattern of a table part (``table_part_path``), for readers that list them: groups
#: epoch, written (ms since the epoch, 13+ digits) and writer.
TABLE_PART_RE = re.compile(r"^epoch_(\d{4,})-(\d{13,})-([0-9A-Za-z]{1,32})\.json$")
#: A table part's writer: one token per logger (12 hex digits, see ``table_part_path``).
WRITER_RE = re.compile(r"^[0-9A-Za-z]{1,32}$")


def stream_inputs_path(mode: str, ds_id: str | None, token: str) -> str:
    """Artifact path of one file of streamed input images, each stored once per run:
    ``eigencam/{mode}/{ds_id}/stream/inputs_{token}.npz`` (``token``: 12 hex digits, unique
    per file; the epoch's ``maps.npz`` index names the file that holds each sample)."""
    return f"{prefix(mode, ds_id)}/stream/inputs_{token}.npz"


def stream_maps_path(mode: str, ds_id: str | None, epoch: int) -> str:
    """Artifact path of a streamed epoch's maps, ratios and index:
    ``eigencam/{mode}/{ds_id}/epoch_{epoch:04d}/maps.npz``."""
    return f"{epoch_dir(mode, ds_id, epoch)}/maps.npz"


def table_parts_dir(mode: str, ds_id: str | None) -> str:
    """Folder of the per-epoch table parts: ``eigencam/{mode}/{ds_id}/table``."""
    return f"{prefix(mode, ds_id)}/table"


def table_part_path(mode: str, ds_id: str | None, epoch: int, written_ms: int,
                    writer: str) -> str:
    """Artifact path of one bundle's table rows (MLflow split format, like ``samples.json``):
    ``eigencam/{mode}/{ds_id}/table/epoch_{epoch:04d}-{written_ms:013d}-{writer}.json``.

    Every bundle writes its own part and no part is ever rewritten by another writer, so two
    processes on one run cannot drop each other's rows. ``written_ms`` (when the epoch ended,
    ms since 1970) then ``writer`` order the parts of one epoch: readers keep the first row
    of an (epoch, sample_index) in that order (``_table.part_paths``).

    Raises:
        ValueError: ``writer`` is not 1 to 32 letters or digits, or ``written_ms`` < 0.
    """
    if not WRITER_RE.match(str(writer)) or int(written_ms) < 0:
        raise ValueError(f"bad table part writer {writer!r} or time {written_ms!r}: expected "
                         "1-32 letters or digits and a time in ms >= 0")
    return (f"{table_parts_dir(mode, ds_id)}/"
            f"epoch_{int(epoch):04d}-{int(written_ms):013d}-{writer}.json")


def map_change_key(mode: str, ds_id: str | None) -> str:
    """Mean explanation drift of (mode, ds_id) at an epoch: 1 - correlation of each sample's
    PC1 map with the previous logged epoch's, averaged over the samples seen at both."""
    return f"{prefix(mode, ds_id)}/map_change"


def signal_key(mode: str, ds_id: str | None, name: str) -> str:
    """Mean of one per-sample signal (:data:`TABLE_SIGNAL_COLUMNS`) over the samples of
    (mode, ds_id) that have it at an epoch: ``eigencam/{mode}/{ds_id}/{name}``
    (``pointing_game``: the hit rate)."""
    if name not in TABLE_SIGNAL_COLUMNS:
        raise ValueError(f"unknown signal {name!r}; expected one of {TABLE_SIGNAL_COLUMNS}")
    return f"{prefix(mode, ds_id)}/{name}"


# -- run ids --------------------------------------------------------------------------------

#: A run id: letters, digits, ``_`` and ``-``, starting with a letter or digit, at most 64
#: characters (MLflow's own stores write 32 lower-case hex digits).
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
_RUN_ID_PREFIX = re.compile(r"^[0-9a-fA-F]{4,31}$")


def parse_run_ref(text: str) -> tuple[str, bool]:
    """What a user typed for a run -> ``(id or prefix, is_prefix)``.

    A full id is kept as it is; 4 to 31 hex digits are a prefix of MLflow's 32-digit ids
    (lower-cased; the CLI prints 8 of them).

    Raises:
        ValueError: Not a run id (the message names the text and the rule).
    """
    value = str(text).strip()
    if _RUN_ID_PREFIX.match(value):
        return value.lower(), True
    if RUN_ID_RE.match(value):
        return value, False
    raise ValueError(f"not a run id: {value!r} (expected letters, digits, '_' or '-', at most "
                     "64, or a prefix of 4+ hex digits)")


# -- what a spool record may hold: only what the logger writes ---------------------------------
# Built from the builders' own pieces (ROOT, safe_segment's alphabet, the image-series stem),
# so a record read back from an untrusted spool can name nothing else in the run (a planted
# record must not overwrite ``model/MLmodel`` or ``mlflow.user``).

_SEG = r"[A-Za-z0-9_\-]+"  # what safe_segment returns
#: Under the (mode, ds_id) prefix: names of ``[A-Za-z0-9_-]`` with dotted suffixes, no
#: ``..`` or hidden names (epoch folders, grids, strips, tables, streamed files).
_OWN_PATH = re.compile(
    rf"^{re.escape(ROOT)}/{_SEG}/{_SEG}(?:/[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*)+$")
#: An image-series point of one of the package's sample keys (:func:`image_series_files`).
_OWN_SERIES = re.compile(
    rf"^images/{re.escape(ROOT)}~{_SEG}~{_SEG}~sample_\d+\+step\+-?\d+\+timestamp\+\d+"
    rf"\+[A-Za-z0-9\-]+(?:\.png|\+compressed\.webp)$")
# Built from the builders' own names: evr_{k}, map_change and every signal.
_OWN_METRIC = re.compile(rf"^{re.escape(ROOT)}/{_SEG}/{_SEG}/(?:{_LAYER_SAFE.pattern[1:-1]}/)?(?:evr_\d+|"
                         rf"{'|'.join(re.escape(n) for n in (TABLE_MAP_CHANGE_COLUMN,) + TABLE_SIGNAL_COLUMNS)})$")
#: The package's tag namespace (``mlflow_eigencam.version``, ``mlflow_eigencam.step``, ...).
TAG_NAMESPACE = "mlflow_eigencam."
_OWN_TAG = re.compile(rf"^{re.escape(TAG_NAMESPACE)}[A-Za-z0-9_]+$")
#: MLflow's reserved tag namespace (``mlflow.user``, ``mlflow.source.name``, ...).
MLFLOW_TAG_NAMESPACE = "mlflow."
#: What MLflow accepts as a tag key (``mlflow.utils.validation``): slashes, alphanumerics,
#: ``_ - . :`` and spaces, at most 250 characters, no ``..``, no leading ``/``.
_MLFLOW_TAG_KEY = re.compile(r"^[/\w.\- :]{1,250}$")


def is_own_artifact_path(path: str) -> bool:
    """True for an artifact path the logger writes: under ``eigencam/{mode}/{ds_id}/`` or an
    image-series point of ``eigencam/{mode}/{ds_id}/sample_{i}`` (see
    :func:`image_series_files`)."""
    return isinstance(path, str) and (bool(_OWN_PATH.match(path))
                                      or bool(_OWN_SERIES.match(path)))


def is_own_metric_key(key: str) -> bool:
    """True for a metric the logger writes: ``eigencam/{mode}/{ds_id}/evr_{k}``,
    ``.../map_change`` or a signal (:data:`TABLE_SIGNAL_COLUMNS`), with a further layer's
    segment before the name or not (:func:`layer_metric_key`)."""
    return isinstance(key, str) and bool(_OWN_METRIC.match(key))


def is_own_tag_key(key: str) -> bool:
    """True for a tag the package writes itself: its namespace ``mlflow_eigencam.*``
    (:data:`TAG_VERSION` ...) and MLflow's :data:`MLFLOW_LOGGED_IMAGES`.
    (:data:`MLFLOW_LOGGED_ARTIFACTS` is read and set by the sender, never spooled.)"""
    return isinstance(key, str) and (bool(_OWN_TAG.match(key)) or key == MLFLOW_LOGGED_IMAGES)


def user_tag_problem(key: object) -> Optional[str]:
    """Why ``key`` cannot be a user's extra run tag (``extra_tags=``), or None when it can.

    A user tag must be a key MLflow accepts, and lie outside MLflow's reserved ``mlflow.``
    namespace (``mlflow.user``, ``mlflow.source.name``: a spool record must never change
    them). Keys in the package's ``mlflow_eigencam.`` namespace are allowed (integrations add
    theirs, such as ``mlflow_eigencam.step``)."""
    if not isinstance(key, str) or not _MLFLOW_TAG_KEY.match(key):
        return ("not a tag key MLflow accepts (1 to 250 of letters, digits, '_', '-', '.', "
                "':', ' ', '/')")
    norm = posixpath.normpath(key)
    if norm != key or norm.startswith(("..", "/")) or norm == ".":
        return "not a tag key MLflow accepts (a path that resolves elsewhere)"
    if key.startswith(MLFLOW_TAG_NAMESPACE):
        return f"MLflow's own namespace {MLFLOW_TAG_NAMESPACE!r} is not for extra tags"
    return None
