"""Batches at the torch boundary: a batch -> ``(images, labels)``, and tensors -> numpy.

Needs torch only, so every torch-based adapter (the Lightning callback, a plain loop, a new
trainer's callback) splits batches the same way without importing its framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Sequence, Tuple

import numpy as np
import torch

from ._model import first_tensor
from .detection import detections

__all__ = ["BatchToXY", "default_batch_to_xy", "image_list", "images_as_batch", "to_numpy"]

#: ``batch -> (images, labels)``: what ``batch_to_xy=`` takes.
BatchToXY = Callable[[Any], Tuple[Any, Any]]

_IMAGE_KEYS = ("image", "images", "x", "input", "inputs", "pixel_values")
_LABEL_KEYS = ("label", "labels", "y", "target", "targets")


def default_batch_to_xy(batch: Any) -> Tuple[Any, Any]:
    """Split a batch into ``(images, labels)``; labels may be None.

    The images must be a ``(B, C, H, W)`` (or ``(B, H, W)``) tensor, or (a detector's batch)
    a list / tuple of same-sized ``(C, H, W)`` tensors, with a list of target dicts as labels.

    Accepts a tensor, an ``(x, y, ...)`` / ``(x,)`` tuple or list, or a dict with an image
    key (``image``, ``images``, ``x``, ``input``, ``inputs``, ``pixel_values``) and optionally
    a label key (``label``, ``labels``, ``y``, ``target``, ``targets``).

    Raises:
        TypeError: Anything else (pass ``batch_to_xy=`` to the callback).
    """
    x: Any = None
    y: Any = None
    if isinstance(batch, torch.Tensor):
        x = batch
    elif isinstance(batch, Mapping):
        x = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    elif isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
    if image_list(x):
        return x, y  # a detector's batch: a list / tuple of (C, H, W) images, targets
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4):
        what = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
        if isinstance(x, torch.Tensor):
            what = f"{what} whose images would be a {tuple(x.shape)} tensor"
        raise TypeError(
            f"cannot find the images in a batch of {what}; expected a tensor, an (x, y) tuple or "
            f"a dict with one of {_IMAGE_KEYS}: pass batch_to_xy=callable(batch) -> (x, y)"
        )
    return x, y


def image_list(x: Any) -> bool:
    """A detector's images: a non-empty list / tuple of ``(C, H, W)`` tensors."""
    return isinstance(x, (list, tuple)) and bool(x) and all(
        isinstance(im, torch.Tensor) and im.ndim == 3 for im in x)


def images_as_batch(images: Any) -> Tuple[torch.Tensor, bool]:
    """The images ``update()`` got as one ``(B, C, H, W)`` / ``(B, H, W)`` tensor, and whether
    they came as a list of ``(C, H, W)`` tensors (a torchvision detector's input).

    Raises:
        ValueError: Not 3-D / 4-D, or a list of images of different sizes.
    """
    as_list = isinstance(images, (list, tuple)) and bool(images) and all(
        isinstance(im, torch.Tensor) for im in images)
    if as_list:
        batch = _stack_images(images)
    elif isinstance(images, torch.Tensor):
        batch = images
    else:
        batch = torch.as_tensor(np.asarray(images))
    if batch.ndim not in (3, 4):
        raise ValueError(
            f"images must be the model's (B, C, H, W) or (B, H, W) input, got shape "
            f"{tuple(batch.shape)}"
        )
    return batch, as_list


def _stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """A list of same-sized ``(C, H, W)`` images (what a detector takes) as one batch."""
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(
            f"a list of images must hold (C, H, W) tensors of one size, got shapes {sorted(shapes)}"
        )
    return torch.stack([im.detach() for im in images])


def to_numpy(x: Any, k: int) -> Any:
    """First ``k`` rows of labels / preds as numpy (tensors detached, half precision to
    float32, then to the CPU); a model's dict output by its ``"logits"`` / ``"out"``
    tensor (``_model.first_tensor``); a detector's list of dicts item by item; lists sliced."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x[:k].detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x[:k]
    if isinstance(x, Mapping):
        # A model's dict output (torchvision segmenters' {"out", "aux"}): its main tensor.
        tensor = first_tensor(x)
        return x if tensor is None else to_numpy(tensor, k)
    boxes = detections(x)
    if boxes is not None:
        # Detector output / targets: one dict per image; tensors to CPU numpy.
        return [{key: to_numpy(value, len(value)) if isinstance(value, torch.Tensor) else value
                 for key, value in item.items()} for item in boxes[:k]]
    if isinstance(x, (list, tuple)):
        return list(x[:k])
    return x
