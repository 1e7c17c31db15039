"""Benchmark of ijb_eval.py on an IJB-C-sized synthetic release, from cached features to the
table, next to InsightFace's method measured in the same run.

At --scale 1: 469,375 images x 512-D (raw + mirror in the cache, 1.9 GB on disk), 23,124
templates with media, 15,658,489 pairs, galleries of 1,772 and 1,759 subjects searched by
19,593 probes, all written in the official layout (meta/*.txt, the 1:N CSVs, cache chunks)
before the clock starts. Each stage is timed: reading the meta files, reading the cache into
the mode's per-image features, pooling, 1:1 scoring, TAR@FAR + ROC + AUC, 1:N. Against it:
InsightFace's pooling (a Python loop over templates, each doing np.where over every image)
and scoring (100k-pair chunks of row gathers), timed on the first templates / chunks and
extrapolated linearly (each template costs O(images), each chunk the same), as the table
says. Peak memory: Linux's VmHWM after resetting it (/proc/self/clear_refs), above what was
resident before the protocol, as a multiple of the (images x D) float32 feature array.

Targets: pooling and 1:1 scoring >= 10x faster than InsightFace's method, peak < 2x the
feature array, the whole protocol under a minute on 2 cores.

  python bench/ijb_protocol_speed.py [--scale 0.1] [--embed-images 32 --network ir50 --device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse  # noqa: F401 - imported before the clock: ijb_eval's pooling uses it
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ijb_eval  # noqa: E402
from bench._peak_memory import peak_above, start_peak  # noqa: E402
from evaluation import ijb_features, ijb_report  # noqa: E402
from evaluation.ijb_release import Release, load_release  # noqa: E402
from faces.face_warp import template_for_size  # noqa: E402
from models import build_model  # noqa: E402
from utils import (  # noqa: E402
    device_name,
    encode_image,
    get_device,
    int_at_least,
    positive_float,
    positive_int,
)

# IJB-C's sizes (InsightFace's pack)
IMAGES, TEMPLATES, PAIRS = 469_375, 23_124, 15_658_489
G1_SUBJECTS, G2_SUBJECTS, PROBES = 1_772, 1_759, 19_593
DIM = 512
MEDIA_SLOTS = 6  # an image's media is one of this many per template (video frames share one)
# An image feature = SUBJECT_WEIGHT x its subject's unit centre + TEMPLATE_OFFSET x a unit
# offset shared by its template (pose, age, camera) + unit-norm image noise, so rates are
# neither 0 nor 100%.
SUBJECT_WEIGHT = 0.4
TEMPLATE_OFFSET = 0.8
MIRROR_NOISE = 0.05
GEN_BLOCK = 16384
INSIGHTFACE_CHUNK = 100_000  # InsightFace scores pairs in chunks of this many
BASELINE_TEMPLATES = 1000  # InsightFace's pooling loop is timed on this many templates
BASELINE_CHUNKS = 20  # and its scoring on this many chunks; both extrapolated
ALIGN_IMAGES = 256
LOOSE_SIZE = 250


def write_release(root: Path, scale: float, seed: int = 0) -> dict:
    """A synthetic IJB-C in the official layout plus its feature cache; returns sizes."""
    rng = np.random.default_rng(seed)
    n_g1, n_g2 = max(2, round(G1_SUBJECTS * scale)), max(2, round(G2_SUBJECTS * scale))
    n_probe = max(4, round(PROBES * scale))
    n_templates = n_g1 + n_g2 + n_probe
    n_images = max(n_templates, round(IMAGES * scale))
    n_pairs = max(n_probe + 1, round(PAIRS * scale))
    subjects = n_g1 + n_g2
    gallery_subject = np.arange(subjects)  # gallery template g enrols subject g
    probe_subject = rng.integers(0, subjects, n_probe)
    template_subject = np.concatenate([gallery_subject, probe_subject])
    template_ids = np.arange(1, n_templates + 1)
    image_template = np.concatenate([np.arange(n_templates),  # every template gets an image
                                     rng.integers(0, n_templates, n_images - n_templates)])
    rng.shuffle(image_template)
    media = image_template * MEDIA_SLOTS + rng.integers(0, MEDIA_SLOTS, n_images)
    meta = root / "meta"
    meta.mkdir(parents=True)
    names = [f"{i + 1}.jpg" for i in range(n_images)]
    with open(meta / "ijbc_face_tid_mid.txt", "w") as f:
        f.writelines(f"{n} {template_ids[t]} {m}\n"
                     for n, t, m in zip(names, image_template, media, strict=True))
    lmk = rng.uniform(30, 90, (n_images, 10))
    score = rng.uniform(0.5, 1.0, n_images)
    with open(meta / "ijbc_name_5pts_score.txt", "w") as f:
        f.writelines(f"{n} " + " ".join(f"{v:.2f}" for v in row) + f" {s:.4f}\n"
                     for n, row, s in zip(names, lmk, score, strict=True))
    # pairs: every probe with its subject's enrolled template, the rest random gallery x probe
    gallery_t = rng.integers(0, subjects, n_pairs - n_probe)
    probe_t = subjects + rng.integers(0, n_probe, n_pairs - n_probe)
    mated = template_subject[probe_t] == gallery_t  # impostor pairs: another subject
    gallery_t[mated] = (gallery_t[mated] + 1) % subjects
    t1 = np.concatenate([probe_subject, gallery_t])
    t2 = np.concatenate([subjects + np.arange(n_probe), probe_t])
    label = (template_subject[t1] == template_subject[t2]).astype(np.int64)
    np.savetxt(meta / "ijbc_template_pair_label.txt",
               np.stack([template_ids[t1], template_ids[t2], label], 1), fmt="%d")
    sets = {"probe_mixed": np.arange(subjects, n_templates),
            "gallery_G1": np.arange(n_g1), "gallery_G2": np.arange(n_g1, subjects)}
    for name, members in sets.items():
        chosen = np.isin(image_template, members)
        with open(meta / f"ijbc_1N_{name}.csv", "w") as f:
            f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
            f.writelines(f"{template_ids[t]},{template_subject[t]},img/{i + 1}.jpg\n"
                         for i, t in zip(np.flatnonzero(chosen), image_template[chosen],
                                         strict=True))
    centres = rng.standard_normal((subjects, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    offsets = rng.standard_normal((n_templates, DIM)).astype(np.float32)
    offsets *= TEMPLATE_OFFSET / np.linalg.norm(offsets, axis=1, keepdims=True)
    cache = root / "cache"
    cache.mkdir()
    image_subject = template_subject[image_template]
    for c, s in enumerate(range(0, n_images, ijb_features.CHUNK_IMAGES)):
        idx = np.arange(s, min(s + ijb_features.CHUNK_IMAGES, n_images))
        raw = rng.standard_normal((idx.size, DIM), dtype=np.float32) / np.float32(DIM ** 0.5)
        raw += SUBJECT_WEIGHT * centres[image_subject[idx]] + offsets[image_template[idx]]
        raw *= rng.uniform(0.5, 2.0, (idx.size, 1)).astype(np.float32)  # N0 vs N1 differ
        mirror = raw + MIRROR_NOISE * rng.standard_normal(raw.shape, dtype=np.float32)
        np.save(ijb_features.chunk_path(cache, c), np.stack([raw, mirror], 1))
    return {"images": n_images, "templates": n_templates, "pairs": n_pairs,
            "probes": n_probe, "g1": n_g1, "g2": n_g2}


# ----------------------------------------------------------------------------- InsightFace's method

def insightface_pooling(feats, templates, medias, count):
    """Their image2template_feature loop (N1 and D1 already applied), first ``count``
    templates: np.where over all images per template, then per media."""
    unique = np.unique(templates)[:count]
    out = np.zeros((len(unique), feats.shape[1]), np.float32)
    for k, t in enumerate(unique):
        (ind_t,) = np.where(templates == t)
        face_feats, face_medias = feats[ind_t], medias[ind_t]
        media_ids, media_counts = np.unique(face_medias, return_counts=True)
        pooled = []
        for m, ct in zip(media_ids, media_counts, strict=True):
            (ind_m,) = np.where(face_medias == m)
            pooled.append(face_feats[ind_m] if ct == 1
                          else np.mean(face_feats[ind_m], axis=0, keepdims=True))
        out[k] = np.sum(np.array(pooled), axis=0)
    return out


def insightface_scoring(template_ids, template_feats, t1, t2, chunks):
    """Their verification(): 100k-pair chunks of row gathers, first ``chunks`` chunks."""
    row_of = np.zeros(template_ids.max() + 1, np.int64)
    row_of[template_ids] = np.arange(template_ids.size)
    score = np.zeros(min(len(t1), chunks * INSIGHTFACE_CHUNK))
    for s in range(0, score.size, INSIGHTFACE_CHUNK):
        f1 = template_feats[row_of[t1[s:s + INSIGHTFACE_CHUNK]]]
        f2 = template_feats[row_of[t2[s:s + INSIGHTFACE_CHUNK]]]
        score[s:s + INSIGHTFACE_CHUNK] = np.sum(f1 * f2, -1)
    return score


# ----------------------------------------------------------------------------- stages

def _cache_chunks(root: Path, sizes: dict) -> list[Path]:
    """The chunk files write_release wrote, in image order."""
    return [ijb_features.chunk_path(root / "cache", c)
            for c in range(-(-sizes["images"] // ijb_features.CHUNK_IMAGES))]


def run_protocol(root: Path, sizes: dict, mode: str) -> tuple[dict, dict]:
    """The CLI's path from cached features to the table, stage by stage."""
    seconds = {}
    t0 = time.perf_counter()
    release = load_release(root, "IJBC")
    seconds["read meta files"] = time.perf_counter() - t0
    flip = ijb_eval.parse_mode(mode)[2]
    t = time.perf_counter()
    chunks = _cache_chunks(root, sizes)
    feats = ijb_features.mode_features(chunks, flip, sizes["images"])
    seconds["read cache (mode features)"] = time.perf_counter() - t
    t = time.perf_counter()
    ids, tfeats = ijb_eval.release_templates(feats, release, mode)
    seconds["pooling"] = time.perf_counter() - t
    del feats
    t = time.perf_counter()
    scores = ijb_eval.verification_scores(ids, tfeats, release.pairs_t1, release.pairs_t2)
    seconds["1:1 scoring"] = time.perf_counter() - t
    t = time.perf_counter()
    verification, _ = ijb_eval.verification_report(scores, release.pairs_label)
    seconds["TAR@FAR, ROC, AUC"] = time.perf_counter() - t
    del scores
    t = time.perf_counter()
    ident = ijb_eval.search_report(ids, tfeats, release.search, ("G1", "G2"))
    seconds["1:N (G1, G2, merged)"] = time.perf_counter() - t
    run = {"target": "IJBC", "images": sizes["images"], "templates": int(ids.size),
           "mode": mode, "verification": verification, "identification": ident}
    t = time.perf_counter()
    table = ijb_report.format_table("IJBC", [run])
    seconds["table"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return seconds, {"table": table, "release": release, "ids": ids, "tfeats": tfeats}


def time_baselines(root: Path, sizes: dict, state: dict) -> dict:
    release = state["release"]
    feats = ijb_features.mode_features(_cache_chunks(root, sizes), True, sizes["images"])
    t = time.perf_counter()  # their N1 and D1, whole-array expressions as they write them
    feats = feats / np.sqrt(np.sum(feats ** 2, -1))[:, np.newaxis]
    feats = feats * release.faceness[:, np.newaxis]
    prepare_s = time.perf_counter() - t
    count = min(BASELINE_TEMPLATES, sizes["templates"])
    t = time.perf_counter()
    insightface_pooling(feats, release.templates, release.medias, count)
    pool_s = prepare_s + (time.perf_counter() - t) * sizes["templates"] / count
    del feats
    n_chunks = min(BASELINE_CHUNKS, -(-sizes["pairs"] // INSIGHTFACE_CHUNK))
    t = time.perf_counter()
    insightface_scoring(state["ids"], state["tfeats"], release.pairs_t1, release.pairs_t2,
                        n_chunks)
    timed_pairs = min(sizes["pairs"], n_chunks * INSIGHTFACE_CHUNK)
    score_s = (time.perf_counter() - t) * sizes["pairs"] / timed_pairs
    return {"pooling": (pool_s, f"{count} of {sizes['templates']:,} templates, extrapolated"),
            "1:1 scoring": (score_s, f"{timed_pairs:,} of {sizes['pairs']:,} pairs, "
                                     "extrapolated")}


def time_embedding(args) -> list[str]:
    """Reading + aligning loose crops (thread pool), and the network's raw + mirror
    embedding on the device."""
    lines = []
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        crop_dir = Path(tmp) / "loose_crop"
        crop_dir.mkdir()
        for i in range(ALIGN_IMAGES):
            img = rng.integers(0, 255, (LOOSE_SIZE, LOOSE_SIZE, 3), dtype=np.uint8)
            (crop_dir / f"{i}.jpg").write_bytes(encode_image(img, ".jpg", 90))
        release = Release(
            "IJBC", Path(tmp), [f"{i}.jpg" for i in range(ALIGN_IMAGES)], np.zeros(0),
            np.zeros(0), np.tile(_centred_landmarks(), (ALIGN_IMAGES, 1, 1)), np.zeros(0),
            np.zeros(0), np.zeros(0), np.zeros(0))
        with ThreadPoolExecutor(args.workers) as pool:
            t = time.perf_counter()
            ijb_features.load_crops(release, 0, ALIGN_IMAGES, pool)
            rate = ALIGN_IMAGES / (time.perf_counter() - t)
        lines.append(f"read + align {LOOSE_SIZE}x{LOOSE_SIZE} JPEGs, {args.workers} threads: "
                     f"{rate:,.0f} images/s")
    if args.embed_images:
        device = get_device(args.device)
        model = build_model(args.network).to(device).eval()
        crops = rng.integers(0, 255, (args.embed_images, 112, 112, 3), dtype=np.uint8)
        ijb_features.embed_raw(model, crops[:args.batch_size], args.batch_size, device)  # warm
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ijb_features.embed_raw(model, crops, args.batch_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = args.embed_images / (time.perf_counter() - t)
        lines.append(f"embed {args.network} image + mirror, fp32, batch {args.batch_size} on "
                     f"{device}: {rate:,.1f} images/s (IJB-C: {IMAGES / rate / 60:,.1f} min)")
    return lines


def _centred_landmarks() -> np.ndarray:
    """Landmarks of a face in the middle half of a loose crop."""
    return template_for_size(LOOSE_SIZE // 2) + np.float32(LOOSE_SIZE / 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=positive_float, default=0.1,
                        help="fraction of IJB-C's size (1 = the full release)")
    parser.add_argument("--mode", default=ijb_eval.DEFAULT_MODE)
    parser.add_argument("--embed-images", type=int_at_least(0), default=0,
                        help="also time the network's embedding on this many crops")
    parser.add_argument("--network", default="ir50")
    parser.add_argument("--device", type=device_name, default="auto")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--workers", type=positive_int, default=ijb_features.DEFAULT_WORKERS)
    parser.add_argument("--tmp", default=None, help="folder for the synthetic release")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp) / "IJBC"
        t = time.perf_counter()
        sizes = write_release(root, args.scale)
        print(f"synthetic IJB-C at scale {args.scale}: {sizes['images']:,} images x {DIM}, "
              f"{sizes['templates']:,} templates, {sizes['pairs']:,} pairs, galleries "
              f"{sizes['g1']:,} / {sizes['g2']:,}, {sizes['probes']:,} probes "
              f"(written in {time.perf_counter() - t:.0f} s)")
        array_bytes = sizes["images"] * DIM * 4
        base = start_peak()  # no /proc: no peak
        seconds, state = run_protocol(root, sizes, args.mode)
        peak = peak_above(base)
        baseline = time_baselines(root, sizes, state)
    print(f"\n{'stage':<28}{'ijb_eval':>10}{'InsightFace':>13}{'speed-up':>10}")
    for stage, s in seconds.items():
        if stage in baseline:
            b, note = baseline[stage]
            print(f"{stage:<28}{s:>9.2f}s{b:>12.1f}s{b / s:>9.0f}x   ({note})")
        else:
            print(f"{stage:<28}{s:>9.2f}s")
    if peak is not None:
        print(f"peak memory above the start: {peak / 2**30:.2f} GiB = {peak / array_bytes:.2f}x "
              f"the {sizes['images']:,} x {DIM} float32 feature array "
              f"({array_bytes / 2**30:.2f} GiB)")
    for line in time_embedding(args):
        print(line)
    print("\n" + state["table"])


if __name__ == "__main__":
    main()
