"""Several layers (``layers=[...]``, docs/layers.md): what the logger keeps of the layers
after the first one.

Activations come as ``{layer name: (B, C, h, w)}``; the first layer goes through the sample
buffer as a single layer does (its table columns and metrics unchanged), the further ones are
kept here per sample, copied for the kept rows only, and explained with the same math
(:func:`~mlflow_eigencam.eigencam.eigencam`) at the epoch end. Their names, columns and
metric keys: ``_layout.layer_column`` / ``layer_metric_key``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _layout
from .eigencam import EigenCAMResult, _lapack_threads, eigencam

__all__ = ["FurtherLayers"]

Key = Tuple[str, Optional[str]]
#: One further layer at an epoch end: (name, its EigenCAM of the kept samples, their scores).
LayerResult = Tuple[str, EigenCAMResult, List[Optional[float]]]


class FurtherLayers:
    """The layers after the first of ``{layer: activations}`` batches, per (mode, ds_id)."""

    def __init__(self) -> None:
        #: Every layer's name, the first first (None until a batch named them).
        self.names: Optional[Tuple[str, ...]] = None
        # Per key, sample index -> {further layer: ((C, h, w) float32, faithfulness score)}.
        self._kept: Dict[Key, Dict[int, Dict[str, Tuple[np.ndarray, Optional[float]]]]] = {}

    def split(self, activations: Any, faithfulness: Any, capped: bool) -> Tuple[Any, Any, Dict[str, Any]]:
        """A batch's ``activations`` and ``faithfulness`` -> (the first layer's activations,
        its scores, ``{further layer: (activations, scores or None)}``); an array passes
        as it is (``{}``).

        Raises:
            ValueError: an empty mapping, names other than the earlier batches', names not
                distinct as key segments, one array after several layers, or several layers
                with ``n_samples=None`` (``capped`` False).
        """
        if not isinstance(activations, Mapping):
            if self.names is not None and len(self.names) > 1:
                raise ValueError(f"activations must be {{layer: array}} for the layers "
                                 f"{list(self.names)}, got one array")
            return activations, faithfulness, {}
        names = tuple(str(k) for k in activations)
        if not names:
            raise ValueError("activations is an empty mapping; expected {layer name: array}")
        if self.names is None:
            if len({_layout.layer_segment(n) for n in names}) < len(names):
                raise ValueError(f"layer names {list(names)} are not distinct as key segments")
            self.names = names
        elif names != self.names:
            raise ValueError(f"activations name the layers {list(names)}, but earlier batches "
                             f"named {list(self.names)}; give the same layers every batch")
        if len(names) > 1 and not capped:
            raise ValueError("several layers need a capped n_samples (not None)")
        scores = dict(faithfulness) if isinstance(faithfulness, Mapping) else {names[0]: faithfulness}
        more = {n: (activations[n], scores.get(n)) for n in names[1:]}
        return activations[names[0]], scores.get(names[0]), more

    @staticmethod
    def check(more: Dict[str, Any], batch: int, channels_last: bool) -> Dict[str, Any]:
        """:meth:`split`'s further layers as ``(B, C, h, w)`` views, checked before the
        buffer keeps anything of the batch.

        Raises:
            ValueError: activations not 4-D or not one row per image; scores of another length.
        """
        out = {}
        for name, (acts, scores) in more.items():
            arr = np.asarray(acts)
            if arr.ndim != 4 or arr.shape[0] != batch:
                axes = "(B, h, w, C)" if channels_last else "(B, C, h, w)"
                raise ValueError(f"activations of layer {name!r} must be {axes} with the batch's "
                                 f"{batch} rows, got shape {arr.shape}")
            if scores is not None and len(scores) != batch:
                raise ValueError(f"faithfulness of layer {name!r} has {len(scores)} entries but "
                                 f"the batch has {batch} images")
            out[name] = (np.moveaxis(arr, -1, 1) if channels_last else arr, scores)
        return out

    def keep(self, key: Key, indices: List[int], more: Dict[str, Any]) -> None:
        """Copy the kept rows (the batch's first ``len(indices)``, sample indices
        ``indices``) of :meth:`check`'s layers: float32 ``(C, h, w)`` and the row's score."""
        kept = self._kept.setdefault(key, {})
        for name, (acts, scores) in more.items():
            head = np.array(acts[:len(indices)], dtype=np.float32, copy=True)
            for row, index in enumerate(indices):
                score = None if scores is None or scores[row] is None else float(scores[row])
                kept.setdefault(index, {})[name] = (head[row], score)

    def take(self, key: Key, indices: List[int], n_components: Union[int, float]) -> List[LayerResult]:
        """The further layers of the samples ``indices`` of ``key``, explained (an int
        ``n_components`` above a layer's channels uses them all), and forgotten."""
        kept = self._kept.pop(key, {})
        out: List[LayerResult] = []
        for name in (self.names or ())[1:]:
            acts = np.stack([kept[i][name][0] for i in indices])
            k = n_components
            if not isinstance(k, (bool, float)):
                k = min(int(k), acts.shape[1])
            with _lapack_threads(0):  # one BLAS thread, as for the first layer
                result = eigencam(acts, k)
            out.append((name, result, [kept[i][name][1] for i in indices]))
        return out

    def discard(self, key: Key) -> None:
        """Forget what ``key`` kept this epoch."""
        self._kept.pop(key, None)

    def keys(self, key: Key) -> List[Any]:
        """The signal keys of the further layers of ``key``: ``(mode, ds_id, layer)`` (the
        logger's per-key signals take any hashable key)."""
        return [(key[0], key[1], name) for name in (self.names or ())[1:]]
