"""EigenCAM: signed principal-component maps of a layer's activations (arXiv 2008.00299).

For one sample with activations ``A`` of shape ``(C, h, w)`` the textbook computation is::

    X = A.reshape(C, h * w).T            # (h*w, C): one row per pixel
    X = X - X.mean(axis=0)               # centre every channel over the pixels
    U, S, Vt = np.linalg.svd(X)
    map_i = (X @ Vt[i]).reshape(h, w)    # projection on the i-th principal direction
    evr_i = S[i] ** 2 / (S ** 2).sum()

:func:`eigencam` returns the same maps and ratios (up to the sign fixed below) for a whole
batch without a per-sample SVD:

* It works on the smaller Gram matrix of each sample, ``X.T @ X`` (C x C) when ``C <= h*w``
  and ``X @ X.T`` (hw x hw) otherwise, computed by one batched float32 ``np.matmul``.
  Centring is applied to the small Gram matrix (``G - s s^T / hw``, or double centring
  ``P G P``) rather than to the activations, which saves a pass over the data. A sample
  where float32 would lose digits (mean dominating the spread, ``trace(G) >
  16 trace(G_centred)``; NaN/Inf; magnitudes whose squares overflow or go subnormal) is
  recomputed in float64 from the original values, scaled and explicitly centred.
* The top-k eigenpairs of the trace-normalised centred Gram matrix (so eigenvalues are the
  explained-variance ratios) come from one block Krylov Rayleigh-Ritz step in float64:
  ``span[W, GW, ..., G^6 W]`` with a fixed seeded n x k block ``W`` (deterministic). Every
  Ritz pair is checked by its residual ``||G v - theta v|| <= 1e-6 theta_1``, about the
  rounding level of the float32 Gram product; samples that miss it (flat or clustered
  spectra) get a degree-14 basis and, failing that, a full batched ``np.linalg.eigh``. A
  full ``eigh`` costs 2-10x the Gram product itself on CNN-sized inputs (measured: 16 x
  49 x 49 2.0 ms vs 0.3 ms, 16 x 256 x 256 70 ms vs 10 ms), which is why it is only the
  fallback.
* A component whose ratio is at rounding level (16 float32 epsilons times the cancellation
  factor; rank below k, constant input, ``n_components > min(C, h*w)``) is returned as a
  zero map with ratio 0.

Sign rule. The sign of a principal direction is arbitrary: any SVD or eigensolver may return
``-v`` for ``v``. EigenCAM overlays apply a ReLU to the map, so with the wrong sign the
salient region vanishes and the heat goes to the background; across epochs the same image
then flickers between the two (pytorch-grad-cam issue #315). We fix the sign so that each
component's map has a non-negative correlation with the sample's channel-mean map
``A.mean(axis=0)``. After centring this is exactly the same as "the loading vector ``v_i``
sums to >= 0", because with ``Xc`` the centred matrix and ``1`` the all-ones C-vector::

    map_i . (Xc 1) = v_i^T Xc^T Xc 1 = s_i^2 (v_i . 1)        (s_i > 0)

and ``Xc 1 / C`` is the centred channel-mean map (the map's own mean is 0, so centring the
channel-mean map does not change the dot product). We implement the loading-sum form: the
scale-free quantity ``cos(v_i, 1) = (v_i . 1) / sqrt(C)`` is computed from ``v_i`` directly
(C x C Gram) or as ``u_i . (Xc 1) / (s_i sqrt(C))`` (hw x hw Gram). When
``|cos(v_i, 1)| < 1e-4`` the component has no preferred sign (e.g. channels that cancel
in pairs, so the channel-mean map is flat) and the tie is broken deterministically: the
pixel with the largest ``|map_i|`` (the first one in C order) is made positive.

Non-finite values (NaN, +-Inf) are replaced by 0 on a private copy, with one
:class:`NonFiniteActivationsWarning` per call naming how many values were replaced. The
input is never modified.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np

__all__ = ["EigenCAMResult", "NonFiniteActivationsWarning", "eigencam"]

# trace(G) / trace(G_centred) above this: the Gram-side centring cancels too many float32
# digits, so the sample is recomputed in float64 with explicit centring.
_CANCELLATION_LIMIT = 16.0
# Residual tolerance of a Ritz pair, relative to the top eigenvalue of the normalised
# centred Gram matrix. The float32 Gram product itself carries errors of about this size,
# so a tighter tolerance would not make the maps more accurate.
_RESIDUAL_TOL = 1e-6
# Block size above k, and the Krylov degrees tried before falling back to a full eigh. A thin
# block with more Krylov powers converges faster per basis vector than a wide block
# (measured on CNN-like spectra, k=3: worst residual 8e-8 with 3 x 7 vectors, 1e-7 with
# 4 x 6, 4e-6 with 4 x 5, 4e-5 with 6 x 4), and the small eigh on the basis is what costs.
_OVERSAMPLE = 0
_KRYLOV_DEGREES = (6, 14)
# A zero-variance component has ratio below this many float32 epsilons (times the
# cancellation factor trace(G) / trace(G_centred)); measured rounding noise is ~0.5 eps.
_ZERO_EPS = 16
# Keep the Gram matrices of one chunk of samples under about this many bytes (float64).
_CHUNK_BYTES = 256 * 2**20
# |cos(loading vector, all-ones)| below this counts as a tie (see module docstring).
_TIE_COSINE = 1e-4

_Number = Union[int, float]


class NonFiniteActivationsWarning(RuntimeWarning):
    """Activations contained NaN or +-Inf; they were replaced by 0 on a copy."""


@dataclass(frozen=True, eq=False)
class EigenCAMResult:
    """Principal-component maps of a batch of activations.

    Attributes:
        maps: float32 array (B, k, h, w): signed projections of each sample's centred
            activations on its top-k principal directions, before any ReLU. Sign fixed so
            each map correlates non-negatively with the sample's channel-mean map.
        explained_variance_ratio: float32 array (B, k): share of the sample's total variance
            explained by each component; non-increasing along k, sums to at most 1. Zero
            for zero-variance components (whose maps are all zero).
    """

    maps: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def n_components(self) -> int:
        """Number of components k (the second axis of ``maps``)."""
        return int(self.maps.shape[1])


def eigencam(
    activations: Any,
    n_components: _Number = 3,
    *,
    channels_last: bool = False,
) -> EigenCAMResult:
    """EigenCAM maps: the top principal components of each sample's activations.

    Args:
        activations: array-like (B, C, h, w), or (B, h, w, C) with ``channels_last=True``;
            a 3-D array is one sample (the result still has B=1). float16/32/64 or integer
            dtype. A torch tensor is handled by ``integrations.torch_math`` on its device
            (torch is imported only then).
        n_components: int in 1..C: number of components k. Components beyond
            ``min(C, h*w)`` (the rank bound) are zero maps with ratio 0. Or a float in
            (0, 1): the smallest k whose cumulative explained variance ratio reaches it,
            the maximum over the batch so the output is rectangular (every sample gets
            its top k; this mode runs a full batched eigh, as it needs every ratio).
        channels_last: activations are (B, h, w, C) (Keras / TensorFlow layout).

    Returns:
        EigenCAMResult with ``maps`` float32 (B, k, h, w) and ``explained_variance_ratio``
        float32 (B, k).

    Raises:
        TypeError: activations of a non-numeric dtype (bool, complex, object, ...), or
            n_components of the wrong type (bool included).
        ValueError: activations that are not 3-D/4-D or have an empty axis, or
            n_components out of range (the message names the value and C).
    """
    if _is_torch_tensor(activations):
        from mlflow_eigencam.integrations.torch_math import eigencam_torch

        return eigencam_torch(activations, n_components, channels_last=channels_last)

    result, n_bad = _eigencam_numpy(activations, n_components, channels_last)
    if n_bad:
        _warn_non_finite(n_bad, stacklevel=3)
    return result


def _eigencam_numpy(activations: Any, n_components: Any, channels_last: bool) -> Tuple[EigenCAMResult, int]:
    """eigencam() for array-likes; also returns the number of non-finite values replaced."""
    arr = _as_numeric_array(activations)
    x, (h, w) = _to_batch_channels_pixels(arr, channels_last)
    k, frac = _check_n_components(n_components, x.shape[1])
    maps, evr, n_bad = _batched_eigencam(x, k, frac)
    maps = maps.reshape(maps.shape[0], maps.shape[1], h, w)
    return EigenCAMResult(maps=maps, explained_variance_ratio=evr), n_bad


def _warn_non_finite(n_bad: int, stacklevel: int) -> None:
    warnings.warn(
        f"eigencam: {n_bad} non-finite activation value(s) (NaN/Inf) replaced by 0",
        NonFiniteActivationsWarning,
        stacklevel=stacklevel,
    )


# --------------------------------------------------------------------------- validation


def _is_torch_tensor(obj: Any) -> bool:
    # Checked by module name so that importing this module never imports torch.
    return type(obj).__module__.split(".")[0] == "torch"


def _as_numeric_array(activations: Any) -> np.ndarray:
    try:
        arr = np.asarray(activations)
    except Exception as exc:  # e.g. ragged nested lists
        raise TypeError(
            f"activations must be an array-like of numbers, got {type(activations).__name__}: {exc}"
        ) from exc
    if arr.dtype.kind not in "fiu":
        raise TypeError(
            f"activations must have a float or integer dtype, got dtype {arr.dtype} "
            f"(shape {arr.shape})"
        )
    return arr


def _check_activation_shape(shape: Tuple[int, ...], channels_last: bool) -> None:
    """ValueError naming the shape unless it is (B, C, h, w) / (B, h, w, C) or one sample."""
    layout = "(h, w, C)" if channels_last else "(C, h, w)"
    if len(shape) not in (3, 4):
        raise ValueError(
            f"activations must be 4-D (B, {layout[1:]} or 3-D {layout} (one sample), "
            f"got shape {shape}"
        )
    if 0 in shape:
        raise ValueError(f"activations must not have an empty axis, got shape {shape}")


def _to_batch_channels_pixels(arr: np.ndarray, channels_last: bool) -> Tuple[np.ndarray, Tuple[int, int]]:
    """(B, C, h, w) / (B, h, w, C) / 3-D -> a (B, C, h*w) view (no copy when possible)."""
    _check_activation_shape(arr.shape, channels_last)
    if arr.ndim == 3:
        arr = arr[None]
    if channels_last:
        b, h, w, c = arr.shape
        # (B, hw, C) seen as (B, C, hw): a transposed view; BLAS takes it without a copy.
        x = arr.reshape(b, h * w, c).transpose(0, 2, 1)
    else:
        b, c, h, w = arr.shape
        x = arr.reshape(b, c, h * w)
    return x, (h, w)


def _check_n_components(n_components: Any, n_channels: Optional[int]) -> Tuple[Optional[int], Optional[float]]:
    """Return (k, None) for an int request or (None, fraction) for a float request.

    ``n_channels=None`` checks only what can be checked before the activations are seen
    (the logger validates its settings at construction this way).
    """
    c = "C" if n_channels is None else n_channels
    if isinstance(n_components, (bool, np.bool_)):
        raise TypeError(f"n_components must be an int in 1..{c} or a float in (0, 1), got bool {n_components!r}")
    if isinstance(n_components, numbers.Integral):
        k = int(n_components)
        if k < 1 or (n_channels is not None and k > n_channels):
            raise ValueError(
                f"n_components={k} is out of range: expected 1 <= n_components <= C={c}"
            )
        return k, None
    if isinstance(n_components, numbers.Real):
        frac = float(n_components)
        if not 0.0 < frac < 1.0:
            raise ValueError(
                f"n_components={n_components!r} is out of range: a float must be in (0, 1) "
                f"(explained-variance target); use an int in 1..C={c} for a count"
            )
        return None, frac
    raise TypeError(
        f"n_components must be an int in 1..{c} or a float in (0, 1), "
        f"got {type(n_components).__name__} {n_components!r}"
    )


# --------------------------------------------------------------------------- computation


def _batched_eigencam(x: np.ndarray, k: Optional[int], frac: Optional[float]) -> Tuple[np.ndarray, np.ndarray, int]:
    """x: (B, C, hw) any numeric dtype (maybe a view of the caller's array; never written).

    Returns maps float32 (B, k, hw), ratios float32 (B, k) and the number of non-finite
    values that were replaced by 0.
    """
    b, c, hw = x.shape
    n = min(c, hw)
    per_sample = 8 * n * n * 3  # G (float32) + centred float64 copies + eigensolver work
    chunk = max(1, _CHUNK_BYTES // per_sample)
    if b <= chunk:
        return _eigencam_chunk(x, k, frac)
    # Bounded memory for big batches: chunks of many samples, never a loop per sample.
    parts = [_eigencam_chunk(x[i : i + chunk], k, frac) for i in range(0, b, chunk)]
    n_bad = sum(p[2] for p in parts)
    k_out = max(p[0].shape[1] for p in parts)
    maps = np.zeros((b, k_out, hw), np.float32)
    evr = np.zeros((b, k_out), np.float32)
    for j, i in enumerate(range(0, b, chunk)):
        m, r, _ = parts[j]
        if m.shape[1] < k_out:
            # float n_components: this chunk needed fewer; give it the batch's k.
            m, r, _ = _eigencam_chunk(x[i : i + chunk], k_out, None)
        maps[i : i + len(m)] = m
        evr[i : i + len(m)] = r
    return maps, evr, n_bad


def _eigencam_chunk(src: np.ndarray, k: Optional[int], frac: Optional[float]) -> Tuple[np.ndarray, np.ndarray, int]:
    b, c, hw = src.shape
    n = min(c, hw)
    channel_gram = c <= hw

    # float32 working copy (no copy at all for float32 input).
    with np.errstate(over="ignore"):  # float64 beyond float32 range: redone below
        x = np.asarray(src, dtype=np.float32)
        sums = _sums(x, channel_gram)
    n_bad = 0
    # NaN / Inf anywhere in a sample (or a float32 overflow) makes its sums non-finite, so
    # the common all-finite case costs no extra pass over the data.
    fix = ~np.isfinite(sums).all(axis=1)
    if fix.any():
        n_bad = int(np.count_nonzero(~np.isfinite(src[fix])))
        x = np.array(x, copy=True)  # never write to the caller's array
        x[fix] = 0.0  # these samples are redone in float64 below
        sums = _sums(x, channel_gram)

    with np.errstate(all="ignore"):
        gram = _gram(x, channel_gram)
        g, trace_c, trace_raw, aux = _centre_gram(gram, sums, hw, channel_gram)
        mean_square = trace_raw / (c * hw)
        # Redo in float64: digits lost to cancellation (mean >> spread, no variance at all),
        # non-finite values, or magnitudes where float32 squares overflow or go subnormal.
        redo = (
            ~(trace_c * _CANCELLATION_LIMIT > trace_raw)
            | fix
            | ~(mean_square > 1e-28)
            | ~(mean_square < 1e28)
        )
        zero_tol = _ZERO_EPS * np.finfo(np.float32).eps * np.where(redo, 1.0, trace_raw / np.where(redo, 1.0, trace_c))
    unit = None
    if redo.any():
        # Precise path for the few samples where float32 would lose digits: float64 from
        # the original values, scaled to max |x| = 1 (restored on the maps at the end) so
        # that nothing overflows, then centred explicitly.
        idx = np.flatnonzero(redo)
        x64 = np.array(src[idx], dtype=np.float64, copy=True)
        x64[~np.isfinite(x64)] = 0.0
        peak = np.abs(x64).max(axis=(1, 2))
        peak = np.where(peak > 0, peak, 1.0)
        x64 /= peak[:, None, None]
        x64 -= x64.mean(axis=2, keepdims=True)
        unit = np.ones(b)
        unit[idx] = peak
        sums64 = _sums(x64, channel_gram)
        g64, trace64, _, aux64 = _centre_gram(_gram(x64, channel_gram), sums64, hw, channel_gram, centred=True)
        g[idx], trace_c[idx], aux[idx] = g64, trace64, aux64
        zero_tol[idx] = 1e-12
    else:
        idx, x64 = None, None

    # Top eigenpairs of the trace-normalised centred Gram matrix: theta = explained ratio.
    if frac is not None:
        theta_all, vec_all = np.linalg.eigh(g)
        theta_all = np.clip(theta_all[..., ::-1], 0.0, None)
        k = _k_for_fraction(theta_all, frac)
        theta, vec = theta_all[:, :k], vec_all[..., ::-1][..., :k]
    else:
        theta, vec = _top_eigenpairs(g, min(k, n))
        theta = np.clip(theta, 0.0, None)
    assert k is not None

    # Zero-variance components (rank below k, constant input): rounding noise, not signal.
    alive = theta > zero_tol[:, None]
    theta = np.where(alive, theta, 0.0)

    if channel_gram:
        # vec = loadings v_i (B, C, k); map_i = Xc v_i = X v_i - (mu . v_i).
        vt = np.ascontiguousarray(vec.transpose(0, 2, 1))
        maps = np.matmul(vt.astype(np.float32), x)
        maps -= (vt @ aux[:, :, None]).astype(np.float32)  # aux = channel means mu (B, C)
        if idx is not None:
            maps[idx] = np.matmul(vt[idx], x64).astype(np.float32)
        cos = vec.sum(axis=1) / np.sqrt(c)
    else:
        # vec = left singular vectors u_i (B, hw, k); map_i = s_i u_i.
        scale = np.sqrt(theta * trace_c[:, None])
        maps = (vec.transpose(0, 2, 1) * scale[:, :, None]).astype(np.float32)
        cos = _loading_cosine(vec, aux, scale, c)
    if unit is not None:
        with np.errstate(over="ignore"):  # only beyond float32 range, where inf is the answer
            maps *= unit[:, None, None].astype(np.float32)
    maps, ratio = _finish(maps, theta, alive, cos, k)
    return maps, ratio, n_bad


def _loading_cosine(u: np.ndarray, r: np.ndarray, s: np.ndarray, n_channels: int) -> np.ndarray:
    """cos(v_i, 1) from the hw x hw side: (v_i . 1) / sqrt(C) = u_i . r / (s_i sqrt(C)).

    u (B, hw, k) left singular vectors, r (B, hw) the centred channel-sum map ``Xc 1``,
    s (B, k) singular values (0 for dead components, whose cosine is then 0).
    """
    dot = np.einsum("bpk,bp->bk", u, r)
    denom = s * np.sqrt(n_channels)
    return np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)


def _finish(
    maps: np.ndarray, theta: np.ndarray, alive: np.ndarray, cos: np.ndarray, k: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Zero dead components, fix signs, pad to k components, return float32 maps and ratios.

    maps (B, k', hw) float32 with k' = min(k, rank bound), written in place; theta (B, k')
    float64 explained ratios; alive (B, k') bool; cos (B, k') cos(loading vector, all-ones),
    whose sign is the sign of the correlation with the channel-mean map.
    """
    b, k_eff, hw = maps.shape
    maps *= alive[:, :, None]
    _fix_signs(maps, cos)
    ratio = theta / np.maximum(theta.sum(axis=1, keepdims=True), 1.0)
    if k > k_eff:  # more components than the rank bound min(C, hw): zero maps, ratio 0
        maps = np.concatenate([maps, np.zeros((b, k - k_eff, hw), np.float32)], axis=1)
        ratio = np.concatenate([ratio, np.zeros((b, k - k_eff))], axis=1)
    ratio32 = ratio.astype(np.float32)
    # Rounding ratios that sum to 1 in float64 to float32 may push the sum one ulp above.
    over = ratio32.sum(axis=1, keepdims=True, dtype=np.float64) > 1.0
    ratio32 = np.where(over, ratio32 * np.float32(1.0 - 2.0**-22), ratio32)
    return np.ascontiguousarray(maps), ratio32


def _sums(x: np.ndarray, channel_gram: bool) -> np.ndarray:
    """Per-channel sums over pixels (B, C) or per-pixel sums over channels (B, hw)."""
    # matmul with a ones vector runs in BLAS; ndarray.sum over a short axis is 4-5x slower.
    if channel_gram:
        return np.matmul(x, np.ones(x.shape[2], x.dtype))
    return np.matmul(np.ones(x.shape[1], x.dtype), x)


def _gram(x: np.ndarray, channel_gram: bool) -> np.ndarray:
    """Uncentred Gram matrices: X^T X (B, C, C) or X X^T (B, hw, hw), in x's dtype."""
    xt = x.transpose(0, 2, 1)
    return np.matmul(x, xt) if channel_gram else np.matmul(xt, x)


def _centre_gram(
    gram: np.ndarray, sums: np.ndarray, hw: int, channel_gram: bool, centred: bool = False
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre the Gram matrices and normalise them to unit trace (float64).

    Returns (g, trace, trace_raw, aux): g (B, n, n) centred Gram / its trace (zero when
    the trace is 0), trace (B,) the centred trace (total variance times hw), trace_raw (B,)
    the uncentred one, aux the channel means (B, C) or the centred channel-sum map (B, hw).
    """
    # Three passes over the (B, n, n) matrices: scale into float64, two rank-one updates.
    sums = sums.astype(np.float64)
    trace_raw = np.trace(gram, axis1=1, axis2=2, dtype=np.float64)
    if channel_gram:
        mu = sums / hw  # channel means
        # trace(X^T X - hw mu mu^T) = trace(G) - sum_i s_i mu_i
        trace = trace_raw if centred else trace_raw - np.einsum("bc,bc->b", sums, mu)
        aux = mu
    else:
        # X X^T with X centred per channel = P G P, P = I - 11^T / hw (double centring)
        # row means by BLAS (float32 sums of n terms: error at the Gram's own rounding level)
        row = np.matmul(gram, np.full(gram.shape[2], 1.0 / gram.shape[2], gram.dtype)).astype(np.float64)
        grand = row.mean(axis=1)
        trace = trace_raw if centred else trace_raw - gram.shape[1] * grand
        aux = sums - sums.mean(axis=1, keepdims=True)  # centred channel-sum map
    positive = trace > 0
    inv = np.where(positive, 1.0 / np.where(positive, trace, 1.0), 0.0)  # no variance: g = 0
    g = np.multiply(gram, inv[:, None, None], dtype=np.float64)
    if not centred:
        if channel_gram:
            g -= (sums * inv[:, None])[:, :, None] * mu[:, None, :]
        else:
            row_n = row * inv[:, None]
            g -= row_n[:, :, None]
            g -= (row_n - (grand * inv)[:, None])[:, None, :]
    return g, np.where(positive, trace, 0.0), trace_raw, aux


def _k_for_fraction(theta: np.ndarray, frac: float) -> int:
    """Smallest k whose cumulative ratio reaches frac, maximised over the batch."""
    cum = np.cumsum(theta, axis=1)
    reached = cum >= frac - 1e-9
    # argmax finds the first True; a sample that never reaches it (constant) asks for 1.
    per_sample = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, 1)
    return int(per_sample.max())


_OMEGA_CACHE: dict = {}


def _start_block(n: int, p: int) -> np.ndarray:
    key = (n, p)
    if key not in _OMEGA_CACHE:
        # Fixed seed: same input, same maps (the sign rule removes the remaining freedom).
        _OMEGA_CACHE[key] = np.random.default_rng(20080299).standard_normal((n, p))
    return _OMEGA_CACHE[key]


def _top_eigenpairs(g: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of symmetric PSD matrices g (B, n, n) with trace <= 1.

    Returns theta (B, k) non-increasing and vectors (B, n, k).
    """
    b, n, _ = g.shape
    p = k + _OVERSAMPLE
    theta = np.zeros((b, k))
    vec = np.zeros((b, n, k))
    todo = np.arange(b)
    for degree in _KRYLOV_DEGREES:
        if not todo.size or 2 * p * (degree + 1) > n:
            # A basis over half the space costs about as much as a full eigh.
            break
        t, v, ok = _block_krylov(g[todo] if todo.size < b else g, k, p, degree)
        theta[todo[ok]] = t[ok]
        vec[todo[ok]] = v[ok]
        todo = todo[~ok]
    if todo.size:
        # Flat or tiny spectra: exact batched eigh for the samples left.
        w, v = np.linalg.eigh(g[todo] if todo.size < b else g)
        theta[todo] = w[:, ::-1][:, :k]
        vec[todo] = v[..., ::-1][..., :k]
    return theta, vec


def _block_krylov(g: np.ndarray, k: int, p: int, blocks: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Rayleigh-Ritz step on span[W, GW, ..., G^blocks W] (W a fixed n x p block).

    Returns theta (B, k), vectors (B, n, k) and converged (B,) bool.
    """
    b, n, _ = g.shape
    m = p * (blocks + 1)
    # Basis vectors stored as rows: each product below is a batched gemv on contiguous
    # vectors, about 2x faster than a gemm with p columns (which repacks g every call).
    rows = np.empty((b, m, n))
    rows[:, :p] = _start_block(n, p).T
    for j in range(p, m):
        # No rescaling needed: trace(g) <= 1 so powers shrink, and the top eigenvalue is
        # at least 1/n so the leading directions never underflow.
        np.matmul(g, rows[:, j - p, :, None], out=rows[:, j, :, None])
    q, _ = np.linalg.qr(rows.transpose(0, 2, 1))
    gq = np.matmul(g, q)
    t = np.matmul(q.transpose(0, 2, 1), gq)
    t = 0.5 * (t + t.transpose(0, 2, 1))
    w, s = np.linalg.eigh(t)
    w = w[:, ::-1][:, :k]
    s = s[..., ::-1][..., :k]
    vec = np.matmul(q, s)
    resid = np.matmul(gq, s) - vec * w[:, None, :]
    rnorm = np.sqrt(np.einsum("bnk,bnk->bk", resid, resid))
    ok = (rnorm <= _RESIDUAL_TOL * np.maximum(w[:, :1], 0.0) + 1e-300).all(axis=1)
    return w, vec, ok


def _fix_signs(maps: np.ndarray, cos: np.ndarray) -> None:
    """In place: make each map correlate non-negatively with the channel-mean map."""
    sign = np.sign(cos)
    tie = np.abs(cos) <= _TIE_COSINE
    if tie.any():
        # Tie-break: the (first) pixel with the largest |value| is positive.
        peak = np.take_along_axis(maps, np.abs(maps).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
        sign = np.where(tie, np.sign(peak), sign)
    sign = np.where(sign == 0, 1.0, sign).astype(np.float32)
    maps *= sign[:, :, None]
