"""One implementation for every array library: torch tensors run the same array-API code as
numpy arrays (here on CPU), with the same maps, ratios, sign rule and checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlflow_eigencam.eigencam import NonFiniteActivationsWarning, eigencam
from tests.helpers.oracle import blob_sample, low_rank, parity_tolerance, rel_errors, textbook

SHAPES = [(3, 16, 9, 11), (3, 96, 5, 6), (2, 256, 12, 12), (2, 64, 20, 20), (1, 3, 4, 4), (2, 40, 8, 5)]


def assert_same(res, ref, a):
    """Same signed maps (as they are drawn: after the sign rule, relative to each map's scale)
    and ratios, within what float32 rounding allows on ``a`` (:func:`parity_tolerance`)."""
    assert res.maps.dtype == np.float32 and res.explained_variance_ratio.dtype == np.float32
    assert isinstance(res.maps, np.ndarray) and res.maps.shape == ref.maps.shape
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[None]
    maps_tol, ratios_tol = parity_tolerance(a, ref.maps.shape[1])
    scale = np.abs(ref.maps).max(axis=(2, 3), keepdims=True)
    diff = (np.abs(res.maps - ref.maps) / np.where(scale > 0, scale, 1.0)).max(axis=(2, 3))
    over = diff > maps_tol
    assert not over.any(), (f"maps differ by {diff[over].max():.2e} of their scale where rounding "
                            f"allows {maps_tol[over].min():.2e} (sample, component {np.argwhere(over)[0]})")
    assert np.all(res.maps[np.broadcast_to(scale == 0, res.maps.shape)] == 0)  # dead stay zero
    ratio_diff = np.abs(res.explained_variance_ratio - ref.explained_variance_ratio).max(axis=1)
    assert (ratio_diff <= ratios_tol).all(), f"ratios differ by {ratio_diff.max():.2e}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_components", [3, 0.8])
def test_torch_and_numpy_give_the_same_maps_and_ratios(shape, n_components):
    a = low_rank(np.random.default_rng(0), *shape)
    assert_same(eigencam(torch.from_numpy(a.copy()), n_components), eigencam(a, n_components), a)


@pytest.mark.parametrize("spectrum", ["flat", "low_rank"])
def test_same_results_on_flat_spectra_which_take_the_exact_solver(spectrum):
    rng = np.random.default_rng(1)
    if spectrum == "flat":  # Gaussian noise: the Krylov step fails its check on most samples
        a = rng.standard_normal((4, 96, 10, 10)).astype(np.float32)
    else:
        a = low_rank(rng, 4, 96, 10, 10)
    ref = eigencam(a, 3)
    assert_same(eigencam(torch.from_numpy(a), 3), ref, a)
    maps, ratios, _ = textbook(a, 3)
    assert rel_errors(ref.maps, maps).max() <= 1e-3
    np.testing.assert_allclose(ref.explained_variance_ratio, ratios, atol=1e-6)


def test_matches_textbook_svd():
    a = low_rank(np.random.default_rng(1), 4, 48, 7, 7)
    res = eigencam(torch.from_numpy(a), 3)
    ref_maps, ref_ratio, _ = textbook(a, 3)
    assert rel_errors(res.maps, ref_maps).max() <= 1e-3
    np.testing.assert_allclose(res.explained_variance_ratio, ref_ratio, atol=1e-5)


@pytest.mark.parametrize("c, h, w", [(8, 12, 12), (200, 6, 6)])  # both Gram sides
def test_sign_rule_holds_for_tensors(c, h, w):
    rng = np.random.default_rng(11)
    for _ in range(10):
        a, (cy, cx) = blob_sample(rng, c, h, w)
        m = eigencam(torch.from_numpy(a)).maps[0, 0]
        assert m[cy, cx] > 0 and m[cy, cx] == m.max()
    a = low_rank(rng, 4, 24, 8, 8)
    res = eigencam(torch.from_numpy(a))
    for i in range(len(a)):
        mean_map = a[i].mean(axis=0).ravel()
        for j in range(3):
            assert np.dot(res.maps[i, j].ravel(), mean_map - mean_map.mean()) >= 0


def test_channels_last_views_single_sample_and_dtypes():
    a = low_rank(np.random.default_rng(2), 2, 12, 5, 7)
    base = eigencam(a)
    t = torch.from_numpy(a)
    nhwc = t.permute(0, 2, 3, 1)  # a non-contiguous view, as a model would hand it over
    assert_same(eigencam(nhwc, channels_last=True), base, a)
    one = eigencam(t[1])
    assert one.maps.shape == (1, 3, 5, 7)
    np.testing.assert_allclose(one.maps[0], base.maps[1], atol=1e-5 * np.abs(base.maps).max())
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8):
        x = (t * 10).to(dtype)
        res = eigencam(x)
        assert res.maps.shape == (2, 3, 5, 7) and res.maps.dtype == np.float32
        assert np.isfinite(res.maps).all()
        if dtype not in (torch.float16, torch.bfloat16):  # same values in numpy
            assert_same(res, eigencam(x.numpy()), x.numpy())


def test_tensor_is_not_touched_and_not_tracked():
    a = low_rank(np.random.default_rng(3), 2, 16, 6, 6)
    t = torch.from_numpy(a.copy()).requires_grad_(True)
    res = eigencam(t)
    assert_same(res, eigencam(a), a)
    assert isinstance(res.maps, np.ndarray) and not np.shares_memory(res.maps, t.detach().numpy())
    assert t.grad is None and torch.equal(t.detach(), torch.from_numpy(a))


def test_non_finite_values_warn_once_and_leave_the_tensor_alone():
    a = low_rank(np.random.default_rng(4), 3, 12, 5, 5)
    a[1, 0, 2, 2] = np.nan
    a[2, 3, 0, 0] = -np.inf
    t = torch.from_numpy(a.copy())
    with pytest.warns(NonFiniteActivationsWarning, match=r"\b2 non-finite") as record:
        res = eigencam(t)
    assert len(record) == 1
    np.testing.assert_array_equal(t.numpy(), a)  # NaN and Inf still there
    with pytest.warns(NonFiniteActivationsWarning):
        assert_same(res, eigencam(a), np.where(np.isfinite(a), a, 0.0))
    ref_maps, _, _ = textbook(np.where(np.isfinite(a), a, 0.0), 3)
    assert rel_errors(res.maps, ref_maps).max() <= 1e-3


@pytest.mark.parametrize("scale, offset", [(1e-25, 0.0), (1.0, 1e4), (1e25, 0.0)])
def test_extreme_magnitudes_take_the_float64_path_alike(scale, offset):
    a = low_rank(np.random.default_rng(23), 2, 20, 6, 6).astype(np.float64) * scale + offset
    assert_same(eigencam(torch.from_numpy(a)), eigencam(a), a)


def test_constant_and_zero_tensors_give_zero_maps():
    for t in (torch.full((2, 4, 3, 3), 5.0), torch.zeros(1, 8, 2, 2)):
        res = eigencam(t, 3)
        assert np.all(res.maps == 0) and np.all(res.explained_variance_ratio == 0)


def test_components_beyond_rank_and_validation():
    t = torch.from_numpy(low_rank(np.random.default_rng(5), 2, 10, 2, 2))
    res = eigencam(t, 8)
    assert np.all(res.maps[:, 3:] == 0) and np.all(res.explained_variance_ratio[:, 3:] == 0)
    with pytest.raises(ValueError, match=r"n_components=11.*C=10"):
        eigencam(t, 11)
    with pytest.raises(TypeError, match="bool"):
        eigencam(t, True)
    with pytest.raises(TypeError, match="torch.bool"):
        eigencam(t > 0)
    with pytest.raises(TypeError, match="torch.complex64"):
        eigencam(torch.zeros(1, 2, 3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"got shape \(10, 4\)"):
        eigencam(torch.zeros(10, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_numpy():
    a = low_rank(np.random.default_rng(6), 8, 256, 14, 14)
    assert_same(eigencam(torch.from_numpy(a).cuda()), eigencam(a), a)
    flat = np.random.default_rng(7).standard_normal((4, 96, 10, 10)).astype(np.float32)
    assert_same(eigencam(torch.from_numpy(flat).cuda()), eigencam(flat), flat)
