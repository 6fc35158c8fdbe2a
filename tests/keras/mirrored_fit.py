"""Fit under tf.distribute.MirroredStrategy on two logical CPUs (run as its own process).

Logical devices can only be configured before TensorFlow initialises its runtime, so
test_mirrored.py runs this file in a fresh interpreter:

    python mirrored_fit.py TRACKING_URI

It prints one JSON line: the run id, the number of replicas and the final loss.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402
import mlflow  # noqa: E402

from mlflow_eigencam.keras import EigenCAMCallback  # noqa: E402
from tests.helpers.keras_models import build_cnn, make_images  # noqa: E402


def main(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    x, y = make_images(32)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build_cnn()
    cb = EigenCAMCallback(validation_data=(x[24:], y[24:]), n_samples=3)
    with mlflow.start_run() as run:
        history = model.fit(x[:24], y[:24], epochs=2, batch_size=8, verbose=0,
                            validation_data=(x[24:], y[24:]), callbacks=[cb])
    print(json.dumps({"run_id": run.info.run_id, "replicas": strategy.num_replicas_in_sync,
                      "loss": history.history["loss"][-1],
                      "keras_backend": keras.backend.backend()}))


if __name__ == "__main__":
    main(sys.argv[1])
