"""``mlflow_eigencam.autolog()``: add the EigenCAM callback to every registered framework's ``fit``
(Keras, Lightning, Hugging Face ``Trainer.train``, Ultralytics ``YOLO.train``; see
:data:`INTEGRATIONS`).

Follows MLflow's autologging conventions (``mlflow/utils/autologging_utils``): frameworks are
patched when (and only if) they are imported, never imported here; ``disable=True`` turns it
off; an error inside the patch warns (once per kind) and ``fit`` runs as if autolog were off;
a callback the user passed is not duplicated. Data is logged under the dataset ids of the
convention (validation ``"val"``, training ``"train"``, test ``"test"``: docs/dataset-ids.md).

Plain PyTorch loops have no ``fit`` to patch: use
:class:`mlflow_eigencam.pytorch.EigenCAMMonitor` there.

Adding a framework is one :class:`Integration` entry in :data:`INTEGRATIONS` plus one
function in its integration module with the :data:`AddCallback` signature; nothing else here
changes. That function may raise (the wrapper warns and runs ``fit`` unchanged) but must not
change the user's objects beyond adding its callback for this one ``fit``: it returns the
arguments to call ``fit`` with and, if it changed the owner (Lightning appends to
``trainer.callbacks``), an ``undo`` that puts it back.

Why wrappers stay installed: ``mlflow.autolog()`` patches the same ``fit`` methods. Restoring
the original on ``disable=True`` would also remove MLflow's patch when it was applied after
ours, so the wrapper stays and becomes a pass-through.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

from .errors import WarnOnce

_log = logging.getLogger("mlflow_eigencam")

#: What ``fit`` is called with after the callback was added, and what to undo once it ends.
FitCall = Tuple[tuple, Dict[str, Any], Optional[Callable[[], None]]]
#: ``add_callback(original_fit, owner, args, kwargs, settings) -> (args, kwargs, undo)``: puts
#: the framework's EigenCAM callback into one ``fit`` call. ``owner`` is the object ``fit`` was
#: called on (a ``keras.Model``, a ``Trainer``); ``args`` / ``kwargs`` are ``fit``'s own
#: (without ``owner``); ``settings`` are autolog's arguments (``layer`` included), a fresh
#: dict each call. ``undo`` (or None) runs after ``fit`` returns or raises.
AddCallback = Callable[[Callable[..., Any], Any, tuple, Dict[str, Any], Dict[str, Any]], FitCall]


@dataclass(frozen=True)
class Integration:
    """One framework's autolog entry.

    Attributes:
        name: Shown in autolog's messages (``"Keras"``).
        modules: Importing any of these patches the framework (MLflow's post-import hooks);
            nothing is imported to find out.
        fit_owner: The class of that module whose ``fit`` is wrapped (``"Model"``).
        add_callback: ``"module:function"`` with the :data:`AddCallback` signature, imported
            only when a wrapped ``fit`` runs with autolog on (so the framework's integration
            module is never imported before the user's ``fit``).
    """

    name: str
    modules: Tuple[str, ...]
    fit_owner: str
    add_callback: str
    method: str = "fit"  # the method of ``fit_owner`` wrapped (Trainer and YOLO: "train")


#: The registry: a new framework is one entry here (plus its integration module).
INTEGRATIONS: Tuple[Integration, ...] = (
    Integration("Keras", ("keras",), "Model", "mlflow_eigencam.integrations.keras:autolog_add_callback"),
    Integration("Lightning", ("lightning.pytorch", "pytorch_lightning"), "Trainer",
                "mlflow_eigencam.integrations.lightning:autolog_add_callback"),
    Integration("Transformers", ("transformers.trainer",), "Trainer",
                "mlflow_eigencam.integrations.transformers:autolog_add_callback", method="train"),
    # evaluate() after train() or without it (inside train() the wrapper passes straight through).
    Integration("Transformers", ("transformers.trainer",), "Trainer",
                "mlflow_eigencam.integrations.transformers:autolog_add_callback",
                method="evaluate"),
    Integration("Ultralytics", ("ultralytics.engine.model",), "Model",
                "mlflow_eigencam.integrations.ultralytics:autolog_add_callback", method="train"),
)

_WRAPPED_ATTR = "__mlflow_eigencam_wrapped__"

_config: Dict[str, Any] = {"enabled": False, "silent": False, "kwargs": {}}
_lock = threading.Lock()
_local = threading.local()  # re-entrancy guard (fit calling fit)
#: autolog's own warnings, once per kind until the next ``autolog()`` call.
_warnings = WarnOnce()


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
        mode: Mode filter: None, ``"eval"``, ``{"eval", "test"}``, ``"!train"``. Data is
            logged under the convention's modes and dataset ids (validation: ``eval`` /
            ``val``; training: ``train`` / ``train``; docs/dataset-ids.md).
        layer: Layer to explain (Keras: a layer name or ``"name:input"``; Lightning: a dotted
            module name); None: each callback's default (Keras: the feature map the
            classifier head takes; Lightning: the last convolution-like layer).
        log_every_n_epochs: Log epochs 0, n, 2n, ...
        disable: Turn autologging off (the patched ``fit`` becomes a pass-through).
        silent: No log output or warnings from autolog itself.
        **kwargs: Passed to the callbacks and :class:`~mlflow_eigencam.EigenCAMLogger`
            (``ds_id``, ``colormap``, ``alpha``, ``denormalize``, ...).

    Raises:
        ValueError / TypeError: Bad settings, checked now (naming the value). Settings only
            one framework's callback knows are checked when its ``fit`` runs: a bad one then
            warns and ``fit`` runs without the callback.
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
        _warnings.reset()  # a new configuration: its problems are worth one warning each
    if disable:
        return
    from mlflow.utils.import_hooks import register_post_import_hook

    for integration in INTEGRATIONS:
        for name in integration.modules:
            register_post_import_hook(functools.partial(_patch, integration), name, overwrite=True)
    names = " and ".join(dict.fromkeys(i.name for i in INTEGRATIONS))  # Transformers has two entries
    _info(f"mlflow_eigencam autologging enabled for {names} (plain PyTorch loops: "
          "use mlflow_eigencam.pytorch.EigenCAMMonitor)")


def is_enabled() -> bool:
    """True while autologging is on."""
    return bool(_config["enabled"])


def _info(msg: str) -> None:
    if not _config["silent"]:
        _log.info(msg)


def _warn(key: Any, msg: str) -> None:
    """Warn once per ``key`` (and log it), unless autolog was called with ``silent=True``."""
    if not _config["silent"]:
        _warnings.warn(key, msg, stacklevel=3)


def _patch(integration: Integration, module: Any) -> None:
    """Wrap ``module.<fit_owner>.<method>`` (called by MLflow's import hook; never raises)."""
    try:
        owner = getattr(module, integration.fit_owner)
        _wrap_fit(owner, functools.partial(_add_callback, integration), integration.method)
    except Exception as exc:
        _warn(("patch", integration.name, type(exc).__name__),
              f"mlflow_eigencam autolog could not patch "
              f"{module.__name__}.{integration.fit_owner}.{integration.method}: {exc}")


def _add_callback(integration: Integration, original: Callable[..., Any], owner: Any, args: tuple,
                  kw: Dict[str, Any]) -> FitCall:
    """Import the integration's add-callback function and call it with autolog's settings."""
    module, function = integration.add_callback.split(":")
    add: AddCallback = getattr(importlib.import_module(module), function)
    settings = dict(_config["kwargs"], layer=_config.get("layer"))
    return add(original, owner, args, kw, settings)


def _wrap_fit(cls: Any, add_callback: Callable[[Callable[..., Any], Any, tuple, Dict[str, Any]], FitCall],
              method: str = "fit") -> None:
    """Replace ``cls.<method>`` (``fit``, or ``train`` for Trainer / YOLO) by a wrapper that
    calls ``add_callback`` when autolog is on.

    The wrapper never lets autolog break ``fit``: an error while adding the callback, or in
    its ``undo``, warns once and ``fit`` runs (or returns, or raises) exactly as it would
    without autolog. ``fit`` called from inside ``fit`` passes straight through.
    """
    original = cls.__dict__.get(method)
    if original is None:
        original = getattr(cls, method)  # inherited (keras.Model's fit lives in the backend's Trainer)
    if getattr(original, _WRAPPED_ATTR, False):
        return

    @functools.wraps(original)
    def fit(self: Any, *args: Any, **kw: Any) -> Any:
        if not _config["enabled"] or getattr(_local, "active", False):
            return original(self, *args, **kw)
        _local.active = True
        try:
            undo: Optional[Callable[[], None]] = None
            try:
                args, kw, undo = add_callback(original, self, args, kw)
            except Exception as exc:  # autolog must never break fit
                _warn(("add", type(exc).__name__),
                      f"mlflow_eigencam autolog could not add the EigenCAM callback "
                      f"({type(exc).__name__}: {exc}); fit runs without it")
            try:
                return original(self, *args, **kw)
            finally:
                if undo is not None:
                    try:
                        undo()
                    except Exception as exc:  # nor hide what fit returned or raised
                        _warn(("undo", type(exc).__name__),
                              f"mlflow_eigencam autolog could not remove its callback after fit "
                              f"({type(exc).__name__}: {exc})")
        finally:
            _local.active = False

    setattr(fit, _WRAPPED_ATTR, True)
    setattr(cls, method, fit)
