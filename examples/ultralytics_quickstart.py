"""Ultralytics YOLO quickstart: one line, EigenCAM overlays in the run Ultralytics logs to.

Nothing is downloaded: a YOLO-format dataset of shapes is written to a folder
(``_yolo_shapes.py``, next to this file) and ``yolov8n.yaml`` starts from random weights. Run

    YOLO_OFFLINE=1 python examples/ultralytics_quickstart.py --epochs 5

then open the MLflow UI with the command it prints: the run Ultralytics' own MLflow callback
started has its metrics (``metrics/mAP50B``...) and, in its "Images" tab, the keys
``eigencam/eval/val/sample_*`` at the same steps (one per epoch).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ui_uri  # noqa: E402
from _yolo_shapes import write_yolo_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow tracking URI (default: a sqlite file in the current folder)")
    parser.add_argument("--experiment", default="mlflow-eigencam-yolo-quickstart")
    parser.add_argument("--n-samples", type=int, default=5, help="validation images to explain")
    parser.add_argument("--train-size", type=int, default=32, help="training images")
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--out", default=None, help="folder for the dataset and Ultralytics' runs")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="yolo-quickstart-"))

    # Ultralytics' MLflow callback reads these (it sets the experiment from MLFLOW_EXPERIMENT_NAME
    # or `project`, and starts a run named after `name` unless one is active).
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = args.experiment

    import mlflow
    from ultralytics import YOLO

    import mlflow_eigencam

    mlflow_eigencam.autolog(n_samples=args.n_samples)  # the one line
    data = write_yolo_shapes(out / "shapes", n_train=args.train_size, n_val=8)
    model = YOLO("yolov8n.yaml")
    model.train(data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=8, device="cpu",
                workers=0, amp=False, plots=False, project=str(out / "runs"), name="quickstart",
                seed=0, deterministic=True, verbose=False)

    run = mlflow.last_active_run()
    run_id = run.info.run_id if run is not None else ""
    print(f"\nLogged EigenCAM overlays to run {run_id}.")
    print("Open the MLflow UI with:")
    print(f"    mlflow ui --backend-store-uri {ui_uri(args.tracking_uri)}")
    return run_id


if __name__ == "__main__":
    main()
