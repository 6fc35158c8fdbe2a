"""_table: rows, JSON, the one dedup rule (the first row of an (epoch, sample_index) stands)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mlflow_eigencam import _layout, _table


def _sample(i, boxes=False):
    return SimpleNamespace(index=i, sample_id=f"s{i}", label="cat", pred="dog", correct=False,
                           pred_boxes=[1, 2] if boxes else None, label_boxes=None)


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
