"""What the explorer's overlays add to a run (issue 23): bytes per epoch and once per run.

A capped logger (``n_samples=16``, ``n_components=3``) logs 224 x 224 images with 7 x 7 maps
(a ResNet's ``layer4`` grid) into a local sqlite MLflow store, for a classifier and for a
detector (one true and one predicted box per image). Read back from the run's artifact
folder and table: the raw inputs (once per run), the epoch's maps PNG, the ``overlay``
column's share of the epoch's table part, beside what an epoch logged before (cards, image
series, grid, table), and what the maps would cost as base64 inside each row instead.

    python benchmarks/bench_overlay_bytes.py [--samples 16] [--size 224] [--grid 7] [--k 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _measure(detector: bool, n: int, size: int, grid: int, k: int, epochs: int = 3) -> Dict[str, float]:
    import mlflow

    from mlflow_eigencam import EigenCAMLogger, _layout
    from tests.helpers.logger_run import CLASSES, activations_at, make_eval_set
    from tests.helpers.overlay_runs import detections

    images, labels, masks = make_eval_set(n=n, size=size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_EIGENCAM_SPOOL_DIR"] = str(Path(tmp) / "spool")
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("overlay-bytes")
        with mlflow.start_run():
            logger = EigenCAMLogger(n_components=k, n_samples=n, label_mapping=list(CLASSES))
            for epoch in range(epochs):
                acts = activations_at(epoch, masks, channels=64, grid=grid)
                if detector:
                    truth, preds = detections(masks, labels)
                    logger.on_batch_end(images, acts, truth, preds, mode="eval", ds_id="val")
                else:
                    logits = labels[:, None] == range(len(CLASSES))
                    logger.on_batch_end(images, acts, labels, logits.astype(float), mode="eval",
                                        ds_id="val")
                logger.on_epoch_end(epoch)
            assert logger.flush(timeout=120)
            logger.close()
            root = Path(mlflow.get_artifact_uri().replace("file://", ""))
        last = epochs - 1
        prefix = root / _layout.prefix("eval", "val")
        size_of = lambda paths: sum(p.stat().st_size for p in paths)  # noqa: E731
        inputs = size_of((prefix / "inputs").iterdir())
        maps = (root / _layout.overlay_maps_path("eval", "val", last)).stat().st_size
        epoch_dir = root / _layout.epoch_dir("eval", "val", last)
        cards = size_of(p for p in epoch_dir.glob("sample_*.png"))
        grid_png = (epoch_dir / "grid.png").stat().st_size
        series = size_of(p for p in (root / "images").iterdir() if f"+step+{last}+" in p.name)
        part = next(p for p in (prefix / "table").iterdir() if p.name.startswith(f"epoch_{last:04d}"))
        table = json.loads(part.read_text())
        at = table["columns"].index(_layout.TABLE_OVERLAY_COLUMN)
        overlay_json = sum(len(json.dumps(r[at])) + 2 for r in table["data"])
        base64_maps = n * (4 * math.ceil(k * grid * grid / 3) + 2)
    return {"inputs_once": inputs, "maps_png": maps, "overlay_column": overlay_json,
            "base64_maps_alt": base64_maps, "cards": cards, "series": series, "grid": grid_png,
            "table_part": part.stat().st_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--grid", type=int, default=7)
    p.add_argument("--k", type=int, default=3)
    a = p.parse_args()
    print(f"{a.samples} samples, {a.size} x {a.size} images, {a.grid} x {a.grid} maps, k={a.k}; bytes")
    print(f"{'':<12}{'inputs (once)':>14}{'maps.png':>10}{'overlay col':>12}{'added/epoch':>12}"
          f"{'(b64 maps)':>11}{'before/epoch':>13}")
    for detector in (False, True):
        m = _measure(detector, a.samples, a.size, a.grid, a.k)
        added = m["maps_png"] + m["overlay_column"]
        before = m["cards"] + m["series"] + m["grid"] + m["table_part"] - m["overlay_column"]
        print(f"{'detector' if detector else 'classifier':<12}{m['inputs_once']:>14,}"
              f"{m['maps_png']:>10,}{m['overlay_column']:>12,}{added:>12,}"
              f"{m['base64_maps_alt']:>11,}{before:>13,}  (+{100 * added / before:.2f} %)")


if __name__ == "__main__":
    main()
