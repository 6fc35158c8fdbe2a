"""Pinned samples: the same images at every epoch even when the loader shuffles."""

from __future__ import annotations

import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader, TensorDataset

from mlflow_eigencam.pytorch import EigenCAMMonitor
from tests.helpers.torch_models import TinyCNN, all_hooks, image_counts, table_rows


def _run(x, y, pin: bool, epochs: int = 3):
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    monitor = EigenCAMMonitor(model, n_samples=4, pin_samples=pin)
    for epoch in range(epochs):
        model.train()
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for xb, yb in loader:  # shuffled again every epoch
                with monitor.capture("eval", "val"):
                    monitor.update(xb, yb, model(xb))
        monitor.epoch_end(epoch)
        assert all_hooks(model) == 0
    monitor.close()
    return monitor.run_id


def _ids_by_epoch(client, run_id):
    rows = table_rows(client, run_id, "eval", "val")
    by_epoch = {}
    for row in rows:
        by_epoch.setdefault(row["epoch"], []).append((row["sample_index"], row["sample_id"], row["label"]))
    return {epoch: sorted(v) for epoch, v in by_epoch.items()}


def test_pinned_samples_are_identical_at_every_epoch(tracking_uri, shapes):
    x, y = shapes
    client = MlflowClient()
    run_id = _run(x, y, pin=True)
    by_epoch = _ids_by_epoch(client, run_id)
    assert sorted(by_epoch) == [0, 1, 2]
    assert len(by_epoch[0]) == 4
    assert by_epoch[0] == by_epoch[1] == by_epoch[2]  # same index, image content and label
    assert image_counts(client, run_id) == {
        (f"eigencam/eval/val/sample_{i}", step): 1 for i in range(4) for step in range(3)}


def test_without_pinning_a_shuffling_loader_shows_other_samples(tracking_uri, shapes):
    x, y = shapes
    by_epoch = _ids_by_epoch(MlflowClient(), _run(x, y, pin=False))
    ids = [[sid for _, sid, _ in by_epoch[e]] for e in range(3)]
    assert ids[0] != ids[1] or ids[1] != ids[2]
