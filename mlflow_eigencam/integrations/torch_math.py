"""Compatibility name: the torch path is now :func:`mlflow_eigencam.eigencam.eigencam` itself.

There is one implementation of the algorithm, written against the Python array API; a
tensor is computed on its own device by it. This module keeps the old entry point.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from mlflow_eigencam.eigencam import EigenCAMResult, eigencam

__all__ = ["eigencam_torch"]


def eigencam_torch(
    activations: "torch.Tensor",
    n_components: Union[int, float] = 3,
    *,
    channels_last: bool = False,
    on_device: Optional[bool] = None,
) -> EigenCAMResult:
    """:func:`mlflow_eigencam.eigencam.eigencam` of a tensor; ``on_device=False`` copies it
    to the host first (default: computed where it lives)."""
    t = activations.detach()
    if on_device is False and t.device.type != "cpu":
        t = t.cpu()
    return eigencam(t, n_components, channels_last=channels_last)
