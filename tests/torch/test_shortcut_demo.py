"""examples/shortcut_demo.py runs (two short runs) and prints accuracy and the signals per
run and epoch, read back from the runs it logged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parents[2]


def test_shortcut_demo_prints_the_signals_of_both_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'demo.db'}"
    env = child_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "shortcut_demo.py"),
                           "--epochs", "2", "--train-size", "64", "--n-samples", "2",
                           "--tracking-uri", uri], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "run 'clean'" in out and "run 'cued'" in out
    assert out.count("localization  pointing_game  faithfulness") == 2
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.run_name for r in runs) == ["clean", "cued"]
    for run in runs:
        for name in ("localization", "pointing_game", "faithfulness"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id,
                                                                f"eigencam/eval/val/{name}")]
            assert sorted(steps) == [0, 1], (run.info.run_name, name)
