"""Synthetic datasets of shapes for Ultralytics YOLO (numpy + Pillow; nothing downloaded).

    data_yaml = write_yolo_shapes("/tmp/shapes")    # images/{train,val}, labels/{train,val}, data.yaml
    data_yaml = write_yolo_shapes("/tmp/seg", task="segment")   # labels are polygons
    root = write_cls_shapes("/tmp/cls")             # train/<class>/*.png, val/<class>/*.png

Each image holds one filled shape (its class) at a known box, from
:func:`_shapes.make_shapes`. Detection and segmentation: the last validation image is
background only (an empty label file), so "no true box" is covered, and validation images
are wider than tall, so a model sees them letterboxed. Classification: ImageFolder folders
(``data=root``), every class in both splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
from PIL import Image

from _shapes import SHAPES, make_shapes


def write_yolo_shapes(
    root: Union[str, Path],
    n_train: int = 16,
    n_val: int = 8,
    *,
    n_classes: int = 3,
    train_size: Tuple[int, int] = (64, 64),
    val_size: Tuple[int, int] = (48, 64),
    seed: int = 0,
    task: str = "detect",
) -> Path:
    """Write the dataset under ``root`` and return the path of its ``data.yaml``.

    Args:
        root: Folder (created) that receives ``images/``, ``labels/`` and ``data.yaml``.
        n_train / n_val: Image counts (``n_val >= 2``: the last one is background only).
        n_classes: Classes (1 to 4), named after :data:`_shapes.SHAPES`.
        train_size / val_size: ``(height, width)`` of the images.
        seed: Same seed, same files.
        task: ``"detect"`` (a label line is ``class xc yc w h``) or ``"segment"`` (``class``
            and the shape's outline as a polygon ``x1 y1 x2 y2 ...``), all normalised.

    Returns:
        Path of ``data.yaml`` (``path``, ``train``, ``val``, ``names``).
    """
    if task not in ("detect", "segment"):
        raise ValueError(f"task must be 'detect' or 'segment', got {task!r}")
    if n_val < 2:
        raise ValueError(f"n_val must be >= 2 (the last image is background only), got {n_val!r}")
    root = Path(root)
    for split, n, size, offset in (("train", n_train, train_size, 0), ("val", n_val, val_size, 1)):
        images, labels, boxes = make_shapes(n, size, n_classes=n_classes, seed=seed + offset,
                                            layout="NHWC")
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        height, width = size
        for i in range(n):
            stem = f"{split}_{i:03d}"
            line = ""
            image = images[i]
            if split == "val" and i == n - 1:  # background only: noise, no shape, no label
                rng = np.random.default_rng(seed + 99)
                image = np.clip(0.25 + rng.normal(0.0, 0.15, size=image.shape), 0.0, 1.0)
            else:
                x0, y0, x1, y1 = (float(v) for v in boxes[i])
                if task == "segment":
                    points = _outline(SHAPES[int(labels[i])], x0, y0, x1 - x0)
                    line = f"{int(labels[i])} " + " ".join(
                        f"{x / width:.6f} {y / height:.6f}" for x, y in points) + "\n"
                else:
                    line = (f"{int(labels[i])} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                            f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}\n")
            Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(root / "images" / split / f"{stem}.png")
            (root / "labels" / split / f"{stem}.txt").write_text(line)
    names = "\n".join(f"  {c}: {SHAPES[c]}" for c in range(n_classes))
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return yaml


def _outline(kind: str, x0: float, y0: float, side: float) -> List[Tuple[float, float]]:
    """The polygon (pixels) of a shape :func:`_shapes.make_shapes` draws in the box at
    ``(x0, y0)`` of ``side`` pixels."""
    c = side / 2.0
    if kind == "circle":
        angles = np.linspace(0.0, 2 * np.pi, 24, endpoint=False)
        return [(x0 + c + c * float(np.cos(a)), y0 + c + c * float(np.sin(a))) for a in angles]
    if kind == "triangle":  # apex at the top centre, base along the bottom
        return [(x0 + c, y0), (x0 + side, y0 + side), (x0, y0 + side)]
    if kind == "cross":
        t = max(side / 6.0, 1.0)
        a, b = c - t, c + t
        ring = [(a, 0), (b, 0), (b, a), (side, a), (side, b), (b, b), (b, side), (a, side), (a, b),
                (0, b), (0, a), (a, a)]
        return [(x0 + x, y0 + y) for x, y in ring]
    return [(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)]  # square


def write_cls_shapes(
    root: Union[str, Path],
    n_train: int = 24,
    n_val: int = 6,
    *,
    n_classes: int = 3,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write an ImageFolder-style classification dataset (``data=root`` for ``YOLO(...-cls)``).

    Args:
        root: Folder (created) that receives ``train/<class>/*.png`` and ``val/<class>/*.png``.
        n_train / n_val: Image counts per split (``>= n_classes``: classes take turns, so each
            class folder holds at least one image).
        n_classes: Classes (1 to 4), named after :data:`_shapes.SHAPES`.
        size: Image side in pixels.
        seed: Same seed, same files.

    Returns:
        ``root``. Validation image ``i`` is ``val/<class>/val_<i>.png``, its class ``i % n_classes``.
    """
    root = Path(root)
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1)):
        if n < n_classes:
            raise ValueError(f"n_{split} must be >= n_classes ({n_classes}), got {n!r}")
        for c in range(n_classes):
            (root / split / SHAPES[c]).mkdir(parents=True, exist_ok=True)
        # Draw more than needed and take the classes in turn: image i is of class i % n_classes.
        images, labels, _ = make_shapes(4 * n * n_classes, size, n_classes=n_classes, seed=seed + offset,
                                        layout="NHWC")
        pools = [list(np.flatnonzero(labels == c)) for c in range(n_classes)]
        for i in range(n):
            c = i % n_classes
            image = images[pools[c].pop(0)]
            path = root / split / SHAPES[c] / f"{split}_{i:03d}.png"
            Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(path)
    return root
