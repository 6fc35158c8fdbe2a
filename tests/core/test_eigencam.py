"""EigenCAM math: parity with the textbook per-sample SVD, sign rule, edge cases.

numpy only: this file must not import torch (see tests/torch/test_torch_math.py for that).
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

from mlflow_eigencam.eigencam import (
    EigenCAMResult,
    NonFiniteActivationsWarning,
    eigencam,
)
from tests.helpers.oracle import blob_sample, corr, low_rank, rel_errors, textbook

E = importlib.import_module("mlflow_eigencam.eigencam")  # the module, for its internals
XP = E._numpy_namespace()  # the array API namespace numpy arrays are computed with


# --------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "shape",
    [
        (3, 16, 9, 11),  # C <= hw: C x C Gram
        (3, 96, 5, 6),  # C > hw: hw x hw Gram
        (2, 256, 12, 12),  # C > hw, big enough for the block Krylov solver
        (2, 64, 20, 20),  # C <= hw, Krylov
        (2, 40, 8, 5),  # C == hw
        (1, 3, 4, 4),  # tiny: full eigh
    ],
)
def test_matches_textbook_svd_up_to_sign(shape):
    a = low_rank(np.random.default_rng(0), *shape)
    k = min(3, shape[1])
    res = eigencam(a, k)
    ref_maps, ref_ratio, _ = textbook(a, k)
    assert isinstance(res, EigenCAMResult)
    assert res.maps.shape == (shape[0], k) + shape[2:] and res.maps.dtype == np.float32
    assert res.explained_variance_ratio.shape == (shape[0], k)
    assert res.explained_variance_ratio.dtype == np.float32
    assert rel_errors(res.maps, ref_maps).max() <= 1e-3
    np.testing.assert_allclose(res.explained_variance_ratio, ref_ratio, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.uint8])
def test_other_dtypes(dtype):
    a = low_rank(np.random.default_rng(1), 2, 24, 6, 7)
    a = (a * 20).astype(dtype)
    ref_maps, ref_ratio, _ = textbook(a.astype(np.float64), 3)
    res = eigencam(a, 3)
    assert res.maps.dtype == np.float32
    assert rel_errors(res.maps, ref_maps).max() <= 1e-3
    np.testing.assert_allclose(res.explained_variance_ratio, ref_ratio, atol=1e-5)


def test_channels_last_and_single_sample_and_lists():
    a = low_rank(np.random.default_rng(2), 2, 12, 5, 7)
    base = eigencam(a)
    nhwc = np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(eigencam(nhwc, channels_last=True).maps, base.maps, rtol=0, atol=1e-5)
    one = eigencam(a[1])
    assert one.maps.shape == (1, 3, 5, 7)
    np.testing.assert_allclose(one.maps[0], base.maps[1], atol=1e-5)
    one_last = eigencam(nhwc[1], channels_last=True)
    np.testing.assert_allclose(one_last.maps[0], base.maps[1], atol=1e-5)
    np.testing.assert_allclose(eigencam(a.tolist()).maps, base.maps, atol=1e-5)


def test_ratios_non_increasing_sum_at_most_one_and_full_rank_sums_to_one():
    a = low_rank(np.random.default_rng(3), 4, 6, 5, 5)
    res = eigencam(a, 6)  # every component: the ratios sum to 1
    r = res.explained_variance_ratio
    assert np.all(np.diff(r, axis=1) <= 0)
    assert np.all(r.sum(axis=1) <= 1.0)
    np.testing.assert_allclose(r.sum(axis=1), 1.0, atol=1e-5)


def test_batch_result_equals_single_sample_results():
    a = low_rank(np.random.default_rng(4), 5, 32, 6, 6)
    batch = eigencam(a)
    for i in range(len(a)):
        alone = eigencam(a[i : i + 1])
        np.testing.assert_allclose(alone.maps, batch.maps[i : i + 1], rtol=0, atol=1e-4 * np.abs(alone.maps).max())


def test_deterministic():
    a = low_rank(np.random.default_rng(5), 3, 64, 7, 7)
    r1, r2 = eigencam(a), eigencam(a.copy())
    assert r1.maps.tobytes() == r2.maps.tobytes()
    assert r1.explained_variance_ratio.tobytes() == r2.explained_variance_ratio.tobytes()


def test_never_calls_svd(monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("eigencam must not run a per-sample SVD")

    monkeypatch.setattr(np.linalg, "svd", no_svd)
    a = low_rank(np.random.default_rng(6), 4, 48, 6, 6)
    assert eigencam(a).maps.shape == (4, 3, 6, 6)


def test_chunked_batches_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(7)
    a = low_rank(rng, 6, 20, 6, 6)
    # Sample 0 is rank one (needs k=1 for 90%); the rest need more components.
    a[0] = np.outer(rng.uniform(1, 2, 20), rng.uniform(0, 1, 36)).reshape(20, 6, 6)
    whole_int, whole_frac = eigencam(a, 3), eigencam(a, 0.9)
    monkeypatch.setattr(E, "_CHUNK_BYTES", 2 * 8 * 20 * 20 * 3)  # 2 samples a chunk
    np.testing.assert_allclose(eigencam(a, 3).maps, whole_int.maps, atol=1e-5)
    chunked = eigencam(a, 0.9)
    assert chunked.maps.shape == whole_frac.maps.shape
    np.testing.assert_allclose(chunked.maps, whole_frac.maps, atol=1e-5)


# --------------------------------------------------------------------------- solver


@pytest.mark.parametrize(
    "spectrum",
    [
        "geometric",  # CNN-like: converges in the first Krylov step
        "flat",  # noise: needs the bigger basis or the eigh fallback
        "degenerate_top",  # lambda_1 == lambda_2
        "cluster_at_k",  # lambda_3 ~ lambda_4 ~ lambda_5
        "rank_two",  # exact zeros
    ],
)
def test_top_eigenpairs_across_spectra(spectrum):
    rng = np.random.default_rng(8)
    n, b, k = 120, 3, 3
    lam = {
        "geometric": 0.6 ** np.arange(n),
        "flat": 1.0 + 0.01 * rng.standard_normal(n),
        "degenerate_top": np.r_[1.0, 1.0, 0.3 ** np.arange(1, n - 1)],
        "cluster_at_k": np.r_[1.0, 0.5, 0.2, 0.2 * (1 - 1e-6), 0.2 * (1 - 2e-6), 0.01 * 0.9 ** np.arange(n - 5)],
        "rank_two": np.r_[1.0, 0.5, np.zeros(n - 2)],
    }[spectrum]
    lam = np.abs(lam) / np.abs(lam).sum()
    q, _ = np.linalg.qr(rng.standard_normal((b, n, n)))
    g = (q * lam) @ q.transpose(0, 2, 1)
    theta, vec = E._top_eigenpairs(XP, g, k)
    expected = np.sort(lam)[::-1][:k]
    np.testing.assert_allclose(theta, np.broadcast_to(expected, theta.shape), atol=1e-9)
    resid = np.linalg.norm(g @ vec - vec * theta[:, None, :], axis=1)
    assert resid.max() <= 2e-6 * expected[0]
    np.testing.assert_allclose(vec.transpose(0, 2, 1) @ vec, np.broadcast_to(np.eye(k), (b, k, k)), atol=1e-8)


def test_near_degenerate_components_span_the_reference_subspace():
    rng = np.random.default_rng(9)
    c, h, w = 30, 8, 8
    hw = h * w
    # Exact, centred SVD: U orthogonal to the ones vector so column means are zero.
    u = rng.standard_normal((hw, 6))
    u -= u.mean(axis=0)
    u, _ = np.linalg.qr(u)
    v, _ = np.linalg.qr(rng.standard_normal((c, 6)))
    for s2, s3 in [(5.0, 5.0), (5.0, 5.0 * (1 + 1e-5))]:
        s = np.array([10.0, s2, s3, 1.0, 0.5, 0.2])
        x = (u * s) @ v.T + rng.uniform(0, 3, c)  # add channel offsets: centring removes them
        a = x.T.reshape(1, c, h, w).astype(np.float32)
        res = eigencam(a, 3)
        ref_maps, ref_ratio, _ = textbook(a, 3)
        assert rel_errors(res.maps[:, :1], ref_maps[:, :1]).max() <= 1e-3
        np.testing.assert_allclose(res.explained_variance_ratio, ref_ratio, atol=1e-5)
        # Components 2 and 3 are not individually defined; their span is.
        ours = res.maps[0, 1:].reshape(2, -1).T.astype(np.float64)
        basis, _ = np.linalg.qr(ref_maps[0, 1:].reshape(2, -1).T)
        projected = basis @ (basis.T @ ours)
        assert np.linalg.norm(ours - projected) <= 1e-3 * np.linalg.norm(ours)


def test_flat_spectrum_noise_still_matches():
    a = np.random.default_rng(10).standard_normal((2, 64, 10, 10)).astype(np.float32)
    res = eigencam(a, 2)
    ref_maps, ref_ratio, _ = textbook(a, 2)
    assert rel_errors(res.maps, ref_maps).max() <= 1e-3
    np.testing.assert_allclose(res.explained_variance_ratio, ref_ratio, atol=1e-6)


# --------------------------------------------------------------------------- sign rule


@pytest.mark.parametrize("c, h, w", [(8, 12, 12), (200, 6, 6)])  # both Gram sides
def test_first_component_is_positive_on_the_blob(c, h, w):
    rng = np.random.default_rng(11)
    for _ in range(20):  # a random sign would fail about half of these
        a, (cy, cx) = blob_sample(rng, c, h, w)
        m = eigencam(a).maps[0, 0]
        assert m[cy, cx] > 0
        assert m[cy, cx] == m.max()


@pytest.mark.parametrize("c, h, w", [(8, 12, 12), (200, 6, 6)])
def test_sign_independent_of_channel_order_and_solver_sign(c, h, w, monkeypatch):
    rng = np.random.default_rng(12)
    a = np.stack([blob_sample(rng, c, h, w)[0] for _ in range(4)])
    base = eigencam(a).maps
    perm = rng.permutation(c)
    np.testing.assert_allclose(eigencam(a[:, perm]).maps, base, atol=1e-4 * np.abs(base).max())

    solve = E._top_eigenpairs

    def flipped(xp, g, k):  # an eigensolver that returns the opposite signs
        theta, vec = solve(xp, g, k)
        return theta, -vec

    monkeypatch.setattr(E, "_top_eigenpairs", flipped)
    np.testing.assert_array_equal(eigencam(a).maps, base)


def test_sign_rule_correlation_and_loading_sum_are_non_negative():
    a = low_rank(np.random.default_rng(13), 6, 24, 8, 8)
    res = eigencam(a, 3)
    ref_maps, _, loadings = textbook(a, 3)
    for i in range(len(a)):
        channel_mean = a[i].mean(axis=0)
        for j in range(3):
            assert corr(res.maps[i, j], channel_mean) >= 0
            # the loading vector of our map (the reference one up to the matched sign)
            sign = np.sign(np.sum(res.maps[i, j] * ref_maps[i, j]))
            assert sign * loadings[i, j].sum() >= 0


def test_no_flicker_across_small_perturbations():
    """Same images, slightly different activations each 'epoch': signs must not flip."""
    rng = np.random.default_rng(14)
    base = low_rank(rng, 4, 64, 7, 7)
    first = eigencam(base).maps
    for _ in range(12):
        noisy = base + 0.01 * base.std() * rng.standard_normal(base.shape).astype(np.float32)
        maps = eigencam(noisy).maps
        for i in range(len(base)):
            for j in range(3):
                assert corr(maps[i, j], first[i, j]) > 0.9


@pytest.mark.parametrize("c, h, w", [(2, 5, 6), (20, 3, 3)])  # both Gram sides
def test_tie_break_makes_largest_pixel_positive(c, h, w):
    """Channels come in pairs (s f, t - s f): the channel-mean map is constant, a tie."""
    rng = np.random.default_rng(15)
    for bump in (+5.0, -5.0):
        f = rng.uniform(-0.5, 0.5, (h, w))
        f[1, 2] = bump  # the pixel with the largest |value| of the only component
        scales = rng.uniform(0.5, 2.0, c // 2)
        a = np.concatenate([scales[:, None, None] * f, 1.0 - scales[:, None, None] * f])
        m = eigencam(a.astype(np.float32), 1).maps[0, 0]
        assert np.unravel_index(np.abs(m).argmax(), m.shape) == (1, 2)
        assert m[1, 2] > 0


# --------------------------------------------------------------------------- n_components


def test_n_components_validation():
    a = low_rank(np.random.default_rng(16), 1, 6, 4, 4)
    assert eigencam(a, np.int64(2)).maps.shape[1] == 2
    assert eigencam(a, 6).maps.shape[1] == 6
    with pytest.raises(TypeError, match="bool"):
        eigencam(a, True)
    for bad in (0, 7, -1):
        with pytest.raises(ValueError, match=rf"n_components={bad}\b.*C=6"):
            eigencam(a, bad)
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            eigencam(a, bad)
    for bad in ("3", None, [3]):
        with pytest.raises(TypeError, match="n_components"):
            eigencam(a, bad)


def test_fractional_n_components_picks_smallest_k_max_over_batch():
    rng = np.random.default_rng(17)
    a = low_rank(rng, 4, 16, 8, 8)
    _, all_ratios, _ = textbook(a, 16)
    for target in (0.3, 0.6, 0.9):
        reached = np.cumsum(all_ratios, axis=1) >= target
        k = int((reached.argmax(axis=1) + 1).max())
        res = eigencam(a, target)
        assert res.maps.shape == (4, k, 8, 8)
        np.testing.assert_allclose(res.explained_variance_ratio, all_ratios[:, :k], atol=1e-5)
        assert rel_errors(res.maps, textbook(a, k)[0]).max() <= 1e-3


def test_components_beyond_the_rank_are_zero_maps_with_zero_ratio():
    a = low_rank(np.random.default_rng(18), 2, 10, 2, 2)  # hw = 4: centred rank <= 3
    res = eigencam(a, 8)
    assert res.maps.shape == (2, 8, 2, 2)
    assert np.all(res.maps[:, 3:] == 0) and np.all(res.explained_variance_ratio[:, 3:] == 0)
    assert np.all(np.abs(res.maps[:, :3]).max(axis=(2, 3)) > 0)
    np.testing.assert_allclose(res.explained_variance_ratio.sum(axis=1), 1.0, atol=1e-5)
    # rank-two data asked for three components: the third is a zero map
    rng = np.random.default_rng(19)
    x = rng.standard_normal((1, 32, 2)) @ rng.standard_normal((1, 2, 49))
    res = eigencam(x.reshape(1, 32, 7, 7), 3)
    assert np.all(res.maps[0, 2] == 0) and res.explained_variance_ratio[0, 2] == 0


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("value", [3.5, 0, -2, 1e-3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_constant_input_gives_zero_maps_silently(value, dtype):
    a = np.full((2, 5, 4, 6), value).astype(dtype)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        res = eigencam(a, 3)
    assert np.all(res.maps == 0) and np.all(res.explained_variance_ratio == 0)


def test_constant_sample_next_to_normal_ones():
    a = low_rank(np.random.default_rng(20), 3, 16, 6, 6)
    a[1] = 2.0
    res = eigencam(a)
    assert np.all(res.maps[1] == 0) and np.all(res.explained_variance_ratio[1] == 0)
    ref_maps, _, _ = textbook(a[[0, 2]], 3)
    assert rel_errors(res.maps[[0, 2]], ref_maps).max() <= 1e-3


def test_non_finite_values_are_zeroed_on_a_copy_with_one_warning():
    a = low_rank(np.random.default_rng(21), 3, 12, 5, 5)
    clean = eigencam(a)
    a[1, 0, 2, 2] = np.nan
    a[2, 3, 0, 0] = np.inf
    a[2, 4, 1, 1] = -np.inf
    before = a.copy()
    with pytest.warns(NonFiniteActivationsWarning, match=r"\b3 non-finite") as record:
        res = eigencam(a)
    assert len(record) == 1 and issubclass(record[0].category, RuntimeWarning)
    np.testing.assert_array_equal(a, before)  # NaNs included: the input is untouched
    assert np.isfinite(res.maps).all() and np.isfinite(res.explained_variance_ratio).all()
    np.testing.assert_allclose(res.maps[0], clean.maps[0], atol=1e-6)
    zeroed = np.where(np.isfinite(a), a, 0.0)
    ref_maps, ref_ratio, _ = textbook(zeroed, 3)
    assert rel_errors(res.maps, ref_maps).max() <= 1e-3
    np.testing.assert_allclose(res.explained_variance_ratio, ref_ratio, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_input_is_never_modified_or_shared(channels_last):
    a = low_rank(np.random.default_rng(22), 2, 16, 6, 6)
    if channels_last:
        a = np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    a[0, 1, 1, 1] = np.nan
    before = a.copy()
    with pytest.warns(NonFiniteActivationsWarning):
        res = eigencam(a, channels_last=channels_last)
    np.testing.assert_array_equal(a, before)
    assert not np.shares_memory(res.maps, a)
    assert not np.shares_memory(res.explained_variance_ratio, a)
    clean = low_rank(np.random.default_rng(22), 1, 16, 6, 6)
    res = eigencam(clean)
    res.maps[...] = 0  # results are the caller's own arrays
    assert np.any(clean != 0)


@pytest.mark.parametrize("scale, offset", [(1e25, 0.0), (1e-25, 0.0), (1.0, 1e4), (1e200, 0.0)])
def test_extreme_magnitudes_and_offsets(scale, offset):
    a = low_rank(np.random.default_rng(23), 2, 20, 6, 6).astype(np.float64)
    ref_maps, ref_ratio, _ = textbook(a, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = eigencam(a * scale + offset)
    np.testing.assert_allclose(res.explained_variance_ratio, ref_ratio, atol=1e-5)
    if scale <= 1e25:  # 1e200 maps are beyond float32 (inf), the ratios are still exact
        assert rel_errors(res.maps / np.float32(scale), ref_maps).max() <= 1e-3


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros((4, 5), np.float32), ValueError, r"4-D.*got shape \(4, 5\)"),
        (np.zeros((1, 2, 3, 4, 5), np.float32), ValueError, r"got shape \(1, 2, 3, 4, 5\)"),
        (np.zeros((0, 3, 4, 4), np.float32), ValueError, "empty"),
        (np.zeros((1, 3, 0, 4), np.float32), ValueError, "empty"),
        (np.zeros((1, 3, 4, 4), bool), TypeError, "dtype bool"),
        (np.zeros((1, 3, 4, 4), complex), TypeError, "dtype complex128"),
        (np.array([["a"]]), TypeError, "dtype"),
        ([[[1, 2], [3]]], TypeError, "activations"),
    ],
)
def test_bad_activations_are_rejected(bad, error, match):
    with pytest.raises(error, match=match):
        eigencam(bad)


def test_result_is_frozen():
    res = eigencam(low_rank(np.random.default_rng(24), 1, 4, 3, 3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.maps = np.zeros(1)  # type: ignore[misc]
    assert res.n_components == 3


def test_module_import_does_not_import_torch():
    code = "import sys, mlflow_eigencam.eigencam; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_jax_arrays_run_the_same_code_when_jax_is_installed():
    """The array API implementation at no extra code: JAX arrays (immutable) on CPU."""
    jnp = pytest.importorskip("jax.numpy")
    for shape in [(3, 16, 9, 11), (3, 96, 5, 6), (2, 256, 12, 12)]:
        a = low_rank(np.random.default_rng(0), *shape)
        ref = eigencam(a)
        res = eigencam(jnp.asarray(a))
        assert isinstance(res.maps, np.ndarray) and res.maps.dtype == np.float32
        scale = np.abs(ref.maps).max(axis=(2, 3), keepdims=True)
        assert (np.abs(res.maps - ref.maps) / scale).max() <= 1e-4  # float32 unless x64
        np.testing.assert_allclose(res.explained_variance_ratio, ref.explained_variance_ratio, atol=1e-5)


@pytest.mark.parametrize("h", [4, 7, 14, 28])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_collapsed_layer_gets_zero_maps_and_ratio_0_not_1(h, channels_last):
    """Every pixel the same channel vector (a dead or collapsed layer): no variance, so zero
    maps and ratio 0 whatever the grid and the memory layout, never the best score of 1."""
    rng = np.random.default_rng(0)
    c = 64
    v = rng.uniform(0.1, 3.0, size=(c, 1, 1)).astype(np.float32)
    a = np.concatenate([np.broadcast_to(v, (1, c, h, h)), low_rank(rng, 1, c, h, h)])
    if channels_last:
        a = np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    res = eigencam(a, 3, channels_last=channels_last)
    assert np.all(res.maps[0] == 0) and np.all(res.explained_variance_ratio[0] == 0)
    assert res.explained_variance_ratio[1, 0] > 0.1  # the other sample is untouched
    # One float32 ulp of difference is variance: it must not be called constant.
    b = np.broadcast_to(v, (1, c, h, h)).copy()
    b[0, 0, 0, 0] = np.nextafter(b[0, 0, 0, 0], np.float32(np.inf))
    assert eigencam(b, 1).explained_variance_ratio[0, 0] > 0.99
