"""Small helpers shared by the example scripts (no framework imports)."""

from __future__ import annotations

from pathlib import Path


def ui_uri(tracking_uri: str) -> str:
    """The tracking URI with a relative sqlite path made absolute, so the printed
    ``mlflow ui`` command works from any folder (artifact locations are absolute already)."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and not tracking_uri.startswith(prefix + "/"):
        return prefix + str(Path(tracking_uri[len(prefix):]).resolve())
    return tracking_uri
