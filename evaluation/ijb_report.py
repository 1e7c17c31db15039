"""The IJB results as papers print them: the TAR@FAR table per mode with the 1:N rates and
the CMC figure (one curve per gallery); the ROC figure (one curve per mode) is
verification_plots.plot_roc_curves. ijb_eval.py writes them; the figures use
verification_plots.save_figure (Agg, atomic)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.verification_plots import save_figure

MERGED = "merged"  # the identification block's key for InsightFace's merged-gallery ranks


def plot_cmc(identification_block: dict[str, Any], galleries: Sequence[str], path: Path,
             title: str) -> Path:
    """Identification rate against rank, one curve per gallery."""
    from matplotlib.figure import Figure  # matplotlib (~0.5 s) loads only to plot


    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for g in galleries:
        cmc = identification_block[g]["cmc"]
        ax.plot(np.arange(1, len(cmc) + 1), cmc, marker=".", label=g)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate (mated probes)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


NOT_MEASURED = "n/a"  # a table cell whose rate too few pairs back; a footnote says why


def _pct(x: float | None) -> str:
    return NOT_MEASURED if x is None else f"{100 * x:.2f}"


def format_table(target: str, runs: list[dict[str, Any]]) -> str:
    """The table papers print: TAR (%) at each FAR per mode, then the 1:N rates."""
    first = runs[0]
    v = first["verification"]
    lines = [f"{target}: {first['images']:,} images, {first['templates']:,} templates, "
             f"{v['num_genuine']:,} genuine / {v['num_impostor']:,} impostor pairs",
             "1:1 verification, TAR (%) at FAR"
             + " (InsightFace's nearest-ROC-point reading below each)"]
    keys = list(v["tar_at_far"])
    head = f"{'mode':<10}" + "".join(f"{k:>8}" for k in keys) + f"{'AUC':>9}"
    lines.append(head)
    for r in runs:
        ver = r["verification"]
        lines.append(f"{r['mode']:<10}" + "".join(f"{_pct(ver['tar_at_far'][k]):>8}"
                                                  for k in keys) + f"{ver['auc']:>9.5f}")
        lines.append(f"{'  nearest':<10}" + "".join(
            f"{_pct(ver['tar_at_far_nearest'][k]):>8}" for k in keys))
    lines += [f"  FAR {k}: {why}" for k, why in v.get("not_measured", {}).items()]
    ident = first.get("identification")  # 1:N for the headline mode; the JSON holds every mode's
    if ident:
        rows = [k for k in ident if k != MERGED]
        g0 = ident[rows[0]]
        lines.append(f"1:N identification ({first['mode']}), %")
        lines.append(f"{'gallery':<10}" + "".join(f"{'rank-' + k:>9}" for k in g0["rank"])
                     + "".join(f"{'TPIR@' + k:>11}" for k in g0["tpir_at_fpir"]))
        for name in rows:
            row = ident[name]
            lines.append(f"{name:<10}" + "".join(f"{_pct(x):>9}" for x in row["rank"].values())
                         + "".join(f"{_pct(x):>11}" for x in row["tpir_at_fpir"].values()))
        lines += [f"  {name} FPIR {k}: {why}" for name in rows
                  for k, why in ident[name].get("not_measured", {}).items()]
        merged = ident[MERGED]["rank"]
        lines.append(f"{'merged*':<10}" + "".join(f"{_pct(x):>9}" for x in merged.values())
                     + "   * InsightFace's merged gallery, closed set")
    return "\n".join(lines)
