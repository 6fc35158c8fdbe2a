"""Streaming mode (``n_samples=None``): keep what is needed to render, not renders.

A full validation set every epoch cannot be rendered and uploaded strip by strip on the
training thread (measured before this module: +106 % on a no-grad eval pass, 141 MB of
artifacts per epoch for 2,000 small images, the whole table re-sent every epoch). So per
(mode, ds_id) the logger keeps, batch by batch, only copies:

* the input image of each sample **once per run**, matched by ``sample_id`` (the same
  validation images come back every epoch): ``stream/inputs_{token}.npz``, one file per
  batch that brought new images, one ``{sample_id}.npy`` (H, W, 3) uint8 member each;
* per epoch, the maps at the layer's own low resolution, quantised to uint8, the ratios
  and an index: ``epoch_{e:04d}/maps.npz``;
* per epoch, the table rows as a part file ``table/epoch_{e:04d}-{ms}-{writer}.json``
  (MLflow's split format, like ``samples.json``; written by the logger as in capped mode),
  so the table grows by appending, never by re-sending.

The grid's first ``grid_max_rows`` samples are rendered at once (grid, strip PNGs, image
series, exactly as with a capped ``n_samples``); a row whose strip was not rendered has
``image == ""`` and :func:`render_stored` renders it on demand, with the same look, from
the stored input and maps (``compare`` and the explorer call it).

Disk per image: ``H * W * 3`` bytes once per run (+ ~0.2 kB of zip and npy headers); per
epoch ``k * h * w`` bytes of maps, ``4 k`` bytes of ratios and ~0.3 kB of index and table
row. Memory: the current batch, at most ``grid_max_rows`` strips and one small dict per row.

Maps are stored as ``q = rint(255 * relu(m) / max(relu(m)))`` per map: the overlay applies
the ReLU and a min-max normalisation anyway, so only the 8-bit rounding of the low-
resolution map is lost, and live strips of streamed epochs are drawn from ``q`` too, so a
strip rendered later is pixel for pixel the one rendered live.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _layout
from .render import PNGBand, encode_png, render_card

__all__ = ["StreamEpoch", "quantize_maps", "render_stored", "stored_strip"]

#: Format of ``maps.npz``'s ``index.json`` (bumped when its meaning changes).
FORMAT = 1
_INDEX = "index.json"


def quantize_maps(maps: np.ndarray) -> np.ndarray:
    """(n, k, h, w) float maps -> uint8: ReLU, then each map scaled so its maximum is 255.

    An all-non-positive map (no evidence after the ReLU) becomes all zeros.
    """
    m = np.maximum(np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0), 0.0)
    peak = m.max(axis=(-2, -1), keepdims=True)
    scale = np.divide(255.0, peak, out=np.zeros_like(peak), where=peak > 0)
    return np.rint(m * scale).astype(np.uint8)


def stored_strip(image: np.ndarray, qmaps: np.ndarray, evr: np.ndarray, *, label: Optional[str],
                 pred: Optional[str], correct: Optional[bool], sample_id: Optional[str],
                 colormap: Any, alpha: float) -> np.ndarray:
    """The strip of a streamed sample: image (H, W, 3) uint8, qmaps (k, h, w) uint8, evr
    (k,) float. The one drawing used live and on demand, so both give the same pixels."""
    return render_card(image, qmaps.astype(np.float32), explained_variance=evr, label=label,
                       pred=pred, correct=correct, sample_id=sample_id, colormap=colormap,
                       alpha=alpha)


@dataclass
class StreamEpoch:
    """One (mode, ds_id)'s streamed epoch in progress: files in ``folder``, few arrays.

    ``stored`` is the run's {sample_id: inputs artifact path} for this (mode, ds_id),
    shared between epochs; images first seen this epoch join it only in :meth:`commit`,
    after the epoch was handed to the sink (a discarded epoch uploads nothing, so its
    images are stored again by the next one).
    """

    folder: Path
    key: Tuple[str, Optional[str]]
    grid_max_rows: int
    colormap: Any
    alpha: float
    stored: Dict[str, str]
    count: int = 0
    batches: int = 0
    evr_sum: Optional[np.ndarray] = None
    rows: List[dict] = field(default_factory=list)
    grid_strips: List[np.ndarray] = field(default_factory=list)
    _index: List[list] = field(default_factory=list)
    _new: Dict[str, str] = field(default_factory=dict)
    _inputs: Dict[str, Path] = field(default_factory=dict)

    def add(self, samples: Sequence[Any], maps: np.ndarray, evr: np.ndarray,
            make_row: Callable[[Any, np.ndarray], dict]) -> None:
        """Keep one batch (training thread; copies and small writes only).

        Args:
            samples: ``samples.Sample`` objects of the batch; their ``index`` is set here
                (position in the epoch).
            maps: float32 (n, k, h, w) EigenCAM maps of these samples.
            evr: float32 (n, k) explained-variance ratios.
            make_row: (sample, evr row) -> table row dict.
        """
        mode, ds_id = self.key
        b = self.batches
        q = quantize_maps(maps)
        evr = np.asarray(evr, dtype=np.float32)
        np.save(self.folder / f"maps_{b:05d}.npy", q)
        np.save(self.folder / f"evr_{b:05d}.npy", evr)
        new: Dict[str, np.ndarray] = {}
        for s in samples:
            if s.sample_id not in self.stored and s.sample_id not in self._new:
                new.setdefault(s.sample_id, s.image)
        if new:
            token = uuid.uuid4().hex[:12]
            path = _layout.stream_inputs_path(mode, ds_id, token)
            local = self.folder / f"inputs_{token}.npz"
            # ZIP_STORED: raw pixels, no compression on the training thread (np.load reads it).
            with zipfile.ZipFile(local, "w", zipfile.ZIP_STORED) as z:
                for sid, image in new.items():
                    with z.open(f"{sid}.npy", "w") as f:
                        np.lib.format.write_array(f, np.ascontiguousarray(image), allow_pickle=False)
            self._inputs[path] = local
            for sid in new:
                self._new[sid] = path
        for i, s in enumerate(samples):
            s.index = self.count + i
            where = self.stored.get(s.sample_id) or self._new[s.sample_id]
            self._index.append([b, i, s.sample_id, where, s.label, s.pred, s.correct])
            self.rows.append(make_row(s, evr[i]))
            if len(self.grid_strips) < self.grid_max_rows:
                self.grid_strips.append(stored_strip(
                    s.image, q[i], evr[i], label=s.label, pred=s.pred, correct=s.correct,
                    sample_id=s.sample_id, colormap=self.colormap, alpha=self.alpha))
        self.count += len(samples)
        self.batches += 1
        total = evr.sum(axis=0, dtype=np.float64)
        if self.evr_sum is None:
            self.evr_sum = total
        else:  # n_components as a fraction can change k between batches: pad to the longer
            k = max(len(total), len(self.evr_sum))
            self.evr_sum = np.pad(self.evr_sum, (0, k - len(self.evr_sum))) + \
                np.pad(total, (0, k - len(total)))

    def finish(self, epoch: int) -> Dict[str, Any]:
        """Write the epoch's ``maps.npz``; returns {artifact path: local file} to upload
        (the maps and the input files first written this epoch). Sets ``epoch`` in rows."""
        mode, ds_id = self.key
        local = self.folder / "maps.npz"
        index = {"format": FORMAT, "epoch": int(epoch), "colormap": self.colormap,
                 "alpha": self.alpha,
                 "columns": ["batch", "row", "sample_id", "inputs", "label", "prediction", "correct"],
                 "samples": self._index}
        with zipfile.ZipFile(local, "w", zipfile.ZIP_STORED) as z:
            z.writestr(_INDEX, json.dumps(index))
            for b in range(self.batches):
                for name in (f"maps_{b:05d}.npy", f"evr_{b:05d}.npy"):
                    z.write(self.folder / name, name)
        for row in self.rows:
            row["epoch"] = int(epoch)
        files: Dict[str, Any] = {_layout.stream_maps_path(mode, ds_id, epoch): local}
        files.update(self._inputs)
        return files

    def commit(self) -> None:
        """The epoch is with the sink: its new images are stored for the run."""
        self.stored.update(self._new)
        self._new = {}


def _npy(z: zipfile.ZipFile, name: str) -> np.ndarray:
    with z.open(name) as f:
        return np.lib.format.read_array(io.BytesIO(f.read()), allow_pickle=False)


def render_stored(read_artifact: Callable[[str], bytes], mode: str, ds_id: Optional[str],
                  epoch: int, sample_index: int) -> Optional[bytes]:
    """The strip PNG of one streamed sample, rendered from the stored input and maps.

    Args:
        read_artifact: artifact path of the run -> its bytes; raises FileNotFoundError when
            there is no such artifact. Called twice per strip (the epoch's ``maps.npz``,
            then one inputs file of at most one batch of images): a reader that renders
            many rows should cache it (``functools.lru_cache``).
        mode, ds_id: as given to the logger (sanitised here through ``_layout``).
        epoch: the epoch (``step``) of the table row.
        sample_index: the row's ``sample_index``.

    Returns:
        PNG bytes, the same pixels (and bytes) as a strip rendered live at that epoch; None
        when the epoch was not stored in streaming form or the sample is not in it.
    """
    try:
        raw = read_artifact(_layout.stream_maps_path(mode, ds_id, epoch))
    except FileNotFoundError:
        return None
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        index = json.loads(z.read(_INDEX))
        samples = index.get("samples", [])
        if not 0 <= int(sample_index) < len(samples):
            return None
        b, row, sid, inputs, label, pred, correct = samples[int(sample_index)]
        qmaps = _npy(z, f"maps_{int(b):05d}.npy")[int(row)]
        evr = _npy(z, f"evr_{int(b):05d}.npy")[int(row)]
    if not str(inputs).startswith(_layout.prefix(mode, ds_id) + "/stream/"):
        return None  # an index that points outside this section: not ours to follow
    try:
        raw_inputs = read_artifact(inputs)
    except FileNotFoundError:
        return None
    with zipfile.ZipFile(io.BytesIO(raw_inputs)) as z:
        image = _npy(z, f"{sid}.npy")
    if image.dtype != np.uint8 or image.ndim != 3 or qmaps.dtype != np.uint8:
        return None
    strip = stored_strip(image, qmaps, evr, label=label, pred=pred, correct=correct,
                         sample_id=sid, colormap=index.get("colormap", "jet"),
                         alpha=float(index.get("alpha", 0.5)))
    return encode_png([PNGBand(strip)])
