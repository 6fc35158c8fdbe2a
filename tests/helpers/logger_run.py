"""A small training-like run logged with EigenCAMLogger (numpy only, no framework).

The end-to-end UI test runs this in a subprocess when ``examples/pytorch_quickstart.py`` is
missing or fails. It mimics a model that learns: the evaluation images stay the same every
epoch (as a fixed validation set does) while the activations focus more on the object and the
predictions become right, so each epoch's overlay differs from the last one.

    python -m tests.helpers.logger_run --tracking-uri http://127.0.0.1:5000 --epochs 3
"""

from __future__ import annotations

import argparse
from typing import Tuple

import numpy as np

CLASSES = ("disc", "square", "bar")


def make_eval_set(n: int = 4, size: int = 64, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed validation images with one bright shape each.

    Returns:
        ``(images, labels, masks)``: images float32 (n, 3, size, size) in [0, 1]; labels int64
        (n,); masks float32 (n, size, size), 1 on the shape.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=np.float32)
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    for i in range(n):
        side = int(rng.integers(size // 4, size // 2))
        y0, x0 = (int(v) for v in rng.integers(0, size - side, size=2))
        cy, cx = y0 + side / 2, x0 + side / 2
        if labels[i] == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (side / 2) ** 2
        elif labels[i] == 1:
            mask = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
        else:
            mask = (yy >= y0) & (yy < y0 + side) & (np.abs(xx - cx) <= side / 6)
        masks[i] = mask
        background = rng.uniform(0.1, 0.3, size=(3, 1, 1)) + rng.normal(0, 0.05, size=(3, size, size))
        colour = rng.uniform(0.7, 1.0, size=(3, 1, 1))
        images[i] = np.clip(np.where(mask, colour, background), 0, 1)
    return images, labels, masks


def activations_at(epoch: int, masks: np.ndarray, channels: int = 16, grid: int = 8,
                   seed: int = 0) -> np.ndarray:
    """Feature maps that find the object better each epoch.

    Returns:
        float32 (n, channels, grid, grid): the pooled mask times a per-channel gain, plus noise
        that shrinks with the epoch.
    """
    rng = np.random.default_rng(seed + 1000 * (epoch + 1))
    n, size, _ = masks.shape
    pooled = masks.reshape(n, grid, size // grid, grid, size // grid).mean(axis=(2, 4))
    gains = rng.uniform(0.5, 1.5, size=(n, channels, 1, 1))
    noise = rng.uniform(0, 1.0 / (1 + 2 * epoch), size=(n, channels, grid, grid))
    return (pooled[:, None] * gains + noise).astype(np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--experiment", default="eigencam-e2e")
    args = parser.parse_args(argv)

    import mlflow

    from mlflow_eigencam import EigenCAMLogger

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    images, labels, masks = make_eval_set()
    rng = np.random.default_rng(1)
    with mlflow.start_run(run_name="eigencam-demo"):
        logger = EigenCAMLogger(n_components=3, n_samples=len(images), label_mapping=list(CLASSES),
                                target_layer="features.3")
        for epoch in range(args.epochs):
            # Logits that move towards the true class: early epochs get some wrong.
            logits = rng.normal(0, 1, size=(len(labels), len(CLASSES)))
            logits[np.arange(len(labels)), labels] += 1.5 * epoch
            mlflow.log_metric("val_loss", 1.0 / (1 + epoch), step=epoch)
            logger.on_batch_end(images, activations_at(epoch, masks), labels, logits,
                                mode="eval", ds_id="val")
            logger.on_epoch_end(epoch)
        if not logger.flush(timeout=60):
            raise SystemExit("EigenCAM items were not confirmed by MLflow within 60 s")
        logger.close()


if __name__ == "__main__":
    main()
