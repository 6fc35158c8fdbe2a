"""``mlflow_eigencam.autolog()``: add the EigenCAM callback to Keras and Lightning ``fit``.

Follows MLflow's autologging conventions: frameworks are patched when (and only if) they
are imported, never imported here; ``disable=True`` turns it off; an error inside the patch
warns and ``fit`` runs as if autolog were off; a callback the user passed is not duplicated.

Plain PyTorch loops have no ``fit`` to patch: use
:class:`mlflow_eigencam.pytorch.EigenCAMMonitor` there.

Why wrappers stay installed: ``mlflow.autolog()`` patches the same ``fit`` methods. Restoring
the original on ``disable=True`` would also remove MLflow's patch when it was applied after
ours, so the wrapper stays and becomes a pass-through.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from .sink import EigenCAMWarning

_log = logging.getLogger("mlflow_eigencam")

#: Module names whose import triggers a patch, and the patch to apply.
_KERAS_MODULES = ("keras",)
_LIGHTNING_MODULES = ("lightning.pytorch", "pytorch_lightning")
_WRAPPED_ATTR = "__mlflow_eigencam_wrapped__"

_config: Dict[str, Any] = {"enabled": False, "silent": False, "kwargs": {}}
_lock = threading.Lock()
_local = threading.local()  # re-entrancy guard (fit calling fit)


def autolog(
    n_components: Union[int, float] = 3,
    n_samples: Optional[int] = 5,
    label_mapping: Union[Mapping[str, Any], Sequence[str], None] = None,
    mode: Any = "!train",
    layer: Any = None,
    log_every_n_epochs: int = 1,
    disable: bool = False,
    silent: bool = False,
    **kwargs: Any,
) -> None:
    """Log EigenCAM overlays from every ``keras.Model.fit`` and ``lightning.Trainer.fit``.

    Args:
        n_components: Principal components per sample (int >= 1 or a float in (0, 1)).
        n_samples: Samples per (mode, dataset id) and epoch.
        label_mapping: ``{name: index}`` or a sequence of class names.
        mode: Mode filter: None, ``"eval"``, ``{"eval", "test"}``, ``"!train"``.
        layer: Layer to explain (a name; for Lightning a dotted module name); None picks
            the last convolution-like layer.
        log_every_n_epochs: Log epochs 0, n, 2n, ...
        disable: Turn autologging off (the patched ``fit`` becomes a pass-through).
        silent: No log output or warnings from autolog itself.
        **kwargs: Passed to the callbacks and :class:`~mlflow_eigencam.EigenCAMLogger`
            (``ds_id``, ``colormap``, ``alpha``, ``denormalize``, ...).

    Raises:
        ValueError / TypeError: Bad settings, checked now (naming the value).
    """
    settings = dict(n_components=n_components, n_samples=n_samples, label_mapping=label_mapping,
                    mode=mode, log_every_n_epochs=log_every_n_epochs, **kwargs)
    if not disable:
        # Validate now, not in the middle of someone's fit. The logger checks every setting
        # it knows; the framework-specific ones are checked when the callback is built.
        from .logger import EigenCAMLogger

        logger_keys = set(inspect.signature(EigenCAMLogger).parameters)
        EigenCAMLogger(**{k: v for k, v in settings.items() if k in logger_keys}).close()
    with _lock:
        _config.update(enabled=not disable, silent=bool(silent),
                       kwargs=settings, layer=layer)
    if disable:
        return
    from mlflow.utils.import_hooks import register_post_import_hook

    for name in _KERAS_MODULES:
        register_post_import_hook(_patch_keras, name, overwrite=True)
    for name in _LIGHTNING_MODULES:
        register_post_import_hook(_patch_lightning, name, overwrite=True)
    _info("mlflow_eigencam autologging enabled for Keras and Lightning (plain PyTorch loops: "
          "use mlflow_eigencam.pytorch.EigenCAMMonitor)")


def is_enabled() -> bool:
    """True while autologging is on."""
    return bool(_config["enabled"])


def _info(msg: str) -> None:
    if not _config["silent"]:
        _log.info(msg)


def _warn(msg: str) -> None:
    if not _config["silent"]:
        warnings.warn(msg, EigenCAMWarning, stacklevel=3)
        _log.warning(msg)


def _wrap_fit(cls: type, add_callback: Callable[..., Any]) -> None:
    """Replace ``cls.fit`` by a wrapper that calls ``add_callback`` when autolog is on."""
    original = cls.__dict__.get("fit")
    if original is None:
        original = cls.fit
    if getattr(original, _WRAPPED_ATTR, False):
        return

    @functools.wraps(original)
    def fit(self: Any, *args: Any, **kw: Any) -> Any:
        if not _config["enabled"] or getattr(_local, "active", False):
            return original(self, *args, **kw)
        _local.active = True
        try:
            try:
                args, kw, undo = add_callback(original, self, args, kw)
            except Exception as exc:  # autolog must never break fit
                _warn(f"mlflow_eigencam autolog could not add the EigenCAM callback "
                      f"({type(exc).__name__}: {exc}); fit runs without it")
                undo = None
            try:
                return original(self, *args, **kw)
            finally:
                if undo is not None:
                    undo()
        finally:
            _local.active = False

    setattr(fit, _WRAPPED_ATTR, True)
    cls.fit = fit


# -- Keras -------------------------------------------------------------------------------
def _patch_keras(module: Any) -> None:
    try:
        import keras

        _wrap_fit(keras.Model, _keras_add_callback)
    except Exception as exc:
        _warn(f"mlflow_eigencam autolog could not patch keras.Model.fit: {exc}")


def _keras_add_callback(original: Callable, model: Any, args: tuple, kw: dict):
    from .integrations.keras import EigenCAMCallback

    bound = inspect.signature(original).bind_partial(model, *args, **kw)
    arguments = bound.arguments
    callbacks = list(arguments.get("callbacks") or [])
    if any(isinstance(cb, EigenCAMCallback) for cb in callbacks):
        return args, kw, None  # the user passed one: no duplicate
    settings = dict(_config["kwargs"])
    callback = EigenCAMCallback(layer=_config.get("layer"), **settings)
    callback._set_fit_data(x=arguments.get("x"), y=arguments.get("y"),
                           validation_data=arguments.get("validation_data"),
                           validation_split=arguments.get("validation_split") or 0.0)
    arguments["callbacks"] = callbacks + [callback]  # a new list: the user's is untouched
    new_args = bound.args[1:]
    return new_args, dict(bound.kwargs), None


# -- Lightning ---------------------------------------------------------------------------
def _patch_lightning(module: Any) -> None:
    try:
        trainer_cls = module.Trainer
        _wrap_fit(trainer_cls, _lightning_add_callback)
    except Exception as exc:
        _warn(f"mlflow_eigencam autolog could not patch {module.__name__}.Trainer.fit: {exc}")


def _lightning_add_callback(original: Callable, trainer: Any, args: tuple, kw: dict):
    from .integrations.lightning import EigenCAMCallback

    if any(isinstance(cb, EigenCAMCallback) for cb in trainer.callbacks):
        return args, kw, None
    settings = dict(_config["kwargs"])
    callback = EigenCAMCallback(target_layer=_config.get("layer"), **settings)
    trainer.callbacks.append(callback)

    def undo() -> None:
        # Leave the trainer as it was: a later fit (autolog off, or a new config) starts clean.
        if callback in trainer.callbacks:
            trainer.callbacks.remove(callback)

    return args, kw, undo
