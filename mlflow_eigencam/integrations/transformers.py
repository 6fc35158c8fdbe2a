"""Hugging Face ``transformers.Trainer`` integration: :class:`EigenCAMCallback`.

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                      callbacks=[EigenCAMCallback()])          # or mlflow_eigencam.autolog()
    trainer.train()

What it does at each evaluation, inside Trainer's own evaluation loop (no extra forward pass):

* for the length of each ``Trainer.evaluation_loop`` run by ``Trainer.evaluate`` (during
  ``train()``, after it, or without it), and only then, two hooks sit on the model (a forward
  pre-hook and a forward hook); they are removed when the loop returns. While the logger
  still wants samples of this evaluation, the pre-hook reads the batch's ``pixel_values``
  and labels from the forward's arguments and opens an
  :meth:`~mlflow_eigencam.pytorch.EigenCAMMonitor.capture` block (its hook on the target
  layer lives only for that forward); the forward hook hands the monitor the model's
  ``logits`` and closes the block. Only the kept rows are detached and copied to the CPU.
  Once ``n_samples`` are kept, later batches cost one Python call per forward, nothing else;
* the samples are the first ``n_samples`` of the evaluation dataloader, which does not
  shuffle, so the same images come back at every evaluation (the pinned samples);
* ``on_evaluate`` logs them under mode ``"eval"``, dataset id ``"val"``; Trainer's
  ``metric_key_prefix`` names the others: a dict of eval datasets gives ``"val_<name>"``,
  ``trainer.evaluate(ds, metric_key_prefix="test")`` mode and dataset id ``"test"``; another
  dataset under a prefix already used gets ``"_1"``, ``"_2"``... appended. An evaluation
  outside ``train()`` waits there for its upload (the callback's :meth:`close`), so the
  images are in MLflow when ``evaluate()`` returns.

Why ``Trainer.evaluation_loop`` is wrapped (once, for the ``Trainer`` class, when the first
callback is built; a pass-through for trainers without one): no ``TrainerCallback`` event
comes before the loop's first forward (``on_prediction_step`` follows each batch,
``on_evaluate`` the whole loop), so a callback alone can hook an evaluation only by leaving
hooks on the model between evaluations, which is what lost ``evaluate()`` after ``train()``
(its hooks went at ``on_train_end``) and what a user's ``deepcopy`` or pickle of the model
should never meet. The loop's arguments also name the samples before they are kept: its
``metric_key_prefix`` and its dataloader. ``Trainer.predict`` (``description="Prediction"``),
the user's own inference and the monitor's faithfulness pass are not captured, nor is a
subclass's ``evaluation_loop`` that does not call ``super().evaluation_loop``. ``autolog()``
wraps ``Trainer.train`` and ``Trainer.evaluate`` to put its callback on the trainer for that
call (one callback per trainer, kept across its calls: one run, one naming of its datasets).

Where the pieces come from:

* images: the batch's ``pixel_values``. Trainer feeds images normalised by an image
  processor; they are drawn after undoing that normalisation with ``denormalize=(mean, std)``
  when given, else the ``image_mean`` / ``image_std`` of Trainer's ``processing_class`` (an
  image processor with ``do_normalize`` on), else each image is min-max scaled to [0, 1];
* labels: the batch's ``labels`` (or the first of ``args.label_names``);
* predictions: the argmax of the model's ``logits``; class names: ``model.config.id2label``
  unless ``label_mapping`` is given;
* layer: the monitor's automatic choice (a ResNet / ConvNeXt: the last stage's map; a ViT /
  DeiT: the last token layer folded onto the patch grid, CLS and distillation tokens
  dropped, non-square grids too); for a Swin its last stage folded onto that stage's grid
  (:func:`_swin_last_stage`); or ``target_layer`` (a module or dotted name, e.g.
  ``"resnet.encoder.stages.1"``);
* the MLflow run: the run active at ``on_train_begin`` (with ``report_to=["mlflow"]`` the
  run Trainer's own ``MLflowCallback`` started or reused), else the run active at the first
  evaluation, else the logger starts one and ends it at ``on_train_end`` (or at the end of
  an ``evaluate()`` outside training). A run the callback did not start is never ended. The
  callback keeps its run: a later ``evaluate()`` logs into it too, although
  ``MLflowCallback`` ended a run it started at ``on_train_end`` (Trainer's metrics of that
  ``evaluate()`` then go to a new run MLflow starts; the images stay with the training).

The step: ``state.global_step``, the step at which Trainer's ``MLflowCallback`` logs its
``eval_*`` metrics (and its ``epoch`` metric, a float, at that same step). Not the epoch:
with ``eval_strategy="steps"`` several evaluations fall in one epoch and would collide on one
step, and the image slider would not line up with Trainer's eval curves. The run tag
``mlflow_eigencam.step`` says so; the table's ``epoch`` column holds the same global step,
its ``train_epoch`` column ``state.epoch`` (a float: 1.5 halfway through the second epoch).
An evaluation at a global step already logged for its dataset id (``trainer.evaluate()``
after a ``train()`` that ended with an evaluation: Trainer logs its ``eval_*`` metrics at
that same step again) is logged at the step after the last one logged for that dataset id:
the slider gets a new point after the last, the table's ``train_epoch`` column repeats the
epoch, an INFO log line names both steps, and the ``mlflow_eigencam.step`` tag says so.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.integrations import MLflowCallback

from ..errors import WarnOnce
from ..pytorch import EigenCAMMonitor, resolve_target_layer, unwrap_model

_log = logging.getLogger("mlflow_eigencam")

__all__ = ["EigenCAMCallback", "autolog_add_callback"]

#: Run tag naming what the MLflow step of the images is.
TAG_STEP = "mlflow_eigencam.step"
STEP_MEANING = ("transformers global_step (the step of Trainer's eval_* and epoch metrics); the epoch "
                "of each step: the table's train_epoch column; an evaluation at a step already logged "
                "for its dataset (trainer.evaluate() after train()) is logged at the next step after "
                "that dataset's last")
_IMAGE_KEY = "pixel_values"
_LABEL_KEY = "labels"


class EigenCAMCallback(TrainerCallback):
    """Log EigenCAM overlays of pinned evaluation images at every Trainer evaluation.

    Args:
        target_layer: A submodule of the model or its dotted name; None lets the monitor
            choose (see the module docstring).
        n_samples: Evaluation images pinned and shown at every evaluation (int >= 1).
        n_components: Principal components per sample (int >= 1, or a float in (0, 1)).
        label_mapping: Class names (sequence, or ``{name: index}``); default
            ``model.config.id2label``.
        denormalize: ``(mean, std)`` per channel of ``pixel_values``; default the image
            processor's ``image_mean`` / ``image_std``, else per-image min-max.
        log_every_n_evals: Log evaluations 0, n, 2n, ... (counted per dataset id).
        reshape_transform: Callable ``(B, N, D) tensor -> (B, C, h, w)`` for token layers the
            automatic folding cannot read (passed to the monitor).
        true_boxes: ``(ds_id, i) -> boxes`` of the ``i``-th sample of that evaluation
            dataset: ``(n, 4)`` ``x1, y1, x2, y2`` pixels of ``pixel_values``, or None. With it
            the ``localization`` and ``pointing_game`` signals are logged (docs/signals.md).
        **monitor_kwargs: Passed to :class:`~mlflow_eigencam.pytorch.EigenCAMMonitor` and its
            logger (``colormap``, ``alpha``, ``run_id``, ``mode``, ``ds_id`` filters, ...).

    Raises:
        ValueError / TypeError: Bad arguments (named in the message); a ``target_layer``
            that is not in the model, at ``on_train_begin``.
    """

    def __init__(
        self,
        target_layer: Union[nn.Module, str, None] = None,
        n_samples: int = 5,
        n_components: Union[int, float] = 3,
        label_mapping: Union[Mapping[str, Any], Sequence[str], None] = None,
        denormalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        log_every_n_evals: int = 1,
        reshape_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        true_boxes: Optional[Callable[[str, int], Any]] = None,
        **monitor_kwargs: Any,
    ) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(
                f"n_samples must be an int >= 1 (the evaluation images pinned), got {n_samples!r}")
        if (isinstance(log_every_n_evals, bool) or not isinstance(log_every_n_evals, int)
                or log_every_n_evals < 1):
            raise ValueError(f"log_every_n_evals must be an int >= 1, got {log_every_n_evals!r}")
        if target_layer is not None and not isinstance(target_layer, (str, nn.Module)):
            raise TypeError(f"target_layer must be an nn.Module, a dotted name or None, "
                            f"got {type(target_layer).__name__}")
        for reserved in ("pin_samples", "preds_from_output", "logger", "log_every_n_epochs"):
            if reserved in monitor_kwargs:
                raise TypeError(f"EigenCAMCallback sets {reserved!r} itself; got {reserved}="
                                f"{monitor_kwargs[reserved]!r}")
        self.target_layer = target_layer
        self.n_samples = n_samples
        self.log_every_n_evals = log_every_n_evals
        self._denormalize = denormalize
        self._label_mapping = label_mapping
        self._monitor_args: Dict[str, Any] = dict(
            n_components=n_components, reshape_transform=reshape_transform, **monitor_kwargs)
        # Checked now, not at the first evaluation (as autolog() does): the logger validates
        # its own settings; the monitor checks denormalize and reshape_transform.
        from ..logger import EigenCAMLogger

        logger_keys = set(inspect.signature(EigenCAMLogger).parameters)
        settings = dict(self._monitor_args, n_samples=n_samples, label_mapping=label_mapping)
        EigenCAMLogger(**{k: v for k, v in settings.items() if k in logger_keys}).close()
        if denormalize is not None:  # the monitor checks the values; here the form
            try:
                mean, std = denormalize
                ok = len(mean) == len(std) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"denormalize must be (mean, std), two equal-length sequences, "
                                 f"got {denormalize!r}")
        if true_boxes is not None and not callable(true_boxes):
            raise TypeError(f"true_boxes must be callable (ds_id, index) -> boxes or None, "
                            f"got {type(true_boxes).__name__}")
        self._true_boxes = true_boxes
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError(f"reshape_transform must be callable or None, "
                            f"got {type(reshape_transform).__name__}")
        self._monitor: Optional[EigenCAMMonitor] = None
        # Kept across train() and evaluate() calls: one run per callback.
        self._run_id: Optional[str] = None
        self._names: Dict[int, Tuple[str, str]] = {}  # id(eval dataset) -> (mode, ds_id)
        self._evals: Dict[str, int] = {}  # ds_id -> evaluations seen
        self._last_step: Dict[str, int] = {}  # ds_id -> last global step logged
        self._model: Optional[nn.Module] = None  # the model the hooks are on
        self._handles: List[Any] = []
        self._loop: Optional[_Loop] = None  # the evaluation loop running now (hooks on)
        self._standalone = False  # that loop runs outside train(): on_evaluate sends and closes
        self._block: Optional[_Block] = None  # the capture block of the forward running now
        self._kept: Optional[Tuple[str, str, int]] = None  # (mode, ds_id, step) of this evaluation
        self._busy = False  # inside the monitor (its faithfulness forward): hooks ignore forwards
        self._warn = WarnOnce()
        self._broken = False
        _wrap_evaluation_loop()

    # ----------------------------------------------------------------- Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       **kwargs: Any) -> None:
        """Check a named target layer against the model; remember the run training logs to."""
        if model is not None and isinstance(self.target_layer, str):
            resolve_target_layer(unwrap_model(model), self.target_layer)
        active = _active_run_id()
        if active is not None and active != self._run_id and "run_id" not in self._monitor_args:
            # Trainer's MLflowCallback (called before us) has started or reused its run by now:
            # this training's images go there, and so do those of a later evaluate(), after
            # MLflowCallback ended it. Steps logged in another run do not collide in this one.
            self.close()
            self._run_id = active
            self._last_step.clear()
            self._evals.clear()

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                    eval_dataloader: Any = None, **kwargs: Any) -> None:
        """Log the samples the evaluation loop just kept, at ``state.global_step``."""
        kept, self._kept = self._kept, None
        named = self._names.get(id(getattr(eval_dataloader, "dataset", None)))
        if named is not None:  # log_every_n_evals counts every evaluation of the dataset
            self._evals[named[1]] = self._evals.get(named[1], 0) + 1
        if self._broken or not getattr(state, "is_world_process_zero", True):
            return
        if kept is not None:
            mode, ds_id, step = kept
            try:
                assert self._monitor is not None
                epoch = getattr(state, "epoch", None)  # a float: 1.5 halfway through the second epoch
                self._monitor.epoch_end(step, mode=mode, train_epoch=None if epoch is None else float(epoch))
                self._last_step[ds_id] = step
            except Exception as exc:  # a logging failure never stops training
                self._fail(exc, step)
        if self._standalone:  # evaluate() outside train(): its images are in MLflow when it returns
            self._standalone = False
            self.close()

    def on_predict(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """``Trainer.predict`` is not captured; nothing to end."""
        self._kept = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Send what is pending and close the logger (a later ``evaluate()`` opens another,
        on the same run)."""
        self.close()

    def close(self) -> None:
        """Remove any hooks; flush and close the monitor. Safe to call twice; the next
        evaluation opens a new monitor on the same run."""
        self._disarm()
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            if monitor.run_id is not None:
                self._run_id = monitor.run_id
            monitor.close()

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run the images go to (None before the first logged evaluation, unless a
        run was active when training began)."""
        return self._monitor.run_id if self._monitor is not None else self._run_id

    # ----------------------------------------------------------------- hooks

    @contextlib.contextmanager
    def _evaluating(self, trainer: Any, prefix: str, dataloader: Any) -> Iterator[None]:
        """Hook ``trainer.model`` for one evaluation loop, and unhook it after."""
        if self._broken or self._loop is not None:
            yield
            return
        self._loop, self._kept = _Loop(trainer, prefix, dataloader), None
        self._standalone = not getattr(trainer, "is_in_train", False)
        if self._standalone and self._run_id is None and "run_id" not in self._monitor_args:
            _setup_mlflow_callback(trainer)
        model = unwrap_model(trainer.model)
        self._model = model
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True)]
        try:
            yield
        finally:
            self._loop = None
            self._disarm()

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._model = [], None
        block, self._block = self._block, None
        if block is not None:
            block.stack.close()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        """An eval-mode forward of the evaluation loop whose samples are wanted: open a
        capture block (the monitor hooks the target layer for this forward only)."""
        loop = self._loop
        if module.training or self._busy or self._broken or self._block is not None or loop is None:
            return
        try:
            self._open_block(module, loop, args, kwargs)
        except Exception as exc:  # a logging failure never stops the evaluation
            self._fail(exc, getattr(loop.trainer.state, "global_step", "?"))

    def _open_block(self, model: nn.Module, loop: "_Loop", args: tuple, kwargs: Dict[str, Any]) -> None:
        trainer = loop.trainer
        if not trainer.is_world_process_zero():
            return
        mode, ds_id = self._name(loop)
        if self._kept is not None:  # a later batch of this evaluation: same step
            step = self._kept[2]
        else:  # this evaluation's first batch
            if self._evals.get(ds_id, 0) % self.log_every_n_evals:
                return
            step = self._step(ds_id, int(trainer.state.global_step))
        images = kwargs.get(_IMAGE_KEY, args[0] if args else None)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"EigenCAMCallback needs {_IMAGE_KEY!r} as a (B, C, H, W) tensor, got {shape}")
        monitor = self._ensure_monitor(model, trainer.processing_class, images)
        logger = monitor.logger
        room = None if logger is None else logger.room(mode, ds_id)
        if not room:
            return  # filtered out (mode= / ds_id=), not rank zero, or every sample kept
        boxes = None
        if self._true_boxes is not None:  # the kept rows are the loader's first samples
            first = self.n_samples - room
            boxes = [self._true_boxes(ds_id, first + i) for i in range(min(room, int(images.shape[0])))]
        names = list(getattr(trainer, "label_names", None) or [_LABEL_KEY])
        labels = next((kwargs[k] for k in names if kwargs.get(k) is not None), None)
        stack = contextlib.ExitStack()
        stack.enter_context(monitor.capture(mode=mode, ds_id=ds_id))
        self._block = _Block(stack, images, labels, boxes)
        if self._kept is None and step != trainer.state.global_step:
            _log.info("EigenCAM: %s at global step %d: that step is already logged, this evaluation "
                      "(after train()?) is logged at step %d", ds_id, trainer.state.global_step, step)
        self._kept = (mode, ds_id, step)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> None:
        """Hand the monitor the kept rows of this forward (its logits as predictions) and
        close the block: the target layer's hook goes with it."""
        block, self._block = self._block, None
        if block is None:
            return
        with block.stack:
            if output is None:  # the forward raised (always_call): just unhook
                return
            logits = output["logits"] if isinstance(output, Mapping) else getattr(output, "logits", output)
            self._busy = True  # the monitor's faithfulness forward runs the model again
            try:
                assert self._monitor is not None
                self._monitor.update(images=block.images, labels=block.labels, preds=logits, boxes=block.boxes)
            except Exception as exc:
                self._fail(exc, "?")
            finally:
                self._busy = False

    # ----------------------------------------------------------------- internals

    def _fail(self, exc: BaseException, step: Any) -> None:
        self._broken = True
        self._kept = None
        self._warn.warn("hf-evaluate", f"EigenCAM: logging at step {step} failed ({exc!r}); "
                        "no more EigenCAM images in this run")

    def _step(self, ds_id: str, global_step: int) -> int:
        """The MLflow step of an evaluation at ``global_step``: that step, or the one after
        the last logged for ``ds_id`` when that is not earlier (see the module docstring)."""
        last = self._last_step.get(ds_id)
        return global_step if last is None or global_step > last else last + 1

    def _name(self, loop: "_Loop") -> Tuple[str, str]:
        """``(mode, ds_id)`` of the dataset being evaluated (named at its first evaluation
        after Trainer's metric prefix, see :func:`_mode_and_ds_id`)."""
        dataset = getattr(loop.dataloader, "dataset", None)
        named = self._names.get(id(dataset))
        if named is not None:
            return named
        mode, ds_id = _mode_and_ds_id(loop.prefix)
        taken = {name[1] for name in self._names.values()}
        if ds_id in taken:  # another dataset under the same prefix: val_1, val_2, ...
            ds_id = next(f"{ds_id}_{i}" for i in range(1, len(taken) + 2) if f"{ds_id}_{i}" not in taken)
        self._names[id(dataset)] = (mode, ds_id)
        return mode, ds_id

    def _ensure_monitor(self, model: nn.Module, processing_class: Any, images: torch.Tensor) -> EigenCAMMonitor:
        if self._monitor is not None:
            return self._monitor
        extra_tags = dict(self._monitor_args.pop("extra_tags", None) or {})
        extra_tags.setdefault(TAG_STEP, STEP_MEANING)
        kwargs = dict(self._monitor_args, extra_tags=extra_tags)
        if self._run_id is not None:  # a second train() / evaluate(): the same run
            kwargs.setdefault("run_id", self._run_id)
        target = self.target_layer
        if target is None and kwargs.get("reshape_transform") is None:
            swin = _swin_last_stage(model, images)
            if swin is not None:
                target, kwargs["reshape_transform"] = swin
        self._monitor = EigenCAMMonitor(
            model,
            target_layer=target,
            n_samples=self.n_samples,
            label_mapping=self._label_mapping if self._label_mapping is not None else _id2label(model),
            denormalize=self._denormalize if self._denormalize is not None else _processor_norm(processing_class),
            pin_samples=False,  # the eval loader's first n_samples are the pinned samples
            **kwargs,
        )
        self._monitor_args["extra_tags"] = extra_tags
        return self._monitor


class _Block:
    """One forward's capture block: the monitor's ``capture()`` and the batch's inputs."""

    __slots__ = ("stack", "images", "labels", "boxes")

    def __init__(self, stack: contextlib.ExitStack, images: torch.Tensor, labels: Any,
                 boxes: Optional[List[Any]]) -> None:
        self.stack, self.images, self.labels, self.boxes = stack, images, labels, boxes


class _Loop:
    """The evaluation loop running now: its trainer, metric prefix and dataloader."""

    __slots__ = ("trainer", "prefix", "dataloader")

    def __init__(self, trainer: Any, prefix: str, dataloader: Any) -> None:
        self.trainer, self.prefix, self.dataloader = trainer, prefix, dataloader


_WRAPPED_ATTR = "__mlflow_eigencam_evaluation_loop__"
_wrap_lock = threading.Lock()


def _wrap_evaluation_loop() -> None:
    """Wrap ``transformers.Trainer.evaluation_loop`` once (see the module docstring for why):
    for a trainer with :class:`EigenCAMCallback` s, each hooks the model for the loop of an
    evaluation; otherwise, and for ``Trainer.predict``'s loop, a pass-through."""
    with _wrap_lock:
        original = Trainer.__dict__["evaluation_loop"]
        if getattr(original, _WRAPPED_ATTR, False):
            return
        signature = inspect.signature(original)

        @functools.wraps(original)
        def evaluation_loop(self: Any, *args: Any, **kwargs: Any) -> Any:
            handler = getattr(self, "callback_handler", None)
            callbacks = [cb for cb in getattr(handler, "callbacks", ()) if isinstance(cb, EigenCAMCallback)]
            if not callbacks:
                return original(self, *args, **kwargs)
            try:
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                prefix, description = bound.arguments["metric_key_prefix"], bound.arguments["description"]
                dataloader = bound.arguments["dataloader"]
            except (TypeError, KeyError):  # a signature we do not know: not captured
                return original(self, *args, **kwargs)
            if description == "Prediction" or not isinstance(prefix, str):
                return original(self, *args, **kwargs)
            with contextlib.ExitStack() as stack:
                for callback in callbacks:
                    stack.enter_context(callback._evaluating(self, prefix, dataloader))
                return original(self, *args, **kwargs)

        setattr(evaluation_loop, _WRAPPED_ATTR, True)
        Trainer.evaluation_loop = evaluation_loop


def _setup_mlflow_callback(trainer: Any) -> None:
    """Let Trainer's ``MLflowCallback`` start (or reuse) its run now, before the first
    forward of an ``evaluate()`` without ``train()``, rather than in this evaluation's
    ``on_log`` after the loop: the images then go to the run its metrics go to, not to a
    second one. What it does is what it would do a moment later; a failure leaves it to that."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, MLflowCallback) and getattr(callback, "_initialized", True) is False:
            try:
                callback.setup(trainer.args, trainer.state, trainer.model)
            except Exception as exc:  # it will try again in on_log, and say why
                _log.debug("EigenCAM: MLflowCallback.setup failed early: %r", exc)


def _active_run_id() -> Optional[str]:
    """The id of MLflow's active run in this thread, or None (mlflow is not imported here:
    a user who never imported it has no active run)."""
    mlflow = sys.modules.get("mlflow")
    active = None if mlflow is None else mlflow.active_run()
    return None if active is None else str(active.info.run_id)


def _mode_and_ds_id(prefix: str) -> Tuple[str, str]:
    """The package's names for a metric prefix: ``eval`` -> (eval, val), ``eval_clean`` ->
    (eval, val_clean), ``test`` / ``test_x`` -> (test, test / test_x), else (eval, prefix)."""
    if prefix == "eval" or prefix.startswith("eval_"):
        return "eval", "val" + prefix[len("eval"):]
    if prefix == "test" or prefix.startswith("test_"):
        return "test", prefix
    return "eval", prefix


#: ``config.model_type`` of the Swin family: token stages that shrink the grid (patch merging).
_SWIN_TYPES = ("swin", "swinv2", "donut-swin", "maskformer-swin")


def _swin_last_stage(model: nn.Module, images: torch.Tensor) -> Optional[Tuple[str, Callable[..., Any]]]:
    """``(name, reshape_transform)`` for a Swin model's last stage, else None.

    The automatic choice cannot fold a Swin's last stage: its ``(B, h * w, D)`` tokens lie on
    a grid 2^(stages - 1) times coarser than the patch embedding's. The grid is computed as
    Swin pads: ``ceil(H / patch)``, then ``(h + 1) // 2`` per patch merging before the last
    stage (non-square images too). The stage returns ``(tokens, reshaped map, attention)``;
    the monitor takes the first tensor, the tokens, which are folded here.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _SWIN_TYPES:
        return None
    depths, patch = getattr(config, "depths", None), getattr(config, "patch_size", None)
    if not depths or patch is None:
        return None
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    height, width = -(-int(images.shape[-2]) // patch_h), -(-int(images.shape[-1]) // patch_w)
    for _ in range(len(depths) - 1):
        height, width = (height + 1) // 2, (width + 1) // 2
    suffix = f"encoder.layers.{len(depths) - 1}"
    names = [name for name, _ in model.named_modules() if name == suffix or name.endswith("." + suffix)]
    if not names:
        return None

    def fold(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[1] != height * width:
            raise ValueError(f"Swin last stage: expected (B, {height * width}, D) tokens for a "
                             f"{height}x{width} grid, got {tuple(tokens.shape)}")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)

    return min(names, key=len), fold


def _id2label(model: nn.Module) -> Optional[List[str]]:
    """``config.id2label`` as a list of names (index order), or None."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not id2label:
        return None
    try:
        pairs = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        return None
    if [k for k, _ in pairs] != list(range(len(pairs))):
        return None
    return [v for _, v in pairs]


def _processor_norm(processor: Any) -> Optional[Tuple[List[float], List[float]]]:
    """``(image_mean, image_std)`` of an image processor that normalises, else None."""
    processor = getattr(processor, "image_processor", processor)  # a multimodal processor
    if processor is None or getattr(processor, "do_normalize", True) is False:
        return None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        return None
    mean_l = [float(v) for v in np.atleast_1d(np.asarray(mean, dtype=np.float64))]
    std_l = [float(v) for v in np.atleast_1d(np.asarray(std, dtype=np.float64))]
    return mean_l, std_l


#: autolog's callback of each trainer, kept across its train() and evaluate() calls (one run,
#: one naming of its datasets, one record of the steps logged), with the settings it was built
#: with. Weak keys: a trainer that goes away takes its entry with it.
_AUTOLOG_CALLBACKS: "weakref.WeakKeyDictionary[Any, Tuple[Dict[str, Any], EigenCAMCallback]]" = (
    weakref.WeakKeyDictionary())


def _autolog_callback(trainer: Any, settings: Dict[str, Any]) -> EigenCAMCallback:
    """The trainer's autolog callback (a new one when autolog's settings changed)."""
    kept = _AUTOLOG_CALLBACKS.get(trainer)
    if kept is not None and _same_settings(kept[0], settings):
        return kept[1]
    options = dict(settings)
    layer = options.pop("layer", None)
    n_samples = options.pop("n_samples", 5)
    every = options.pop("log_every_n_epochs", 1)
    callback = EigenCAMCallback(target_layer=layer, n_samples=n_samples, log_every_n_evals=every,
                                **options)
    if isinstance(layer, str):  # a bad name: autolog warns and the call runs without us
        resolve_target_layer(unwrap_model(trainer.model), layer)
    if kept is not None:
        kept[1].close()
    _AUTOLOG_CALLBACKS[trainer] = (dict(settings), callback)
    return callback


def _same_settings(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    try:
        return bool(a == b)
    except Exception:  # values without a plain == (numpy arrays): treat as changed
        return False


def _add_for_one_call(trainer: Any, settings: Dict[str, Any]) -> Optional[Callable[[], None]]:
    """Put the trainer's autolog callback on it (unless the user passed one); the undo."""
    handler = trainer.callback_handler
    if any(isinstance(cb, EigenCAMCallback) for cb in handler.callbacks):
        return None
    callback = _autolog_callback(trainer, settings)
    trainer.add_callback(callback)

    def undo() -> None:
        # Leave the trainer as it was: a later call (autolog off, or new settings) starts clean.
        trainer.remove_callback(callback)
        callback.close()

    return undo


def autolog_add_callback(original: Callable[..., Any], trainer: Any, args: tuple, kw: Dict[str, Any],
                         settings: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any], Optional[Callable[[], None]]]:
    """autolog's entry for ``transformers.Trainer.train`` and ``Trainer.evaluate`` (called
    outside ``train()``; inside it, autolog passes straight through and training's callback
    logs): an :class:`EigenCAMCallback` on the trainer for this call only (one the user passed
    is not duplicated), the same one across the trainer's calls, so one run."""
    return args, kw, _add_for_one_call(trainer, settings)
