"""One rank of the two-process DDP test (gloo, CPU). Run by test_torch_ddp.py.

Rank 1 evaluates fewer batches than rank 0 and calls epoch_end at another moment: if the
monitor did any collective (barrier, broadcast, a DDP forward with buffer sync) the ranks
would fall out of step and hang until the test's timeout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mlflow_eigencam.pytorch import EigenCAMMonitor  # noqa: E402
from tests.helpers.torch_models import TinyResNet, all_hooks, shapes_tensors


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = TinyResNet(width=4)  # has BatchNorm buffers: DDP broadcasts them in training
    ddp = nn.parallel.DistributedDataParallel(model)
    monitor = EigenCAMMonitor(ddp, n_samples=3)
    x, y = shapes_tensors(32, 16, seed=rank)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for epoch in range(2):
        ddp.train()
        for i in range(0, 16, 8):
            loss = nn.functional.cross_entropy(ddp(x[i:i + 8]), y[i:i + 8])
            opt.zero_grad()
            loss.backward()  # all-reduce: both ranks meet here every step
            opt.step()
        ddp.eval()
        with torch.no_grad():
            for i in range(0, 16 if rank == 0 else 8, 8):
                with monitor.capture("eval", "val"):
                    monitor.update(x[i:i + 8], y[i:i + 8], ddp(x[i:i + 8]))
        monitor.epoch_end(epoch)
    monitor.close()
    out = {"rank": rank, "run_id": monitor.run_id, "has_logger": monitor.logger is not None,
           "hooks": all_hooks(model), "target": monitor.target_layer}
    Path(os.environ["DDP_OUT"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
