"""Every PyTorch / Lightning example runs (fewer epochs, in a tmp dir) and logs its images."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import child_env
from tests.helpers.torch_models import image_counts

ROOT = Path(__file__).resolve().parents[2]


def _run_example(name: str, tmp_path: Path, *extra: str) -> tuple:
    uri = f"sqlite:///{tmp_path / 'examples.db'}"
    env = child_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--epochs", "2",
                           "--n-samples", "3", "--train-size", "128", "--tracking-uri", uri, *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"mlflow ui --backend-store-uri {uri}" in proc.stdout
    run_id = re.search(r"to run ([0-9a-f]{32})", proc.stdout).group(1)
    return uri, run_id


@pytest.mark.parametrize("name", ["pytorch_quickstart.py", "lightning_quickstart.py"])
def test_example_runs_and_logs_two_epochs(name, tmp_path):
    extra = ("--root-dir", str(tmp_path / "lightning")) if name.startswith("lightning") else ()
    uri, run_id = _run_example(name, tmp_path, *extra)
    counts = image_counts(MlflowClient(uri), run_id)
    assert counts == {(f"eigencam/eval/val/sample_{i}", s): 1 for i in range(3) for s in range(2)}
