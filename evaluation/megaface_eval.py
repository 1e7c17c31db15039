"""MegaFace Challenge 1 scoring from features: identification (CMC) and verification (TAR@FAR).

The protocol, as the devkit defines it: for every FaceScrub identity and every ordered pair
(probe p, gallery g) of two different images of it, g is hidden among N MegaFace distractors
and p searches that gallery. p is right at rank k when fewer than k distractors score above
score(p, g). Ties: a distractor scoring exactly score(p, g) does NOT count against p (strict
``>``). Verification: genuine pairs are the unordered pairs of images within each FaceScrub
identity, impostor pairs are every FaceScrub image against every distractor.

Score: ``score(a, b) = 1 - |a - b|^2 / 2``, which is exactly the cosine similarity for unit
vectors (every feature gen_features writes), but, unlike a plain dot product, it keeps the
noise-removal convention working: a distractor flagged with 100 in its extra dimension lies
~100 away from every probe and can never outrank anything.

Memory stays bounded: distractors stream through in chunks, each chunk's (probes x chunk)
score block is reduced at once, and the full probe x distractor matrix never exists:
 * identification keeps, per probe, the ``max_rank`` best distractor scores seen so far
   (fewer than k distractors above s  <=>  the k-th best distractor score is <= s);
 * verification keeps the top ``floor(max_far * #impostors) + 1`` impostor scores overall
   (a running threshold discards everything below them), which is exactly what the
   thresholds for every FAR need.
Distractor subsets of size N are the first N distractors of ``order`` (nested prefixes, so
every size comes out of one pass); pass a seeded permutation as ``order`` for random subsets.

torch is imported inside the functions that score, so megaface.py's --help and its actions
that score nothing start ~2 s sooner; matplotlib (~0.5 s) likewise loads only to plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.verification_metrics import (
    FAR_EPS,
    far_measurable,
    not_measured,
    tar_at_far_from_top,
)
from evaluation.verification_plots import save_figure
from utils import ToolkitError, get_device

DEFAULT_SIZES = (10, 100, 1000, 10000, 100000, 1000000)  # the devkit's distractor set sizes
DEFAULT_FARS = (1e-6, 1e-5, 1e-4)  # 1e-6: the FAR papers report at 1M distractors
DEFAULT_MAX_RANK = 10  # CMC ranks 1..10: rank-1 the headline, rank-10 the table's other column
SCORE_BLOCK_ELEMENTS = 4 * 2**20  # CPU: probes x chunk scores held at once (16 MiB of float32)
# CUDA: fewer, larger chunks (each costs kernel launches and syncs), the score block at most
# a third of the distractor array (so peak memory stays under 1.5x it) and at most 1 GiB
GPU_MAX_BLOCK_ELEMENTS = 2**28
MIN_CHUNK = 256  # distractors per chunk at least: many probes must not make chunks tiny
TILE = 64  # columns per tile whose maximum screens the verification buffer's candidates
BUFFER_MIN_ELEMENTS = 2**19  # the impostor buffer grows to max(2k, this) before a trim
ROC_POINTS = 60  # log-spaced FARs of the ROC curve: smooth at a glance, cheap


class MegaFaceError(ToolkitError, ValueError):
    """Features or lists that cannot be scored as given; the message names what is wrong."""


# ----------------------------------------------------------------------------- scores

def _left(a):
    """[a, 1 - |a|^2/2, 1]: with :func:`_right`, one matrix product gives the whole score
    (no extra passes over the score block for the norm terms)."""
    import torch  # torch on first use: see module docstring

    half_sq = 0.5 * (a * a).sum(dim=1, keepdim=True)  # not norm()**2: exact when it can be
    return torch.cat([a, 1.0 - half_sq, torch.ones_like(half_sq)], dim=1)


def _right(b):
    """[b, 1, -|b|^2/2] (see :func:`_left`)."""
    import torch  # torch on first use: see module docstring

    half_sq = 0.5 * (b * b).sum(dim=1, keepdim=True)
    return torch.cat([b, torch.ones_like(half_sq), -half_sq], dim=1)


def pair_scores(a, b, out=None):
    """``1 - |a_i - b_j|^2 / 2`` for every row i of ``a`` and j of ``b`` (torch tensors),
    optionally into ``out`` (len(a), len(b))."""
    import torch  # torch on first use: see module docstring

    return torch.mm(_left(a), _right(b).t(), out=out)


def _nonzero(mask):
    """Indices of the true entries of a 1-D mask; numpy on the CPU, where torch's parallel
    nonzero costs milliseconds even for a few thousand entries."""
    import torch  # torch on first use: see module docstring

    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


def auto_chunk_size(num_probes: int, num_distractors: int = 0, dim: int = 0,
                    device_type: str = "cpu") -> int:
    """Distractors per chunk (a multiple of TILE): a score block of SCORE_BLOCK_ELEMENTS on
    the CPU (cache-friendly); on a GPU up to a third of the distractor array, at most 1 GiB."""
    elements = SCORE_BLOCK_ELEMENTS
    if device_type == "cuda":
        elements = min(GPU_MAX_BLOCK_ELEMENTS, max(elements, num_distractors * dim // 3))
    return max(MIN_CHUNK, elements // max(1, num_probes) // TILE * TILE)


class _TopScores:
    """The ``k`` largest of a stream of scores, kept with a running threshold ``tau``:
    everything seen above ``tau`` is in the buffer, which holds at least ``k`` values once
    ``k`` have been seen (so values and counts above any of its top-k entries are exact)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.cap = max(2 * k, BUFFER_MIN_ELEMENTS)
        self.tau: float | None = None
        self.parts: list = []
        self.size = 0

    def add(self, values) -> None:
        values = values.reshape(-1)
        if self.tau is None:  # a copy: the caller reuses the memory of ``values``
            values = values.clone()
        else:  # nonzero + index_select: boolean indexing is slower on the CPU
            values = values.index_select(0, _nonzero(values > self.tau))
        if values.numel() == 0:
            return
        self.parts.append(values)
        self.size += values.numel()
        if self.size > self.cap:
            self._reduce()

    def add_block(self, scores, tiles, tile_max) -> None:
        """All scores of one chunk (P, C), with its tiles (P*T, W) and tile maxima (P, T)."""
        import torch  # torch on first use: see module docstring

        if self.tau is None and self.size + scores.numel() <= self.cap:
            self.add(scores)
            return
        if self.tau is None:  # start the threshold at a value that >= k scores reach
            per_row = min(scores.shape[1], -(-self.k // scores.shape[0]))
            pool = torch.topk(scores, per_row, dim=1, sorted=False).values.reshape(-1)
            pool = torch.cat([pool, *self.parts])  # >= k values, all seen
            kth = torch.topk(pool, self.k, sorted=False).values.min()
            # just below it: scores equal to the k-th stay in, so the buffer keeps >= k
            self.tau = float(torch.nextafter(kth, kth.new_tensor(-math.inf)))
            if self.parts:
                kept = torch.cat(self.parts)
                self.parts = [kept.index_select(0, _nonzero(kept > self.tau))]
                self.size = self.parts[0].numel()
        hit = _nonzero(tile_max.reshape(-1) > self.tau)  # only tiles holding such a score
        if hit.numel():
            self.add(tiles.index_select(0, hit))

    def _reduce(self) -> None:
        import torch  # torch on first use: see module docstring

        values = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]
        if values.numel() > self.k:
            values = torch.topk(values, self.k, sorted=False).values
            self.tau = float(values.min())
        self.parts, self.size = [values], values.numel()

    def sorted_desc(self):
        """All buffered scores, largest first (float64 numpy)."""
        import torch  # torch on first use: see module docstring

        if not self.parts:
            return np.zeros(0)
        self._reduce()
        return torch.sort(self.parts[0], descending=True).values.double().cpu().numpy()


# ----------------------------------------------------------------------------- the pass

def _as_tensor(x, name: str):
    import torch  # torch on first use: see module docstring

    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0:
        raise MegaFaceError(f"{name}: expected a non-empty 2-D array of features, got shape "
                            f"{tuple(t.shape)}")
    return t.float()


def _check_finite(chunk, what: str, first: int = 0, rows=None) -> None:
    """A NaN or infinite feature scores NaN against everything, and NaN comparisons make a
    probe right (or wrong) at every rank: refuse it, naming its row."""
    import torch  # torch on first use: see module docstring

    finite = torch.isfinite(chunk).all(dim=1)
    if not bool(finite.all()):
        bad = int(_nonzero(~finite.cpu())[0])
        row = first + bad if rows is None else int(rows[bad])
        raise MegaFaceError(f"{what} {row} has non-finite values (NaN or inf)")


def _stream(probes, distractors, order, sizes: Sequence[int], max_rank: int, k_impostor: int,
            chunk_size: int, device, progress: bool) -> dict[int, tuple]:
    """One pass over the distractors (in ``order``); at each size N in ``sizes`` a snapshot of
    (per-probe top-``max_rank`` scores (P, K) or None, sorted impostor top scores or None)."""
    import torch  # torch on first use: see module docstring

    num_probes = probes.shape[0]
    best = torch.full((num_probes, max_rank), -math.inf, device=device) if max_rank else None
    impostors = _TopScores(k_impostor) if k_impostor else None
    block = torch.empty(num_probes * chunk_size, device=device)  # every chunk's scores, reused
    left = _left(probes)
    snapshots: dict[int, tuple] = {}
    pos = 0
    with tqdm(total=max(sizes), unit="distractor", desc="megaface", disable=not progress,
              leave=False) as bar:
        for size in sorted(sizes):
            while pos < size:
                end = min(pos + chunk_size, size)
                idx = slice(pos, end) if order is None else order[pos:end]
                chunk = torch.as_tensor(distractors[idx]).to(device, torch.float32)
                _check_finite(chunk, "distractor", pos, None if order is None else idx)
                scores = torch.mm(left, _right(chunk).t(),
                                  out=block[:num_probes * (end - pos)].view(num_probes, -1))
                width = TILE if scores.shape[1] % TILE == 0 else scores.shape[1]
                tiles = scores.view(num_probes, -1, width)
                tile_max = tiles.amax(dim=2)  # (P, tiles): screens the work below
                row_max = tile_max.amax(dim=1)
                if best is not None:  # only probes with a score above their K-th best change
                    rows = _nonzero(row_max > best[:, -1])
                    if rows.numel():
                        # a row's K best scores lie in its K tiles of highest maximum
                        num_tiles = tile_max.shape[1]
                        pick = torch.topk(tile_max.index_select(0, rows),
                                          min(max_rank, num_tiles), dim=1).indices
                        flat = (rows.unsqueeze(1) * num_tiles + pick).reshape(-1)
                        cand = tiles.reshape(-1, width).index_select(0, flat)
                        merged = torch.cat([best.index_select(0, rows),
                                            cand.reshape(rows.numel(), -1)], dim=1)
                        best.index_copy_(0, rows, torch.topk(merged, max_rank, dim=1).values)
                if impostors is not None:
                    impostors.add_block(scores, tiles.reshape(-1, width), tile_max)
                bar.update(end - pos)
                pos = end
            snapshots[size] = (None if best is None else best.cpu().clone(),
                               None if impostors is None else impostors.sorted_desc())
    return snapshots


def _identity_groups(labels: Sequence[Any]) -> list[np.ndarray]:
    """Indices of each identity's images, for identities with at least two."""
    _, inverse = np.unique(np.asarray(labels), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    splits = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    return [g for g in splits if len(g) >= 2]


def _genuine_pairs(probes, groups: list[np.ndarray]) -> tuple:
    """Every ordered genuine pair (probe p, gallery g != p, same identity): p and g indices
    and score(p, g), as CPU tensors."""
    import torch  # torch on first use: see module docstring

    p_idx, g_idx, scores = [], [], []
    for g in groups:
        members = probes.index_select(0, torch.as_tensor(g, device=probes.device))
        s = pair_scores(members, members).cpu()
        ii, jj = (~torch.eye(len(g), dtype=torch.bool)).nonzero(as_tuple=True)
        gt = torch.as_tensor(g)
        p_idx.append(gt.index_select(0, ii))
        g_idx.append(gt.index_select(0, jj))
        scores.append(s.reshape(-1).index_select(0, ii * len(g) + jj))
    if not groups:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, torch.zeros(0)
    return torch.cat(p_idx), torch.cat(g_idx), torch.cat(scores)


def _cmc(p_idx, scores, best) -> np.ndarray:
    """Correct counts at ranks 1..K over the ordered genuine pairs: p is right at rank k
    exactly when its k-th best distractor score is <= score(p, g)."""
    hit = scores.unsqueeze(1) >= best.index_select(0, p_idx)
    return hit.sum(dim=0).double().numpy()


def tar_at_far(genuine: np.ndarray, impostor_desc: np.ndarray, num_impostors: int,
               far: float) -> dict[str, float | bool | None]:
    """:func:`verification_metrics.tar_at_far_from_top` as a dict, with the FAR achieved
    and whether ``far`` is resolvable (:func:`verification_metrics.far_measurable`: at least
    1/far impostors; when not, ``not_measured`` says so and the table prints that, not the
    TAR of no false accept); threshold None when every pair is accepted."""
    tar, threshold = tar_at_far_from_top(genuine, impostor_desc, num_impostors, far)
    false_accepts = num_impostors if threshold == -math.inf \
        else int(np.count_nonzero(impostor_desc > threshold))
    out = {"tar": tar, "threshold": threshold if math.isfinite(threshold) else None,
           "far_achieved": false_accepts / num_impostors,
           "resolvable": far_measurable(far, num_impostors)}
    if not out["resolvable"]:
        out["not_measured"] = not_measured(far)
    return out


def megaface_evaluate(probe_feats, probe_labels: Sequence[Any], distractor_feats,
                      sizes: Sequence[int] | None = None, max_rank: int = DEFAULT_MAX_RANK,
                      fars: Sequence[float] = DEFAULT_FARS, chunk_size: int | None = None,
                      device=None, order: Sequence[int] | None = None,
                      progress: bool = True) -> dict[int, dict[str, Any]]:
    """CMC (ranks 1..max_rank) and TAR at each FAR for every distractor count N in ``sizes``
    (those <= the distractors available; all of them when none is), in one streamed pass.

    ``distractor_feats`` may be a numpy array (memory-mapped is fine) or a tensor; it is read
    chunk by chunk in ``order`` (default: as stored). Returns ``{N: {"num_distractors",
    "cmc": [rate at rank 1..K], "num_pairs", "verification": {far: {...}}, "roc": {...}}}``."""
    import torch  # torch on first use: see module docstring

    device = get_device("auto") if device is None else torch.device(device)
    probes = _as_tensor(probe_feats, "probe_feats")
    _check_finite(probes, "probe")
    if len(probe_labels) != probes.shape[0]:
        raise MegaFaceError(f"{len(probe_labels)} probe labels for {probes.shape[0]} probe "
                            "features")
    num_distractors = len(distractor_feats) if order is None else len(order)
    dim = distractor_feats.shape[1] if getattr(distractor_feats, "ndim", 0) == 2 else None
    if num_distractors == 0 or dim != probes.shape[1]:
        raise MegaFaceError(f"distractor_feats: expected a non-empty (N, {probes.shape[1]}) "
                            f"array, got shape {tuple(getattr(distractor_feats, 'shape', ()))}")
    if max_rank < 0 or any(not 0 < f <= 1 for f in fars):
        raise MegaFaceError(f"max_rank must be >= 0 and FARs in (0, 1]; got {max_rank}, {fars}")
    sizes = sorted({int(n) for n in (sizes or ()) if 0 < int(n) <= num_distractors}) \
        or [num_distractors]
    groups = _identity_groups(probe_labels)
    num_probes = probes.shape[0]
    k_impostor = (int(math.floor(max(fars) * num_probes * sizes[-1] + FAR_EPS)) + 1) if fars else 0
    chunk = int(chunk_size) if chunk_size else auto_chunk_size(
        num_probes, num_distractors, probes.shape[1], device.type)
    if order is not None:
        order = np.asarray(order, dtype=np.int64)
    with torch.inference_mode():
        probes = probes.to(device)
        snapshots = _stream(probes, distractor_feats, order, sizes, max_rank, k_impostor,
                            chunk, device, progress)
        p_idx, g_idx, pair_score = _genuine_pairs(probes, groups)
        genuine = pair_score[p_idx < g_idx].double().numpy()  # unordered pairs
        results: dict[int, dict[str, Any]] = {}
        for size, (best, impostor_desc) in snapshots.items():
            entry: dict[str, Any] = {"num_distractors": size}
            if best is not None:
                pairs = len(pair_score)
                entry["cmc"] = (_cmc(p_idx, pair_score, best) / pairs).tolist() if pairs \
                    else [None] * max_rank
                entry["num_pairs"] = pairs
            if impostor_desc is not None:
                n_imp = num_probes * size
                entry["verification"] = {f: tar_at_far(genuine, impostor_desc, n_imp, f)
                                         for f in fars}
                grid = np.logspace(math.log10(1.0 / n_imp), math.log10(max(fars)), ROC_POINTS)
                # only FARs the impostors measure, as the table (none when max(fars) is not)
                grid = np.array([f for f in grid if f <= max(fars) and far_measurable(f, n_imp)])
                entry["roc"] = {"far": grid.tolist(), "tar": [
                    tar_at_far(genuine, impostor_desc, n_imp, f)["tar"] for f in grid]}
                entry["num_genuine"], entry["num_impostor"] = len(genuine), n_imp
            results[size] = entry
    return results


def megaface_identification(probe_feats, probe_labels: Sequence[Any], distractor_feats,
                            ranks: Sequence[int] = (1,), chunk_size: int | None = None,
                            device=None, progress: bool = False) -> dict[int, float]:
    """Identification rate at each rank in ``ranks`` against all the distractors given."""
    if not ranks or min(ranks) < 1:
        raise MegaFaceError(f"ranks must be positive integers, got {ranks}")
    res = megaface_evaluate(probe_feats, probe_labels, distractor_feats, sizes=None,
                            max_rank=max(ranks), fars=(), chunk_size=chunk_size, device=device,
                            progress=progress)
    cmc = next(iter(res.values()))["cmc"]
    return {int(r): cmc[r - 1] for r in ranks}


def megaface_verification(probe_feats, probe_labels: Sequence[Any], distractor_feats,
                          fars: Sequence[float] = DEFAULT_FARS, chunk_size: int | None = None,
                          device=None, progress: bool = False) -> dict[float, float]:
    """TAR at each FAR: genuine pairs within probe identities, impostors probe x distractor."""
    res = megaface_evaluate(probe_feats, probe_labels, distractor_feats, sizes=None, max_rank=0,
                            fars=fars, chunk_size=chunk_size, device=device, progress=progress)
    ver = next(iter(res.values()))["verification"]
    return {f: ver[f]["tar"] for f in fars}


def format_results(results: Mapping[int, Mapping[str, Any]],
                   fars: Sequence[float] = DEFAULT_FARS) -> str:
    """A table: distractors, rank-1, the last rank (10 by default), TAR at each FAR; "n/a"
    where the results have none or too few impostors back it (a footnote says how many
    would, as the results' ``not_measured``)."""
    def pct(v):
        return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) \
            else f"{100 * v:6.2f}"

    def tar(v):
        return pct(v["tar"] if v.get("resolvable", True) else None)

    last = max((len(r.get("cmc") or [None]) for r in results.values()), default=1)
    head = f"{'distractors':>12} {'rank-1':>7} {'rank-' + str(last):>7}" + "".join(
        f" {'TAR@' + format(f, 'g'):>11}" for f in fars)
    rows, notes = [head], {}
    for n, r in sorted(results.items()):
        cmc = r.get("cmc") or [None]
        ver = r.get("verification", {})
        rows.append(f"{n:>12,} {pct(cmc[0]):>7} {pct(cmc[-1]):>7}" + "".join(
            f" {tar(ver[f]) if f in ver else 'n/a':>11}" for f in fars))
        notes.update({f: ver[f]["not_measured"] for f in fars if "not_measured" in ver.get(f, {})})
    rows += [f"  TAR@{f:g}: {why} (probes x distractors)" for f, why in sorted(notes.items())]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- figures

def plot_cmc(results: Mapping[int, Mapping[str, Any]], path: str | Path) -> Path:
    """Identification rate against rank, one curve per distractor count."""
    from matplotlib.figure import Figure  # matplotlib (~0.5 s) loads only to plot

    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for size, r in sorted(results.items()):
        cmc = [np.nan if v is None else 100 * v for v in r.get("cmc", [])]
        ax.plot(range(1, len(cmc) + 1), cmc, marker="o", label=f"{size:,} distractors")
    ax.set(xlabel="rank", ylabel="identification rate (%)", title="MegaFace CMC")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_rank1_vs_distractors(results: Mapping[int, Mapping[str, Any]],
                              path: str | Path) -> Path:
    """Rank-1 identification rate against the number of distractors (log axis)."""
    from matplotlib.figure import Figure  # matplotlib (~0.5 s) loads only to plot

    sizes = sorted(s for s, r in results.items() if r.get("cmc") and r["cmc"][0] is not None)
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    ax.semilogx(sizes, [100 * results[s]["cmc"][0] for s in sizes], marker="o")
    ax.set(xlabel="number of distractors", ylabel="rank-1 identification rate (%)",
           title="MegaFace identification")
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


def plot_roc_curves(results: Mapping[int, Mapping[str, Any]], path: str | Path) -> Path:
    """TAR against FAR (log axis), one curve per distractor count."""
    from matplotlib.figure import Figure  # matplotlib (~0.5 s) loads only to plot

    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for size, r in sorted(results.items()):
        roc = r.get("roc")
        if roc and roc["far"]:
            tar = [np.nan if v is None else v for v in roc["tar"]]
            ax.semilogx(roc["far"], tar, marker=".", label=f"{size:,} distractors")
    ax.set(xlabel="false accept rate", ylabel="true accept rate", title="MegaFace verification")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
