"""The PyTorch monitor: forward hooks that feed :class:`~mlflow_eigencam.logger.EigenCAMLogger`.

A plain training loop uses :class:`EigenCAMMonitor`::

    monitor = EigenCAMMonitor(model)                 # target layer found on the first forward
    for epoch in range(epochs):
        ...                                          # training: nothing to do ("!train" by default)
        for x, y in val_loader:
            with monitor.capture(mode="eval", ds_id="val"):   # the forward hook lives only here
                logits = model(x)
                monitor.update(images=x, labels=y, preds=logits)
        monitor.epoch_end(epoch)                     # one MLflow step per epoch
    monitor.close()                                  # what was not delivered (0: all of it)

What the monitor promises about the user's model:

* hooks exist only inside ``capture()`` (and during the one extra forward pass of pinned
  samples); ``close()`` removes anything left;
* every module's ``training`` flag is restored after the extra forward pass;
* activations are detached and only the kept samples (``[:room]``) are copied, then moved to
  the CPU; nothing is recorded by autograd, so the user's gradients are unchanged;
* a model with no usable layer (auto-detection found no feature map) warns once and logs
  nothing; training goes on (``strict=True`` raises instead);
* under ``torch.distributed`` only rank 0 builds a logger; other ranks do nothing at all (no
  collectives, no barrier), so no rank ever waits on another because of the monitor.

Pinned samples (``pin_samples=True``): the samples kept in the first epoch of each
``(mode, ds_id)`` are remembered (their input tensors on the CPU, and their labels). From the
next epoch on the monitor does no per-batch work for that key: ``epoch_end`` runs one extra
forward pass on the pinned inputs (``torch.no_grad()``, ``model.eval()``, flags restored) and
logs those, so the MLflow step slider shows the same images as the model learns even when the
loader shuffles. Doing the extra pass every epoch (rather than only when fewer than ``n`` of the
pinned samples come by again) costs one small forward per epoch and nothing per batch.

Faithfulness (``faithfulness=True``, the default; docs/signals.md): for a classifier (an output
of class scores ``(B, K)``), each kept batch gets one more quiet forward: per fraction the
map's top kept (rest blurred) and dropped (top blurred), ``2F n`` images in the pinned pass
(whose output is the clean row), ``(1 + 2F) n`` with the clean images at the first epoch.
Not with ``n_samples=None`` (every sample). The per-sample score goes to the logger as
``on_batch_end(faithfulness=...)``. Same frame as the pinned pass (no grad, eval, flags and
RNG restored); the monitor's own hooks ignore it. Detectors (a list of images, a padded
canvas) and other outputs are not scored.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ...eigencam import _lapack_threads, eigencam
from ...errors import WarnOnce
from ...metrics import DEFAULT_FRACTIONS, check_fractions, faithfulness_scores, perturbed_batch, upsample
from ._model import first_tensor, keep_rows, quiet_forward, rank_or_none, unwrap_model
from .batches import images_as_batch, to_numpy
from .detection import Canvas, canvas_of, crop_to_images, detections, transform_of
from .layers import (
    MAX_EXTRA_TOKENS,
    NO_LAYER_MESSAGE,
    LayerFinder,
    ReshapeTransform,
    map_layout,
    resolve_target_layer,
    tokens_to_grid,
)

_log = logging.getLogger("mlflow_eigencam")

#: ``(mode, ds_id)``: one sample buffer of the logger.
Key = Tuple[str, Optional[str]]

#: The dataset id of each mode's split when ``capture()`` is given none: the ids the Lightning
#: callback and autolog write, so a plain loop's run sits beside theirs in the explorer.
SPLIT_DS_IDS: Dict[str, str] = {"train": "train", "eval": "val", "test": "test", "infer": "predict"}

__all__ = ["SPLIT_DS_IDS", "EigenCAMMonitor"]


@dataclass
class _Pin:
    """The first epoch's kept inputs of one (mode, ds_id), to be shown at every epoch."""

    images: List[torch.Tensor] = field(default_factory=list)  # CPU chunks, as the model took them
    labels: List[Any] = field(default_factory=list)  # per-chunk numpy arrays / lists, or None
    boxes: List[Any] = field(default_factory=list)  # per-chunk lists of (n, 4) true boxes, or None
    masks: List[Any] = field(default_factory=list)  # per-chunk (k, H, W) true masks, or None
    established: bool = False
    as_list: bool = False  # call the model with a list of images (torchvision detectors)

    def count(self) -> int:
        return sum(int(chunk.shape[0]) for chunk in self.images)

    def stacked(self) -> Tuple[torch.Tensor, Any]:
        images = torch.cat(self.images) if len(self.images) > 1 else self.images[0]
        if any(chunk is None for chunk in self.labels):
            return images, None
        if all(isinstance(chunk, np.ndarray) for chunk in self.labels):
            return images, np.concatenate(self.labels)
        return images, [item for chunk in self.labels for item in chunk]

    def regions(self) -> Tuple[Optional[list], Optional[np.ndarray]]:
        """The true boxes (a list) and masks (an array) of the pinned samples, each None
        unless every chunk had them."""
        boxes = None if any(c is None for c in self.boxes) else [b for c in self.boxes for b in c]
        masks = None if any(c is None for c in self.masks) else np.concatenate(self.masks)
        return boxes, masks


@dataclass
class _Capture:
    """What one ``capture()`` block saw: the kept rows of the target layer's output (``act``)
    and of the model's output, and how many samples the buffer still takes (``room``)."""

    key: Key
    room: Optional[int]
    act: Optional[torch.Tensor] = None
    more: Dict[str, torch.Tensor] = field(default_factory=dict)  # further layers' kept rows
    output: Any = None  # a tensor, or numpy detections (list of dicts)
    finder: Optional[LayerFinder] = None
    grid_finder: Optional[LayerFinder] = None  # reads the patch grid for a named token layer
    canvas: Optional[Canvas] = None  # a detector's padded batch, from its transform


class EigenCAMMonitor:
    """Logs EigenCAM overlays of a PyTorch model from a plain training loop.

    Args:
        model: The user's model (DDP / DataParallel / compiled wrappers are unwrapped).
        target_layer: A submodule, its dotted name, or None to pick, on the first captured
            forward pass, the last module whose output is an image feature map (4-D, the
            input's batch and geometry, ``h * w > 1``: a ResNet's ``layer4``; a detector's
            backbone's last stage), or the last token layer over its patch grid after it (a
            ViT); not a decoder (when the model upsamples after its coarsest map, the map
            before the upsampling is chosen, with one warning). The run tag says what was
            chosen (:attr:`target_layer_tag`).
        n_components: Principal components per sample (int), or the explained-variance
            fraction to reach (float in (0, 1)).
        n_samples: Samples kept per (mode, ds_id) per epoch; None keeps all (no pinning).
        label_mapping: Class index -> display name (mapping or sequence), or None.
        mode: Mode filter: None, ``"eval"``, ``{"eval", "test"}``, ``"!train"``...
        ds_id: Dataset-id filter, same grammar. ``capture()`` without a ``ds_id`` logs under
            the split's id (:data:`SPLIT_DS_IDS`: ``"train"``, ``"val"``, ``"test"``,
            ``"predict"``), as the Lightning callback and autolog do.
        reshape_transform: Callable ``tensor -> (B, C, h, w)`` for layers whose output is not
            a 4-D map or a square token grid.
        pin_samples: Show the first epoch's samples at every epoch (see module docstring).
        denormalize: ``(mean, std)`` per channel to undo the input normalisation before
            drawing; without it the renderer min-max normalises each image.
        logger: An :class:`~mlflow_eigencam.logger.EigenCAMLogger` to use instead of
            building one (then the logger arguments above and ``logger_kwargs`` are unused,
            and ``strict`` is the logger's).
        preds_from_output: When ``update()`` gets no ``preds``, use the model's own output of
            the captured forward pass (its first tensor, e.g. logits).
        faithfulness: Score each kept sample's map with the model (see the module docstring
            and docs/signals.md): True (fractions ``metrics.DEFAULT_FRACTIONS``), a sequence
            of fractions in (0, 1), or False (no extra forward).
        layers: Several layers explained side by side instead of one ``target_layer`` (not
            both): submodules or dotted names, e.g. ``["layer1", "layer4"]``, early first.
            One card row per layer; the first keeps the one-layer table columns and metrics,
            each further one gets its own (``layer4/evr_1``, docs/layers.md). Each layer's
            output is ``(B, C, h, w)`` or square tokens (``reshape_transform`` applies to
            every layer); the faithfulness pass runs once per layer.
        **logger_kwargs: Passed to ``EigenCAMLogger`` (``run_id``, ``colormap``, ``alpha``,
            ``log_every_n_epochs``, ``strict``, ...). ``strict=True`` also makes a model
            without a usable layer raise ``ValueError`` instead of warning once.

    Raises:
        TypeError / ValueError: Bad arguments (named in the message).
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: Union[nn.Module, str, None] = None,
        n_components: Union[int, float] = 3,
        n_samples: Optional[int] = 5,
        label_mapping: Any = None,
        mode: Any = "!train",
        ds_id: Any = None,
        reshape_transform: Optional[ReshapeTransform] = None,
        pin_samples: bool = True,
        denormalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        *,
        logger: Any = None,
        preds_from_output: bool = False,
        faithfulness: Union[bool, Sequence[float]] = True,
        layers: Optional[Sequence[Union[nn.Module, str]]] = None,
        **logger_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        target_layer, more_layers = _check_layers(target_layer, layers)
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError(
                f"reshape_transform must be callable or None, got {type(reshape_transform).__name__}"
            )
        if not isinstance(pin_samples, bool):
            raise TypeError(f"pin_samples must be a bool, got {pin_samples!r}")
        self._fractions: Optional[Tuple[float, ...]] = (
            DEFAULT_FRACTIONS if faithfulness is True else None if faithfulness is False
            else check_fractions(faithfulness))
        self._scoring = False  # inside the faithfulness forward: the monitor's hooks ignore it
        self._model = unwrap_model(model)
        self._reshape = reshape_transform
        self._grid_hw: Optional[Tuple[int, int]] = None  # patch grid found by auto-detection
        self._channels_last = False  # the layer outputs (B, h, w, C): permuted when hooked
        self._layout_error: Optional[str] = None  # a named 4-D layer whose layout is unclear
        # A named layer: its first captured forward also reads the patch grid (token layers).
        self._grid_pending = target_layer is not None and reshape_transform is None
        self._pin_enabled = pin_samples and n_samples is not None
        self._denorm = _parse_denormalize(denormalize)
        self._preds_from_output = bool(preds_from_output)
        self._target_name: Optional[str] = None
        self._target_detail = ""  # what auto-detection saw, for the run tag
        self._target: Optional[nn.Module] = None
        if target_layer is not None:
            self._target_name, self._target = resolve_target_layer(self._model, target_layer)
        #: The further layers of ``layers=[...]`` (name, module), after the first.
        self._more = [resolve_target_layer(self._model, layer) for layer in more_layers]
        names = [self._target_name] + [name for name, _ in self._more]
        if len(set(names)) < len(names):
            raise ValueError(f"layers names a layer twice: {names}")

        self._logger_args = dict(
            n_components=n_components,
            n_samples=n_samples,
            label_mapping=label_mapping,
            mode=mode,
            ds_id=ds_id,
            **logger_kwargs,
        )
        source = logger_kwargs if logger is None else {"strict": getattr(logger, "strict", False)}
        self._strict = bool(source.get("strict", False))
        self._logger: Any = logger
        self._logger_ready = False
        self._handles: List[Any] = []
        self._capture: Optional[_Capture] = None
        self._in_capture = False
        self._no_layer = False  # auto-detection found nothing: log nothing (warned once)
        self._seen: Dict[Key, None] = {}
        self._pins: Dict[Key, _Pin] = {}
        self._warn = WarnOnce()
        self._closed = False
        self._undelivered: int = 0  # what close() returned
        if rank_or_none(final=False) is not None:
            self._ensure_logger()

    # ----------------------------------------------------------------- public API

    @property
    def logger(self) -> Any:
        """The EigenCAMLogger (None on ranks other than 0)."""
        return self._ensure_logger()

    @property
    def target_layer(self) -> Optional[str]:
        """Dotted name of the hooked layer (None until auto-detection has run)."""
        return self._target_name

    @property
    def layers(self) -> List[str]:
        """Dotted names of the explained layers: ``layers=[...]``, or the one target layer
        (empty until auto-detection has run)."""
        return [] if self._target_name is None else [self._target_name] + [n for n, _ in self._more]

    @property
    def target_layer_tag(self) -> Optional[str]:
        """The run tag's value: the layer name, and for an automatic choice what was chosen
        (``"norm (auto: tokens (B, 197, 384) folded to a 14x14 patch grid ...)"``); the tag
        can be passed back as ``target_layer=``. Several layers: ``"layer1, layer4"``."""
        if self._target_name is None:
            return None
        if self._more:
            return ", ".join(self.layers)
        return f"{self._target_name} ({self._target_detail})" if self._target_detail else self._target_name

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run the images go to (None on ranks other than 0 or before logging)."""
        logger = self._ensure_logger()
        return None if logger is None else logger.run_id

    @contextlib.contextmanager
    def capture(self, mode: str = "eval", ds_id: Optional[str] = None) -> Iterator["EigenCAMMonitor"]:
        """Hook the target layer for the forward passes run inside the ``with`` block.

        Installs nothing when the (mode, ds_id) is filtered out, when this epoch's buffer is
        already full, when pinned samples will be re-run at epoch end, on ranks other than 0,
        when the model has no usable layer, or after ``close()``.

        Args:
            mode: One of ``"train"``, ``"eval"``, ``"test"``, ``"infer"``.
            ds_id: Dataset id (``"holdout"``, ``"val_noisy"``...); None: the split's id, as
                the Lightning callback and autolog write it (:data:`SPLIT_DS_IDS`: train ->
                ``"train"``, eval -> ``"val"``, test -> ``"test"``, infer -> ``"predict"``).

        Yields:
            The monitor (so ``with monitor.capture() as m: m.update(...)`` reads well).
        """
        self._open_capture(mode, ds_id)
        finished = False
        try:
            yield self
            finished = True
        finally:
            self._close_capture(user_error=not finished)

    def update(self, images: Any, labels: Any = None, preds: Any = None, *,
               boxes: Any = None, masks: Any = None) -> None:
        """Hand the captured batch's kept samples to the logger.

        Call inside ``capture()``, after the forward pass.

        Args:
            images: The model's input, float ``(B, C, H, W)`` (or ``(B, H, W)``) tensor, or
                a list of same-size ``(C, H, W)`` images (a torchvision detector; its map is
                then cropped to the cells over each resized image, not its padding).
            labels: Class indices ``(B,)``, one-hot / probabilities ``(B, K)``, strings,
                masks ``(B, H, W)`` (a segmenter's, docs/models.md), or None.
            preds: The model's output for the batch (logits ``(B, K)``, per-pixel
                ``(B, K, H, W)``, a dict read as its ``"out"`` / ``"logits"``...), or None.
            boxes: True regions of classification data, for ``localization`` /
                ``pointing_game`` (docs/signals.md): B entries of ``(n, 4)`` ``x1, y1, x2,
                y2`` pixels of ``images``, or None. Pinned with the samples.
            masks: True regions as ``(B, H, W)`` masks (nonzero inside), or None.

        Raises:
            ValueError: ``images`` of another shape; with ``strict=True``, a model without a
                usable layer.
        """
        cap = self._capture
        if cap is None:
            if not self._in_capture:
                self._warn.warn("outside", "EigenCAMMonitor.update() called outside capture(); ignored")
            return
        if cap.finder is not None:
            self._resolve_auto(cap)
        act, output = cap.act, cap.output
        cap.act, cap.output = None, None  # one forward, one update
        if self._no_layer:
            return
        if self._layout_error is not None:
            raise ValueError(self._layout_error)
        if act is None:
            self._warn.warn(
                "no-act",
                f"target layer {self._target_name!r} produced no output inside capture(); was "
                "the forward pass run before update()?",
            )
            return
        if preds is None and self._preds_from_output:
            preds = output
        images_t, as_list = images_as_batch(images)
        k = min(int(images_t.shape[0]), int(act.shape[0]))
        if cap.room is not None:
            k = min(k, cap.room)
        if k <= 0:
            return
        grid = tokens_to_grid(act[:k], self._reshape, self._grid_hw)
        more = self._more_grids(cap, k)
        if more is None:
            return
        inputs = images_t[:k].detach().to("cpu", copy=True)
        labels_k = to_numpy(labels, k)
        # Copies (a CPU tensor's numpy() shares its memory), kept with the pinned samples.
        boxes_k = None if boxes is None else [
            None if b is None else np.array(to_numpy(b, len(b)), dtype=np.float64)
            for b in list(boxes)[:k]]
        masks_k = None if masks is None else np.array(to_numpy(masks, k), copy=True)[:k]
        canvas, cap.canvas = cap.canvas, None
        self._log_cropped(cap.key, inputs, grid, labels_k, to_numpy(preds, k), canvas,
                          boxes=boxes_k, masks=masks_k, more=more)
        if cap.room is not None:
            # The rows the logger kept: none when it could not take the batch (it warned),
            # whose inputs are then never pinned nor re-run every epoch.
            room = self._logger.room(*cap.key)
            kept, cap.room = cap.room - (room or 0), room
            if kept > 0:
                self._remember_pinned(cap.key, inputs, labels_k, as_list, boxes_k, masks_k)

    def epoch_end(self, epoch: int, *, mode: Optional[str] = None,
                  train_epoch: Optional[float] = None) -> None:
        """Log every (mode, ds_id) seen since the last call as MLflow step ``epoch``.

        Pinned keys get their one extra forward pass here.

        Args:
            epoch: The step shown in MLflow (usually the 0-based epoch).
            mode: Only end the keys of this mode (Lightning ends train and eval separately).
            train_epoch: The framework's epoch when ``epoch`` is another step (the table's
                ``train_epoch`` column; see ``EigenCAMLogger.on_epoch_end``).
        """
        logger = self._ensure_logger()
        if logger is None or self._closed:
            return
        if mode is not None:
            _check_mode(mode)
        keys = [key for key in self._seen if mode is None or key[0] == mode]
        for key in keys:
            del self._seen[key]
            pin = self._pins.get(key)
            if pin is not None and pin.established and logger.should_log(epoch):
                self._forward_pinned(key, pin)
            logger.on_epoch_end(epoch, mode=key[0], ds_id=key[1], train_epoch=train_epoch)
            if pin is not None and not pin.established and pin.count() > 0:
                pin.established = True

    def begin_fit(self) -> Optional[int]:
        """A training phase starts (call it before its first epoch): when it counts epochs
        from 0 again in a run that holds logged epochs (two-phase fine-tuning), its steps
        continue after them; a resumed phase keeps its epochs. Returns the run's last logged
        step (None: none, or a rank other than 0). See ``EigenCAMLogger.begin_fit``."""
        logger = self._ensure_logger()
        return None if logger is None else logger.begin_fit()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait for pending uploads; True when everything was sent."""
        logger = self._ensure_logger()
        return True if logger is None else bool(logger.flush(timeout))

    def close(self, timeout: Optional[float] = None) -> int:
        """Remove any hook and close the logger (flushes it). Safe to call twice.

        Returns:
            What was not delivered, as the logger's ``close()`` returns it: an int (0 when
            everything arrived, and on ranks other than 0) that is a
            :class:`~mlflow_eigencam.sink.Undelivered` when the logger had something to send.
            A second call returns the first call's value.
        """
        self._remove_hooks(self._capture)
        self._capture = None
        if self._closed:
            return self._undelivered
        self._closed = True
        if self._logger_ready and self._logger is not None:
            self._undelivered = self._logger.close(timeout)
        return self._undelivered

    def __enter__(self) -> "EigenCAMMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- capture blocks

    def _open_capture(self, mode: str, ds_id: Optional[str]) -> None:
        """Check the arguments, decide whether this block hooks anything, and hook it."""
        _check_mode(mode)
        if ds_id is not None and not isinstance(ds_id, str):
            raise TypeError(f"ds_id must be a string or None, got {type(ds_id).__name__}")
        if self._capture is not None or self._in_capture:
            raise RuntimeError("monitor.capture() blocks cannot be nested")
        logger = self._ensure_logger()
        self._in_capture = True
        key: Key = (mode, SPLIT_DS_IDS[mode] if ds_id is None else ds_id)
        try:
            hook, room = self._room_for(logger, key)
            if hook:
                self._capture = _Capture(key=key, room=room)
                self._install_hooks(self._capture)
        except BaseException:  # a bad ds_id with strict=True: leave no hook and no open block
            self._close_capture(user_error=True)
            raise

    def _room_for(self, logger: Any, key: Key) -> Tuple[bool, Optional[int]]:
        """``(hook, room)``: whether a block of ``key`` hooks the model, and how many samples
        the logger still takes (None: no limit). Marks ``key`` as seen this epoch."""
        if logger is None or self._closed or self._no_layer or not logger.wants(*key):
            return False, None
        self._seen[key] = None
        pin = self._pins.get(key)
        if pin is not None and pin.established:
            return False, None  # re-run at epoch end: nothing to do per batch
        room = logger.room(*key)
        return room is None or room > 0, room

    def _close_capture(self, user_error: bool) -> None:
        """End a block: learn the layer from a forward that had no ``update()``, unhook."""
        cap = self._capture
        try:
            if cap is not None and cap.finder is not None:
                self._resolve_auto(cap, user_error=user_error)
        finally:
            self._remove_hooks(cap)
            self._capture = None
            self._in_capture = False

    # ----------------------------------------------------------------- hooks

    def _ensure_logger(self) -> Any:
        if self._logger_ready:
            return self._logger
        rank = rank_or_none()
        self._logger_ready = True
        if rank != 0:
            self._logger = None  # other ranks never build a logger nor communicate
            return None
        if self._logger is None:
            from mlflow_eigencam.logger import EigenCAMLogger

            kwargs = dict(self._logger_args)
            kwargs.setdefault("image_layout", "NCHW")
            kwargs.setdefault("channels_last", False)
            if self._target_name is not None:
                kwargs.setdefault("target_layer", self.target_layer_tag)
            self._logger = EigenCAMLogger(**kwargs)
        elif self._target_name is not None:
            self._logger.set_target_layer(self.target_layer_tag)
        if self._target_name is not None:
            _log.info("EigenCAM target layer: %s", self._target_name)
        return self._logger

    def _make_hook(self, cap: _Capture) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is None or self._scoring:
                return
            if tensor.ndim == 4 and cap.grid_finder is not None:
                self._read_layout(cap.grid_finder, tensor)
            if tensor.ndim == 4 and self._channels_last:
                tensor = tensor.permute(0, 3, 1, 2)
            cap.act = keep_rows(tensor, cap.room)
            if tensor.ndim == 3:
                self._read_patch_grid(cap.grid_finder, tensor)

        return hook

    def _make_more_hook(self, cap: _Capture, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None and not self._scoring:
                cap.more[name] = keep_rows(tensor, cap.room)

        return hook

    def _more_hooks(self, cap: _Capture) -> List[Any]:
        """Hooks on the further layers of ``layers=[...]`` (none with one layer)."""
        return [module.register_forward_hook(self._make_more_hook(cap, name))
                for name, module in self._more]

    def _more_grids(self, cap: _Capture, k: int) -> Optional[Dict[str, torch.Tensor]]:
        """The further layers' first ``k`` rows as ``(k, C, h, w)``; None (warned once) when
        one of them had no output in this forward."""
        more, cap.more = cap.more, {}
        missing = [name for name, _ in self._more if name not in more]
        if missing:
            self._warn.warn("no-more-act", f"layer(s) {missing} produced no output inside "
                            "capture(); no EigenCAM images of this batch")
            return None
        return {name: tokens_to_grid(more[name][:k], self._reshape) for name, _ in self._more}

    def _read_layout(self, finder: LayerFinder, tensor: torch.Tensor) -> None:
        """A named 4-D layer, on its first captured forward: channels-last ``(B, h, w, C)``
        (only that reading fits the input image: Swin's ``norm`` ``(B, 7, 7, 768)``) is
        permuted from now on; a shape both readings fit is refused by ``update()``."""
        image_hw = None if finder.input_shape is None else finder.input_shape[1:]
        layout = map_layout(tuple(tensor.shape), image_hw)
        self._channels_last = layout == "NHWC"
        if layout == "ambiguous":
            assert image_hw is not None
            self._layout_error = (
                f"target layer {self._target_name!r} outputs {tuple(tensor.shape)} on "
                f"{image_hw[0]}x{image_hw[1]} images: it reads as {tensor.shape[1]} channels on "
                f"a {tensor.shape[2]}x{tensor.shape[3]} map, or channels-last, {tensor.shape[3]} "
                f"channels on a {tensor.shape[1]}x{tensor.shape[2]} map. Pass "
                "reshape_transform=lambda t: t.permute(0, 3, 1, 2) for channels-last, or "
                "reshape_transform=lambda t: t for (B, C, h, w)")

    def _read_patch_grid(self, finder: Optional[LayerFinder], tokens: torch.Tensor) -> None:
        """A named token layer: fold onto the patch grid of the map before it (non-square
        inputs too), as auto-detection would."""
        if finder is None or finder.conv is None:
            return
        h, w = int(finder.conv[2].shape[2]), int(finder.conv[2].shape[3])
        if 0 <= int(tokens.shape[1]) - h * w <= MAX_EXTRA_TOKENS:
            self._grid_hw = (h, w)

    def _make_output_hook(self, cap: _Capture) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self._scoring:
                return
            boxes = detections(output)
            if boxes is not None:  # a detector's list of {"boxes", "labels", "scores"}
                cap.output = to_numpy(boxes, len(boxes) if cap.room is None else cap.room)
                return
            tensor = first_tensor(output)
            if tensor is not None and tensor.ndim >= 1:
                cap.output = keep_rows(tensor, cap.room)

        return hook

    def _make_canvas_hook(self, cap: _Capture) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            # The resized size of each image and the padded batch (sizes only, no tensor kept).
            if not self._scoring:
                cap.canvas = canvas_of(output)

        return hook

    def _install_hooks(self, cap: _Capture) -> None:
        transform = transform_of(self._model)
        if transform is not None:  # a detector: crop each map to its image (see update())
            self._handles.append(transform.register_forward_hook(self._make_canvas_hook(cap)))
        if self._target is None:
            cap.finder = LayerFinder(self._model, cap.room)
        else:
            if self._grid_pending:
                cap.grid_finder = LayerFinder(self._model, room=1)
            self._handles.append(self._target.register_forward_hook(self._make_hook(cap)))
            self._handles += self._more_hooks(cap)
        if self._preds_from_output:
            self._handles.append(self._model.register_forward_hook(self._make_output_hook(cap)))

    def _remove_hooks(self, cap: Optional[_Capture]) -> None:
        if cap is not None and cap.finder is not None:
            cap.finder.remove()
            cap.finder = None
        if cap is not None and cap.grid_finder is not None:
            cap.grid_finder.remove()
            if cap.grid_finder.called:
                self._grid_pending = False  # one forward pass told the grid (or that none)
            cap.grid_finder = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _resolve_auto(self, cap: _Capture, user_error: bool = False) -> None:
        """Turn the finder's observation into the target layer (first captured forward).

        No usable layer: warn once and log nothing from now on (``strict=True``: raise), but
        after a forward that raised (``user_error``) only look again at the next capture, so
        the user's own exception is never masked.
        """
        finder, cap.finder = cap.finder, None
        assert finder is not None
        finder.remove()
        if not finder.called:
            return  # no forward yet: look again at the next capture
        found = finder.result()
        model_name = type(self._model).__name__
        if found is None:
            if not user_error:
                self._no_layer_found(NO_LAYER_MESSAGE.format(model=model_name))
            return
        name, module, tensor = found
        self._target_name, self._target = name, module
        self._grid_hw = finder.token_grid()
        self._target_detail = finder.describe()
        _log.info("EigenCAM target layer: %s (%s)", name, self._target_detail)
        self._channels_last = finder.channels_last()
        note = finder.choice_warning(model_name)
        if note is not None:
            self._warn.warn("auto-layer", note, stacklevel=3)
        if self._logger is not None:
            self._logger.set_target_layer(self.target_layer_tag)
        cap.act = tensor  # copied by the finder when its hook ran, before any in-place op
        # Later forwards inside this same capture block use the real hook.
        self._handles.append(module.register_forward_hook(self._make_hook(cap)))

    def _no_layer_found(self, message: str) -> None:
        if self._strict:
            raise ValueError(message)
        self._no_layer = True
        self._seen.clear()  # nothing was kept: nothing to end
        self._warn.warn("no-layer", f"{message}. No EigenCAM images from this monitor; "
                        "training goes on (strict=True raises instead).", stacklevel=4)

    # ----------------------------------------------------------------- logging

    def _remember_pinned(self, key: Key, inputs: torch.Tensor, labels: Any, as_list: bool,
                         boxes: Optional[list] = None, masks: Optional[np.ndarray] = None) -> None:
        """The first epoch's kept inputs of ``key``, re-run at every later epoch end."""
        if not self._pin_enabled:
            return
        pin = self._pins.setdefault(key, _Pin())
        if not pin.established:
            pin.images.append(inputs)
            pin.labels.append(labels)
            pin.boxes.append(boxes)
            pin.masks.append(masks)
            pin.as_list = as_list  # a detector takes a list of (C, H, W) images

    def _images_for_logger(self, images: torch.Tensor) -> np.ndarray:
        """CPU inputs -> numpy NCHW for the renderer (float32, denormalised when asked)."""
        if images.ndim == 3:
            images = images.unsqueeze(1)  # (B, H, W) grayscale -> (B, 1, H, W)
        if images.dtype == torch.uint8:
            return images.numpy()
        images = images.float()
        if self._denorm is not None:
            mean, std = self._denorm
            if images.shape[1] != mean.shape[1] and mean.shape[1] != 1:
                raise ValueError(
                    f"denormalize has {mean.shape[1]} channels but images have {images.shape[1]}"
                )
            images = images * std + mean
        return images.numpy()

    def _forward_pinned(self, key: Key, pin: _Pin) -> None:
        """One quiet forward (no grad, eval, flags and RNG restored) on the pinned inputs;
        hand the result to the logger (its output is the faithfulness pass's clean row)."""
        if self._target is None:
            return
        images, labels = pin.stacked()
        cap = _Capture(key=key, room=None)
        model = self._model
        handles = [self._target.register_forward_hook(self._make_hook(cap))] + self._more_hooks(cap)
        transform = transform_of(model)
        if transform is not None:
            handles.append(transform.register_forward_hook(self._make_canvas_hook(cap)))
        try:
            with quiet_forward(model) as device:
                batch = images.to(device)
                output = model(list(batch) if pin.as_list else batch)
        except Exception as exc:  # a logging failure never stops training
            self._pins.pop(key, None)
            self._warn.warn(
                ("pin", key),
                f"EigenCAM: extra forward pass on pinned samples of {key} failed ({exc!r}); "
                "logging that key without pinning from now on",
            )
            self._pin_enabled = False
            return
        finally:
            for handle in handles:
                handle.remove()
        if cap.act is None:
            return
        grid = tokens_to_grid(cap.act, self._reshape, self._grid_hw)
        more = self._more_grids(cap, int(grid.shape[0]))
        if more is None:
            return
        preds = to_numpy(detections(output) or first_tensor(output), images.shape[0])
        boxes, masks = pin.regions()
        self._log_cropped(key, images, grid, labels, preds, cap.canvas, clean=first_tensor(output),
                          boxes=boxes, masks=masks, more=more)

    def _log_cropped(self, key: Key, images: torch.Tensor, grid: torch.Tensor, labels: Any,
                     preds: Any, canvas: Optional[Canvas], clean: Optional[torch.Tensor] = None,
                     boxes: Optional[list] = None, masks: Optional[np.ndarray] = None,
                     more: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Hand a batch to the logger, the map cropped to the images' own region of a
        detector's padded canvas (the whole map for other models). ``clean``: the model's
        eval-mode output on ``images`` when known (the pinned pass), so the faithfulness
        pass does not run them again. ``more``: the further layers' grids (``layers=``):
        the logger then gets ``{layer: activations}``, and faithfulness per layer."""
        if more:
            self._log_layers(key, images, grid, labels, preds, canvas, clean, boxes, masks, more)
            return
        cropped, extent = crop_to_images(grid, canvas)
        kwargs: Dict[str, Any] = {} if extent is None else {"map_extent": extent}
        if boxes is not None:
            kwargs["boxes"] = boxes
        if masks is not None:
            kwargs["masks"] = masks
        if canvas is None:  # a detector's padded batch is not scored
            scores = self._faithfulness(images, cropped, clean)
            if scores is not None:
                kwargs["faithfulness"] = scores
        self._logger.on_batch_end(
            self._images_for_logger(images),
            cropped.float().cpu().numpy(),
            labels,
            preds,
            mode=key[0],
            ds_id=key[1],
            **kwargs,
        )


    def _log_layers(self, key: Key, images: torch.Tensor, grid: torch.Tensor, labels: Any,
                    preds: Any, canvas: Optional[Canvas], clean: Optional[torch.Tensor],
                    boxes: Optional[list], masks: Optional[np.ndarray],
                    more: Dict[str, torch.Tensor]) -> None:
        """:meth:`_log_cropped` for several layers: ``{layer: activations}`` (the first layer
        first) and ``{layer: faithfulness scores}`` (one scoring pass per layer)."""
        assert self._target_name is not None
        grids = {self._target_name: grid, **more}
        kwargs: Dict[str, Any] = {"boxes": boxes, "masks": masks}
        acts, scores = {}, {}
        for name, g in grids.items():
            cropped, extent = crop_to_images(g, canvas)
            if extent is not None and name == self._target_name:
                kwargs["map_extent"] = extent
            if canvas is None:  # a detector's padded batch is not scored
                score = self._faithfulness(images, cropped, clean)
                if score is not None:
                    scores[name] = score
            acts[name] = cropped.float().cpu().numpy()
        if scores:
            kwargs["faithfulness"] = scores
        self._logger.on_batch_end(self._images_for_logger(images), acts, labels, preds,
                                  mode=key[0], ds_id=key[1], **kwargs)

    def _faithfulness(self, images: torch.Tensor, grid: torch.Tensor,
                      clean: Optional[torch.Tensor] = None) -> Optional[np.ndarray]:
        """Per-sample faithfulness of the PC1 maps of ``grid`` ``(n, C, h, w)`` on the CPU
        inputs ``images`` ``(n, C, H, W)``: one quiet forward of ``(1 + 2F) n`` images
        (``metrics.perturbed_batch``), ``2F n`` when ``clean`` (the eval-mode output on
        ``images``, ``(n, K)``) is given. None when off, not a float image batch, or the
        output is not class scores; a failure warns once and turns it off."""
        if (self._fractions is None or images.ndim != 4 or not images.is_floating_point()
                or getattr(self._logger, "n_samples", None) is None):  # streaming: every sample
            return None
        try:
            if clean is not None and clean.ndim != 2:
                self._fractions = None  # not class scores (a segmenter's): never pay it again
                return None
            x = images.float().numpy()
            with _lapack_threads(0):  # the logger's map: PC1 of the same activations
                maps = eigencam(grid.float().cpu().numpy(), 1).maps
            if maps.shape[1] == 0:
                return None
            h, w = x.shape[2:]
            heat = np.stack([upsample(m, h, w) for m in maps[:, 0]])
            n = x.shape[0]
            reuse = clean is not None and clean.ndim == 2 and int(clean.shape[0]) == n
            batch = torch.from_numpy(perturbed_batch(x, heat, self._fractions)[n if reuse else 0:])
            self._scoring = True
            try:
                with quiet_forward(self._model) as device:
                    out = first_tensor(self._model(batch.to(device=device, dtype=images.dtype)))
            finally:
                self._scoring = False
            if out is None or out.ndim != 2:
                self._fractions = None  # not class scores (a segmenter's): never pay it again
                return None
            if reuse:
                assert clean is not None
                out = torch.cat([clean.detach().to(out.device, out.dtype), out])
            return faithfulness_scores(out.detach().float().cpu().numpy(), n)
        except Exception as exc:  # a logging failure never stops training (as the pinned pass)
            self._fractions = None
            self._warn.warn("faithfulness", f"EigenCAM: the faithfulness pass failed ({exc!r}); "
                            "not scoring faithfulness from now on", stacklevel=4)
            return None


def _check_layers(target_layer: Any, layers: Any) -> Tuple[Any, List[Any]]:
    """``(first layer or None, further layers)`` of ``target_layer=`` / ``layers=``.

    Raises:
        ValueError: both given, or ``layers`` empty; TypeError: ``layers`` not a sequence.
    """
    if layers is None:
        return target_layer, []
    if target_layer is not None:
        raise ValueError(f"give target_layer= (one layer) or layers= (several), not both: got "
                         f"target_layer={target_layer!r} and layers={layers!r}")
    if isinstance(layers, (str, nn.Module)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of modules or dotted names, got {layers!r}")
    if not layers:
        raise ValueError("layers must name at least one layer, got an empty list")
    return layers[0], list(layers[1:])


def _check_mode(mode: Any) -> None:
    from mlflow_eigencam.filters import MODES

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _parse_denormalize(
    denormalize: Optional[Tuple[Sequence[float], Sequence[float]]],
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    if denormalize is None:
        return None
    try:
        mean, std = denormalize
    except (TypeError, ValueError):
        raise TypeError(f"denormalize must be (mean, std), got {denormalize!r}") from None
    mean_t = torch.as_tensor(np.atleast_1d(np.asarray(mean, dtype=np.float32)))
    std_t = torch.as_tensor(np.atleast_1d(np.asarray(std, dtype=np.float32)))
    if mean_t.ndim != 1 or std_t.ndim != 1 or mean_t.shape != std_t.shape:
        raise ValueError(
            f"denormalize mean and std must be equal-length sequences, got {mean!r} and {std!r}"
        )
    if not torch.all(torch.isfinite(mean_t)) or not torch.all(std_t > 0):
        raise ValueError(f"denormalize needs finite means and positive stds, got {mean!r}, {std!r}")
    return mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1)
