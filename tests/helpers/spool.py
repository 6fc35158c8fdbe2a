"""Helpers for the spool, sink and recovery tests: a user's folder, a dead server, an epoch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.helpers.oracle import blob_batch
from tests.helpers.readback import free_port


def feed_epoch(logger, epoch, ds="val"):
    """Two batches of blob images for (eval, ``ds``), then the epoch's end."""
    for b in range(2):
        images, acts, labels, logits = blob_batch(seed=b)
        logger.on_batch_end(images, acts, labels, logits, mode="eval", ds_id=ds)
    logger.on_epoch_end(epoch, ds_id=ds)


def tree(folder: Path) -> dict:
    """{relative path: sha1 or 'dir' or 'link->target'} of everything under ``folder``."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link->" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def user_project(root: Path) -> Path:
    """A folder of the user's (a git checkout, data, notes) the spool must never touch."""
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "data").mkdir()
    (root / "data" / "x.bin").write_bytes(os.urandom(1000))
    (root / "0000000001.bundle").mkdir()  # looks like an old spool item: still not ours
    (root / "0000000001.bundle" / "item.json").write_text("{}")
    (root / "notes.txt").write_text("mine")
    return root


def dead_uri() -> str:
    """An http tracking URI where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
