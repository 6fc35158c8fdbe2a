"""Lightning integration: :class:`EigenCAMCallback`, a ``lightning.pytorch`` callback.

    trainer = Trainer(callbacks=[EigenCAMCallback()], logger=MLFlowLogger(...))

How a batch is captured: ``on_*_batch_start`` opens an :meth:`EigenCAMMonitor.capture` block
(forward hook on the target layer, plus one on the LightningModule itself for its output) and
``on_*_batch_end`` hands the batch to the monitor and closes the block, so the hooks exist only
while the ``*_step`` runs. Nothing is hooked for filtered-out stages, during the sanity check,
or on ranks other than global zero.

Where the pieces come from:

* images and labels: the batch, through ``batch_to_xy`` (default:
  :func:`~mlflow_eigencam.integrations.torch.batches.default_batch_to_xy`: ``(x, y)`` /
  ``(x,)`` tuples, a tensor, or a dict with ``image``/``images``/``x``/``input``/``inputs``/
  ``pixel_values`` and ``label``/``labels``/``y``/``target``/``targets``);
* predictions: the output of the LightningModule's own ``forward`` during the step (its
  first tensor, e.g. logits), when the step calls ``self(x)``; otherwise what the step returned
  if that is a tensor (or a dict's ``"preds"``/``"logits"``) with one row per sample;
* dataset ids: ``"train"``, ``"val"``, ``"test"``, ``"predict"``; with several dataloaders
  ``"val_0"``, ``"val_1"``... (``dataloader_idx``), or the keys of a dict of dataloaders;
* the MLflow run: the run of a ``MLFlowLogger`` in ``trainer.loggers`` (same tracking URI),
  else the active MLflow run, else one started at the first logged epoch. Later stages of the
  same callback (``trainer.test`` after ``trainer.fit``) log into the same run;
* the step: ``trainer.current_epoch``.

Pinned samples (default) work as in :mod:`mlflow_eigencam.integrations.torch.monitor`: from the
second epoch on, ``on_*_epoch_end`` runs the LightningModule's ``forward`` once on the first
epoch's samples (no grad, eval mode, flags restored), so every epoch shows the same images.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

try:  # the unified package first, the standalone one if that is all there is
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import MLFlowLogger
except ImportError:  # pragma: no cover - depends on what is installed
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.loggers import MLFlowLogger

from ..errors import EigenCAMWarning
from .torch.batches import BatchToXY, default_batch_to_xy, image_list
from .torch.layers import ReshapeTransform
from .torch.monitor import SPLIT_DS_IDS, EigenCAMMonitor

_log = logging.getLogger("mlflow_eigencam")

__all__ = ["EigenCAMCallback", "autolog_add_callback"]

#: Lightning stage -> (mode passed to the logger, base dataset id).
_STAGES = {stage: (mode, SPLIT_DS_IDS[mode]) for stage, mode in
           (("train", "train"), ("validation", "eval"), ("test", "test"), ("predict", "infer"))}


def _step_preds(outputs: Any, batch_size: int) -> Any:
    """What a ``*_step`` returned, when it looks like one prediction row per sample."""
    if isinstance(outputs, Mapping):
        outputs = next((outputs[k] for k in ("preds", "logits", "y_hat") if k in outputs), None)
    if isinstance(outputs, torch.Tensor) and outputs.ndim >= 1 and outputs.shape[0] == batch_size:
        return outputs
    return None


class EigenCAMCallback(Callback):
    """Log EigenCAM overlays of a LightningModule to MLflow, one step per epoch.

    Args:
        target_layer: A submodule of the LightningModule, its dotted name (e.g.
            ``"model.layer4"``), or None to auto-detect on the first captured batch.
        n_components: Principal components per sample (int), or a variance fraction (float).
        n_samples: Samples kept per (mode, ds_id) and epoch; None keeps all (no pinning).
        label_mapping: Class index -> display name (mapping or sequence), or None.
        mode: Mode filter over ``"train"``, ``"eval"`` (validation), ``"test"``, ``"infer"``
            (predict); default ``"!train"``.
        ds_id: Dataset-id filter (``"val"``, ``"!val_1"``, ...).
        reshape_transform: Callable ``tensor -> (B, C, h, w)`` for non-map / non-square layers.
        pin_samples: Show the first epoch's samples at every epoch.
        denormalize: ``(mean, std)`` per channel to undo the input normalisation.
        batch_to_xy: Callable ``batch -> (images, labels)`` for batches the default
            (:func:`default_batch_to_xy`) does not understand.
        faithfulness: Score each kept sample's map with the model (one extra quiet forward
            per kept batch, see ``EigenCAMMonitor`` and docs/signals.md): True, a sequence
            of fractions in (0, 1), or False.
        layers: Several layers side by side instead of one ``target_layer`` (not both):
            submodules or dotted names of the LightningModule (``["model.layer1",
            "model.layer4"]``), one card row and one set of table columns each (see
            ``EigenCAMMonitor`` and docs/layers.md).
        **logger_kwargs: Passed to ``EigenCAMLogger`` (``colormap``, ``alpha``,
            ``log_every_n_epochs``, ``run_id``, ``tracking_uri``, ``strict``...).

    Raises:
        TypeError / ValueError: Bad arguments, naming the value.

    Errors found only once the model is known (a ``target_layer`` name it does not have, no
    layer with a spatial output, a batch ``batch_to_xy`` cannot split) warn once with an
    ``EigenCAMWarning`` naming the value and switch the callback off for the rest of that
    stage, so training goes on; with ``strict=True`` they raise.
    """

    def __init__(
        self,
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
        batch_to_xy: Optional[BatchToXY] = None,
        faithfulness: Union[bool, Sequence[float]] = True,
        layers: Optional[Sequence[Union[nn.Module, str]]] = None,
        **logger_kwargs: Any,
    ) -> None:
        from mlflow_eigencam.logger import EigenCAMLogger
        from mlflow_eigencam.metrics import check_fractions

        from .torch.monitor import _check_layers

        _check_layers(target_layer, layers)  # both, or a bad list: fail here, naming them
        self._layers = None if layers is None else list(layers)
        if batch_to_xy is not None and not callable(batch_to_xy):
            raise TypeError(f"batch_to_xy must be callable or None, got {type(batch_to_xy).__name__}")
        if target_layer is not None and not isinstance(target_layer, (str, nn.Module)):
            raise TypeError(
                f"target_layer must be an nn.Module, a dotted name or None, got "
                f"{type(target_layer).__name__}"
            )
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError(
                f"reshape_transform must be callable or None, got {type(reshape_transform).__name__}"
            )
        if not isinstance(pin_samples, bool):
            raise TypeError(f"pin_samples must be a bool, got {pin_samples!r}")
        if not isinstance(faithfulness, bool):
            check_fractions(faithfulness)  # fail here, naming the value
        self._faithfulness = faithfulness
        self._logger_kwargs = dict(
            n_components=n_components,
            n_samples=n_samples,
            label_mapping=label_mapping,
            mode=mode,
            ds_id=ds_id,
            **logger_kwargs,
        )
        self._logger_kwargs.setdefault("image_layout", "NCHW")
        # Build (and drop) one logger now so that bad settings fail here, not mid-fit.
        EigenCAMLogger(**self._logger_kwargs).close()
        self._target_layer = target_layer
        self._reshape = reshape_transform
        self._pin = pin_samples
        self._denormalize = denormalize
        self._n_samples = n_samples
        self._batch_to_xy = batch_to_xy or default_batch_to_xy
        self._monitor: Optional[EigenCAMMonitor] = None
        self._module: Optional[nn.Module] = None
        self._ctx: Any = None
        self._run_id: Optional[str] = logger_kwargs.get("run_id")
        self._strict = bool(logger_kwargs.get("strict", False))
        self._disabled = False
        self._undelivered: Optional[int] = None

    # ----------------------------------------------------------------- properties

    @property
    def monitor(self) -> Optional[EigenCAMMonitor]:
        """The monitor of the current stage (None on other ranks and outside fit/test...)."""
        return self._monitor

    @property
    def undelivered(self) -> Optional[int]:
        """What the last stage did not deliver to MLflow, as its monitor's ``close()`` returned
        it when the stage ended (``teardown``): an int, 0 when everything arrived, that is a
        :class:`~mlflow_eigencam.sink.Undelivered` (``.records``, ``.message()``) when there
        was something to send; None before a stage ended on this rank."""
        return self._undelivered

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run the images went to (None before anything was logged)."""
        if self._monitor is not None and self._monitor.run_id is not None:
            return self._monitor.run_id
        return self._run_id

    # ----------------------------------------------------------------- set-up

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Build the monitor on global rank zero (nothing on other ranks)."""
        if not trainer.is_global_zero:
            return
        self._disabled = False
        self._guard("setup", self._setup, trainer, pl_module)

    def _setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._monitor is not None and self._module is pl_module:
            return
        self._close_monitor()
        from mlflow_eigencam.logger import EigenCAMLogger

        kwargs = dict(self._logger_kwargs)
        run_id, tracking_uri = self._mlflow_target(trainer)
        if run_id is not None:
            kwargs["run_id"] = run_id
            if tracking_uri is not None:
                kwargs["tracking_uri"] = tracking_uri
        logger = EigenCAMLogger(**kwargs)
        self._monitor = EigenCAMMonitor(
            pl_module,
            self._target_layer,
            n_samples=self._n_samples,
            reshape_transform=self._reshape,
            pin_samples=self._pin,
            denormalize=self._denormalize,
            logger=logger,
            preds_from_output=True,
            faithfulness=self._faithfulness,
            layers=self._layers,
        )
        self._module = pl_module

    def _mlflow_target(self, trainer: "pl.Trainer") -> Tuple[Optional[str], Optional[str]]:
        """(run_id, tracking_uri): a MLFlowLogger's run, else this callback's earlier run."""
        for lg in getattr(trainer, "loggers", None) or []:
            if isinstance(lg, MLFlowLogger):
                run_id = lg.run_id  # creates Lightning's run now if it has not yet
                return run_id, getattr(lg, "_tracking_uri", None)
        if self._run_id is not None:
            return self._run_id, self._logger_kwargs.get("tracking_uri")
        return None, None  # the logger takes the active run, else starts one

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """A second ``fit`` in one run (fine-tuning) continues the steps after the logged
        epochs; a resumed one (from a checkpoint) keeps its own (``EigenCAMLogger.begin_fit``)."""
        if trainer.is_global_zero:
            self._guard("on_fit_start", self._begin_fit)

    def _begin_fit(self) -> None:
        if self._monitor is not None:
            self._monitor.begin_fit()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Remove hooks and flush; the next stage builds a new monitor on the same run."""
        self._close_monitor()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        """Never leave a hook on the model when training fails."""
        self._close_ctx()

    def _close_monitor(self) -> None:
        self._close_ctx()
        if self._monitor is not None:
            monitor, self._monitor, self._module = self._monitor, None, None
            self._run_id = monitor.run_id or self._run_id
            self._undelivered = monitor.close()

    def _guard(self, where: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run one hook's work; an error warns once and turns the callback off for this stage
        (``strict=True`` raises instead), so a bad layer name or batch never stops training."""
        if self._disabled:
            return
        try:
            fn(*args)
        except Exception as exc:
            if self._strict:
                raise
            self._disabled = True
            try:
                self._close_monitor()
            except Exception:  # pragma: no cover - closing is best effort here
                pass
            message = (f"mlflow_eigencam: EigenCAMCallback {where} failed "
                       f"({type(exc).__name__}: {exc}); no EigenCAM images for the rest of "
                       "this stage, training goes on.")
            _log.warning(message)
            warnings.warn(message, EigenCAMWarning, stacklevel=2)

    # ----------------------------------------------------------------- batches

    def _ds_id(self, trainer: "pl.Trainer", stage: str, dataloader_idx: int) -> str:
        base = _STAGES[stage][1]
        loaders = {
            "train": lambda: trainer.train_dataloader,
            "validation": lambda: trainer.val_dataloaders,
            "test": lambda: trainer.test_dataloaders,
            "predict": lambda: trainer.predict_dataloaders,
        }[stage]()
        if isinstance(loaders, Mapping) and stage != "train":
            names = list(loaders)
            if 0 <= dataloader_idx < len(names):
                return str(names[dataloader_idx])
        if isinstance(loaders, (list, tuple)) and len(loaders) > 1:
            return f"{base}_{dataloader_idx}"
        return base

    def _begin(self, trainer: "pl.Trainer", stage: str, dataloader_idx: int = 0) -> None:
        if self._monitor is None or trainer.sanity_checking:
            return
        self._guard(f"on_{stage}_batch_start", self._begin_batch, trainer, stage, dataloader_idx)

    def _begin_batch(self, trainer: "pl.Trainer", stage: str, dataloader_idx: int) -> None:
        self._close_ctx()  # a previous batch that never ended (skipped step)
        assert self._monitor is not None
        mode = _STAGES[stage][0]
        ctx = self._monitor.capture(mode, self._ds_id(trainer, stage, dataloader_idx))
        ctx.__enter__()
        self._ctx = ctx

    def _end(self, outputs: Any, batch: Any, stage: str) -> None:
        if self._ctx is None or self._monitor is None:
            return
        self._guard(f"on_{stage}_batch_end", self._end_batch, outputs, batch)

    def _end_batch(self, outputs: Any, batch: Any) -> None:
        assert self._monitor is not None
        try:
            if self._monitor._capture is None:
                return  # filtered out / buffer full / pinned: nothing to read from the batch
            x, y = self._batch_to_xy(batch)
            preds = None
            if self._monitor._capture.output is None:
                preds = _step_preds(outputs, len(x) if image_list(x) else int(x.shape[0]))
            self._monitor.update(images=x, labels=y, preds=preds)
        finally:
            self._close_ctx()

    def _close_ctx(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def _epoch_end(self, trainer: "pl.Trainer", stage: str) -> None:
        if self._monitor is None or trainer.sanity_checking:
            return
        self._close_ctx()
        monitor = self._monitor
        epoch, mode = trainer.current_epoch, _STAGES[stage][0]
        self._guard(f"on_{stage}_epoch_end", lambda: monitor.epoch_end(epoch, mode=mode))

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                             batch: Any, batch_idx: int) -> None:
        """Hook the target layer when the mode filter lets "train" in."""
        self._begin(trainer, "train")

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Hand the kept samples to the logger and unhook."""
        self._end(outputs, batch, "train")

    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                  batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Hook the target layer for this validation batch."""
        self._begin(trainer, "validation", dataloader_idx)

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        """Hand the kept samples to the logger and unhook."""
        self._end(outputs, batch, "validation")

    def on_test_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                            batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Hook the target layer for this test batch."""
        self._begin(trainer, "test", dataloader_idx)

    def on_test_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                          outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Hand the kept samples to the logger and unhook."""
        self._end(outputs, batch, "test")

    def on_predict_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                               batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Hook the target layer for this predict batch."""
        self._begin(trainer, "predict", dataloader_idx)

    def on_predict_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                             outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        """Hand the kept samples to the logger and unhook."""
        self._end(outputs, batch, "predict")

    # ----------------------------------------------------------------- epochs

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Log the training samples (when "train" passes the filter) at step current_epoch."""
        self._epoch_end(trainer, "train")

    def on_validation_epoch_end(self, trainer: "pl.Trainer",
                                pl_module: "pl.LightningModule") -> None:
        """Log every validation dataset at step current_epoch (not during the sanity check)."""
        self._epoch_end(trainer, "validation")

    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Log every test dataset at step current_epoch."""
        self._epoch_end(trainer, "test")

    def on_predict_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Log every predict dataset at step current_epoch."""
        self._epoch_end(trainer, "predict")


def autolog_add_callback(original: Callable[..., Any], trainer: Any, args: tuple, kw: Dict[str, Any],
                         settings: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any], Optional[Callable[[], None]]]:
    """autolog's entry for Lightning: an :class:`EigenCAMCallback` on the trainer for this
    ``fit`` only (one the user passed is not duplicated)."""
    if any(isinstance(cb, EigenCAMCallback) for cb in trainer.callbacks):
        return args, kw, None
    settings = dict(settings)
    callback = EigenCAMCallback(target_layer=settings.pop("layer", None), **settings)
    trainer.callbacks.append(callback)

    def undo() -> None:
        # Leave the trainer as it was: a later fit (autolog off, or a new config) starts clean.
        if callback in trainer.callbacks:
            trainer.callbacks.remove(callback)

    return args, kw, undo
