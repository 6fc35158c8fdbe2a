"""The spool on disk: folders the package made and marked, one record file per item.

Layout (``ROOT`` is ``spool_dir=``, ``$MLFLOW_EIGENCAM_SPOOL_DIR`` or
``~/.cache/mlflow_eigencam/spool``)::

    ROOT/                          marked: holds MARKER (or ROOT/mlflow-eigencam-spool/ is used)
      .mlflow-eigencam-spool       MARKER: "this folder was made by mlflow_eigencam"
      <run_id|new>-<uid>/          one folder per logger (uid: unique per logger and process)
        .mlflow-eigencam-spool     MARKER again
        run.json                   where the records go: tracking URI, run id, experiment
        .lock                      flock()ed while the logger lives: a live folder is not taken
        <time_ns>-<uid>-<seq>.rec  one record per item, written atomically (below)
        failed/                    records MLflow refused for good, each with a .err note

Why one file per item: a record is written to a temporary name and renamed (the sink's
sender fsyncs it and the folder right after), so a reader sees a whole record or none; a
crash at any point leaves either the old state or the new one. Nothing outside marked folders
is ever created, moved or deleted, and inside them
only names of the shapes above (the package never runs ``rmtree`` on a spool).

A record is ``MAGIC | u64 header length | u32 crc32 | header JSON | data``; the header lists
byte ranges of ``data`` (raw pixel arrays, encoded files, text), the CRC covers header and
data. Records are read as untrusted input: no symlink is followed, sizes, ranges, shapes and
paths are checked (see :func:`read_record`).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

MARKER = ".mlflow-eigencam-spool"
#: Sub-folder used when the folder given as the spool root exists and is not a spool.
SUBDIR = "mlflow-eigencam-spool"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
RECORD_SUFFIX = ".rec"
FAILED_DIR = "failed"
_TMP_PREFIX = ".tmp-"
MAGIC = b"MLFECAM1"
_PREFIX = struct.Struct("<8sQI")
#: Largest record or run file read back (a record of an epoch is a few MB).
MAX_RECORD_BYTES = 4 << 30
MAX_JSON_BYTES = 64 << 20
_MARKER_TEXT = ("This folder was created by mlflow_eigencam to keep items not yet sent to "
                "MLflow.\nSend them with: mlflow-eigencam send-spool\n")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


#: Environment variable that moves the default spool root.
SPOOL_ENV = "MLFLOW_EIGENCAM_SPOOL_DIR"


def default_spool_root() -> Path:
    """Root folder of spools: ``$MLFLOW_EIGENCAM_SPOOL_DIR`` or ``~/.cache/mlflow_eigencam/spool``."""
    env = os.environ.get(SPOOL_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "mlflow_eigencam" / "spool"


class SpoolError(ValueError):
    """A folder that is not a spool of this package, or a record that fails its checks."""


def is_marked(folder: Path) -> bool:
    """True when ``folder`` is a real folder (no symlink) holding the package's marker file."""
    try:
        return (stat.S_ISDIR(os.lstat(folder).st_mode)
                and stat.S_ISREG(os.lstat(Path(folder) / MARKER).st_mode))
    except OSError:
        return False


def _mark(folder: Path) -> None:
    try:
        fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    except FileExistsError:
        return
    try:  # the file's existence is the mark; its text is only for a curious user
        os.write(fd, _MARKER_TEXT.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def own_root(root: Path, *, create: bool) -> Path:
    """The marked folder the package keeps its spools in, for the root folder ``root``.

    ``root`` itself when it is marked or does not exist yet (then created and marked);
    otherwise (a folder of the user's) the marked sub-folder ``root/mlflow-eigencam-spool``,
    so nothing the user had in ``root`` is ever touched.

    Raises:
        SpoolError: ``root`` is a file, or its sub-folder exists and is not a spool.
        OSError: the folder cannot be created (read-only, disk full).
    """
    root = Path(root)
    if is_marked(root):
        return root
    if not os.path.lexists(root):
        if create:
            root.mkdir(parents=True, exist_ok=True)
            _mark(root)
        return root
    if not root.is_dir():
        raise SpoolError(f"spool folder {str(root)!r} exists and is not a folder")
    sub = root / SUBDIR
    if is_marked(sub):
        return sub
    if os.path.lexists(sub):
        raise SpoolError(f"{str(sub)!r} exists and was not made by mlflow_eigencam (no "
                         f"{MARKER} file); refusing to use it as a spool")
    if create:
        try:
            sub.mkdir()
        except FileExistsError:
            pass
        _mark(sub)
    return sub


def new_folder(root: Path, run_id: Optional[str], uid: str) -> Path:
    """Create and mark this logger's folder under the marked ``root``."""
    name = f"{run_id or 'new'}-{uid}"
    if not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"bad spool folder name {name!r}")
    folder = root / name
    folder.mkdir()
    _mark(folder)
    return folder


def _fsync(path: Path, flags: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | flags | _NONBLOCK)
    except OSError:  # gone (a record already sent), or a folder that cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk; a file already sent and deleted is skipped."""
    _fsync(path, _NOFOLLOW | _BINARY)


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (no-op where folders cannot be opened)."""
    _fsync(folder, 0)


def _write_atomic(folder: Path, name: str, chunks: Sequence[Any], *, fsync: bool = True) -> Path:
    tmp = folder / f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o600)
    try:
        views = [memoryview(c).cast("B") for c in chunks if len(c)]
        while views:  # writev may write less than asked (large records, signals)
            done = os.writev(fd, views[:512]) if hasattr(os, "writev") else \
                os.write(fd, views[0])
            while done and views:
                if done >= len(views[0]):
                    done -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][done:]
                    done = 0
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    final = folder / name
    try:
        os.replace(tmp, final)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return final


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json(folder: Path, name: str, data: dict) -> Path:
    """Write a small JSON file atomically (temp name, fsync, rename, folder fsync)."""
    path = _write_atomic(folder, name, [json.dumps(data).encode()])
    fsync_dir(folder)
    return path


def read_json(path: Path) -> dict:
    """A small JSON file, refusing symlinks and anything but a regular file."""
    data = _read_regular(path, MAX_JSON_BYTES)
    value = json.loads(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise SpoolError(f"{path} does not hold a JSON object")
    return value


def _open_regular(path: Path, flags: int) -> int:
    """Open ``path`` only if it is a regular file (no symlink followed).

    ``O_NONBLOCK`` for the open itself: opening a FIFO for reading blocks until a writer
    comes, which a planted FIFO never does (it hung ``send-spool`` and every new logger on
    the root). The flag is cleared once the file is known to be regular.
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | _BINARY | _NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SpoolError(f"{path} is a symlink; not followed") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpoolError(f"{path} is not a regular file ({_kind(st.st_mode)}); skipped")
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def odd_entries(folder: Path) -> List[str]:
    """Names in ``folder`` that are neither regular files, folders nor symlinks (FIFOs,
    sockets, devices): never opened, reported and skipped."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        try:
            mode = e.stat(follow_symlinks=False).st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            out.append(f"{e.name} ({_kind(mode)})")
    return sorted(out)


def _read_regular(path: Path, limit: int) -> bytes:
    fd = _open_regular(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_size > limit:
            raise SpoolError(f"{path} is larger than {limit} bytes")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 24)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise SpoolError(f"{path} is larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# -- records -------------------------------------------------------------------------------
def write_record(folder: Path, name: str, header: dict, blobs: Sequence[Any], *,
                 fsync: bool = True) -> Path:
    """Write one record atomically: ``header`` (JSON) and ``blobs`` (bytes-like, e.g.
    C-contiguous uint8 arrays, written without a copy). ``header["blobs"]`` is set to their
    [offset, length] ranges. The folder's own fsync (which makes the rename durable) is left
    to the caller, so the training thread pays for the data fsync only."""
    ranges, offset = [], 0
    for b in blobs:
        n = memoryview(b).nbytes
        ranges.append([offset, n])
        offset += n
    header = dict(header, blobs=ranges)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    crc = zlib.crc32(head)
    for b in blobs:
        crc = zlib.crc32(memoryview(b).cast("B"), crc)
    prefix = _PREFIX.pack(MAGIC, len(head), crc & 0xFFFFFFFF)
    return _write_atomic(folder, name, [prefix, head, *blobs], fsync=fsync)


def read_record(path: Path) -> Tuple[dict, memoryview, List[memoryview]]:
    """(header, data, blobs) of a record, after checking magic, CRC and every range.

    Raises:
        SpoolError: a symlink, not a regular file, too large, or damaged.
    """
    raw = _read_regular(path, MAX_RECORD_BYTES)
    if len(raw) < _PREFIX.size:
        raise SpoolError(f"{path}: truncated record")
    magic, head_len, crc = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise SpoolError(f"{path}: not a mlflow_eigencam record")
    if _PREFIX.size + head_len > len(raw):
        raise SpoolError(f"{path}: truncated record")
    view = memoryview(raw)[_PREFIX.size:]
    if zlib.crc32(view) & 0xFFFFFFFF != crc:
        raise SpoolError(f"{path}: checksum mismatch (damaged record)")
    try:
        header = json.loads(bytes(view[:head_len]).decode("utf-8"))
    except ValueError as exc:
        raise SpoolError(f"{path}: bad header: {exc}") from exc
    if not isinstance(header, dict):
        raise SpoolError(f"{path}: bad header")
    data = view[head_len:]
    blobs = []
    for r in header.get("blobs") or []:
        if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) for x in r)
                or r[0] < 0 or r[1] < 0 or r[0] + r[1] > len(data)):
            raise SpoolError(f"{path}: bad blob range {r!r}")
        blobs.append(data[r[0]:r[0] + r[1]])
    return header, data, blobs


def record_paths(folder: Path) -> List[Path]:
    """Records in ``folder`` in send order; symlinks and other names are left out."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        if (e.name.endswith(RECORD_SUFFIX) and not e.name.startswith(".")
                and e.is_file(follow_symlinks=False)):
            out.append(Path(e.path))
    return sorted(out, key=lambda p: p.name)


def symlinked_entries(folder: Path) -> List[str]:
    """Names in ``folder`` that are symlinks (reported, never followed)."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_symlink())
    except OSError:
        return []


def remove_stale_temps(folder: Path) -> None:
    """Delete what a killed process left half-done: records under our temp names, and our own
    marked staging folders (``.tmp-send-*``, see :func:`make_staging`)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        if not e.name.startswith(_TMP_PREFIX):
            continue
        if e.is_file(follow_symlinks=False):
            _unlink_quiet(Path(e.path))
        elif e.is_dir(follow_symlinks=False):
            remove_staging(Path(e.path))


def make_staging(parent: Optional[Path]) -> Path:
    """A fresh, marked folder to lay out one upload in (inside ``parent``, else the system's
    temporary folder); only :func:`remove_staging` removes it."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + "send-",
                                   dir=None if parent is None else str(parent)))
    _mark(folder)
    return folder


def remove_staging(folder: Path) -> None:
    """Remove a staging folder made by :func:`make_staging`: only if it carries our marker."""
    import shutil

    if is_marked(folder) and Path(folder).name.startswith(_TMP_PREFIX + "send-"):
        shutil.rmtree(folder, ignore_errors=True)


def child_folders(root: Path) -> Iterator[Path]:
    """This root's per-logger folders: real, marked sub-folders (symlinks never followed)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False) and is_marked(Path(e.path)):
            yield Path(e.path)


def failed_dir_problem(folder: Path) -> Optional[str]:
    """Why records of ``folder`` cannot be set aside in its ``failed/`` (a symlink, a file or
    a folder that is not ours stands there), or None (absent, or our marked folder)."""
    failed = folder / FAILED_DIR
    try:
        mode = os.lstat(failed).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{failed}: {exc}"
    if stat.S_ISLNK(mode):
        return f"{failed} is a symlink (not followed)"
    if not stat.S_ISDIR(mode):
        return f"{failed} is {_kind(mode)}, not a folder"
    if not is_marked(failed) and any(True for _ in os.scandir(failed)):
        return f"{failed} is a folder that mlflow_eigencam did not make"
    return None


def set_aside(folder: Path, record: Path, reason: str) -> Path:
    """Move a record MLflow refused for good into ``folder/failed/`` with a note; returns it.

    Raises:
        SpoolError: ``failed`` is a symlink, a file or a folder that is not ours.
    """
    failed = folder / FAILED_DIR
    if not is_marked(failed):
        problem = failed_dir_problem(folder)
        if problem:
            raise SpoolError(problem)
        failed.mkdir(exist_ok=True)
        if os.path.islink(failed) or not failed.is_dir():
            raise SpoolError(f"{failed} is not a folder of ours")
        _mark(failed)
    target = failed / record.name
    os.replace(record, target)
    _write_atomic(failed, record.name[: -len(RECORD_SUFFIX)] + ".err",
                  [reason.encode("utf-8", "replace")], fsync=False)
    return target


class FolderLock:
    """An exclusive ``flock`` on ``folder/.lock``: held while a logger or ``send-spool`` uses
    the folder, released by the kernel when the process dies (so a killed run's folder can be
    taken over, and a live one is never). Where ``fcntl`` is missing it always succeeds."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # Windows: no cross-process lock; best effort
            return True
        path = self.folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SpoolError(f"{path} is a symlink; not followed") from exc
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SpoolError(f"{path} is {_kind(st.st_mode)}, not a lock file of ours")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_folder_if_done(folder: Path) -> bool:
    """Remove a per-logger folder that holds nothing left to send: only our own file names
    (marker, run file, lock), then ``rmdir``, which fails if anything else is inside."""
    if not is_marked(folder) or record_paths(folder):
        return False
    remove_stale_temps(folder)
    for name in (RUN_FILE, LOCK_FILE, MARKER):
        p = folder / name
        if os.path.lexists(p) and not os.path.islink(p):
            _unlink_quiet(p)
    try:
        os.rmdir(folder)
        return True
    except OSError:  # something else is in there (failed/ records, a user's file): keep it
        if not os.path.lexists(folder / MARKER):
            _mark(folder)
        return False
