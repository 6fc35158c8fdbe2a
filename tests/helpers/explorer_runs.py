"""Runs for the explorer's tests and benchmark, logged with EigenCAMLogger (numpy only).

Each run sees the same fixed validation images (so rows join across runs by sample id); its
activations find the object better each epoch (maps settle, map_change falls) and its logits
move towards the true class at a rate set by ``--quality`` (a run that learns worse).

    python -m tests.helpers.explorer_runs --tracking-uri URI --experiment exp-a --run-name good \
        --epochs 4 --n-samples 8 [--hold FILE]

With ``--hold FILE`` the run logs every epoch but the last, prints ``HOLDING``, waits until
FILE exists, then logs the last epoch and ends: a run that is still logging.

With ``signals=True`` (``--signals``) the logger also gets the objects' masks (the
``localization`` and ``pointing_game`` columns) and a per-sample ``faithfulness`` score, and
the run logs one more per-epoch metric under the EigenCAM prefix, ``PROBE_METRIC``, that no
table holds (as a label-free signal is): the explorer finds signals by name, not from a list.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tests.helpers.logger_run import CLASSES, activations_at, make_eval_set


#: The metric-only signal of ``signals=True`` runs: ``eigencam/eval/val/probe``.
PROBE_METRIC = "probe"


def log_run(tracking_uri: str, experiment: str, run_name: str, epochs: int, n_samples: int,
            quality: float = 1.0, hold: str | None = None, seed: int = 0, size: int = 64,
            signals: bool = False) -> str:
    """Log one run; returns its run id."""
    import mlflow

    from mlflow_eigencam import EigenCAMLogger

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    images, labels, masks = make_eval_set(n=n_samples, size=size, seed=0)
    rng = np.random.default_rng(seed + 7)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({"quality": quality, "seed": seed})
        logger = EigenCAMLogger(n_components=2, n_samples=n_samples, label_mapping=list(CLASSES),
                                target_layer="features.3")
        for epoch in range(epochs):
            if hold and epoch == epochs - 1:
                print("HOLDING", run.info.run_id, flush=True)
                while not Path(hold).exists():
                    time.sleep(0.1)
            logits = rng.normal(0, 1, size=(len(labels), len(CLASSES)))
            logits[np.arange(len(labels)), labels] += quality * 1.2 * epoch
            acts = activations_at(int(epoch * quality), masks, seed=seed)
            extra = {}
            if signals:  # a score that grows with the epoch, one per sample, some negative
                extra = {"masks": masks, "faithfulness": rng.uniform(-0.3, 0.2, len(labels)) + 0.2 * epoch * quality}
            logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val", **extra)
            logger.on_epoch_end(epoch)
            if signals:
                mlflow.log_metric(f"eigencam/eval/val/{PROBE_METRIC}", 0.5 + 0.1 * epoch * quality, step=epoch)
            mlflow.log_metric("val_acc", float((logits.argmax(1) == labels).mean()), step=epoch)
            if not logger.flush(timeout=60):
                raise SystemExit("EigenCAM items were not confirmed by MLflow within 60 s")
            print("EPOCH", epoch, flush=True)
        logger.close()
    return run.info.run_id


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--run-name", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--quality", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hold", default=None)
    p.add_argument("--signals", action="store_true", help="masks, faithfulness and a probe metric")
    a = p.parse_args(argv)
    rid = log_run(a.tracking_uri, a.experiment, a.run_name, a.epochs, a.n_samples, a.quality,
                  a.hold, a.seed, signals=a.signals)
    print("RUN", rid, flush=True)


if __name__ == "__main__":
    main()
