"""integrations/keras_data.py: taking samples from the forms of data Keras accepts, once,
without consuming them."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlflow_eigencam.integrations.keras_data import Samples, split_at, take_samples


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


def test_a_function_must_return_batches_and_a_generator_object_is_refused(data):
    x, y = data
    with pytest.raises(TypeError, match=r"gen2\(\) returned a int"):
        take_samples(lambda: 3, 2, what="gen2")
    with pytest.raises(TypeError, match="one-shot iterator"):
        take_samples(iter([(x, y)]), 2)
    with pytest.raises(ValueError, match="may never end"):
        take_samples(lambda: iter([(x, y)]), None)


def test_samples_is_the_public_return_type_and_split_at_matches_fit(data):
    x, y = data
    assert isinstance(take_samples((x, y), 2), Samples)
    # fit(validation_split=0.25) keeps the last 25 % for validation: floor(48 * 0.75) = 36.
    assert split_at(48, 0.25) == 36 and split_at(10, 0.0) == 10
