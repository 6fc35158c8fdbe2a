"""Hugging Face ``transformers.Trainer`` integration: :class:`EigenCAMCallback`.

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                      callbacks=[EigenCAMCallback()])          # or mlflow_eigencam.autolog()
    trainer.train()

What it does at each evaluation (``on_evaluate``):

* the first time, it pins the first ``n_samples`` items of the evaluation dataset (the
  dataset behind Trainer's eval dataloader, collated by that loader's own ``collate_fn``, so
  columns Trainer removes are removed here too), kept on the CPU;
* it runs those pinned items through the model once (``torch.no_grad()``, eval mode, every
  module's ``training`` flag and the CPU / CUDA random state restored afterwards), inside an
  :meth:`~mlflow_eigencam.pytorch.EigenCAMMonitor.capture` block, which holds the forward hook
  on the target layer only for that pass; the same images are shown at every evaluation.
  This extra pass (``n_samples`` images) is the whole cost; Trainer's own evaluation loop is
  not touched;
* it logs them under mode ``"eval"``, dataset id ``"val"``; Trainer's ``metric_key_prefix``
  names the others: a dict of eval datasets gives ``"val_<name>"``, ``trainer.evaluate(ds,
  metric_key_prefix="test")`` mode and dataset id ``"test"``; another dataset under a prefix
  already used gets ``"_1"``, ``"_2"``... appended.

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
* the MLflow run: the run active at the first evaluation. With ``report_to=["mlflow"]``
  that is the run Trainer's own ``MLflowCallback`` started or reused in ``on_train_begin``;
  otherwise the user's active run; otherwise the logger starts one and ends it at
  ``on_train_end``. A run the callback did not start is never ended.

The step: ``state.global_step``, the step at which Trainer's ``MLflowCallback`` logs its
``eval_*`` metrics (and its ``epoch`` metric, a float, at that same step). Not the epoch:
with ``eval_strategy="steps"`` several evaluations fall in one epoch and would collide on one
step, and the image slider would not line up with Trainer's eval curves. The run tag
``mlflow_eigencam.step`` says so; the table's ``epoch`` column holds the same global step.
An evaluation at a global step already logged for that dataset (``trainer.evaluate()`` right
after a train that ended with an evaluation) is skipped: one image per step and key.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from ..errors import WarnOnce
from ..pytorch import EigenCAMMonitor, preserve_training_flags, resolve_target_layer, unwrap_model

_log = logging.getLogger("mlflow_eigencam")

__all__ = ["EigenCAMCallback", "autolog_add_callback"]

#: Run tag naming what the MLflow step of the images is.
TAG_STEP = "mlflow_eigencam.step"
STEP_MEANING = "transformers global_step (the step of Trainer's eval_* and epoch metrics)"
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
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError(f"reshape_transform must be callable or None, "
                            f"got {type(reshape_transform).__name__}")
        self._monitor: Optional[EigenCAMMonitor] = None
        self._run_id: Optional[str] = None  # kept across train() calls: one run per callback
        self._pins: Dict[int, Tuple[str, str, Dict[str, Any]]] = {}  # id(dataset) -> (mode, ds_id, batch)
        self._evals: Dict[str, int] = {}  # ds_id -> evaluations seen
        self._last_step: Dict[str, int] = {}  # ds_id -> last global step logged
        self._warn = WarnOnce()
        self._broken = False

    # ----------------------------------------------------------------- Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       **kwargs: Any) -> None:
        """Check a named target layer against the model, before the first step."""
        if model is not None and isinstance(self.target_layer, str):
            resolve_target_layer(unwrap_model(model), self.target_layer)

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                    eval_dataloader: Any = None, processing_class: Any = None,
                    metrics: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        """Run the pinned images once and log them at ``state.global_step``."""
        if self._broken or model is None or eval_dataloader is None:
            return
        if not getattr(state, "is_world_process_zero", True):
            return
        try:
            self._evaluate(args, state, unwrap_model(model), eval_dataloader, processing_class,
                           _metric_prefix(metrics))
        except Exception as exc:  # a logging failure never stops training
            self._broken = True
            self._warn.warn("hf-evaluate",
                            f"EigenCAM: logging at step {state.global_step} failed ({exc!r}); "
                            "no more EigenCAM images in this run")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Send what is pending and close the logger (a later evaluation reopens the run)."""
        self.close()

    def close(self) -> None:
        """Flush and close the monitor; remove its hooks. Safe to call twice."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            if monitor.run_id is not None:
                self._run_id = monitor.run_id
            monitor.close()

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run the images go to (None before the first logged evaluation)."""
        return self._monitor.run_id if self._monitor is not None else self._run_id

    # ----------------------------------------------------------------- internals

    def _evaluate(self, args: Any, state: Any, model: nn.Module, loader: Any,
                  processing_class: Any, prefix: str) -> None:
        mode, ds_id, batch = self._pin(args, loader, prefix)
        count = self._evals.get(ds_id, 0)
        self._evals[ds_id] = count + 1
        step = int(state.global_step)
        if count % self.log_every_n_evals or self._last_step.get(ds_id) == step:
            return
        monitor = self._ensure_monitor(model, processing_class)
        if monitor.logger is None or not monitor.logger.wants(mode, ds_id):
            return  # filtered out (mode= / ds_id=), or not rank zero: no extra forward
        images = batch[_IMAGE_KEY]
        with monitor.capture(mode=mode, ds_id=ds_id):
            logits = _forward(model, images)
            monitor.update(images=images, labels=batch.get(_LABEL_KEY), preds=logits)
        monitor.epoch_end(step)
        self._last_step[ds_id] = step

    def _pin(self, args: Any, loader: Any, prefix: str) -> Tuple[str, str, Dict[str, Any]]:
        """``(mode, ds_id, pinned batch)`` of this loader's dataset (pinned at its first
        evaluation; named after Trainer's metric prefix then, see :func:`_mode_and_ds_id`)."""
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError(f"the eval dataloader ({type(loader).__name__}) has no .dataset")
        pinned = self._pins.get(id(dataset))
        if pinned is not None:
            return pinned
        mode, ds_id = _mode_and_ds_id(prefix)
        taken = {pinned[1] for pinned in self._pins.values()}
        if ds_id in taken:  # another dataset under the same prefix: val_1, val_2, ...
            ds_id = next(f"{ds_id}_{i}" for i in range(1, len(taken) + 2) if f"{ds_id}_{i}" not in taken)
        items = _first_items(dataset, self.n_samples)
        collate = getattr(loader, "collate_fn", None)
        # fork_rng: a collator that draws random numbers must not move the user's stream.
        with torch.random.fork_rng(devices=[]):
            batch = collate(items) if collate is not None else torch.utils.data.default_collate(items)
        if not isinstance(batch, Mapping) or _IMAGE_KEY not in batch:
            keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"EigenCAMCallback needs batches with {_IMAGE_KEY!r}; got {keys}")
        label_names = list(getattr(args, "label_names", None) or [_LABEL_KEY])
        labels = next((batch[k] for k in label_names if k in batch), None)
        images = batch[_IMAGE_KEY]
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{_IMAGE_KEY} must be a (B, C, H, W) tensor, got {shape}")
        kept = {_IMAGE_KEY: images.detach().cpu(),
                _LABEL_KEY: labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels}
        self._pins[id(dataset)] = (mode, ds_id, kept)
        return mode, ds_id, kept

    def _ensure_monitor(self, model: nn.Module, processing_class: Any) -> EigenCAMMonitor:
        if self._monitor is not None:
            return self._monitor
        extra_tags = dict(self._monitor_args.pop("extra_tags", None) or {})
        extra_tags.setdefault(TAG_STEP, STEP_MEANING)
        kwargs = dict(self._monitor_args, extra_tags=extra_tags)
        if self._run_id is not None:  # a second train() / evaluate(): the same run
            kwargs.setdefault("run_id", self._run_id)
        target = self.target_layer
        if target is None and kwargs.get("reshape_transform") is None:
            swin = _swin_last_stage(model, next(iter(self._pins.values()))[2][_IMAGE_KEY])
            if swin is not None:
                target, kwargs["reshape_transform"] = swin
        self._monitor = EigenCAMMonitor(
            model,
            target_layer=target,
            n_samples=self.n_samples,
            label_mapping=self._label_mapping if self._label_mapping is not None else _id2label(model),
            denormalize=self._denormalize if self._denormalize is not None else _processor_norm(processing_class),
            pin_samples=False,  # pinned here: one extra forward per evaluation, no more
            **kwargs,
        )
        self._monitor_args["extra_tags"] = extra_tags
        return self._monitor


def _metric_prefix(metrics: Optional[Mapping[str, Any]]) -> str:
    """Trainer's ``metric_key_prefix`` of this evaluation (``"eval"``, ``"eval_clean"`` for a
    dict of eval datasets, ``"test"``...), read off its ``{prefix}_runtime`` metric."""
    for key in metrics or {}:
        if isinstance(key, str) and key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return "eval"


def _mode_and_ds_id(prefix: str) -> Tuple[str, str]:
    """The package's names for a metric prefix: ``eval`` -> (eval, val), ``eval_clean`` ->
    (eval, val_clean), ``test`` / ``test_x`` -> (test, test / test_x), else (eval, prefix)."""
    if prefix == "eval" or prefix.startswith("eval_"):
        return "eval", "val" + prefix[len("eval"):]
    if prefix == "test" or prefix.startswith("test_"):
        return "test", prefix
    return "eval", prefix


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's logits for the pinned ``(B, C, H, W)`` images: no grad, eval mode, every
    module's flag and the random state (CPU and the model's CUDA device) restored."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else images.dtype
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), preserve_training_flags(model), torch.no_grad():
        model.eval()
        output = model(pixel_values=images.to(device=device, dtype=dtype))
    logits = output["logits"] if isinstance(output, Mapping) else getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"the model's output has no logits tensor ({type(output).__name__})")
    return logits


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


def _first_items(dataset: Any, n: int) -> List[Any]:
    """The first ``n`` items of a map-style dataset (or of an iterable one)."""
    try:
        size = len(dataset)
    except TypeError:
        size = None
    with torch.random.fork_rng(devices=[]):  # a dataset with random transforms
        if size is not None:
            return [dataset[i] for i in range(min(n, size))]
        items = []
        for item in dataset:
            items.append(item)
            if len(items) == n:
                break
        return items


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


def autolog_add_callback(original: Callable[..., Any], trainer: Any, args: tuple, kw: Dict[str, Any],
                         settings: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any], Optional[Callable[[], None]]]:
    """autolog's entry for ``transformers.Trainer.train``: an :class:`EigenCAMCallback` on the
    trainer for this ``train`` only (one the user passed is not duplicated)."""
    handler = trainer.callback_handler
    if any(isinstance(cb, EigenCAMCallback) for cb in handler.callbacks):
        return args, kw, None
    settings = dict(settings)
    layer = settings.pop("layer", None)
    n_samples = settings.pop("n_samples", 5)
    every = settings.pop("log_every_n_epochs", 1)
    callback = EigenCAMCallback(target_layer=layer, n_samples=n_samples, log_every_n_evals=every,
                                **settings)
    if isinstance(layer, str):  # a bad name: autolog warns and train() runs without us
        resolve_target_layer(unwrap_model(trainer.model), layer)
    trainer.add_callback(callback)

    def undo() -> None:
        # Leave the trainer as it was: a later train() (autolog off, or new settings) starts clean.
        trainer.remove_callback(callback)
        callback.close()

    return args, kw, undo

