"""The transformers example runs (fewer epochs, in a tmp dir) and logs its images at Trainer's
evaluation steps and of the test set evaluated after training, in the run it started."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from tests.helpers import child_env
from tests.helpers.readback import image_series, metric_steps

ROOT = Path(__file__).resolve().parents[2]


def test_transformers_quickstart_runs_and_logs_each_evaluation(tmp_path):
    uri = f"sqlite:///{tmp_path / 'examples.db'}"
    env = child_env(HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "transformers_quickstart.py"),
                           "--epochs", "2", "--n-samples", "3", "--train-size", "64",
                           "--tracking-uri", uri, "--output-dir", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"mlflow ui --backend-store-uri {uri}" in proc.stdout
    run_id = re.search(r"to run ([0-9a-f]{32})", proc.stdout).group(1)
    client = MlflowClient(uri)
    eval_steps = [step for step, _ in metric_steps(client, run_id, "eval_loss")]
    assert eval_steps == [2, 4]  # 64 images / batch 32, one evaluation per epoch
    series = image_series(client, run_id)
    val = [f"eigencam/eval/val/sample_{i}" for i in range(3)]
    test = [f"eigencam/test/test/sample_{i}" for i in range(3)]
    assert sorted(series) == sorted(val + test)
    assert all(sorted(series[key]) == eval_steps for key in val)
    # trainer.evaluate(test, metric_key_prefix="test") after training: at Trainer's test_loss step.
    assert [step for step, _ in metric_steps(client, run_id, "test_loss")] == [4]
    assert all(sorted(series[key]) == [4] for key in test)
    assert client.get_run(run_id).info.status == "FINISHED"
