"""Ultralytics YOLO integration: :class:`EigenCAMCallback`, callbacks for a YOLO ``train()``.

    model = YOLO("yolov8n.yaml")
    EigenCAMCallback().register(model)          # or mlflow_eigencam.autolog()
    model.train(data="data.yaml", epochs=10)

What it logs, and where:

* the run: the one Ultralytics' own MLflow callback uses (it starts it, or reuses the active
  run, in ``on_pretrain_routine_end``; this callback builds its logger in ``on_train_start``,
  after that, and takes the active run). With Ultralytics' MLflow integration off, the active
  run, else a run of its own (ended when training ends);
* the step: ``trainer.epoch``, the step Ultralytics logs ``metrics/mAP50(B)`` and the losses
  at, so the image slider and the metric charts agree;
* the images: the first ``n_samples`` images of the validation set, pinned for the whole run,
  each as the model sees it (long side resized to ``imgsz``, as the validator's dataset does)
  without the letterbox padding, with the predicted boxes (after NMS: class name and
  confidence) and the true boxes drawn. An image with no detection (or no true box) logs too.
* ``final_eval``: after the last epoch Ultralytics validates ``best.pt`` and calls
  ``on_fit_epoch_end`` once more with ``trainer.epoch + 1``. That call is skipped (no image
  at that step): the weights it evaluates are not the model this callback explains
  (``trainer.ema.ema``), and an extra step would read as one more epoch on the slider.

How (nothing per training batch). Every task but classify, with the default fused layers:
in ``on_val_start`` of an epoch that logs, forward hooks on the chosen layers and on the model
the validator evaluates (``trainer.ema.ema``) keep the pinned images' rows of the
validator's own forward (its loader is not shuffled: the k-th image it yields is the
dataset's k-th); ``on_val_end`` removes them, and ``on_fit_epoch_end`` explains those rows:
no extra forward pass. Each image is found in the validator's centred letterbox canvas
(checked pixel for pixel) and the fused map, resized to the canvas, is cropped to it. When
that is not possible (``val=False``, a pinned image not found, one layer whose ``(C, h, w)``
maps cannot be cropped off the cell grid, or classification, whose validation loader
Ultralytics shuffles) the pinned images go through ``trainer.ema.ema`` once more, padded at
the bottom right to the model's stride, under ``torch.no_grad()`` in eval mode with the
random state forked and hooks that exist only during that pass. Every module's attributes
(its ``training`` flag, the detection head's cached anchors and input shape) are put back
afterwards, so training, validation, the EMA and ``results.csv`` are the same with or
without the callback (``tests/yolo`` checks this with ``deterministic=True``).

Layers and the fusion rule. By default the inputs of the detection head
(``model.model[-1].f``: the P3, P4 and P5 maps, strides 8, 16, 32), each level selectable by
its module index (``layers=[15]`` for P3 of ``yolov8n``, ``layers=9`` for the SPPF output).
One layer is plain EigenCAM (``n_components`` components). Several are fused into one map:

1. each level's PC1 map (EigenCAM of that level alone, sign-fixed) is ReLU'd and scaled to a
   maximum of 1 per image;
2. upsampled (bilinear) to the finest level's grid;
3. the per-pixel maximum over the levels is the fused map, logged as the card's one
   component (its "explained variance" is 100 % by construction: read it as "fused").

Why the maximum of per-level maps: each level detects objects of its own size (P3 small, P5
large), so an object should light up if any level sees it, and a mean would halve the heat
of an object only one level responds to. Why not one EigenCAM of the levels' activations
concatenated (each scaled to equal variance): it was tried, and a coarse level (P5 is 2 x 2
cells at ``imgsz=64``) has so few distinct cells that its variance sits in one or two
directions, so it takes over the joint PC1. Measured on 7 validation images of the tests'
shapes after one epoch (mean heat inside the true box over mean heat outside, before the
logger's centring): the concatenation put it off the objects (ratio < 1) on 5 of 7, the
maximum on 1 of 7 (P3 alone: 0 of 7; P5 alone: 5 of 7). At ``imgsz=64`` the deeper levels
also respond to the edge of the letterbox padding, which the maximum keeps.

Tasks:

* ``detect``: as above.
* ``segment``: the Segment head is a Detect head with mask coefficients: its inputs P3-P5
  fused, as ``detect``; the card shows the predicted masks and, over them, the predicted
  boxes (class name and confidence). Predicted: after NMS, each kept detection's mask
  (coefficients x the head's prototypes, upsampled to the input, cropped to its box:
  Ultralytics' ``process_mask``), the letterbox taken off as for the boxes, overlaps going
  to the most confident. True: the label's polygons, filled at the image's size (not the
  validator's masks, which are a quarter of it). YOLO class ``c`` is mask class ``c + 1``
  (the boxes' classes too), class 0 the background (``_ultralytics_outputs``); the table
  gets ``iou``, ``classes`` and ``n_boxes``, and ``localization`` scores the map on the
  true mask.
* ``classify``: the pinned images are spread evenly over the validation set (an ImageFolder
  lists its images class by class, so the first ones would be one class), each as the
  validator sees it (``imgsz`` square, resized and centre-cropped); default layer: the input
  of the Classify head (the last feature map, ``model.model[-1].f``); label: the true class,
  prediction: the top class, and its probability as ``pred_scores`` (the head's own softmax
  output, taken as it is). ``faithfulness`` (docs/signals.md): one more batched forward of
  the perturbed pinned images, the clean row reused from the pinned pass.
* ``pose``: the Pose head is a Detect head with keypoints: as ``detect`` (boxes with class
  name and confidence, true boxes in white); the keypoints are not drawn (the core's boxes
  carry none).
* ``obb``: the OBB head is a Detect head with an angle: its boxes after Ultralytics' rotated
  NMS (the OBB validator's), each drawn as its upright hull, the smallest axis-aligned box
  that holds its four corners (the core draws upright boxes only); the true boxes likewise,
  from the label's four corners (Ultralytics' own ``bboxes`` of an OBB label).

Other tasks warn once, naming the task, and log nothing. Multi-GPU (DDP) training runs in
subprocesses that do not get this callback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import WarnOnce
from ._ultralytics_outputs import detections, obb_hulls, predicted_mask, proto_of, true_mask, with_background
from ..metrics import DEFAULT_FRACTIONS, check_fractions

_log = logging.getLogger("mlflow_eigencam")

__all__ = ["EigenCAMCallback", "autolog_add_callback"]

MODE = "eval"
#: The trainer events the callback listens to (``register`` adds one function for each).
EVENTS = ("on_train_start", "on_train_epoch_end", "on_val_start", "on_val_end", "on_fit_epoch_end",
          "on_train_end", "teardown")
#: The tasks it logs (``trainer.args.task``): boxes for all but ``segment`` (masks) and
#: ``classify`` (a class).
TASKS = ("detect", "segment", "classify", "pose", "obb")
#: Ultralytics' letterbox grey.
PAD_VALUE = 114

Layers = Union[int, Sequence[int], None]


class EigenCAMCallback:
    """EigenCAM overlays of pinned validation images at every epoch of a YOLO ``train()``.

    Args:
        layers: Module indices in ``model.model`` whose outputs are explained (one int or a
            sequence, fused as the module docstring says); None: the head's inputs
            (``model.model[-1].f``: P3-P5 of a Detect or Segment head, the last feature map
            of a Classify head).
        n_components: Principal components per image (int >= 1, or a float in (0, 1)) when
            one layer is explained; a fused map of several levels is one component.
        n_samples: Validation images pinned and logged at every epoch (the first ones of the
            validation set).
        conf: Confidence threshold of the drawn boxes (Ultralytics' ``predict`` default).
        iou: IoU threshold of the NMS.
        max_det: Most predicted boxes drawn per image.
        label_mapping: Class names (``{name: index}`` or a sequence); default the model's
            ``names``. For ``segment``, in YOLO's indices: shifted by one, ``"background"``
            taking mask class 0.
        ds_id: Dataset id of the logged images (keys ``eigencam/eval/<ds_id>/...``).
        faithfulness: Score each classification map with the model (docs/signals.md): True
            (the default fractions), a sequence of fractions in (0, 1), or False. Not for
            detection and segmentation (their outputs are not class scores).
        **logger_kwargs: Passed to :class:`~mlflow_eigencam.logger.EigenCAMLogger`
            (``mode``, ``run_id``, ``colormap``, ``alpha``, ``log_every_n_epochs``, ...).

    Raises:
        TypeError / ValueError: Bad arguments, named in the message (the logger's too).
    """

    def __init__(
        self,
        layers: Layers = None,
        n_components: Union[int, float] = 3,
        n_samples: int = 5,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 20,
        label_mapping: Union[Mapping[str, Any], Sequence[str], None] = None,
        ds_id: Optional[str] = "val",
        faithfulness: Union[bool, Sequence[float]] = True,
        **logger_kwargs: Any,
    ) -> None:
        self._layers: Optional[Tuple[int, ...]] = _check_layers(layers)
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1 (the pinned validation images), got {n_samples!r}")
        for name, value in (("conf", conf), ("iou", iou)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(max_det, bool) or not isinstance(max_det, numbers.Integral) or max_det < 1:
            raise ValueError(f"max_det must be an int >= 1, got {max_det!r}")
        if ds_id is not None and not isinstance(ds_id, str):
            raise TypeError(f"ds_id must be a string or None, got {ds_id!r}")
        self._fractions: Optional[Tuple[float, ...]] = (
            DEFAULT_FRACTIONS if faithfulness is True else None if faithfulness is False
            else check_fractions(faithfulness))
        for key in ("image_layout", "target_layer"):
            if key in logger_kwargs:
                raise TypeError(f"{key} is set by the YOLO callback; use layers= to choose layers")
        from ..logger import EigenCAMLogger

        # The logger's own checks now, not when training starts (it is built then, in the run
        # Ultralytics' MLflow callback has opened).
        EigenCAMLogger(n_components=n_components, n_samples=n_samples, label_mapping=label_mapping,
                       **logger_kwargs).close()
        self.n_components: Union[int, float] = n_components
        self.n_samples: int = int(n_samples)
        self.conf: float = float(conf)
        self.iou: float = float(iou)
        self.max_det: int = int(max_det)
        self.label_mapping: Union[Mapping[str, Any], Sequence[str], None] = label_mapping
        self.ds_id: Optional[str] = ds_id
        self._logger_kwargs: Dict[str, Any] = dict(logger_kwargs)
        self._logger: Any = None
        self._pins: Optional[List[_Pin]] = None
        self._train_epoch: Optional[int] = None
        self._task: str = "detect"
        self._trainer: Any = None
        self._seen: Optional[_Seen] = None  # what the validator's forward showed this epoch
        self._layer_tag: Optional[str] = None
        self._warn: WarnOnce = WarnOnce()
        self._handles: List[Any] = []

    # ----------------------------------------------------------------- wiring

    @property
    def callbacks(self) -> Dict[str, Callable[[Any], None]]:
        """``{event: function}`` for ``model.add_callback(event, function)``."""
        return {event: getattr(self, event) for event in EVENTS}

    def register(self, model: Any) -> "EigenCAMCallback":
        """Add the callback's functions to a ``YOLO`` model (or a trainer): ``model.add_callback``."""
        if not callable(getattr(model, "add_callback", None)):
            raise TypeError(f"register() needs an Ultralytics model or trainer (with add_callback), "
                            f"got {type(model).__name__}")
        for event, fn in self.callbacks.items():
            model.add_callback(event, fn)
        return self

    def unregister(self, model: Any) -> None:
        """Remove what :meth:`register` added (from ``model.callbacks``)."""
        table = getattr(model, "callbacks", {})
        for event, fn in self.callbacks.items():
            fns = table.get(event, [])
            while fn in fns:
                fns.remove(fn)

    @property
    def logger(self) -> Any:
        """The :class:`~mlflow_eigencam.logger.EigenCAMLogger` (None before training starts)."""
        return self._logger

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run the images go to (None before training starts)."""
        return None if self._logger is None else self._logger.run_id

    @property
    def target_layer_tag(self) -> Optional[str]:
        """The run tag: the layers and the fusion (None before the first logged epoch)."""
        return self._layer_tag

    # ----------------------------------------------------------------- events

    def on_train_start(self, trainer: Any) -> None:
        """Build the logger in the run Ultralytics' MLflow callback has started (or the active
        one); pin the validation images. Bad ``layers`` raise here, before the first epoch."""
        self._train_epoch = None
        self._trainer = trainer
        if not _is_main_rank():
            return
        task = getattr(trainer.args, "task", "detect")
        if task not in TASKS:
            self._warn.warn(("task", task), f"the YOLO EigenCAM callback supports the tasks {TASKS}, "
                            f"not {task!r}: nothing is logged")
            return
        self._task = task
        model = _explained_model(trainer)
        indices = self._layer_indices(model)  # a bad index fails now
        if self._logger is None:
            from ..logger import EigenCAMLogger

            names = getattr(model, "names", None) or trainer.data.get("names")
            mapping = self.label_mapping
            if mapping is None and isinstance(names, Mapping):
                mapping = [str(names[k]) for k in sorted(names)]
            elif mapping is None and names:
                mapping = [str(n) for n in names]
            if task == "segment" and mapping is not None:
                mapping = with_background(mapping)  # mask class 0 is the background
            # A fused map of several levels is one channel: one component.
            n_components = self.n_components if len(indices) == 1 else 1
            self._logger = EigenCAMLogger(n_components=n_components, n_samples=self.n_samples,
                                          label_mapping=mapping, image_layout="NHWC",
                                          **self._logger_kwargs)
        try:
            dataset = trainer.test_loader.dataset
            if task == "classify":
                self._pins = _pin_classify(dataset, self.n_samples)
            else:
                stride = int(max(float(v) for v in getattr(model, "stride", [32])))
                self._pins = _pin(dataset, self.n_samples, stride, masks=task == "segment")
        except Exception as exc:  # never break training over the images to show
            self._pins = None
            self._failed(exc, "reading the validation images")

    def on_train_epoch_end(self, trainer: Any) -> None:
        """Remember which epoch trained (``final_eval``'s ``on_fit_epoch_end`` has none)."""
        self._train_epoch = int(trainer.epoch)

    def on_val_start(self, validator: Any) -> None:
        """Before the validation of an epoch that logs: hooks that keep the pinned images'
        rows of the validator's own forward (its inputs, the layers' maps, the outputs), so
        the epoch's images need no extra forward pass. Validations of other weights
        (``final_eval``, ``model.val()``) are left alone."""
        self._seen = None
        trainer, logger = self._trainer, self._logger
        if (logger is None or not self._pins or trainer is None or not getattr(validator, "training", False)
                or self._train_epoch != int(trainer.epoch)):
            return
        try:
            if not logger.wants(MODE, self.ds_id) or not logger.should_log(int(trainer.epoch)):
                return
            model = _explained_model(trainer)
            indices = self._layer_indices(model)
            # The callback's own forward instead: for one layer of a letterboxed detector (its
            # (C, h, w) maps cannot be cropped to an image placed off the cell grid), and for
            # classification (Ultralytics shuffles its validation loader: no row is known).
            if self._task == "classify" or len(indices) == 1:
                return
            self._seen = _Seen([pin.index for pin in self._pins], indices)
            self._handles = self._seen.hook(model)
        except Exception as exc:
            self._remove_hooks()
            self._seen = None
            self._failed(exc, "hooking the validation")

    def on_val_end(self, validator: Any) -> None:
        """Remove the validation hooks."""
        self._remove_hooks()

    def on_fit_epoch_end(self, trainer: Any) -> None:
        """Log the pinned images at ``step = trainer.epoch``; skip ``final_eval``'s call."""
        if self._logger is None or not self._pins or self._train_epoch != int(trainer.epoch):
            return  # not detecting, no images, or final_eval on best.pt (epoch + 1)
        epoch = int(trainer.epoch)
        logger = self._logger
        if not logger.wants(MODE, self.ds_id) or not logger.should_log(epoch):
            return
        try:
            self._log_epoch(trainer, epoch)
        except Exception as exc:
            logger.discard(MODE, self.ds_id)
            self._failed(exc, f"logging epoch {epoch}")

    def on_train_end(self, trainer: Any) -> None:
        """Close the logger (waits for the upload; ends only a run it started)."""
        self._close()

    def teardown(self, trainer: Any) -> None:
        """Ultralytics' last event, also after a failure: hooks and logger closed."""
        self._close()

    # ----------------------------------------------------------------- work

    def _close(self) -> None:
        self._remove_hooks()
        self._seen = self._trainer = None
        logger, self._logger = self._logger, None
        self._pins = None
        if logger is not None:
            logger.close()

    def _failed(self, exc: Exception, what: str) -> None:
        if self._logger is not None and self._logger.strict:
            raise exc
        self._warn.warn(("failed", what.split(" ")[0]),
                        f"the YOLO EigenCAM callback failed {what} ({type(exc).__name__}: {exc}); "
                        "training goes on")

    def _layer_indices(self, model: nn.Module) -> List[int]:
        blocks: Any = model.model  # Ultralytics' nn.Sequential of blocks
        head = blocks[-1]
        if self._layers is None:
            f = getattr(head, "f", None)
            # Ultralytics' "from": -1 is the module before the head (the Classify head's input).
            indices = [k + len(blocks) - 1 if k < 0 else k for k in ([f] if isinstance(f, int) else list(f or []))]
            if not indices:
                raise ValueError(f"the model's last module ({type(head).__name__}) has no inputs "
                                 "'f'; pass layers= (module indices in model.model)")
        else:
            indices = list(self._layers)
        out = []
        for i in indices:
            j = i + len(blocks) if i < 0 else i
            if not 0 <= j < len(blocks) - 1:
                raise ValueError(f"layers: index {i} is not a module of model.model before the head "
                                 f"(0..{len(blocks) - 2})")
            out.append(j)
        return out

    def _log_epoch(self, trainer: Any, epoch: int) -> None:
        model = _explained_model(trainer)
        indices = self._layer_indices(model)
        pins = self._pins or []
        seen, self._seen = self._seen, None
        self._remove_hooks()
        batches = seen.batches(pins) if seen is not None else None
        if batches is None:  # no validation this epoch, or a pin not found in it: our own forward
            batches = []
            groups: Dict[Tuple[int, ...], List[int]] = {}
            for i, pin in enumerate(pins):
                groups.setdefault(pin.canvas.shape, []).append(i)
            for members in groups.values():
                x = _inputs(model, [pins[i] for i in members])
                acts, out = self._forward(model, x, indices)
                batches.append(_Batch(members, x, acts, _first(out), [(0, 0)] * len(members), proto_of(out)))
        # Per pin: the map (1, C, h, w) and what on_batch_end gets besides.
        results: Dict[int, Tuple[np.ndarray, Dict[str, Any]]] = {}
        for b in batches:
            group = [pins[i] for i in b.members]
            fused, tag = _fuse(b.acts, indices, b.x.shape[-1])
            if tag != self._layer_tag:
                self._layer_tag = tag
                self._logger.set_target_layer(tag)
            if self._task == "classify":
                probs = b.y.detach().float().cpu().numpy()  # (n, K) probabilities
                scores = self._faithfulness(model, b.x, fused, probs)
                for j, i in enumerate(b.members):
                    # The Classify head's eval output is already softmaxed: its top value is
                    # the card's and the table's confidence as it is (no second softmax).
                    extra: Dict[str, Any] = {"preds": probs[j:j + 1], "pred_scores": probs[j:j + 1].max(axis=1)}
                    if scores is not None:
                        extra["faithfulness"] = scores[j:j + 1]
                    results[i] = (fused[j:j + 1], extra)
                continue
            kept = self._nms(model, b.y)
            dets = detections(kept, [pin.image.shape[:2] for pin in group], b.offsets)
            for j, (i, pin) in enumerate(zip(b.members, group)):
                h, w = pin.image.shape[:2]
                top, left = b.offsets[j]
                pred: Any = [dets[j]]
                if self._task == "segment":
                    if b.proto is None:
                        raise ValueError("the segmentation model's output has no mask prototypes")
                    # Boxes and masks on one card; YOLO class c is mask class c + 1 (the names
                    # start with "background"), for the boxes' names too.
                    pred = [dict(dets[j], labels=dets[j]["labels"] + 1, mask=predicted_mask(
                        b.proto[j], kept[j], b.x.shape[-2:], (top, left), (h, w)))]
                if (top, left) == (0, 0):  # the image at the top left of the map: the card crops
                    results[i] = (fused[j:j + 1], {"preds": pred, "map_extent": (
                        h / b.x.shape[-2], w / b.x.shape[-1])})
                else:  # centred in the validator's letterbox: the fused map cropped to the image
                    full = _resize(fused[j:j + 1], b.x.shape[-2:])
                    results[i] = (np.ascontiguousarray(full[:, :, top:top + h, left:left + w]),
                                  {"preds": pred})
        for i, pin in enumerate(pins):  # in pin order: sample indices stay put
            fused_i, extra = results[i]
            self._logger.on_batch_end(pin.image[None], fused_i, labels=[pin.truth], mode=MODE,
                                      ds_id=self.ds_id, **extra)
        self._logger.on_epoch_end(epoch, mode=MODE, ds_id=self.ds_id)

    def _forward(self, model: nn.Module, x: torch.Tensor,
                 indices: List[int]) -> Tuple[List[torch.Tensor], Any]:
        """One quiet forward of the pinned inputs ``x`` with hooks on ``indices``: the
        captured maps (float32, on the model's device) and the model's eval-mode output."""
        captured: Dict[int, torch.Tensor] = {}

        def hook_for(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor) and output.ndim == 4:
                    captured[index] = output.detach().float()
            return hook

        blocks: Any = model.model  # Ultralytics' nn.Sequential of blocks
        with _quiet(model):
            try:
                self._handles = [blocks[i].register_forward_hook(hook_for(i)) for i in indices]
                out = model(x)
            finally:
                self._remove_hooks()
        missing = [i for i in indices if i not in captured]
        if missing:
            raise ValueError(f"layers {missing} gave no (B, C, h, w) feature map in the forward pass")
        return [captured[i] for i in indices], out

    def _nms(self, model: nn.Module, y: torch.Tensor) -> List[torch.Tensor]:
        """The inference output ``y`` after NMS, per image: ``(n, 6 + extra)`` rows of xyxy in
        canvas pixels, confidence, class and a segmentation model's mask coefficients (a pose
        model's keypoints); an OBB model's rows are ``(n, 6)``, each rotated box's upright hull
        (:func:`_ultralytics_outputs.obb_hulls`)."""
        from ultralytics.utils.nms import non_max_suppression

        blocks: Any = model.model  # Ultralytics' nn.Sequential of blocks
        head = blocks[-1]
        nc = int(getattr(head, "nc", 0) or len(getattr(model, "names", {}) or {}))
        rotated = self._task == "obb"
        with torch.no_grad():
            kept = list(non_max_suppression(y, self.conf, self.iou, max_det=self.max_det, nc=nc,
                                            end2end=bool(getattr(head, "end2end", False)), rotated=rotated))
        # The OBB validator's NMS (rotated IoU), then each kept box as its upright hull.
        return [obb_hulls(k) for k in kept] if rotated else kept

    def _faithfulness(self, model: nn.Module, x: torch.Tensor, fused: np.ndarray,
                      probs: np.ndarray) -> Optional[np.ndarray]:
        """Per-pin faithfulness (docs/signals.md) of a classifier: the PC1 maps of ``fused``
        (what the logger draws) rank the pixels of ``x`` ``(n, 3, H, W)``; one quiet forward
        of the ``2F n`` perturbed images, the clean row being ``probs`` ``(n, K)``. None when
        off; a failure warns once and turns it off."""
        if self._fractions is None:
            return None
        try:
            from ..eigencam import eigencam
            from ..metrics import faithfulness_scores, perturbed_batch, upsample

            maps = eigencam(fused, 1).maps  # the logger's PC1: the same activations, the same math
            if maps.shape[1] == 0:
                return None
            n, (h, w) = x.shape[0], x.shape[2:]
            heat = np.stack([upsample(m, h, w) for m in maps[:, 0]])
            batch = perturbed_batch(x.float().cpu().numpy(), heat, self._fractions)[n:]
            with _quiet(model):
                out = _first(model(torch.from_numpy(batch).to(device=x.device, dtype=x.dtype)))
            rows = np.concatenate([probs, out.float().cpu().numpy()])
            return faithfulness_scores(rows, n, probabilities=True)
        except Exception as exc:  # a logging failure never stops training
            self._fractions = None
            self._warn.warn("faithfulness", f"the YOLO EigenCAM callback's faithfulness pass failed "
                            f"({type(exc).__name__}: {exc}); not scoring faithfulness from now on")
            return None

    def _remove_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- helpers



class _Pin:
    """One pinned validation image: ``image`` (h, w, 3) uint8 RGB at the model's scale,
    ``canvas`` (H, W, 3) the same image padded at the bottom and right to multiples of the
    model's largest stride (the map's extent),
    ``truth`` its true boxes ``{"boxes": (n, 4) xyxy pixels of image, "labels": (n,)}``, for
    a segmenter its ``(h, w)`` int32 class mask (``_ultralytics_outputs.true_mask``), or for a
    classifier its class index."""

    def __init__(self, image: np.ndarray, canvas: np.ndarray,
                 truth: Union[Dict[str, np.ndarray], np.ndarray, int], index: int = 0) -> None:
        self.image, self.canvas, self.truth, self.index = image, canvas, truth, index


class _Batch:
    """Pinned images explained together: ``members`` (their places in the pin list), ``x``
    ``(n, 3, H, W)`` the model's inputs, ``acts`` one ``(n, C, h, w)`` float32 map per layer,
    ``y`` ``(n, ...)`` the inference output (boxes, or class probabilities), ``offsets``
    each image's ``(top, left)`` in its canvas, ``proto`` a Segment head's mask prototypes
    ``(n, nm, mh, mw)`` (None for other heads)."""

    def __init__(self, members: List[int], x: torch.Tensor, acts: List[torch.Tensor], y: torch.Tensor,
                 offsets: List[Tuple[int, int]], proto: Optional[torch.Tensor] = None) -> None:
        self.members, self.x, self.acts, self.y, self.offsets = members, x, acts, y, offsets
        self.proto = proto


class _Seen:
    """The pinned images' rows of the validator's own forward passes in one validation.

    The validation loader is not shuffled, so the ``k``-th image it yields is dataset item
    ``k``; hooks on the layers and on the model keep the rows of the pinned items (copies
    of ``n`` rows, detached), nothing else."""

    def __init__(self, wanted: Sequence[int], indices: List[int]) -> None:
        self.wanted, self.indices = set(wanted), indices
        self.rows: Dict[int, Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]] = {}
        self._offset = 0
        self._latest: Dict[int, torch.Tensor] = {}

    def hook(self, model: nn.Module) -> List[Any]:
        """Forward hooks on the layers and the model; returns their handles."""
        blocks: Any = model.model  # Ultralytics' nn.Sequential of blocks

        def layer_hook(index: int) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor) and output.ndim == 4:
                    self._latest[index] = output
            return hook

        def model_hook(module: nn.Module, inputs: Any, output: Any) -> None:
            x = inputs[0] if inputs else None
            latest, self._latest = self._latest, {}
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                return
            start, self._offset = self._offset, self._offset + int(x.shape[0])
            y, proto = _first(output), proto_of(output)
            for r in range(int(x.shape[0])):
                if start + r in self.wanted and all(i in latest for i in self.indices):
                    self.rows[start + r] = (x[r].detach().float().clone(),
                                            [latest[i][r].detach().float().clone() for i in self.indices],
                                            y[r].detach().float().clone(),
                                            None if proto is None else proto[r].detach().float().clone())

        handles = [blocks[i].register_forward_hook(layer_hook(i)) for i in self.indices]
        handles.append(model.register_forward_hook(model_hook))
        return handles

    def batches(self, pins: Sequence["_Pin"]) -> Optional[List[_Batch]]:
        """The pins as batches (one per canvas shape), each image found in its canvas; None
        when a pin is missing or its pixels are not where the letterbox puts them."""
        groups: Dict[Tuple[int, ...], List[int]] = {}
        offsets: Dict[int, Tuple[int, int]] = {}
        for k, pin in enumerate(pins):
            row = self.rows.get(pin.index)
            if row is None:
                return None
            place = _placement(row[0], pin.image)
            if place is None:
                return None
            offsets[k] = place
            groups.setdefault(tuple(row[0].shape), []).append(k)
        out = []
        for members in groups.values():
            rows = [self.rows[pins[k].index] for k in members]
            protos = [r[3] for r in rows]
            out.append(_Batch(members, torch.stack([r[0] for r in rows]),
                              [torch.stack([r[1][j] for r in rows]) for j in range(len(self.indices))],
                              torch.stack([r[2] for r in rows]), [offsets[k] for k in members],
                              None if any(p is None for p in protos) else torch.stack(protos)))
        return out


def _placement(x: torch.Tensor, image: np.ndarray) -> Optional[Tuple[int, int]]:
    """Where ``image`` ``(h, w, 3)`` uint8 lies in the model input ``x`` ``(3, H, W)`` in
    [0, 1]: ``(top, left)`` of Ultralytics' centred letterbox (or the top left), checked
    pixel for pixel; None when it is in neither place."""
    big_h, big_w = int(x.shape[-2]), int(x.shape[-1])
    h, w = image.shape[:2]
    if h > big_h or w > big_w:
        return None
    centred = (int(round((big_h - h) / 2 - 0.1)), int(round((big_w - w) / 2 - 0.1)))
    for top, left in (centred, (0, 0)):
        crop = x[:, top:top + h, left:left + w].mul(255.0).round().clamp(0, 255).to(torch.uint8)
        if np.array_equal(crop.permute(1, 2, 0).cpu().numpy(), image):
            return top, left
    return None


def _resize(maps: np.ndarray, size: Any) -> np.ndarray:
    """``(n, c, h, w)`` maps resized (bilinear) to ``size`` ``(H, W)``, float32."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    out = torch.nn.functional.interpolate(t, size=(int(size[0]), int(size[1])), mode="bilinear",
                                          align_corners=False)
    return out.numpy()


def _pin_classify(dataset: Any, n: int) -> List[_Pin]:
    """``n`` images of an Ultralytics classification dataset, spread evenly over it (its
    images are listed class by class), each as the validator gets it (``dataset[i]["img"]``:
    resized, centre-cropped, in [0, 1]); ``truth`` is the class index. No padding: ``canvas``
    is ``image``."""
    count = len(dataset)
    picks = sorted({int(round(v)) for v in np.linspace(0, count - 1, min(n, count))}) if count else []
    pins = []
    for i in picks:
        item = dataset[i]
        img = item["img"]
        chw = img.detach().float().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img, np.float32)
        rgb = np.ascontiguousarray(np.clip(np.rint(chw.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8))
        pins.append(_Pin(rgb, rgb, int(item["cls"]), index=i))
    return pins


def _inputs(model: nn.Module, pins: Sequence[_Pin]) -> torch.Tensor:
    """The pinned canvases as the model's input: ``(n, 3, H, W)`` in [0, 1], on its device,
    in its dtype."""
    param = next(model.parameters())
    x = torch.from_numpy(np.stack([p.canvas for p in pins])).permute(0, 3, 1, 2)
    return x.to(param.device).to(param.dtype if param.dtype.is_floating_point else torch.float32) / 255.0


def _first(out: Any) -> torch.Tensor:
    """A classifier's probabilities: the first tensor of its eval-mode output."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out



@contextlib.contextmanager
def _quiet(model: nn.Module) -> Iterator[None]:
    """The frame of the callback's own forwards: no grad, eval mode, every module's
    attributes put back (:func:`_modules_kept`) and the random state forked."""
    param = next(model.parameters())
    cuda = [param.device.index or 0] if param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), _modules_kept(model):
        model.eval()
        yield


def _pin(dataset: Any, n: int, stride: int = 32, masks: bool = False) -> List[_Pin]:
    """The first ``n`` images of an Ultralytics validation dataset, resized as its own
    ``load_image`` resizes them (long side ``imgsz``), padded at the bottom right to the next
    multiples of ``stride``, like the validator's rectangular batches (which centre the
    padding; top-left padding lets the card crop the map to the image with ``map_extent``).
    ``masks``: the truth is the class mask of the label's polygons, not its boxes."""
    pins = []
    for i in range(min(n, len(dataset))):
        im, _, (h, w) = dataset.load_image(i)
        im = np.asarray(im)
        if im.ndim == 2:
            im = im[..., None]
        rgb = im[..., ::-1] if im.shape[-1] == 3 else np.repeat(im[..., :1], 3, axis=-1)  # BGR -> RGB
        rgb = np.ascontiguousarray(rgb[:h, :w], dtype=np.uint8)
        canvas = np.full((-(-h // stride) * stride, -(-w // stride) * stride, 3), PAD_VALUE, dtype=np.uint8)
        canvas[:h, :w] = rgb
        label = dataset.labels[i]
        xywh = np.asarray(label.get("bboxes", np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
        cls = np.asarray(label.get("cls", np.zeros((0, 1)))).reshape(-1).astype(np.int64)
        boxes = np.stack([(xywh[:, 0] - xywh[:, 2] / 2) * w, (xywh[:, 1] - xywh[:, 3] / 2) * h,
                          (xywh[:, 0] + xywh[:, 2] / 2) * w, (xywh[:, 1] + xywh[:, 3] / 2) * h], axis=1)
        truth: Union[Dict[str, np.ndarray], np.ndarray] = {"boxes": boxes, "labels": cls}
        if masks:
            segments = label.get("segments")
            truth = true_mask([] if segments is None else list(segments), cls, (h, w))
        pins.append(_Pin(rgb, canvas, truth, index=i))
    return pins


def _fuse(acts: List[torch.Tensor], indices: List[int], width: int) -> Tuple[np.ndarray, str]:
    """What the logger gets as activations: one layer's own ``(B, C, h, w)``, or several
    levels' fused PC1 map ``(B, 1, h, w)`` (rule: module docstring); float32, and the run tag."""
    levels = [f"P{round(math.log2(width / a.shape[-1]))}" for a in acts]  # stride 8: P3
    names = "+".join(f"model.{i}" for i in indices)
    if len(acts) == 1:
        return acts[0].cpu().numpy().astype(np.float32, copy=False), \
            f"{names} ({levels[0]}, {acts[0].shape[1]} channels)"
    from ..eigencam import eigencam

    h, w = max((a.shape[-2], a.shape[-1]) for a in acts)
    maps = []
    for a in acts:
        pc1 = np.maximum(eigencam(a.cpu().numpy(), 1).maps[:, 0], 0.0)  # (B, h_l, w_l)
        peak = pc1.max(axis=(1, 2), keepdims=True)
        pc1 = np.divide(pc1, peak, out=np.zeros_like(pc1), where=peak > 0)
        up = torch.nn.functional.interpolate(torch.from_numpy(pc1[:, None]).float(), size=(h, w),
                                             mode="bilinear", align_corners=False)
        maps.append(up[:, 0].numpy())
    fused = np.max(np.stack(maps), axis=0)[:, None].astype(np.float32)
    tag = (f"{names} ({'+'.join(levels)}: max of each level's PC1 map, ReLU'd, scaled to max 1, "
           "upsampled to the finest level's grid)")
    return fused, tag


@contextlib.contextmanager
def _modules_kept(model: nn.Module) -> Iterator[None]:
    """Put back every module's attributes after the block: ``training`` flags, and what a
    forward caches on a module (the head's ``anchors``, ``strides`` and input ``shape``)."""
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        yield
    finally:
        for module, attrs in saved:
            current = module.__dict__
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value


_MISSING = object()


def _explained_model(trainer: Any) -> nn.Module:
    """The model the validator evaluates during training: the EMA, else the trainer's model."""
    ema = getattr(trainer, "ema", None)
    model = getattr(ema, "ema", None) if ema is not None else None
    if model is None:
        model = trainer.model
    return getattr(model, "module", model)  # DDP / DataParallel


def _is_main_rank() -> bool:
    from ultralytics.utils import RANK

    return RANK in (-1, 0)


def _check_layers(layers: Layers) -> Optional[Tuple[int, ...]]:
    if layers is None:
        return None
    items = [layers] if isinstance(layers, numbers.Integral) and not isinstance(layers, bool) else layers
    try:
        out = tuple(items)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"layers must be an int, a sequence of ints (indices in model.model) or None, "
                        f"got {layers!r}") from None
    if not out or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in out):
        raise TypeError(f"layers must be an int, a sequence of ints (indices in model.model) or None, "
                        f"got {layers!r}")
    return tuple(int(i) for i in out)


def autolog_add_callback(original: Callable[..., Any], model: Any, args: tuple, kw: Dict[str, Any],
                         settings: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any], Optional[Callable[[], None]]]:
    """autolog's entry for Ultralytics: an :class:`EigenCAMCallback` on the model for this
    ``train()`` only (one the user registered is not duplicated)."""
    table = getattr(model, "callbacks", None) or {}
    if any(isinstance(getattr(fn, "__self__", None), EigenCAMCallback)
           for fns in table.values() for fn in fns):
        return args, kw, None
    settings = dict(settings)
    settings.pop("denormalize", None)  # YOLO's inputs are raw pixels
    callback = EigenCAMCallback(layers=settings.pop("layer", None), **settings).register(model)

    def undo() -> None:
        # Leave the model as it was: a later train() (autolog off, or a new config) starts clean.
        callback.unregister(model)
        callback._close()

    return args, kw, undo
