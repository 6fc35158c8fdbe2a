"""Hugging Face Trainer quickstart: a tiny ViT on synthetic shapes, EigenCAM overlays in Trainer's MLflow run.

Nothing is downloaded: the model is built from a ``ViTConfig`` at random init and the images
are generated (``_shapes.py``, next to this file). Run

    python examples/transformers_quickstart.py --epochs 5

then open the MLflow UI with the command it prints, and look at the run's "Images" tab (keys
``eigencam/eval/val/sample_*``, one point per evaluation at the global step where Trainer
logs ``eval_loss``; ``eigencam/test/test/sample_*`` from the ``trainer.evaluate()`` on a
test set after training, at the last global step, where Trainer logs ``test_loss``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shapes import SHAPES, make_shapes  # noqa: E402
from _common import ui_uri  # noqa: E402

N_CLASSES = 4


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow tracking URI (default: a sqlite file in the current folder)")
    parser.add_argument("--experiment", default="mlflow-eigencam-transformers-quickstart")
    parser.add_argument("--n-samples", type=int, default=5, help="validation images to explain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=512, help="training images per epoch")
    parser.add_argument("--output-dir", default="hf-quickstart", help="Trainer's output_dir")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import mlflow
    import torch
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    import mlflow_eigencam

    class Shapes(torch.utils.data.Dataset):
        """Shape images as the dicts Trainer feeds the model: pixel_values and labels."""

        def __init__(self, n: int, seed: int) -> None:
            x, y, _ = make_shapes(n, 32, n_classes=N_CLASSES, seed=seed)
            self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int) -> dict:
            return {"pixel_values": self.x[i], "labels": self.y[i]}

    names = dict(enumerate(SHAPES[:N_CLASSES]))
    torch.manual_seed(args.seed)
    model = ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, num_labels=N_CLASSES, id2label=names,
        label2id={v: k for k, v in names.items()}))

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    # The one line: every Trainer.train() from now on logs EigenCAM overlays of the first
    # n_samples evaluation images at each evaluation, into the run Trainer reports to.
    mlflow_eigencam.autolog(n_samples=args.n_samples)

    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=32,
        per_device_eval_batch_size=32, learning_rate=1e-3, eval_strategy="epoch",
        save_strategy="no", logging_strategy="epoch", report_to=["mlflow"],
        run_name="transformers-quickstart", use_cpu=True, seed=args.seed, disable_tqdm=True)
    with mlflow.start_run(run_name="transformers-quickstart") as run:
        # Trainer's MLflowCallback reuses this run (and leaves it to us to end), so the test
        # set's metrics after training land in it too, next to its EigenCAM overlays.
        trainer = Trainer(model=model, args=training_args, train_dataset=Shapes(args.train_size, args.seed),
                          eval_dataset=Shapes(64, args.seed + 1))
        trainer.train()
        trainer.evaluate(eval_dataset=Shapes(32, args.seed + 2), metric_key_prefix="test")

    print(f"\nLogged EigenCAM overlays to run {run.info.run_id}.")
    print("Open the MLflow UI with:")
    print(f"    mlflow ui --backend-store-uri {ui_uri(args.tracking_uri)}")
    return run.info.run_id


if __name__ == "__main__":
    main()
