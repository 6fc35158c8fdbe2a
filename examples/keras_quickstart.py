"""Keras quickstart: a tiny CNN on synthetic shapes, with EigenCAM overlays logged to MLflow.

Nothing is downloaded: the images are generated (``_shapes.py``, next to this file). Run

    python examples/keras_quickstart.py --epochs 5

then open the MLflow UI with the command it prints, and look at the run's "Images" tab
(keys ``eigencam/eval/val/sample_*``, one step per epoch) and its artifacts
(``eigencam/eval/val/epoch_*/grid.png``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shapes import SHAPES, make_shapes  # noqa: E402

N_CLASSES = 4


def build_model(size: int, seed: int):
    """conv(16) -> pool -> conv(32) -> pool -> conv(64) -> global average pool -> softmax."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.MaxPooling2D(name="pool1")(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(name="pool2")(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    outputs = keras.layers.Dense(N_CLASSES, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs, name="shapes_cnn")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow tracking URI (default: a sqlite file in the current folder)")
    parser.add_argument("--experiment", default="mlflow-eigencam-keras-quickstart")
    parser.add_argument("--n-samples", type=int, default=5, help="validation images to explain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import mlflow

    from mlflow_eigencam.keras import EigenCAMCallback

    size = 32
    x_train, y_train, _ = make_shapes(1024, size, n_classes=N_CLASSES, seed=args.seed, layout="NHWC")
    x_val, y_val, _ = make_shapes(64, size, n_classes=N_CLASSES, seed=args.seed + 1, layout="NHWC")
    model = build_model(size, args.seed)

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    # The callback explains the same n validation images at every epoch end (layer=None picks
    # conv3, the last layer with a spatial output: 8 x 8) and logs them into the active run.
    eigencam = EigenCAMCallback(validation_data=(x_val, y_val), n_samples=args.n_samples,
                                label_mapping=list(SHAPES[:N_CLASSES]))
    with mlflow.start_run(run_name="keras-quickstart") as run:
        mlflow.log_params({"epochs": args.epochs, "image_size": size, "seed": args.seed})
        history = model.fit(x_train, y_train, epochs=args.epochs, batch_size=16,
                            validation_data=(x_val, y_val), callbacks=[eigencam], verbose=2)
        for epoch, acc in enumerate(history.history["val_accuracy"]):
            mlflow.log_metric("val_accuracy", acc, step=epoch)

    print(f"\nLogged EigenCAM overlays of layer {eigencam.target_layer!r} to run {run.info.run_id}.")
    print("Open the MLflow UI with:")
    print(f"    mlflow ui --backend-store-uri {args.tracking_uri}")
    return run.info.run_id


if __name__ == "__main__":
    main()
