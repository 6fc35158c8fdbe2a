"""A training process for the durability tests: logs epochs and says when each returned.

Usage: python _durability_child.py URI RUN_ID FIRST_EPOCH N_EPOCHS EPOCH_SECONDS CLOSE [DS_ID]
Prints ``READY`` once set up and ``RETURNED <epoch>`` right after each ``on_epoch_end``
returned (flushed), so the parent knows which epochs the package promised to keep.
With CLOSE=0 the script ends without calling close() (the atexit path).
"""

from __future__ import annotations

import sys
import time

import numpy as np  # noqa: E402

from mlflow_eigencam import EigenCAMLogger  # noqa: E402


def blob_batch(seed: int, n: int = 4):
    """Like test_logger.blob_batch, without importing the test module (which imports mlflow
    on this thread: a real script leaves that to the logger's sender)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.2, size=(n, 3, 32, 32)).astype(np.float32)
    acts = rng.uniform(0, 0.05, size=(n, 8, 8, 8)).astype(np.float32)
    for i in range(n):
        y, x = rng.integers(0, 6, size=2)
        acts[i, :, y:y + 2, x:x + 2] += 1.5
        images[i, :, y * 4:(y + 2) * 4, x * 4:(x + 2) * 4] = 1.0
    return images, acts, rng.integers(0, 3, size=n), rng.normal(size=(n, 3)).astype(np.float32)


def main() -> None:
    uri, run_id, first, n, seconds, close = sys.argv[1:7]
    ds_id = sys.argv[7] if len(sys.argv) > 7 else "val"
    # close() waits up to 120 s: on a loaded CI machine 20 s left the last epoch in the spool
    # (kept, but not yet in the table the parent reads).
    logger = EigenCAMLogger(n_samples=2, run_id=run_id, tracking_uri=uri, close_timeout=120)
    batches = [blob_batch(seed=b) for b in range(2)]
    print("READY", flush=True)
    for epoch in range(int(first), int(first) + int(n)):
        deadline = time.monotonic() + float(seconds)
        for images, acts, labels, logits in batches:
            logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id=ds_id)
        logger.on_epoch_end(epoch)
        print(f"RETURNED {epoch}", flush=True)
        while time.monotonic() < deadline:  # the rest of the "epoch"
            time.sleep(0.005)
    if close == "1":
        left = logger.close()
        print(f"CLOSED {int(left)}", flush=True)


if __name__ == "__main__":
    main()
