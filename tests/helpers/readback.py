"""Read back from MLflow what a user would see: image series by key and step, artifacts,
tables, metrics. Also a real `mlflow server` process for the tests that need one."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

_IMAGE_NAME = re.compile(r"^(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%](?P<ts>\d+)"
                         r"[+%](?P<uuid>[0-9a-f-]+)\.png$")


def image_series(client, run_id: str) -> Dict[str, Dict[int, str]]:
    """{key: {step: artifact_path}} for every image logged with ``log_image(key=..., step=...)``."""
    out: Dict[str, Dict[int, str]] = defaultdict(dict)
    for f in client.list_artifacts(run_id, "images"):
        name = f.path.split("/", 1)[1]
        m = _IMAGE_NAME.match(name)
        if m:
            out[m.group("key").replace("~", "/").replace("#", "/")][int(m.group("step"))] = f.path
    return dict(out)


def load_png(client, run_id: str, path: str) -> np.ndarray:
    """An artifact PNG as an (H, W, 3) uint8 array."""
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        local = client.download_artifacts(run_id, path, d)
        with Image.open(local) as im:
            return np.asarray(im.convert("RGB"))


def load_json(client, run_id: str, path: str) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(client.download_artifacts(run_id, path, d)).read_text())


def list_all(client, run_id: str, path: str = "") -> List[str]:
    out = []
    for f in client.list_artifacts(run_id, path or None):
        if f.is_dir:
            out += list_all(client, run_id, f.path)
        else:
            out.append(f.path)
    return out


def metric_steps(client, run_id: str, key: str) -> List[Tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to a process started with ``start_new_session=True`` and its children (a
    server's workers), SIGKILL after ``timeout`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and served local artifacts."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not start in {timeout}s: "
                           f"{(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc, timeout=15)
        self.proc = None
