"""The README's demo runs end to end (fewer epochs, smaller data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from readback import image_series

ROOT = Path(__file__).resolve().parents[2]


def test_demo_two_runs_compare_and_ui_command(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--epochs", "2",
                           "--n-train", "96", "--size", "32", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in proc.stdout
    assert (out / "compare.html").stat().st_size > 10_000
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The docs show this real output; refresh it on request (or when it is missing).
    docs_png = ROOT / "docs" / "images" / "demo_compare.png"
    if os.environ.get("MLFLOW_EIGENCAM_DOCS_SCREENSHOTS") == "1" or not docs_png.exists():
        shutil.copyfile(out / "compare.png", docs_png)
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eigencam-demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    for run in runs:
        series = image_series(client, run.info.run_id)
        assert len(series) == 6 and all(sorted(s) == [0, 1] for s in series.values())
        assert "train_loss" in run.data.metrics and "eigencam/eval/val/evr_1" in run.data.metrics
