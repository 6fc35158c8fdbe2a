"""A long outage (sink): memory stays flat, the spool has a cap with a warning at 80 % and a
reported policy at the cap. The server is a closed port: nothing is ever delivered."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from mlflow_eigencam import EigenCAMLogger, EigenCAMWarning
from mlflow_eigencam._records import item_from_record
from tests.helpers import memory
from tests.helpers.memory import in_fresh_process
from tests.helpers.oracle import blob_batch
from tests.helpers.readback import free_port

RUN = "0" * 32


def _down_logger(tmp_path, **kw) -> EigenCAMLogger:
    return EigenCAMLogger(n_samples=4, run_id=RUN, tracking_uri=f"http://127.0.0.1:{free_port()}",
                          spool_dir=tmp_path / "spool", close_timeout=0.5, **kw)


def _epoch(logger: EigenCAMLogger, epoch: int) -> None:
    images, acts, labels, logits = blob_batch(n=4, h=96, w=96, seed=epoch % 3)
    logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
    logger.on_epoch_end(epoch)


def test_an_outage_keeps_nothing_in_memory_that_is_on_disk(tmp_path):
    """Memory after 30 epochs of an outage is what it was after 6: every epoch is a record
    on disk and the sender keeps no copy of it (it once kept 32: ~30 x 2.2 MB here).
    Measured in a fresh process (tracemalloc counts other tests' leftover threads too), with
    the spool's compaction out of the way (see ``memory.outage``)."""
    got = in_fresh_process(memory.outage, str(tmp_path), free_port())
    bundles = [Path(p) for p in got["bundles"]]
    assert len(bundles) == 30  # all on disk, none delivered
    one_epoch = sum(p.stat().st_size for p in bundles) / 30
    # What stays in memory does not grow with the epochs of the outage.
    late, early, peak, early_peak = got["late"], got["early"], got["peak"], got["early_peak"]
    assert late - early < 2 * one_epoch, (late - early, one_epoch)
    assert peak < early_peak + 2 * one_epoch, (peak, early_peak, one_epoch)


def test_the_spool_cap_warns_at_80_percent_and_keeps_every_10th_epochs_images(tmp_path):
    probe = _down_logger(tmp_path / "probe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EigenCAMWarning)
        _epoch(probe, 0)
        size = max(p.stat().st_size for p in probe.close().records)  # one epoch's record
    cap = int(5.5 * size)
    logger = _down_logger(tmp_path, spool_max_bytes=cap)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(25):
            _epoch(logger, epoch)
        left = logger.close()
    said = [str(w.message) for w in caught if issubclass(w.category, EigenCAMWarning)]
    assert any(f"% of spool_max_bytes={cap}; at the cap" in m for m in said), said
    assert any(f"is at spool_max_bytes={cap}" in m for m in said), said
    # The first epochs fill the spool to the cap; after that only epochs 10 and 20 keep images.
    with_images, without = [], []
    for path in left.records:
        item = item_from_record(path)
        if item.kind != "bundle":
            continue
        epoch = int(item.once[1])
        pngs = [f for f in item.files if f.endswith(".png")]
        table = json.loads(bytes(item.files["eigencam/eval/val/samples.json"]))
        images = [r[table["columns"].index("image")] for r in table["data"]]
        assert len(table["data"]) == 4 and len(item.metrics) >= 3  # rows, metrics: always
        if pngs:
            with_images.append(epoch)
            assert all(images) and item.grids
        else:
            without.append(epoch)
            assert images == [""] * 4 and not item.grids
    full = without[0]  # the first epoch at the cap
    assert 4 <= full <= 6, (with_images, without)
    assert with_images == list(range(full)) + [10, 20]
    assert without == [e for e in range(full, 25) if e % 10]
    assert left.images_not_kept == len(without)
    assert int(left) == len(left.records) + len(without)
    assert f"{len(without)} epoch bundle(s) were NOT kept" in left.message()
    assert sum(p.stat().st_size for p in left.records) < 2 * cap


def test_spool_max_bytes_is_checked(tmp_path):
    with pytest.raises(ValueError, match="spool_max_bytes must be an int > 0 or None, got 0"):
        EigenCAMLogger(spool_max_bytes=0)


def test_past_compact_bytes_the_sender_encodes_waiting_records_and_send_spool_sends_them(
        tmp_path, tracking_uri):
    """Records are written as raw pixels (cheap for the training thread); during an outage,
    past ``compact_bytes``, the sender rewrites them with encoded images. A raw record (what
    the previous version left too: the format is the same) and an encoded one both arrive."""
    import time

    import mlflow
    from mlflow.tracking import MlflowClient

    from mlflow_eigencam import send_spool
    from tests.helpers.readback import image_series

    rid = mlflow.start_run().info.run_id
    mlflow.end_run()
    logger = EigenCAMLogger(n_samples=4, run_id=rid, tracking_uri=f"http://127.0.0.1:{free_port()}",
                            spool_dir=tmp_path / "spool", close_timeout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EigenCAMWarning)
        _epoch(logger, 0)
        _epoch(logger, 1)
        sink = logger._sink
        raw = {p.name: p.stat().st_size for p in sink.folder.glob("*.rec")}
        sink._keeper.compact_bytes = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(sink._keeper.compacted) < len(raw):
            time.sleep(0.2)
        left = logger.close()
    sizes = {p.name: p.stat().st_size for p in left.records}
    bundles = [p for p in left.records if item_from_record(p).kind == "bundle"]
    assert len(bundles) == 2
    # The first was written raw (the second may have been encoded under back-pressure).
    assert sizes[bundles[0].name] < 0.5 * raw[bundles[0].name], (raw, sizes)
    assert all(isinstance(v, bytes) for p in bundles for v in item_from_record(p).files.values())
    sent, remaining = send_spool(sink.folder if sink.folder else left.folder,
                                 tracking_uri=tracking_uri, retarget=True)
    assert (sent, remaining) == (3, 0)
    series = image_series(MlflowClient(tracking_uri), rid)
    assert len(series) == 4 and all(sorted(s) == [0, 1] for s in series.values())
