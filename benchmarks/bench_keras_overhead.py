"""Overhead of EigenCAMCallback (default settings) on a small CNN's Keras fit.

Runs ``model.fit`` on synthetic shapes with and without the callback, interleaved
(A B B A ...) so that drifts in machine load hit both arms alike, and prints the medians and
the overhead in percent. Everything the callback costs is inside the timed region: the probe
forward pass at each epoch end, EigenCAM and rendering, the background upload to a local
sqlite MLflow store, and the final flush in ``on_train_end``.

    python benchmarks/bench_keras_overhead.py              # target: overhead <= 3 %
    python benchmarks/bench_keras_overhead.py --repeats 7 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import keras  # noqa: E402
import mlflow  # noqa: E402

from mlflow_eigencam.keras import EigenCAMCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _shapes import make_shapes  # noqa: E402


def build_model(size: int, seed: int):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(4, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


class Clock(keras.callbacks.Callback):
    """Epoch wall times, and the time spent between ``before`` and this one at epoch end.

    Placed as ``[before, EigenCAMCallback, clock]``: Keras calls callbacks in list order, so
    ``hook_times`` is what the EigenCAM callback costs the training thread at each epoch end.
    """

    def __init__(self, before: "Clock | None" = None) -> None:
        super().__init__()
        self.before = before
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self.t_begin = self.t_end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.t_begin = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.t_end = time.perf_counter()
        self.times.append(self.t_end - self.t_begin)
        if self.before is not None:
            self.hook_times.append(self.t_end - self.before.t_end)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=8192)
    parser.add_argument("--n-val", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed fit")
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per arm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-keras-eigencam-"))
    os.chdir(workdir)  # MLflow's ./mlruns artifact root lands here
    os.environ.setdefault("MLFLOW_EIGENCAM_SPOOL_DIR", str(workdir / "spool"))
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("bench-keras-overhead")

    x, y, _ = make_shapes(args.n_train, args.size, n_classes=4, seed=args.seed, layout="NHWC")
    xv, yv, _ = make_shapes(args.n_val, args.size, n_classes=4, seed=args.seed + 1, layout="NHWC")
    model = build_model(args.size, args.seed)
    fit_kwargs = dict(batch_size=args.batch_size, validation_data=(xv, yv), verbose=0)

    def timed_fit(with_callback: bool) -> tuple[float, float, list[float], list[float]]:
        before = Clock()
        clock = Clock(before)
        middle = [EigenCAMCallback(validation_data=(xv, yv))] if with_callback else []
        with mlflow.start_run():
            t0, c0 = time.perf_counter(), time.process_time()
            model.fit(x, y, epochs=args.epochs, callbacks=[before, *middle, clock], **fit_kwargs)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        return elapsed, cpu, clock.times, clock.hook_times

    # Warm-up: tracing of the train / test functions, the probe, MLflow's first writes.
    timed_fit(True)
    timed_fit(False)

    walls: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    epochs: dict[bool, list[float]] = {True: [], False: []}
    hooks: list[float] = []
    for r in range(args.repeats):
        for arm in ((False, True) if r % 2 == 0 else (True, False)):
            wall, cpu, per_epoch, hook = timed_fit(arm)
            walls[arm].append(wall)
            cpus[arm].append(cpu)
            epochs[arm].extend(per_epoch)
            if arm:
                hooks.extend(hook)
            print(f"repeat {r}: {'with   ' if arm else 'without'} callback {wall:7.3f} s wall "
                  f"{cpu:7.3f} s cpu (epochs {', '.join(f'{t:.3f}' for t in per_epoch)})", flush=True)

    def pct(a: float, b: float) -> str:
        return f"{(a / b - 1.0) * 100.0:+.2f} %"

    med = {k: statistics.median(v) for k, v in (("wall0", walls[False]), ("wall1", walls[True]),
                                                 ("cpu0", cpus[False]), ("cpu1", cpus[True]),
                                                 ("ep0", epochs[False]), ("ep1", epochs[True]))}
    hook = statistics.median(hooks)
    overhead = (med["wall1"] / med["wall0"] - 1.0) * 100.0
    print()
    print(f"model: 3-conv CNN, {args.n_train} train + {args.n_val} val images of "
          f"{args.size}x{args.size}, batch {args.batch_size}, {args.epochs} epochs per fit, "
          f"{args.repeats} interleaved repeats; medians")
    print(f"fit wall time   without: {med['wall0']:.3f} s   with: {med['wall1']:.3f} s   "
          f"{pct(med['wall1'], med['wall0'])}")
    print(f"fit CPU time    without: {med['cpu0']:.3f} s   with: {med['cpu1']:.3f} s   "
          f"{pct(med['cpu1'], med['cpu0'])}")
    print(f"epoch wall time without: {med['ep0']:.3f} s   with: {med['ep1']:.3f} s   "
          f"{pct(med['ep1'], med['ep0'])}")
    print(f"EigenCAMCallback.on_epoch_end on the training thread: {hook * 1000:.1f} ms "
          f"({hook / med['ep0'] * 100.0:.2f} % of an epoch)")
    print(f"overhead of EigenCAMCallback (whole fit, incl. final flush): {overhead:+.2f} % "
          f"(target <= 3 %)")
    return overhead


if __name__ == "__main__":
    main()
