"""SampleBuffer: capping, copies, label handling, sample ids, errors."""

import hashlib

import numpy as np
import pytest

from mlflow_eigencam.samples import Sample, SampleBuffer, class_values, sample_id


def batch(b, seed=0, h=6, w=10, c=4):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)
    acts = rng.standard_normal((b, c, 3, 5)).astype(np.float32)
    return images, acts


# ------------------------------------------------------------------ capping and copies


def test_caps_per_key_across_batches_and_copies_only_kept_rows():
    buf = SampleBuffer(n_samples=5)
    im1, a1 = batch(3, seed=1)
    im2, a2 = batch(4, seed=2)
    assert buf.room("eval", None) == 5
    first = buf.add("eval", None, im1, a1)
    assert [s.index for s in first] == [0, 1, 2] and buf.room("eval", None) == 2
    second = buf.add("eval", None, im2, a2)
    assert [s.index for s in second] == [3, 4] and buf.room("eval", None) == 0
    assert buf.add("eval", None, *batch(2, seed=3)) == []

    kept = buf.take("eval", None)
    assert len(kept) == 5
    np.testing.assert_array_equal(np.stack([s.image for s in kept]), np.concatenate([im1, im2[:2]]))
    np.testing.assert_array_equal(np.stack([s.activations for s in kept]), np.concatenate([a1, a2[:2]]))
    for s in kept:
        assert s.image.dtype == np.uint8 and s.image.shape == (6, 10, 3)
        assert s.activations.dtype == np.float32 and s.activations.shape == (4, 3, 5)
        for src in (im1, im2, a1, a2):
            assert not np.shares_memory(s.image, src) and not np.shares_memory(s.activations, src)

    # Mutating the inputs afterwards does not change what was kept.
    before = kept[0].image.copy()
    im1[...] = 0
    np.testing.assert_array_equal(kept[0].image, before)


def test_keys_are_independent_and_take_clears():
    buf = SampleBuffer(n_samples=2)
    buf.add("eval", "ds1", *batch(3))
    buf.add("eval", None, *batch(1))
    buf.add("test", "ds1", *batch(1))
    assert buf.keys() == [("eval", "ds1"), ("eval", None), ("test", "ds1")]
    assert buf.room("eval", "ds1") == 0 and buf.room("eval", None) == 1 and buf.room("train", None) == 2
    assert len(buf.take("eval", "ds1")) == 2
    assert buf.take("eval", "ds1") == [] and buf.room("eval", "ds1") == 2
    assert buf.keys() == [("eval", None), ("test", "ds1")]
    # A new epoch starts numbering again.
    assert [s.index for s in buf.add("eval", "ds1", *batch(1))] == [0]
    buf.clear()
    assert buf.keys() == []


def test_none_keeps_everything():
    buf = SampleBuffer(n_samples=None)
    assert buf.room("eval", None) is None
    for seed in range(4):
        buf.add("eval", None, *batch(7, seed=seed))
    assert len(buf.take("eval", None)) == 28


def test_empty_batch_creates_no_key():
    buf = SampleBuffer(3)
    images, acts = batch(0)
    assert buf.add("eval", None, images, acts) == []
    assert buf.keys() == []


def test_channels_last_activations_and_chw_float_images():
    buf = SampleBuffer(2)
    images, acts = batch(2)
    chw_float = np.moveaxis(images, -1, 1).astype(np.float32) / 255.0
    kept = buf.add("eval", None, chw_float, np.moveaxis(acts, 1, -1), image_layout="CHW", channels_last=True)
    np.testing.assert_array_equal(np.stack([s.image for s in kept]), images)
    np.testing.assert_array_equal(np.stack([s.activations for s in kept]), acts)
    assert all(s.activations.flags.c_contiguous for s in kept)


def test_sample_repr_leaves_arrays_out():
    (s,) = SampleBuffer(1).add("eval", None, *batch(1), labels=[1], preds=[1])
    assert "array" not in repr(s) and "sample_id=" in repr(s)


# ------------------------------------------------------------------ sample ids


def test_sample_id_is_sha1_of_shape_and_bytes():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    expected = hashlib.sha1(b"(2, 3, 3)" + img.tobytes()).hexdigest()[:12]
    assert sample_id(img) == expected
    assert len(expected) == 12 and int(expected, 16) >= 0
    # Same bytes, other shape: another id.
    assert sample_id(img.reshape(3, 2, 3)) != expected
    # Non-contiguous views hash their pixels, not their memory layout.
    big = np.zeros((4, 6, 3), np.uint8)
    big[::2, ::2] = img
    assert sample_id(big[::2, ::2]) == expected
    with pytest.raises(TypeError, match="uint8"):
        sample_id(img.astype(np.float32))


def test_same_image_same_id_across_buffers():
    images, acts = batch(3)
    ids1 = [s.sample_id for s in SampleBuffer(3).add("eval", None, images, acts)]
    ids2 = [s.sample_id for s in SampleBuffer(5).add("test", "x", images.copy(), acts * 2)]
    assert ids1 == ids2 and len(set(ids1)) == 3


# ------------------------------------------------------------------ labels and predictions


@pytest.mark.parametrize(
    "x, expected",
    [
        (np.array([2, 0, 1]), [2, 0, 1]),
        ([2, 0, 1], [2, 0, 1]),
        (np.array([[2], [0], [1]]), [2, 0, 1]),
        (np.eye(3)[[2, 0, 1]], [2, 0, 1]),  # one-hot
        (np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]), [2, 0, 1]),  # probabilities
        (np.array([[-1.0, 0.5, 3.0], [9.0, -2.0, 0.0], [0.0, 4.0, -4.0]]), [2, 0, 1]),  # logits
        (np.array([[0.2], [0.7], [0.5]]), [0, 1, 0]),  # sigmoid column, threshold > 0.5
        (np.array([0.2, 0.7, 0.99]), [0, 1, 1]),
        (np.array([2.0, 0.0, 1.0]), [2, 0, 1]),  # integral floats are indices
        (np.array([[-1.5], [2.25], [3.0]]), ["-1.5", "2.25", 3]),  # not classes: shown as they are
        (np.array([True, False, True]), [1, 0, 1]),
        (["cat", b"dog", "bird"], ["cat", "dog", "bird"]),
        (np.array(["cat", "dog", "bird"]), ["cat", "dog", "bird"]),
        (np.array([b"cat", b"dog", b"bird"]), ["cat", "dog", "bird"]),
        (None, [None, None, None]),
    ],
)
def test_class_values(x, expected):
    got = class_values(x, 3)
    assert got == expected
    assert [type(v) for v in got] == [type(v) for v in expected]


def test_class_values_scalar_and_errors():
    assert class_values(np.int64(4), 1) == [4]
    assert class_values("cat", 1) == ["cat"]
    with pytest.raises(ValueError, match="labels have 2 entries but the batch has 3 images"):
        class_values([1, 2], 3, name="labels")
    with pytest.raises(ValueError, match="leave 4 values per sample"):
        class_values(np.zeros((3, 2, 2, 5)), 3)  # a segmentation-like output


def test_label_mapping_forms_and_correct():
    images, acts = batch(4)
    labels = np.array([0, 1, 2, 5])
    preds = np.eye(6)[[0, 2, 2, 5]]
    forms = [
        {"cat": 0, "dog": 1, "bird": 2},  # the reference's {name: index}
        {0: "cat", 1: "dog", 2: "bird"},  # {index: name}
        ["cat", "dog", "bird"],  # names by index
    ]
    for mapping in forms:
        kept = SampleBuffer(4, label_mapping=mapping).add("eval", None, images, acts, labels, preds)
        assert [s.label for s in kept] == ["cat", "dog", "bird", "5"]  # 5 is unmapped: shown as is
        assert [s.pred for s in kept] == ["cat", "bird", "bird", "5"]
        assert [s.correct for s in kept] == [True, False, True, True]


def test_text_labels_match_mapped_predictions_and_missing_gives_none():
    images, acts = batch(3)
    buf = SampleBuffer(6, label_mapping={"cat": 0, "dog": 1})
    kept = buf.add("eval", None, images, acts, labels=["cat", "dog", "cow"], preds=np.array([0, 0, 1]))
    assert [s.correct for s in kept] == [True, False, False]
    kept = buf.add("eval", None, images, acts, labels=None, preds=np.array([0, 0, 1]))
    assert [(s.label, s.pred, s.correct) for s in kept] == [
        (None, "cat", None),
        (None, "cat", None),
        (None, "dog", None),
    ]


def test_only_kept_rows_of_labels_are_interpreted():
    # The third row would be a bad label; it is past the cap, so it is never looked at.
    images, acts = batch(3)
    kept = SampleBuffer(2).add("eval", None, images, acts, labels=[1, 2, object()])
    assert [s.label for s in kept] == ["1", "2"]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "n, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("5", TypeError), (True, TypeError)]
)
def test_bad_n_samples(n, exc):
    with pytest.raises(exc, match=repr(n).replace(".", r"\.")):
        SampleBuffer(n)


def test_batch_size_mismatch_names_the_sizes():
    images, acts = batch(4)
    with pytest.raises(ValueError, match="images=4, activations=3"):
        SampleBuffer().add("eval", None, images, acts[:3])
    with pytest.raises(ValueError, match="images=4, activations=4, labels=4, preds=2"):
        SampleBuffer().add("eval", None, images, acts, labels=[0] * 4, preds=[0, 1])


def test_wrong_ndim_and_types():
    images, acts = batch(2)
    with pytest.raises(ValueError, match=r"activations must be \(B, C, h, w\), got shape \(2, 4, 15\)"):
        SampleBuffer().add("eval", None, images, acts.reshape(2, 4, 15))
    with pytest.raises(ValueError, match="images must be a batch"):
        SampleBuffer().add("eval", None, images[0, 0, 0], acts)
    with pytest.raises(TypeError, match="mode must be a string, got 1"):
        SampleBuffer().add(1, None, images, acts)
    with pytest.raises(TypeError, match="ds_id must be a string or None, got 3"):
        SampleBuffer().add("eval", 3, images, acts)


def test_bad_label_mapping():
    with pytest.raises(TypeError, match="label_mapping"):
        SampleBuffer(label_mapping="cat,dog")
    with pytest.raises(ValueError, match="maps 0 to both"):
        SampleBuffer(label_mapping={"cat": 0, "kitty": 0})


def test_sample_is_a_dataclass_with_the_contract_fields():
    assert list(Sample.__dataclass_fields__) == [
        "index", "image", "activations", "label", "pred", "correct", "sample_id",
        "pred_boxes", "label_boxes", "map_extent", "pred_mask", "label_mask", "iou", "pred_score",
    ]


def test_a_none_label_stays_none_and_is_neither_right_nor_wrong():
    # Labels unknown for some samples: never the text "None", never counted as wrong.
    assert class_values([None, 1, None], 3) == [None, 1, None]
    assert class_values(np.array([None, "cat"], dtype=object), 2) == [None, "cat"]
    assert class_values((None, None), 2) == [None, None]
    buf = SampleBuffer(n_samples=3, label_mapping=["circle", "square", "tri"])
    kept = buf.add("eval", None, *batch(3), labels=[None, 1, None], preds=np.array([0, 1, 1]))
    assert [(s.label, s.pred, s.correct) for s in kept] == [
        (None, "circle", None), ("square", "square", True), (None, "square", None)]


def test_pred_scores_are_kept_as_given_and_reach_the_table():
    """The caller's probability of the predicted class, not recomputed (no softmax): the
    sample keeps it, the table writes it in ``confidence``; boxes and masks refuse it."""
    from mlflow_eigencam import _table

    buf = SampleBuffer(n_samples=2, label_mapping=["cat", "dog"])
    probs = np.array([[0.13, 0.87], [0.6, 0.4]])
    images, acts = np.zeros((2, 8, 8, 3), np.uint8), np.ones((2, 2, 4, 4), np.float32)
    kept = buf.add("eval", None, images, acts, [1, 1], probs, pred_scores=probs.max(axis=1))
    assert [(s.pred, s.pred_score) for s in kept] == [("dog", 0.87), ("cat", 0.6)]
    rows = [_table.row(0, s, np.array([1.0]), "") for s in kept]
    table = _table.loads(_table.to_json(rows))
    assert table["columns"][:7] == ["epoch", "sample_index", "sample_id", "label", "prediction", "correct",
                                    "confidence"]
    assert [r[6] for r in table["data"]] == [0.87, 0.6]
    with pytest.raises(ValueError, match="batch sizes differ"):
        SampleBuffer().add("eval", None, images, acts, None, probs, pred_scores=[0.9])
    boxes = [{"boxes": np.zeros((0, 4))}] * 2
    with pytest.raises(ValueError, match="class predictions"):
        SampleBuffer().add("eval", None, images, acts, None, boxes, pred_scores=[0.9, 0.8])


def test_detections_with_a_mask_keep_both():
    """An instance segmenter's dicts with a ``"mask"``: boxes and mask on one sample, named
    by the mask's classes."""
    buf = SampleBuffer(label_mapping=["background", "cat"])
    mask = np.zeros((8, 8), np.int32)
    mask[2:5, 2:5] = 1
    preds = [{"boxes": np.array([[2.0, 2.0, 5.0, 5.0]]), "scores": np.array([0.9]), "labels": np.array([1]),
              "mask": mask}]
    (s,) = buf.add("eval", None, np.zeros((1, 8, 8, 3), np.uint8), np.ones((1, 2, 4, 4), np.float32),
                   mask[None], preds)
    assert s.pred == "background, cat" and s.pred_boxes.names == ("cat",) and s.iou == 1.0
    np.testing.assert_array_equal(s.pred_mask.classes, mask)
    with pytest.raises(ValueError, match="'mask'"):
        SampleBuffer().add("eval", None, np.zeros((1, 8, 8, 3), np.uint8), np.ones((1, 2, 4, 4), np.float32),
                           None, [dict(preds[0], mask=np.zeros((3, 3), np.int32))])
