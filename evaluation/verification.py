"""Embeddings of aligned crops (flip test-time augmentation) and verification of image
pairs with them: k-fold accuracy, ROC, TAR@FAR and their PNGs. lfw_eval.py, ijb_eval.py,
megaface.py and train.py (validation sets) use it.

torch is imported inside the functions that embed: lfw_eval.py, ijb_eval.py and megaface.py
answer --help, and megaface.py runs its actions that embed nothing, ~2 s sooner without it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.bin_loader import load_bin
from evaluation.lfw_pairs import Pair, pair_folds
from evaluation.verification_metrics import (
    DEFAULT_FOLDS,
    FARS,
    THRESHOLD_RULE,
    contiguous_folds,
    folds_have_both_kinds,
    pair_similarities,
    roc_curve,
    roc_metrics,
    stratified_folds,
    tar_key,
    ten_fold_details,
)
from evaluation.verification_plots import plot_error_gallery, plot_histogram, plot_roc
from utils import (
    ToolkitError,
    atomic_write_text,
    file_sha256,
    get_device,
    get_logger,
    short_hash,
)

DEFAULT_BATCH_SIZE = 64  # images per forward pass (twice that with their mirrors): small GPUs too
QUALITY_LOWEST = 10  # the lowest-quality images a quality summary names
QUALITY_MEASURE = ("L2 norm of the unnormalised embedding of the image itself (not its "
                   "mirror): MagFace trains it as the face's quality")


log = get_logger("lfw_eval")


class LfwEvalError(ToolkitError, ValueError):
    """Arguments or saved results that cannot be used as given; the message says which."""


def _uses_channels_last(model) -> bool:
    import torch  # torch on first use: see module docstring

    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def embed(model, images: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE, device=None,
          flip: bool = True, progress: bool = True, raw_pairs: bool = False,
          norms: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 embeddings (N, E) of RGB uint8 crops (N, 112, 112, 3).

    With ``flip`` the embedding is that of the image plus that of its mirror, then
    normalised. ``raw_pairs``: instead (N, 2, E), the unnormalised embeddings of each image
    and of its mirror (IJB's protocol modes pool them themselves). ``norms``: (embeddings,
    (N,) float64 qualities), an image's quality being the L2 norm of the unnormalised
    embedding of the image itself, never of its mirror nor of their sum (MagFace trains
    that norm as the face's quality). Runs in eval mode under
    ``torch.inference_mode`` (the model's previous mode is restored), batched, on ``device``
    (default: the model's GPU if it is on one, else CUDA when present; the model is moved
    there in place). Inputs follow the model's memory format (channels_last if its convs
    are)."""
    import torch  # torch on first use: see module docstring
    import torch.nn.functional as F  # torch on first use: see module docstring

    from models import normalize_batch  # loads torch: see module docstring

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"embed expects RGB uint8 (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:  # a model already on a GPU stays there (e.g. one DDP rank's)
        param = next(model.parameters(), None)
        on_gpu = param is not None and param.device.type == "cuda"
        device = param.device if on_gpu else get_device("auto")
    device = torch.device(device)
    model.to(device)
    memory_format = torch.channels_last if _uses_channels_last(model) else torch.contiguous_format
    was_training = model.training
    model.eval()
    outputs, qualities = [], []
    try:
        with torch.inference_mode(), tqdm(total=len(images), unit="img", desc="embed",
                                          disable=not progress, leave=False) as bar:
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                if not chunk.flags.writeable:  # torch.from_numpy warns on read-only arrays
                    chunk = chunk.copy()
                batch = torch.from_numpy(chunk).to(device, non_blocking=True)
                x = normalize_batch(batch)
                n = x.shape[0]
                if flip or raw_pairs:  # one forward pass over the images and their mirrors
                    x = torch.cat([x, x.flip(3)])
                feats = model(x.contiguous(memory_format=memory_format)).float()
                if norms:  # float64: squares of a finite float32 embedding may overflow
                    qualities.append(torch.linalg.vector_norm(feats[:n].double(), dim=1).cpu())
                if raw_pairs:
                    outputs.append(torch.stack([feats[:n], feats[n:]], dim=1).cpu())
                    bar.update(n)
                    continue
                if flip:
                    feats = feats[:n] + feats[n:]
                outputs.append(F.normalize(feats, dim=1).cpu())
                bar.update(n)
    finally:
        model.train(was_training)
    if not outputs:
        empty = np.zeros((0, 0), dtype=np.float32)
        return (empty, np.zeros(0)) if norms else empty
    feats = torch.cat(outputs).numpy().astype(np.float32, copy=False)
    return (feats, torch.cat(qualities).numpy()) if norms else feats


def quality_summary(norms: np.ndarray, labels: Sequence[str | int] | None = None,
                    lowest: int = QUALITY_LOWEST) -> dict[str, Any]:
    """{"measure", "images", "mean", "min", "max", "lowest": [{"image", "norm"}, ...]} of
    per-image qualities (``embed(..., norms=True)``), the ``lowest`` lowest first; an image
    is named by ``labels[i]`` (its name, or its index in a set), else by its position i."""
    norms = np.asarray(norms, dtype=np.float64).reshape(-1)
    labels = list(range(norms.size)) if labels is None else list(labels)
    if len(labels) != norms.size:
        raise ValueError(f"{norms.size} qualities but {len(labels)} image labels")
    summary: dict[str, Any] = {"measure": QUALITY_MEASURE, "images": int(norms.size)}
    if norms.size:
        summary.update(mean=float(norms.mean()), min=float(norms.min()),
                       max=float(norms.max()))
    order = np.argsort(norms, kind="stable")[:lowest]
    summary["lowest"] = [{"image": labels[i], "norm": float(norms[i])} for i in order]
    return summary


STRATIFIED_RULE = ("the i-th same pair and the i-th different pair in file order go to fold "
                   "i mod k; each fold's threshold is tuned on the other folds")


def _stratified_fold_count(issame: np.ndarray, nfolds: int, name: str) -> int:
    """``nfolds``, or fewer when a kind has fewer pairs; LfwEvalError below 2."""
    same = np.asarray(issame, dtype=bool)
    k = min(nfolds, int(same.sum()), int((~same).sum()))
    if k < 2:
        raise LfwEvalError(f"{name}: {int(same.sum())} same and {int((~same).sum())} different "
                           "pairs: cross-validating a threshold needs at least 2 of each")
    return k


def pairs_file_folds(pairs: Sequence[Pair], path: str | Path) -> tuple[np.ndarray, str]:
    """Fold index per pair and what the folds are: the file's own folds when its header
    declares two or more; for a single set (header ``<n>`` or ``1 <n>``, e.g. LFW's
    pairsDevTest.txt: n same then n different pairs) stratified folds (see
    :func:`verification_metrics.stratified_folds`), since blocks of it would be all-same or
    all-different."""
    same = np.array([p.same for p in pairs], dtype=bool)
    blocks = pair_folds(pairs)
    per_kind = int(same[blocks[0]].sum()) if blocks else 0
    if len(blocks) >= 2:
        return np.array([p.fold for p in pairs], dtype=np.int64), (
            f"the {len(blocks)} folds of {path} (its header: {len(blocks)} folds of "
            f"{per_kind} same + {per_kind} different pairs)")
    k = _stratified_fold_count(same, DEFAULT_FOLDS, str(path))
    return stratified_folds(same, k), (
        f"{path} is a single set of {per_kind} same + {per_kind} different pairs (no folds of "
        f"its own): stratified {k}-fold cross-validation ({STRATIFIED_RULE})")


def _choose_folds(same: np.ndarray, folds: np.ndarray | None, fold_rule: str | None,
                  nfolds: int, name: str) -> tuple[np.ndarray, str]:
    """The given folds, else ``nfolds`` contiguous blocks, else (a block holding one kind of
    pair) stratified folds, with a warning; and the rule that made them."""
    if folds is not None:
        return folds, fold_rule or "given per pair"
    folds = contiguous_folds(same.size, nfolds)
    fold_rule = fold_rule or f"{nfolds} contiguous blocks of the pair list"
    if not folds_have_both_kinds(same, folds):
        k = _stratified_fold_count(same, nfolds, name)
        log.warning("%s: %d contiguous blocks of its pairs do not all hold both same and "
                    "different pairs; scoring %d stratified folds instead", name, nfolds, k)
        folds = stratified_folds(same, k)
        fold_rule = f"{k} stratified folds ({STRATIFIED_RULE}): its blocks are one-kind"
    return folds, fold_rule


def evaluate_verification(model, images: np.ndarray, issame: np.ndarray,
                          batch_size: int = DEFAULT_BATCH_SIZE, device=None,
                          out_dir: str | Path | None = None, name: str = "lfw",
                          nfolds: int = DEFAULT_FOLDS, pair_labels: list[str] | None = None,
                          extra: dict[str, Any] | None = None,
                          progress: bool = True,
                          pair_index: np.ndarray | None = None,
                          folds: np.ndarray | None = None,
                          fold_rule: str | None = None,
                          file_stem: str | None = None, quality: bool = False,
                          image_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Verify pairs of consecutive images (2i, 2i+1) with ``model``: k-fold accuracy, std and
    threshold, ROC AUC, TAR@FAR. With ``out_dir``: ``<stem>_roc.png``, ``<stem>_hist.png``,
    ``<stem>_errors.png`` and ``<stem>_results.json`` (plus ``extra`` fields) are written,
    ``<stem>`` being ``file_stem`` (default ``name``).

    Folds: ``folds`` (fold index per pair, described by ``fold_rule``), else ``nfolds``
    contiguous blocks; blocks that do not all hold both kinds of pair (a set ordered all
    same, then all different) are replaced by stratified folds, with a warning. The results
    say which (``nfolds``, ``folds``).

    ``pair_index`` (2N,) lets ``images`` hold each distinct image once: pair i is then
    images ``pair_index[2i]`` and ``pair_index[2i+1]`` (each image is embedded once).

    ``quality``: the results' ``quality`` holds :func:`quality_summary` of the images the
    pairs use plus ``per_image`` {name: quality}, each named by ``image_names`` (else by its
    index in ``images``)."""
    images = np.asarray(images)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    index = np.arange(images.shape[0]) if pair_index is None \
        else np.asarray(pair_index, dtype=np.int64).reshape(-1)
    if index.size != 2 * same.size:
        raise LfwEvalError(f"{name}: {index.size} images for {same.size} pairs "
                           f"(need two per pair)")
    if index.size and (index.min() < 0 or index.max() >= images.shape[0]):
        raise LfwEvalError(f"{name}: pair_index points outside the {images.shape[0]} images")
    folds, fold_rule = _choose_folds(same, folds, fold_rule, nfolds, name)
    embedded = embed(model, images, batch_size=batch_size, device=device, progress=progress,
                     norms=quality)
    feats, norms = embedded if quality else (embedded, None)
    broken = int((~np.isfinite(feats).all(axis=1)).sum())
    if broken:  # NaN compares false: never score them (a diverged or overflowing model)
        raise LfwEvalError(f"{name}: {broken} of {len(feats)} images have non-finite (NaN/inf) "
                           "embeddings: the model diverged or overflows; nothing was scored")
    sims = pair_similarities(feats[index])
    results: dict[str, Any] = {"name": name, "n_pairs": int(same.size)}
    results.update(ten_fold_details(sims, same, folds=folds))
    results["folds"] = fold_rule
    results.update(roc_metrics(sims, same))
    results["threshold_rule"] = THRESHOLD_RULE
    if norms is not None:
        results["quality"] = _pair_images_quality(norms, index, image_names)
    if out_dir is not None:
        out_dir, stem = Path(out_dir), file_stem or name
        points = {far: results[tar_key(far)] for far in FARS if tar_key(far) in results}
        far_curve, tar_curve, _ = roc_curve(sims, same)
        files = {
            "roc": plot_roc(far_curve, tar_curve, out_dir / f"{stem}_roc.png",
                            auc=results["auc"], operating_points=points, title=f"{name} ROC"),
            "histogram": plot_histogram(sims, same, out_dir / f"{stem}_hist.png",
                                        threshold=results["threshold"],
                                        title=f"{name} similarities"),
            "errors": plot_error_gallery(images, sims, same, results["threshold"],
                                         out_dir / f"{stem}_errors.png",
                                         labels=pair_labels, pair_index=index),
        }
        results["files"] = {k: str(v) for k, v in files.items()}
        results.update(extra or {})
        results_path = out_dir / f"{stem}_results.json"
        results["files"]["results"] = str(results_path)
        atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
    return results


def _pair_images_quality(norms: np.ndarray, index: np.ndarray,
                         image_names: Sequence[str] | None) -> dict[str, Any]:
    """quality_summary and ``per_image`` of the images some pair uses (not an unreadable
    image's black placeholder), named by ``image_names`` or by index."""
    used = np.unique(index)
    if image_names is not None and len(image_names) != norms.size:
        raise LfwEvalError(f"{norms.size} images but {len(image_names)} image names")
    labels = used.tolist() if image_names is None else [image_names[i] for i in used]
    summary = quality_summary(norms[used], labels)
    summary["per_image"] = {str(k): float(v) for k, v in zip(labels, norms[used], strict=True)}
    return summary


def bin_results_stem(path: str | Path) -> str:
    """The file names of a .bin set's results: its stem and a short hash of its resolved
    path, so sets of one name in two folders (and raw LFW's ``lfw_results.json``) never
    overwrite each other, while the same set evaluated again replaces its own."""
    return f"{Path(path).stem}_{short_hash(str(Path(path).resolve()))}"


def evaluate_bin(model, path: str | Path, batch_size: int = DEFAULT_BATCH_SIZE, device=None,
                 out_dir: str | Path | None = None, name: str | None = None,
                 progress: bool = True, extra: dict[str, Any] | None = None,
                 quality: bool = False) -> dict[str, Any]:
    """``load_bin`` then ``evaluate_verification`` (name defaults to the file's stem; the
    files are named by :func:`bin_results_stem`). The results record the set by path and
    content hash (``bin_sha256``: the set is read whole anyway), plus ``extra``;
    ``quality``: each image's, named by its index in the set."""
    images, issame = load_bin(path, progress=progress)
    source = {"bin": str(path), "bin_sha256": file_sha256(path), **(extra or {})}
    return evaluate_verification(model, images, issame, batch_size=batch_size, device=device,
                                 out_dir=out_dir, name=name or Path(path).stem,
                                 file_stem=bin_results_stem(path), extra=source,
                                 progress=progress, quality=quality)
