"""Cost of EigenCAMCallback per logged evaluation in a transformers ``Trainer`` (tiny ViT, CPU).

The same seeded ``Trainer.train()`` with and without the callback, interleaved (A B A B) so
drifts in machine load hit both arms alike. Printed: each arm's median ``train_runtime``,
their difference per evaluation, the median training step of each arm, and the
process CPU time of each arm (less sensitive than wall time to other processes on a
shared machine), the median ``eval_runtime`` Trainer reports for each arm (its evaluation
loop, where the callback's hooks keep the first samples' rows and, with the faithfulness
signal, score them), and the callback's own time inside ``on_evaluate`` (EigenCAM,
rendering, writing the record; the upload runs on a background thread and is only in the
whole-run difference).

    python benchmarks/bench_transformers_overhead.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import mlflow  # noqa: E402
import torch  # noqa: E402
from transformers import (Trainer, TrainerCallback, TrainingArguments, ViTConfig,  # noqa: E402
                          ViTForImageClassification)

from _shapes import make_shapes  # noqa: E402
from mlflow_eigencam.transformers import EigenCAMCallback  # noqa: E402


class Shapes(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        x, y, _ = make_shapes(n, 32, n_classes=4, seed=seed)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class StepTimes(TrainerCallback):
    """Wall time of each training step (forward, backward, optimizer), evaluations excluded."""

    def __init__(self) -> None:
        self.times: list = []
        self._start = 0.0

    def on_step_begin(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter() - self._start)


class Timed(EigenCAMCallback):
    """The callback, with the time spent in its ``on_evaluate`` recorded."""

    times: list

    def on_evaluate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start, cpu = time.perf_counter(), time.thread_time()
        super().on_evaluate(*args, **kwargs)
        self.times.append((time.perf_counter() - start, time.thread_time() - cpu))


def run(with_callback: bool, args: argparse.Namespace, out: str) -> tuple:
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, num_labels=4))
    callback = Timed(n_samples=args.n_samples) if with_callback else None
    if callback is not None:
        callback.times = []
    steps = StepTimes()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=32,
            per_device_eval_batch_size=32, eval_strategy="steps", eval_steps=args.eval_steps,
            save_strategy="no", logging_strategy="no", report_to=["mlflow"], use_cpu=True, seed=0,
            disable_tqdm=True),
        train_dataset=Shapes(args.train_size, 0), eval_dataset=Shapes(64, 1),
        callbacks=[steps] + ([callback] if callback is not None else []))
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    if callback is not None:
        callback.close()  # the background upload's CPU is counted too
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    n_evals = sum(1 for e in trainer.state.log_history if "eval_loss" in e)
    loops = [e["eval_runtime"] for e in trainer.state.log_history if "eval_runtime" in e]
    return wall, cpu, n_evals, (callback.times if callback is not None else []), steps.times, loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--eval-steps", type=int, default=8)
    parser.add_argument("--n-samples", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=3, help="interleaved without/with pairs")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as d:
        os.environ["MLFLOW_EIGENCAM_SPOOL_DIR"] = os.path.join(d, "spool")
        mlflow.set_tracking_uri(f"sqlite:///{d}/mlflow.db")
        mlflow.set_experiment("bench-transformers")
        run(False, args, d + "/warm")  # imports, first MLflow writes
        walls: dict = {False: [], True: []}
        cpus: dict = {False: [], True: []}
        step_times: dict = {False: [], True: []}
        loop_times: dict = {False: [], True: []}
        inside: list = []
        n_evals = 0
        for arm in (False, True) * args.pairs:
            wall, cpu, n_evals, times, steps, loops = run(arm, args, f"{d}/out")
            loop_times[arm] += loops[1:]  # the first evaluation also finds the layer
            walls[arm].append(wall)
            cpus[arm].append(cpu)
            step_times[arm] += steps
            inside += times[1:]  # the first evaluation also finds the layer
            print(f"{'with' if arm else 'without'}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    without, with_ = statistics.median(walls[False]), statistics.median(walls[True])
    print(f"training step, median: without {statistics.median(step_times[False]) * 1e3:.0f} ms, "
          f"with {statistics.median(step_times[True]) * 1e3:.0f} ms")
    print(f"train() wall, median of {args.pairs}: without {without:.2f} s, with {with_:.2f} s "
          f"({n_evals} evaluations of 64 images; {args.n_samples} pinned images logged each)")
    print(f"difference per evaluation: {(with_ - without) / n_evals * 1e3:.0f} ms "
          f"({(with_ - without) / without * 100:+.1f} % of the run)")
    cpu_without, cpu_with = statistics.median(cpus[False]), statistics.median(cpus[True])
    print(f"process CPU (all threads, upload included), median: without {cpu_without:.2f} s, with "
          f"{cpu_with:.2f} s: {(cpu_with - cpu_without) / n_evals * 1e3:.0f} ms per evaluation")
    print(f"Trainer's eval_runtime (the evaluation loop, after the first), median: without "
          f"{statistics.median(loop_times[False]) * 1e3:.0f} ms, "
          f"with {statistics.median(loop_times[True]) * 1e3:.0f} ms")
    print(f"inside on_evaluate (after the first): median {statistics.median(t for t, _ in inside) * 1e3:.0f} ms "
          f"wall, {statistics.median(c for _, c in inside) * 1e3:.0f} ms CPU of the training thread, "
          f"n={len(inside)}")


if __name__ == "__main__":
    main()
