"""The torch path of eigencam(): dispatch, and the on-device algorithm (run here on CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mlflow_eigencam.eigencam import NonFiniteActivationsWarning, eigencam
from mlflow_eigencam.integrations.torch_math import eigencam_torch

sys.path.insert(0, str(Path(__file__).parents[1] / "core"))
from test_eigencam import low_rank, rel_errors, textbook


@pytest.mark.parametrize(
    "shape",
    [(3, 16, 9, 11), (3, 96, 5, 6), (2, 256, 12, 12), (2, 64, 20, 20), (1, 3, 4, 4)],
)
@pytest.mark.parametrize("n_components", [3, 0.8])
def test_device_algorithm_matches_numpy_path(shape, n_components):
    a = low_rank(np.random.default_rng(0), *shape)
    ref = eigencam(a, n_components)
    res = eigencam_torch(torch.from_numpy(a), n_components, on_device=True)
    assert res.maps.dtype == np.float32 and res.explained_variance_ratio.dtype == np.float32
    assert res.maps.shape == ref.maps.shape
    assert rel_errors(res.maps, ref.maps.astype(np.float64)).max() <= 1e-4
    np.testing.assert_allclose(res.explained_variance_ratio, ref.explained_variance_ratio, atol=1e-6)
    # same sign rule, not just the same maps up to sign
    dots = np.einsum("bkhw,bkhw->bk", res.maps, ref.maps)
    assert np.all(dots >= 0)


def test_device_algorithm_matches_textbook_svd():
    a = low_rank(np.random.default_rng(1), 4, 48, 7, 7)
    res = eigencam_torch(torch.from_numpy(a), 3, on_device=True)
    ref_maps, ref_ratio, _ = textbook(a, 3)
    assert rel_errors(res.maps, ref_maps).max() <= 1e-3
    np.testing.assert_allclose(res.explained_variance_ratio, ref_ratio, atol=1e-5)


@pytest.mark.parametrize("on_device", [False, True])
def test_channels_last_single_sample_and_dtypes(on_device):
    a = low_rank(np.random.default_rng(2), 2, 12, 5, 7)
    base = eigencam(a)
    t = torch.from_numpy(a)
    nhwc = t.permute(0, 2, 3, 1)  # a non-contiguous view, as a model would hand it over
    tol = 1e-5 * np.abs(base.maps).max()
    got = eigencam_torch(nhwc, channels_last=True, on_device=on_device)
    np.testing.assert_allclose(got.maps, base.maps, atol=tol)
    one = eigencam_torch(t[1], on_device=on_device)
    assert one.maps.shape == (1, 3, 5, 7)
    np.testing.assert_allclose(one.maps[0], base.maps[1], atol=tol)
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int32):
        res = eigencam_torch((t * 10).to(dtype), on_device=on_device)
        assert res.maps.shape == (2, 3, 5, 7) and res.maps.dtype == np.float32
        assert np.isfinite(res.maps).all()


def test_eigencam_dispatches_tensors_without_touching_them():
    a = low_rank(np.random.default_rng(3), 2, 16, 6, 6)
    t = torch.from_numpy(a.copy()).requires_grad_(True)
    res = eigencam(t)  # the public entry point; CPU tensors go through the numpy code
    np.testing.assert_array_equal(res.maps, eigencam(a).maps)
    assert isinstance(res.maps, np.ndarray)
    assert t.grad is None and torch.equal(t.detach(), torch.from_numpy(a))


@pytest.mark.parametrize("on_device", [False, True])
def test_non_finite_values_warn_once_and_leave_the_tensor_alone(on_device):
    a = low_rank(np.random.default_rng(4), 3, 12, 5, 5)
    a[1, 0, 2, 2] = np.nan
    a[2, 3, 0, 0] = -np.inf
    t = torch.from_numpy(a.copy())
    with pytest.warns(NonFiniteActivationsWarning, match=r"\b2 non-finite") as record:
        res = eigencam(t) if not on_device else eigencam_torch(t, on_device=True)
    assert len(record) == 1
    assert torch.isnan(t[1, 0, 2, 2]) and torch.isinf(t[2, 3, 0, 0])
    np.testing.assert_array_equal(t.numpy(), a)
    assert np.isfinite(res.maps).all()
    ref_maps, _, _ = textbook(np.where(np.isfinite(a), a, 0.0), 3)
    assert rel_errors(res.maps, ref_maps).max() <= 1e-3


def test_constant_and_zero_tensors_give_zero_maps():
    for t in (torch.full((2, 4, 3, 3), 5.0), torch.zeros(1, 8, 2, 2)):
        res = eigencam_torch(t, 3, on_device=True)
        assert np.all(res.maps == 0) and np.all(res.explained_variance_ratio == 0)


def test_components_beyond_rank_and_validation():
    t = torch.from_numpy(low_rank(np.random.default_rng(5), 2, 10, 2, 2))
    res = eigencam_torch(t, 8, on_device=True)
    assert np.all(res.maps[:, 3:] == 0) and np.all(res.explained_variance_ratio[:, 3:] == 0)
    with pytest.raises(ValueError, match=r"n_components=11.*C=10"):
        eigencam(t, 11)
    with pytest.raises(TypeError, match="bool"):
        eigencam_torch(t, True, on_device=True)
    with pytest.raises(TypeError, match="torch.bool"):
        eigencam(t > 0)
    with pytest.raises(ValueError, match=r"got shape \(10, 4\)"):
        eigencam_torch(torch.zeros(10, 4), on_device=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_numpy():
    a = low_rank(np.random.default_rng(6), 8, 256, 14, 14)
    res = eigencam(torch.from_numpy(a).cuda())
    ref = eigencam(a)
    assert rel_errors(res.maps, ref.maps.astype(np.float64)).max() <= 1e-4
    np.testing.assert_allclose(res.explained_variance_ratio, ref.explained_variance_ratio, atol=1e-6)
