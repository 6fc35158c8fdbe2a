"""EigenCAM quality: the pointing game with and without the sign rule, and epoch flicker.

A small CNN (torch, CPU, seeded) learns to classify synthetic shapes. Every image holds one
shape (the class) and a same-sized patch of bright random noise (a distractor), at random
non-overlapping positions, on a noisy background; both boxes are known. Images are 48 x 64
(H x W, not square, so a (H, W) / (W, H) mix-up in a resize would show).

Measured for each of a few seeds (data, weights and batch order; three by default), one
training run each, on the same model and data within a run:

* Pointing game on 500 held-out images: a hit when the argmax of the first-component map,
  ReLU'd and upsampled to the image with ``images.resize_bilinear`` (OpenCV's ``INTER_LINEAR``), lies inside
  the object's box (strict: no tolerance margin). Two versions of the same map:
    - "sign rule": ``mlflow_eigencam.eigencam.eigencam`` (the package);
    - "raw SVD sign": the textbook per-sample algorithm as pytorch-grad-cam's
      ``get_2d_projection`` runs it: centre the (h*w, C) matrix, ``np.linalg.svd(X,
      full_matrices=True)``, project on ``Vt[0]``, and keep whatever sign LAPACK returns.
  The package has no switch to turn its sign rule off, so the baseline is recomputed this
  way; the two agree up to sign (the relative error is printed).
  Also printed: how often the argmax falls in the noise patch, and the chance level (the
  mean share of the image covered by the object's box).
* Maps flipped by the rule: the share of held-out samples whose package map is the
  negative of the raw SVD map.
* Epoch flicker: for the first 64 held-out samples (pinned), the share of consecutive-epoch
  pairs whose first-component maps correlate negatively (the map's sign changed from one
  epoch to the next), for the raw SVD sign and for the package.

About 25 s per seed on 2 idle CPU cores (training is most of it). Seeded: the same machine
and torch build print the same figures. ``docs/make_figures.py`` draws seed 0's run.

Usage: python benchmarks/bench_quality.py [--markdown PATH] [--epochs N] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The per-sample SVDs are tiny (192 x 32): on a busy 2-core machine they ran 10x faster on one
# BLAS thread than on two. Set before numpy loads OpenBLAS; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from _shapes import SHAPES, _shape_mask  # noqa: E402  (the examples' shape drawing)

from mlflow_eigencam.eigencam import eigencam  # noqa: E402
from mlflow_eigencam.images import resize_bilinear  # noqa: E402

#: Class names, indexed by label.
CLASSES: tuple[str, ...] = SHAPES[:3]
HEIGHT, WIDTH = 48, 64
N_TRAIN, N_TEST, N_PINNED = 2000, 500, 64
EPOCHS = 8
BATCH = 64


# --------------------------------------------------------------------------- data


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = 2) -> bool:
    """Whether two (x0, y0, x1, y1) boxes, grown by margin pixels, intersect."""
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded shapes with a same-sized noise distractor.

    Returns:
        ``(images, labels, boxes, noise_boxes)``: images float32 (n, 3, 48, 64) in [0, 1];
        labels int64 (n,); boxes and noise_boxes int64 (n, 4) as (x0, y0, x1, y1), x1 and
        y1 exclusive.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, HEIGHT, WIDTH, 3), np.float32)
    labels = rng.integers(0, len(CLASSES), size=n).astype(np.int64)
    boxes = np.empty((n, 4), np.int64)
    noise_boxes = np.empty((n, 4), np.int64)
    for i in range(n):
        img = rng.uniform(0.1, 0.4, size=3).astype(np.float32) + rng.normal(0.0, 0.08, (HEIGHT, WIDTH, 3)).astype(
            np.float32
        )
        side = int(rng.integers(11, 18))
        while True:  # rejection sampling: the two boxes never touch
            oy, ox = int(rng.integers(0, HEIGHT - side + 1)), int(rng.integers(0, WIDTH - side + 1))
            ny, nx = int(rng.integers(0, HEIGHT - side + 1)), int(rng.integers(0, WIDTH - side + 1))
            obj, noise = (ox, oy, ox + side, oy + side), (nx, ny, nx + side, ny + side)
            if not _overlaps(obj, noise):
                break
        mask = _shape_mask(CLASSES[labels[i]], side)
        img[oy : oy + side, ox : ox + side][mask] = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        # The distractor: as bright and as large as the shape, but random pixels.
        img[ny : ny + side, nx : nx + side] = rng.uniform(0.0, 1.0, (side, side, 3)).astype(np.float32)
        images[i] = np.clip(img, 0.0, 1.0)
        boxes[i], noise_boxes[i] = obj, noise
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels, boxes, noise_boxes


# --------------------------------------------------------------------------- maps and scores


def raw_svd_maps(activations: np.ndarray) -> np.ndarray:
    """First-component maps with the sign LAPACK gives: the per-sample textbook algorithm.

    Args:
        activations: float32 (B, C, h, w).

    Returns:
        float32 (B, h, w): ``Xc @ Vt[0]`` per sample, ``Xc`` the centred (h*w, C) matrix and
        ``Vt`` from ``np.linalg.svd(Xc, full_matrices=True)`` (as pytorch-grad-cam does).
    """
    b, c, h, w = activations.shape
    out = np.empty((b, h, w), np.float32)
    for i, sample in enumerate(activations):
        x = sample.reshape(c, h * w).T
        x = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(x, full_matrices=True)
        out[i] = (x @ vt[0]).reshape(h, w)
    return out


def package_maps(activations: np.ndarray) -> np.ndarray:
    """First-component maps from the package (sign rule applied): float32 (B, h, w)."""
    return eigencam(activations, 1).maps[:, 0]


def pointing(maps: np.ndarray, boxes: np.ndarray, noise_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pointing game per sample.

    Args:
        maps: float (B, h, w) signed maps.
        boxes: int (B, 4) object boxes (x0, y0, x1, y1) in image pixels.
        noise_boxes: int (B, 4) distractor boxes.

    Returns:
        ``(hit, on_noise)``: bool (B,) each; the ReLU'd map's argmax, after upsampling to
        48 x 64, inside the object box / inside the noise box. A map with no positive
        value points nowhere (neither).
    """
    hit = np.zeros(len(maps), bool)
    on_noise = np.zeros(len(maps), bool)
    for i, m in enumerate(maps):
        r = np.maximum(m.astype(np.float32), 0.0)
        if not r.max() > 0:
            continue
        up = resize_bilinear(r, HEIGHT, WIDTH)
        y, x = np.unravel_index(int(np.argmax(up)), up.shape)
        for out, (x0, y0, x1, y1) in ((hit, boxes[i]), (on_noise, noise_boxes[i])):
            out[i] = x0 <= x < x1 and y0 <= y < y1
    return hit, on_noise


def sign_changes(per_epoch: list[np.ndarray]) -> np.ndarray:
    """bool (epochs - 1, B): map of epoch e+1 correlates negatively with epoch e's.

    The maps are projections of centred data, so their means are 0 and the sign of the dot
    product is the sign of the correlation.
    """
    dots = [
        np.einsum("bhw,bhw->b", a.astype(np.float64), b.astype(np.float64)) for a, b in zip(per_epoch, per_epoch[1:])
    ]
    return np.asarray(dots) < 0


def max_rel_error_up_to_sign(a: np.ndarray, b: np.ndarray) -> float:
    """max over samples of ||a - s b|| / ||b||, s = the sign that fits best."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    s = np.where(np.einsum("bhw,bhw->b", a64, b64) < 0, -1.0, 1.0)[:, None, None]
    den = np.maximum(np.linalg.norm(b64, axis=(1, 2)), 1e-30)
    return float((np.linalg.norm(a64 - s * b64, axis=(1, 2)) / den).max())


# --------------------------------------------------------------------------- model and training


def build_model(n_classes: int = len(CLASSES)):
    """3 x (conv-BN-ReLU), pooled twice; the last ReLU (32 x 12 x 16) is the target layer.

    BatchNorm makes training reach ~99% held-out accuracy in a few epochs for every seed
    tried (without it some seeds stall near chance for most of the run).
    """
    from torch import nn

    class ShapesCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(32, n_classes)

        def forward(self, x):  # type: ignore[no-untyped-def]
            feats = self.features(x)
            return self.head(self.pool(feats).flatten(1)), feats

    return ShapesCNN()


@dataclass
class EpochRecord:
    """What one epoch end saw on the held-out data."""

    epoch: int
    accuracy: float
    activations: np.ndarray  # float32 (N_TEST, C, h, w) at the target layer
    logits: np.ndarray  # float32 (N_TEST, n_classes)


@dataclass
class Experiment:
    """Data and per-epoch held-out activations of one seeded training run."""

    test_images: np.ndarray
    test_labels: np.ndarray
    test_boxes: np.ndarray
    test_noise_boxes: np.ndarray
    epochs: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0


def run_experiment(
    seed: int = 0,
    epochs: int = EPOCHS,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    threads: int = 2,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> Experiment:
    """Train the CNN, recording the held-out activations after every epoch (seeded)."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    x_train, y_train, _, _ = make_data(n_train, seed)
    x_test, y_test, boxes, noise_boxes = make_data(n_test, seed + 1000)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xv = torch.from_numpy(x_test)
    order_rng = np.random.default_rng(seed)
    exp = Experiment(x_test, y_test, boxes, noise_boxes)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in np.array_split(order_rng.permutation(n_train), n_train // BATCH):
            logits, _ = model(xt[idx])
            loss = torch.nn.functional.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            outs = [model(xv[i : i + 250]) for i in range(0, n_test, 250)]
        logits_np = torch.cat([o[0] for o in outs]).numpy()
        acts = torch.cat([o[1] for o in outs]).numpy()
        acc = float((logits_np.argmax(1) == y_test).mean())
        exp.epochs.append(EpochRecord(epoch, acc, acts, logits_np))
        log(f"  epoch {epoch}: loss {loss.item():.3f}, held-out accuracy {acc:.3f}")
    exp.train_seconds = time.perf_counter() - t0
    return exp


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """The figures of one training run (one seed)."""

    seed: int
    rows: list[dict]  # per epoch: acc, hit_pkg, hit_raw, noise_pkg, noise_raw, flipped
    flicker_pkg: float  # share of (pinned sample, epoch transition) pairs with a sign change
    flicker_raw: float
    ever_pkg: float  # share of pinned samples whose map changed sign at least once
    ever_raw: float
    chance: float  # mean object box area / image area
    max_err: float  # package vs raw SVD maps, max relative error up to sign
    seconds_pkg: float  # time in eigencam() over all epochs
    seconds_raw: float  # time in the per-sample full SVD over all epochs
    train_seconds: float


def evaluate(exp: Experiment, seed: int) -> Evaluation:
    """Pointing game, flips and flicker of one run, package maps vs raw SVD sign."""
    rows = []
    raw_pinned: list[np.ndarray] = []
    pkg_pinned: list[np.ndarray] = []
    worst_err, t_pkg, t_raw = 0.0, 0.0, 0.0
    for rec in exp.epochs:
        t0 = time.perf_counter()
        pkg = package_maps(rec.activations)
        t1 = time.perf_counter()
        raw = raw_svd_maps(rec.activations)
        t_pkg, t_raw = t_pkg + t1 - t0, t_raw + time.perf_counter() - t1
        worst_err = max(worst_err, max_rel_error_up_to_sign(pkg, raw))
        hit_pkg, noise_pkg = pointing(pkg, exp.test_boxes, exp.test_noise_boxes)
        hit_raw, noise_raw = pointing(raw, exp.test_boxes, exp.test_noise_boxes)
        flipped = np.einsum("bhw,bhw->b", pkg.astype(np.float64), raw.astype(np.float64)) < 0
        rows.append(
            {
                "epoch": rec.epoch,
                "acc": rec.accuracy,
                "hit_pkg": hit_pkg.mean(),
                "hit_raw": hit_raw.mean(),
                "noise_pkg": noise_pkg.mean(),
                "noise_raw": noise_raw.mean(),
                "flipped": flipped.mean(),
            }
        )
        raw_pinned.append(raw[:N_PINNED])
        pkg_pinned.append(pkg[:N_PINNED])
    changes_raw, changes_pkg = sign_changes(raw_pinned), sign_changes(pkg_pinned)
    several = len(rows) > 1
    box = exp.test_boxes
    return Evaluation(
        seed=seed,
        rows=rows,
        flicker_pkg=float(changes_pkg.mean()) if several else 0.0,
        flicker_raw=float(changes_raw.mean()) if several else 0.0,
        ever_pkg=float(changes_pkg.any(axis=0).mean()) if several else 0.0,
        ever_raw=float(changes_raw.any(axis=0).mean()) if several else 0.0,
        chance=float(((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).mean() / (HEIGHT * WIDTH)),
        max_err=worst_err,
        seconds_pkg=t_pkg,
        seconds_raw=t_raw,
        train_seconds=exp.train_seconds,
    )


# --------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="also write the tables as markdown here")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs per run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one training run each")
    args = parser.parse_args(argv)
    seeds = [int(v) for v in args.seeds.split(",")]

    t_start = time.perf_counter()
    evals = []
    for seed in seeds:
        print(f"seed {seed}:", file=sys.stderr)
        evals.append(evaluate(run_experiment(seed=seed, epochs=args.epochs), seed))

    # One row per seed at the final epoch, then the mean over seeds.
    def final_row(label: str, vals: dict, ev: dict) -> list[str]:
        return [
            label,
            pct(vals["acc"]),
            pct(vals["hit_pkg"]),
            pct(vals["hit_raw"]),
            pct(vals["noise_pkg"]),
            pct(vals["noise_raw"]),
            pct(vals["flipped"]),
            pct(ev["flicker_pkg"]),
            pct(ev["flicker_raw"]),
        ]

    body = []
    keys = ("acc", "hit_pkg", "hit_raw", "noise_pkg", "noise_raw", "flipped")
    for e in evals:
        body.append(final_row(f"seed {e.seed}", e.rows[-1], vars(e)))
    if len(evals) > 1:
        mean = {k: float(np.mean([e.rows[-1][k] for e in evals])) for k in keys}
        mean_ev = {k: float(np.mean([getattr(e, k) for e in evals])) for k in ("flicker_pkg", "flicker_raw")}
        body.append(final_row("**mean**", mean, mean_ev))
    summary = _table(
        [
            "run",
            "held-out accuracy",
            "pointing game: sign rule",
            "pointing game: raw SVD sign",
            "argmax on noise: sign rule",
            "argmax on noise: raw SVD sign",
            "maps flipped by the rule",
            "epoch flicker: sign rule",
            "epoch flicker: raw SVD sign",
        ],
        body,
    )
    per_epoch = {
        e.seed: _table(
            [
                "epoch",
                "held-out accuracy",
                "pointing game: sign rule",
                "pointing game: raw SVD sign",
                "argmax on noise: sign rule",
                "argmax on noise: raw SVD sign",
                "maps flipped by the rule",
            ],
            [[str(r["epoch"])] + [pct(r[k]) for k in keys] for r in e.rows],
        )
        for e in evals
    }
    n_trans = len(evals[0].rows) - 1
    notes = [
        (
            f"pointing game and argmax-on-noise: final epoch, {N_TEST} held-out images per run; "
            f"chance level (mean object box area / image area) {pct(float(np.mean([e.chance for e in evals])))}"
        ),
        (
            "maps flipped by the rule: share of held-out samples whose package map is the negative of "
            "the raw SVD map (final epoch)"
        ),
        f"epoch flicker: share of ({N_PINNED} pinned held-out samples x {n_trans} consecutive-epoch "
        "transitions) where the first-component map correlates negatively with the previous epoch's; "
        "pinned samples whose map changed sign at least once: sign rule "
        + ", ".join(pct(e.ever_pkg) for e in evals)
        + "; raw SVD sign "
        + ", ".join(pct(e.ever_raw) for e in evals)
        + " (per seed)",
        "package vs raw SVD maps, max relative error up to sign: "
        + f"{max(e.max_err for e in evals):.1e} (the same maps; only the sign differs)",
        f"map time per run ({len(evals[0].rows)} epochs x {N_TEST} samples): package "
        + ", ".join(f"{e.seconds_pkg:.2f}" for e in evals)
        + " s; per-sample full SVD "
        + ", ".join(f"{e.seconds_raw:.2f}" for e in evals)
        + " s",
    ]
    env = (
        f"{N_TRAIN} training images, {args.epochs} epochs, seeds {args.seeds}; training "
        + ", ".join(f"{e.train_seconds:.1f}" for e in evals)
        + f" s; total {time.perf_counter() - t_start:.1f} s; numpy {np.__version__}, torch {_torch_version()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    print(summary)
    print()
    for seed, table in per_epoch.items():
        print(f"per epoch, seed {seed}:")
        print(table)
        print()
    print("\n".join(notes))
    print(env)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            summary
            + "\n\n"
            + "\n\n".join(f"Per epoch, seed {seed}:\n\n{table}" for seed, table in per_epoch.items())
            + "\n\n"
            + "\n".join(f"- {n}" for n in notes)
            + "\n\n"
            + env
            + "\n"
        )
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    raise SystemExit(main())
