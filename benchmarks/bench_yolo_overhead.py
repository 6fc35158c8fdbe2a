"""Cost of EigenCAMCallback per logged epoch of an Ultralytics YOLO ``train()``.

The settings of ``tests/yolo`` (``yolov8n.yaml`` at random init, imgsz 64, CPU, 32 training
and 8 validation images of synthetic shapes), where an epoch is short and the callback's
share is largest. Two trainings of the same length in one process: one with the callback
logging every ``PERIOD``-th epoch (cost per cycle from neighbouring epochs, see
``_interleave``), one without (the same arithmetic: the method's own error), and both runs'
mean epoch walls side by side. Ultralytics' own MLflow callback is on in both (a sqlite store
in a temp folder).

    YOLO_OFFLINE=1 python benchmarks/bench_yolo_overhead.py --epochs 20

``--parts``: the callback's epoch-end work alone, both ways side by side in one process
(interleaved, one thread, no training around it): explaining the pinned images from its
own forward pass, and from the rows of a validator-like forward (a 64 x 96 letterbox
canvas, as Ultralytics' validator builds for the 48 x 64 images), plus what the hooks add
to that forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import PERIOD, cycle_costs, trimmed  # noqa: E402
from _yolo_shapes import write_yolo_shapes  # noqa: E402


def train(data: Path, out: Path, name: str, epochs: int, with_callback: bool, inline: list) -> list:
    """Epoch walls in seconds (start of epoch e to start of e + 1, callbacks included); the
    seconds spent in the callback's events in each logged epoch (``on_val_start`` and
    ``on_val_end`` around the validation included) go to ``inline``."""
    from ultralytics import YOLO

    from mlflow_eigencam.ultralytics import EigenCAMCallback

    model = YOLO("yolov8n.yaml")
    starts: list = []
    if with_callback:
        callback = EigenCAMCallback(log_every_n_epochs=PERIOD)
        spent: dict = {}  # epoch -> seconds inside the callback's events (validation's included)

        def timed(event_arg, fn):
            t = time.perf_counter()
            fn(event_arg)
            epoch = len(starts) - 1
            spent[epoch] = spent.get(epoch, 0.0) + time.perf_counter() - t

        for event, fn in callback.callbacks.items():
            model.add_callback(event, lambda arg, fn=fn: timed(arg, fn))

        def logged_epoch_done(trainer):
            if trainer.epoch % PERIOD == 0 and trainer.epoch in spent:
                inline.append(spent[trainer.epoch])

        model.add_callback("on_fit_epoch_end", logged_epoch_done)  # after the callback's own
    model.add_callback("on_train_epoch_start", lambda trainer: starts.append(time.perf_counter()))
    model.train(data=str(data), epochs=epochs, imgsz=64, batch=8, device="cpu", workers=0, amp=False,
                plots=False, project=str(out), name=name, seed=0, deterministic=True, verbose=False,
                close_mosaic=0)
    return [b - a for a, b in zip(starts, starts[1:])]


def parts(rounds: int = 14) -> dict:
    """Median ms per logged epoch of ``EigenCAMCallback._log_epoch`` (5 pinned 48 x 64 images,
    yolov8n at random init) with its own forward vs the validator's rows, and the hooks' cost."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from mlflow_eigencam.integrations import ultralytics as yolo
    from mlflow_eigencam.logger import EigenCAMLogger

    torch.set_num_threads(1)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False).eval()
    rng = np.random.default_rng(0)
    pins, val = [], torch.full((8, 3, 64, 96), 114 / 255.0)
    for k in range(5):
        image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        canvas = np.full((64, 64, 3), 114, np.uint8)
        canvas[:48] = image
        pins.append(yolo._Pin(image, canvas, {"boxes": np.array([[5.0, 5, 30, 30]]), "labels": np.array([1])},
                              index=k))
        val[k, :, 8:56, 16:80] = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    trainer = SimpleNamespace(ema=SimpleNamespace(ema=model))
    times: dict = {"own forward": [], "validator's rows": [], "hooks in the validator's forward": []}
    callbacks = {}
    for name in ("own", "rows"):
        callback = yolo.EigenCAMCallback(ds_id=name)
        callback._task, callback._pins = "detect", pins
        callback._logger = EigenCAMLogger(n_components=1, n_samples=5, label_mapping=["a", "b", "c"],
                                          image_layout="NHWC", ds_id=name)
        callbacks[name] = callback
    for epoch in range(rounds):
        for name, callback in callbacks.items():
            if name == "rows":
                seen = yolo._Seen([p.index for p in pins], [15, 18, 21])
                with torch.no_grad():
                    t = time.perf_counter()
                    handles = seen.hook(model)
                    model(val)
                    hooked = time.perf_counter() - t
                    for handle in handles:
                        handle.remove()
                    t = time.perf_counter()
                    model(val)
                    times["hooks in the validator's forward"].append(hooked - (time.perf_counter() - t))
                callback._seen = seen
            t = time.perf_counter()
            callback._log_epoch(trainer, epoch)
            times["own forward" if name == "own" else "validator's rows"].append(time.perf_counter() - t)
            callback._logger.flush(30)
    for callback in callbacks.values():
        callback._logger.close()
    result = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}
    print("per logged epoch (median ms, one thread): " + "; ".join(f"{k} {v:.1f}" for k, v in result.items()))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--parts", action="store_true", help="time the epoch-end work alone, both ways")
    args = parser.parse_args(argv)
    if args.parts:
        with tempfile.TemporaryDirectory(prefix="bench-yolo-") as tmp:
            import mlflow

            os.environ.setdefault("MLFLOW_EIGENCAM_SPOOL_DIR", str(Path(tmp) / "spool"))
            mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
            with mlflow.start_run():
                return parts()
    out = Path(tempfile.mkdtemp(prefix="bench-yolo-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    data = write_yolo_shapes(out / "shapes", n_train=32, n_val=8)
    inline: list = []
    plain = train(data, out, "plain", args.epochs, False, inline)
    watched = train(data, out, "watched", args.epochs, True, inline)
    inline_ms = statistics.median(inline[1:]) * 1e3
    cost, err = trimmed(cycle_costs(watched))
    noise, noise_err = trimmed(cycle_costs(plain))
    epoch = statistics.median(plain[1:])
    result = dict(cost_ms=cost * 1e3, cost_err_ms=err * 1e3, noise_ms=noise * 1e3,
                  noise_err_ms=noise_err * 1e3, epoch_s=epoch,
                  mean_epoch_plain_s=statistics.mean(plain[1:]),
                  mean_epoch_watched_s=statistics.mean(watched[1:]), inline_ms=inline_ms)
    print(f"epoch (median, without): {epoch:.3f} s; per logged epoch: {cost * 1e3:.1f} +- {err * 1e3:.1f} ms "
          f"({100 * cost / epoch:.1f} % of an epoch); same arithmetic without the callback: "
          f"{noise * 1e3:.1f} +- {noise_err * 1e3:.1f} ms")
    print(f"inside the callback's events (median of the logged epochs after the first): {inline_ms:.1f} ms "
          f"({100 * inline_ms / 1e3 / epoch:.1f} % of an epoch); the upload runs in the background")
    print(f"mean epoch wall, side by side: without {result['mean_epoch_plain_s']:.3f} s, with "
          f"(logging every {PERIOD}th epoch) {result['mean_epoch_watched_s']:.3f} s")
    return result


if __name__ == "__main__":
    main()
