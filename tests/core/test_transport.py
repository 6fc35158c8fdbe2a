"""_transport: one item sent to a real MLflow store, what an error means, run creation and end."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from mlflow_eigencam import _transport
from mlflow_eigencam._records import Encoded, Item, write_payload
from mlflow_eigencam._spool import SpoolError
from mlflow_eigencam._transport import Failure, SendError, send_item
from tests.helpers.readback import free_port, load_json, load_png, metric_steps


def _run() -> str:
    with mlflow.start_run() as run:
        pass
    return run.info.run_id


def test_send_item_sends_a_bundle_that_was_never_spooled(tracking_uri):
    client = MlflowClient()
    rid = _run()
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    send_item(Item("bundle", rid, mlflow.get_tracking_uri(),
                   files={"eigencam/x/img.png": Encoded(pixels), "eigencam/x/t.json": "{}"},
                   metrics=[["eigencam/x/evr_1", 0.5, 2, 1000]], tags={"k": "v"}))
    assert np.array_equal(load_png(client, rid, "eigencam/x/img.png"), pixels)
    assert metric_steps(client, rid, "eigencam/x/evr_1") == [(2, 0.5)]
    assert client.get_run(rid).data.tags["k"] == "v"


def test_one_image_under_two_names_is_written_once_and_moved_into_a_local_store(tracking_uri, tmp_path):
    client = MlflowClient()
    rid = _run()
    pixels = np.arange(6 * 7 * 3, dtype=np.uint8).reshape(6, 7, 3)
    image = Encoded(pixels)
    # Staged once, the second name a hard link...
    written: dict = {}
    one, two = tmp_path / "s" / "a" / "one.png", tmp_path / "s" / "b" / "two.png"
    write_payload(one, image, written)
    write_payload(two, image, written)
    assert one.read_bytes() == two.read_bytes() == image.data()
    assert one.stat().st_ino == two.stat().st_ino  # a hard link, not a second write
    # ... a local path (a streamed file) under two names too ...
    streamed = tmp_path / "streamed.png"
    streamed.write_bytes(image.data())
    three, four = tmp_path / "s" / "c" / "one.png", tmp_path / "s" / "d" / "two.png"
    write_payload(three, streamed, written)
    write_payload(four, streamed, written)
    assert three.read_bytes() == four.read_bytes() == image.data()
    assert three.stat().st_ino == four.stat().st_ino
    # ... and moved (renamed) into the local artifact store, not copied: still one inode.
    send_item(Item("bundle", rid, mlflow.get_tracking_uri(),
                   files={"a/one.png": image, "b/two.png": image}), workdir=tmp_path)
    for path in ("a/one.png", "b/two.png"):
        assert np.array_equal(load_png(client, rid, path), pixels)
    store = client.get_run(rid).info.artifact_uri.replace("file://", "")
    assert os.stat(f"{store}/a/one.png").st_ino == os.stat(f"{store}/b/two.png").st_ino
    assert not any(p.name.startswith(".staging") or p.name.startswith(".tmp")
                   for p in tmp_path.iterdir() if p.is_dir() and p.name != "s")


def test_files_are_copied_when_they_cannot_be_moved(tracking_uri, tmp_path, monkeypatch):
    client = MlflowClient()
    rid = _run()

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", cross_device)
    send_item(Item("bundle", rid, mlflow.get_tracking_uri(), files={"c/t.json": '{"a": 1}'}),
              workdir=tmp_path)
    assert load_json(client, rid, "c/t.json") == {"a": 1}


def test_errors_map_to_one_explicit_kind_each():
    classify = _transport._classify
    assert classify(MlflowException("x", error_code=RESOURCE_DOES_NOT_EXIST)).kind is Failure.REJECTED
    assert classify(MlflowException("HTTP 403 Forbidden")).kind is Failure.REFUSED
    assert classify(MlflowException("x", error_code=INTERNAL_ERROR)).kind is Failure.UNREACHABLE
    assert classify(ConnectionRefusedError("down")).kind is Failure.UNREACHABLE
    assert classify(SpoolError("bad record")).kind is Failure.REJECTED
    assert classify(ValueError("bad value")).kind is Failure.REJECTED
    assert classify(RuntimeError("can't register atexit after shutdown")).kind is Failure.UNEXPECTED
    kept = {k for k in Failure if SendError(k, "").kept}
    assert kept == {Failure.UNREACHABLE, Failure.REFUSED, Failure.UNEXPECTED}


def test_a_dead_server_is_unreachable_at_once():
    uri = f"http://127.0.0.1:{free_port()}"
    assert not _transport.probe(uri, timeout=0.5)
    with pytest.raises(SendError) as info:
        send_item(Item("tags", "a" * 32, uri, tags={"k": "v"}))
    assert info.value.kind is Failure.UNREACHABLE


def test_a_bundle_repeating_a_logged_step_is_refused_as_a_repeat(tracking_uri):
    client = MlflowClient()
    rid = _run()
    uri = mlflow.get_tracking_uri()

    def bundle(value):
        return Item("bundle", rid, uri, files={f"e/{value}.json": "{}"},
                    metrics=[["eigencam/x/evr_1", value, 3, 1000]], once=["eigencam/x/evr_1", 3])

    send_item(bundle(0.5))
    with pytest.raises(SendError) as info:
        send_item(bundle(0.7))
    assert info.value.kind is Failure.REPEAT
    assert metric_steps(client, rid, "eigencam/x/evr_1") == [(3, 0.5)]
    assert [f.path for f in client.list_artifacts(rid, "e")] == ["e/0.5.json"]


def test_create_and_end_a_run(tracking_uri):
    rid = _transport.create_run(tracking_uri, None)
    assert _transport.run_status(tracking_uri, rid) == "RUNNING"
    _transport.end_run(tracking_uri, rid, "FAILED")
    assert _transport.run_status(tracking_uri, rid) == "FAILED"
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        _transport.end_run(tracking_uri, rid, "DONE")


def test_the_sender_never_draws_from_the_users_random_stream(tracking_uri):
    """The sender creates the run and retries on a background thread: MLflow's generated run
    names and retry jitter drew from the global `random`, changing a seeded training's
    augmentations at moments it did not choose. The user's stream is left alone."""
    import random

    import mlflow.store.tracking.sqlalchemy_store as sql_store
    import mlflow.utils.request_utils as request_utils

    from mlflow_eigencam import EigenCAMLogger
    from tests.helpers.oracle import blob_batch

    random.seed(1234)
    before = random.getstate()
    logger = EigenCAMLogger(n_samples=2)  # no active run: the sender makes one
    images, acts, labels, logits = blob_batch()
    logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id="val")
    logger.on_epoch_end(0)
    assert logger.close() == 0
    assert random.getstate() == before
    client = MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name.startswith("eigencam-")
    # MLflow's retry jitter has its own generator now (a retry is hard to force on demand).
    assert request_utils.random is not random and sql_store.random is not random
    assert hasattr(request_utils.random, "random") and hasattr(sql_store.random, "uniform")


def test_the_upload_pool_runs_calls_on_daemon_threads_and_ends_them():
    """Its threads must not hold the user's process at exit (ThreadPoolExecutor joins its
    threads then: one request to a hung server would)."""
    import threading

    pool = _transport.DaemonPool(3, "test-pool")
    futures = [pool.submit(lambda i=i: (i, threading.current_thread().daemon)) for i in range(6)]
    bad = pool.submit(lambda: 1 / 0)
    assert [f.result(timeout=10) for f in futures] == [(i, True) for i in range(6)]
    assert isinstance(bad.exception(timeout=10), ZeroDivisionError)
    threads = [t for t in threading.enumerate() if t.name.startswith("test-pool")]
    assert 1 <= len(threads) <= 3
    pool.shutdown()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
