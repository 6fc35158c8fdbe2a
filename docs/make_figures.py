"""Make the documentation's figures from the code itself (CPU, seeded, nothing downloaded).

Writes into ``docs/images/`` (or ``--out``; ``tox -e docs`` points it at a copy of the docs
under ``.tox/``, so a test run leaves the tracked figures as they are):

* ``sign_rule.png``: the first EigenCAM component of a few pinned held-out images after
  every training epoch, once with the sign the SVD happens to return (the textbook
  per-sample algorithm, as pytorch-grad-cam runs it) and once from
  ``mlflow_eigencam.eigencam`` (sign rule). Each cell is ``mlflow_eigencam.render.overlay``
  of the map on the image, the object's box drawn in white and the noise patch's in grey,
  and a caption saying whether the pointing game hits the object.
* ``overlay_example.png``: one card from ``mlflow_eigencam.render.render_card`` (image,
  three components, explained variance, true and predicted class) of the trained model.

The model, data and epochs are seed 0 of ``benchmarks/bench_quality.py`` (the same code is
imported from there), so the picture shows the run whose figures ``docs/sign-rule.md`` quotes.
35 to 70 s measured on a shared 2-core CPU. Same machine and torch build, same PNG bytes.

Usage: python docs/make_figures.py [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in bench_quality (tiny per-sample SVDs)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality as bq  # noqa: E402

from mlflow_eigencam.eigencam import eigencam  # noqa: E402
from mlflow_eigencam.render import (  # noqa: E402
    encode_png,
    overlay,
    render_card,
    to_rgb_uint8,
)
from mlflow_eigencam.render.text import get_font  # noqa: E402
from mlflow_eigencam.samples import sample_id  # noqa: E402

SEED = 0
#: Rows of sign_rule.png: the first pinned held-out samples, not hand-picked.
ROWS = 4
SCALE = 2  # 48 x 64 images drawn at 96 x 128
#: The sample of overlay_example.png (index into the held-out set).
EXAMPLE_INDEX = 0

_WHITE = (255, 255, 255)
_TEXT = (20, 20, 20)
_MUTED = (110, 110, 110)
_HIT = (0, 130, 0)
_MISS = (200, 0, 0)
_RULE = (200, 200, 200)
_GAP = 6


def _upscale(rgb: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def _box(draw: ImageDraw.ImageDraw, origin: tuple[int, int], box: Sequence[int], colour: tuple[int, int, int]) -> None:
    """Outline an (x0, y0, x1, y1) image-pixel box (x1, y1 exclusive) on a SCALE-d panel."""
    x0, y0, x1, y1 = (int(v) * SCALE for v in box)
    ox, oy = origin
    draw.rectangle([(ox + x0, oy + y0), (ox + x1 - 1, oy + y1 - 1)], outline=colour, width=1)


def sign_rule_figure(
    images: np.ndarray,
    boxes: np.ndarray,
    noise_boxes: np.ndarray,
    raw: list[np.ndarray],
    fixed: list[np.ndarray],
) -> np.ndarray:
    """Two blocks of rows = samples, columns = input + epochs.

    Args:
        images: float32 (R, 3, H, W) in [0, 1].
        boxes: int (R, 4) object boxes; noise_boxes: int (R, 4) distractor boxes.
        raw: per epoch, float32 (R, h, w) first-component maps with the SVD's own sign.
        fixed: per epoch, float32 (R, h, w) maps from ``eigencam`` (sign rule).

    Returns:
        uint8 (H', W', 3) RGB.
    """
    n_rows, n_epochs = len(images), len(raw)
    rgb = [_upscale(to_rgb_uint8(im, "CHW"), SCALE) for im in images]
    ph, pw = rgb[0].shape[:2]
    title_font, head_font, font = get_font(18), get_font(15), get_font(12)
    line = 16
    cell_h = ph + line + _GAP  # panel + caption
    col_w = pw + _GAP
    block_h = line + 2 * _GAP + line + n_rows * cell_h
    width = _GAP + (n_epochs + 1) * col_w
    title_h = 2 * line + 2 * _GAP
    height = title_h + 2 * block_h + 2 * _GAP
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (_GAP, _GAP),
        "EigenCAM first component over training epochs: the same maps, two signs",
        fill=_TEXT,
        font=title_font,
    )
    draw.text(
        (_GAP, _GAP + line + 6),
        "white box: the object (the class); grey box: a noise patch of the same size. "
        "Caption: where the hottest pixel is.",
        fill=_MUTED,
        font=font,
    )
    blocks = (
        ("raw SVD sign: np.linalg.svd per sample, the sign LAPACK returns (as pytorch-grad-cam)", raw),
        ("sign rule: mlflow_eigencam.eigencam (map correlates >= 0 with the channel-mean map)", fixed),
    )
    y = title_h
    for b, (heading, maps) in enumerate(blocks):
        if b:
            draw.line([(0, y - _GAP // 2), (width - 1, y - _GAP // 2)], fill=_RULE, width=2)
        draw.text((_GAP, y + _GAP // 2), heading, fill=_TEXT, font=head_font)
        y += line + 2 * _GAP
        for c in range(n_epochs + 1):
            draw.text((_GAP + c * col_w, y), "input" if c == 0 else f"epoch {c}", fill=_MUTED, font=font)
        y += line
        for r in range(n_rows):
            for c in range(n_epochs + 1):
                x = _GAP + c * col_w
                if c == 0:
                    panel = rgb[r]
                else:
                    panel = overlay(rgb[r], maps[c - 1][r], colormap="jet", alpha=0.5, layout="HWC")
                canvas.paste(Image.fromarray(panel), (x, y))
                _box(draw, (x, y), noise_boxes[r], (150, 150, 150))
                _box(draw, (x, y), boxes[r], _WHITE)
                if c:
                    m = maps[c - 1][r : r + 1]
                    hit, on_noise = bq.pointing(m, boxes[r : r + 1], noise_boxes[r : r + 1])
                    if not (m > 0).any():
                        text, colour = "no heat", _MISS
                    elif hit[0]:
                        text, colour = "on object", _HIT
                    else:
                        text, colour = ("on noise" if on_noise[0] else "elsewhere"), _MISS
                    draw.text((x, y + ph + 1), text, fill=colour, font=font)
            y += cell_h
        y += _GAP
    return np.asarray(canvas, dtype=np.uint8).copy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="output folder")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    exp = bq.run_experiment(seed=SEED)
    pinned = slice(0, ROWS)
    raw = [bq.raw_svd_maps(rec.activations[pinned]) for rec in exp.epochs]
    fixed = [eigencam(rec.activations[pinned], 1).maps[:, 0] for rec in exp.epochs]
    figure = sign_rule_figure(exp.test_images[pinned], exp.test_boxes[pinned], exp.test_noise_boxes[pinned], raw, fixed)

    last = exp.epochs[-1]
    i = EXAMPLE_INDEX
    result = eigencam(last.activations[i : i + 1], 3)
    image = to_rgb_uint8(exp.test_images[i], "CHW")
    card = render_card(
        image,
        result.maps[0],
        explained_variance=result.explained_variance_ratio[0],
        label=bq.CLASSES[int(exp.test_labels[i])],
        pred=bq.CLASSES[int(last.logits[i].argmax())],
        sample_id=sample_id(image),
    )

    args.out.mkdir(parents=True, exist_ok=True)
    for name, pixels in (("sign_rule.png", figure), ("overlay_example.png", card)):
        data = encode_png(pixels)
        (args.out / name).write_bytes(data)
        print(
            f"wrote {args.out / name} ({pixels.shape[1]} x {pixels.shape[0]}, "
            f"sha1 {hashlib.sha1(data).hexdigest()[:12]})"
        )
    print(f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
