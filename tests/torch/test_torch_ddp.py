"""Two gloo processes with DistributedDataParallel: only rank 0 logs, nobody waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from tests.helpers import child_env
from tests.helpers.readback import free_port
from tests.helpers.torch_models import image_counts

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_ddp_only_rank_zero_logs_and_no_rank_hangs(tmp_path, tracking_uri):
    experiment_id = mlflow.get_experiment_by_name("eigencam-tests").experiment_id
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_EXPERIMENT_ID=experiment_id,
               DDP_OUT=str(tmp_path), OMP_NUM_THREADS="1")
    env = child_env(**env)
    procs = [subprocess.Popen([sys.executable, str(WORKER)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=150)  # a hang fails here instead of blocking CI
            outputs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["has_logger"] and not ranks[1]["has_logger"]
    assert ranks[1]["run_id"] is None and ranks[0]["run_id"]
    assert ranks[0]["hooks"] == ranks[1]["hooks"] == 0
    assert ranks[0]["target"] == "layer4"  # DDP's "module." prefix is gone: the wrapper is unwrapped
    client = MlflowClient()
    runs = client.search_runs([experiment_id])
    assert [r.info.run_id for r in runs] == [ranks[0]["run_id"]]  # exactly one run
    assert image_counts(client, ranks[0]["run_id"]) == {
        (f"eigencam/eval/val/sample_{i}", s): 1 for i in range(3) for s in range(2)}
