"""metrics: per-epoch signals (update / summary / reset); map_change's storage rule."""

from __future__ import annotations

import numpy as np
import pytest

from mlflow_eigencam.metrics import MapChange, map_change


def test_map_change_against_the_previous_logged_epoch_only():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 6, 6))
    m = MapChange()
    assert m.update("k", "s", a) is None and m.summary("k") is None  # first epoch
    m.reset("k", logged=True)
    c = m.update("k", "s", b)
    assert c == pytest.approx(map_change(a, b), abs=2e-3)
    assert m.summary("k") == pytest.approx(c)
    m.reset("k", logged=False)  # a discarded epoch: a stays the reference
    assert m.update("k", "s", b) == pytest.approx(map_change(a, b), abs=2e-3)
    assert m.update("other", "s", b) is None  # per key


def test_previous_maps_are_kept_scaled_to_one_in_float16():
    """Maps of large activations (values ~2e5) overflow float16 raw: stored scaled, the
    drift stays finite and right."""
    rng = np.random.default_rng(1)
    a, b = 2e5 * rng.random((2, 7, 7)).astype(np.float32)
    m = MapChange()
    m.update("k", "s", a)
    m.reset("k", logged=True)
    kept = m._previous["k"]["s"]
    assert kept.dtype == np.float16 and float(np.max(np.abs(kept))) == pytest.approx(1.0)
    c = m.update("k", "s", b)
    assert np.isfinite(c) and c == pytest.approx(map_change(a, b), abs=2e-3)


# -- localization -----------------------------------------------------------------------------

from mlflow_eigencam.metrics import (  # noqa: E402
    Localization,
    SampleMean,
    faithfulness_scores,
    localization,
    perturbed_batch,
    top_masks,
    true_region,
    upsample,
)


def test_true_region_takes_pixel_centres_inside_boxes_and_joins_the_mask():
    region = true_region(6, 8, boxes=[[2, 1, 5, 3]])
    assert region.shape == (6, 8) and region.sum() == 3 * 2
    assert region[1:3, 2:5].all()
    mask = np.zeros((6, 8), bool)
    mask[5, 7] = True
    assert true_region(6, 8, boxes=[[2, 1, 5, 3]], mask=mask).sum() == 7
    assert true_region(6, 8) is None
    assert true_region(6, 8, boxes=[[-5, -5, 100, 100]]).all()  # clipped to the image
    with pytest.raises(ValueError, match="boxes must be"):
        true_region(6, 8, boxes=[[1, 2, 3]])
    with pytest.raises(ValueError, match=r"mask must be the image's size \(6, 8\)"):
        true_region(6, 8, mask=np.ones((8, 6)))


def test_a_map_exactly_on_the_box_gives_localization_1_and_a_hit():
    heat = np.zeros((32, 32), np.float32)
    heat[8:16, 4:20] = 1.0
    heat[12, 10] = 2.0
    share, hit = localization(heat, true_region(32, 32, boxes=[[4, 8, 20, 16]]))
    assert share == pytest.approx(1.0) and hit is True
    share, hit = localization(heat, true_region(32, 32, boxes=[[24, 24, 32, 32]]))
    assert share == pytest.approx(0.0) and hit is False


def test_half_the_mass_inside_and_empty_or_flat_maps():
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0], heat[3, 3] = 1.0, 1.0
    share, hit = localization(heat, true_region(4, 4, boxes=[[0, 0, 1, 1]]))
    assert share == pytest.approx(0.5) and hit is True  # first peak, row-major
    assert localization(np.zeros((4, 4)), true_region(4, 4, boxes=[[0, 0, 1, 1]])) == (None, None)
    share, hit = localization(np.ones((4, 4)), true_region(4, 4, boxes=[[0, 0, 2, 2]]))
    assert share == pytest.approx(0.25) and hit is None  # a flat map has no peak


def test_upsample_is_the_renderers_geometry_with_and_without_extent():
    """The map the signals score is the one the card shows: the renderer's heat is the
    colormap of upsample's values min-max normalised (detector extent too)."""
    from mlflow_eigencam.render.heat import _colormap_rgb, _heat_rgb

    rng = np.random.default_rng(3)
    cam = rng.normal(size=(5, 7)).astype(np.float32)
    for extent in (None, (0.8, 0.6)):
        up = upsample(cam, 30, 44, extent)
        assert up.shape == (30, 44) and up.dtype == np.float32 and up.min() >= 0
        norm = np.rint((up - up.min()) * (255.0 / (up.max() - up.min()))).astype(np.uint8)
        np.testing.assert_array_equal(_colormap_rgb(2)[norm], _heat_rgb(cam, 44, 30, 2, extent))


def test_localization_signal_means_per_key_and_resets():
    loc = Localization()
    heat = np.zeros((8, 8), np.float32)
    heat[:4, :4] = 1
    inside, outside = true_region(8, 8, boxes=[[0, 0, 4, 4]]), true_region(8, 8, boxes=[[4, 4, 8, 8]])
    assert loc.update("k", heat, inside) == (1.0, True)
    assert loc.update("k", heat, outside) == (0.0, False)
    assert loc.update("k", heat, None) == (None, None)  # no true region: not counted
    assert loc.summary("k") == (pytest.approx(0.5), pytest.approx(0.5))
    assert loc.summary("other") == (None, None)
    loc.reset("k", logged=True)
    assert loc.summary("k") == (None, None)
    mean = SampleMean()
    assert mean.update("k", float("nan")) is None and mean.summary("k") is None


# -- faithfulness -------------------------------------------------------------------------------

def test_top_masks_take_exactly_the_fraction_even_with_ties():
    heat = np.zeros((2, 10, 10), np.float32)
    heat[0, :3, :] = 1.0
    masks = top_masks(heat, (0.1, 0.5))
    assert masks.shape == (2, 2, 10, 10)
    assert masks.reshape(2, 2, -1).sum(axis=2).tolist() == [[10, 10], [50, 50]]
    assert masks[0, 0, :3].sum() == 10 and masks[0, 0, 0].all()


def test_perturbed_batch_keeps_and_drops_the_top_in_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    heat = np.zeros((2, 16, 16), np.float32)
    heat[:, :8] = 1.0  # the top half ranks first
    batch = perturbed_batch(x, heat, (0.5,))
    assert batch.shape == (6, 3, 16, 16) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[:2], x)
    keep, drop = batch[2:4], batch[4:6]
    np.testing.assert_array_equal(keep[..., :8, :], x[..., :8, :])
    np.testing.assert_array_equal(drop[..., 8:, :], x[..., 8:, :])
    assert not np.allclose(keep[..., 8:, :], x[..., 8:, :])  # blurred
    with pytest.raises(ValueError, match="must agree"):
        perturbed_batch(x, heat[:, :8], (0.5,))
    with pytest.raises(ValueError, match="fractions must be numbers in"):
        perturbed_batch(x, heat, (1.5,))


def _faithfulness_of(model, x, heat, fractions=(0.1, 0.25, 0.5)):
    batch = perturbed_batch(x, heat, fractions)
    return faithfulness_scores(model(batch), x.shape[0])


def _patch_images(n=4, size=32):
    """Noise images with a bright 8x8 patch; the maps sit on the patch."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.1, size=(n, 1, size, size)).astype(np.float32)
    heat = np.zeros((n, size, size), np.float32)
    for i in range(n):
        y0, x0 = rng.integers(0, size - 8, size=2)
        x[i, 0, y0:y0 + 8, x0:x0 + 8] += 3.0
        heat[i, y0:y0 + 8, x0:x0 + 8] = 1.0
    return x, heat


def test_a_model_that_reads_the_top_region_is_faithful_and_one_that_ignores_it_is_not():
    x, heat = _patch_images()
    # Class 1's logit: how bright the image's brightest pixels are (the patch).
    def reads_patch(b):
        peak = b.reshape(len(b), -1).max(axis=1)
        return np.stack([np.zeros_like(peak), 4 * (peak - 1.5)], axis=1)

    def ignores_image(b):
        return np.tile([[0.0, 2.0]], (len(b), 1))

    faithful = _faithfulness_of(reads_patch, x, heat)
    assert faithful.shape == (4,) and (faithful > 0.5).all()
    np.testing.assert_allclose(_faithfulness_of(ignores_image, x, heat), 0.0, atol=1e-12)


def test_faithfulness_scores_need_class_scores():
    assert faithfulness_scores(np.zeros((7, 1)), 1) is None  # one column: no class
    assert faithfulness_scores(np.zeros((6, 3)), 1) is None  # not (1 + 2F) n rows
    assert faithfulness_scores(np.zeros(7), 1) is None
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])  # clean, keep, drop
    assert faithfulness_scores(probs, 1, probabilities=True) == pytest.approx([0.5])
    assert faithfulness_scores(probs, 1) == pytest.approx([0.5])  # rows summing to 1: probabilities
    logits = np.log(probs) + 3.0  # not probabilities: softmax taken
    assert faithfulness_scores(logits, 1) == pytest.approx([0.5])


# -- fixation, stable_epoch, alarms ---------------------------------------------------------------

from mlflow_eigencam.errors import EigenCAMWarning  # noqa: E402
from mlflow_eigencam.metrics import (  # noqa: E402
    FIXATION_ALARM, Fixation, StableEpoch, Watch, alarms, fixation)


def _peaked(cells, size=8, seed=0):
    """One (size, size) map per (row, col): a peak of 1 there over noise of 0.05."""
    rng = np.random.default_rng(seed)
    maps = []
    for r, c in cells:
        m = rng.uniform(0, 0.05, size=(size, size))
        m[r, c] = 1.0
        maps.append(m)
    return maps


def test_identical_peaks_give_high_fixation_and_moving_peaks_low():
    same = fixation(_peaked([(1, 1)] * 5))
    assert all(v > 0.9 for v in same)
    moving = fixation(_peaked([(0, 0), (0, 7), (7, 0), (7, 7), (4, 3)]))
    assert all(v < 0.1 for v in moving)
    # One sample off the common place scores low, the others still high.
    mixed = fixation(_peaked([(1, 1)] * 4 + [(6, 6)]))
    assert all(v > 0.6 for v in mixed[:4]) and mixed[4] < 0.1


def test_fixation_compares_maps_of_other_sizes_and_skips_what_it_cannot_score():
    big = np.zeros((16, 16))
    big[2:4, 2:4] = 1.0  # the same place as cell (1, 1) of an 8 x 8 map
    values = fixation(_peaked([(1, 1)] * 3) + [big, None, np.zeros((8, 8)), -np.ones((8, 8))])
    assert all(v > 0.8 for v in values[:4]) and values[4:] == [None, None, None]
    assert fixation(_peaked([(1, 1)])) == [None]  # one map: nothing to compare with
    assert fixation([]) == []


def test_fixation_signal_scores_per_key_against_the_others_and_resets():
    fix = Fixation()
    for i, m in enumerate(_peaked([(1, 1)] * 4)):
        fix.update("a", f"s{i}", m)
    fix.update("a", "none", None)
    for i, m in enumerate(_peaked([(0, 0), (7, 7)])):
        fix.update("b", f"s{i}", m)
    assert set(fix.values("a")) == {"s0", "s1", "s2", "s3", "none"} and fix.values("a")["none"] is None
    assert fix.summary("a") > 0.9 and fix.summary("b") < 0.1
    fix.reset("a", logged=True)
    assert fix.summary("a") is None and fix.values("a") == {}


def test_stable_epoch_is_the_first_after_which_map_change_stays_low_and_can_move():
    st = StableEpoch(0.05)
    st.update("k", 0, None)
    assert st.value("k") is None and st.run_value() is None
    for epoch, change in ((1, 0.4), (2, 0.2), (3, 0.03), (4, 0.01)):
        st.update("k", epoch, change)
    assert st.value("k") == 2 and st.run_value() == 2
    st.update("k", 5, 0.3)  # the maps move again: no stable epoch
    assert st.value("k") is None and st.run_value() is None
    st.update("k", 6, 0.02)
    assert st.value("k") == 5
    st.update("other", 6, None)  # logged once: no verdict, left out of the run's value
    assert st.run_value() == 5
    st.update("other", 7, 0.01)
    assert st.run_value() == 6  # the latest of the keys'


def test_alarms_cross_the_documented_thresholds_only_while_accuracy_is_high():
    per = {"fixation": {"a": 0.95, "b": 0.5, "c": None, "d": 0.9},
           "localization": {"a": 0.1, "b": 0.6}}
    found = alarms({"fixation": 0.85, "localization": 0.2}, per, 1.0)
    assert found == [("fixation", 0.85, ">=", FIXATION_ALARM, ["a", "d"]),
                     ("localization", 0.2, "<", 0.3, ["a"])]
    assert alarms({"fixation": 0.85}, per, 0.25) == []  # a model that guesses
    assert alarms({"fixation": 0.85}, per, None) == []  # accuracy unknown
    assert alarms({"fixation": 0.5, "localization": None}, per, 1.0) == []
    two = {"fixation": {"a": 0.95, "b": 0.9}}  # two maps correlate by chance
    assert alarms({"fixation": 0.92}, two, 1.0) == []


def test_watch_tags_stable_epoch_and_warns_one_alarm_per_signal_and_key():
    watch = Watch(0.05)
    rows = [{"sample_id": f"s{i}", "correct": True, "fixation": 0.9} for i in range(3)]
    key = ("eval", "val")
    assert watch.epoch(0, key, rows[:0], None, None, None) == {}
    with pytest.warns(EigenCAMWarning, match=r"alarm: epoch 1: fixation 0.90 >= 0.8 on "
                                             r"mode='eval' ds_id='val' \(samples: s0, s1, s2\)"):
        tags = watch.epoch(1, key, rows, 0.01, None, 0.9)
    assert tags["mlflow_eigencam.stable_epoch"] == "0"
    assert tags["mlflow_eigencam.alarm"].startswith("epoch 1: fixation 0.90 >= 0.8")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no tag change
        assert watch.epoch(2, key, rows, 0.02, None, 0.95) == {}
        assert watch.epoch(3, key, rows[:0], 0.5, None, None) == {"mlflow_eigencam.stable_epoch": "none"}


def test_the_new_metric_and_tags_are_the_packages_own():
    from mlflow_eigencam import _layout

    assert _layout.is_own_metric_key(_layout.signal_key("eval", "val", _layout.SIGNAL_FIXATION))
    assert _layout.SIGNAL_FIXATION in _layout.TABLE_SIGNAL_COLUMNS
    assert _layout.is_own_tag_key(_layout.TAG_STABLE_EPOCH) and _layout.is_own_tag_key(_layout.TAG_ALARM)
    assert (_layout.TAG_STABLE_EPOCH, _layout.TAG_ALARM) == ("mlflow_eigencam.stable_epoch",
                                                            "mlflow_eigencam.alarm")
