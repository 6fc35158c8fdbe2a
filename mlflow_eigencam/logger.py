"""The framework-free logger that every integration calls.

Adapters hand it numpy arrays; it filters by mode and dataset id, keeps a capped set of
samples, and at each epoch end runs the math, renders and hands the results to the sink.
It never raises into the training loop (unless ``strict=True``): a failure warns and skips
that epoch's images.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from . import _epoch, _layout, _table
from ._epoch import Key
from ._layers import FurtherLayers
from ._records import Encoded, Item
from ._spool import default_spool_root
from ._streaming import StreamEpoch, quantize_maps
from .eigencam import _check_n_components, _lapack_threads, eigencam
from .errors import EigenCAMWarning, WarnOnce
from .filters import ds_id_filter, mode_filter
from .render import PNGBand, card_geometry, resolve_colormap
from .samples import SampleBuffer
from .sink import DEFAULT_SPOOL_MAX_BYTES, MlflowSink, Undelivered

_log = logging.getLogger("mlflow_eigencam")

_LAYOUTS = ("NCHW", "NHWC")
_PER_IMAGE_LAYOUT = {"NCHW": "CHW", "NHWC": "HWC"}


def _package_version() -> str:
    from . import __version__

    return __version__


# The number checks take ``object``: narrowing a ``float`` (``int``) parameter with
# ``isinstance(x, numbers.Real)`` makes mypy build a float-and-Real intersection class, and
# that defers checking ``EigenCAMLogger.__init__`` until after the other methods, which then
# see none of the attributes' types ("Cannot determine type").
def _is_real(value: object) -> bool:
    """A real number that is not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _is_integral(value: object) -> bool:
    """An integral number that is not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


class EigenCAMLogger:
    """Collect samples during an epoch and log EigenCAM overlays to MLflow at its end.

    Args:
        n_components: Principal components per sample: an int >= 1, or a float in (0, 1) for
            "as many as explain this fraction of the variance".
        n_samples: Samples kept per (mode, ds_id) and epoch; None keeps all and streams them:
            the first ``grid_max_rows`` are rendered, the rest stored as inputs (once per
            run) and low-resolution maps, rendered on demand (see ``_streaming``).
        label_mapping: ``{name: index}`` or a sequence of names, for captions.
        mode: Mode filter: None, "eval", {"eval", "test"}, "!train".
        ds_id: Dataset id filter, same forms as ``mode``.
        run_id: Log into this run (through ``MlflowClient``). Default: the run active in the
            thread that constructs the logger or first offers a batch, else a run created (in
            the background) and ended in :meth:`close`. Once chosen, every call from any
            thread logs there.
        tracking_uri: Where ``run_id`` lives; default ``mlflow.get_tracking_uri()``.
        colormap: OpenCV colormap name ("jet", "viridis", ...) or constant.
        alpha: Heat-map opacity in [0, 1].
        log_every_n_epochs: Log epochs 0, n, 2n, ...
        image_layout: "NCHW" or "NHWC" to force the image layout; None detects it.
        channels_last: Activations arrive as (B, h, w, C) (Keras) instead of (B, C, h, w).
        target_layer: Name of the layer the activations come from (a run tag).
        strict: Raise errors inside the logger instead of warning (for debugging).
        spool_dir: Root folder for items MLflow has not confirmed yet; default
            ``~/.cache/mlflow_eigencam/spool`` (or ``$MLFLOW_EIGENCAM_SPOOL_DIR``). A folder
            that exists and was not made by the package is used through its sub-folder
            ``mlflow-eigencam-spool``; nothing else in it is ever touched.
        spool_max_bytes: Cap on this logger's spooled items while MLflow has not confirmed
            them (default 1 GiB; None: no cap). One warning at 80 %; at the cap an epoch
            keeps its images only when it is a multiple of 10, at twice the cap none; table
            rows and metrics are always kept, and :meth:`close` counts the epochs spooled
            without images (docs/server-down.md).
        close_timeout: Seconds :meth:`close` waits for the upload to finish.
        grid_max_rows: Rows in the per-epoch grid (streaming mode can have thousands).
        extra_tags: More run tags.
    """

    def __init__(
        self,
        n_components: Union[int, float] = 3,
        n_samples: Optional[int] = 5,
        label_mapping: Union[Mapping[str, Any], Sequence[str], None] = None,
        mode: Union[None, str, Sequence[str]] = "!train",
        ds_id: Union[None, str, Sequence[str]] = None,
        *,
        run_id: Optional[str] = None,
        tracking_uri: Optional[str] = None,
        colormap: Union[str, int] = "jet",
        alpha: float = 0.5,
        log_every_n_epochs: int = 1,
        image_layout: Optional[str] = None,
        channels_last: bool = False,
        target_layer: Optional[str] = None,
        strict: bool = False,
        spool_dir: Union[str, os.PathLike, None] = None,
        spool_max_bytes: Optional[int] = DEFAULT_SPOOL_MAX_BYTES,
        close_timeout: float = 30.0,
        grid_max_rows: int = 16,
        extra_tags: Optional[Mapping[str, str]] = None,
    ) -> None:
        _check_n_components(n_components, None)
        # Validates n_samples and label_mapping, naming the bad value.
        self._buffer = SampleBuffer(n_samples, label_mapping)
        if not _is_real(alpha) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if not _is_integral(log_every_n_epochs) or log_every_n_epochs < 1:
            raise ValueError(f"log_every_n_epochs must be an int >= 1, got {log_every_n_epochs!r}")
        if image_layout is not None and image_layout not in _LAYOUTS:
            raise ValueError(f"image_layout must be one of {_LAYOUTS} or None, got {image_layout!r}")
        if isinstance(grid_max_rows, bool) or not isinstance(grid_max_rows, int) or grid_max_rows < 1:
            raise ValueError(f"grid_max_rows must be an int >= 1, got {grid_max_rows!r}")
        if close_timeout is not None and close_timeout < 0:
            raise ValueError(f"close_timeout must be >= 0 or None, got {close_timeout!r}")
        if spool_max_bytes is not None and (isinstance(spool_max_bytes, bool) or not isinstance(
                spool_max_bytes, numbers.Integral) or spool_max_bytes <= 0):
            raise ValueError(f"spool_max_bytes must be an int > 0 or None, got {spool_max_bytes!r}")
        self._spool_max_bytes = spool_max_bytes
        if spool_dir is not None:
            from ._spool import own_root

            own_root(Path(spool_dir), create=False)  # a file, or a foreign sub-folder: fail now
        self._n_components = n_components
        self._n_components_used: Optional[int] = None  # clamped to the layer's channels
        self.n_samples: Optional[int] = self._buffer.n_samples
        self.mode_filter = mode_filter(mode)
        self.ds_id_filter = ds_id_filter(ds_id)
        self.colormap = colormap
        resolve_colormap(colormap)  # fail now, naming the bad colormap
        self.alpha = float(alpha)
        self.log_every_n_epochs = int(log_every_n_epochs)
        self.image_layout = image_layout
        self.channels_last = bool(channels_last)
        self.strict = bool(strict)
        self.close_timeout = close_timeout
        self.grid_max_rows = grid_max_rows
        # Label conversion for streaming mode goes through the same code path, uncapped.
        self._stream_buffer = SampleBuffer(None, label_mapping)
        self._streams: Dict[Key, StreamEpoch] = {}
        self._stream_inputs: Dict[Key, Dict[str, str]] = {}  # run-wide: sample_id -> inputs file
        # Capped mode: sample ids whose raw input (the explorer's overlays) was handed to the
        # sink, per (mode, ds_id): each is logged once per run.
        self._overlay_inputs: Dict[Key, Set[str]] = {}
        # Explanation drift and the per-sample signals per key (docs/signals.md), what
        # batches brought for them, the run's stable epoch and the alarms raised.
        self._signals = _epoch.Signals()
        # Several layers (activations given as {layer: array}): the ones after the first.
        self._more = FurtherLayers()
        # Steps logged per (mode, ds_id) by this logger, and what a new fit adds to epochs.
        self._logged_steps: Dict[Key, Set[int]] = {}
        #: Names this logger's table parts (``_layout.table_part_path``): no other writer on
        #: the run writes the same file, so no writer can drop another's rows.
        self._writer = uuid.uuid4().hex[:12]
        self._step_offset = 0
        self._fit_last_step: Optional[int] = None
        self._train_epoch: Optional[float] = None  # of the on_epoch_end call in progress
        self._once = WarnOnce()
        self._target_layer = target_layer
        self._extra_tags = _check_extra_tags(extra_tags)
        self._requested_run_id = run_id
        self._tracking_uri = tracking_uri
        self._run_id: Optional[str] = None
        self._owns_run = False
        self._spool_dir = Path(spool_dir) if spool_dir is not None else None
        self._sink: Optional[MlflowSink] = None
        self._tags_submitted = False
        self._closed = False
        self._report: Optional[Undelivered] = None
        self._tmp_root: Optional[Path] = None
        # Batches and epoch ends may come from several threads: one at a time.
        self._lock = threading.RLock()
        # The run: given, or the one active in this thread (else decided at first use).
        self._resolve_run(first_use=False)

    @property
    def n_components(self) -> Union[int, float]:
        """Components per sample: as asked, or clamped to the layer's channel count."""
        return self._n_components_used or self._n_components

    @n_components.setter
    def n_components(self, value: Union[int, float]) -> None:
        _check_n_components(value, None)
        self._n_components, self._n_components_used = value, None

    # -- what integrations ask before they copy anything -------------------------------------
    def wants(self, mode: str, ds_id: Optional[str] = None) -> bool:
        """True when (mode, ds_id) passes the filters (else the batch costs nothing).

        A mode that is not one of the known ones, or a ds_id that is not a string, warns
        once and is skipped (raises with ``strict=True``): it must not stop training.
        """
        try:
            if not isinstance(mode, str):
                raise TypeError(f"mode must be a string such as 'eval', got {mode!r}")
            if ds_id is not None and not isinstance(ds_id, str):
                raise TypeError(f"ds_id must be a string or None, got {ds_id!r}")
            return self.mode_filter(mode) and self.ds_id_filter(ds_id)
        except (TypeError, ValueError) as exc:
            self._fail(exc, f"on_batch_end(mode={mode!r}, ds_id={ds_id!r})")
            return False

    def room(self, mode: str, ds_id: Optional[str] = None) -> Optional[int]:
        """Samples still wanted for (mode, ds_id) this epoch: 0, a count, or None (all)."""
        if not self.wants(mode, ds_id):
            return 0
        if self.n_samples is None:
            return None
        return self._buffer.room(mode, ds_id)

    def should_log(self, epoch: int) -> bool:
        """True for the epochs that ``log_every_n_epochs`` selects."""
        return int(epoch) % self.log_every_n_epochs == 0

    def set_target_layer(self, name: str) -> None:
        """Record the layer the activations come from (logged as a run tag)."""
        changed = name != self._target_layer
        self._target_layer = name
        if changed and self._tags_submitted:
            self._submit(Item("tags", self._run_id, self._uri(),
                              tags={_layout.TAG_TARGET_LAYER: str(name)}))

    @property
    def run_id(self) -> Optional[str]:
        """The run being logged to (None before the first batch, unless given or active).

        A run the logger creates is created by its sender thread; this waits up to 5 s for it.
        """
        if self._sink is None:
            return self._requested_run_id
        return self._sink.run_id or self._sink.wait_run(5.0)

    @property
    def spool_dir(self) -> Optional[Path]:
        """Folder that holds what MLflow has not confirmed yet (this logger's own folder
        once it logged something)."""
        if self._sink is not None:
            return self._sink.spool_dir
        return self._spool_dir if self._spool_dir is not None else default_spool_root()

    # -- batches -------------------------------------------------------------------------
    def on_batch_end(self, images: Any, activations: Any, labels: Any = None, preds: Any = None,
                     *, mode: str, ds_id: Optional[str] = None,
                     map_extent: Optional[Tuple[float, float]] = None,
                     boxes: Any = None, masks: Any = None, faithfulness: Any = None,
                     pred_scores: Any = None) -> None:
        """Offer one batch.

        Args:
            images: (B, C, H, W) or (B, H, W, C) (or (B, H, W) grayscale); uint8 or float.
            activations: (B, C, h, w), or (B, h, w, C) with ``channels_last=True``; or
                ``{layer name: activations}`` for several layers (the same names in every
                batch; the first keeps the single layer's table columns and metrics, each
                further one gets its own, ``layer4/evr_1``; not with ``n_samples=None``).
            labels: (B,) class indices or strings, or (B, K) one-hot / probabilities, or
                (B, H, W) masks of the images' size (``samples.segmentation_masks``).
            preds: (B,) indices or (B, K) logits / probabilities (argmax is taken), or
                per-pixel (B, K, H, W) / (B, H, W, K) scores or (B, H, W) masks.
            mode: "train", "eval", "test" or "infer".
            ds_id: Dataset id, or None.
            map_extent: ``(fy, fx)``: the images cover only these fractions of the map's
                height and width, top left (a detector's padded canvas; see
                ``render.overlay``); kept samples only (``n_samples=None`` draws the whole map).
            boxes: The true regions of classification data, for ``localization`` and
                ``pointing_game`` (docs/signals.md): B entries, each ``(n, 4)`` ``(x1, y1,
                x2, y2)`` in image pixels or None. A detector's true boxes (``labels``) are
                used without it.
            masks: True regions as masks: ``(B, H, W)`` (nonzero inside), or B entries of
                ``(H, W)`` or None; joined with ``boxes``.
            faithfulness: ``(B,)`` per-sample scores an integration computed with the model
                (``metrics.perturbed_batch`` / ``faithfulness_scores``; None or NaN: none);
                with several layers ``{layer name: (B,) scores}`` (layers left out: none).
            pred_scores: ``(B,)`` the predicted class's probability per image, computed by the
                caller (the logger applies no softmax: pass what the model's own softmax
                gave, once); written after the class on the card (``"cat 0.87"``) and in the
                table's ``confidence`` column. Class predictions only; NaN: none.
        """
        with self._lock:
            if not self.wants(mode, ds_id):
                return
            if self.room(mode, ds_id) == 0:
                return
            try:
                self._resolve_run(first_use=True)
                activations, faithfulness, more = self._more.split(
                    activations, faithfulness, self.n_samples is not None)
                extras = _epoch.batch_extras(boxes, masks, faithfulness, np.shape(images)[0])
                self._batch(images, activations, labels, preds, mode, ds_id, map_extent, extras,
                            more, pred_scores)
            except Exception as exc:
                self._fail(exc, f"on_batch_end(mode={mode!r}, ds_id={ds_id!r})")

    def _batch(self, images, activations, labels, preds, mode, ds_id, map_extent=None,
               extras=None, more=None, pred_scores=None) -> None:
        # The buffer checks shapes and batch sizes, and converts and copies only the rows it
        # keeps; the logger only decides the image layout for the whole batch.
        images = np.asarray(images)
        self._clamp_components(activations)
        per_image = _PER_IMAGE_LAYOUT[self._image_layout(images)] if images.ndim == 4 else None
        kwargs: Dict[str, Any] = dict(image_layout=per_image, channels_last=self.channels_last,
                                      pred_scores=pred_scores)
        if more:  # checked before the buffer keeps the first layer's rows
            more = self._more.check(more, images.shape[0], self.channels_last)
        if self.n_samples is None:
            self._stream_batch(mode, ds_id, images, activations, labels, preds, kwargs, extras)
        else:
            added = self._buffer.add(mode, ds_id, images, activations, labels, preds, **kwargs,
                                     map_extent=map_extent)
            try:
                converted = [_epoch.extra(extras[row], row, s.image.shape[:2])
                             for row, s in enumerate(added)] if extras else []
            except Exception:
                self._buffer.retract(mode, ds_id, added)  # a batch is kept whole or not at all
                raise
            if converted:  # the kept samples are the batch's first rows
                self._signals.keep((mode, ds_id), added, converted)
            if more and added:
                self._more.keep((mode, ds_id), [s.index for s in added], more)

    def _clamp_components(self, activations: Any) -> None:
        """A layer with fewer channels than ``n_components`` (an int): use them all, once
        warned, rather than skipping every epoch of the run."""
        shape = getattr(activations, "shape", None)
        k = self._n_components
        if shape is None or len(shape) != 4 or isinstance(k, bool) or not isinstance(k, int):
            return
        channels = int(shape[-1] if self.channels_last else shape[1])
        if 0 < channels < k and self._n_components_used != channels:
            self._n_components_used = channels
            warnings.warn(f"mlflow_eigencam: n_components={k} but the target layer has "
                          f"{channels} channel(s); using n_components={channels}",
                          EigenCAMWarning, stacklevel=4)
        elif channels >= k:
            self._n_components_used = None

    def _image_layout(self, images: np.ndarray) -> str:
        if self.image_layout is not None:
            return self.image_layout
        first, last = images.shape[1] in (1, 3, 4), images.shape[-1] in (1, 3, 4)
        if last and not first:
            return "NHWC"
        if first and not last:
            return "NCHW"
        raise ValueError(f"cannot tell the layout of images with shape {images.shape}: pass "
                         f"image_layout='NCHW' or 'NHWC'")

    # -- epochs --------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, *, mode: Optional[str] = None,
                     ds_id: Optional[str] = None, train_epoch: Optional[float] = None) -> None:
        """Log what was kept for every (mode, ds_id) seen (or only the one given) at
        ``step = epoch + step_offset`` (see :meth:`begin_fit`).

        When this returns, the epoch's images, table rows and metrics are on disk in the spool
        (see docs/server-down.md); the upload happens on a background thread. A step that was
        logged already (the same epoch ended twice, a resumed run) is not logged again: the
        first stands, with one warning (see docs/artifact-layout.md). ``train_epoch``: the
        framework's own epoch when ``epoch`` counts something else (transformers' global
        step), written in the table's ``train_epoch`` column.
        """
        with self._lock:
            self._train_epoch = train_epoch
            try:
                self._epoch_end(epoch, mode, ds_id)
            finally:
                self._train_epoch = None

    @property
    def step_offset(self) -> int:
        """What is added to an epoch to get its MLflow step (0 unless a fit started after
        :meth:`begin_fit` at an epoch that was logged already)."""
        return self._step_offset

    @property
    def last_logged_step(self) -> Optional[int]:
        """The last step this logger logged, None before the first."""
        steps = [max(v) for v in self._logged_steps.values() if v]
        return max(steps) if steps else None

    def begin_fit(self, timeout: float = 5.0) -> Optional[int]:
        """A training run (``fit``) starts. Its first epoch decides its steps:

        * it starts after the last step already logged in this run (a resumed fit, Keras'
          ``initial_epoch``, Lightning's checkpoint): ``step = epoch``, as without this call;
        * it starts at or before that step (a second ``fit`` in one run, two-phase
          fine-tuning, which counts from epoch 0 again): its steps continue after the last
          logged one, ``step = epoch + last + 1 - first_epoch``.

        Integrations call it when a fit starts, then pass the framework's own epoch to
        :meth:`on_epoch_end`. The last logged step is this logger's own, else the run's (its
        ``eigencam/...`` metrics, asked from MLflow for at most ``timeout`` seconds on a
        helper thread; when MLflow does not answer, steps are the epochs and a repeat is
        dropped by the sender instead). Returns that last logged step (None: none yet).
        """
        with self._lock:
            last = self.last_logged_step
            if last is None:
                self._resolve_run(first_use=False)
                last = self._run_last_step(timeout)
            self._step_offset = 0
            self._fit_last_step = last  # applied at the fit's first logged epoch
            return last

    def _run_last_step(self, timeout: float) -> Optional[int]:
        """The last step of the run's EigenCAM metrics (a run another logger wrote to)."""
        if self._sink is None or self._sink.run_id is None or self._owns_run:
            return None
        from . import _transport

        uri = self._tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        run_id = self._sink.run_id
        found: List[Optional[int]] = []

        def ask() -> None:
            target = uri
            if target is None:
                import mlflow

                target = str(mlflow.get_tracking_uri())
            if _transport.probe(target):
                steps = _transport.logged_steps(target, run_id, _layout.ROOT)
                found.append(max(steps.values()) if steps else None)

        _transport.bounded(ask, timeout)
        if not found:
            self._once.warn("begin_fit", f"could not read the logged epochs of run {run_id} "
                            f"within {timeout} s; steps start at epoch (a repeated epoch is "
                            f"dropped when sent)", stacklevel=4)
            return None
        return found[0]

    def _epoch_end(self, epoch: int, mode: Optional[str], ds_id: Optional[str]) -> None:
        keys = [k for k in self._keys() if (mode is None or k[0] == mode)
                and (ds_id is None or k[1] == ds_id)]
        if not keys:
            return
        if not self.should_log(epoch):
            for key in keys:
                self._discard(key)
            return
        try:
            self._resolve_run(first_use=True)  # never waits on MLflow
        except Exception as exc:
            for key in keys:
                self._discard(key)
            self._fail(exc, "starting the MLflow run")
            return
        if self._fit_last_step is not None:  # the first epoch of a fit after begin_fit()
            if int(epoch) <= self._fit_last_step:
                self._step_offset = self._fit_last_step + 1 - int(epoch)
            self._fit_last_step = None
        step = int(epoch) + self._step_offset
        for key in keys:
            if step in self._logged_steps.get(key, ()):
                self._discard(key)
                self._once.warn(("repeat", key), (
                    f"epoch {epoch} (step {step}) of mode={key[0]!r}, ds_id={key[1]!r} was "
                    f"logged already; the first stays, this one is not logged (a second fit "
                    f"in one run continues the steps when its integration calls "
                    f"begin_fit())"), stacklevel=4)
                continue
            try:
                self._log_key(step, key)
                self._logged_steps.setdefault(key, set()).add(step)
            except Exception as exc:
                self._discard(key)
                self._fail(exc, f"on_epoch_end(epoch={epoch}, mode={key[0]!r}, ds_id={key[1]!r})")

    def _keys(self) -> List[Key]:
        keys = list(self._buffer.keys())
        keys += [k for k in self._streams if k not in keys]
        return keys

    def discard(self, mode: str, ds_id: Optional[str] = None) -> None:
        """Drop what was kept for (mode, ds_id) this epoch without logging it."""
        self._discard((mode, ds_id))

    def _discard(self, key: Key) -> None:
        self._buffer.take(*key)
        self._more.discard(key)
        for layer_key in self._more.keys(key):
            self._signals.reset(layer_key, logged=False)
        self._signals.reset(key, logged=False)
        stream = self._streams.pop(key, None)
        if stream is not None:
            shutil.rmtree(stream.folder, ignore_errors=True)

    def _log_key(self, epoch: int, key: Key) -> None:
        mode, ds_id = key
        if key in self._streams:
            self._log_stream(epoch, key, self._streams.pop(key))
            return
        samples = self._buffer.take(mode, ds_id)
        extras = self._signals.extras.pop(key, {})
        if not samples:
            return
        with _lapack_threads(0):  # one BLAS thread for the call, see eigencam._lapack_threads
            result = eigencam(np.stack([s.activations for s in samples]), self.n_components)
        assert self._sink is not None  # _resolve_run made it
        layers = self._more.take(key, [s.index for s in samples], self._n_components)
        files: Dict[str, Any] = {}
        cards, rows = [], []
        now = int(time.time() * 1000)
        # For the explorer's overlays: the epoch's maps at their own resolution, uint8, in
        # one grayscale PNG; each raw input once per run (docs/explorer.md, "Overlays").
        # Layer "" is the first (maps.png), a further layer's is maps-{layer}.png; each
        # layer's (k, h, w) goes into the rows' overlay cells.
        shapes: Dict[str, Tuple[int, ...]] = {}
        for name, maps in [("", result.maps)] + [(n, r.maps) for n, r, _ in layers]:
            q = quantize_maps(maps)
            shapes[name] = q.shape[1:]
            files[_layout.overlay_maps_path(mode, ds_id, epoch, name)] = Encoded(
                q.reshape(-1, q.shape[-1]) if q.size else np.zeros((1, 1), np.uint8))
        stored, new = self._overlay_inputs.setdefault(key, set()), set()
        for i, s in enumerate(samples):
            if s.sample_id not in stored and s.sample_id not in new:
                new.add(s.sample_id)
                files[_layout.input_path(mode, ds_id, s.sample_id)] = Encoded(s.image)
            evr = result.explained_variance_ratio[i]
            band = PNGBand(_epoch.card(s, result.maps[i], evr, [
                (n, r.maps[i], r.explained_variance_ratio[i]) for n, r, _ in layers],
                colormap=self.colormap, alpha=self.alpha,
                layer=self._more.names[0] if self._more.names else None))
            # Encoded on the worker, which starts while the next strip is rendered; the one
            # PNG backs the series point and the card, and the sender draws the grid from it.
            png, webp = Encoded([band]), Encoded(band.pixels, "webp-preview")
            self._sink.encode_soon(png, webp)
            path = _epoch.sample_files(files, mode, ds_id, epoch, s.index, now, png, webp)
            cards.append(path)
            pc1 = result.maps[i, 0] if result.maps.shape[1] else None
            change = self._signals.map_change.update(key, s.sample_id, pc1)
            signals = self._signals.sample(key, s, pc1, extras.get(s.index))
            overlay = _table.overlay_cell(i, shapes, s.map_extent, s.pred_boxes, s.label_boxes)
            rows.append(_table.row(epoch, s, evr, path, change,
                                   _epoch.geometry(s, len(evr), layers, self._more.names), signals,
                                   overlay))
            for name, r, scores in layers:  # a further layer's columns, its own signals
                pc1 = r.maps[i, 0] if r.maps.shape[1] else None
                extra = extras.get(s.index, (None, None, None))
                lkey = (mode, ds_id, name)
                rows[-1].update(_table.layer_columns(
                    name, r.explained_variance_ratio[i],
                    self._signals.map_change.update(lkey, s.sample_id, pc1),
                    self._signals.sample(lkey, s, pc1, (extra[0], extra[1], scores[i]))))
        more_metrics = [[_layout.layer_metric_key(mode, ds_id, name, f"evr_{c + 1}"), float(v)]
                        for name, r, _ in layers
                        for c, v in enumerate(r.explained_variance_ratio.mean(axis=0))]
        for lkey in self._more.keys(key):
            more_metrics += [[_layout.layer_metric_key(mode, ds_id, lkey[2], n), v]
                             for n, v in self._signals.summaries(lkey)]
        self._finish_epoch(epoch, key, files, cards[: self.grid_max_rows],
                           result.explained_variance_ratio.sum(axis=0), len(samples), rows,
                           more_metrics=more_metrics)
        stored.update(new)  # with the sink now (a failed epoch logs its inputs again)
        self._signals.reset(key, logged=True)
        for lkey in self._more.keys(key):
            self._signals.reset(lkey, logged=True)

    def _finish_epoch(self, epoch: int, key: Key, files: Dict[str, Any], cards: List[str],
                      evr_sum: np.ndarray, count: int, rows: List[dict],
                      streamed: bool = False, more_metrics: Sequence[List[Any]] = ()) -> None:
        """Submit one bundle per (mode, ds_id, epoch): one upload, one metrics call, tags
        once per run. ``cards``: artifact paths (in ``files``) of the grid's cards, drawn
        into the grid by the sender."""
        mode, ds_id = key
        grids = None
        if cards:
            grids = {_layout.grid_path(mode, ds_id, epoch): {
                "epoch": epoch, "mode": mode, "ds_id": ds_id, "cards": list(cards)}}
        now = int(time.time() * 1000)
        # The rows' home: a part of this epoch and writer, never rewritten by anyone else
        # (two processes on one run keep every row; readers merge the parts). samples.json
        # gets them too, merged by the sender: a view for MLflow's UI and load_table that
        # another writer may overwrite (streamed rows stay out of it: it would be re-sent
        # whole every epoch; it is still written so the table is registered).
        self._signals.score_rows(key, rows)
        if self._train_epoch is not None:
            rows = [dict(r, **{_layout.TABLE_TRAIN_EPOCH_COLUMN: float(self._train_epoch)}) for r in rows]
        files[_layout.table_part_path(mode, ds_id, epoch, now, self._writer)] = \
            _table.to_json(rows)
        tables = [_layout.table_path(mode, ds_id)]
        files[tables[0]] = _table.to_json([] if streamed else rows)
        mean = evr_sum / max(count, 1)
        metrics = [[_layout.metric_key(mode, ds_id, c + 1), float(v), epoch, now]
                   for c, v in enumerate(mean)]
        metrics += self._signals.metrics(key, epoch, now)
        metrics += [[name, value, epoch, now] for name, value in more_metrics]
        once = [metrics[0][0], epoch] if metrics else None
        # stable_epoch and alarm tags ride with the bundle when they changed (the sender sends
        # a tag again whenever its value differs from the last one it sent).
        tags = {_layout.MLFLOW_LOGGED_IMAGES: "True"}
        signals = self._signals
        tags.update(signals.watch.epoch(epoch, key, rows, signals.map_change.summary(key),
                                        signals.localization.summary(key)[0], signals.fixation.summary(key)))
        self._submit(Item("bundle", self._run_id, self._uri(), files=files, metrics=metrics,
                          tables=tables, tags=tags, grids=grids, once=once))

    # -- streaming (n_samples=None) ------------------------------------------------------
    def _stream_batch(self, mode, ds_id, images, activations, labels, preds, kwargs,
                      extras=None) -> None:
        key = (mode, ds_id)
        stream = self._streams.get(key)
        if stream is None:
            folder = self._pending_root() / uuid.uuid4().hex
            folder.mkdir(parents=True)
            colormap = self.colormap if isinstance(self.colormap, str) else int(self.colormap)
            stream = self._streams[key] = StreamEpoch(
                folder, key, self.grid_max_rows, colormap, self.alpha,
                self._stream_inputs.setdefault(key, {}))
        self._stream_buffer.add(mode, ds_id, images, activations, labels, preds, **kwargs)
        samples = self._stream_buffer.take(mode, ds_id)
        with _lapack_threads(0):
            result = eigencam(np.stack([s.activations for s in samples]), self.n_components)
        # Explanation drift against the previous logged epoch, as in capped mode.
        changes, signals = {}, {}
        for i, s in enumerate(samples):
            pc1 = result.maps[i, 0] if result.maps.shape[1] else None
            changes[s.sample_id] = self._signals.map_change.update(key, s.sample_id, pc1)
            extra = _epoch.extra(extras[i], i, s.image.shape[:2]) if extras else None
            signals[s.sample_id] = self._signals.sample(key, s, pc1, extra)
        # Copies only: inputs (new sample ids), uint8 maps, ratios; strips for the grid rows.
        stream.add(samples, result.maps, result.explained_variance_ratio,
                   lambda s, evr: _table.row(-1, s, evr, "", changes.get(s.sample_id),
                                             card_geometry(s.image.shape[:2], len(evr)),
                                             signals.get(s.sample_id)))

    def _log_stream(self, epoch: int, key: Key, stream: StreamEpoch) -> None:
        mode, ds_id = key
        assert self._sink is not None
        try:
            files = stream.finish(epoch)
            now = int(time.time() * 1000)
            cards = []
            for row, strip in zip(stream.rows, stream.grid_strips):
                band = PNGBand(strip)
                png, webp = Encoded([band]), Encoded(band.pixels, "webp-preview")
                self._sink.encode_soon(png, webp)
                row[_layout.TABLE_IMAGE_COLUMN] = _epoch.sample_files(
                    files, mode, ds_id, epoch, row["sample_index"], now, png, webp)
                cards.append(row[_layout.TABLE_IMAGE_COLUMN])
            evr_sum = stream.evr_sum if stream.evr_sum is not None else np.zeros(0)
            # Spooled before returning (submit reads the local files): the files are paths
            # into the folder deleted below. Streamed rows live in the parts only.
            self._finish_epoch(epoch, key, files, cards, evr_sum, stream.count, stream.rows,
                               streamed=True)
            stream.commit()
            self._signals.reset(key, logged=True)
        finally:
            shutil.rmtree(stream.folder, ignore_errors=True)

    def _pending_root(self) -> Path:
        if self._tmp_root is None:
            self._tmp_root = Path(tempfile.mkdtemp(prefix="mlflow-eigencam-pending-"))
            # Removed with the logger, or at exit when it was never closed.
            weakref.finalize(self, shutil.rmtree, str(self._tmp_root), ignore_errors=True)
        return self._tmp_root

    # -- MLflow --------------------------------------------------------------------------
    def _uri(self) -> Optional[str]:
        return self._tracking_uri  # set by _resolve_run (None: the sender decides)

    def _resolve_run(self, *, first_use: bool) -> None:
        """Decide the run once, in the calling thread, without waiting on MLflow.

        ``run_id`` given, else the run active in this thread (only if ``mlflow`` is imported:
        otherwise there is none, and importing it here would cost the training thread
        seconds). Else, at first use, the sender creates a run in the background. Later
        calls, from any thread, keep the choice.
        """
        if self._sink is not None:
            return
        with self._lock:
            if self._sink is not None:
                return
            mlflow = sys.modules.get("mlflow")
            uri, run_id = self._tracking_uri, self._requested_run_id
            if run_id is None and mlflow is not None:
                active = mlflow.active_run()
                if active is not None:
                    run_id, uri = active.info.run_id, str(mlflow.get_tracking_uri())
            if run_id is None and not first_use:
                return
            if uri is None and mlflow is not None:
                uri = str(mlflow.get_tracking_uri())
            if uri is None:
                uri = os.environ.get("MLFLOW_TRACKING_URI") or None  # else: on the sender
            self._tracking_uri, self._run_id = uri, run_id
            self._owns_run = run_id is None
            self._sink = MlflowSink(self._spool_dir, run_id=run_id, tracking_uri=uri,
                                    create_run=self._owns_run,
                                    spool_max_bytes=self._spool_max_bytes)

    def _tags(self) -> Dict[str, str]:
        tags = {
            _layout.TAG_VERSION: _package_version(),
            _layout.TAG_N_COMPONENTS: str(self.n_components),
            _layout.TAG_N_SAMPLES: str(self.n_samples),
            _layout.TAG_MODE: repr(self.mode_filter),
            _layout.TAG_DS_ID: repr(self.ds_id_filter),
        }
        if self._target_layer is not None:
            tags[_layout.TAG_TARGET_LAYER] = str(self._target_layer)
        elif self._more.names is not None:  # layers given as {layer: activations}
            tags[_layout.TAG_TARGET_LAYER] = ", ".join(self._more.names)
        tags.update({str(k): str(v) for k, v in self._extra_tags.items()})
        return tags

    def _submit(self, item: Item) -> None:
        assert self._sink is not None
        if not self._tags_submitted:
            self._tags_submitted = True
            self._sink.submit(Item("tags", self._run_id, self._uri(), tags=self._tags()))
        self._sink.submit(item)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until MLflow confirmed everything (True) or ``timeout`` seconds passed."""
        return True if self._sink is None else self._sink.flush(timeout)

    def close(self, timeout: Optional[float] = None) -> Undelivered:
        """Flush (at most ``timeout``, default ``close_timeout`` seconds) and stop.

        Returns:
            What was not delivered, an :class:`~mlflow_eigencam.sink.Undelivered`: an int
            (0 when everything arrived) with ``.records`` (files left in :attr:`spool_dir`),
            ``.in_memory``, ``.reason`` and ``.message()``; a warning says the same. A second
            ``close()`` returns the same value.
        """
        if self._report is not None:
            return self._report
        self._closed = True
        report = Undelivered([], 0, None)
        try:
            for key in list(self._streams):
                self._discard(key)
            if self._sink is not None:
                # A run the logger created is ended (FINISHED) once all of it arrived.
                report = self._sink.close(self.close_timeout if timeout is None else timeout,
                                          end_run=self._owns_run)
        except Exception as exc:
            self._fail(exc, "close()")
        finally:
            if self._tmp_root is not None:
                shutil.rmtree(self._tmp_root, ignore_errors=True)
        self._report = report
        return report

    def __enter__(self) -> "EigenCAMLogger":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _fail(self, exc: BaseException, where: str) -> None:
        if self.strict:
            raise exc
        _log.warning("mlflow_eigencam: %s failed: %s", where, exc, exc_info=exc)
        # Once per kind of failure (numbers masked), so a per-batch error does not flood the log.
        tag = (where.split("(")[0], type(exc).__name__, re.sub(r"\d+", "#", str(exc))[:120])
        self._once.warn(tag, f"mlflow_eigencam: {where} failed ({type(exc).__name__}: {exc}); "
                             f"skipping these EigenCAM images, training goes on.", stacklevel=3)


def _check_extra_tags(extra_tags: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """The extra run tags MLflow and the sender accept; each other key is left out alone,
    with a warning naming it (one bad key made MLflow reject the whole batch, and with it
    every run tag of the package)."""
    out: Dict[str, str] = {}
    for key, value in dict(extra_tags or {}).items():
        problem = _layout.user_tag_problem(key)
        if problem is not None:
            warnings.warn(f"mlflow_eigencam: extra_tags key {key!r} is left out: {problem}",
                          EigenCAMWarning, stacklevel=3)
            continue
        out[key] = str(value)
    return out
