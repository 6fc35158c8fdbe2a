"""What the monitor promises about the user's model: flags, RNG, wrappers, ranks, copies.

Every forward pass the monitor runs itself goes through :func:`quiet_forward` (no grad, eval
mode, each module's ``training`` flag restored, the user's RNG untouched); every activation it
keeps goes through :func:`keep_rows` (a detached copy of the kept rows only).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch
from torch import nn

__all__ = ["first_tensor", "keep_rows", "preserve_training_flags", "quiet_forward", "rank_or_none",
           "unwrap_model"]


@contextlib.contextmanager
def preserve_training_flags(model: nn.Module) -> Iterator[None]:
    """Save every module's ``training`` flag and restore each one on exit.

    ``model.train(flag)`` would set one flag on the whole tree; a model can legitimately have
    mixed flags (e.g. frozen BatchNorm in eval mode inside a training model), so each module's
    own flag is put back.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def quiet_forward(model: nn.Module) -> Iterator[torch.device]:
    """The frame of a forward pass the monitor runs itself: no grad, ``model.eval()``, every
    ``training`` flag restored on exit, and the random state forked.

    ``fork_rng``: a model drawing random numbers in eval mode must not shift the user's random
    stream (their next batch / dropout mask stays the same).

    Yields:
        The model's device (where its inputs go).
    """
    device = device_of(model)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), preserve_training_flags(model), torch.no_grad():
        model.eval()
        yield device


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose layers are hooked: unwraps DDP / DataParallel / ``torch.compile``.

    Hooking and the extra forward pass go to the wrapped module: a forward of
    ``DistributedDataParallel`` on rank 0 alone could start a collective (buffer broadcast)
    that the other ranks never join.
    """
    for _ in range(8):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            break
    return model


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer, else the CPU)."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def first_tensor(output: Any) -> Optional[torch.Tensor]:
    """The tensor a module "returned": the output itself, a tuple's first tensor (e.g.
    ``nn.MultiheadAttention``), or a mapping's ``"logits"`` / first tensor value."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        for key in ("logits", "preds", "out"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def keep_rows(tensor: torch.Tensor, room: Optional[int]) -> torch.Tensor:
    """Detached copy of the first ``room`` samples, still on the device.

    Copied (not a view) because a later in-place op (``ReLU(inplace=True)``, ``out += x``)
    would change the captured values, and a view would keep the whole batch alive.
    """
    rows = tensor.detach()
    if room is not None:
        rows = rows[:room]
    return rows.clone()


def rank_or_none(final: bool = True) -> Optional[int]:
    """This process's global rank.

    With ``final=False`` (at construction) None means "a distributed launch seems under way
    (``MASTER_ADDR`` / ``WORLD_SIZE`` set) but the process group is not initialised yet": the
    monitor decides at its first capture, by which time training code has called
    ``init_process_group`` if it ever will.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    if os.environ.get("RANK", "").strip().isdigit():
        return int(os.environ["RANK"])
    if not final and ("MASTER_ADDR" in os.environ or "WORLD_SIZE" in os.environ):
        return None
    return 0
