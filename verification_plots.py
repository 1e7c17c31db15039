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
HISTOGRAM_BINS = 60
FIGURE_DPI = 100


def _save(fig, path: str | Path) -> Path:
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
    from matplotlib.figure import Figure

    far = np.asarray(far, dtype=np.float64)
    tar = np.asarray(tar, dtype=np.float64)
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    positive = far > 0  # the log axis cannot show FAR = 0
    label = f"AUC = {auc:.4f}" if auc is not None else None
    ax.plot(far[positive], tar[positive], lw=1.5, label=label)
    for far_target, tar_value in (operating_points or {}).items():
        ax.plot([far_target], [tar_value], "o", label=f"TAR@FAR={far_target:.0e}: {tar_value:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_ylim(0.0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    if label or operating_points:
        ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_histogram(similarities: np.ndarray, issame: np.ndarray, path: str | Path,
                   threshold: float | None = None, title: str = "similarities") -> Path:
    """Histograms of genuine and impostor cosine similarities, threshold as a vertical line."""
    from matplotlib.figure import Figure

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
    return _save(fig, path)


def worst_errors(similarities: np.ndarray, issame: np.ndarray, threshold: float,
                 k: int = GALLERY_PAIRS_PER_KIND) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k worst false accepts (impostors scoring highest above the threshold)
    and the k worst false rejects (genuine pairs scoring lowest at or below it)."""
    sims = np.asarray(similarities, dtype=np.float64)
    same = np.asarray(issame, dtype=bool)
    false_accepts = np.flatnonzero(~same & (sims > threshold))
    false_rejects = np.flatnonzero(same & (sims <= threshold))
    false_accepts = false_accepts[np.argsort(-sims[false_accepts], kind="stable")][:k]
    false_rejects = false_rejects[np.argsort(sims[false_rejects], kind="stable")][:k]
    return false_accepts, false_rejects


def plot_error_gallery(images: np.ndarray, similarities: np.ndarray, issame: np.ndarray,
                       threshold: float, path: str | Path,
                       k: int = GALLERY_PAIRS_PER_KIND,
                       labels: list[str] | None = None) -> Path:
    """A gallery of the worst false accepts and false rejects: each pair's two aligned crops
    side by side with its score. ``images`` are the 2N crops, pair i = images 2i and 2i+1;
    ``labels`` (optional, one per pair) are printed under each pair."""
    from matplotlib.figure import Figure

    false_accepts, false_rejects = worst_errors(similarities, issame, threshold, k)
    rows = [("false accept", false_accepts), ("false reject", false_rejects)]
    cols = max(1, len(false_accepts), len(false_rejects))
    fig = Figure(figsize=(2.2 * cols, 5.4))
    fig.suptitle(f"worst errors at threshold {threshold:.4f}")
    for r, (kind, indices) in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(2, cols, r * cols + c + 1)
            ax.set_axis_off()
            if c >= len(indices):
                if c == 0:
                    ax.text(0.5, 0.5, f"no {kind}s", ha="center", va="center")
                continue
            i = int(indices[c])
            ax.imshow(np.concatenate([images[2 * i], images[2 * i + 1]], axis=1))
            text = f"{kind}\npair {i}: {similarities[i]:.3f}"
            if labels is not None:
                text += "\n" + labels[i]
            ax.set_title(text, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
