"""PNG figures for a face-verification evaluation: ROC curve, score histogram, error gallery.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
backend switch), and written atomically so an interrupted run never leaves half a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from utils import atomic_write_bytes

GALLERY_PAIRS_PER_KIND = 8  # worst false accepts shown, and as many worst false rejects
MIN_GALLERY_COLUMNS = 4  # room for the title when there are few pairs
HISTOGRAM_BINS = 60
FIGURE_DPI = 100


def save_figure(fig, path: str | Path) -> Path:
    """Render a matplotlib Figure (no pyplot) with Agg and write it as a PNG, atomically."""
    # matplotlib (~0.5 s) loads only to plot
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_roc(far: np.ndarray, tar: np.ndarray, path: str | Path, auc: float | None = None,
             operating_points: Mapping[float, float] | None = None,
             title: str = "ROC") -> Path:
    """ROC curve (TAR against FAR, FAR on a log axis) with the TAR@FAR points marked."""
    label = f"AUC = {auc:.4f}" if auc is not None else None
    return plot_roc_curves({label: (far, tar)}, path, title, operating_points)


def plot_roc_curves(curves: Mapping[str | None, tuple[np.ndarray, np.ndarray]],
                    path: str | Path, title: str = "ROC",
                    operating_points: Mapping[float, float] | None = None) -> Path:
    """ROC curves (TAR against FAR, FAR on a log axis), one per label (None: unlabelled),
    with the TAR@FAR points marked."""
    from matplotlib.figure import Figure  # matplotlib (~0.5 s) loads only to plot

    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    lowest = 1.0
    for label, (far, tar) in curves.items():
        far = np.asarray(far, dtype=np.float64)
        tar = np.asarray(tar, dtype=np.float64)
        positive = far > 0  # the log axis cannot show FAR = 0
        ax.plot(far[positive], tar[positive], lw=1.5, label=label)
        if positive.any():  # start one step left of the smallest measurable FAR
            lowest = min(lowest, far[positive].min() / 2)
    for far_target, tar_value in (operating_points or {}).items():
        ax.plot([far_target], [tar_value], "o", label=f"TAR@FAR={far_target:.0e}: {tar_value:.4f}")
    ax.set_xscale("log")
    if lowest < 1.0:
        ax.set_xlim(lowest, 1.0)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_ylim(0.0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    if any(label is not None for label in curves) or operating_points:
        ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_histogram(similarities: np.ndarray, issame: np.ndarray, path: str | Path,
                   threshold: float | None = None, title: str = "similarities") -> Path:
    """Histograms of genuine and impostor cosine similarities, threshold as a vertical line."""
    from matplotlib.figure import Figure  # matplotlib (~0.5 s) loads only to plot

    sims = np.asarray(similarities, dtype=np.float64)
    same = np.asarray(issame, dtype=bool)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bins = np.linspace(min(sims.min(), -1e-6), max(sims.max(), 1e-6), HISTOGRAM_BINS + 1) \
        if sims.size else HISTOGRAM_BINS
    ax.hist(sims[same], bins=bins, alpha=0.6, label=f"genuine ({same.sum()})", color="tab:green")
    ax.hist(sims[~same], bins=bins, alpha=0.6, label=f"impostor ({(~same).sum()})",
            color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.4f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def hardest_pairs(similarities: np.ndarray, issame: np.ndarray,
                  k: int = GALLERY_PAIRS_PER_KIND) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k highest-scoring impostor pairs and the k lowest-scoring genuine pairs.
    At any threshold the false accepts are a prefix of the first list (worst first) and the
    false rejects a prefix of the second."""
    sims = np.asarray(similarities, dtype=np.float64)
    same = np.asarray(issame, dtype=bool)
    impostors, genuine = np.flatnonzero(~same), np.flatnonzero(same)
    impostors = impostors[np.argsort(-sims[impostors], kind="stable")][:k]
    genuine = genuine[np.argsort(sims[genuine], kind="stable")][:k]
    return impostors, genuine


def plot_error_gallery(images: np.ndarray, similarities: np.ndarray, issame: np.ndarray,
                       threshold: float, path: str | Path,
                       k: int = GALLERY_PAIRS_PER_KIND,
                       labels: list[str] | None = None,
                       pair_index: np.ndarray | None = None) -> Path:
    """The worst false accepts and false rejects: each pair's two aligned crops side by side
    with its score. Row 1 holds the highest-scoring impostor pairs, row 2 the lowest-scoring
    genuine pairs, worst first; errors at ``threshold`` are titled in red, the nearest
    correct decisions (shown when there are fewer than k errors) in black. Pair i is images
    2i and 2i+1 (or ``images[pair_index[2i]]``, ``images[pair_index[2i+1]]``); ``labels``
    (optional, one per pair) are printed under each pair."""
    from matplotlib.figure import Figure  # matplotlib (~0.5 s) loads only to plot

    impostors, genuine = hardest_pairs(similarities, issame, k)
    rows = [(impostors, "false accept", "impostor", lambda s: s > threshold),
            (genuine, "false reject", "genuine", lambda s: s <= threshold)]
    cols = max(MIN_GALLERY_COLUMNS, len(impostors), len(genuine))
    fig = Figure(figsize=(2.2 * cols, 5.6))
    fig.suptitle(f"hardest pairs at threshold {threshold:.4f} (errors in red)")
    index = np.arange(2 * len(similarities)) if pair_index is None else np.asarray(pair_index)
    for r, (indices, error_name, ok_name, is_error) in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(2, cols, r * cols + c + 1)
            ax.set_axis_off()
            if c >= len(indices):
                continue
            i = int(indices[c])
            sim = float(similarities[i])
            ax.imshow(np.concatenate([images[index[2 * i]], images[index[2 * i + 1]]], axis=1))
            error = bool(is_error(sim))
            text = f"{error_name if error else ok_name}\npair {i}: {sim:.3f}"
            if labels is not None:
                text += "\n" + labels[i]
            ax.set_title(text, fontsize=7, color="red" if error else "black")
    fig.tight_layout()
    return save_figure(fig, path)
