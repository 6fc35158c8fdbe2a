"""Tiny Hugging Face image classifiers at random init, a shapes dataset and a Trainer factory
(no downloads)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from transformers import (ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments,
                          ViTConfig, ViTForImageClassification)

from _shapes import SHAPES, make_shapes

N_CLASSES = 3


class ShapesDataset(torch.utils.data.Dataset):
    """``n`` seeded shape images as ``{"pixel_values": (3, H, W) float32, "labels": int64}``,
    normalised by ``normalize=(mean, std)`` if given;
    ``augment=True`` adds noise from torch's global generator at each read (a random
    transform: reading an item moves the user's random stream)."""

    def __init__(self, n: int, size: Union[int, Tuple[int, int]] = 32, seed: int = 0,
                 augment: bool = False, normalize: Optional[Tuple[list, list]] = None) -> None:
        images, labels, boxes = make_shapes(n, size, n_classes=N_CLASSES, seed=seed)
        self.images, self.labels, self.boxes = torch.from_numpy(images), torch.from_numpy(labels), boxes
        if normalize is not None:  # what an image processor's (x - mean) / std does
            mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in normalize)
            self.images = (self.images - mean) / std
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        image = self.images[i]
        if self.augment:
            image = image + 0.01 * torch.randn_like(image)
        return {"pixel_values": image, "labels": self.labels[i]}


def id2label() -> Dict[int, str]:
    return dict(enumerate(SHAPES[:N_CLASSES]))


def tiny_vit(size: int = 32, dropout: float = 0.0) -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=dropout, num_labels=N_CLASSES, id2label=id2label(),
        label2id={v: k for k, v in id2label().items()}))


def tiny_resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
        num_labels=N_CLASSES, id2label=id2label(), label2id={v: k for k, v in id2label().items()}))


def make_trainer(model: torch.nn.Module, out_dir: Any, *, train: Optional[ShapesDataset] = None,
                 val: Optional[ShapesDataset] = None, callbacks: Optional[list] = None,
                 report_to: Any = "mlflow", processing_class: Any = None, **args: Any) -> Trainer:
    """A CPU Trainer: 2 epochs of 16 images in batches of 8, one evaluation per epoch."""
    kwargs: Dict[str, Any] = dict(
        output_dir=str(out_dir), num_train_epochs=2, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, eval_strategy="epoch", save_strategy="no", logging_steps=1,
        learning_rate=1e-3, report_to=report_to, use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    kwargs.update(args)
    return Trainer(model=model, args=TrainingArguments(**kwargs),
                   train_dataset=train if train is not None else ShapesDataset(16, seed=1),
                   eval_dataset=val if val is not None else ShapesDataset(8, seed=2),
                   callbacks=callbacks, processing_class=processing_class)
