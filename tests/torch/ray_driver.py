"""The driver of the Ray Train test (run by test_ray_train.py in its own process, so that a
hang fails the test's timeout instead of blocking CI): the driver makes the MLflow run, two
CPU workers train under TorchTrainer (DDP over gloo), rank 0 logs into the driver's run."""

from __future__ import annotations

import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def train_loop(config: dict) -> None:
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from mlflow_eigencam.pytorch import EigenCAMMonitor
    from tests.helpers.torch_models import TinyResNet, all_hooks, shapes_tensors

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"addr{rank}.txt").write_text(os.environ.get("MASTER_ADDR", ""))
    torch.manual_seed(0)
    model = TinyResNet(width=4)
    ddp = prepare_model(model)  # DistributedDataParallel on CPU
    monitor = EigenCAMMonitor(ddp, n_samples=3, run_id=config["run_id"],
                              tracking_uri=config["tracking_uri"])
    x, y = shapes_tensors(16, 16, seed=rank)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for epoch in range(2):
        ddp.train()
        loss = torch.nn.functional.cross_entropy(ddp(x[:8]), y[:8])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ddp.eval()
        with torch.no_grad():
            for i in range(0, 16 if rank == 0 else 8, 8):  # ranks out of step on purpose
                with monitor.capture("eval", "val"):
                    monitor.update(x[i:i + 8], y[i:i + 8], ddp(x[i:i + 8]))
        monitor.epoch_end(epoch)
    monitor.close()
    out = {"rank": rank, "run_id": monitor.run_id, "has_logger": monitor.logger is not None,
           "hooks": all_hooks(model), "target": monitor.target_layer}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))


def main() -> None:
    import mlflow
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.environ["RAY_TEST_OUT"]
    # Loopback only: Ray's processes and the workers' gloo group talk to 127.0.0.1, never to
    # the machine's other addresses. Ray maps 127.0.0.1 to the machine's address unless
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (set by the test for this whole process tree).
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                                       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                       "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}})
    try:
        with mlflow.start_run() as run:
            TorchTrainer(
                train_loop,
                train_loop_config={"run_id": run.info.run_id,
                                   "tracking_uri": mlflow.get_tracking_uri(),
                                   "out": out, "here": str(HERE)},
                scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                run_config=RunConfig(storage_path=str(Path(out) / "ray"), name="eigencam"),
            ).fit()
        Path(out, "driver.json").write_text(json.dumps({"run_id": run.info.run_id}))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
