"""The one reference for the math: a textbook per-sample float64 SVD (with and without the
package's sign rule), the synthetic activations the math is tested on, and the tolerance
that a float32 implementation can be held to on a given problem."""

from __future__ import annotations

from typing import Tuple

import numpy as np


def textbook(a: np.ndarray, k: int):
    """Reference: per sample, flatten to X (hw, C), centre columns, full float64 SVD."""
    _, c, h, w = a.shape
    maps, ratios, loadings = [], [], []
    for sample in a.astype(np.float64):
        x = sample.reshape(c, h * w).T
        x = x - x.mean(axis=0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        maps.append((x @ vt[:k].T).T.reshape(k, h, w))
        ratios.append(s[:k] ** 2 / (s**2).sum())
        loadings.append(vt[:k])
    return np.array(maps), np.array(ratios), np.array(loadings)


def low_rank(rng, b, c, h, w, strengths=(3.0, 2.0, 1.4, 1.0, 0.7)):
    """ReLU of smooth low-rank spatial structure plus noise: a CNN-like, decaying spectrum."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = len(strengths)
    spatial = np.empty((b, r, h * w))
    for i in range(b):
        for j in range(r):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            sigma = rng.uniform(0.15, 0.35) * max(h, w)
            spatial[i, j] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)).ravel()
    loadings = rng.standard_normal((b, c, r)) * np.asarray(strengths)
    z = 2.0 * loadings @ spatial + rng.standard_normal((b, c, h * w))
    return np.maximum(z, 0.0).astype(np.float32).reshape(b, c, h, w)


def rel_errors(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per (sample, component) relative error after matching the arbitrary reference sign."""
    dot = np.einsum("bkhw,bkhw->bk", ours.astype(np.float64), ref)
    sign = np.where(dot < 0, -1.0, 1.0)[..., None, None]
    return np.linalg.norm(ours - sign * ref, axis=(2, 3)) / np.linalg.norm(ref, axis=(2, 3))


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def blob_sample(rng, c, h, w):
    """Small positive background; a bright blob in a random half of the channels."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.integers(1, h - 1), rng.integers(1, w - 1)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    a = np.abs(rng.normal(0.0, 0.1, (c, h, w)))
    channels = rng.choice(c, size=c // 2, replace=False)
    a[channels] += rng.uniform(1.0, 3.0, (len(channels), 1, 1)) * blob
    return a.astype(np.float32), (cy, cx)


def plain_svd(act: np.ndarray, k: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Textbook EigenCAM per sample (``np.linalg.svd`` of the centred pixel x channel matrix)
    with the package's documented sign rule: loadings sum >= 0, and on a tie (|cos(v, 1)| <
    1e-4: LayerNorm'd tokens sum to 0 over channels) the largest |map| pixel is positive.

    Args:
        act: ``(B, C, h, w)`` activations, any float dtype.
        k: Components.

    Returns:
        ``(maps (B, k, h, w) float64, ratios (B, k) float64)``.
    """
    maps, ratios = [], []
    for a in np.asarray(act, dtype=np.float64):
        c, h, w = a.shape
        x = a.reshape(c, h * w).T
        x = x - x.mean(axis=0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        m = (x @ vt[:k].T).T.reshape(k, h * w)
        for i in range(k):
            cos = vt[i].sum() / np.sqrt(c)
            m[i] *= np.sign(cos) if abs(cos) >= 1e-4 else np.sign(m[i][np.argmax(np.abs(m[i]))])
        maps.append(m.reshape(k, h, w))
        ratios.append(s[:k] ** 2 / (s ** 2).sum())
    return np.stack(maps), np.stack(ratios)


def blob_batch(n=4, h=32, w=32, c=8, hh=8, ww=8, seed=0, nchw=True):
    """Images with a bright square and activations that light up at the same place."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.2, size=(n, h, w, 3)).astype(np.float32)
    acts = rng.uniform(0, 0.05, size=(n, c, hh, ww)).astype(np.float32)
    for i in range(n):
        y, x = rng.integers(0, hh - 2), rng.integers(0, ww - 2)
        acts[i, :, y:y + 2, x:x + 2] += rng.uniform(1, 2, size=(c, 1, 1))
        images[i, y * h // hh:(y + 2) * h // hh, x * w // ww:(x + 2) * w // ww] = 1.0
    if nchw:
        images = images.transpose(0, 3, 1, 2)
    labels = rng.integers(0, 3, size=n)
    logits = rng.normal(size=(n, 3)).astype(np.float32)
    return images, acts, labels, logits


def parity_tolerance(a: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """How far two float32 implementations of EigenCAM may differ on ``a``, from the problem.

    Each implementation rounds the Gram matrix (trace-normalised, so its eigenvalues are the
    explained-variance ratios ``lam``) in float32: an error of about ``eps32 * sqrt(m) * lam_1``
    with ``m`` the inner dimension of the product (``max(C, h*w)``). By Weyl a ratio moves by
    at most that much; by Davis-Kahan component ``j``'s direction (and so its map, relative to
    the map's scale) moves by at most that over its eigengap ``min |lam_j - lam_{j+-1}|``. Two
    implementations differ by at most twice each bound. (On the suite's problems the measured
    differences stay below a quarter of one bound; a nearly degenerate pair gets a loose
    tolerance, as it should: its directions are not determined by the data.)

    Args:
        a: ``(B, C, h, w)`` activations.
        k: Components compared.

    Returns:
        ``(maps_tol (B, k), ratios_tol (B,))`` float64.
    """
    b, c, h, w = a.shape
    x = np.asarray(a, dtype=np.float64).reshape(b, c, h * w).transpose(0, 2, 1)
    x = x - x.mean(axis=1, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    total = (s ** 2).sum(axis=1, keepdims=True)
    lam = s ** 2 / np.where(total > 0, total, 1.0)
    lam = np.concatenate([lam, np.zeros((b, k + 1))], axis=1)  # components past the rank
    rounding = np.finfo(np.float32).eps * np.sqrt(max(c, h * w)) * lam[:, :1]  # (B, 1)
    maps_tol = np.empty((b, k))
    for j in range(k):
        gaps = [np.abs(lam[:, j] - lam[:, j + 1])]
        if j > 0:
            gaps.append(np.abs(lam[:, j] - lam[:, j - 1]))
        gap = np.maximum(np.min(gaps, axis=0), np.finfo(np.float64).tiny)
        maps_tol[:, j] = 2 * rounding[:, 0] / gap
    return maps_tol, 2 * rounding[:, 0]
