"""Shared checks of the real-architecture tests: run a monitor for two epochs on fixed images,
read the epoch back from MLflow, and compare it with a plain per-sample SVD of the tensor the
target-layer tag names."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from mlflow import MlflowClient
from torch import nn

from mlflow_eigencam import _layout
from mlflow_eigencam.pytorch import EigenCAMMonitor, resolve_target_layer, tokens_to_grid
from tests.helpers.oracle import plain_svd as _plain_svd
from tests.helpers.readback import load_json, load_png

K = 3  # components, the monitor's default


def plain_svd(act: np.ndarray, k: int = K) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`readback.plain_svd` with the monitor's default ``k``."""
    return _plain_svd(act, k)


def state_of(model: nn.Module) -> Dict[str, Any]:
    """Everything the monitor must leave as it was: tensors, flags, hooks, the RNG."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": [m.training for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "rng": torch.get_rng_state().clone(),
        "grads": [p.grad is None for p in model.parameters()],
    }


def assert_state_unchanged(before: Dict[str, Any], model: nn.Module) -> None:
    after = state_of(model)
    assert after["flags"] == before["flags"]
    assert after["hooks"] == before["hooks"] == 0
    assert torch.equal(after["rng"], before["rng"])
    assert after["grads"] == before["grads"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key


def run_two_epochs(model: nn.Module, images: Any, forward: Callable[[Any], Any],
                   labels: Any = None, **monitor_kwargs: Any) -> EigenCAMMonitor:
    """Two validation epochs on the same images, the model put back in train mode between
    them as a training loop would (no optimiser step: the maps must then be equal)."""
    monitor = EigenCAMMonitor(model, **monitor_kwargs)
    for epoch in range(2):
        model.eval()
        with torch.no_grad(), monitor.capture("eval", "val"):
            out = forward(images)
            monitor.update(images, labels, out)
        monitor.epoch_end(epoch)
        model.train()
    monitor.close()
    return monitor


def rows_by_epoch(client: MlflowClient, run_id: str) -> Dict[int, List[dict]]:
    table = load_json(client, run_id, _layout.table_path("eval", "val"))
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    out: Dict[int, List[dict]] = {}
    for row in rows:
        out.setdefault(row["epoch"], []).append(row)
    return {e: sorted(v, key=lambda r: r["sample_index"]) for e, v in out.items()}


def explained_tensor(model: nn.Module, tag: str, inputs: Any) -> np.ndarray:
    """What the tag says is explained: the named layer's output on ``inputs`` (eval, no grad),
    folded onto the patch grid the tag names (prefix tokens dropped), or permuted from the
    channels-last layout the tag names."""
    name, module = resolve_target_layer(model, tag)
    seen: Dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        seen.setdefault("out", (out if isinstance(out, torch.Tensor) else out[0]).detach().clone())

    flags = [m.training for m in model.modules()]
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
        for m, f in zip(model.modules(), flags):
            m.training = f
    out = seen["out"]
    grid: Optional[Tuple[int, int]] = None
    m = re.search(r"folded to a (\d+)x(\d+) patch grid", tag)
    if m:
        grid = (int(m.group(1)), int(m.group(2)))
    return tokens_to_grid(out, None, grid, channels_last="channels-last" in tag).float().numpy()


def check_logged_epochs(client: MlflowClient, monitor: EigenCAMMonitor, model: nn.Module,
                        inputs: Any, n: int) -> Tuple[str, Dict[int, List[dict]], np.ndarray]:
    """The checks every model shares; returns (tag, rows by epoch, the explained tensor)."""
    run = client.get_run(monitor.run_id)
    tag = run.data.tags[_layout.TAG_TARGET_LAYER]
    assert tag == monitor.target_layer_tag
    by_epoch = rows_by_epoch(client, monitor.run_id)
    assert sorted(by_epoch) == [0, 1] and all(len(v) == n for v in by_epoch.values())
    # The same images at both epochs, with the same ratios and the same strip pixels.
    for r0, r1 in zip(by_epoch[0], by_epoch[1]):
        assert r0["sample_id"] == r1["sample_id"]
        assert [r0[f"evr_{c}"] for c in range(1, K + 1)] == [r1[f"evr_{c}"] for c in range(1, K + 1)]
        np.testing.assert_array_equal(load_png(client, monitor.run_id, r0["image"]),
                                      load_png(client, monitor.run_id, r1["image"]))
    # The ratios are a plain SVD's of the tensor the tag names.
    act = explained_tensor(model, tag, inputs)
    _, ratios = plain_svd(act[:n])
    logged = np.array([[r[f"evr_{c}"] for c in range(1, K + 1)] for r in by_epoch[0]])
    np.testing.assert_allclose(logged, ratios, atol=2e-5)
    return tag, by_epoch, act


def assert_strip_close(client: MlflowClient, run_id: str, row: dict, expected: np.ndarray) -> None:
    """The logged strip PNG against one rendered here from the plain-SVD maps: equal but for
    a few pixels where float32 and float64 round a heat value to neighbouring colours."""
    got = load_png(client, run_id, row["image"]).astype(np.int16)
    assert got.shape == expected.shape
    diff = np.abs(got - expected.astype(np.int16))
    assert (diff.max(axis=2) > 0).mean() < 0.01, f"{(diff.max(axis=2) > 0).mean():.4f} of pixels differ"
    assert diff.mean() < 0.2
