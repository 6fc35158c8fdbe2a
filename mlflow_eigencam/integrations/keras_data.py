"""Taking samples for the Keras callback, once, without consuming the user's data.

Arrays, ``tf.data.Dataset`` (where TensorFlow is the backend or already imported), ``PyDataset``,
generator functions and re-iterables of batches; framework arrays become numpy here.
"""

from __future__ import annotations

import collections.abc
import itertools
import sys
from dataclasses import dataclass
from typing import Any, Iterator, List, Mapping, Optional, Tuple

import keras
import numpy as np

__all__ = ["Samples", "split_at", "take_samples"]


def _tf_module() -> Any:
    """TensorFlow, only where it is already paid for: the backend, or imported by the user.

    Under ``KERAS_BACKEND=torch`` / ``jax`` the callback never imports TensorFlow itself (it
    costs seconds and gigabytes); a ``tf.data.Dataset`` can only exist if the user imported
    it, and then ``sys.modules`` has it.
    """
    if keras.backend.backend() == "tensorflow":
        try:
            import tensorflow
        except ImportError:  # pragma: no cover - Keras' TF backend needs it
            return None
        return tensorflow
    return sys.modules.get("tensorflow")


@dataclass
class Samples:
    """The samples of one (mode, ds_id), taken once and explained at every epoch.

    What :func:`take_samples` returns and :attr:`EigenCAMCallback.samples
    <mlflow_eigencam.keras.EigenCAMCallback.samples>` holds per (mode, ds_id).

    Attributes:
        x: ``(N, H, W, C)`` (or ``(N, C, H, W)`` under ``channels_first``) or ``(N, H, W)``
            images as the model takes them (their dtype kept).
        y: ``(N,)`` / ``(N, K)`` labels, or None when the data has none usable per sample.
    """

    x: np.ndarray
    y: Optional[np.ndarray]


def _to_numpy(value: Any) -> np.ndarray:
    """A framework array as numpy, at the boundary: numpy, torch, TensorFlow or JAX."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor (maybe with grad)
        return np.asarray(value.detach().cpu().numpy())
    if hasattr(value, "numpy"):  # tf.Tensor, without importing tf here
        return np.asarray(value.numpy())
    return np.asarray(value)  # JAX arrays, lists


def _is_dataset(data: Any) -> bool:
    tf = _tf_module()
    return tf is not None and isinstance(data, tf.data.Dataset)


def _is_pydataset(data: Any) -> bool:
    return isinstance(data, keras.utils.PyDataset)


def _is_iterator(data: Any) -> bool:
    """Generators and other one-shot iterators: reading them would consume the user's data."""
    return isinstance(data, collections.abc.Iterator) and not (_is_dataset(data) or _is_pydataset(data))


def _is_batch_factory(data: Any) -> bool:
    """A generator function (or any plain callable): calling it gives a fresh iterator."""
    return (callable(data) and not isinstance(data, type) and not hasattr(data, "shape")
            and not (_is_dataset(data) or _is_pydataset(data)))


def _check_x(x: Any, what: str) -> np.ndarray:
    if isinstance(x, (Mapping, list, tuple)):
        raise TypeError(
            f"{what} gives x as a {type(x).__name__}; EigenCAMCallback needs one array of images "
            f"(N, H, W, C) or (N, H, W) (multi-input models are not supported)")
    arr = _to_numpy(x)
    if arr.ndim not in (3, 4):
        raise ValueError(
            f"{what} gives images of shape {arr.shape}; expected (N, H, W, C) or (N, H, W)"
            " (tf.data datasets must yield batches, as fit expects)")
    return arr


def _check_y(y: Any, n: int) -> Optional[np.ndarray]:
    """Labels that give one class per sample, else None (dicts, masks, multi-output lists)."""
    if y is None or isinstance(y, (Mapping, list, tuple)):
        return None
    arr = _to_numpy(y)
    if arr.ndim == 0 or arr.ndim > 2 or len(arr) != n:
        return None
    return arr


def _unpack(batch: Any) -> Tuple[Any, Any]:
    x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
    return x, y


def _from_batches(batches: Iterator[Any], n: Optional[int], what: str) -> Samples:
    xs: List[np.ndarray] = []
    ys: List[Optional[np.ndarray]] = []
    count = 0
    for batch in batches:
        x, y = _unpack(batch)
        xb = _check_x(x, what)
        need = len(xb) if n is None else min(len(xb), n - count)
        xs.append(xb[:need])
        ys.append(_check_y(y, len(xb)))
        if ys[-1] is not None:
            ys[-1] = ys[-1][:need]
        count += need
        if n is not None and count >= n:
            break
    if not xs or count == 0:
        raise ValueError(f"{what} yielded no samples")
    x_all = np.concatenate(xs, axis=0)
    labelled = [y for y in ys if y is not None]
    y_all = np.concatenate(labelled, axis=0) if len(labelled) == len(ys) else None
    return Samples(x_all, y_all)


def take_samples(data: Any, n: Optional[int], *, what: str = "data") -> Samples:
    """Take the first ``n`` samples of ``data`` without consuming it.

    Args:
        data: A tuple ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` of arrays; an array of
            images; a ``tf.data.Dataset`` yielding batches (iterated afresh, so not
            consumed); a ``keras.utils.PyDataset`` (indexed ``[0]``, ``[1]``, ...); a
            generator function or other callable that returns a new iterator of batches each
            time it is called (called once); or any re-iterable object yielding batches
            (``iter(data)`` is a new iterator each time).
        n: How many samples; None for all of them (``data`` must be finite, and cannot be a
            function).
        what: Name of the data in error messages.

    Returns:
        The samples: images ``(n, H, W, C)`` or ``(n, H, W)``, labels or None.

    Raises:
        TypeError: ``data`` is a generator object or other one-shot iterator (it cannot be
            read without consuming the user's data), or of an unsupported type.
        ValueError: ``data`` is empty, infinite or a function with ``n=None``, or not images.
    """
    if data is None:
        raise TypeError(f"{what} is None")
    if _is_iterator(data):
        raise TypeError(
            f"{what} is a {type(data).__name__} (a one-shot iterator): EigenCAMCallback cannot "
            "take samples from it without consuming them; pass the generator function itself "
            "(gen, not gen()), numpy arrays (x, y), a tf.data.Dataset or a keras.utils.PyDataset")
    if _is_batch_factory(data):
        if n is None:
            raise ValueError(f"{what} is a function that makes batches, which may never end; pass "
                             "n_samples=<int> to use it")
        batches = data()
        if not isinstance(batches, collections.abc.Iterable):
            raise TypeError(f"{what}() returned a {type(batches).__name__}; expected an iterable of "
                            "batches (x, y) or x")
        iterator = iter(batches)
        try:
            return _from_batches(iterator, n, f"{what}()")
        finally:
            close = getattr(iterator, "close", None)  # a generator: run its cleanup now
            if callable(close):
                close()
    if isinstance(data, (tuple, list)):
        x, y = _unpack(tuple(data))
        xa = _check_x(x, what)
        stop = len(xa) if n is None else min(n, len(xa))
        if stop == 0:
            raise ValueError(f"{what} has no samples")
        ya = _check_y(y, len(xa))
        return Samples(xa[:stop].copy(), None if ya is None else ya[:stop].copy())
    if _is_dataset(data):
        if n is None and int(data.cardinality()) == int(_tf_module().data.INFINITE_CARDINALITY):
            raise ValueError(f"{what} is an infinite tf.data.Dataset; pass n_samples=<int> to use it")
        return _from_batches(iter(data), n, what)
    if _is_pydataset(data):
        try:
            total = data.num_batches
        except NotImplementedError:
            total = None
        if total is None and n is None:
            raise ValueError(f"{what} is an infinite PyDataset; pass n_samples=<int> to use it")
        indices = range(total) if total is not None else itertools.count()
        return _from_batches((data[i] for i in indices), n, what)
    if hasattr(data, "shape") and hasattr(data, "__len__"):  # one array of images, no labels
        return take_samples((data,), n, what=what)
    if isinstance(data, collections.abc.Iterable):  # re-iterable (e.g. a torch DataLoader)
        return _from_batches(iter(data), n, what)
    raise TypeError(
        f"{what} must be (x, y) arrays, a tf.data.Dataset, a keras.utils.PyDataset or a "
        f"re-iterable of batches; got {type(data).__name__}")


def split_at(n: int, validation_split: float) -> int:
    """Where ``fit`` splits ``n`` samples for ``validation_split``: ``x[:i]`` trains, ``x[i:]``
    validates (Keras takes the last fraction, before any shuffling)."""
    return int(np.floor(n * (1.0 - validation_split)))
