"""What `train.py` shows while it runs: TensorBoard scalars, the tqdm bar, the images/s
meter (:class:`Monitor`), and the training curves as one PNG (:func:`plot_training_curves`:
loss, batch accuracy, lr, margin m, images/s and the verification accuracies against the
step).

The PNG is drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch) and written atomically, so a reader never sees half a PNG while training rewrites it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from config import Config
    from distributed import DistInfo

CURVES_NAME = "training_curves.png"
TENSORBOARD_NAME = "tensorboard"  # the folder of TensorBoard event files in the output
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


# ----------------------------------------------------------------------------- live


class Monitor:
    """TensorBoard scalars, the tqdm bar and the images/s meter (rank 0 only)."""

    def __init__(self, cfg: Config, info: DistInfo, start_step: int, last_step: int) -> None:
        self.enabled = info.is_main
        self.global_batch = cfg.batch_size * info.world_size
        self.writer = self.bar = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(str(Path(cfg.output) / TENSORBOARD_NAME))
            self.bar = tqdm(total=last_step, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.images_per_second = 0.0

    def step(self, step: int, values: dict[str, float], lr: float, margin: float,
             log: bool) -> None:
        self.window_steps += 1
        if not self.enabled:
            return
        self.bar.update(1)
        if not log:
            return
        now = time.perf_counter()
        self.images_per_second = (self.window_steps * self.global_batch
                                  / max(now - self.window_start, 1e-9))
        self.window_start, self.window_steps = now, 0
        scalars = {**values, "lr": lr, "margin_m": margin,
                   "images_per_second": self.images_per_second}
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['accuracy']:.3f}",
                             img_s=f"{self.images_per_second:.0f}")

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


# ----------------------------------------------------------------------------- PNG


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
    from matplotlib.figure import Figure

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
    from verification_plots import save_figure

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
