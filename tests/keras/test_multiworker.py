"""MultiWorkerMirroredStrategy, 2 local workers: one set of images per epoch, in the chief's run.

The workers train in step (collective all-reduce every batch) while the chief alone runs
the callback's probe and uploads: the other worker waits for it at the next collective, so a
probe that needed a collective of its own would hang here (the subprocess timeout fails it).
"""

from __future__ import annotations

import collections
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.helpers import child_env

HERE = Path(__file__).resolve().parent
# Generous: two TensorFlow processes start and train on a busy 2-core machine.
TIMEOUT_S = 300


def _free_ports(n: int):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_two_workers_log_once_in_the_chiefs_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # create the schema once, before two writers
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = child_env(TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   MLFLOW_EIGENCAM_SPOOL_DIR=str(tmp_path / f"spool{index}"))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "multiworker_fit.py"), uri], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=TIMEOUT_S))  # no hang: a deadlock fails here
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, (_out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
        assert "mlflow_eigencam:" not in err, err[-3000:]  # no warning from us on either worker
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [r["replicas"] for r in results] == [2, 2]
    assert results[0]["loss"] == results[1]["loss"]  # one model, trained in step
    assert [r["logger"] for r in results] == [True, False]  # the other worker never logs
    assert [r["undelivered"] for r in results] == [0, 0]  # close() on either worker
    run_id = results[0]["run_id"]

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]  # no run made by the other worker
    pngs = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    counts = collections.Counter(re.match(r"images/(.+)\+step\+(\d+)\+", p).groups() for p in pngs)
    assert set(counts) == {(f"eigencam~eval~val~sample_{i}", str(s)) for i in range(3) for s in (0, 1)}
    assert set(counts.values()) == {1}  # one set per epoch, not one per worker
    points = client.get_metric_history(run_id, "eigencam/eval/val/evr_1")
    assert sorted(p.step for p in points) == [0, 1]
    assert not (tmp_path / "spool1").exists() or not any((tmp_path / "spool1").rglob("*.json"))
