"""MirroredStrategy with two logical CPU devices: the callback works and logs once per epoch."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow

from tests.helpers import child_env

HERE = Path(__file__).resolve().parent


def test_mirrored_strategy_logs_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = child_env(TF_CPP_MIN_LOG_LEVEL="2", MLFLOW_EIGENCAM_SPOOL_DIR=str(tmp_path / "spool"))
    proc = subprocess.run([sys.executable, str(HERE / "mirrored_fit.py"), uri], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mlflow_eigencam:" not in proc.stderr, proc.stderr[-3000:]  # no warning from us
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2

    client = mlflow.MlflowClient(uri)
    pngs = [a.path for a in client.list_artifacts(result["run_id"], "images") if a.path.endswith(".png")]
    counts = collections.Counter(
        re.match(r"images/(.+)\+step\+(\d+)\+", p).groups() for p in pngs)
    expected = {(f"eigencam~eval~val~sample_{i}", str(s)) for i in range(3) for s in (0, 1)}
    assert set(counts) == expected
    assert set(counts.values()) == {1}  # once per sample and epoch, not once per replica
    grids = [a.path for a in client.list_artifacts(result["run_id"], "eigencam/eval/val")]
    assert "eigencam/eval/val/epoch_0000" in grids and "eigencam/eval/val/epoch_0001" in grids
