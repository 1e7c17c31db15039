"""What train.py shows while it runs: TensorBoard scalars and the tqdm bar (``Monitor``), the
training-curves PNG (``CurvesWriter``), and 10-fold verification on the .bin sets of
``cfg.val_bins``."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from config import Config
from evaluation.bin_loader import load_bin
from evaluation.verification import evaluate_verification
from evaluation.verification_plots import save_figure
from training.distributed import DistInfo, barrier
from training.trainer import Trainer
from utils import get_logger

LOG = get_logger("train")

# ----------------------------------------------------------------------------- monitor

FIGURE_SIZE = (15, 8)  # inches: a 2 x 3 grid of panels
# (history key, panel title, y-axis label), one panel each, in grid order
PANELS = (
    ("loss", "loss", "loss"),
    ("accuracy", "batch accuracy", "accuracy"),
    ("lr", "learning rate", "lr"),
    ("margin_m", "margin m", "m"),
    ("images_per_second", "throughput", "images / s"),
)
VERIFICATION_TITLE = "verification accuracy"
# Checkpoints closer together than this rewrite the PNG only at the end (real runs
# checkpoint minutes apart, so there every checkpoint gets its plot).
MIN_PLOT_INTERVAL_S = 60.0


class Monitor:
    """TensorBoard scalars (event files in ``log_dir``), the tqdm bar and the images/s meter
    (rank 0 only), updated at each logged step."""

    def __init__(self, cfg: Config, info: DistInfo, start_step: int, last_step: int,
                 log_dir: Path) -> None:
        self.enabled = info.is_main
        self.global_batch = cfg.global_batch(info.world_size)
        self.writer = self.bar = None
        if self.enabled:
            # rank 0 only: the other ranks never import TensorBoard (an optional dependency's cost)
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm  # beside SummaryWriter: only rank 0 draws the bar

            self.writer = SummaryWriter(str(log_dir))
            self.bar = tqdm(total=last_step, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self.window_start, self.window_step = time.perf_counter(), start_step

    def log(self, step: int, values: Mapping[str, float]) -> float:
        """Write ``values`` (loss, accuracy, lr, ...) for ``step``; returns the images/s
        since the last logged step."""
        now = time.perf_counter()
        images_per_second = ((step - self.window_step) * self.global_batch
                             / max(now - self.window_start, 1e-9))
        self.window_start, self.window_step = now, step
        if self.enabled:
            for name, value in {**values, "images_per_second": images_per_second}.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['accuracy']:.3f}",
                                 img_s=f"{images_per_second:.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
        return images_per_second

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


# ----------------------------------------------------------------------------- curves PNG


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``key`` over the rows that have it."""
    kept = [r for r in rows if key in r]
    return (np.array([r["step"] for r in kept], dtype=np.float64),
            np.array([r[key] for r in kept], dtype=np.float64))


def training_curves_figure(history: Sequence[Mapping[str, Any]],
                           verification: Sequence[Mapping[str, Any]] = ()):
    """A matplotlib Figure of the curves. ``history``: one dict per logged step with
    ``step`` and any of the PANELS keys; ``verification``: one dict per check with ``step``
    and one accuracy per set name. Each panel's title names it; each curve is one line whose
    data are the steps and values given."""
    from matplotlib.figure import Figure  # here: matplotlib's import took 0.6 s on 2 CPU cores

    fig = Figure(figsize=FIGURE_SIZE)
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title, ylabel) in zip(axes, PANELS, strict=False):
        steps, values = _series(history, key)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, lw=1.2)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    ax = axes[len(PANELS)]
    names = sorted({k for row in verification for k in row if k != "step"})
    for name in names:
        steps, values = _series(verification, name)
        ax.plot(steps, values, marker="o", lw=1.2, label=name)
    if names:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no verification sets", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    ax.set_title(VERIFICATION_TITLE)
    ax.set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path,
                         verification: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write :func:`training_curves_figure` to ``path`` as a PNG (atomically)."""
    return save_figure(training_curves_figure(history, verification), path)


class CurvesWriter:
    """Keeps the curves PNG at ``path`` up to date without rendering too often: a render
    costs about half a second, and small runs checkpoint every few steps."""

    def __init__(self, path: str | Path, min_interval: float = MIN_PLOT_INTERVAL_S) -> None:
        self.path = Path(path)
        self.min_interval = min_interval
        self.written_sizes: tuple[int, int] | None = None
        self.written_at = -math.inf

    def update(self, history: Sequence[Mapping[str, Any]],
               verification: Sequence[Mapping[str, Any]] = (), force: bool = False) -> bool:
        """Rewrite the PNG if the logs grew since the last one and, unless ``force``, at
        least ``min_interval`` seconds have passed; returns whether it was written."""
        sizes = (len(history), len(verification))
        if not history or sizes == self.written_sizes:
            return False
        if not force and time.monotonic() - self.written_at < self.min_interval:
            return False
        plot_training_curves(history, self.path, verification)
        self.written_sizes, self.written_at = sizes, time.monotonic()
        return True


# ----------------------------------------------------------------------------- verification


def load_val_bins(cfg: Config, info: DistInfo) -> dict[str, tuple[Any, Any]]:
    """The pairs of each of cfg.val_bins, decoded once before training (rank 0 only; a bad
    file fails now rather than at the first check), keyed by set name."""
    if not (info.is_main and cfg.val_bins and cfg.verify_every > 0):
        return {}
    return {Path(path).stem: load_bin(path, progress=False) for path in cfg.val_bins}


def verify(trainer: Trainer, step: int, monitor: Monitor,
           val_sets: dict[str, tuple[Any, Any]]) -> dict[str, float]:
    """10-fold verification accuracy on each decoded set of ``val_sets`` (rank 0; the
    others wait)."""
    results: dict[str, float] = {}
    if trainer.info.is_main:
        trainer.backbone.eval()
        for name, (images, issame) in val_sets.items():
            res = evaluate_verification(trainer.backbone, images, issame,
                                        device=trainer.device, name=name, progress=False)
            results[name] = float(res["accuracy"])
            monitor.scalar(f"verification/{name}_accuracy", results[name], step)
            monitor.scalar(f"verification/{name}_accuracy_std", float(res["accuracy_std"]),
                           step)
            LOG.info("step %d: %s accuracy %.4f +- %.4f", step, name, res["accuracy"],
                     res["accuracy_std"])
        trainer.backbone.train()
    barrier(trainer.info)
    return results
