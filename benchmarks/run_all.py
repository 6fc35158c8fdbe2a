"""Run every benchmark, each in its own process, and write docs/performance.md.

Every figure is measured in this run, side by side with its baseline; nothing is copied from
an earlier run. torch and TensorFlow benchmarks run in separate processes.

    python benchmarks/run_all.py                  # writes docs/performance.md
    python benchmarks/run_all.py --out /tmp/p.md --skip keras
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: (name, script, extra args, writes markdown?, title, what it shows)
BENCHES = [
    ("math", "bench_eigencam.py", [], True, "The math: EigenCAM on a batch of activations",
     "Per-sample full SVD (the reference algorithm), pytorch-grad-cam's `get_2d_projection` "
     "(when the `grad-cam` package is installed), this package, and a floor: one batched Gram "
     "matmul, which any exact method must at least do. Median of repeated runs."),
    ("logger", "bench_logger.py", [], True, "The epoch end and memory",
     "`on_epoch_end` is render + hand-off to the background uploader (the upload itself is "
     "not counted). Memory: resident set size of fresh processes."),
    ("torch", "bench_torch_overhead.py", [], False, "Training overhead: PyTorch plain loop",
     "A small CNN's epoch (train on 8192 + eval on 512 images of 32x32) with and without "
     "`EigenCAMMonitor` at default settings. Runs with and without alternate; the overhead is "
     "the median over adjacent pairs (each pair's spread is printed: this 2-core machine "
     "drifts by more than the effect). The last line is the monitor's own CPU time (its calls "
     "on the training thread plus the upload thread): on a machine whose cores the training "
     "already fills, that is what it costs, and it does not depend on the drift."),
    ("torch-short", "bench_torch_overhead.py", ["--train-size", "4096"], False,
     "Training overhead: PyTorch plain loop, 1 s epochs",
     "The same with half the training data: the monitor's cost per epoch is fixed (about "
     "45 ms of CPU here), so its share doubles."),
    ("keras", "bench_keras_overhead.py", [], False, "Training overhead: Keras `fit`",
     "A small CNN's `fit` epoch (8192 + 256 images of 32x32, a cached `tf.data` pipeline with "
     "autotuning off, which otherwise stalls random epochs by a second in both arms) with and "
     "without `EigenCAMCallback` at default settings: median over paired repeats of each "
     "fit's median epoch, the first two epochs of each fit left out. Then the measurement "
     "that resolves about 1 % on this machine: one long fit that logs every 3rd epoch, each "
     "logged epoch and the one after it (which overlaps the upload) against the clean epoch "
     "a second later, trimmed mean over ~100 cycles, next to the same arithmetic on a fit "
     "without the callback (the method's error)."),
    ("keras-long", "bench_keras_overhead.py",
     ["--n-train", "16384", "--repeats", "5", "--cycle-epochs", "0"], False,
     "Training overhead: Keras `fit`, 2.5 s epochs",
     "The same A/B with 2x the training data per epoch (the epoch length of the PyTorch "
     "figure)."),
    ("sink", "bench_sink.py", ["--epochs", "20"], False, "The write-ahead sink: cost and upload lag",
     "What handing an epoch's bundle to the sink costs the training thread (the record written, "
     "fsynced and renamed before `on_epoch_end` returns), and the lag from an epoch end to "
     "MLflow confirming it with every core busy, beside the in-memory queue of 70350d7."),
    ("streaming", "bench_streaming.py", [], False, "Streaming mode (`n_samples=None`)",
     "A no-grad eval pass of 8 batches of 32 images at 224x224 through a CNN of about "
     "ResNet-18's cost, with and without streaming every image: wall time, CPU, the monitor's "
     "own CPU, and the disk written per image."),
    ("explorer", "bench_explorer.py", [], False, "Explorer: first meaningful paint",
     "5 runs x 20 epochs x 16 samples logged into a local `mlflow server`, a deep link to "
     "all 5 opened in headless Chromium: time until the rows are drawn and every image in "
     "the viewport has loaded (needs the `playwright` package and a Chromium binary)."),
    ("quality", "bench_quality.py", [], True, "Quality: the pointing game, with and without the sign rule",
     "A small CNN trained on synthetic shapes with a same-sized noise distractor; a hit is the "
     "map's maximum inside the object's box."),
]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"numpy {numpy.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--skip", default="", help="comma-separated names to skip: "
                        + ",".join(b[0] for b in BENCHES))
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}

    parts = ["# Performance", "",
             f"Measured by `python benchmarks/run_all.py` on {datetime.date.today()} "
             f"({_machine()}). Each benchmark ran in its own process; every ratio compares "
             "figures measured in the same run. Unit tests assert no speed.", "",
             "GPU: when activations arrive as CUDA tensors the math runs on the device "
             "(batched `torch.linalg.eigh`) and only the maps are copied back. No GPU was "
             "available to the session that produced this page, so no GPU figures are "
             "given here.", "",
             "Training overhead on this machine: a shared 2-core virtual machine whose speed "
             "drifts by more than the effect being measured (whole runs slow down by 20-50 % "
             "for seconds at a time, in both arms). The A/B figures therefore print every "
             "pair; the same code gave per-epoch overheads from about 0 % to 15 % in different "
             "runs on the same day. The line that does not drift is the component's own CPU "
             "time per epoch (its calls on the training thread plus its upload thread), and "
             "the Keras benchmark's interleaved figure: epochs compared with their neighbours "
             "a second apart inside one long fit, which resolves about 1 % here.", ""]
    failed = []
    for name, script, extra, markdown, title, what in BENCHES:
        if name in skip:
            continue
        print(f"== {name}: {script}", flush=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            md = Path(tmp) / "table.md"
            cmd = [sys.executable, str(HERE / script), *extra]
            if markdown:
                cmd += ["--markdown", str(md)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            print(proc.stdout[-4000:], flush=True)
            parts += [f"## {title}", "", what, ""]
            if proc.returncode != 0:
                failed.append(name)
                parts += ["```text", f"FAILED (exit {proc.returncode})", proc.stderr[-2000:], "```", ""]
            elif markdown and md.exists():
                # Our own "##" heading stands above; demote the script's titles under it.
                text = "\n".join("#" * 2 + line if line.startswith("# ") else
                                  ("#" + line if line.startswith("## ") else line)
                                  for line in md.read_text().strip().splitlines())
                parts += [text, ""]
            else:
                parts += ["```text", proc.stdout.strip(), "```", ""]
            parts += [f"*`benchmarks/{script}`, {time.perf_counter() - start:.0f} s.*", ""]
    args.out.write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
