"""Tiny seeded models and data for the torch / Lightning tests (no downloads)."""

from __future__ import annotations

from typing import Any, List, Tuple

import numpy as np
import torch
from _shapes import make_shapes  # examples/_shapes.py (pytest's pythonpath; child_env)
from torch import nn

from mlflow_eigencam.logger import EigenCAMLogger


class BasicBlock(nn.Module):
    """torchvision's BasicBlock in miniature (shared ReLU, in-place add)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet: stem, layer1..layer4, avgpool (1x1), fc."""

    def __init__(self, n_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, width * 2, 2)
        self.layer3 = BasicBlock(width * 2, width * 2, 2)
        self.layer4 = BasicBlock(width * 2, width * 4, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyCNN(nn.Module):
    """conv-relu-pool-conv-relu-pool, dropout, linear: the plain-loop model."""

    def __init__(self, n_classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.flatten(self.pool(self.features(x)), 1)))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch conv -> (B, N, D) tokens with a class token (and optional registers) -> blocks."""

    def __init__(self, n_classes: int = 3, dim: int = 16, patch: int = 4, registers: int = 0) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1 + registers, dim))
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def shapes_tensors(n: int = 32, size: Any = 16, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (n, 3, H, W), labels int64 (n,)) of the synthetic shapes."""
    x, y, _ = make_shapes(n, size, seed=seed)
    return torch.from_numpy(x), torch.from_numpy(y)


def all_hooks(model: nn.Module) -> int:
    """Total forward (pre-)hooks on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class RecordingLogger(EigenCAMLogger):
    """The real logger, also remembering what each on_batch_end received."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: List[dict] = []

    def on_batch_end(self, images, activations, labels=None, preds=None, *, mode, ds_id=None,
                     **kwargs):
        self.batches.append(dict(images=images, activations=activations, labels=labels,
                                 preds=preds, mode=mode, ds_id=ds_id, **kwargs))
        super().on_batch_end(images, activations, labels, preds, mode=mode, ds_id=ds_id, **kwargs)


def table_rows(client, run_id: str, mode: str, ds_id: str) -> List[dict]:
    """Rows of the per-(mode, ds_id) table as dicts."""
    from mlflow_eigencam import _layout
    from tests.helpers.readback import load_json

    table = load_json(client, run_id, _layout.table_path(mode, ds_id))
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def image_counts(client, run_id: str) -> dict:
    """{(key, step): number of PNGs logged} (duplicates show as counts > 1)."""
    from tests.helpers.readback import _IMAGE_NAME

    counts: dict = {}
    for f in client.list_artifacts(run_id, "images"):
        m = _IMAGE_NAME.match(f.path.split("/", 1)[1])
        if m:
            key = (m.group("key").replace("~", "/"), int(m.group("step")))
            counts[key] = counts.get(key, 0) + 1
    return counts


def as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class TinyDetector(nn.Module):
    """torchvision detection layout: ``backbone.body`` stages, an FPN with an extra 1x1
    level, then a head and RoI features (K proposals, not B images)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1))
        self.backbone.fpn = nn.Conv2d(16, 8, 1)
        self.backbone.p7 = nn.Conv2d(8, 8, 3, 2, 1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        self.roi = nn.Conv2d(8, 8, 1)

    def forward(self, images: list) -> list:
        x = torch.stack(list(images))
        p = self.backbone.fpn(self.backbone.body(x))
        extra = self.backbone.p7(p)
        scores = self.head(extra)
        self.roi(p.repeat(3, 1, 1, 1))  # "proposals": 3x the batch
        return [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 24.0]]), "scores": s.flatten()[:1].sigmoid(),
                 "labels": torch.tensor([1])} for s in scores]


class TinyClassifierWithDecoder(nn.Module):
    """A classifier with an auxiliary reconstruction head: the encoder (16x16 -> 4x4) feeds
    both the classification head and a decoder back to a 3-channel 16x16 image. The decoder's
    output is the last 4-D map of the forward pass, but it is not what the classifier reads."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_classes))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, 2), nn.ReLU(), nn.ConvTranspose2d(8, 3, 2, 2))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return self.head(features), self.decoder(features)
