"""_table: rows, JSON, the one dedup rule (the first row of an (epoch, sample_index) stands),
and the table several processes write at once (real processes, a real store)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mlflow_eigencam import _layout, _table
from mlflow_eigencam._reader import Reader
from mlflow_eigencam.cli import main as cli_main
from tests.helpers import child_env
from tests.helpers.readback import free_port


def _sample(i, boxes=False):
    return SimpleNamespace(index=i, sample_id=f"s{i}", label="cat", pred="dog", correct=False,
                           pred_boxes=[1, 2] if boxes else None, label_boxes=None, pred_score=None)


def _table_of(rows):
    return json.loads(_table.to_json(rows))


def test_rows_and_json_in_the_layouts_column_order():
    card = {"size": [10, 20], "boxes": [[0, 0, 10, 10], [10, 0, 10, 10]], "titles": ["input", "PC1"]}
    rows = [_table.row(3, _sample(0), np.array([0.5, 0.25]), "p0.png", 0.1234567, card)]
    t = _table_of(rows)
    assert t["columns"] == ["epoch", "sample_index", "sample_id", "label", "prediction",
                            "correct", "evr_1", "evr_2", "map_change", "card", "image"]
    assert t["data"] == [[3, 0, "s0", "cat", "dog", False, 0.5, 0.25, 0.123457, card, "p0.png"]]
    boxes = _table_of([_table.row(0, _sample(1, boxes=True), np.array([1.0]), "")])
    assert boxes["columns"][6:8] == ["n_boxes", "n_true_boxes"] and boxes["data"][0][6:8] == [2, None]


def test_merge_keeps_the_first_row_of_a_key_and_appends_new_ones():
    old = _table_of([_table.row(0, _sample(i), np.array([0.5]), f"old{i}") for i in range(2)])
    new = _table_of([_table.row(e, _sample(1), np.array([0.5, 0.1]), f"new{e}") for e in (0, 1)])
    merged = _table.merge(old, new)
    rows = [dict(zip(merged["columns"], r)) for r in merged["data"]]
    assert [(r["epoch"], r["sample_index"], r["image"]) for r in rows] == [
        (0, 0, "old0"), (0, 1, "old1"), (1, 1, "new1")]
    assert "evr_2" in merged["columns"] and merged["columns"][-1] == "image"
    assert _table.merge(None, new) == _table.loads(_table.dumps(new))


def test_read_dedups_across_sources_with_the_same_rule():
    a = _table.to_json([_table.row(0, _sample(0), np.array([0.5]), "first")])
    b = _table.to_json([_table.row(0, _sample(0), np.array([0.5]), "second"),
                        _table.row(1, _sample(0), np.array([0.5]), "")])
    columns, rows = _table.read([("samples.json", a), ("table/epoch_0000.json", b)])
    assert [(r["epoch"], r["image"]) for r in rows] == [(0, "first"), (1, "")]
    with pytest.raises(ValueError, match="bad.json"):
        _table.read([("bad.json", b"[1]")])
    with pytest.raises(ValueError, match="lacks column"):
        _table.read([("t.json", b'{"columns": ["epoch"], "data": [[0]]}')])


def test_part_paths_ask_the_layout_and_sort_by_epoch_time_and_writer():
    d = "eigencam/eval/val/table"
    listed = [f"{d}/epoch_0010-0000000000005-a.json", f"{d}/epoch_0002-0000000000009-a.json",
              f"{d}/epoch_0002-0000000000007-b.json", f"{d}/epoch_0002-0000000000007-a.json",
              f"{d}/notes.txt", "epoch_0003-0000000000001-c.json", f"{d}/epoch_0001.json",
              SimpleNamespace(path=f"{d}/epoch_0004-0000000000001-a.json", is_dir=True)]
    assert _table.part_paths(lambda folder: listed, "eval", "val") == [
        f"{d}/epoch_0002-0000000000007-a.json", f"{d}/epoch_0002-0000000000007-b.json",
        f"{d}/epoch_0002-0000000000009-a.json", f"{d}/epoch_0003-0000000000001-c.json",
        f"{d}/epoch_0010-0000000000005-a.json"]
    assert _layout.table_part_path("eval", "val", 2, 7, "a") == listed[3]
    with pytest.raises(ValueError, match="writer"):
        _layout.table_part_path("eval", "val", 2, 7, "../x")

    def missing(folder):
        raise FileNotFoundError(folder)

    assert _table.part_paths(missing, "eval", "val") == []


# -- several writers on one run: real processes ----------------------------------------------

CHILD = Path(__file__).with_name("_durability_child.py")


def _child(uri: str, run_id: str, first: int, n: int, seconds: float = 0.3,
           close: bool = True, **env: str) -> subprocess.Popen:
    """A training process (tests/core/_durability_child.py): 2 samples per epoch of
    ``seconds``, prints ``RETURNED <epoch>`` once each ``on_epoch_end`` returned."""
    return subprocess.Popen([sys.executable, str(CHILD), uri, run_id, str(first), str(n),
                             str(seconds), "1" if close else "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(**env))


def _returned(proc: subprocess.Popen, until: str = "CLOSED") -> set:
    """Epochs whose on_epoch_end returned, read until a line starts with ``until``."""
    epochs = set()
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("RETURNED "):
            epochs.add(int(line.split()[1]))
        if line.startswith(until):
            return epochs
    raise AssertionError(f"child ended before {until!r}: {proc.stderr.read()[-3000:]}")


def _wait_for_step(run_id: str, step: int, timeout: float = 120.0) -> None:
    """Until the run has EigenCAM's metric at ``step`` (a bundle's last part to arrive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m.step >= step for m in MlflowClient().get_metric_history(
                run_id, _layout.metric_key("eval", "val", 1))):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} did not arrive within {timeout} s")


def _read_keys(uri: str, run_id: str) -> list:
    rows = Reader(uri).table(run_id, "eval", "val").rows
    return [(r["epoch"], r["sample_index"]) for r in rows]


def _new_run() -> str:
    return MlflowClient().create_run(
        mlflow.get_experiment_by_name("eigencam-tests").experiment_id).info.run_id


def test_two_processes_on_one_run_keep_every_returned_row(tracking_uri):
    """Two trainings logging one run's table at the same time (epochs 0-19 and 20-39):
    every row of every returned epoch is in the table read back, once (samples.json alone,
    merged by each process into its own copy, lost 26 of 40 rows)."""
    rid = _new_run()
    a, b = _child(tracking_uri, rid, 0, 20), _child(tracking_uri, rid, 20, 20)
    returned = _returned(a) | _returned(b)
    for proc in (a, b):
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    assert returned == set(range(40))
    keys = _read_keys(tracking_uri, rid)
    assert keys == [(e, i) for e in sorted(returned) for i in (0, 1)]


def test_a_resumed_training_beside_send_spool_of_the_dead_one_keeps_every_row(tracking_uri,
                                                                           tmp_path):
    """The package's advice after a crash: resume training and run send-spool. The dead
    process (it could not reach MLflow: every epoch is in its spool) and the resumed one
    write the table at the same time; no row is lost (before: 10 of 34)."""
    rid = _new_run()
    down = f"http://127.0.0.1:{free_port()}"  # a closed port: nothing leaves the spool
    dead_spool = tmp_path / "dead-spool"
    dead = _child(down, rid, 0, 6, 0.0, close=False, MLFLOW_EIGENCAM_SPOOL_DIR=str(dead_spool))
    dead_epochs = _returned(dead, until="RETURNED 5")
    dead.kill()
    dead.wait(timeout=30)
    resumed = _child(tracking_uri, rid, 6, 10)
    _wait_for_step(rid, 6)  # the resumed training is sending
    # send-spool of the dead one's folder (recorded for the closed port) while training goes on
    assert cli_main(["send-spool", str(dead_spool), "--tracking-uri", tracking_uri,
                     "--retarget"]) == 0
    returned = _returned(resumed) | dead_epochs
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()[-3000:]
    assert returned == set(range(16))
    assert _read_keys(tracking_uri, rid) == [(e, i) for e in range(16) for i in (0, 1)]
