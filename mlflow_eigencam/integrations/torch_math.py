"""EigenCAM math on a torch tensor's own device.

:func:`mlflow_eigencam.eigencam.eigencam` imports this module lazily, only when it is given
a torch tensor, so the package never imports torch by itself. The algorithm is the one
documented in :mod:`mlflow_eigencam.eigencam` (Gram matrix of the smaller side, block
Krylov Rayleigh-Ritz with a residual check, full batched ``torch.linalg.eigh`` as the
fallback, same sign rule), but on the device and in float64 from the start: a GPU has the
bandwidth for it, float64 makes explicit centring exact for constant inputs, and it keeps
the Gram product away from TF32 when a user has enabled it globally. Only the maps, the
ratios and a (B, k) table of loading cosines (for the sign rule) are copied back to the host.

A CPU tensor goes to the numpy code (``tensor.numpy()`` shares memory, nothing is written):
on CPU it is as accurate and measured faster than running this module's code there.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

from mlflow_eigencam.eigencam import (
    _KRYLOV_DEGREES,
    _OVERSAMPLE,
    _RESIDUAL_TOL,
    EigenCAMResult,
    _check_activation_shape,
    _check_n_components,
    _eigencam_numpy,
    _finish,
    _k_for_fraction,
    _start_block,
    _warn_non_finite,
)

__all__ = ["eigencam_torch"]

_ZERO_TOL = 1e-12  # float64 throughout: zero-variance components are at ~1e-16


def eigencam_torch(
    activations: "torch.Tensor",
    n_components: Union[int, float] = 3,
    *,
    channels_last: bool = False,
    on_device: Optional[bool] = None,
) -> EigenCAMResult:
    """EigenCAM of a torch tensor; see :func:`mlflow_eigencam.eigencam.eigencam`.

    Args:
        activations: tensor (B, C, h, w), or (B, h, w, C) with ``channels_last=True``, or
            3-D for one sample; floating or integer dtype (bfloat16 included), any device.
            Never modified; gradients are not tracked.
        n_components: int in 1..C, or float in (0, 1) (explained-variance target).
        channels_last: activations are (B, h, w, C).
        on_device: compute with torch on the tensor's device. Default: True for non-CPU
            tensors; CPU tensors go through the numpy code unless this is True.

    Returns:
        EigenCAMResult with numpy float32 ``maps`` (B, k, h, w) and
        ``explained_variance_ratio`` (B, k).
    """
    t = activations.detach()
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or _is_integer(t.dtype)):
        raise TypeError(
            f"activations must have a float or integer dtype, got {t.dtype} (shape {tuple(t.shape)})"
        )
    if on_device is None:
        on_device = t.device.type != "cpu"
    if not on_device:
        host = t.cpu()
        if host.dtype == torch.bfloat16 or host.dtype not in _NUMPY_DTYPES:
            host = host.float()  # numpy has no bfloat16
        result, n_bad = _eigencam_numpy(host.numpy(), n_components, channels_last)
    else:
        x, (h, w) = _to_batch_channels_pixels(t, channels_last)
        k, frac = _check_n_components(n_components, x.shape[1])
        maps, theta, alive, cos, k, n_bad = _compute(x, k, frac)
        maps, ratio = _finish(maps, theta, alive, cos, k)
        maps = maps.reshape(maps.shape[0], maps.shape[1], h, w)
        result = EigenCAMResult(maps=maps, explained_variance_ratio=ratio)
    if n_bad:
        # stacklevel: _warn_non_finite, this function, eigencam(), the user's call.
        _warn_non_finite(n_bad, stacklevel=4)
    return result


_NUMPY_DTYPES = {
    torch.float16, torch.float32, torch.float64,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
}


def _is_integer(dtype: "torch.dtype") -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _to_batch_channels_pixels(t: "torch.Tensor", channels_last: bool) -> Tuple["torch.Tensor", Tuple[int, int]]:
    _check_activation_shape(tuple(t.shape), channels_last)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if channels_last:
        b, h, w, c = t.shape
        return t.reshape(b, h * w, c).transpose(1, 2), (h, w)
    b, c, h, w = t.shape
    return t.reshape(b, c, h * w), (h, w)


def _compute(
    x: "torch.Tensor", k: Optional[int], frac: Optional[float]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """x (B, C, hw) on any device -> host arrays for ``_finish`` plus k and the NaN count."""
    _, c, hw = x.shape
    n = min(c, hw)
    channel_gram = c <= hw
    x = x.to(torch.float64)  # a new tensor unless the caller's was float64
    finite = torch.isfinite(x)
    n_bad = int((~finite).sum())  # one device sync
    if n_bad:
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    xc = x - x.mean(dim=2, keepdim=True)  # never in place: x may be the caller's tensor
    # Scale each sample to max |x| = 1 so the Gram product cannot overflow.
    peak = xc.abs().amax(dim=(1, 2))
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    xc = xc / peak[:, None, None]
    gram = xc @ xc.transpose(1, 2) if channel_gram else xc.transpose(1, 2) @ xc
    trace = torch.diagonal(gram, dim1=1, dim2=2).sum(dim=1)
    positive = trace > 0
    g = gram / torch.where(positive, trace, torch.ones_like(trace))[:, None, None]
    g = torch.where(positive[:, None, None], g, torch.zeros_like(g))

    if frac is not None:
        w_all, v_all = torch.linalg.eigh(g)
        theta_all = w_all.flip(-1).clamp_min(0.0)
        k = _k_for_fraction(theta_all.cpu().numpy(), frac)
        theta, vec = theta_all[:, :k], v_all.flip(-1)[..., :k]
    else:
        assert k is not None
        theta, vec = _top_eigenpairs(g, min(k, n))
        theta = theta.clamp_min(0.0)
    alive = theta > _ZERO_TOL
    theta = torch.where(alive, theta, torch.zeros_like(theta))

    if channel_gram:
        maps = vec.transpose(1, 2) @ xc  # (B, k, hw)
        cos = vec.sum(dim=1) / c**0.5  # cos(v_i, 1): its sign is the sign rule
    else:
        s = (theta * trace[:, None]).sqrt()
        maps = vec.transpose(1, 2) * s[:, :, None]
        r = xc.sum(dim=1)  # centred channel-sum map (B, hw)
        denom = s * c**0.5
        cos = torch.einsum("bpk,bp->bk", vec, r) / torch.where(denom > 0, denom, torch.ones_like(denom))
        cos = torch.where(denom > 0, cos, torch.zeros_like(cos))
    maps = (maps * peak[:, None, None]).to(torch.float32)
    return (
        maps.cpu().numpy(),
        theta.cpu().numpy(),
        alive.cpu().numpy(),
        cos.cpu().numpy(),
        int(k),
        n_bad,
    )


def _top_eigenpairs(g: "torch.Tensor", k: int) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Top-k eigenpairs of PSD g (B, n, n), trace <= 1: block Krylov, eigh as the fallback."""
    b, n, _ = g.shape
    p = k + _OVERSAMPLE
    theta = torch.zeros((b, k), dtype=g.dtype, device=g.device)
    vec = torch.zeros((b, n, k), dtype=g.dtype, device=g.device)
    todo = torch.arange(b, device=g.device)
    for degree in _KRYLOV_DEGREES:
        if not len(todo) or 2 * p * (degree + 1) > n:
            break
        sub = g if len(todo) == b else g[todo]
        z = torch.as_tensor(_start_block(n, p), dtype=g.dtype, device=g.device).expand(len(todo), n, p)
        basis = [z]
        for _ in range(degree):
            z = sub @ z
            basis.append(z)
        q, _ = torch.linalg.qr(torch.cat(basis, dim=2))
        gq = sub @ q
        t = q.transpose(1, 2) @ gq
        w, s = torch.linalg.eigh(0.5 * (t + t.transpose(1, 2)))
        w, s = w.flip(-1)[:, :k], s.flip(-1)[..., :k]
        v = q @ s
        resid = (gq @ s - v * w[:, None, :]).norm(dim=1)
        ok = (resid <= _RESIDUAL_TOL * w[:, :1].clamp_min(0.0) + 1e-300).all(dim=1)
        theta[todo[ok]] = w[ok]
        vec[todo[ok]] = v[ok]
        todo = todo[~ok]
    if len(todo):
        w, v = torch.linalg.eigh(g if len(todo) == b else g[todo])
        theta[todo] = w.flip(-1)[:, :k]
        vec[todo] = v.flip(-1)[..., :k]
    return theta, vec
