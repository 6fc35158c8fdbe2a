"""One worker of a 2-worker tf.distribute.MultiWorkerMirroredStrategy job (its own process).

test_multiworker.py starts two of these on 127.0.0.1, each with its TF_CONFIG:

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:P0", "127.0.0.1:P1"]},
                "task": {"type": "worker", "index": I}}' python multiworker_fit.py URI

Keras 3's ``fit`` does not run under MultiWorkerMirroredStrategy with two workers (it fails
inside Keras before any callback is called: keras-team/keras#20585, tensorflow#72388), so
this is the custom training loop such jobs use, calling the callback's hooks. Every worker
runs the same script with the same callback; only worker 0 (the chief) starts an MLflow
run, and the callback knows the chief from TF_CONFIG and logs there only. Prints one JSON
line.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2  # noqa: E402
from tensorflow.python.eager import context  # noqa: E402

# The strategy's coordination service declares a worker dead after 10 s without a heartbeat,
# which a loaded 2-core CI machine can miss; configured first, the strategy keeps this one.
context.context().configure_coordination_service(
    service_type="standalone", service_leader="/job:worker/replica:0/task:0",
    coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=2)],
    heartbeat_timeout_in_ms=120_000)
# Before any other TensorFlow call: the strategy must be built first.
strategy = tf.distribute.MultiWorkerMirroredStrategy()

import keras  # noqa: E402
import mlflow  # noqa: E402

from mlflow_eigencam.keras import EigenCAMCallback  # noqa: E402
from tests.helpers.keras_models import build_cnn, make_images  # noqa: E402


def main(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    chief = task["type"] == "worker" and task["index"] == 0
    x, y = make_images(32)
    global_batch = 8
    with strategy.scope():
        model = build_cnn()
        optimizer = keras.optimizers.SGD(0.05)
        optimizer.build(model.trainable_variables)
    train = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x[:24], y[:24])).batch(global_batch))

    @tf.function
    def train_step(xb, yb):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                pred = model(xb, training=True)
                per_sample = keras.losses.sparse_categorical_crossentropy(yb, pred)
                loss = tf.reduce_sum(per_sample) / global_batch
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce("SUM", strategy.run(replica_step, args=(xb, yb)), axis=None)

    # Every worker runs the same loop and calls the same hooks; only the chief logs.
    cb = EigenCAMCallback(validation_data=(x[24:], y[24:]), n_samples=3)
    cb.set_model(model)
    run_id = None
    if chief:
        run_id = mlflow.start_run().info.run_id
    losses = []
    left = -1
    try:
        cb.on_train_begin()
        for epoch in range(2):
            losses.append(float(sum(train_step(xb, yb) for xb, yb in train)))
            cb.on_epoch_end(epoch)
        left = cb.close()  # what was not delivered: 0 on the chief once all arrived, 0 elsewhere
    finally:
        if chief:
            mlflow.end_run()
    print(json.dumps({"index": task["index"], "run_id": run_id, "logger": cb.logger is not None,
                      "replicas": strategy.num_replicas_in_sync, "loss": losses[-1],
                      "undelivered": int(left)}))


if __name__ == "__main__":
    main(sys.argv[1])
