"""Ray Train (TorchTrainer, 2 CPU workers): one set of images per epoch in the driver's run,
nothing from rank 1, no hang. Skipped where ray is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

pytest.importorskip("ray.train.torch")

from tests.helpers import child_env
from tests.helpers.torch_models import image_counts  # noqa: E402

DRIVER = Path(__file__).with_name("ray_driver.py")


def test_ray_train_rank_zero_logs_into_the_driver_run(tmp_path, tracking_uri):
    experiment_id = mlflow.get_experiment_by_name("eigencam-tests").experiment_id
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_EXPERIMENT_ID=experiment_id,
               RAY_TEST_OUT=str(tmp_path), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # keeps Ray on 127.0.0.1
    env = child_env(**env)
    proc = subprocess.run([sys.executable, str(DRIVER)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=240)  # a hang fails here
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-4000:]
    driver = json.loads((tmp_path / "driver.json").read_text())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["run_id"] == driver["run_id"] and ranks[0]["has_logger"]
    assert ranks[1]["run_id"] is None and not ranks[1]["has_logger"]
    assert ranks[0]["hooks"] == ranks[1]["hooks"] == 0 and ranks[0]["target"] == "layer4"
    assert {(tmp_path / f"addr{r}.txt").read_text() for r in range(2)} == {"127.0.0.1"}
    client = MlflowClient()
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [driver["run_id"]]
    assert image_counts(client, driver["run_id"]) == {
        (f"eigencam/eval/val/sample_{i}", s): 1 for i in range(3) for s in range(2)}
