"""PyTorch integration: forward hooks that feed :class:`~mlflow_eigencam.logger.EigenCAMLogger`.

A plain training loop uses :class:`EigenCAMMonitor`::

    monitor = EigenCAMMonitor(model)                 # target layer found on the first forward
    for epoch in range(epochs):
        ...                                          # training: nothing to do ("!train" by default)
        for x, y in val_loader:
            with monitor.capture(mode="eval", ds_id="val"):   # the forward hook lives only here
                logits = model(x)
                monitor.update(images=x, labels=y, preds=logits)
        monitor.epoch_end(epoch)                     # one MLflow step per epoch
    monitor.close()

What the monitor promises about the user's model:

* hooks exist only inside ``capture()`` (and during the one extra forward pass of pinned
  samples); ``close()`` removes anything left;
* every module's ``training`` flag is restored after the extra forward pass;
* activations are detached and only the kept samples (``[:room]``) are copied, then moved to
  the CPU; nothing is recorded by autograd, so the user's gradients are unchanged;
* under ``torch.distributed`` only rank 0 builds a logger; other ranks do nothing at all (no
  collectives, no barrier), so no rank ever waits on another because of the monitor.

Pinned samples (``pin_samples=True``): the samples kept in the first epoch of each
``(mode, ds_id)`` are remembered (their input tensors on the CPU, and their labels). From the
next epoch on the monitor does no per-batch work for that key: ``epoch_end`` runs one extra
forward pass on the pinned inputs (``torch.no_grad()``, ``model.eval()``, flags restored) and
logs those, so the MLflow step slider shows the same images as the model learns even when the
loader shuffles. Doing the extra pass every epoch (rather than only when fewer than ``n`` of the
pinned samples come by again) costs one small forward per epoch and nothing per batch.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

_log = logging.getLogger("mlflow_eigencam")

#: Most leading (class / register / distillation) tokens dropped when a layer's (B, N, D)
#: output is folded into a square grid; more than this means a non-square grid.
MAX_EXTRA_TOKENS = 8

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]
Key = Tuple[str, Optional[str]]

__all__ = [
    "EigenCAMMonitor",
    "MAX_EXTRA_TOKENS",
    "find_target_layer",
    "preserve_training_flags",
    "resolve_target_layer",
    "tokens_to_grid",
    "unwrap_model",
]


# --------------------------------------------------------------------------- helpers


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose layers are hooked: unwraps DDP / DataParallel / ``torch.compile``.

    Hooking and the extra forward pass go to the wrapped module: a forward of
    ``DistributedDataParallel`` on rank 0 alone could start a collective (buffer broadcast)
    that the other ranks never join.
    """
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            break
    return model


def resolve_target_layer(model: nn.Module, target: Union[nn.Module, str]) -> Tuple[str, nn.Module]:
    """Find ``target`` (a submodule or a dotted name) in ``model``.

    Args:
        model: The (unwrapped) model.
        target: A submodule of ``model`` or its dotted name, e.g. ``"layer4"`` or
            ``"blocks.3.norm1"``; a leading ``"module."`` (DDP naming) is accepted, and so is
            the run tag's value (``"norm (auto: ...)"``).

    Returns:
        ``(name, module)``.

    Raises:
        ValueError: The name is unknown (close names are listed) or the module is not part of
            ``model``.
        TypeError: ``target`` is neither a string nor a module.
    """
    names = {module: name for name, module in model.named_modules()}
    if isinstance(target, nn.Module):
        name = names.get(target)
        if name is None or name == "":
            raise ValueError(
                f"target_layer {type(target).__name__} is not a submodule of the model "
                f"({type(model).__name__}); pass one of its layers or a dotted name"
            )
        return name, target
    if not isinstance(target, str):
        raise TypeError(
            f"target_layer must be an nn.Module, a dotted name or None, got {type(target).__name__}"
        )
    candidates = [target]
    if " (auto:" in target:  # the run tag's value, pasted back
        target = target.split(" (auto:", 1)[0]
        candidates.append(target)
    if target.startswith("module."):
        candidates.append(target[len("module.") :])
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    all_names = [name for name in names.values() if name]
    close = difflib.get_close_matches(target, all_names, n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ValueError(f"target_layer {target!r} is not a submodule of {type(model).__name__}{hint}")


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
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


def _token_grid_side(n_tokens: int) -> Tuple[int, int]:
    """``(side, extra)`` with ``n_tokens == extra + side * side``; ValueError when not square."""
    side = math.isqrt(n_tokens)
    extra = n_tokens - side * side
    if side < 2 or extra > MAX_EXTRA_TOKENS:
        raise ValueError(
            f"cannot fold {n_tokens} tokens into a square grid: {side}x{side} leaves {extra} "
            f"extra tokens (at most {MAX_EXTRA_TOKENS} leading class/register tokens are "
            "dropped); for a non-square grid pass reshape_transform=callable mapping the "
            "(B, N, D) tensor to (B, C, h, w)"
        )
    return side, extra


def tokens_to_grid(
    activations: torch.Tensor,
    reshape_transform: Optional[ReshapeTransform] = None,
    grid_hw: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Bring a layer's output to ``(B, C, h, w)``.

    Args:
        activations: 4-D ``(B, C, h, w)`` (returned as is), or transformer tokens
            ``(B, N, D)``: ``N = extra + s * s`` with ``s = floor(sqrt(N))``; the ``extra``
            (at most :data:`MAX_EXTRA_TOKENS`) leading class/register tokens are dropped and
            the rest folded row-major into ``(B, D, s, s)``. A non-square grid is refused
            when ``N`` is more than :data:`MAX_EXTRA_TOKENS` above a square; one closer to a
            square (16 x 8 = 11 * 11 + 7) cannot be told from a square grid with leading
            tokens, so give ``reshape_transform`` (or let auto-detection read the grid).
        reshape_transform: Optional callable ``tensor -> (B, C, h, w) tensor`` used instead
            (non-square token grids, channels-last layers, ...).
        grid_hw: Known patch grid ``(h, w)`` (auto-detection reads it off the patch
            embedding); then the ``N - h * w`` leading tokens are dropped, and non-square
            grids work too.

    Returns:
        A ``(B, C, h, w)`` tensor (a view when possible).

    Raises:
        ValueError: Wrong rank, non-square tokens without ``reshape_transform``, or a
            ``reshape_transform`` that does not return 4-D.
    """
    if reshape_transform is not None:
        out = reshape_transform(activations)
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"reshape_transform must return a (B, C, h, w) tensor, got {shape}")
        return out
    if activations.ndim == 4:
        return activations
    if activations.ndim == 3:
        batch, n_tokens, dim = activations.shape
        if grid_hw is not None and 0 <= n_tokens - grid_hw[0] * grid_hw[1] <= MAX_EXTRA_TOKENS:
            height, width = grid_hw
            extra = int(n_tokens) - height * width
        else:
            height, extra = _token_grid_side(int(n_tokens))
            width = height
        grid = activations[:, extra:, :].transpose(1, 2)
        return grid.reshape(batch, dim, height, width)
    raise ValueError(
        f"target layer output has shape {tuple(activations.shape)}; expected (B, C, h, w) or "
        "(B, N, D) tokens, or pass reshape_transform"
    )


def _fits_geometry(h: int, w: int, height: int, width: int) -> bool:
    """Whether an ``(h, w)`` map can be the input ``(height, width)`` seen through one stride.

    True when some stride ``s > 0`` gives ``|h - height / s| <= 1.5`` and ``|w - width / s| <=
    1.5`` (padding and rounding move each side by about a pixel per stage). An attention
    tensor ``(B, heads, tokens, head_dim)`` or a channels-last ``(B, h, w, C)`` map has no such
    stride, so it is never taken for a feature map.
    """
    if h < 1 or w < 1 or h * w <= 1:
        return False
    slack = 1.5
    low = max(height / (h + slack), width / (w + slack))
    high = min(height / (h - slack) if h > slack else math.inf,
               width / (w - slack) if w > slack else math.inf)
    return low <= high


def _search_scope(model: nn.Module) -> Tuple[str, str]:
    """``(prefix, why)``: where auto-detection looks.

    A detector or segmenter (torchvision's ``backbone`` / ``backbone.body``) is searched only
    inside its backbone: after it come FPN extra levels (RetinaNet's 2x2 ``p7``), RoI pooling
    over proposals and box heads, none of which is a map of the image. Other models: all of it.
    """
    names = [name for name, _ in model.named_modules() if name.split(".")[-1] == "backbone"]
    if not names:
        return "", ""
    backbone = min(names, key=lambda n: (n.count("."), n))
    module = model.get_submodule(backbone)
    if isinstance(getattr(module, "body", None), nn.Module):
        return backbone + ".body", "last feature map of the detection backbone"
    return backbone, "last feature map of the backbone"


class _LayerFinder:
    """Temporary hooks on every submodule that watch one forward pass.

    The target is the LAST module, in order of forward completion, whose output is an image
    feature map: 4-D ``(B, C, h, w)`` with the batch size of the first 4-D image tensor any
    module received (the "input"), ``h * w > 1``, and ``(h, w)`` the input's ``(H, W)`` through
    one stride (see :func:`_fits_geometry`; attention tensors and channels-last maps fail it),
    and ``h`` not the length of a token sequence already seen (``(B, heads, N, head_dim)``).
    A container completes after its children, so for a ResNet ``layer4`` wins over its last
    ReLU, and the 1x1 output of the average pool does not qualify. If modules completing after
    that layer output ``(B, N, D)`` tokens with ``N`` = its ``h * w`` plus at most
    :data:`MAX_EXTRA_TOKENS` prefix tokens (a ViT: patch-embedding conv, then transformer
    blocks over those patches, class / distillation / register tokens first), the last of them
    wins instead, folded onto that ``h x w`` grid.

    Candidates are copied AT HOOK TIME (their first ``room`` rows): a later in-place op
    (DenseNet's ``F.relu(features, inplace=True)`` after its ``features``) must not change
    what is explained, or the first epoch would differ from the ones after it.
    """

    def __init__(self, model: nn.Module, room: Optional[int] = None) -> None:
        self._room = room
        self._handles = []
        self.conv: Optional[Tuple[str, nn.Module, torch.Tensor]] = None
        self.tokens: Optional[Tuple[str, nn.Module, torch.Tensor]] = None
        self.input_shape: Optional[Tuple[int, int, int]] = None  # (B, H, W) of the input
        self._token_counts: set = set()  # lengths of the token sequences seen over the grid
        self.called = False
        self.prefix, self.scope_why = _search_scope(model)
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            in_scope = not self.prefix or name == self.prefix or name.startswith(self.prefix + ".")
            if name and in_scope:  # the root's output is the prediction, not a feature map
                self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _pre_hook(self, module: nn.Module, inputs: Any) -> None:
        if self.input_shape is not None:
            return
        tensor = _first_tensor(inputs)
        if tensor is not None and tensor.ndim == 4:
            self.input_shape = (int(tensor.shape[0]), int(tensor.shape[2]), int(tensor.shape[3]))

    def _is_map(self, tensor: torch.Tensor) -> bool:
        if tensor.ndim != 4 or tensor.shape[2] * tensor.shape[3] <= 1:
            return False
        if int(tensor.shape[2]) in self._token_counts:
            return False  # (B, heads, tokens, head_dim): attention over the token sequence
        if self.input_shape is None:
            return True  # no image input seen (e.g. precomputed features): shape alone decides
        batch, height, width = self.input_shape
        return (int(tensor.shape[0]) == batch
                and _fits_geometry(int(tensor.shape[2]), int(tensor.shape[3]), height, width))

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.called = True
            if isinstance(output, dict):
                # Several levels (a detection backbone's {"0": layer2, ..., "2": layer4}):
                # the modules that made them were candidates already; the first value would
                # be the finest level, not the last stage.
                return
            tensor = _first_tensor(output)
            if tensor is None:
                return
            if self._is_map(tensor):
                self.conv = (name, module, _keep(tensor, self._room))
                self.tokens = None
            elif tensor.ndim == 3 and self.conv is not None:
                grid = self.conv[2].shape[2] * self.conv[2].shape[3]
                same_batch = self.input_shape is None or tensor.shape[0] == self.input_shape[0]
                if same_batch and 0 <= tensor.shape[1] - grid <= MAX_EXTRA_TOKENS:
                    self.tokens = (name, module, _keep(tensor, self._room))
                    self._token_counts.add(int(tensor.shape[1]))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def result(self) -> Optional[Tuple[str, nn.Module, torch.Tensor]]:
        return self.tokens if self.tokens is not None else self.conv

    def token_grid(self) -> Optional[Tuple[int, int]]:
        """The patch grid ``(h, w)`` behind the chosen token layer, if one was chosen."""
        if self.tokens is None or self.conv is None:
            return None
        return int(self.conv[2].shape[2]), int(self.conv[2].shape[3])

    def describe(self) -> str:
        """What was chosen and why, for the target-layer tag (``"(auto: ...)"``)."""
        found = self.result()
        if found is None:
            return ""
        shape = tuple(int(d) for d in found[2].shape[1:])
        if self.tokens is not None and self.conv is not None:
            h, w = self.token_grid()
            extra = shape[0] - h * w
            what = (f"tokens (B, {shape[0]}, {shape[1]}) folded to a {h}x{w} patch grid "
                    f"({extra} prefix token{'s' if extra != 1 else ''} dropped)")
        else:
            what = f"feature map (B, {shape[0]}, {shape[1]}, {shape[2]})"
        if self.scope_why:
            what += f", {self.scope_why}"
        return f"auto: {what}"


def find_target_layer(model: nn.Module, *example_inputs: Any) -> Tuple[str, nn.Module]:
    """Run one no-grad forward pass and return the layer auto-detection would pick.

    Args:
        model: The model (flags restored afterwards).
        *example_inputs: Positional inputs of ``model``, e.g. a ``(1, 3, H, W)`` float tensor.

    Returns:
        ``(name, module)``.

    Raises:
        ValueError: No submodule outputs a 4-D map with spatial size above 1.
    """
    model = unwrap_model(model)
    finder = _LayerFinder(model, room=1)  # only the shapes matter here
    try:
        with preserve_training_flags(model), torch.no_grad():
            model.eval()
            model(*example_inputs)
    finally:
        finder.remove()
    found = finder.result()
    if found is None:
        raise ValueError(_NO_LAYER_MESSAGE.format(model=type(model).__name__))
    return found[0], found[1]


_NO_LAYER_MESSAGE = (
    "no submodule of {model} outputs a 4-D feature map with spatial size above 1; pass "
    "target_layer= (a module or dotted name), with reshape_transform= for unusual layouts"
)


def _rank_or_none(final: bool = True) -> Optional[int]:
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


def _to_numpy(x: Any, k: int) -> Any:
    """First ``k`` rows of labels/preds as numpy (tensors detached first), lists sliced."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x[:k].detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x[:k]
    if _detections(x) is not None:
        # Detector output / targets: one dict per image; tensors to CPU numpy.
        return [{key: _to_numpy(value, len(value)) if isinstance(value, torch.Tensor) else value
                 for key, value in item.items()} for item in x[:k]]
    if isinstance(x, (list, tuple)):
        return list(x[:k])
    return x


def _detections(x: Any) -> Optional[list]:
    """``x`` when it is a detector's output or targets (a list of dicts with ``"boxes"``)."""
    if isinstance(x, (list, tuple)) and x and all(
            isinstance(item, dict) and "boxes" in item for item in x):
        return list(x)
    return None


def _stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """A list of same-sized ``(C, H, W)`` images (what a detector takes) as one batch."""
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(
            f"a list of images must hold (C, H, W) tensors of one size, got shapes {sorted(shapes)}"
        )
    return torch.stack([im.detach() for im in images])


def _transform_of(model: nn.Module) -> Optional[nn.Module]:
    """A torchvision detector's ``transform`` (``GeneralizedRCNNTransform``), else None: the
    module that resizes each image and pads the batch before the backbone sees it."""
    transform = getattr(model, "transform", None)
    return transform if isinstance(transform, nn.Module) else None


def _canvas_of(output: Any) -> Optional["_Canvas"]:
    """What a detector's transform returned, ``(ImageList, targets)``, as a :class:`_Canvas`;
    None for any other output (the model is then treated like a classifier)."""
    first = output[0] if isinstance(output, (tuple, list)) and output else output
    sizes, tensors = getattr(first, "image_sizes", None), getattr(first, "tensors", None)
    if not isinstance(tensors, torch.Tensor) or tensors.ndim != 4 or not sizes:
        return None
    try:
        hw = [(int(h), int(w)) for h, w in sizes]
    except (TypeError, ValueError):
        return None
    return _Canvas(height=int(tensors.shape[-2]), width=int(tensors.shape[-1]), image_sizes=hw)


@dataclass
class _Canvas:
    """The padded batch a detector's backbone saw: ``(height, width)`` pixels, and each
    image's ``(h, w)`` after the resize, in its top-left corner (the rest is zero padding)."""

    height: int
    width: int
    image_sizes: List[Tuple[int, int]]

    def cells(self, grid_hw: Tuple[int, int], index: int) -> Optional[Tuple[int, int]]:
        """The ``(rows, cols)`` of a ``grid_hw`` feature map over this canvas that cover image
        ``index``: ``ceil(h * rows_total / height)`` (and the same for the width), so a
        row or column only partly over the image is kept. None when the map is not a map of
        this canvas (another geometry) or the index has no size."""
        if index >= len(self.image_sizes):
            return None
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        if not _fits_geometry(gh, gw, self.height, self.width):
            return None
        h, w = self.image_sizes[index]
        rows = min(gh, max(1, -(-h * gh // self.height)))  # integer ceil
        cols = min(gw, max(1, -(-w * gw // self.width)))
        return rows, cols


def _crop_to_images(
    grid: torch.Tensor, canvas: Optional[_Canvas],
) -> Tuple[torch.Tensor, Optional[Tuple[float, float]]]:
    """A ``(B, C, h, w)`` map of the padded canvas cropped, top left, to the cells that
    cover the images (:meth:`_Canvas.cells`), and the fractions ``(fy, fx)`` of the kept
    cells that the images fill (the last row / column may be partly padding: the renderer
    draws the map over ``1 / fy`` of the image's height and shows the image's part). The
    whole map and None when there is no canvas.

    Same-size images (what ``update()`` takes) share one crop. Should the transform give
    the samples different sizes (training-mode multi-scale ``min_size``), the largest crop is
    used for all: the logger computes one epoch's maps from samples of one shape.
    """
    if canvas is None:
        return grid, None
    gh, gw = int(grid.shape[2]), int(grid.shape[3])
    crops = [canvas.cells((gh, gw), i) for i in range(int(grid.shape[0]))]
    if any(c is None for c in crops):
        return grid, None  # not a map of this canvas: left as it is
    rows, cols = max(c[0] for c in crops), max(c[1] for c in crops)
    n = len(crops)
    height = max(h for h, _ in canvas.image_sizes[:n])
    width = max(w for _, w in canvas.image_sizes[:n])
    extent = (min(1.0, height * gh / (rows * canvas.height)),
              min(1.0, width * gw / (cols * canvas.width)))
    return grid[:, :, :rows, :cols], (None if extent == (1.0, 1.0) else extent)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@dataclass
class _Pin:
    """The first epoch's kept inputs of one (mode, ds_id), to be shown at every epoch."""

    images: List[torch.Tensor] = field(default_factory=list)  # CPU chunks, as the model took them
    labels: List[Any] = field(default_factory=list)  # per-chunk numpy arrays / lists, or None
    established: bool = False
    as_list: bool = False  # call the model with a list of images (torchvision detectors)

    def count(self) -> int:
        return sum(int(chunk.shape[0]) for chunk in self.images)

    def stacked(self) -> Tuple[torch.Tensor, Any]:
        images = torch.cat(self.images) if len(self.images) > 1 else self.images[0]
        if any(chunk is None for chunk in self.labels):
            return images, None
        if all(isinstance(chunk, np.ndarray) for chunk in self.labels):
            return images, np.concatenate(self.labels)
        return images, [item for chunk in self.labels for item in chunk]


@dataclass
class _Capture:
    key: Key
    room: Optional[int]
    act: Optional[torch.Tensor] = None
    output: Any = None  # a tensor, or numpy detections (list of dicts)
    finder: Optional[_LayerFinder] = None
    grid_finder: Optional[_LayerFinder] = None  # reads the patch grid for a named token layer
    canvas: Optional[_Canvas] = None  # a detector's padded batch, from its transform


# --------------------------------------------------------------------------- monitor


class EigenCAMMonitor:
    """Logs EigenCAM overlays of a PyTorch model from a plain training loop.

    Args:
        model: The user's model (DDP / DataParallel / compiled wrappers are unwrapped).
        target_layer: A submodule, its dotted name, or None to pick, on the first captured
            forward pass, the last module whose output is an image feature map (4-D, the
            input's batch and geometry, ``h * w > 1``: a ResNet's ``layer4``; a detector's
            backbone's last stage), or the last token layer over its patch grid after it (a
            ViT). The run tag says what was chosen (:attr:`target_layer_tag`).
        n_components: Principal components per sample (int), or the explained-variance
            fraction to reach (float in (0, 1)).
        n_samples: Samples kept per (mode, ds_id) per epoch; None keeps all (no pinning).
        label_mapping: Class index -> display name (mapping or sequence), or None.
        mode: Mode filter: None, ``"eval"``, ``{"eval", "test"}``, ``"!train"``...
        ds_id: Dataset-id filter, same grammar.
        reshape_transform: Callable ``tensor -> (B, C, h, w)`` for layers whose output is not
            a 4-D map or a square token grid.
        pin_samples: Show the first epoch's samples at every epoch (see module docstring).
        denormalize: ``(mean, std)`` per channel to undo the input normalisation before
            drawing; without it the renderer min-max normalises each image.
        logger: An :class:`~mlflow_eigencam.logger.EigenCAMLogger` to use instead of
            building one (then the logger arguments above and ``logger_kwargs`` are unused).
        preds_from_output: When ``update()`` gets no ``preds``, use the model's own output of
            the captured forward pass (its first tensor, e.g. logits).
        **logger_kwargs: Passed to ``EigenCAMLogger`` (``run_id``, ``colormap``, ``alpha``,
            ``log_every_n_epochs``, ...).

    Raises:
        TypeError / ValueError: Bad arguments (named in the message).
    """

    def __init__(
        self,
        model: nn.Module,
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
        logger: Any = None,
        preds_from_output: bool = False,
        **logger_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError(
                f"reshape_transform must be callable or None, got {type(reshape_transform).__name__}"
            )
        if not isinstance(pin_samples, bool):
            raise TypeError(f"pin_samples must be a bool, got {pin_samples!r}")
        self._model = unwrap_model(model)
        self._reshape = reshape_transform
        self._grid_hw: Optional[Tuple[int, int]] = None  # patch grid found by auto-detection
        # A named layer: its first captured forward also reads the patch grid (token layers).
        self._grid_pending = target_layer is not None and reshape_transform is None
        self._pin_enabled = pin_samples and n_samples is not None
        self._denorm = _parse_denormalize(denormalize)
        self._preds_from_output = bool(preds_from_output)
        self._target_name: Optional[str] = None
        self._target_detail = ""  # what auto-detection saw, for the run tag
        self._target: Optional[nn.Module] = None
        if target_layer is not None:
            self._target_name, self._target = resolve_target_layer(self._model, target_layer)

        self._logger_args = dict(
            n_components=n_components,
            n_samples=n_samples,
            label_mapping=label_mapping,
            mode=mode,
            ds_id=ds_id,
            **logger_kwargs,
        )
        self._logger: Any = logger
        self._logger_ready = False
        self._handles: List[Any] = []
        self._capture: Optional[_Capture] = None
        self._in_capture = False
        self._seen: Dict[Key, None] = {}
        self._pins: Dict[Key, _Pin] = {}
        self._warned: set = set()
        self._closed = False
        if _rank_or_none(final=False) is not None:
            self._ensure_logger()

    # ----------------------------------------------------------------- public API

    @property
    def logger(self) -> Any:
        """The EigenCAMLogger (None on ranks other than 0)."""
        return self._ensure_logger()

    @property
    def target_layer(self) -> Optional[str]:
        """Dotted name of the hooked layer (None until auto-detection has run)."""
        return self._target_name

    @property
    def target_layer_tag(self) -> Optional[str]:
        """The run tag's value: the layer name, and for an automatic choice what was chosen
        (``"norm (auto: tokens (B, 197, 384) folded to a 14x14 patch grid ...)"``); the tag
        can be passed back as ``target_layer=``."""
        if self._target_name is None:
            return None
        detail = getattr(self, "_target_detail", "")
        return f"{self._target_name} ({detail})" if detail else self._target_name

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run the images go to (None on ranks other than 0 or before logging)."""
        logger = self._ensure_logger()
        return None if logger is None else logger.run_id

    @contextlib.contextmanager
    def capture(self, mode: str = "eval", ds_id: Optional[str] = None) -> Iterator["EigenCAMMonitor"]:
        """Hook the target layer for the forward passes run inside the ``with`` block.

        Installs nothing when the (mode, ds_id) is filtered out, when this epoch's buffer is
        already full, when pinned samples will be re-run at epoch end, on ranks other than 0,
        or after ``close()``.

        Args:
            mode: One of ``"train"``, ``"eval"``, ``"test"``, ``"infer"``.
            ds_id: Dataset id (e.g. ``"val"``), or None.

        Yields:
            The monitor (so ``with monitor.capture() as m: m.update(...)`` reads well).
        """
        _check_mode(mode)
        if ds_id is not None and not isinstance(ds_id, str):
            raise TypeError(f"ds_id must be a string or None, got {type(ds_id).__name__}")
        if self._capture is not None or self._in_capture:
            raise RuntimeError("monitor.capture() blocks cannot be nested")
        logger = self._ensure_logger()
        key: Key = (mode, ds_id)
        self._in_capture = True
        try:
            if logger is None or self._closed or not logger.wants(mode, ds_id):
                yield self
                return
            self._seen[key] = None
            pin = self._pins.get(key)
            if pin is not None and pin.established:
                yield self  # re-run at epoch end: nothing to do per batch
                return
            room = logger.room(mode, ds_id)
            if room is not None and room <= 0:
                yield self
                return
            self._capture = _Capture(key=key, room=room)
            self._install_hooks(self._capture)
            try:
                yield self
            finally:
                try:
                    if self._capture is not None and self._capture.finder is not None:
                        # A forward without update(): still learn the layer from it.
                        in_flight = sys.exc_info()[0] is not None
                        try:
                            self._resolve_auto(self._capture)
                        except ValueError:
                            if not in_flight:  # never mask the user's own exception
                                raise
                finally:
                    self._remove_hooks()
                    self._capture = None
        finally:
            self._in_capture = False

    def update(self, images: Any, labels: Any = None, preds: Any = None) -> None:
        """Hand the captured batch's kept samples to the logger.

        Call inside ``capture()``, after the forward pass.

        Args:
            images: The model's input, float ``(B, C, H, W)`` (or ``(B, H, W)``) tensor, or
                a list of same-size ``(C, H, W)`` images (a torchvision detector; its map is
                then cropped to the cells over each resized image, not its padding).
            labels: Class indices ``(B,)``, one-hot / probabilities ``(B, K)``, strings, or None.
            preds: The model's output for the batch (logits ``(B, K)``...), or None.
        """
        cap = self._capture
        if cap is None:
            if not self._in_capture:
                self._warn_once("outside", "EigenCAMMonitor.update() called outside capture(); ignored")
            return
        if cap.finder is not None:
            self._resolve_auto(cap)
        act, output = cap.act, cap.output
        cap.act, cap.output = None, None  # one forward, one update
        if act is None:
            self._warn_once(
                "no-act",
                f"target layer {self._target_name!r} produced no output inside capture(); was "
                "the forward pass run before update()?",
            )
            return
        if preds is None and self._preds_from_output:
            preds = output
        as_list = isinstance(images, (list, tuple)) and bool(images) and all(
            isinstance(im, torch.Tensor) for im in images)
        images_t = _stack_images(images) if as_list else (
            images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images)))
        if images_t.ndim not in (3, 4):
            raise ValueError(
                f"images must be the model's (B, C, H, W) or (B, H, W) input, got shape "
                f"{tuple(images_t.shape)}"
            )
        k = min(int(images_t.shape[0]), int(act.shape[0]))
        if cap.room is not None:
            k = min(k, cap.room)
        if k <= 0:
            return
        grid = tokens_to_grid(act[:k], self._reshape, self._grid_hw)
        inputs = images_t[:k].detach().to("cpu", copy=True)
        labels_k = _to_numpy(labels, k)
        canvas, cap.canvas = cap.canvas, None
        self._log_cropped(cap.key, inputs, grid, labels_k, _to_numpy(preds, k), canvas)
        if cap.room is not None:
            cap.room -= k
            if self._pin_enabled:
                pin = self._pins.setdefault(cap.key, _Pin())
                if not pin.established:
                    pin.images.append(inputs)
                    pin.labels.append(labels_k)
                    pin.as_list = as_list  # a detector takes a list of (C, H, W) images

    def epoch_end(self, epoch: int, *, mode: Optional[str] = None) -> None:
        """Log every (mode, ds_id) seen since the last call as MLflow step ``epoch``.

        Pinned keys get their one extra forward pass here.

        Args:
            epoch: The step shown in MLflow (usually the 0-based epoch).
            mode: Only end the keys of this mode (Lightning ends train and eval separately).
        """
        logger = self._ensure_logger()
        if logger is None or self._closed:
            return
        if mode is not None:
            _check_mode(mode)
        keys = [key for key in self._seen if mode is None or key[0] == mode]
        for key in keys:
            del self._seen[key]
            pin = self._pins.get(key)
            if pin is not None and pin.established and logger.should_log(epoch):
                self._forward_pinned(key, pin)
            logger.on_epoch_end(epoch, mode=key[0], ds_id=key[1])
            if pin is not None and not pin.established and pin.count() > 0:
                pin.established = True

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait for pending uploads; True when everything was sent."""
        logger = self._ensure_logger()
        return True if logger is None else bool(logger.flush(timeout))

    def close(self, timeout: Optional[float] = None) -> None:
        """Remove any hook and close the logger (flushes it). Safe to call twice."""
        self._remove_hooks()
        self._capture = None
        if self._closed:
            return
        self._closed = True
        if self._logger_ready and self._logger is not None:
            self._logger.close(timeout)

    def __enter__(self) -> "EigenCAMMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _ensure_logger(self) -> Any:
        if self._logger_ready:
            return self._logger
        rank = _rank_or_none()
        self._logger_ready = True
        if rank != 0:
            self._logger = None  # other ranks never build a logger nor communicate
            return None
        if self._logger is None:
            from mlflow_eigencam.logger import EigenCAMLogger

            kwargs = dict(self._logger_args)
            kwargs.setdefault("image_layout", "NCHW")
            kwargs.setdefault("channels_last", False)
            if self._target_name is not None:
                kwargs.setdefault("target_layer", self._target_name)
            self._logger = EigenCAMLogger(**kwargs)
        elif self._target_name is not None:
            self._logger.set_target_layer(self.target_layer_tag)
        if self._target_name is not None:
            _log.info("EigenCAM target layer: %s", self._target_name)
        return self._logger

    def _make_hook(self, cap: _Capture) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                cap.act = _keep(tensor, cap.room)
                finder = cap.grid_finder
                if tensor.ndim == 3 and finder is not None and finder.conv is not None:
                    # A named token layer: fold onto the patch grid of the map before it
                    # (non-square inputs too), as auto-detection would.
                    h, w = int(finder.conv[2].shape[2]), int(finder.conv[2].shape[3])
                    if 0 <= int(tensor.shape[1]) - h * w <= MAX_EXTRA_TOKENS:
                        self._grid_hw = (h, w)

        return hook

    def _make_output_hook(self, cap: _Capture) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            boxes = _detections(output)
            if boxes is not None:  # a detector's list of {"boxes", "labels", "scores"}
                cap.output = _to_numpy(boxes, len(boxes) if cap.room is None else cap.room)
                return
            tensor = _first_tensor(output)
            if tensor is not None and tensor.ndim >= 1:
                cap.output = _keep(tensor, cap.room)

        return hook

    def _make_canvas_hook(self, cap: _Capture) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            # The resized size of each image and the padded batch (sizes only, no tensor kept).
            cap.canvas = _canvas_of(output)

        return hook

    def _install_hooks(self, cap: _Capture) -> None:
        transform = _transform_of(self._model)
        if transform is not None:  # a detector: crop each map to its image (see update())
            self._handles.append(transform.register_forward_hook(self._make_canvas_hook(cap)))
        if self._target is None:
            cap.finder = _LayerFinder(self._model, cap.room)
        else:
            if self._grid_pending:
                cap.grid_finder = _LayerFinder(self._model, room=1)
            self._handles.append(self._target.register_forward_hook(self._make_hook(cap)))
        if self._preds_from_output:
            self._handles.append(self._model.register_forward_hook(self._make_output_hook(cap)))

    def _remove_hooks(self) -> None:
        cap = self._capture
        if cap is not None and cap.finder is not None:
            cap.finder.remove()
            cap.finder = None
        if cap is not None and cap.grid_finder is not None:
            cap.grid_finder.remove()
            if cap.grid_finder.called:
                self._grid_pending = False  # one forward pass told the grid (or that none)
            cap.grid_finder = None
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _resolve_auto(self, cap: _Capture) -> None:
        """Turn the finder's observation into the target layer (first captured forward)."""
        finder, cap.finder = cap.finder, None
        assert finder is not None
        finder.remove()
        if not finder.called:
            return  # no forward yet: look again at the next capture
        found = finder.result()
        if found is None:
            raise ValueError(_NO_LAYER_MESSAGE.format(model=type(self._model).__name__))
        name, module, tensor = found
        self._target_name, self._target = name, module
        self._grid_hw = finder.token_grid()
        self._target_detail = finder.describe()
        _log.info("EigenCAM target layer: %s (%s)", name, self._target_detail)
        if self._logger is not None:
            self._logger.set_target_layer(self.target_layer_tag)
        cap.act = tensor  # copied by the finder when its hook ran, before any in-place op
        # Later forwards inside this same capture block use the real hook.
        self._handles.append(module.register_forward_hook(self._make_hook(cap)))

    def _images_for_logger(self, images: torch.Tensor) -> np.ndarray:
        """CPU inputs -> numpy NCHW for the renderer (float32, denormalised when asked)."""
        if images.ndim == 3:
            images = images.unsqueeze(1)  # (B, H, W) grayscale -> (B, 1, H, W)
        if images.dtype == torch.uint8:
            return images.numpy()
        images = images.float()
        if self._denorm is not None:
            mean, std = self._denorm
            if images.shape[1] != mean.shape[1] and mean.shape[1] != 1:
                raise ValueError(
                    f"denormalize has {mean.shape[1]} channels but images have {images.shape[1]}"
                )
            images = images * std + mean
        return images.numpy()

    def _forward_pinned(self, key: Key, pin: _Pin) -> None:
        """One no-grad eval forward on the pinned inputs; hand the result to the logger."""
        if self._target is None:
            return
        images, labels = pin.stacked()
        cap = _Capture(key=key, room=None)
        model = self._model
        device = _device_of(model)
        handles = [self._target.register_forward_hook(self._make_hook(cap))]
        transform = _transform_of(model)
        if transform is not None:
            handles.append(transform.register_forward_hook(self._make_canvas_hook(cap)))
        try:
            # fork_rng: a model drawing random numbers in eval mode must not shift the
            # user's random stream (their next batch / dropout mask stays the same).
            cuda = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), preserve_training_flags(model), torch.no_grad():
                model.eval()
                batch = images.to(device)
                output = model(list(batch) if pin.as_list else batch)
        except Exception as exc:  # a logging failure never stops training
            self._pins.pop(key, None)
            self._warn_once(
                f"pin-{key}",
                f"EigenCAM: extra forward pass on pinned samples of {key} failed ({exc!r}); "
                "logging that key without pinning from now on",
            )
            self._pin_enabled = False
            return
        finally:
            for handle in handles:
                handle.remove()
        if cap.act is None:
            return
        grid = tokens_to_grid(cap.act, self._reshape, self._grid_hw)
        preds = _to_numpy(_detections(output) or _first_tensor(output), images.shape[0])
        self._log_cropped(key, images, grid, labels, preds, cap.canvas)

    def _log_cropped(self, key: Key, images: torch.Tensor, grid: torch.Tensor, labels: Any,
                     preds: Any, canvas: Optional[_Canvas]) -> None:
        """Hand a batch to the logger, the map cropped to the images' own region of a
        detector's padded canvas (the whole map for other models)."""
        cropped, extent = _crop_to_images(grid, canvas)
        kwargs = {} if extent is None else {"map_extent": extent}
        self._logger.on_batch_end(
            self._images_for_logger(images),
            cropped.float().cpu().numpy(),
            labels,
            preds,
            mode=key[0],
            ds_id=key[1],
            **kwargs,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _keep(tensor: torch.Tensor, room: Optional[int]) -> torch.Tensor:
    """Detached copy of the first ``room`` samples, still on the device.

    Copied (not a view) because a later in-place op (``ReLU(inplace=True)``, ``out += x``)
    would change the captured values, and a view would keep the whole batch alive.
    """
    rows = tensor.detach()
    if room is not None:
        rows = rows[:room]
    return rows.clone()


def _check_mode(mode: Any) -> None:
    from mlflow_eigencam.filters import MODES

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _parse_denormalize(
    denormalize: Optional[Tuple[Sequence[float], Sequence[float]]],
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    if denormalize is None:
        return None
    try:
        mean, std = denormalize
    except (TypeError, ValueError):
        raise TypeError(f"denormalize must be (mean, std), got {denormalize!r}") from None
    mean_t = torch.as_tensor(np.atleast_1d(np.asarray(mean, dtype=np.float32)))
    std_t = torch.as_tensor(np.atleast_1d(np.asarray(std, dtype=np.float32)))
    if mean_t.ndim != 1 or std_t.ndim != 1 or mean_t.shape != std_t.shape:
        raise ValueError(
            f"denormalize mean and std must be equal-length sequences, got {mean!r} and {std!r}"
        )
    if not torch.all(torch.isfinite(mean_t)) or not torch.all(std_t > 0):
        raise ValueError(f"denormalize needs finite means and positive stds, got {mean!r}, {std!r}")
    return mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1)
