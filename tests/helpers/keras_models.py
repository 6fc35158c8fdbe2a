"""Helpers shared by the Keras tests: seeded data, tiny models, reading MLflow back."""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import numpy as np


def make_images(n: int, height: int = 24, width: int = 40, channels: int = 3,
                n_classes: int = 3, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded shapes images ``(n, H, W, C)`` float32 in [0, 1] and int64 labels ``(n,)``."""
    from _shapes import make_shapes  # examples/_shapes.py (pytest's pythonpath; child_env)

    x, y, _ = make_shapes(n, (height, width), n_classes=n_classes, seed=seed, layout="NHWC")
    if channels == 1:
        x = x.mean(axis=-1, keepdims=True).astype(np.float32)
    return x, y


def build_cnn(input_shape=(24, 40, 3), n_classes: int = 3, seed: int = 0, dropout: bool = False):
    """A functional CNN: conv1 -> pool -> conv2 -> GAP -> (dropout) -> dense softmax."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input(input_shape, name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    if dropout:
        h = keras.layers.Dropout(0.3, name="drop")(h)
    out = keras.layers.Dense(n_classes, activation="softmax", name="head")(h)
    model = keras.Model(inp, out, name="cnn")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def build_sequential(input_shape=None, n_classes: int = 3, seed: int = 0):
    """A Sequential CNN without an Input layer (built by fit) unless ``input_shape`` is given."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = [
        keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="sconv1"),
        keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="sconv2"),
        keras.layers.GlobalAveragePooling2D(name="sgap"),
        keras.layers.Dense(n_classes, activation="softmax", name="shead"),
    ]
    if input_shape is not None:
        layers.insert(0, keras.Input(input_shape))
    model = keras.Sequential(layers, name="seq")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def build_nested(input_shape=(24, 40, 3), n_classes: int = 3, seed: int = 0):
    """A Sequential whose first layer is a functional backbone model (conv_a -> conv_b)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input(input_shape)
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_a")(inp)
    h = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv_b")(h)
    backbone = keras.Model(inp, h, name="backbone")
    model = keras.Sequential([keras.Input(input_shape), backbone,
                              keras.layers.GlobalAveragePooling2D(name="ngap"),
                              keras.layers.Dense(n_classes, activation="softmax", name="nhead")],
                             name="nested")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


# --------------------------------------------------------------------------- MLflow read back

_IMAGE_FILE = re.compile(r"^images/(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png$")


def logged_images(uri: str, run_id: str) -> Dict[str, Dict[int, np.ndarray]]:
    """``{key: {step: (H, W, 3) uint8}}`` of everything ``log_image(key=, step=)`` stored.

    MLflow stores such an image as the artifact ``images/<key with / as ~>+step+<step>+
    timestamp+<ms>+<uuid>.png`` (plus a compressed ``.webp``), see
    ``MlflowClient.log_image``.
    """
    import mlflow
    from PIL import Image

    client = mlflow.MlflowClient(uri)
    out: Dict[str, Dict[int, np.ndarray]] = {}
    for info in client.list_artifacts(run_id, "images"):
        match = _IMAGE_FILE.match(info.path)
        if match is None:
            continue
        local = client.download_artifacts(run_id, info.path)
        key = match["key"].replace("~", "/")
        out.setdefault(key, {})[int(match["step"])] = np.asarray(Image.open(local).convert("RGB"))
    return out


def artifact_paths(uri: str, run_id: str, path: str = "") -> List[str]:
    """Every artifact file under ``path``, recursively."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    files: List[str] = []
    for info in client.list_artifacts(run_id, path or None):
        if info.is_dir:
            files += artifact_paths(uri, run_id, info.path)
        else:
            files.append(info.path)
    return files


def read_png(uri: str, run_id: str, path: str) -> np.ndarray:
    import mlflow
    from PIL import Image

    local = mlflow.MlflowClient(uri).download_artifacts(run_id, path)
    return np.asarray(Image.open(local).convert("RGB"))


def find_panel(strip: np.ndarray, panel: np.ndarray) -> Optional[Tuple[int, int]]:
    """(top, left) where ``panel`` appears pixel for pixel inside ``strip``, else None."""
    ph, pw = panel.shape[:2]
    H, W = strip.shape[:2]
    for top in range(0, H - ph + 1):
        row = strip[top]
        for left in range(0, min(W - pw + 1, 16)):  # the input panel is the first one
            if np.array_equal(row[left:left + pw], panel[0]) and np.array_equal(
                    strip[top:top + ph, left:left + pw], panel):
                return top, left
    return None


def upscaled(image_hwc_float01: np.ndarray, factor: int) -> np.ndarray:
    """The uint8 RGB picture of a [0, 1] float image, upscaled by whole pixels."""
    img = np.asarray(image_hwc_float01, dtype=np.float64)
    u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if u8.ndim == 2:
        u8 = u8[:, :, None]
    if u8.shape[2] == 1:
        u8 = np.repeat(u8, 3, axis=2)
    return np.repeat(np.repeat(u8, factor, axis=0), factor, axis=1)
