"""Taking the pinned samples from the forms of data Keras accepts, without consuming them."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlflow_eigencam.keras import EigenCAMCallback, take_samples
from mlflow_eigencam.sink import EigenCAMWarning
from tests.helpers.keras_models import make_images


class Batches(keras.utils.PyDataset):
    """A PyDataset of (x, y) batches that records which indices were read."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.read = []

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i):
        self.read.append(i)
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[s], self.y[s]


def test_numpy_tuples_take_the_first_n(data):
    x, y = data
    s = take_samples((x, y), 5)
    np.testing.assert_array_equal(s.x, x[:5])
    np.testing.assert_array_equal(s.y, y[:5])
    s = take_samples((x, y, np.ones(len(x))), 7)  # sample weights are ignored
    assert s.x.shape == (7, 24, 40, 3) and s.y.tolist() == y[:7].tolist()
    s = take_samples(x, 3)  # images alone
    assert s.y is None and s.x.shape == (3, 24, 40, 3)
    # A copy: later changes to the user's arrays do not change the pinned samples.
    x2 = x.copy()
    s = take_samples((x2, y), 2)
    x2[:2] = 0
    np.testing.assert_array_equal(s.x, x[:2])


def test_n_samples_none_takes_everything(data):
    x, y = data
    assert len(take_samples((x, y), None).x) == len(x)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)  # 48 = 9 full batches + 3
    s = take_samples(ds, None)
    np.testing.assert_array_equal(s.x, x)
    np.testing.assert_array_equal(s.y, y)


def test_dataset_across_batch_boundaries_and_not_consumed(data):
    x, y = data
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    s = take_samples(ds, 6)  # one and a half batches
    np.testing.assert_array_equal(s.x, x[:6])
    np.testing.assert_array_equal(s.y, y[:6])
    # The dataset still yields everything from the start.
    again = np.concatenate([b[0] for b in ds.as_numpy_iterator()])
    np.testing.assert_array_equal(again, x)


def test_dataset_of_images_only_and_infinite(data):
    x, _ = data
    s = take_samples(tf.data.Dataset.from_tensor_slices(x).batch(8), 3)
    assert s.y is None
    np.testing.assert_array_equal(s.x, x[:3])
    infinite = tf.data.Dataset.from_tensor_slices(x).batch(8).repeat()
    assert len(take_samples(infinite, 10).x) == 10
    with pytest.raises(ValueError, match="infinite"):
        take_samples(infinite, None)


def test_pydataset_is_indexed_from_zero_only_as_far_as_needed(data):
    x, y = data
    pyds = Batches(x, y, batch_size=4)
    s = take_samples(pyds, 5)
    np.testing.assert_array_equal(s.x, x[:5])
    assert pyds.read == [0, 1]
    assert len(take_samples(pyds, None).x) == len(x)


def test_generators_are_refused_at_construction_and_left_untouched(data, tracking_uri):
    x, y = data

    def gen():
        for i in range(0, len(x), 8):
            yield x[i:i + 8], y[i:i + 8]

    g = gen()
    with pytest.raises(TypeError, match=r"one-shot iterator.*generator function itself \(gen, not gen\(\)\)"):
        EigenCAMCallback(validation_data=g)
    first = next(g)  # nothing was read from it
    np.testing.assert_array_equal(first[0], x[:8])
    with pytest.raises(TypeError, match="one-shot iterator"):
        EigenCAMCallback(validation_data=iter([(x, y)]))


def test_bad_data_is_named(data):
    x, y = data
    with pytest.raises(ValueError, match=r"shape \(48, 2880\)"):
        take_samples((x.reshape(48, -1), y), 2)
    with pytest.raises(TypeError, match="multi-input"):
        take_samples(({"a": x}, y), 2)
    with pytest.raises(TypeError, match="int"):
        take_samples(3, 2)
    with pytest.raises(ValueError, match="no samples"):
        take_samples((x[:0], y[:0]), 2)


def test_fit_data_validation_split_matches_keras(data):
    x, y = data
    cb = EigenCAMCallback(n_samples=4)
    cb._set_fit_data(x=x, y=y, validation_split=0.25)
    eval_samples = cb._sources()[("eval", None)]
    # Keras keeps the last 25 % for validation: floor(48 * 0.75) = 36.
    np.testing.assert_array_equal(eval_samples.x, x[36:40])
    np.testing.assert_array_equal(eval_samples.y, y[36:40])
    assert ("train", None) not in cb._sources()  # mode "!train"


def test_fit_data_train_samples_and_explicit_data_wins(data):
    x, y = data
    xv, yv = make_images(6, seed=3)
    cb = EigenCAMCallback(validation_data=(xv, yv), n_samples=3, mode=None)
    cb._set_fit_data(x=x, y=y, validation_data=(x[40:], y[40:]))
    sources = cb._sources()
    np.testing.assert_array_equal(sources[("eval", None)].x, xv[:3])  # the callback's own
    np.testing.assert_array_equal(sources[("train", None)].x, x[:3])
    # A dataset given to fit as x yields (x, y) batches.
    cb2 = EigenCAMCallback(n_samples=2, mode="train")
    cb2._set_fit_data(x=tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
    np.testing.assert_array_equal(cb2._sources()[("train", None)].y, y[:2])


def test_fit_data_generator_warns_and_never_raises(data):
    x, y = data

    def gen():
        yield x[:8], y[:8]

    g = gen()
    cb = EigenCAMCallback()
    with pytest.warns(EigenCAMWarning, match="one-shot iterator"):
        cb._set_fit_data(x=x, y=y, validation_data=g)
    assert cb._sources() == {}
    assert next(g)[0].shape == (8, 24, 40, 3)  # not consumed


def test_train_data_with_a_mode_that_filters_it_warns(data):
    x, y = data
    with pytest.warns(EigenCAMWarning, match="train_data is not used"):
        cb = EigenCAMCallback(train_data=(x, y))
    assert cb._sources() == {}


def test_several_validation_sets_by_ds_id(data):
    x, y = data
    cb = EigenCAMCallback(validation_data={"a": (x[:4], y[:4]), "b": (x[4:8], y[4:8])},
                          n_samples=2, ds_id="!b")
    assert set(cb._sources()) == {("eval", "a")}


def test_bad_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="n_samples"):
        EigenCAMCallback(n_samples=0)
    with pytest.raises(ValueError, match="mode"):
        EigenCAMCallback(mode="validate")
    with pytest.raises(TypeError, match="channels_last"):
        EigenCAMCallback(channels_last=False)
    with pytest.raises(TypeError, match="layer"):
        EigenCAMCallback(layer=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EigenCAMCallback()  # no data yet is fine (autolog gives it later)


def test_a_generator_function_is_called_once_and_its_generator_closed(data, tracking_uri):
    x, y = data
    calls, closed = [], []

    def gen():
        calls.append(1)
        try:
            for i in range(0, len(x), 4):
                yield x[i:i + 4], y[i:i + 4]
        finally:
            closed.append(1)

    cb = EigenCAMCallback(validation_data=gen, n_samples=6)
    pinned = cb._sources()[("eval", None)]
    np.testing.assert_array_equal(pinned.x, x[:6])  # across a batch boundary
    np.testing.assert_array_equal(pinned.y, y[:6])
    assert calls == [1] and closed == [1]
    with pytest.raises(ValueError, match="may never end.*n_samples=<int>"):
        EigenCAMCallback(validation_data=gen, n_samples=None)
    with pytest.raises(TypeError, match=r"gen2\(\) returned a int"):
        take_samples(lambda: 3, 2, what="gen2")
