"""Which layer is explained: a named layer resolved, or one found by watching a forward pass;
and how a layer's output becomes a ``(B, C, h, w)`` map (transformer tokens folded).

Auto-detection (:class:`LayerFinder`) picks the last module whose output is a feature map of
the input image (NCHW, or channels-last ``(B, h, w, C)`` permuted; or the last token layer
over its patch grid), never a tensor made inside an attention block, and not a decoder: when
the model upsamples after its coarsest map (a classifier with an auxiliary reconstruction
head), the last map before the upsampling is chosen and one warning names it among the
candidates. A choice it is unsure of (maps of about the same size on other branches) is
said in the tag and one warning too.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import nn

from ...errors import WarnOnce
from ._model import first_tensor, keep_rows, quiet_forward, unwrap_model

#: Most leading (class / register / distillation) tokens dropped when a layer's (B, N, D)
#: output is folded into a square grid; more than this means a non-square grid.
MAX_EXTRA_TOKENS = 8

#: ``(B, N, D)`` (or any) tensor -> ``(B, C, h, w)`` tensor: what ``reshape_transform=`` takes.
ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]

#: A watched output: (dotted name, module, detached copy of its kept rows).
Found = Tuple[str, nn.Module, torch.Tensor]

__all__ = [
    "MAX_EXTRA_TOKENS",
    "NO_LAYER_MESSAGE",
    "LayerFinder",
    "ReshapeTransform",
    "find_target_layer",
    "fits_geometry",
    "is_attention",
    "map_layout",
    "resolve_target_layer",
    "tokens_to_grid",
]

NO_LAYER_MESSAGE = (
    "no submodule of {model} outputs a 4-D feature map with spatial size above 1; pass "
    "target_layer= (a module or dotted name), with reshape_transform= for unusual layouts"
)


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
    channels_last: bool = False,
) -> torch.Tensor:
    """Bring a layer's output to ``(B, C, h, w)``.

    Args:
        activations: 4-D ``(B, C, h, w)`` (returned as is; ``(B, h, w, C)`` permuted when
            ``channels_last``), or transformer tokens
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
        channels_last: The 4-D output is ``(B, h, w, C)`` (a Swin / MambaOut stage; see
            :func:`map_layout`).

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
        return activations.permute(0, 3, 1, 2) if channels_last else activations
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


def fits_geometry(h: int, w: int, height: int, width: int) -> bool:
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


def map_layout(shape: Tuple[int, ...], image_hw: Optional[Tuple[int, int]]) -> str:
    """How a 4-D output ``shape`` lies over an input image of ``image_hw`` pixels.

    ``"NCHW"`` when ``(shape[2], shape[3])`` fits the image (:func:`fits_geometry`), or
    nothing is known of the image; ``"NHWC"`` when only the channels-last reading fits:
    ``(shape[1], shape[2])`` fits the image and ``shape[3]``, the channels, is the largest
    dimension (Swin's ``norm`` ``(B, 7, 7, 768)`` on a 224x224 image is no 7-channel
    7x768 map); ``"ambiguous"`` when both readings fit (``(B, 8, 16, 32)`` on 32x64: 8
    channels at stride 2, or 32 at stride 4); ``"none"`` when neither fits.
    """
    if image_hw is None:
        return "NCHW"
    height, width = image_hw
    nchw = fits_geometry(int(shape[2]), int(shape[3]), height, width)
    nhwc = (int(shape[3]) > max(int(shape[1]), int(shape[2]))
            and fits_geometry(int(shape[1]), int(shape[2]), height, width))
    if nchw and nhwc:
        return "ambiguous"
    return "NCHW" if nchw else "NHWC" if nhwc else "none"


#: Children that make a module an attention block (query / key / value projections).
_QKV_CHILDREN = ({"qkv"}, {"kv"}, {"to_qkv"}, {"in_proj"}, {"q", "k"}, {"q", "kv"},
                 {"query", "key"}, {"q_proj", "k_proj"})


def is_attention(name: str, module: nn.Module) -> bool:
    """Whether ``module`` (dotted ``name``) is an attention block: ``nn.MultiheadAttention``,
    a module with query / key / value projections as children (``qkv``, ``kv``, ``q`` and
    ``k``, ...), or ``attn`` / ``attention`` in its class name or its own name. Nothing made
    inside one is a feature map of the image: its 4-D tensors are ``(B, heads, N, N)``
    softmax weights or ``(B, heads, N, head_dim)`` splits, its 3-D ones the attention branch
    or a ``qkv`` / ``kv`` projection, not the block stream."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    children = {child for child, _ in module.named_children()}
    if any(names <= children for names in _QKV_CHILDREN):
        return True
    own, cls = name.rsplit(".", 1)[-1].lower(), type(module).__name__.lower()
    return any(word in own or word in cls for word in ("attn", "attention"))


def _attention_matrix(tensor: torch.Tensor) -> bool:
    """``(B, heads, N, N)`` softmax weights: non-negative rows that sum to 1 (first sample)."""
    if tensor.ndim != 4 or tensor.shape[-1] != tensor.shape[-2] or not tensor.is_floating_point():
        return False
    first = tensor[:1].detach().float()
    return bool((first >= 0).all()) and bool(
        torch.allclose(first.sum(-1), torch.ones((), device=first.device), atol=1e-3))


def _search_scope(model: nn.Module) -> Tuple[str, str]:
    """``(prefix, why)``: where auto-detection looks.

    A detector or segmenter (torchvision's ``backbone`` / ``backbone.body``) is searched only
    inside its backbone: after it come FPN extra levels (RetinaNet's 2x2 ``p7``), RoI pooling
    over proposals and box heads, none of which is a map of the image. A backbone without an
    FPN body but with ``features`` and ``extra`` layers (torchvision's SSD / SSDlite) is
    searched in its ``features``: the extras are prediction levels shrinking to 1x1, not the
    backbone's last stage. Other models: all of it.
    """
    # Not a hybrid ViT's ``patch_embed.backbone``: a CNN stem before the transformer blocks.
    names = [name for name, _ in model.named_modules() if name.split(".")[-1] == "backbone"
             and "embed" not in name]
    if not names:
        return "", ""
    backbone = min(names, key=lambda n: (n.count("."), n))
    module = model.get_submodule(backbone)
    if isinstance(getattr(module, "body", None), nn.Module):
        return backbone + ".body", "last feature map of the detection backbone"
    children = dict(module.named_children())
    if isinstance(children.get("features"), nn.Module) and ({"extra", "extras"} & set(children)):
        return backbone + ".features", "last feature map of the detection backbone, not its extras"
    return backbone, "last feature map of the backbone"


class LayerFinder:
    """Temporary hooks on every submodule that watch one forward pass.

    The target is the LAST module, in order of forward completion, whose output is an image
    feature map: 4-D with the batch size of the first 4-D image tensor any module received
    (the "input"), ``h * w > 1``, and ``(h, w)`` the input's ``(H, W)`` through one stride
    (see :func:`fits_geometry`), either ``(B, C, h, w)`` or, when only that reading fits,
    channels-last ``(B, h, w, C)`` (a timm Swin or MambaOut stage; permuted, see
    :func:`map_layout`). Never a module inside an attention block (:func:`is_attention`),
    nor softmax weights ``(B, heads, N, N)``, nor ``h`` the length of a token sequence
    already seen (``(B, heads, N, head_dim)``). A container completes after its children,
    so for a ResNet ``layer4`` wins over its last ReLU, and the 1x1 output of the average
    pool does not qualify. If modules completing after that layer output ``(B, N, D)``
    tokens with ``N`` = its ``h * w`` plus at most :data:`MAX_EXTRA_TOKENS` prefix tokens (a
    ViT: patch-embedding conv, then transformer blocks over those patches, class /
    distillation / register tokens first), the last of them of the block stream's width (the
    width most token layers have; not an MLP's hidden width) wins instead, folded onto that
    ``h x w`` grid.

    Not a decoder: when the last map is finer than the coarsest map before it, the model
    upsampled (an auxiliary reconstruction head, a decoder); the maps after the upsampling are
    made for drawing an image, not read by a classification head. The choice is then what it
    was just before the upsampling (the encoder's last map, or tokens over it), and
    :meth:`choice_warning` says so, naming the candidates.

    Unsure: when maps of about the chosen one's size (area within a factor 2) came from
    modules off its chain (not nested in it, nor feeding it through a tensor of the shape it
    takes: another branch), the choice is one of several; :meth:`describe` and
    :meth:`choice_warning` name them.

    Candidates are copied AT HOOK TIME (their first ``room`` rows): a later in-place op
    (DenseNet's ``F.relu(features, inplace=True)`` after its ``features``) must not change
    what is explained, or the first epoch would differ from the ones after it.
    """

    def __init__(self, model: nn.Module, room: Optional[int] = None) -> None:
        self._room = room
        self._handles: List[Any] = []
        self.conv: Optional[Found] = None  # the last map so far (NCHW: channels-last permuted)
        self.tokens: Optional[Found] = None  # the last token layer over self.grid
        self.grid: Optional[Tuple[int, int]] = None  # the token grid: self.conv's, or pooled
        self.input_shape: Optional[Tuple[int, int, int]] = None  # (B, H, W) of the input
        self._token_counts: Set[int] = set()  # lengths of the token sequences seen over the grid
        self._tokens_by_width: Dict[int, Found] = {}  # over self.grid: the last per width
        self._width_counts: Dict[int, int] = {}  # how many token layers had each width
        self._extra: Optional[int] = None  # prefix tokens of the token layers over the grid
        self._min_area = math.inf  # the coarsest map's h * w so far
        # (conv, tokens, grid) as they stood when a map finer than the coarsest one arrived.
        self._encoder: Optional[Tuple[Found, Optional[Found], Optional[Tuple[int, int]]]] = None
        self._maps: List[Tuple[str, Tuple[int, ...]]] = []  # every map: (name, (C, h, w))
        self._channels_last: Set[str] = set()  # maps that were (B, h, w, C)
        self._clock = 0  # hook events so far: orders starts and ends
        self._starts: Dict[str, Tuple[int, Tuple[int, ...]]] = {}  # name: (clock, input shape)
        self._ends: Dict[str, Tuple[int, Tuple[int, ...]]] = {}  # name: (clock, output shape)
        self.called = False
        self.prefix, self.scope_why = _search_scope(model)
        inside_attention: List[str] = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(name)))
            in_scope = not self.prefix or name == self.prefix or name.startswith(self.prefix + ".")
            if name and any(name == a or name.startswith(a + ".") for a in inside_attention):
                continue
            if name and name != self.prefix and is_attention(name, module):
                inside_attention.append(name)
                continue
            if name and in_scope:  # the root's output is the prediction, not a feature map
                self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_pre_hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, inputs: Any) -> None:
            tensor = first_tensor(inputs)
            self._clock += 1
            if tensor is not None and name not in self._starts:
                self._starts[name] = (self._clock, tuple(int(d) for d in tensor.shape))
            if self.input_shape is None and tensor is not None and tensor.ndim == 4:
                self.input_shape = (int(tensor.shape[0]), int(tensor.shape[2]), int(tensor.shape[3]))

        return pre_hook

    def _map_layout(self, tensor: torch.Tensor) -> Optional[bool]:
        """None: not a map; False: a ``(B, C, h, w)`` map; True: a ``(B, h, w, C)`` map."""
        if tensor.ndim != 4:
            return None
        nchw_ok = tensor.shape[2] * tensor.shape[3] > 1 and int(tensor.shape[2]) not in self._token_counts
        if self.input_shape is None:  # no image input seen (precomputed features): shape decides
            return False if nchw_ok else None
        batch, height, width = self.input_shape
        if int(tensor.shape[0]) != batch or _attention_matrix(tensor):
            return None
        layout = map_layout(tuple(tensor.shape), (height, width))
        if layout in ("NCHW", "ambiguous"):
            return False if nchw_ok else None
        return True if layout == "NHWC" and tensor.shape[1] * tensor.shape[2] > 1 else None

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.called = True
            self._clock += 1
            if isinstance(output, dict):
                # Several levels (a detection backbone's {"0": layer2, ..., "2": layer4}):
                # the modules that made them were candidates already; the first value would
                # be the finest level, not the last stage.
                return
            tensor = first_tensor(output)
            if tensor is None:
                return
            self._ends[name] = (self._clock, tuple(int(d) for d in tensor.shape))
            channels_last = self._map_layout(tensor)
            if channels_last is not None:
                if channels_last:
                    self._channels_last.add(name)
                    tensor = tensor.permute(0, 3, 1, 2)
                else:
                    self._channels_last.discard(name)
                self._see_map(name, module, tensor)
            elif tensor.ndim == 3 and self.conv is not None:
                self._see_tokens(name, module, tensor)

        return hook

    def _see_map(self, name: str, module: nn.Module, tensor: torch.Tensor) -> None:
        area = int(tensor.shape[2]) * int(tensor.shape[3])
        if self.conv is not None and _area(self.conv) == self._min_area < area:
            # The model upsamples here: remember the choice as it stood at the coarsest map.
            self._encoder = (self.conv, self.tokens, self.grid)
        self._min_area = min(self._min_area, area)
        self._maps.append((name, tuple(int(d) for d in tensor.shape[1:])))
        self.conv = (name, module, keep_rows(tensor, self._room))
        self.tokens = None
        self.grid = (int(tensor.shape[2]), int(tensor.shape[3]))
        self._tokens_by_width, self._width_counts = {}, {}
        self._extra = None

    def _see_tokens(self, name: str, module: nn.Module, tensor: torch.Tensor) -> None:
        assert self.conv is not None and self.grid is not None
        if self.input_shape is not None and tensor.shape[0] != self.input_shape[0]:
            return
        n_tokens = int(tensor.shape[1])
        if self._extra is not None and not 0 <= n_tokens - self.grid[0] * self.grid[1] <= MAX_EXTRA_TOKENS:
            # A token stage that pooled the grid by 2, 4 or 8 (LeViT, MViTv2, Hiera), the
            # prefix tokens kept: its tokens lie on the ceil-halved grid.
            pooled = self.grid
            for _ in range(3):
                pooled = ((pooled[0] + 1) // 2, (pooled[1] + 1) // 2)
                if pooled[0] * pooled[1] > 1 and n_tokens - self._extra == pooled[0] * pooled[1]:
                    self.grid = pooled
                    self._tokens_by_width, self._width_counts = {}, {}
                    break
        extra = n_tokens - self.grid[0] * self.grid[1]
        if 0 <= extra <= MAX_EXTRA_TOKENS:  # prefix tokens may join later (a class token)
            self._extra = extra
            width = int(tensor.shape[2])
            self._tokens_by_width[width] = (name, module, keep_rows(tensor, self._room))
            self._width_counts[width] = self._width_counts.get(width, 0) + 1
            self._token_counts.add(int(tensor.shape[1]))
            # The block stream: the width most token layers have (ties: the latest).
            stream = max(self._width_counts, key=lambda w: (self._width_counts[w], w == width))
            self.tokens = self._tokens_by_width[stream]

    def remove(self) -> None:
        """Remove every hook (the finder keeps what it saw)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _decoder_follows(self) -> bool:
        """The last map is finer than the coarsest one before it (and no tokens came after)."""
        return (self._encoder is not None and self.conv is not None and self.tokens is None
                and _area(self.conv) > self._min_area)

    def _chosen(self) -> Tuple[Optional[Found], Optional[Found], Optional[Tuple[int, int]]]:
        """``(map, tokens over it, their grid)`` of the choice: the encoder's when a decoder
        follows."""
        if self._decoder_follows():
            assert self._encoder is not None
            return self._encoder
        return self.conv, self.tokens, self.grid

    def result(self) -> Optional[Found]:
        """``(name, module, kept rows)`` of the chosen layer, or None when no map was seen.
        A channels-last map's rows are kept permuted to ``(B, C, h, w)``."""
        conv, tokens, _ = self._chosen()
        return tokens if tokens is not None else conv

    def channels_last(self) -> bool:
        """Whether the chosen layer outputs ``(B, h, w, C)`` (permute it to explain it)."""
        found = self.result()
        return found is not None and self.token_grid() is None and found[0] in self._channels_last

    def token_grid(self) -> Optional[Tuple[int, int]]:
        """The patch grid ``(h, w)`` behind the chosen token layer, if one was chosen."""
        conv, tokens, grid = self._chosen()
        return None if tokens is None or conv is None else grid

    def unsure(self) -> List[str]:
        """Maps of about the chosen map's size (area within a factor 2) from modules off its
        chain: not nested in a module of the chain, whose chain runs back from the choice
        through the last earlier module output of its input's size (a permute or a flatten
        between them keeps the size). Other branches (a two-branch model), not the stages
        that fed the choice. Outermost modules only, in forward order; empty for a token layer
        or when a decoder follows."""
        conv, tokens, _ = self._chosen()
        if conv is None or tokens is not None or self._decoder_follows():
            return []
        chosen = conv[0]
        chain = [chosen]
        while chain[-1] in self._starts:
            start, taken = self._starts[chain[-1]]
            fed = [n for n, (end, shape) in self._ends.items()
                   if end < start and _same_size(shape, taken) and n not in chain]
            if not fed:
                break
            chain.append(max(fed, key=lambda n: self._ends[n][0]))
        area = _area(conv)
        shapes = dict(self._maps)
        off = [n for n, (end, _) in self._ends.items()
               if n in shapes and end < self._ends[chosen][0]
               and not any(_nested(n, c) for c in chain)
               and area / 2 <= shapes[n][1] * shapes[n][2] <= area * 2]
        return [n for n in off if not any(o != n and n.startswith(o + ".") for o in off)]

    def describe(self) -> str:
        """What was chosen and why, for the target-layer tag (``"(auto: ...)"``)."""
        found = self.result()
        if found is None:
            return ""
        shape = tuple(int(d) for d in found[2].shape[1:])
        grid = self.token_grid()
        if grid is not None:
            h, w = grid
            extra = shape[0] - h * w
            what = (f"tokens (B, {shape[0]}, {shape[1]}) folded to a {h}x{w} patch grid "
                    f"({extra} prefix token{'s' if extra != 1 else ''} dropped)")
        elif self.channels_last():
            what = (f"channels-last feature map (B, {shape[1]}, {shape[2]}, {shape[0]}) "
                    f"permuted to (B, {shape[0]}, {shape[1]}, {shape[2]})")
        else:
            what = f"feature map (B, {shape[0]}, {shape[1]}, {shape[2]})"
        if self._decoder_follows():
            what += ", the last before the model upsamples (a decoder follows)"
        if self.scope_why:
            what += f", {self.scope_why}"
        others = self.unsure()
        if others:
            what += f", unsure: also {', '.join(others)}"
        return f"auto: {what}"

    def choice_warning(self, model_name: str) -> Optional[str]:
        """One sentence when the choice skipped a decoder or is unsure (:meth:`unsure`): what
        was chosen, what was not, and the candidates with their shapes; None otherwise."""
        found = self.result()
        if found is None or self.conv is None:
            return None
        names = list(dict.fromkeys(name for name, _ in self._maps))  # forward order, once each
        shapes = dict(self._maps)
        if self._decoder_follows():
            at = names.index(found[0]) if found[0] in names else len(names) - 1
            shown = names[max(0, at - 2):at + 6]  # two before the choice, the decoder after it
            if names[-1] not in shown:
                shown += ["...", names[-1]]
            listed = ", ".join(n if n == "..." else f"{n} {_shape_text(shapes[n])}"
                               + (" <- chosen" if n == found[0] else "") for n in shown)
            return (f"automatic target layer of {model_name}: chose {found[0]!r} and not the "
                    f"last feature map {self.conv[0]!r} {_shape_text(shapes[self.conv[0]])}, "
                    f"because the model upsamples after {found[0]!r}: the maps after it belong "
                    f"to a decoder or reconstruction head, not to the features a classification "
                    f"head reads. Candidates (forward order): {listed}. Pass target_layer= to "
                    f"choose another.")
        others = self.unsure()
        if not others:
            return None
        listed = ", ".join(f"{n} {_shape_text(shapes[n])}" + (" <- chosen" if n == found[0] else "")
                           for n in names if n in others or n == found[0])
        return (f"automatic target layer of {model_name}: unsure, chose {found[0]!r} "
                f"{_shape_text(shapes[found[0]])}, the last of several feature maps of about the "
                f"same size on different branches. Candidates (forward order): {listed}. Pass "
                f"target_layer= (a name above) to choose one; the run tag says which was used.")


def _same_size(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    """Same batch and elements per sample: one tensor, maybe permuted or flattened between."""
    return bool(a) and bool(b) and a[0] == b[0] and math.prod(a) == math.prod(b)


def _nested(a: str, b: str) -> bool:
    """``a`` and ``b`` are the same module, or one contains the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _area(found: Found) -> int:
    return int(found[2].shape[2]) * int(found[2].shape[3])


def _shape_text(shape: Tuple[int, ...]) -> str:
    return "(" + "x".join(str(d) for d in shape) + ")"


def find_target_layer(model: nn.Module, *example_inputs: Any) -> Tuple[str, nn.Module]:
    """Run one no-grad forward pass and return the layer auto-detection would pick.

    Args:
        model: The model (flags and random state restored afterwards).
        *example_inputs: Positional inputs of ``model``, e.g. a ``(1, 3, H, W)`` float tensor.

    Returns:
        ``(name, module)``. When the choice skipped a decoder or is unsure (maps of about
        the same size on other branches), an :class:`~mlflow_eigencam.errors.EigenCAMWarning`
        names it among the candidates.

    Raises:
        ValueError: No submodule outputs a 4-D map with spatial size above 1.
    """
    model = unwrap_model(model)
    finder = LayerFinder(model, room=1)  # only the shapes matter here
    try:
        with quiet_forward(model):
            model(*example_inputs)
    finally:
        finder.remove()
    found = finder.result()
    if found is None:
        raise ValueError(NO_LAYER_MESSAGE.format(model=type(model).__name__))
    note = finder.choice_warning(type(model).__name__)
    if note is not None:
        WarnOnce().warn("auto-layer", note)
    return found[0], found[1]
