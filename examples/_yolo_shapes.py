"""A synthetic YOLO-format detection dataset of shapes (numpy + Pillow; nothing downloaded).

    data_yaml = write_yolo_shapes("/tmp/shapes")    # images/{train,val}, labels/{train,val}, data.yaml

Each image holds one filled shape (its class) at a known box, from
:func:`_shapes.make_shapes`; the last validation image is background only (an empty label
file), so "no true box" is covered. Validation images are wider than tall, so a model sees
them letterboxed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

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
) -> Path:
    """Write the dataset under ``root`` and return the path of its ``data.yaml``.

    Args:
        root: Folder (created) that receives ``images/``, ``labels/`` and ``data.yaml``.
        n_train / n_val: Image counts (``n_val >= 2``: the last one is background only).
        n_classes: Classes (1 to 4), named after :data:`_shapes.SHAPES`.
        train_size / val_size: ``(height, width)`` of the images.
        seed: Same seed, same files.

    Returns:
        Path of ``data.yaml`` (``path``, ``train``, ``val``, ``names``).
    """
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
                line = (f"{int(labels[i])} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                        f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}\n")
            Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(root / "images" / split / f"{stem}.png")
            (root / "labels" / split / f"{stem}.txt").write_text(line)
    names = "\n".join(f"  {c}: {SHAPES[c]}" for c in range(n_classes))
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return yaml
