"""The Keras quickstart runs, and the Keras integration never pulls in torch."""

from __future__ import annotations

import subprocess
import sys

import mlflow

from tests.helpers import ROOT, child_env
from tests.helpers.keras_models import logged_images


def _env(tmp_path):
    return child_env(TF_CPP_MIN_LOG_LEVEL="2", MLFLOW_EIGENCAM_SPOOL_DIR=str(tmp_path / "spool"))


def test_quickstart_runs_and_logs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'quick.db'}"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "keras_quickstart.py"), "--epochs", "2",
         "--tracking-uri", uri, "--n-samples", "3"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mlflow ui --backend-store-uri {uri}" in proc.stdout
    run_id = proc.stdout.split(" to run ")[1].split(".")[0]
    images = logged_images(uri, run_id)
    assert {k: sorted(v) for k, v in images.items()} == {
        f"eigencam/eval/val/sample_{i}": [0, 1] for i in range(3)}
    tags = mlflow.MlflowClient(uri).get_run(run_id).data.tags
    assert tags["mlflow_eigencam.target_layer"] == "conv3"  # the last spatial layer, found


def test_keras_integration_does_not_import_torch(tmp_path):
    code = ("import sys, mlflow_eigencam.keras, mlflow_eigencam.integrations.keras; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'lightning' not in sys.modules, 'lightning imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
