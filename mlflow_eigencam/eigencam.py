"""EigenCAM: signed principal-component maps of a layer's activations (arXiv 2008.00299).

For one sample with activations ``A`` of shape ``(C, h, w)`` the textbook computation is::

    X = A.reshape(C, h * w).T            # (h*w, C): one row per pixel
    X = X - X.mean(axis=0)               # centre every channel over the pixels
    U, S, Vt = np.linalg.svd(X)
    map_i = (X @ Vt[i]).reshape(h, w)    # projection on the i-th principal direction
    evr_i = S[i] ** 2 / (S ** 2).sum()

:func:`eigencam` returns the same maps and ratios (up to the sign fixed below) for a whole
batch without a per-sample SVD. One implementation serves every array library: it is
written against the Python array API standard (through ``array-api-compat``), so numpy
arrays, torch tensors (CPU or GPU), CuPy and JAX arrays all run the same code, on the
array's own device. Only the maps and ratios (and a few (B,)-sized masks that steer the
solver) are copied to the host; the result is numpy.

* It works on the smaller Gram matrix of each sample, ``X.T @ X`` (C x C) when ``C <= h*w``
  and ``X @ X.T`` (hw x hw) otherwise, computed by one batched float32 ``matmul`` (float64
  on accelerators, where a global TF32 setting could otherwise take the product's digits).
  Centring is applied to the small Gram matrix (``G - s s^T / hw``, or double centring
  ``P G P``) rather than to the activations, which saves a pass over the data. A sample
  where float32 would lose digits (mean dominating the spread, ``trace(G) >
  16 trace(G_centred)``; NaN/Inf; magnitudes whose squares overflow or go subnormal) is
  recomputed in float64 from the original values, scaled and explicitly centred.
* The top-k eigenpairs of the trace-normalised centred Gram matrix (so eigenvalues are the
  explained-variance ratios) come from one block Krylov Rayleigh-Ritz step in float64:
  ``span[W, GW, ..., G^6 W]`` with a fixed seeded n x k block ``W`` (deterministic). Every
  Ritz pair is checked by its residual ``||G v - theta v|| <= 1e-6 theta_1``, about the
  rounding level of the float32 Gram product. Samples that miss it have a flat or clustered
  spectrum (noise: early epochs, textures), where no small Krylov basis converges; a
  degree-14 basis is tried only when the first residuals predict it will pass, and the
  rest go to an exact eigensolver: LAPACK's subset solver ``?syevr`` for the top k only
  (``scipy.linalg.eigh(subset_by_index=...)``: the tridiagonal reduction, then k
  eigenvectors instead of n) for host arrays, a batched ``eigh`` on accelerators.
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
input is never modified (and never written through a view); a torch tensor's autograd
graph is not extended (it is detached first).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import numpy as np

__all__ = ["EigenCAMResult", "NonFiniteActivationsWarning", "eigencam"]

# A float32 sample is redone in float64 when trace(G) / trace(G_centred) exceeds this: the
# Gram-side centring then cancels too many float32 digits (scaled by the working dtype's
# epsilon, so float64 work on an accelerator redoes only what float64 could not hold).
_CANCELLATION_LIMIT = 16.0
# Residual tolerance of a Ritz pair, relative to the top eigenvalue of the normalised
# centred Gram matrix. The float32 Gram product itself carries errors of about this size,
# so a tighter tolerance would not make the maps more accurate.
_RESIDUAL_TOL = 1e-6
# Block size above k, and the Krylov degrees tried before the exact solver. A thin block
# with more Krylov powers converges faster per basis vector than a wide block (measured on
# CNN-like spectra, k=3: worst residual 8e-8 with 3 x 7 vectors, 1e-7 with 4 x 6, 4e-6 with
# 4 x 5, 4e-5 with 6 x 4), and the small eigh on the basis is what costs.
_OVERSAMPLE = 0
_KRYLOV_DEGREES = (6, 14)
# The second degree is tried only for samples whose first residual predicts a pass within
# this factor of the tolerance (the residual falls about geometrically with the degree);
# flat spectra (noise) miss by orders of magnitude and go straight to the exact solver.
_PREDICT_SLACK = 30.0
# Samples whose effective rank exceeds n / _FLAT_RANK skip the Krylov step (see
# _top_eigenpairs): ||g||_F^2 * n < _FLAT_RANK.
_FLAT_RANK = 3.0
# Per-sample LAPACK subset solver (scipy) from this size up; below it one batched eigh
# costs less than a Python loop of LAPACK calls. Measured with ssyevx called directly, 16
# flat-spectrum samples, whole eigencam call, idle machine: n = 9 0.66x, 16 0.87x, 25 1.22x,
# 36 1.52x, 49 1.58x the speed of the batched eigh.
_SUBSET_MIN_N = 25
# A zero-variance component has ratio below this many float32 epsilons (times the
# cancellation factor trace(G) / trace(G_centred)); measured rounding noise is ~0.5 eps.
_ZERO_EPS = 16
# Keep the Gram matrices of one chunk of samples under about this many bytes (float64).
_CHUNK_BYTES = 256 * 2**20
# |cos(loading vector, all-ones)| below this counts as a tie (see module docstring).
_TIE_COSINE = 1e-4
_EPS32 = float(np.finfo(np.float32).eps)
_EPS64 = float(np.finfo(np.float64).eps)
# A sample on the float64 path has no variance when its centred sum of squares is below
# (this many times hw float64 epsilons)^2 of its uncentred one (see _eigencam_chunk).
_NO_VARIANCE_EPS = 4.0

_Number = Union[int, float]


class NonFiniteActivationsWarning(RuntimeWarning):
    """Activations contained NaN or +-Inf; they were replaced by 0 on a copy."""


@dataclass(frozen=True, eq=False)
class EigenCAMResult:
    """Principal-component maps of a batch of activations.

    Attributes:
        maps: numpy float32 array (B, k, h, w): signed projections of each sample's centred
            activations on its top-k principal directions, before any ReLU. Sign fixed so
            each map correlates non-negatively with the sample's channel-mean map.
        explained_variance_ratio: numpy float32 array (B, k): share of the sample's total
            variance explained by each component; non-increasing along k, sums to at most
            1. Zero for zero-variance components (whose maps are all zero).
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
        activations: (B, C, h, w), or (B, h, w, C) with ``channels_last=True``; a 3-D
            array is one sample (the result still has B=1). A numpy array or array-like,
            or any array the array API reaches (torch tensor on any device, CuPy, JAX):
            computed on its own device, never modified, not tracked by autograd.
            float16/bfloat16/32/64 or integer dtype.
        n_components: int in 1..C: number of components k. Components beyond
            ``min(C, h*w)`` (the rank bound) are zero maps with ratio 0. Or a float in
            (0, 1): the smallest k whose cumulative explained variance ratio reaches it,
            the maximum over the batch so the output is rectangular (every sample gets
            its top k; this mode runs a full batched eigh, as it needs every ratio).
        channels_last: activations are (B, h, w, C) (Keras / TensorFlow layout).

    Returns:
        EigenCAMResult with numpy ``maps`` float32 (B, k, h, w) and
        ``explained_variance_ratio`` float32 (B, k), whatever the input's library.

    Raises:
        TypeError: activations of a non-numeric dtype (bool, complex, object, ...), or
            n_components of the wrong type (bool included).
        ValueError: activations that are not 3-D/4-D or have an empty axis, or
            n_components out of range (the message names the value and C).
    """
    xp, arr = _namespace(activations)
    _check_dtype(xp, arr)
    x, (h, w) = _to_batch_channels_pixels(xp, arr, channels_last)
    k, frac = _check_n_components(n_components, x.shape[1])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # numpy: overflow beyond float32 is handled (redone, or inf maps). JAX without x64
        # warns at every float64 request and computes in float32: the checks still hold.
        warnings.filterwarnings("ignore", message="Explicitly requested dtype")
        maps, ratio, n_bad = _batched_eigencam(xp, x, k, frac)
    maps_np = np.ascontiguousarray(_to_numpy(maps), dtype=np.float32)
    result = EigenCAMResult(
        maps=maps_np.reshape(maps_np.shape[0], maps_np.shape[1], h, w),
        explained_variance_ratio=np.ascontiguousarray(_to_numpy(ratio), dtype=np.float32),
    )
    if n_bad:
        warnings.warn(
            f"eigencam: {n_bad} non-finite activation value(s) (NaN/Inf) replaced by 0",
            NonFiniteActivationsWarning,
            stacklevel=2,
        )
    return result


# --------------------------------------------------------------------------- arrays


def _numpy_namespace() -> Any:
    try:
        import array_api_compat.numpy as xnp

        return xnp
    except ImportError:  # numpy >= 2 is an array API namespace itself
        if not hasattr(np, "isdtype"):
            raise ImportError("mlflow_eigencam needs array-api-compat with numpy < 2: "
                              "pip install array-api-compat") from None
        return np


def _namespace(obj: Any) -> Tuple[Any, Any]:
    """(xp, array): the array API namespace of ``obj`` and ``obj`` as one of its arrays.

    numpy arrays and array-likes (lists, ...) get numpy's namespace; any other array the
    array API knows (torch, CuPy, JAX, ...) keeps its own, so it is computed on its device.
    Which library an object belongs to is decided without importing that library.
    """
    if not isinstance(obj, np.ndarray):
        compat: Any = None
        try:
            import array_api_compat

            compat = array_api_compat
        except ImportError:
            pass
        if compat is not None and compat.is_array_api_obj(obj) and not compat.is_numpy_array(obj):
            if compat.is_torch_array(obj):
                obj = obj.detach()  # a view: the caller's graph is neither extended nor kept
            return compat.array_namespace(obj), obj
    try:
        arr = np.asarray(obj)
    except Exception as exc:  # e.g. ragged nested lists
        raise TypeError(
            f"activations must be an array-like of numbers, got {type(obj).__name__}: {exc}"
        ) from exc
    return _numpy_namespace(), arr


def _check_dtype(xp: Any, arr: Any) -> None:
    try:
        ok = bool(xp.isdtype(arr.dtype, ("real floating", "integral")))
    except Exception:  # strings, objects: not an array API dtype at all
        ok = False
    if not ok:
        raise TypeError(
            f"activations must have a float or integer dtype, got dtype {arr.dtype} "
            f"(shape {tuple(arr.shape)})"
        )


def _device(x: Any) -> Any:
    try:
        import array_api_compat

        return array_api_compat.device(x)
    except ImportError:
        return "cpu"


def _on_host(x: Any) -> bool:
    """True for arrays in host memory (numpy, CPU tensors): float32 work and LAPACK there."""
    return isinstance(x, np.ndarray) or "cpu" in str(_device(x)).lower()


def _to_numpy(a: Any) -> np.ndarray:
    """A device array -> numpy (the only device-to-host copies are results and masks)."""
    if isinstance(a, np.ndarray):
        return a
    try:
        import array_api_compat as compat

        if compat.is_torch_array(a):
            return a.detach().cpu().numpy()
        if not compat.is_jax_array(a):
            a = compat.to_device(a, "cpu")
    except (ImportError, ValueError, TypeError, AttributeError):
        pass
    return np.asarray(a)


def _host_view(x: Any) -> Optional[np.ndarray]:
    """A zero-copy numpy view of a host array (DLPack), or None where there is none."""
    if isinstance(x, np.ndarray):
        return x
    if not _on_host(x):
        return None
    try:
        return np.from_dlpack(x)
    except Exception:
        return None


def _put(xp: Any, base: Any, idx: np.ndarray, values: Any) -> Any:
    """``base`` with rows ``idx`` (host ints, increasing) replaced by ``values``.

    Written with ``take`` and ``where`` (no item assignment), so immutable arrays (JAX)
    work too; only the solver's fallbacks use it, on (B, ...) arrays.
    """
    b = base.shape[0]
    if idx.size == 0:
        return base
    if idx.size == b:
        return values
    pos = np.zeros(b, np.int64)
    pos[idx] = np.arange(idx.size)
    mask = np.zeros(b, bool)
    mask[idx] = True
    dev = _device(base)
    gathered = xp.take(values, xp.asarray(pos, device=dev), axis=0)
    m = xp.reshape(xp.asarray(mask, device=dev), (b,) + (1,) * (base.ndim - 1))
    return xp.where(m, gathered, base)


def _take(xp: Any, a: Any, idx: np.ndarray) -> Any:
    if idx.size == a.shape[0]:
        return a
    return xp.take(a, xp.asarray(idx, device=_device(a)), axis=0)


def _writeable(a: Any) -> bool:
    try:
        import array_api_compat

        return bool(array_api_compat.is_writeable_array(a))
    except ImportError:
        return isinstance(a, np.ndarray) and a.flags.writeable


def _isub(a: Any, b: Any) -> Any:
    """``a - b``, in place when ``a`` is our own writeable array (saves a pass)."""
    if _writeable(a):
        a -= b
        return a
    return a - b


def _imul(a: Any, b: Any) -> Any:
    if _writeable(a):
        a *= b
        return a
    return a * b


# --------------------------------------------------------------------------- validation


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


def _to_batch_channels_pixels(xp: Any, arr: Any, channels_last: bool) -> Tuple[Any, Tuple[int, int]]:
    """(B, C, h, w) / (B, h, w, C) / 3-D -> a (B, C, h*w) array (a view when possible)."""
    shape = tuple(int(d) for d in arr.shape)
    _check_activation_shape(shape, channels_last)
    if len(shape) == 3:
        arr = xp.expand_dims(arr, axis=0)
        shape = (1,) + shape
    if channels_last:
        b, h, w, c = shape
        # (B, hw, C) seen as (B, C, hw): a transposed view; BLAS takes it without a copy.
        x = xp.permute_dims(xp.reshape(arr, (b, h * w, c)), (0, 2, 1))
    else:
        b, c, h, w = shape
        x = xp.reshape(arr, (b, c, h * w))
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


def _batched_eigencam(xp: Any, x: Any, k: Optional[int], frac: Optional[float]) -> Tuple[Any, Any, int]:
    """x: (B, C, hw) any numeric dtype (maybe a view of the caller's array; never written).

    Returns maps float32 (B, k, hw), ratios float32 (B, k) (both on x's device) and the
    number of non-finite values that were replaced by 0.
    """
    b, c, hw = x.shape
    n = min(c, hw)
    per_sample = 8 * n * n * 3  # G + centred float64 copies + eigensolver work
    chunk = max(1, _CHUNK_BYTES // per_sample)
    if b <= chunk:
        return _eigencam_chunk(xp, x, k, frac)
    # Bounded memory for big batches: chunks of many samples, never a loop per sample.
    starts = range(0, b, chunk)
    parts = [_eigencam_chunk(xp, x[i : i + chunk], k, frac) for i in starts]
    n_bad = sum(p[2] for p in parts)
    k_out = max(p[0].shape[1] for p in parts)
    maps, ratios = [], []
    for (m, r, _), i in zip(parts, starts):
        if m.shape[1] < k_out:
            # float n_components: this chunk needed fewer; give it the batch's k.
            m, r, _ = _eigencam_chunk(xp, x[i : i + chunk], k_out, None)
        maps.append(m)
        ratios.append(r)
    return xp.concat(maps, axis=0), xp.concat(ratios, axis=0), n_bad


def _eigencam_chunk(xp: Any, src: Any, k: Optional[int], frac: Optional[float]) -> Tuple[Any, Any, int]:
    b, c, hw = src.shape
    n = min(c, hw)
    channel_gram = c <= hw
    dev = _device(src)
    # float32 on the host (BLAS sgemm, no copy for float32 input); float64 on accelerators,
    # which have the bandwidth, and where a global TF32 setting would take float32's digits.
    work = xp.float32 if _on_host(src) else xp.float64
    eps = _EPS32 if work == xp.float32 else float(np.finfo(np.float64).eps)
    x = xp.astype(src, work, copy=False)
    sums = _sums(xp, x, channel_gram)
    n_bad = 0
    # NaN / Inf anywhere in a sample (or a float32 overflow) makes its sums non-finite, so
    # the common all-finite case costs no extra pass over the data.
    fix = ~_to_numpy(xp.all(xp.isfinite(sums), axis=1))
    if fix.any():
        n_bad = int(_to_numpy(xp.sum(xp.astype(~xp.isfinite(src), xp.int64))))
        mask = xp.reshape(xp.asarray(fix, device=dev), (b, 1, 1))
        x = xp.where(mask, xp.zeros((), dtype=work, device=dev), x)  # a new array
        sums = _sums(xp, x, channel_gram)

    gram = _gram(xp, x, channel_gram)
    g, trace_c, trace_raw, aux = _centre_gram(xp, gram, sums, hw, channel_gram)
    tc, tr = _to_numpy(trace_c), _to_numpy(trace_raw)
    mean_square = tr / (c * hw)
    # Redo in float64: digits lost to cancellation (mean >> spread, no variance at all),
    # non-finite values, or magnitudes where float32 squares overflow or go subnormal.
    limit = _CANCELLATION_LIMIT * _EPS32 / eps
    redo = ~(tc * limit > tr) | fix | ~(mean_square > 1e-28) | ~(mean_square < 1e28)
    safe_tc = np.where(redo | ~(tc > 0), 1.0, tc)
    zero_tol = _ZERO_EPS * eps * np.where(redo, 1.0, tr / safe_tc)
    idx = np.flatnonzero(redo)
    x64 = unit = None
    if idx.size:
        # Precise path for the few samples where float32 would lose digits: float64 from
        # the original values, scaled to max |x| = 1 (restored on the maps at the end) so
        # that nothing overflows, then centred explicitly.
        x64 = xp.astype(_take(xp, src, idx), xp.float64, copy=True)
        x64 = xp.where(xp.isfinite(x64), x64, xp.zeros((), dtype=xp.float64, device=dev))
        peak = xp.max(xp.abs(x64), axis=(1, 2))
        peak = xp.where(peak > 0, peak, xp.ones_like(peak))
        x64 = x64 / peak[:, None, None]
        raw64 = _to_numpy(xp.sum(x64 * x64, axis=(1, 2)))
        x64 = x64 - xp.mean(x64, axis=2, keepdims=True)
        unit_np = np.ones(b)
        unit_np[idx] = _to_numpy(peak)
        unit = xp.asarray(unit_np, dtype=work, device=dev)
        g64, trace64, _, aux64 = _centre_gram(
            xp, _gram(xp, x64, channel_gram), _sums(xp, x64, channel_gram), hw, channel_gram, centred=True
        )
        g = _put(xp, g, idx, g64)
        trace_c = _put(xp, trace_c, idx, trace64)
        aux = _put(xp, aux, idx, aux64)
        # No variance at all (every pixel the same channel vector: a dead or collapsed
        # layer): explicit centring leaves only its own rounding, about hw float64 epsilons
        # per value, and normalising that noise to unit trace would give ratio 1 and a map
        # of noise. A float32 input that differs anywhere by one ulp is ~1e6 times above it.
        novar = _to_numpy(trace64) <= (_NO_VARIANCE_EPS * hw * _EPS64) ** 2 * raw64
        zero_tol[idx] = np.where(novar, np.inf, 1e-12)

    # Top eigenpairs of the trace-normalised centred Gram matrix: theta = explained ratio.
    if frac is not None:
        w_all, v_all = xp.linalg.eigh(g)
        theta_all = xp.maximum(xp.flip(w_all, axis=-1), 0.0)
        k = _k_for_fraction(_to_numpy(theta_all), frac)
        theta, vec = theta_all[:, :k], xp.flip(v_all, axis=-1)[:, :, :k]
    else:
        assert k is not None
        theta, vec = _top_eigenpairs(xp, g, min(k, n))
        theta = xp.maximum(theta, 0.0)
    assert k is not None

    # Zero-variance components (rank below k, constant input): rounding noise, not signal.
    alive = theta > xp.asarray(zero_tol, dtype=xp.float64, device=dev)[:, None]
    theta = xp.where(alive, theta, xp.zeros_like(theta))

    if channel_gram:
        # vec = loadings v_i (B, C, k); map_i = Xc v_i = X v_i - (mu . v_i).
        vt = xp.permute_dims(vec, (0, 2, 1))
        maps = xp.matmul(xp.astype(vt, work), x)
        maps = _isub(maps, xp.astype(xp.matmul(vt, aux[:, :, None]), work))  # aux: channel means
        if x64 is not None:
            maps = _put(xp, maps, idx, xp.astype(xp.matmul(_take(xp, vt, idx), x64), work))
        cos = xp.sum(vec, axis=1) / math.sqrt(c)
    else:
        # vec = left singular vectors u_i (B, hw, k); map_i = s_i u_i.
        scale = xp.sqrt(theta * trace_c[:, None])
        maps = xp.astype(xp.permute_dims(vec, (0, 2, 1)) * scale[:, :, None], work)
        cos = _loading_cosine(xp, vec, aux, scale, c)
    if unit is not None:  # beyond float32 range this gives inf, which is the answer
        maps = _imul(maps, unit[:, None, None])
    return _finish(xp, xp.astype(maps, xp.float32), theta, alive, cos, k) + (n_bad,)


def _loading_cosine(xp: Any, u: Any, r: Any, s: Any, n_channels: int) -> Any:
    """cos(v_i, 1) from the hw x hw side: (v_i . 1) / sqrt(C) = u_i . r / (s_i sqrt(C)).

    u (B, hw, k) left singular vectors, r (B, hw) the centred channel-sum map ``Xc 1``,
    s (B, k) singular values (0 for dead components, whose cosine is then 0).
    """
    dot = xp.matmul(r[:, None, :], u)[:, 0, :]
    denom = s * math.sqrt(n_channels)
    ok = denom > 0
    return xp.where(ok, dot / xp.where(ok, denom, xp.ones_like(denom)), xp.zeros_like(dot))


def _finish(xp: Any, maps: Any, theta: Any, alive: Any, cos: Any, k: int) -> Tuple[Any, Any]:
    """Zero dead components, fix signs, pad to k components: float32 maps and ratios.

    maps (B, k', hw) float32 with k' = min(k, rank bound); theta (B, k') float64 explained
    ratios; alive (B, k') bool; cos (B, k') cos(loading vector, all-ones), whose sign is the
    sign of the correlation with the channel-mean map.
    """
    b, k_eff, hw = maps.shape
    maps = xp.where(alive[:, :, None], maps, xp.zeros_like(maps))
    maps = _fix_signs(xp, maps, cos)
    ratio = theta / xp.maximum(xp.sum(theta, axis=1, keepdims=True), 1.0)
    if k > k_eff:  # more components than the rank bound min(C, hw): zero maps, ratio 0
        dev = _device(maps)
        maps = xp.concat([maps, xp.zeros((b, k - k_eff, hw), dtype=maps.dtype, device=dev)], axis=1)
        ratio = xp.concat([ratio, xp.zeros((b, k - k_eff), dtype=ratio.dtype, device=dev)], axis=1)
    ratio32 = xp.astype(ratio, xp.float32)
    # Rounding ratios that sum to 1 in float64 to float32 may push the sum one ulp above.
    over = xp.sum(xp.astype(ratio32, xp.float64), axis=1, keepdims=True) > 1.0
    ratio32 = xp.where(over, ratio32 * (1.0 - 2.0**-22), ratio32)
    return maps, ratio32


def _fix_signs(xp: Any, maps: Any, cos: Any) -> Any:
    """Make each map correlate non-negatively with the channel-mean map."""
    sign = xp.sign(cos)
    tie = xp.abs(cos) <= _TIE_COSINE
    if bool(_to_numpy(xp.any(tie))):
        # Tie-break: the (first) pixel with the largest |value| is positive.
        where = xp.argmax(xp.abs(maps), axis=2, keepdims=True)
        peak = xp.take_along_axis(maps, where, axis=2)[:, :, 0]
        sign = xp.where(tie, xp.astype(xp.sign(peak), sign.dtype), sign)
    sign = xp.where(sign == 0, xp.ones_like(sign), sign)
    return maps * xp.astype(sign, maps.dtype)[:, :, None]


def _sums(xp: Any, x: Any, channel_gram: bool) -> Any:
    """Per-channel sums over pixels (B, C) or per-pixel sums over channels (B, hw)."""
    # matmul with a ones vector runs in BLAS; a sum over a short axis is 4-5x slower.
    dev = _device(x)
    if channel_gram:
        return xp.matmul(x, xp.ones((x.shape[2],), dtype=x.dtype, device=dev))
    return xp.matmul(xp.ones((x.shape[1],), dtype=x.dtype, device=dev), x)


def _gram(xp: Any, x: Any, channel_gram: bool) -> Any:
    """Uncentred Gram matrices: X^T X (B, C, C) or X X^T (B, hw, hw), in x's dtype."""
    xt = xp.permute_dims(x, (0, 2, 1))
    return xp.matmul(x, xt) if channel_gram else xp.matmul(xt, x)


def _centre_gram(
    xp: Any, gram: Any, sums: Any, hw: int, channel_gram: bool, centred: bool = False
) -> Tuple[Any, Any, Any, Any]:
    """Centre the Gram matrices and normalise them to unit trace (float64).

    Returns (g, trace, trace_raw, aux): g (B, n, n) centred Gram / its trace (zero when
    the trace is 0), trace (B,) the centred trace (total variance times hw), trace_raw (B,)
    the uncentred one, aux the channel means (B, C) or the centred channel-sum map (B, hw).
    """
    f64 = xp.float64
    sums = xp.astype(sums, f64)
    trace_raw = xp.sum(xp.astype(xp.linalg.diagonal(gram), f64), axis=-1)
    m = gram.shape[2]
    if channel_gram:
        mu = sums / hw  # channel means
        # trace(X^T X - hw mu mu^T) = trace(G) - sum_i s_i mu_i
        trace = trace_raw if centred else trace_raw - xp.sum(sums * mu, axis=1)
        aux = mu
    else:
        # X X^T with X centred per channel = P G P, P = I - 11^T / hw (double centring)
        # row means by BLAS (float32 sums of n terms: error at the Gram's own rounding level)
        ones = xp.full((m,), 1.0 / m, dtype=gram.dtype, device=_device(gram))
        row = xp.astype(xp.matmul(gram, ones), f64)
        grand = xp.mean(row, axis=1)
        trace = trace_raw if centred else trace_raw - m * grand
        aux = sums - xp.mean(sums, axis=1, keepdims=True)  # centred channel-sum map
    positive = trace > 0
    inv = xp.where(positive, 1.0 / xp.where(positive, trace, xp.ones_like(trace)), xp.zeros_like(trace))
    g = _imul(xp.astype(gram, f64, copy=True), inv[:, None, None])
    if not centred:
        if channel_gram:
            g = _isub(g, (sums * inv[:, None])[:, :, None] * mu[:, None, :])
        else:
            row_n = row * inv[:, None]
            g = _isub(g, row_n[:, :, None])
            g = _isub(g, (row_n - (grand * inv)[:, None])[:, None, :])
    return g, xp.where(positive, trace, xp.zeros_like(trace)), trace_raw, aux


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


def _top_eigenpairs(xp: Any, g: Any, k: int) -> Tuple[Any, Any]:
    """Top-k eigenpairs of symmetric PSD matrices g (B, n, n) float64 with trace <= 1.

    Returns theta (B, k) non-increasing and vectors (B, n, k), on g's device.
    """
    b, n, _ = g.shape
    p = k + _OVERSAMPLE
    dev = _device(g)
    theta = xp.zeros((b, k), dtype=g.dtype, device=dev)
    vec = xp.zeros((b, n, k), dtype=g.dtype, device=dev)
    todo = np.arange(b)
    if 2 * p * (_KRYLOV_DEGREES[0] + 1) <= n:
        # A flat spectrum (effective rank 1 / sum(theta^2) = 1 / ||g||_F^2 near n: noise,
        # early epochs) never passes the Krylov check; it goes to the exact solver at once.
        # Measured on the benchmark's data: effective rank 2-4 on CNN-like activations,
        # 0.7 n - 0.97 n on ReLU'd noise. A sample misjudged here is only solved exactly.
        flat_g = xp.reshape(g, (b, n * n))
        frob = _to_numpy(xp.vecdot(flat_g, flat_g, axis=-1))  # no (B, n, n) temporary
        flat = frob * n < _FLAT_RANK
        if flat.any():
            exact = todo[flat]
            w, u = _exact_top(xp, _take(xp, g, exact), k)
            theta = _put(xp, theta, exact, w)
            vec = _put(xp, vec, exact, u)
            todo = todo[~flat]
    for level, degree in enumerate(_KRYLOV_DEGREES):
        if not todo.size or 2 * p * (degree + 1) > n:
            # A basis over half the space costs about as much as an exact solve.
            break
        t, v, err = _block_krylov(xp, _take(xp, g, todo), k, p, degree)
        ok = err <= _RESIDUAL_TOL
        if ok.all() and todo.size == b:
            return t, v
        done = np.flatnonzero(ok)
        theta = _put(xp, theta, todo[done], _take(xp, t, done))
        vec = _put(xp, vec, todo[done], _take(xp, v, done))
        todo, err = todo[~ok], err[~ok]
        if level + 1 < len(_KRYLOV_DEGREES):
            # The residual falls about geometrically with the degree: (err)^(d2/d) is
            # what the next degree should reach. Flat spectra miss by decades; only the
            # samples predicted to pass try the bigger basis.
            ratio = _KRYLOV_DEGREES[level + 1] / degree
            hopeful = err ** ratio <= _PREDICT_SLACK * _RESIDUAL_TOL
            exact = todo[~hopeful]
            if exact.size:
                w, u = _exact_top(xp, _take(xp, g, exact), k)
                theta = _put(xp, theta, exact, w)
                vec = _put(xp, vec, exact, u)
            todo = todo[hopeful]
    if todo.size:
        w, u = _exact_top(xp, _take(xp, g, todo), k)
        theta = _put(xp, theta, todo, w)
        vec = _put(xp, vec, todo, u)
    return theta, vec


def _exact_top(xp: Any, g: Any, k: int) -> Tuple[Any, Any]:
    """Exact top-k eigenpairs. Returns theta (B, k) non-increasing and vectors (B, n, k).

    Host arrays (numpy, CPU tensors through a DLPack view) use LAPACK's subset solver
    through scipy: the tridiagonal reduction, then k eigenvectors by bisection and inverse
    iteration (``?syevx``) instead of all n. It runs in float32 (measured 1.5x faster than
    float64 on n = 196..256) and each pair is then checked in float64 by the same residual
    test as the Krylov pairs (float32 reaches ~3e-7, the test asks 1e-6); a sample that
    misses it is solved again in float64 (``?syevr``). Elsewhere: one batched ``eigh``.
    """
    b, n, _ = g.shape
    host = _host_view(g) if n >= _SUBSET_MIN_N and k < n else None
    if host is not None:
        try:
            from scipy.linalg import eigh
        except ImportError:  # scipy is optional here: the batched eigh is exact too
            host = None
    if host is None:
        w, v = xp.linalg.eigh(g)
        return xp.flip(w, axis=-1)[:, :k], xp.flip(v, axis=-1)[:, :, :k]
    theta = np.empty((b, k))
    vec = np.empty((b, n, k))
    top = [n - k, n - 1]
    with _lapack_threads(n):
        _subset_loop(eigh, host, top, theta, vec)
    dev = _device(g)
    return xp.asarray(theta, device=dev), xp.asarray(vec, device=dev)


def _subset_loop(eigh: Any, host: np.ndarray, top: List[int], theta: np.ndarray, vec: np.ndarray) -> None:
    try:
        # LAPACK's ssyevx itself: scipy.linalg.eigh's argument handling around it costs
        # 0.2 ms per call, a quarter of the solve on n = 196 (measured 1.05 vs 0.84 ms).
        from scipy.linalg.lapack import ssyevx
    except ImportError:
        ssyevx = None
    k = top[1] - top[0] + 1
    v32 = np.empty(vec.shape, np.float64)
    for i in range(host.shape[0]):
        v = None
        if ssyevx is not None:
            _, v, m, _, info = ssyevx(host[i].astype(np.float32), range="I", il=top[0] + 1,
                                      iu=top[1] + 1, lower=1)
            if info != 0 or m != k:
                v = None  # not converged: the float64 check below sends it to ?syevr
        if v is None:
            _, v = eigh(host[i].astype(np.float32), subset_by_index=top, driver="evx",
                        check_finite=False)
        v32[i] = v
    # One float64 Rayleigh-Ritz step on the float32 vectors, batched: orthonormal to float64
    # rounding, eigenvalues to the square of the float32 residual.
    q, _ = np.linalg.qr(v32)
    gq = host @ q
    w, s = np.linalg.eigh(np.swapaxes(q, 1, 2) @ gq)
    v = q @ s
    resid = np.linalg.norm(gq @ s - v * w[:, None, :], axis=1)
    good = np.all(resid <= _RESIDUAL_TOL * np.maximum(w[:, -1:], 1e-300), axis=1)
    for i in map(int, np.flatnonzero(~good)):
        w[i], v[i] = eigh(host[i], subset_by_index=top, driver="evr", check_finite=False)
    theta[:] = w[:, ::-1]
    vec[:] = v[:, :, ::-1]


_SCIPY_BLAS: Any = None


def _lapack_threads(n: int) -> Any:
    """One BLAS thread for scipy's LAPACK calls on matrices up to 512 x 512.

    scipy loads its own OpenBLAS, often after the caller limited numpy's threads, so it
    runs with every core: on n = 196 a call measured 33 ms instead of 1.2 ms on a loaded
    2-core machine (the workers wait to be scheduled), for about 1 ms of work per call.
    """
    global _SCIPY_BLAS
    if n > 512:
        return contextlib.nullcontext()
    try:
        if _SCIPY_BLAS is None:
            from threadpoolctl import ThreadpoolController

            _SCIPY_BLAS = ThreadpoolController().select(user_api="blas")
        return _SCIPY_BLAS.limit(limits=1)
    except Exception:  # threadpoolctl missing or failing: same results, maybe slower
        return contextlib.nullcontext()


def _block_krylov(xp: Any, g: Any, k: int, p: int, blocks: int) -> Tuple[Any, Any, np.ndarray]:
    """One Rayleigh-Ritz step on span[W, GW, ..., G^blocks W] (W a fixed n x p block).

    Returns theta (B, k), vectors (B, n, k) and, on the host, each sample's worst residual
    relative to its top Ritz value, (B,) float64 (the pair is accepted at ``_RESIDUAL_TOL``).
    """
    b, n, _ = g.shape
    dev = _device(g)
    z = xp.asarray(_start_block(n, p), dtype=g.dtype, device=dev)
    blocks_list = [xp.broadcast_to(z[None, :, :], (b, n, p))]
    for _ in range(blocks):
        # No rescaling needed: trace(g) <= 1 so powers shrink, and the top eigenvalue is
        # at least 1/n so the leading directions never underflow.
        blocks_list.append(xp.matmul(g, blocks_list[-1]))
    q, _ = xp.linalg.qr(xp.concat(blocks_list, axis=2))
    gq = xp.matmul(g, q)
    t = xp.matmul(xp.permute_dims(q, (0, 2, 1)), gq)
    t = 0.5 * (t + xp.permute_dims(t, (0, 2, 1)))
    w, s = xp.linalg.eigh(t)
    w = xp.flip(w, axis=-1)[:, :k]
    s = xp.flip(s, axis=-1)[:, :, :k]
    vec = xp.matmul(q, s)
    resid = xp.matmul(gq, s) - vec * w[:, None, :]
    rnorm = xp.max(xp.linalg.vector_norm(resid, axis=1), axis=1)
    top = xp.maximum(w[:, 0], 1e-300)
    err = _to_numpy(rnorm / top)
    return w, vec, np.where(np.isfinite(err), err, np.inf)
