"""compare(): epochs side by side across runs and experiments, read back from a real MLflow store.

One sqlite store for the whole module (creating one costs seconds), with runs made by
EigenCAMLogger exactly as training would make them:

* exp-a / a-old:   eval/val 3 samples at epochs 0-2, and test (no ds_id) 2 samples
* exp-a / a-new:   eval/val, the same 3 images, epochs 0-4 (later than a-old)
* exp-a / a-plain: latest run of exp-a, no EigenCAM data at all
* exp-b / gappy:   eval/val, the same 3 images at epoch 0, only the last two at epoch 1
* exp-b / b:       eval/val, epochs 0-1, the same images except the third one (latest)
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List

import mlflow
import numpy as np
import pytest
from PIL import Image

from mlflow_eigencam import EigenCAMLogger
from mlflow_eigencam import compare as compare_fn
from mlflow_eigencam._compare_render import COL_GAP, EMPTY, MARGIN, RUN_GAP
from mlflow_eigencam.compare import CompareResult, parse_epochs
from mlflow_eigencam.cli import main
from mlflow_eigencam.render import to_rgb_uint8
from mlflow_eigencam.samples import sample_id
from tests.helpers import child_env
from tests.helpers.oracle import blob_batch

cmp_mod = importlib.import_module("mlflow_eigencam.compare")

LABELS = ["circle", "square", "tri"]


def blobs(n=3, seed=0, h=32, w=32, c=8, hh=8, ww=8):
    """(n, H, W, 3) float images with a white square, (n, C, h, w) activations lit there."""
    images, acts, labels, _ = blob_batch(n=n, h=h, w=w, c=c, hh=hh, ww=ww, seed=seed, nchw=False)
    return images, acts, labels


@dataclass
class Store:
    uri: str
    a_old: str
    a_new: str
    a_plain: str
    b: str
    gappy: str
    sids: List[str]      # sample ids of the shared images, in logging order
    sid_b_only: str      # the image only run b logged
    images: np.ndarray   # (3, 32, 32, 3) float, the shared images


def _log_run(experiment_id: str, name: str, epochs, images, acts, labels, *, test_mode=False) -> str:
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
        logger = EigenCAMLogger(n_components=2, n_samples=3, label_mapping=LABELS)
        for epoch in epochs:
            rng = np.random.default_rng(100 + epoch)  # predictions and maps change per epoch
            logits = rng.normal(size=(len(images), 3)).astype(np.float32)
            noisy = acts + rng.uniform(0, 0.3, size=acts.shape).astype(np.float32)
            logger.on_batch_end(images, noisy, labels, logits, mode="eval", ds_id="val")
            if test_mode:
                logger.on_batch_end(images[:2], acts[:2], labels[:2], logits[:2], mode="test")
            logger.on_epoch_end(epoch)
        assert logger.flush(timeout=60)
        logger.close()
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The same store as the `tracking_uri` fixture, built once for the module."""
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_EIGENCAM_SPOOL_DIR", str(root / "spool"))
        mlflow.set_tracking_uri(uri)
        exp_a = mlflow.create_experiment("exp-a", artifact_location=(root / "a").as_uri())
        exp_b = mlflow.create_experiment("exp-b", artifact_location=(root / "b").as_uri())
        images, acts, labels = blobs()
        a_old = _log_run(exp_a, "a-old", range(3), images, acts, labels, test_mode=True)
        a_new = _log_run(exp_a, "a-new", range(5), images, acts, labels)
        with mlflow.start_run(experiment_id=exp_a, run_name="a-plain") as plain:
            mlflow.log_metric("loss", 1.0)
        other_images, other_acts, _ = blobs(n=1, seed=7)
        b_images, b_acts = images.copy(), acts.copy()
        b_images[2], b_acts[2] = other_images[0], other_acts[0]
        with mlflow.start_run(experiment_id=exp_b, run_name="gappy") as gappy:
            # The first image is missing from epoch 1 (a shuffled or shortened eval set).
            logger = EigenCAMLogger(n_components=2, n_samples=3, label_mapping=LABELS)
            for epoch, keep in ((0, slice(0, 3)), (1, slice(1, 3))):
                logger.on_batch_end(images[keep], acts[keep], labels[keep], mode="eval", ds_id="val")
                logger.on_epoch_end(epoch)
            logger.close()
        b = _log_run(exp_b, "b", range(2), b_images, b_acts, labels)
        sids = [sample_id(to_rgb_uint8(im)) for im in images]
        yield Store(uri, a_old, a_new, plain.info.run_id, b, gappy.info.run_id, sids,
                    sample_id(to_rgb_uint8(other_images[0])), images)
        while mlflow.active_run() is not None:
            mlflow.end_run()
    mlflow.set_tracking_uri(previous)


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _find(haystack: np.ndarray, needle: np.ndarray) -> List[tuple]:
    """Top-left corners where ``needle`` occurs exactly in ``haystack``."""
    nh, nw = needle.shape[:2]
    first = (haystack == needle[0, 0]).all(axis=2)
    hits = []
    for y, x in zip(*np.nonzero(first)):
        if y + nh <= haystack.shape[0] and x + nw <= haystack.shape[1] \
                and np.array_equal(haystack[y:y + nh, x:x + nw], needle):
            hits.append((int(y), int(x)))
    return hits


def _upscaled(image: np.ndarray, f: int = 4) -> np.ndarray:
    """What render_card draws for a 32x32 image: a 4x nearest-neighbour upscale (128 px)."""
    rgb = to_rgb_uint8(image)
    return np.repeat(np.repeat(rgb, f, axis=0), f, axis=1)


# --------------------------------------------------------------------------- the card geometry


def test_package_attribute_is_the_function_after_the_cli_import():
    import mlflow_eigencam.cli  # noqa: F401  (imports the implementation module)

    assert mlflow_eigencam.compare is cmp_mod.compare is compare_fn


def test_the_table_records_the_card_boxes_and_they_hold_the_logged_panels(store):
    """What a user's logged run has: each row's ``card`` names where render_card put the
    input and each component in the card PNG the row points to."""
    from mlflow_eigencam._reader import Reader, card_boxes

    reader = Reader(store.uri)
    table = reader.table(store.a_old, "eval", "val")
    assert "card" in table.columns
    row = table.rows[0]
    # 32 x 32 images, 2 components: 4x upscale to 128 px panels in a 2 x 2 card, each under
    # an 18 px title line (14 px text), two caption lines at the bottom.
    assert row["card"] == {"size": [352, 4 + 128 + 16 + 128 + 4],
                           "boxes": [[4, 26, 128, 128], [148, 26, 128, 128], [4, 180, 128, 128]],
                           "titles": ["input", "PC1", "PC2"]}
    size, boxes = card_boxes(row)
    card = np.asarray(Image.open(io.BytesIO(reader.card(store.a_old, "eval", "val", row)))
                      .convert("RGB"))
    assert list(card.shape[:2]) == size
    x, y, w, h = boxes[0]
    image = store.images[store.sids.index(row["sample_id"])]
    assert np.array_equal(card[y:y + h, x:x + w], _upscaled(image))


# --------------------------------------------------------------------------- epoch specs


def test_epoch_specs():
    logged = [0, 2, 4, 6, 8]
    assert parse_epochs(None, logged) == logged
    assert parse_epochs("all", logged) == logged
    assert parse_epochs("last", logged) == [8]
    assert parse_epochs("first,last", logged) == [0, 8]
    assert parse_epochs("0,4, 8", logged) == [0, 4, 8]
    assert parse_epochs("1-5", logged) == [2, 4]       # a range takes the logged epochs in it
    assert parse_epochs("6-100,0", logged) == [0, 6, 8]
    with pytest.raises(LookupError, match=r"epoch 3 was not logged.*0, 2, 4, 6, 8"):
        parse_epochs("3", logged)
    with pytest.raises(LookupError, match="no epoch in 9-12"):
        parse_epochs("9-12", logged)
    for bad in ["", "x", "1-", "-1", "5-2", "1,,2", "last2"]:
        with pytest.raises(ValueError, match="EPOCHS"):
            parse_epochs(bad, logged)


# --------------------------------------------------------------------------- PNG


def test_png_rows_are_matched_samples_and_cells_are_exact_panels(store, tmp_path):
    out = tmp_path / "c.png"
    result = compare_fn([store.a_old, store.b], ds_id="val", out=out)
    assert isinstance(result, CompareResult) and result.path == out
    # The two shared images match across experiments; the third differs in run b.
    assert result.matched == tuple(store.sids[:2])
    assert result.unmatched == {store.a_old: (store.sids[2],), store.b: (store.sid_b_only,)}
    assert [r.experiment for r in result.runs] == ["exp-a", "exp-b"]
    assert result.columns == [(store.a_old, 0), (store.a_old, 1), (store.a_old, 2),
                              (store.b, 0), (store.b, 1)]
    assert result.labels[store.sids[0]] in LABELS

    img = _png(out)
    # The input column holds each matched image exactly as logged (4x upscale), one per row,
    # in row order, at the left edge.
    rows = [_find(img, _upscaled(store.images[i])) for i in range(2)]
    assert all(len(hits) == 1 for hits in rows), rows
    (y0, x0), (y1, x1) = rows[0][0], rows[1][0]
    assert x0 == x1 == MARGIN and y1 > y0 + 128
    # The unmatched image is listed, not drawn.
    assert _find(img, _upscaled(store.images[2])) == []
    # Five overlay columns of 128 px right of the input column.
    assert img.shape[1] >= MARGIN + 6 * 128 + 4 * COL_GAP + 2 * RUN_GAP
    # Same inputs, same bytes.
    again = compare_fn([store.a_old, store.b], ds_id="val", out=tmp_path / "d.png")
    assert again.path.read_bytes() == out.read_bytes()


def test_png_size_follows_rows_and_columns(store, tmp_path):
    # Wide enough that the grid, not the legend line above it, sets the width.
    runs = [f"{store.a_old}@0,1", f"{store.a_new}@0-2"]
    one = _png(compare_fn(runs, ds_id="val", out=tmp_path / "1.png").path)
    two = _png(compare_fn(runs[:1] + [f"{store.a_new}@0-3"], ds_id="val", out=tmp_path / "2.png").path)
    # One more epoch: one more 128 px column (+ the gap), same height.
    assert two.shape[1] - one.shape[1] == 128 + COL_GAP
    assert two.shape[0] == one.shape[0]
    # Mode "test" logged 2 samples instead of 3: one row less, same width.
    # (Only a-old logged it: the same run twice gives the same 2 + 3 columns.)
    test = compare_fn([f"{store.a_old}@0,1", f"{store.a_old}@0-2"], mode="test",
                      out=tmp_path / "t.png")
    assert len(test.matched) == 2 and len(test.columns) == 5
    fewer = _png(test.path)
    assert fewer.shape[1] == one.shape[1]
    assert 128 < one.shape[0] - fewer.shape[0] < 128 + 60


def test_png_caps_unselected_epochs_evenly_and_says_so(store, tmp_path):
    capped = compare_fn(store.a_new, ds_id="val", out=tmp_path / "c.png", png_max_epochs=3)
    assert capped.runs[0].epochs == (0, 2, 4)
    assert capped.runs[0].logged_epochs == (0, 1, 2, 3, 4)
    assert any("3 of 5" in n for n in capped.notes)
    explicit = compare_fn(f"{store.a_new}@all", ds_id="val", out=tmp_path / "a.png", png_max_epochs=3)
    assert explicit.runs[0].epochs == (0, 1, 2, 3, 4) and not explicit.notes
    default = compare_fn(store.a_new, ds_id="val", out=tmp_path / "d.png", epochs="1-3")
    assert default.runs[0].epochs == (1, 2, 3)


def test_a_sample_missing_at_one_epoch_stays_matched_with_an_empty_cell(store, tmp_path):
    result = compare_fn([store.gappy, store.a_old], ds_id="val", out=tmp_path / "g.html")
    assert result.matched == tuple(store.sids) and not any(result.unmatched.values())
    page = (tmp_path / "g.html").read_text(encoding="utf-8")
    assert page.count(">not logged</div>") == 1
    # No labels or predictions were logged: captions say so instead of failing.
    assert "pred: -" in page
    png = compare_fn([store.gappy], ds_id="val", out=tmp_path / "g.png")
    img = _png(png.path)
    # The empty cell is a flat grey box where sample 0 / epoch 1 would be.
    (y, x), = _find(img, _upscaled(store.images[0]))
    cell_x = x + 128 + RUN_GAP + 128 + COL_GAP
    assert (img[y + 2:y + 40, cell_x + 2:cell_x + 120] == EMPTY).all()


# --------------------------------------------------------------------------- HTML


def test_html_is_self_contained_with_every_run_epoch_and_unmatched(store, tmp_path):
    out = tmp_path / "c.html"
    result = compare_fn([store.a_new, store.b], ds_id="val", out=out, png_max_epochs=1)
    page = out.read_text(encoding="utf-8")
    assert result.runs[0].epochs == (0, 1, 2, 3, 4)  # HTML shows every epoch
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(src|href)=\"?(https?:)?//", page) and "<script" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page
    # One image per cell, one per matched input, one per unmatched thumbnail.
    assert len(srcs) == 2 * (5 + 2) + 2 + 2
    for run_id in (store.a_new, store.b):
        assert run_id in page
    for epoch in range(5):
        assert f"epoch {epoch}</th>" in page
    section = page[page.index("Unmatched samples"):]
    assert store.sids[2] in section and store.sid_b_only in section
    # Each embedded image decodes to a 128x128 panel.
    first = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert first.size == (128, 128)


# --------------------------------------------------------------------------- experiments


def test_experiment_takes_its_latest_run_with_eigencam_data(store, tmp_path):
    # a-plain is newer but logged no EigenCAM data: a-new is picked.
    result = compare_fn([], experiments=["exp-a", "exp-b@last"], ds_id="val",
                        out=tmp_path / "e.png")
    assert [r.run_id for r in result.runs] == [store.a_new, store.b]
    assert result.runs[1].epochs == (1,)
    # Mode "test" exists only in a-old: the latest run with that data.
    test = compare_fn([], experiments="exp-a", mode="test", out=tmp_path / "t.png")
    assert test.runs[0].run_id == store.a_old
    with pytest.raises(LookupError, match="no experiment named 'nope'"):
        compare_fn([], experiments=["nope"], out=tmp_path / "n.png")
    with pytest.raises(LookupError, match="experiment 'exp-b' has no run with EigenCAM data"):
        compare_fn([], experiments=["exp-b"], mode="test", out=tmp_path / "n.png")


# --------------------------------------------------------------------------- errors


def test_errors_name_the_missing_thing(store, tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(LookupError, match="no run with id 'deadbeef'"):
        compare_fn(["deadbeef"], out=out)
    with pytest.raises(LookupError, match=f"run {store.a_plain} has no EigenCAM data.*at all"):
        compare_fn([store.a_plain], out=out)
    # One spelling of "no dataset id" in messages, paths and the explorer: all.
    with pytest.raises(LookupError, match=r"ds_id='all' .*it has: mode='eval' ds_id='val', "
                                          r"mode='test' ds_id='all'"):
        compare_fn([store.a_old], out=out)
    with pytest.raises(LookupError, match=r"epoch 7 was not logged.*logged epochs: 0, 1, 2$"):
        compare_fn([f"{store.a_old}@7"], ds_id="val", out=out)
    with pytest.raises(ValueError, match="bad EPOCHS spec 'seven'"):
        compare_fn([f"{store.a_old}@seven"], ds_id="val", out=out)
    with pytest.raises(LookupError, match=r"logged 2 component.*component 3"):
        compare_fn([store.a_old], ds_id="val", component=3, out=out)
    with pytest.raises(ValueError, match="component"):
        compare_fn([store.a_old], ds_id="val", component=0, out=out)
    with pytest.raises(ValueError, match=r"x\.jpg"):
        compare_fn([store.a_old], ds_id="val", out=tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="at least one"):
        compare_fn([], out=out)
    assert not out.exists()


# --------------------------------------------------------------------------- CLI


def test_cli_writes_prints_unmatched_and_exits_0(store, tmp_path, capsys):
    out = tmp_path / "cli.png"
    rc = main(["compare", store.a_old, f"{store.b}@0", "--ds-id", "val", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and out.stat().st_size > 0
    assert f"wrote {out}: 2 matched sample(s) x 4 column(s)" in printed
    assert "unmatched" in printed and store.sids[2] in printed and store.sid_b_only in printed


def test_cli_tracking_uri_option_wins(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "elsewhere").as_uri())
    mlflow.set_tracking_uri((tmp_path / "elsewhere").as_uri())
    try:
        rc = main(["compare", "--experiment", "exp-b", "--ds-id", "val", "--component", "2",
                   "--tracking-uri", store.uri, "--out", str(tmp_path / "e.html")])
    finally:
        mlflow.set_tracking_uri(store.uri)
    assert rc == 0, capsys.readouterr().err
    assert store.b in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["compare", "deadbeef"], "no run with id 'deadbeef'"),
    (["compare", "{a_old}@9", "--ds-id", "val"], "epoch 9 was not logged"),
    (["compare", "{a_old}@9-", "--ds-id", "val"], "bad EPOCHS spec"),
    (["compare", "{a_plain}"], "has no EigenCAM data"),
    (["compare"], "at least one"),
])
def test_cli_errors_exit_2(store, tmp_path, capsys, argv, message):
    argv = [a.format(a_old=store.a_old, a_plain=store.a_plain) for a in argv]
    rc = main(argv + ["--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("mlflow-eigencam: error: ") and message in err


# --------------------------------------------------------------------------- newcomer fixes


def test_cli_accepts_the_short_run_ids_it_prints(store, tmp_path, capsys):
    out = tmp_path / "short.png"
    rc = main(["compare", store.a_new[:8], f"{store.b[:8]}@last", "--ds-id", "val", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert f"run 1: {store.a_new}" in printed.out and f"run 2: {store.b}" in printed.out
    rc = main(["compare", "ffffffff", "--ds-id", "val", "--out", str(out)])
    assert rc == 2 and "no run with id 'ffffffff' (or starting with it)" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["file path", "missing sqlite folder", "missing sqlite file",
                                  "missing folder", "default store"])
def test_cli_tracking_uri_mistakes_give_one_line_and_create_nothing(store, tmp_path, capsys,
                                                                     monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "runs.db"
    db.write_bytes(b"not a store")
    argv = ["compare", store.a_new, "--ds-id", "val", "--out", str(tmp_path / "x.png")]
    if case == "file path":
        argv += ["--tracking-uri", str(db)]
        message = f"is a file, not a tracking store; for an MLflow sqlite database pass " \
                  f"--tracking-uri sqlite:///{db}"
    elif case == "missing sqlite folder":
        argv += ["--tracking-uri", f"sqlite:///{tmp_path}/nowhere/mlflow.db"]
        message = f"folder {tmp_path}/nowhere does not exist"
    elif case == "missing sqlite file":
        argv += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
        message = "no sqlite database at"
    elif case == "missing folder":
        argv += ["--tracking-uri", str(tmp_path / "nowhere")]
        message = "no MLflow store at"
    if case == "default store":  # MLflow 3's default: sqlite:///mlflow.db in the working folder
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env["PYTHONPATH"] = child_env()["PYTHONPATH"]
        proc = subprocess.run([sys.executable, "-m", "mlflow_eigencam", *argv], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        rc, err = proc.returncode, proc.stderr
        # MLflow 3's default store, or MLflow 2's (a ./mlruns folder); MLflow 2 may also print
        # a deprecation warning of its own at import, which is not ours to silence.
        err = "".join(line for line in err.splitlines(keepends=True)
                      if "pkg_resources" not in line)
        message = (f"no sqlite database at {tmp_path}/mlflow.db" if "sqlite" in err
                   else f"no MLflow store at {tmp_path}/mlruns")
    else:
        rc = main(argv)
        err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "nowhere").exists()
    assert not (tmp_path / "mlruns").exists()


def test_sample_ids_pick_and_order_the_rows(store, tmp_path):
    wanted = [store.sids[2], store.sids[0], "not-a-sample"]
    result = compare_fn([store.a_old, store.a_new], ds_id="val", out=tmp_path / "s.html",
                        sample_ids=wanted)
    assert list(result.matched) == [store.sids[2], store.sids[0]]
    page = (tmp_path / "s.html").read_text()
    assert page.index(f'id="s-{store.sids[2]}"') < page.index(f'id="s-{store.sids[0]}"')
    assert f'id="s-{store.sids[1]}"' not in page


def test_cli_without_out_writes_a_temp_png_it_prints_never_the_working_folder(store, tmp_path,
                                                                               capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["compare", store.a_old, "--ds-id", "val"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert list(tmp_path.iterdir()) == []  # nothing written where the user stands
    path = Path(printed.out.split("wrote ", 1)[1].split(":", 1)[0])
    try:
        assert path.parent == Path(tempfile.gettempdir()) and path.suffix == ".png"
        assert _png(path).shape[1] > 128
    finally:
        path.unlink()


def test_compare_leaves_the_process_environment_alone(store, tmp_path, monkeypatch):
    # The explorer calls compare from request threads: it must not set or unset variables.
    changes = []

    class Watched(dict):
        def __setitem__(self, key, value):
            changes.append(("set", key))
            super().__setitem__(key, value)

        def __delitem__(self, key):
            changes.append(("del", key))
            super().__delitem__(key)

        def pop(self, key, *default):
            changes.append(("del", key))
            return super().pop(key, *default)

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    monkeypatch.setattr(os, "environ", Watched(os.environ))
    compare_fn([store.a_old], ds_id="val", out=tmp_path / "env.png")
    assert [c for c in changes if "EIGENCAM" in c[1] or "PROGRESS" in c[1]] == []
