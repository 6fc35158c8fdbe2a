"""Keras 3 callback that logs EigenCAM overlays at every epoch end (TensorFlow, JAX, torch).

Keras callbacks never see the batches, so the callback takes its samples from data once
(``validation_data`` / ``train_data``, or what ``fit`` was given when autolog adds it) and
keeps them pinned: the same images are explained at every epoch, so epochs can be compared.
At each epoch end it runs one forward pass over those samples (``training=False``), taking the
target layer's activations and the model's predictions together, and hands them to the
framework-free :class:`~mlflow_eigencam.logger.EigenCAMLogger`.

How the activations are read, without changing the model:

* the tensor is part of the model's own graph (functional and ``Sequential`` models): a probe
  ``keras.Model(model.input, [tensor, *model.outputs])``, built once, sharing weights. The
  tensor can be a layer's output, the input of a layer (the default: what the head pools), or
  the output of an op that no layer owns (``inputs + branch`` in ConvNeXt);
* otherwise (a layer inside a nested sub-model, the layers of a subclassed model):
  during the probe's forward pass only, the layer instance's ``call`` is wrapped to keep its
  output, and the wrapper is removed in a ``finally`` block. Weights, layers, ``trainable``
  flags and the compile state are never touched.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import keras
import numpy as np

from .. import _layout
from ..eigencam import _lapack_threads, eigencam
from ..errors import WarnOnce
from ..filters import FilterSpec, mode_filter
from ..logger import EigenCAMLogger
from ..metrics import DEFAULT_FRACTIONS, check_fractions, faithfulness_scores, perturbed_batch, upsample
from .keras_data import Samples, split_at, take_samples

__all__ = ["EigenCAMCallback", "PROBE_BATCH_SIZE", "autolog_add_callback"]

#: (mode, ds_id) of a set of samples: ``("eval", "val")``, ``("train", "train")``, ...
Key = Tuple[str, str]
#: Samples per forward pass of the probe (n_samples=None can mean thousands of images).
PROBE_BATCH_SIZE = 32
#: Logger arguments the callback decides itself (it always hands over NHWC arrays).
_FIXED_LOGGER_KWARGS = ("channels_last", "image_layout")


# --------------------------------------------------------------------------- layers


def _walk(model: Any, parents: Tuple[Any, ...] = ()) -> Iterator[Tuple[Any, Tuple[Any, ...]]]:
    """Every layer of ``model``, nested models included (depth first), with its parents."""
    for layer in getattr(model, "layers", []):
        yield layer, parents
        if isinstance(layer, keras.Model):
            yield from _walk(layer, parents + (layer,))


def _static_shape(layer: Any) -> Optional[Tuple[Optional[int], ...]]:
    """The layer's symbolic output shape, or None when Keras does not know it."""
    try:
        out = layer.output
    except Exception:  # never called symbolically (the layers of a subclassed model)
        return None
    if isinstance(out, (list, tuple, dict)):
        return None
    return tuple(out.shape)


def _data_format(layer: Any) -> str:
    return getattr(layer, "data_format", None) or keras.config.image_data_format()


def _is_spatial(shape: Optional[Sequence[Optional[int]]], data_format: str) -> bool:
    """A 4-D output whose height and width are both > 1 (None counts as unknown, fine)."""
    if shape is None or len(shape) != 4:
        return False
    h, w = (shape[1], shape[2]) if data_format == "channels_last" else (shape[2], shape[3])
    return all(s is None or s > 1 for s in (h, w))


def _layer_path(layer: Any, parents: Tuple[Any, ...]) -> str:
    return "/".join([p.name for p in parents] + [layer.name])


@contextlib.contextmanager
def _capture(layers: Sequence[Any], which: str = "output") -> Iterator[List[Tuple[Any, Any]]]:
    """Record ``(layer, output)`` (or ``(layer, input)``) of every call of ``layers`` while
    the block runs.

    Wraps each layer instance's ``call`` (an instance attribute shadowing the class method,
    set with ``object.__setattr__`` so Keras' attribute tracking never sees it) and removes
    the wrappers on exit, whatever happens; the model is as before afterwards.
    """
    record: List[Tuple[Any, Any]] = []
    patched: List[Tuple[Any, Any, bool]] = []

    def wrap(layer: Any, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if which == "input":
                record.append((layer, args[0] if args else next(iter(kwargs.values()), None)))
            else:
                record.append((layer, out))
            return out

        return call

    try:
        for layer in layers:
            had_own = "call" in vars(layer)
            original = layer.call
            object.__setattr__(layer, "call", wrap(layer, original))
            patched.append((layer, original, had_own))
        yield record
    finally:
        for layer, original, had_own in reversed(patched):
            if had_own:
                object.__setattr__(layer, "call", original)
            else:
                object.__delattr__(layer, "call")


#: Layers that turn a feature map into a vector for the classifier head: the tensor they
#: take is what the model's prediction is computed from, so it is the default to explain.
_HEAD_LAYERS = ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten")
#: ``layer="name:input"`` explains the tensor a layer takes, ``"name:output"`` what it gives.
_WHICH = ("input", "output")


@dataclass
class _Target:
    """What the callback explains.

    Attributes:
        path: The name shown in the tag and in errors: a layer path (``"backbone/conv2"``),
            ``"layer_name:input"`` for the tensor a layer takes, or an op's name.
        layer: The layer whose output (or input) is captured at call time, or None when
            ``tensor`` is read from a probe model.
        tensor: A KerasTensor of the model's own graph (read with a probe model sharing the
            model's weights), or None.
        which: ``"output"`` or ``"input"`` of ``layer`` (only for capture).
        data_format: ``"channels_last"`` or ``"channels_first"`` of the activations.
    """

    path: str
    layer: Any = None
    tensor: Any = None
    which: str = "output"
    data_format: str = "channels_last"


def _is_keras_tensor(obj: Any) -> bool:
    return isinstance(obj, keras.KerasTensor)


def _single_tensor(value: Any) -> Any:
    """``value`` if it is one KerasTensor, else None (lists, dicts, no symbolic graph)."""
    return value if _is_keras_tensor(value) else None


def _symbolic(layer: Any, which: str) -> Any:
    """The layer's symbolic input / output in its model's graph, or None (shared, never called)."""
    try:
        return _single_tensor(layer.input if which == "input" else layer.output)
    except (AttributeError, ValueError, RuntimeError):
        return None


def _producer(tensor: Any) -> Any:
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def _split_spec(spec: str) -> Tuple[str, str]:
    """``"name:input"`` -> ``("name", "input")``; a plain name is its output."""
    name, sep, which = spec.rpartition(":")
    if sep and which in _WHICH and name:
        return name, which
    return spec, "output"


def _single_output(out: Any) -> Optional[np.ndarray]:
    """The model's prediction as one (B,) / (B, K) array, or None (multi-output, masks)."""
    if isinstance(out, (list, tuple)):
        if len(out) != 1:
            return None
        out = out[0]
    if isinstance(out, Mapping):
        return None
    arr = np.asarray(keras.ops.convert_to_numpy(out))
    return arr if 1 <= arr.ndim <= 2 else None


def _is_chief() -> bool:
    """False on the non-chief workers of a multi-worker strategy (read from ``TF_CONFIG``).

    Single-process strategies (``MirroredStrategy``) call callbacks once, so they are chief.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return True
    try:
        config = json.loads(raw)
        task = config.get("task") or {}
        kind, index = task.get("type"), int(task.get("index", 0))
        if kind in (None, "chief"):
            return True
        if kind == "worker":
            return index == 0 and "chief" not in (config.get("cluster") or {})
        return False  # parameter servers and evaluators
    except (ValueError, TypeError, AttributeError):
        return True


# --------------------------------------------------------------------------- the callback


class EigenCAMCallback(keras.callbacks.Callback):
    """Log EigenCAM overlays of a convolution layer to MLflow at every epoch end.

    Args:
        validation_data: Where the ``"eval"`` samples come from, logged under dataset id
            ``"val"`` (the convention of every integration, docs/dataset-ids.md): ``(x, y)`` /
            ``(x, y, sample_weight)`` arrays, a ``tf.data.Dataset`` yielding batches, a
            ``keras.utils.PyDataset``, a generator function (``gen``, called once for a fresh
            iterator), or a mapping ``{ds_id: data}`` for several datasets (its keys are the
            ids). Generator objects (``gen()``) and other one-shot iterators are refused
            (``TypeError``): they cannot be read without consuming the user's data. None: use
            what ``fit`` was given (see :meth:`use_fit_data`, which autolog calls).
        layer: What to explain. None (the default): the feature map the classifier head
            takes, i.e. the input of the last ``GlobalAveragePooling2D`` /
            ``GlobalMaxPooling2D`` / ``Flatten`` layer whose input is 4-D with height and
            width > 1, whatever op made it (in ConvNeXt the last block's ``inputs + branch``,
            which is no layer's output), or inside a nested backbone that pools itself
            (``"backbone/avg_pool:input"``); failing that (no such head, a subclassed model), the
            last top-level layer with such an output (a nested backbone model is picked as a
            whole). Or a layer name or path (nested models are searched) for its output;
            ``"name:input"`` for the tensor that layer takes (``"head_gap:input"``); the name
            of an op of a functional model (``"add_17"``); a layer object; or a
            ``KerasTensor`` of the model's graph (``model.get_layer("gap").input``, or a
            tensor kept while building the model), read through a probe model that shares
            the model's weights. ``target_layer`` says what was picked, in the form
            ``layer=`` accepts back.
        n_components: Principal components per sample (int >= 1, or a float in (0, 1)).
        n_samples: Samples taken once from each data source and explained at every epoch;
            None takes all of them.
        label_mapping: ``{name: index}`` or a sequence of class names, for captions.
        mode: Mode filter (``"eval"`` for validation data, ``"train"`` for ``train_data``):
            None, ``"eval"``, ``{"eval", "train"}``, ``"!train"``.
        ds_id: Dataset id filter, same forms as ``mode`` (``"val"``, ``"!train"``, ...).
        train_data: Where ``"train"`` samples come from, logged under dataset id ``"train"``
            (same forms as ``validation_data``); only read when ``mode`` lets ``"train"`` in.
        faithfulness: Score each sample's map with the model at each logged epoch end
            (docs/signals.md): one more forward (``training=False``) of ``2F n`` images with
            the map's top kept / dropped; True (fractions ``metrics.DEFAULT_FRACTIONS``), a
            sequence of fractions in (0, 1), or False. Only for one output of class scores
            ``(B, K)``.
        layers: Several layers side by side instead of one ``layer`` (not both), each in a
            form ``layer=`` takes (``["conv1", "conv2"]``): one card row, table columns
            (``conv2/evr_1``) and signals per layer (docs/layers.md); one more forward of
            the samples per further layer.
        **logger_kwargs: Passed to :class:`~mlflow_eigencam.logger.EigenCAMLogger`
            (``run_id``, ``colormap``, ``alpha``, ``log_every_n_epochs``, ``strict``, ...).

    Raises:
        TypeError: A generator as data, an unsupported data or layer type, or a logger
            argument the callback sets itself (``channels_last``, ``image_layout``).
        ValueError: Bad ``n_components`` / ``n_samples`` / filters, empty data.

    Note:
        Reading a ``tf.data.Dataset`` iterates it once more. A dataset built with
        ``shuffle(..., reshuffle_each_iteration=True)`` then shuffles differently in later
        epochs than without the callback; use arrays or an unshuffled dataset when runs must
        be bit-for-bit reproducible (this matters for training data only).
    """

    def __init__(
        self,
        validation_data: Any = None,
        layer: Union[str, "keras.layers.Layer", "keras.KerasTensor", None] = None,
        n_components: Union[int, float] = 3,
        n_samples: Optional[int] = 5,
        label_mapping: Union[Mapping[str, Any], Sequence[str], None] = None,
        mode: FilterSpec = "!train",
        ds_id: FilterSpec = None,
        train_data: Any = None,
        faithfulness: Union[bool, Sequence[float]] = True,
        layers: Optional[Sequence[Any]] = None,
        **logger_kwargs: Any,
    ) -> None:
        super().__init__()
        if layers is not None:
            if layer is not None:
                raise ValueError(f"give layer= (one layer) or layers= (several), not both: got "
                                 f"layer={layer!r} and layers={layers!r}")
            if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
                raise TypeError(f"layers must be a non-empty list of layers, got {layers!r}")
            layer = layers[0]
        self._more_specs = list(layers[1:]) if layers is not None else []
        self._fractions: Optional[Tuple[float, ...]] = (
            DEFAULT_FRACTIONS if faithfulness is True else None if faithfulness is False
            else check_fractions(faithfulness))
        for name in _FIXED_LOGGER_KWARGS:
            if name in logger_kwargs:
                raise TypeError(
                    f"EigenCAMCallback sets {name} itself (it hands NHWC arrays to the logger); "
                    f"got {name}={logger_kwargs[name]!r}")
        if any(spec is not None and not isinstance(spec, (str, keras.layers.Layer, keras.KerasTensor))
               for spec in [layer, *self._more_specs]):
            raise TypeError("layer must be a layer name ('name' or 'name:input'), a keras layer, a "
                            f"KerasTensor of the model or None, got {layer!r}")
        self._logger_args: Dict[str, Any] = dict(
            n_components=n_components, n_samples=n_samples, label_mapping=label_mapping,
            mode=mode, ds_id=ds_id, channels_last=True, image_layout="NHWC", **logger_kwargs)
        # The logger validates every setting now, so bad configuration fails here, loudly.
        # Non-chief workers of a multi-worker strategy never build one (rank zero only).
        self._chief = _is_chief()
        self._logger: Optional[EigenCAMLogger] = (
            EigenCAMLogger(**self._logger_args) if self._chief else None)
        self._mode_ok = mode_filter(mode)  # which modes are worth reading data for
        self.n_samples = n_samples
        self.layer = layer
        self._strict = bool(logger_kwargs.get("strict", False))
        self._explicit: Dict[Key, Samples] = {}
        self._from_fit: Dict[Key, Samples] = {}
        self._warnings = WarnOnce()
        self._target: Optional[_Target] = None
        self._target_path: Optional[str] = None
        self._forward: Optional[Callable[[np.ndarray], Tuple[np.ndarray, Any]]] = None
        self._more: List[Tuple[_Target, Callable[[np.ndarray], Tuple[Any, Any]]]] = []  # layers[1:]
        self._broken = False
        self._logger_closed = False
        if self._logger is not None:
            self._explicit.update(self._pin("eval", validation_data, "validation_data", raise_errors=True))
            if train_data is not None and not self._wants_mode("train"):
                self._warnings.warn("train_ignored",
                                    f"train_data is not used: mode={mode!r} filters out 'train' "
                                    "(pass mode=None or mode={'train', 'eval'})")
            self._explicit.update(self._pin("train", train_data, "train_data", raise_errors=True))

    # -- data ------------------------------------------------------------------------------
    @property
    def logger(self) -> Optional[EigenCAMLogger]:
        """The logger this callback feeds (None on non-chief workers)."""
        return self._logger

    @property
    def target_layer(self) -> Optional[str]:
        """Path of the layer being explained (``"backbone/conv2"`` when nested); None before fit."""
        return self._target_path

    @property
    def samples(self) -> Dict[Key, Samples]:
        """The samples explained at every epoch end, per ``(mode, ds_id)``:
        ``{("eval", "val"): Samples(x, y)}`` (a new dict; empty on non-chief workers)."""
        return {**self._from_fit, **self._explicit}

    def _wants_mode(self, mode: str) -> bool:
        # ds_id is only known per source; a mode is worth reading if any ds_id could pass.
        return self._logger is not None and bool(self._mode_ok(mode))

    def _pin(self, mode: str, data: Any, what: str, *, raise_errors: bool) -> Dict[Key, Samples]:
        """Samples per (mode, ds_id) from one argument (None, a source, or {ds_id: source}).

        One source is logged under the mode's conventional id (``"eval"`` -> ``"val"``,
        ``"train"`` -> ``"train"``: :data:`mlflow_eigencam._layout.DEFAULT_DS_IDS`).
        """
        if data is None or not self._wants_mode(mode):
            return {}
        sources: Dict[str, Any]
        if isinstance(data, Mapping):
            sources = {str(k): v for k, v in data.items()}
        else:
            sources = {_layout.default_ds_id(mode): data}
        pinned: Dict[Key, Samples] = {}
        for ds_id, source in sources.items():
            if self._logger is None or not self._logger.wants(mode, ds_id):
                continue
            label = f"{what}[{ds_id!r}]" if isinstance(data, Mapping) else what
            try:
                pinned[(mode, ds_id)] = take_samples(source, self.n_samples, what=label)
            except (TypeError, ValueError) as exc:
                if raise_errors:
                    raise
                self._warnings.warn(("fit_data", mode, type(exc).__name__),
                                    f"no {mode!r} samples from {label}: {exc}")
        return pinned

    def use_fit_data(self, x: Any = None, y: Any = None, validation_data: Any = None,
                     validation_split: float = 0.0) -> None:
        """Take samples from what ``fit`` is given; autolog calls this before each ``fit``.

        Call it yourself, before ``fit``, with ``fit``'s own arguments when the callback was
        built without data (``EigenCAMCallback()``). Mirrors ``fit``: ``validation_data``
        wins over ``validation_split``, which takes the last fraction of the ``x`` / ``y``
        arrays. ``"eval"`` samples (dataset id ``"val"``) come from there unless the callback
        was given ``validation_data``; ``"train"`` samples (dataset id ``"train"``) come from
        ``x`` / ``y`` (before the split) unless it was given ``train_data``, and only when
        ``mode`` lets ``"train"`` in. Calling it again (a new ``fit``) replaces what it took
        before. It never raises: data it cannot read (a generator, say) warns once and is
        skipped, so that ``fit`` runs whatever happens here.

        Args:
            x: ``fit``'s ``x``: arrays, a ``tf.data.Dataset``, a ``PyDataset``, ...
            y: ``fit``'s ``y`` (None when ``x`` yields ``(x, y)`` batches).
            validation_data: ``fit``'s ``validation_data``.
            validation_split: ``fit``'s ``validation_split``.
        """
        self._from_fit = {}
        if self._logger is None:
            return
        try:
            arrays = x is not None and not isinstance(x, (Mapping, list, tuple)) and hasattr(x, "shape")
            train: Any = None
            val: Any = validation_data
            if arrays:
                n = len(x)
                split = split_at(n, validation_split) if validation_split and validation_data is None else n
                train = (x[:split], None if y is None else y[:split])
                if validation_data is None and validation_split and 0 < split < n:
                    val = (x[split:], None if y is None else y[split:])
            elif x is not None:
                train = x if y is None else (x, y)
            got: Dict[Key, Samples] = {}
            if not any(k[0] == "eval" for k in self._explicit):
                got.update(self._pin("eval", val, "fit's validation data", raise_errors=False))
            if not any(k[0] == "train" for k in self._explicit):
                got.update(self._pin("train", train, "fit's x", raise_errors=False))
            self._from_fit = got
        except Exception as exc:  # autolog must never break fit
            self._fail(exc, "reading fit's data")

    # -- layer and probe ------------------------------------------------------------------
    def _graph_ok(self) -> bool:
        """Whether the model has one symbolic input to build probe models from."""
        try:
            return len(self.model.inputs) == 1 and _is_keras_tensor(self.model.inputs[0])
        except (AttributeError, ValueError, TypeError):
            return False

    def _describe(self, tensor: Any) -> str:
        """A name for a tensor of the model's graph that ``layer=`` accepts back."""
        top = list(self.model.layers)
        op = _producer(tensor)
        # (Not ``op.output is tensor``: a nested model's ``output`` is that of its own graph.)
        if op is not None and any(op is layer for layer in top):
            return op.name
        for layer in top:
            if _symbolic(layer, "input") is tensor:
                return f"{layer.name}:input"
        return str(getattr(op, "name", None) or getattr(tensor, "name", "tensor"))

    def _tensor_target(self, tensor: Any, path: Optional[str] = None,
                       data_format: Optional[str] = None) -> _Target:
        op = _producer(tensor)
        fmt = data_format or (getattr(op, "data_format", None) if isinstance(op, keras.layers.Layer) else None)
        return _Target(path or self._describe(tensor), tensor=tensor,
                       data_format=fmt or keras.config.image_data_format())

    def _layer_target(self, layer: Any, parents: Tuple[Any, ...], which: str) -> _Target:
        """A named layer's output (or input): from the graph when top level, else captured."""
        path = _layer_path(layer, parents) + (":input" if which == "input" else "")
        fmt = _data_format(layer)
        if which == "input" and layer.__class__.__name__ not in _HEAD_LAYERS:
            fmt = keras.config.image_data_format()  # a layer's data_format is about its output
        tensor = _symbolic(layer, which) if not parents and self._graph_ok() else None
        if tensor is not None:
            return _Target(path, tensor=tensor, data_format=fmt)
        return _Target(path, layer=layer, which=which, data_format=fmt)

    def _head_input(self) -> Optional[_Target]:
        """The feature map the classifier head pools or flattens (the last such layer).

        This is the tensor the prediction is computed from, wherever it comes from: in
        ``keras.applications.ConvNeXtTiny`` it is the last block's ``inputs + branch``, the
        output of an ``add`` op that no layer owns.
        """
        top = list(self.model.layers) if self._graph_ok() else []
        for layer in reversed(top):
            if layer.__class__.__name__ not in _HEAD_LAYERS:
                continue
            tensor = _symbolic(layer, "input")
            fmt = _data_format(layer)
            if any(tensor is t for t in self.model.inputs):
                continue  # the images themselves (a dense-only model): not a feature map
            if tensor is not None and _is_spatial(tuple(tensor.shape), fmt):
                return self._tensor_target(tensor, data_format=fmt)
        # A backbone that pools inside itself (``ResNet50(include_top=False, pooling="avg")``
        # nested in the model): what its pooling layer takes, read when that layer is called.
        for layer, parents in reversed(list(_walk(self.model))):
            if not parents or layer.__class__.__name__ not in _HEAD_LAYERS:
                continue
            tensor = _symbolic(layer, "input")
            fmt = _data_format(layer)
            if tensor is not None and not any(tensor is t for t in parents[-1].inputs) \
                    and _is_spatial(tuple(tensor.shape), fmt):
                return _Target(_layer_path(layer, parents) + ":input", layer=layer, which="input",
                               data_format=fmt)
        return None

    def _resolve_layer(self, sample: Optional[np.ndarray], spec: Any = None) -> _Target:
        """What to explain: ``spec`` (default: the ``layer`` argument) resolved, or the
        default (see the class)."""
        model = self.model
        spec = self.layer if spec is None else spec
        walked = list(_walk(model))
        if _is_keras_tensor(spec):
            target = self._tensor_target(spec)
            try:  # the tensor must be computable from the model's input
                keras.Model(model.inputs[0], spec)
            except Exception as exc:
                raise ValueError(f"layer={spec!r} is not a tensor of model {model.name!r} computed from its "
                                 f"input ({type(exc).__name__}: {exc})") from None
            return target
        if isinstance(spec, str):
            name, which = _split_spec(spec)
            for layer, parents in sorted(walked, key=lambda lp: len(lp[1])):  # top level first
                if name in (layer.name, _layer_path(layer, parents)):  # "conv_a" or "backbone/conv_a"
                    return self._layer_target(layer, parents, which)
            if which == "output" and self._graph_ok():  # an op of the graph: "add_17"
                for op in getattr(model, "operations", []):
                    if op.name == name and not isinstance(op, keras.layers.Layer):
                        tensor = _single_tensor(getattr(op, "output", None))
                        if tensor is not None:
                            return self._tensor_target(tensor, path=name)
            names = [_layer_path(layer, parents) for layer, parents in walked]
            raise ValueError(f"layer {spec!r} is not in model {model.name!r}; its layers are {names} "
                             "(add ':input' to a name for the tensor that layer takes)")
        if spec is not None:
            for layer, parents in walked:
                if layer is spec:
                    return self._layer_target(layer, parents, "output")
            raise ValueError(f"layer {spec.name!r} (a {type(spec).__name__}) is not part of model {model.name!r}")

        head = self._head_input()
        if head is not None:
            return head
        top = list(model.layers)
        shapes = {id(layer): _static_shape(layer) for layer in top}
        if all(s is None for s in shapes.values()) and sample is not None:
            # Subclassed models have no symbolic graph: find shapes from one real forward pass.
            with _capture(top) as record, self._no_grad():
                model(sample[:1], training=False)
            order: List[Any] = []
            for layer, out in record:
                if id(layer) not in {id(o) for o in order}:
                    order.append(layer)
                    shapes[id(layer)] = tuple(np.shape(out)) if not isinstance(out, (list, tuple, dict)) else None
            top = order
        for layer in reversed(top):
            if _is_spatial(shapes.get(id(layer)), _data_format(layer)):
                return self._layer_target(layer, (), "output")
        described = [f"{layer.name} {shapes.get(id(layer))}" for layer in top]
        raise ValueError(
            f"no layer of model {model.name!r} has a 4-D output with height and width > 1; "
            f"pass layer=<name> (layers and output shapes: {described})")

    @staticmethod
    def _no_grad() -> Any:
        """No autograd graph for the callback's forward passes under the torch backend."""
        if keras.backend.backend() == "torch":
            import torch  # already imported by Keras' torch backend

            return torch.no_grad()
        return contextlib.nullcontext()

    def _build_forward(self, target: _Target) -> Callable[[np.ndarray], Tuple[Any, Any]]:
        """A function x -> (activations, model output), evaluated with ``training=False``."""
        model = self.model
        no_grad = self._no_grad
        if target.tensor is not None:
            if len(model.inputs) != 1:
                raise TypeError(f"model {model.name!r} has {len(model.inputs)} inputs; EigenCAMCallback supports one")
            # Sharing the model's layers and weights: nothing is copied or changed.
            probe = keras.Model(model.inputs[0], [target.tensor, *model.outputs],
                                name=f"{model.name}_eigencam_probe")
            n_out = len(model.outputs)

            def run_probe(x: np.ndarray) -> Tuple[Any, Any]:
                with no_grad():
                    outs = probe(x, training=False)
                return outs[0], (outs[1] if n_out == 1 else outs[1:])

            return run_probe

        layer, which = target.layer, target.which

        def run_captured(x: np.ndarray) -> Tuple[Any, Any]:
            with _capture([layer], which) as record, no_grad():
                out = model(x, training=False)
            if not record:
                raise RuntimeError(f"layer {target.path!r} was not called in the forward pass of "
                                   f"model {model.name!r}")
            return record[0][1], out

        return run_captured

    def _prepare(self, sample: Optional[np.ndarray] = None) -> None:
        """Resolve the layer and build the forward function, once per ``fit``."""
        if self._forward is not None:
            return
        if sample is None:
            sources = self.samples
            sample = next(iter(sources.values())).x if sources else None
        self._target = self._resolve_layer(sample)
        self._target_path = self._target.path
        self._forward = self._build_forward(self._target)
        more = [self._resolve_layer(sample, spec) for spec in self._more_specs]
        self._more = [(t, self._build_forward(t)) for t in more]
        if more:  # the run tag names every layer
            self._target_path = ", ".join([self._target.path] + [t.path for t in more])
        if self._logger is not None:
            self._logger.set_target_layer(self._target_path)

    def _explain_batch(self, x: np.ndarray, target: Optional[_Target] = None,
                       forward: Optional[Callable[[np.ndarray], Tuple[Any, Any]]] = None,
                       ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Activations ``(B, h, w, C)`` and predictions ``(B,)`` / ``(B, K)`` (or None) of one
        batch, of the target layer (or of ``target`` through ``forward``: ``layers[1:]``)."""
        target, forward = target or self._target, forward or self._forward
        assert forward is not None and target is not None
        a, out = forward(x)
        # Backend tensors (TF, torch, JAX) become numpy here, at the boundary.
        acts = np.asarray(keras.ops.convert_to_numpy(a))
        if acts.ndim != 4:
            raise ValueError(f"layer {target.path!r} gives outputs of shape {acts.shape}; "
                             "EigenCAM needs a 4-D (batch, height, width, channels) output")
        if target.data_format == "channels_first":
            acts = np.moveaxis(acts, 1, -1)
        return acts, _single_output(out)

    def activations(self, x: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """What the callback explains for images ``x``, read as at an epoch end.

        One forward pass (``training=False``, in batches of :data:`PROBE_BATCH_SIZE`) of the
        model given by ``set_model`` (``fit`` sets it), resolving the target layer first if
        ``fit`` has not yet: useful to check what ``layer=`` picks before training.

        Args:
            x: ``(B, H, W, C)`` images as the model takes them (``(B, C, H, W)`` under
                ``channels_first``).

        Returns:
            The target's activations ``(B, h, w, C)`` (channels last, the layer's float
            dtype) and the model's predictions ``(B,)`` / ``(B, K)``, or None when the
            model has several outputs (or not one row per sample).

        Raises:
            ValueError: The layer cannot be found or its output is not 4-D (the message
                names the layers there are).
        """
        x = np.asarray(x)
        self._prepare(x)
        parts = [self._explain_batch(x[i:i + PROBE_BATCH_SIZE]) for i in range(0, len(x), PROBE_BATCH_SIZE)]
        preds = [p for _, p in parts if p is not None]
        pred = np.concatenate(preds, axis=0) if preds and len(preds) == len(parts) else None
        return np.concatenate([a for a, _ in parts], axis=0), pred

    # -- Keras hooks ----------------------------------------------------------------------
    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Reopen the logger after a previous ``fit`` and resolve the layer."""
        if not self._chief:
            return
        if self._logger is None or self._logger_closed:
            self._logger = EigenCAMLogger(**self._logger_args)
            self._logger_closed = False
            if self._target_path is not None:
                self._logger.set_target_layer(self._target_path)
        self._forward = None  # the model may have changed since the last fit
        self._broken = False
        try:
            # A second fit in one run (fine-tuning) continues the steps after the logged
            # epochs; a resumed one (initial_epoch) keeps its own (EigenCAMLogger.begin_fit).
            self._logger.begin_fit()
        except Exception as exc:
            self._fail(exc, "reading the run's logged epochs")
        if not self.samples:
            self._warnings.warn("no_samples",
                                "EigenCAMCallback has no samples to explain: pass validation_data= "
                                "(arrays, a tf.data.Dataset or a PyDataset), or train_data= with a "
                                "mode that lets 'train' in (or call use_fit_data before fit)")
            return
        try:
            self._prepare()
        except Exception as exc:
            self._broken = True  # a missing layer stays missing: do not retry every epoch
            self._fail(exc, "finding the target layer")

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Explain the pinned samples and hand them to the logger (step = epoch)."""
        logger = self._logger
        if logger is None or self._broken or not logger.should_log(epoch):
            return
        for (mode, ds_id), pinned in self.samples.items():
            if not logger.wants(mode, ds_id):
                continue
            try:
                room = logger.room(mode, ds_id)
                n = len(pinned.x) if room is None else min(room, len(pinned.x))
                if n == 0:
                    continue
                self._prepare()
                # Batch by batch, so n_samples=None never holds every activation at once.
                for start in range(0, n, PROBE_BATCH_SIZE):
                    stop = min(n, start + PROBE_BATCH_SIZE)
                    x = pinned.x[start:stop]
                    acts, preds = self._explain_batch(x)
                    if x.ndim == 4 and keras.config.image_data_format() == "channels_first":
                        x = np.moveaxis(x, 1, -1)
                    labels = None if pinned.y is None else pinned.y[start:stop]
                    scores: Any = self._faithfulness(pinned.x[start:stop], acts, preds)
                    given: Any = acts
                    if self._more:  # layers=[...]: {layer: activations}, {layer: scores}
                        assert self._target is not None
                        given = {self._target.path: acts, **{t.path: self._explain_batch(
                            pinned.x[start:stop], t, f)[0] for t, f in self._more}}
                        scores = {name: scores if a is acts else
                                  self._faithfulness(pinned.x[start:stop], a, preds)
                                  for name, a in given.items()}
                    logger.on_batch_end(x, given, labels, preds, mode=mode, ds_id=ds_id,
                                        faithfulness=scores)
                logger.on_epoch_end(epoch, mode=mode, ds_id=ds_id)
            except Exception as exc:
                # Drop what this epoch kept of the key, so that it cannot leak into the next one.
                logger.discard(mode, ds_id)
                self._fail(exc, f"epoch {epoch} ({mode}, ds_id={ds_id!r})", kind="epoch")

    def _faithfulness(self, x: np.ndarray, acts: np.ndarray,
                      preds: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """Per-sample faithfulness of the PC1 maps of ``acts`` ``(n, h, w, C)`` on the
        model's inputs ``x``, ``preds`` ``(n, K)`` being the clean row (docs/signals.md).
        None when off or not class scores; a failure warns once and turns it off."""
        if (self._fractions is None or preds is None or np.ndim(preds) != 2
                or self.n_samples is None  # every sample at every epoch: too dear
                or np.shape(preds)[1] < 2 or x.ndim != 4 or x.dtype.kind != "f"):
            return None
        try:
            first = keras.config.image_data_format() == "channels_first"
            nchw = x if first else np.moveaxis(x, -1, 1)
            with _lapack_threads(0):
                maps = eigencam(np.moveaxis(acts, -1, 1).astype(np.float32), 1).maps
            if maps.shape[1] == 0:
                return None
            h, w = nchw.shape[2:]
            heat = np.stack([upsample(m, h, w) for m in maps[:, 0]])
            n = len(x)
            batch = perturbed_batch(nchw, heat, self._fractions)[n:]  # the clean row is preds
            if not first:
                batch = np.moveaxis(batch, 1, -1)
            outs = [_single_output(self._model_call(batch[i:i + PROBE_BATCH_SIZE].astype(x.dtype)))
                    for i in range(0, len(batch), PROBE_BATCH_SIZE)]
            if any(o is None for o in outs):
                return None
            return faithfulness_scores(np.concatenate([np.asarray(preds), *outs]), n)
        except Exception as exc:  # a logging failure never stops training
            self._fractions = None
            self._warnings.warn("faithfulness", f"EigenCAM: the faithfulness pass failed ({exc!r}); "
                                "not scoring faithfulness from now on")
            return None

    def _model_call(self, x: np.ndarray) -> Any:
        with self._no_grad():
            return self.model(x, training=False)

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Wait for the uploads and end the run the logger started (:meth:`close`)."""
        self.close()

    def close(self, timeout: Optional[float] = None) -> int:
        """Flush the uploads and end the run the logger started (if it started one).

        ``fit`` calls it at the end of training (``on_train_end``); call it yourself in a
        custom loop that calls the hooks. A later ``fit`` reopens the logger. Closing twice,
        or on a non-chief worker, returns 0.

        Args:
            timeout: Seconds to wait for the uploads (default: the logger's ``close_timeout``).

        Returns:
            What was not delivered, as :meth:`EigenCAMLogger.close
            <mlflow_eigencam.logger.EigenCAMLogger.close>` returns it (0 when all arrived).
        """
        if self._logger is None or self._logger_closed:
            return 0
        self._logger_closed = True
        try:
            return self._logger.close(timeout)
        except Exception as exc:
            self._fail(exc, "closing the logger")
            return 0

    # -- failures -------------------------------------------------------------------------
    def _fail(self, exc: BaseException, where: str, kind: Optional[str] = None) -> None:
        """Warn once per kind of failure; training goes on (``strict=True`` raises instead)."""
        if self._strict:
            raise exc
        self._warnings.warn(("fail", kind or where, type(exc).__name__),
                            f"{where} failed ({type(exc).__name__}: {exc}); skipping these EigenCAM "
                            "images, training goes on")


def autolog_add_callback(original: Callable[..., Any], model: Any, args: tuple, kw: Dict[str, Any],
                         settings: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any], None]:
    """autolog's entry for Keras: an :class:`EigenCAMCallback` in this ``fit``'s callbacks,
    sampling the data ``fit`` was given (a callback the user passed is not duplicated)."""
    bound = inspect.signature(original).bind_partial(model, *args, **kw)
    arguments = bound.arguments
    callbacks = list(arguments.get("callbacks") or [])
    if any(isinstance(cb, EigenCAMCallback) for cb in callbacks):
        return args, kw, None  # the user passed one: no duplicate
    callback = EigenCAMCallback(**settings)
    callback.use_fit_data(x=arguments.get("x"), y=arguments.get("y"),
                          validation_data=arguments.get("validation_data"),
                          validation_split=arguments.get("validation_split") or 0.0)
    arguments["callbacks"] = callbacks + [callback]  # a new list: the user's is untouched
    return bound.args[1:], dict(bound.kwargs), None
