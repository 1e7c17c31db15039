"""ijb_eval.py: template pooling against a loop, TAR@FAR and the 1:N rates against brute force,
the release readers on malformed files, alignment by the release's landmarks, and the CLI end
to end on a tiny release in the official layout (synthetic identities, templates of several
media and video frames, both 1:N galleries)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ijb_eval
from evaluation import ijb_features, ijb_release
from faces.face_warp import warp_face
from synthetic.synthetic_faces import (
    EVAL_SPLIT,
    identity_seed,
    image_rng,
    make_identity,
    render_image,
)
from synthetic.synthetic_faces_assets import CANONICAL_LANDMARKS
from utils import ImageReadError, encode_image

ROOT = Path(__file__).resolve().parent.parent
EPS = 1e-9


# ----------------------------------------------------------------------------- references

def _loop_templates(feats, templates, medias, faceness, normalize):
    """InsightFace's per-template loop, written out in float64."""
    ids = sorted(set(templates.tolist()))
    out = []
    for t in ids:
        by_media = {}
        for i in np.flatnonzero(templates == t):
            f = feats[i].astype(np.float64)
            if normalize:
                f = f / np.linalg.norm(f)
            if faceness is not None:
                f = f * float(faceness[i])
            by_media.setdefault(int(medias[i]), []).append(f)
        total = sum(np.mean(v, axis=0) for v in by_media.values())
        out.append(total / np.linalg.norm(total))
    return np.array(ids), np.array(out)


def _brute_threshold(negatives, fraction):
    """The smallest t with at most floor(fraction x n) negatives strictly above it."""
    allowed = math.floor(fraction * len(negatives) + EPS)
    candidates = sorted(set(negatives.tolist()) | {-math.inf})
    return min(c for c in candidates if sum(1 for x in negatives if x > c) <= allowed)


def _brute_tar(scores, labels, far):
    t = _brute_threshold(scores[~labels], far)
    genuine = scores[labels]
    return sum(1 for g in genuine if g > t) / len(genuine)


def _brute_nearest(scores, labels, far):
    """ijb_11.py's table cell, written out: sklearn's roc_curve (its default
    drop_intermediate drops the points where both count sequences have zero second
    difference; then the origin is prepended), the curve flipped, and the TPR at
    min((|fpr - far|, index)): of equally near points the last one of the unflipped curve
    ("select largest tpr at same fpr")."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    fps, tps, f, t = [], [], 0, 0
    for j, i in enumerate(order):
        t, f = (t + 1, f) if labels[i] else (t, f + 1)
        if j + 1 == len(order) or scores[order[j + 1]] != scores[i]:
            fps.append(f)
            tps.append(t)
    if len(fps) > 2:
        keep = [0] + [i for i in range(1, len(fps) - 1)
                      if fps[i + 1] - 2 * fps[i] + fps[i - 1] != 0
                      or tps[i + 1] - 2 * tps[i] + tps[i - 1] != 0] + [len(fps) - 1]
        fps, tps = [fps[i] for i in keep], [tps[i] for i in keep]
    fpr = [x / fps[-1] for x in [0, *fps]][::-1]
    tpr = [x / tps[-1] for x in [0, *tps]][::-1]
    _, index = min(zip([abs(x - far) for x in fpr], range(len(fpr)), strict=True))
    return tpr[index]


def _brute_search(probes, probe_subjects, gallery, gallery_subjects, ranks, fpirs):
    ranks_of, best_mate, tops = [], [], []
    for p, subject in zip(probes, probe_subjects, strict=True):
        sims = [float(np.dot(p.astype(np.float64), g.astype(np.float64))) for g in gallery]
        mates = [j for j, s in enumerate(gallery_subjects) if s == subject]
        if mates:
            best = max(sims[j] for j in mates)
            ranks_of.append(1 + sum(1 for j, s in enumerate(sims) if j not in mates and s > best))
            best_mate.append(best)
        else:
            tops.append(max(sims))
    rank = {r: sum(1 for x in ranks_of if x <= r) / len(ranks_of) for r in ranks}
    tpir = {}
    for f in fpirs:
        t = _brute_threshold(np.array(tops), f)
        tpir[f] = sum(1 for r, b in zip(ranks_of, best_mate, strict=True)
                      if r == 1 and b > t) / len(ranks_of)
    return rank, tpir


# ----------------------------------------------------------------------------- pooling, scoring

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("use_faceness", [True, False])
def test_template_features_match_the_loop(normalize, use_faceness):
    rng = np.random.default_rng(3)
    n, d = 300, 16
    feats = (rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, (n, 1))).astype(np.float32)
    templates = rng.choice([7, 3, 11, 40, 2, 19], n)
    medias = rng.integers(0, 12, n)  # media ids shared across templates, as in the release
    faceness = rng.uniform(0.1, 1.0, n).astype(np.float32)
    ids, pooled = ijb_eval.template_features(feats, templates, medias,
                                             faceness if use_faceness else None, normalize)
    ref_ids, ref = _loop_templates(feats, templates, medias,
                                   faceness if use_faceness else None, normalize)
    assert ids.tolist() == ref_ids.tolist()
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, ref, atol=2e-6)


def test_mode_changes_the_pooling():
    """N1 keeps the raw magnitudes: one loud frame outweighs the rest only in N1."""
    feats = np.array([[10.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
    templates, medias = np.array([1, 1, 1]), np.array([1, 2, 3])
    _, n0 = ijb_eval.template_features(feats, templates, medias, normalize=True)
    _, n1 = ijb_eval.template_features(feats, templates, medias, normalize=False)
    np.testing.assert_allclose(n0[0], np.array([1.0, 2.0]) / math.sqrt(5), atol=1e-6)
    np.testing.assert_allclose(n1[0], np.array([10.0, 2.0]) / math.sqrt(104), atol=1e-6)
    assert ijb_eval.parse_mode("N0D1F0") == (False, True, False)
    with pytest.raises(ijb_eval.IJBFormatError, match="N1D2F1"):
        ijb_eval.parse_mode("N1D2F1")


def _insightface_template(raw, templates, medias, faceness, mode):
    """One template's feature as InsightFace's ijb_11.py computes it, in float64: F1 adds the
    mirror's raw embedding; ``use_norm_score`` (N1) keeps the raw norm, N0 normalises; D1
    multiplies by faceness; media means summed, then normalised."""
    use_norm, detector, flip = (mode[k] == "1" for k in (1, 3, 5))
    feats = raw[:, 0] + raw[:, 1] if flip else raw[:, 0]
    feats = feats.astype(np.float64)
    if not use_norm:
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    if detector:
        feats = feats * faceness[:, None]
    medias_of = sorted(set(medias.tolist()))
    total = sum(feats[medias == m].mean(axis=0) for m in medias_of)
    return total / np.linalg.norm(total)


@pytest.mark.parametrize("mode", ["N1D1F1", "N0D1F1", "N1D0F0", "N0D0F0"])
def test_mode_letters_follow_insightface(mode):
    """N1 is InsightFace's use_norm_score: the raw norm stays as each image's weight (N0
    normalises). It was inverted: the headline N1D1F1 was InsightFace's N0D1F1."""
    raw = np.array([[[3.0, 0.0], [1.0, 0.0]], [[0.0, 0.5], [0.0, 0.5]],
                    [[0.0, 2.0], [1.0, 1.0]]], np.float32)  # norms differ: N matters
    release = SimpleNamespace(templates=np.array([4, 4, 4]), medias=np.array([1, 2, 2]),
                              faceness=np.array([0.5, 1.0, 0.8], np.float32))
    flip = ijb_eval.parse_mode(mode)[2]
    feats = raw[:, 0] + raw[:, 1] if flip else raw[:, 0]
    ids, pooled = ijb_eval.release_templates(feats, release, mode)
    ref = _insightface_template(raw, release.templates, release.medias, release.faceness, mode)
    assert ids.tolist() == [4]
    np.testing.assert_allclose(pooled[0], ref, atol=1e-6)


@pytest.mark.parametrize("block_entries", [None, 40])
def test_verification_scores_against_dot_products(monkeypatch, block_entries):
    if block_entries:  # force the blocked Gram path
        monkeypatch.setattr(ijb_eval, "SCORE_BLOCK_ENTRIES", block_entries)
    rng = np.random.default_rng(5)
    ids = np.array([2, 5, 9, 14, 20, 33, 41, 57])
    feats = rng.normal(size=(ids.size, 12))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    t1, t2 = rng.choice(ids, 500), rng.choice(ids, 500)
    scores = ijb_eval.verification_scores(ids, feats, t1, t2)
    row = {t: i for i, t in enumerate(ids)}
    ref = [float(np.dot(feats[row[a]].astype(np.float64), feats[row[b]].astype(np.float64)))
           for a, b in zip(t1, t2, strict=True)]
    np.testing.assert_allclose(scores, ref, atol=1e-6)
    with pytest.raises(ValueError, match="no feature"):
        ijb_eval.verification_scores(ids, feats, [2, 3], [5, 9])


# ----------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_against_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(400) < 0.2
    decimals = 1 if seed == 2 else 2  # seed 2: heavy ties between genuine and impostors
    scores = np.round(np.where(labels, rng.normal(0.3, 0.2, 400), rng.normal(0.0, 0.2, 400)),
                      decimals)
    fars = (1e-3, 1 / 317, 1e-2, 0.05, 0.1, 1.0)  # 1/317: floor right at an integer
    got = ijb_eval.tar_at_far(scores, labels, fars)
    for far in fars:
        assert got[far] == pytest.approx(_brute_tar(scores, labels, far), abs=1e-12), far
    nearest = ijb_eval.tar_at_far_nearest(scores, labels, fars + (1e-9, 0.5, 0.33))
    for far, tar in nearest.items():
        assert tar == _brute_nearest(scores, labels, far), far
    report, (grid, curve) = ijb_eval.verification_report(scores, labels, fars)
    assert curve[-1] == 1.0 and np.all(np.diff(curve) >= 0) and grid[0] > 0
    for k in range(0, grid.size, 37):  # the figure's curve is TAR@FAR at its grid
        assert curve[k] == pytest.approx(_brute_tar(scores, labels, grid[k]), abs=1e-12)
    for far in fars[:-1]:
        key = f"{far:.0e}"
        n_imp = int((~labels).sum())
        if far * n_imp >= 1:
            assert report["tar_at_far"][key] == pytest.approx(_brute_tar(scores, labels, far),
                                                              abs=1e-12), far
            assert report["tar_at_far_nearest"][key] == _brute_nearest(scores, labels, far)
        else:  # fewer than 1/FAR impostors: not measurable, reported as null
            assert report["tar_at_far"][key] is None
            assert report["tar_at_far_nearest"][key] is None
    assert report["num_genuine"] == labels.sum()
    # AUC: the probability that a genuine pair outscores an impostor, ties counted half
    gen, imp = scores[labels], scores[~labels]
    auc = np.mean((gen[:, None] > imp[None]) + 0.5 * (gen[:, None] == imp[None]))
    assert report["auc"] == pytest.approx(auc, abs=1e-12)


def test_nearest_far_reads_insightfaces_table():
    """ijb_11.py flips sklearn's ROC so that of equally near points the last wins ("select
    largest tpr at same fpr"), and sklearn drops collinear points; the first point was read.
    Here FPR 1/4 and 3/4 are equally near 0.5 (tied impostors skip 2/4): InsightFace reads
    the last point at FPR 3/4 (TPR 1), not the first at 1/4 (TPR 1/3)."""
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.95, 0.7, 0.3])
    labels = np.array([False] * 4 + [True] * 3)
    assert _brute_nearest(scores, labels, 0.5) == 1.0
    assert ijb_eval.tar_at_far_nearest(scores, labels, [0.5])[0.5] == 1.0
    # the nearest FPR's highest TPR: 0.25 is FPR 1/4 reached at 0.9, left at 0.5 (TPR 2/3)
    assert ijb_eval.tar_at_far_nearest(scores, labels, [0.25])[0.25] == pytest.approx(2 / 3)
    # impostors 0.8 > 0.6 > 0.4 with no genuine between: sklearn drops FPR 2/4 (collinear),
    # so 0.55 is nearest FPR 3/4 (TPR 2/3 after 0.45), not 2/4 (TPR 1/3)
    scores = np.array([0.8, 0.6, 0.4, 0.1, 0.9, 0.45, 0.2])
    assert _brute_nearest(scores, labels, 0.55) == pytest.approx(2 / 3)
    assert ijb_eval.tar_at_far_nearest(scores, labels, [0.55])[0.55] == pytest.approx(2 / 3)


def test_nearest_far_across_a_long_run_of_dropped_points():
    """1,000 distinct impostors with no genuine between them: sklearn keeps only the ends of
    the run, so the search must reach past a first window holding no point at all."""
    impostor = np.linspace(0.5, 0.1, 1000)
    scores = np.r_[0.9, 0.05, 0.7, impostor, -0.2]
    labels = np.r_[True, True, True, np.zeros(1000, bool), False]
    for far in (0.3, 0.5, 0.6, 0.9):
        assert ijb_eval.tar_at_far_nearest(scores, labels, [far])[far] == \
            _brute_nearest(scores, labels, far), far


@pytest.mark.parametrize("seed", range(6))
def test_nearest_far_against_insightfaces_reading_random(seed):
    """Distinct and heavily tied scores, runs of impostors (sklearn drops their inner points),
    FARs between and on the curve's points."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 120))
    labels = rng.random(n) < rng.uniform(0.1, 0.6)
    labels[:2] = [True, False]
    scores = np.where(labels, rng.normal(0.4, 0.3, n), rng.normal(0.0, 0.3, n))
    scores = np.round(scores, int(rng.integers(1, 4)))
    n_imp = int((~labels).sum())
    fars = [k / n_imp for k in range(n_imp + 1)] + [(k + 0.5) / n_imp for k in range(n_imp)]
    fars += [1e-6, 0.013, 0.3, 0.77, 0.999]
    got = ijb_eval.tar_at_far_nearest(scores, labels, fars)
    for far in fars:
        assert got[far] == _brute_nearest(scores, labels, far), far


def test_unmeasured_tar_reads_the_same_in_json_and_table():
    """40 impostor pairs back FAR 1e-1 (4 false accepts) and nothing finer."""
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(25, bool), np.zeros(40, bool)]
    scores = np.where(labels, rng.normal(0.5, 0.2, 65), rng.normal(0.0, 0.2, 65))
    v, _ = ijb_eval.verification_report(scores, labels)
    want = {"1e-06": 1_000_000, "1e-05": 100_000, "1e-04": 10_000, "1e-03": 1_000,
            "1e-02": 100}
    assert v["not_measured"] == {k: f"n/a (needs >= {n:,} impostor pairs)"
                                 for k, n in want.items()}
    assert all(v["tar_at_far"][k] is None for k in want) and v["tar_at_far"]["1e-01"] > 0
    table = ijb_eval.format_table("IJBC", [{"mode": "N1D1F1", "images": 9, "templates": 9,
                                            "verification": v}]).splitlines()
    row = table[3].split()
    assert row[0] == "N1D1F1" and row[1:6] == ["n/a"] * 5
    assert row[6] == f"{100 * v['tar_at_far']['1e-01']:.2f}"
    assert table[-5:] == [f"  FAR {k}: n/a (needs >= {n:,} impostor pairs)"
                          for k, n in want.items()]


def _exact_features(rng, n, d):
    """Small integers times 2^-3: float32 dot products are exact, so ties are exact too."""
    return (rng.integers(-2, 3, (n, d)) / 8.0).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_identification_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    gallery_subjects = np.array([1, 2, 3, 4, 5, 6, 3, 8])  # subject 3 enrolled twice
    probe_subjects = rng.choice([1, 2, 3, 4, 5, 6, 8, 90, 91, 92], 60)  # 9x: non-mated
    gallery = _exact_features(rng, gallery_subjects.size, 4)
    probes = _exact_features(rng, probe_subjects.size, 4)
    ranks, fpirs = (1, 2, 5), (0.01, 0.1, 0.25, 0.5)
    got = ijb_eval.identification(probes, probe_subjects, gallery, gallery_subjects, ranks, fpirs)
    rank, tpir = _brute_search(probes, probe_subjects, gallery, gallery_subjects, ranks, fpirs)
    assert got["rank"] == pytest.approx(rank, abs=1e-12)
    assert got["tpir"] == pytest.approx(tpir, abs=1e-12)
    assert got["num_mated"] + got["num_nonmated"] == probe_subjects.size
    all_ranks = range(1, gallery_subjects.size + 1)  # the CMC: every rank of the gallery
    cmc, _ = _brute_search(probes, probe_subjects, gallery, gallery_subjects, all_ranks, ())
    assert got["cmc"] == pytest.approx([cmc[r] for r in all_ranks], abs=1e-12)
    assert got["cmc"][-1] == 1.0


def test_identification_without_nonmated_probes_gives_ranks_only():
    rng = np.random.default_rng(9)
    gallery = _exact_features(rng, 4, 6)
    got = ijb_eval.identification(gallery, np.arange(4), gallery[::-1], np.arange(4)[::-1])
    assert got["rank"][1] == 1.0 and got["tpir"] == {}
    ranks_only = ijb_eval.identification(gallery, [0, 1, 7, 8], gallery, np.arange(4), fpirs=())
    assert ranks_only["num_nonmated"] == 2 and ranks_only["tpir"] == {}


# ----------------------------------------------------------------------------- tiny release

SUBJECTS = 6  # enrolled: three in each gallery
UNENROLLED = 2  # subjects with probes only: non-mated in both galleries
IMAGES = SUBJECTS * 8 + UNENROLLED * 2
TEMPLATES = SUBJECTS * 3 + UNENROLLED * 2
NONMATED = SUBJECTS // 2 * 2 + UNENROLLED * 2  # per gallery: 10, so FPIR 0.1 is measurable
GALLERIES = {"G1": (0, 1, 2), "G2": (3, 4, 5)}
LOOSE_SIZE = 160  # side of a loose crop (the face drawn smaller, turned and shifted)
FIRST_SUBJECT_ID = 1000


def _loose_crop(image, rng):
    """The render placed in a loose crop by a known similarity; its landmarks follow."""
    angle = math.radians(rng.uniform(-20, 20))
    scale = rng.uniform(0.55, 0.75)
    shift = rng.uniform(-8, 8, 2) + LOOSE_SIZE / 2
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    matrix = np.array([[c, -s, 0.0], [s, c, 0.0]])
    matrix[:, 2] = shift - matrix[:, :2] @ np.array([125.0, 125.0])
    import cv2

    crop = cv2.warpAffine(image, matrix, (LOOSE_SIZE, LOOSE_SIZE), flags=cv2.INTER_LINEAR)
    landmarks = CANONICAL_LANDMARKS @ matrix[:, :2].T + matrix[:, 2]
    return crop, landmarks.astype(np.float32)


def write_release(root: Path, prefix: str = "ijbc", galleries=("G1", "G2")) -> dict:
    """A tiny release in the official layout. Per subject: an enrolled template (a still and a
    two-frame video) and two probe templates (a three-frame video plus a still; a still whose
    media is the enrolled still's); unenrolled subjects have two one-still probe templates.
    Returns what was written."""
    meta, crops = root / "meta", root / "loose_crop"
    meta.mkdir(parents=True)
    crops.mkdir()
    rows, renders = [], {}
    media = iter(range(500, 10_000))
    for s in range(SUBJECTS + UNENROLLED):
        identity = make_identity(identity_seed(7, EVAL_SPLIT, s))
        enrolled, still = 100 + s, next(media)
        plan = [(enrolled, still, 1), (enrolled, next(media), 2),
                (200 + 2 * s, next(media), 3), (200 + 2 * s, next(media), 1),
                (201 + 2 * s, still, 1)]
        if s >= SUBJECTS:
            plan = [(200 + 2 * s, still, 1), (201 + 2 * s, next(media), 1)]
        k = 0
        for template, media_id, frames in plan:
            for _ in range(frames):
                k += 1
                name = f"{len(rows) + 1}.jpg"
                image = render_image(identity, image_rng(identity.seed, k))
                crop, lmk = _loose_crop(image, np.random.default_rng([s, k]))
                (crops / name).write_bytes(encode_image(crop, ".jpg", 95))
                renders[name] = image
                rows.append((name, template, media_id, s, lmk, 0.5 + 0.5 * ((k * 7) % 5) / 4))
    (meta / f"{prefix}_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m, *_ in rows))
    (meta / f"{prefix}_name_5pts_score.txt").write_text("".join(
        f"{n} " + " ".join(f"{v:.3f}" for v in lmk.reshape(-1)) + f" {score}\n"
        for n, _, _, _, lmk, score in rows))
    subject_of = {t: s for _, t, _, s, *_ in rows}
    enrolled = sorted(t for t in subject_of if t < 200)
    probes = sorted(t for t in subject_of if t >= 200)
    (meta / f"{prefix}_template_pair_label.txt").write_text("".join(
        f"{a} {b} {int(subject_of[a] == subject_of[b])}\n" for a in enrolled for b in probes))

    def write_csv(name, templates):
        lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"]
        lines += [f"{t},{FIRST_SUBJECT_ID + s},img/{n},{i}" for i, (n, t, _, s, *_) in
                  enumerate(rows) if t in templates]
        (meta / f"{prefix}_1N_{name}.csv").write_text("\n".join(lines) + "\n")

    write_csv("probe_mixed", set(probes))
    for g, subjects in zip(galleries, GALLERIES.values(), strict=True):
        write_csv(f"gallery_{g}", {t for t in enrolled if subject_of[t] in subjects})
    return {"rows": rows, "renders": renders, "subject_of": subject_of}


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("IJB_release") / "IJBC"
    written = write_release(root)
    return root, written


def test_load_release_reads_the_layout(release_dir):
    root, written = release_dir
    r = ijb_release.load_release(root, "IJBC")
    assert r.names == [row[0] for row in written["rows"]]
    assert set(r.search) == {"probe", "G1", "G2"}
    ids, subjects = r.search["G2"]
    assert ids.tolist() == [103, 104, 105] and subjects.tolist() == [1003, 1004, 1005]
    assert r.pairs_label.sum() == 2 * SUBJECTS
    assert r.pairs_label.size == SUBJECTS * 2 * (SUBJECTS + UNENROLLED)
    np.testing.assert_allclose(r.landmarks[0], written["rows"][0][4], atol=1e-3)


def test_alignment_uses_each_crops_own_landmarks(release_dir):
    """The loose crop aligned by its listed landmarks is the render aligned by the canonical
    ones; landmarks read in the wrong order (all x, then all y) would not be."""
    root, written = release_dir
    r = ijb_release.load_release(root, "IJBC", with_search=False)
    for i in (0, 9, 20):
        name = r.names[i]
        got = ijb_features.aligned_crop(r.crop_dir / name, r.landmarks[i]).astype(float)
        ref = warp_face(written["renders"][name], CANONICAL_LANDMARKS).astype(float)
        wrong = r.landmarks[i].reshape(-1).reshape(2, 5).T  # x1..x5 / y1..y5 misread
        misread = ijb_features.aligned_crop(r.crop_dir / name, wrong).astype(float)
        error = np.abs(got - ref)[20:100, 20:100].mean()  # the face, not the black border
        assert error < 12, error
        assert np.abs(misread - ref)[20:100, 20:100].mean() > 2 * error


# ----------------------------------------------------------------------------- malformed files

def _copy_release(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _line(lineno, fn):
    """An edit of one line (1-based) of a text."""
    def edit(text):
        lines = text.splitlines()
        lines[lineno - 1] = fn(lines[lineno - 1])
        return "\n".join(lines) + "\n"
    return edit


MALFORMED = [  # (file, edit, the error it must give)
    ("template_pair_label.txt", lambda t: t.replace("\n", "\n\n", 1).replace(
        "100 202 0\n", "100 202 x\n"), r"pair_label\.txt:4: label 'x' is not an integer"),
    ("template_pair_label.txt", lambda t: t + "100 200\n", r"pair_label\.txt:97: expected"),
    ("template_pair_label.txt", _line(3, lambda s: s + " 5"), r"pair_label\.txt:3: expected"),
    ("template_pair_label.txt", _line(3, lambda s: "100 202 2"),
     r"pair_label\.txt:3: label must be 0 or 1"),
    ("template_pair_label.txt", _line(3, lambda s: "100 999 0"),
     r"pair_label\.txt:3: template 999 is not in face_tid_mid"),
    ("face_tid_mid.txt", _line(3, lambda s: "3.jpg 100"), r"face_tid_mid\.txt:3: expected"),
    ("face_tid_mid.txt", _line(2, lambda s: "2.jpg 1o0 501"),
     r"face_tid_mid\.txt:2: template id '1o0'"),
    ("name_5pts_score.txt", _line(5, lambda s: s.replace(" ", " x", 1)),
     r"5pts_score\.txt:5: landmark coordinate 'x[\d.]+' is not a number"),
    ("name_5pts_score.txt", _line(4, lambda s: s.rsplit(" ", 1)[0] + " inf"),
     r"5pts_score\.txt:4: a landmark or score is not finite"),
    ("name_5pts_score.txt", _line(2, lambda s: s.rsplit(" ", 1)[0]),
     r"5pts_score\.txt:2: expected .* got 11"),
    ("name_5pts_score.txt", lambda t: "\n".join(t.splitlines()[:-1]) + "\n",
     r"5pts_score\.txt: does not match .*no landmarks for 52\.jpg"),
    ("name_5pts_score.txt", _line(6, lambda s: s.split()[0] + " 40.5 52" * 5 + " 0.9"),
     r"5pts_score\.txt:6: the five landmarks are one point \(40\.5, 52\): no face"),
    ("name_5pts_score.txt", _line(7, lambda s: s.rsplit(" ", 1)[0] + " -0.25"),
     r"5pts_score\.txt:7: faceness score -0\.25 is negative"),
    ("1N_gallery_G1.csv", _line(3, lambda s: s.replace("100,1000", "100,1001")),
     r"gallery_G1\.csv:3: template 100 has subject 1001 here but 1000 above"),
    ("1N_gallery_G2.csv", _line(4, lambda s: "103"), r"gallery_G2\.csv:4: expected"),
    ("1N_probe_mixed.csv", _line(2, lambda s: s.replace("200,", "777,", 1)),
     r"probe_mixed\.csv:2: template 777 is not in face_tid_mid"),
]


@pytest.mark.parametrize("file,edit,message", MALFORMED)
def test_malformed_files_name_file_and_line(release_dir, tmp_path, file, edit, message):
    root = _copy_release(release_dir[0], tmp_path / "IJBC")
    path = root / "meta" / f"ijbc_{file}"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ijb_release.IJBFormatError, match=message):
        ijb_release.load_release(root, "IJBC")


@pytest.mark.parametrize("file", ["face_tid_mid.txt", "name_5pts_score.txt",
                                  "template_pair_label.txt", "1N_gallery_G1.csv"])
def test_meta_file_that_is_not_utf8_is_one_error(release_dir, tmp_path, file):
    """A byte that is not UTF-8 (a Latin-1 name, a UTF-16 or binary file) ended in a
    UnicodeDecodeError traceback instead of an error naming the file."""
    root = _copy_release(release_dir[0], tmp_path / "IJBC")
    path = root / "meta" / f"ijbc_{file}"
    data = path.read_bytes()
    path.write_bytes(data[:30] + b"\xe9" + data[30:])
    with pytest.raises(ijb_release.IJBFormatError,
                       match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 0xe9\)"):
        ijb_release.load_release(root, "IJBC")


def test_zero_faceness_is_accepted_and_named(release_dir, tmp_path, caplog):
    root = _copy_release(release_dir[0], tmp_path / "IJBC")
    path = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    rows = release_dir[1]["rows"]
    last_template = rows[-1][1]  # an unenrolled subject's one-still probe template
    assert [row[1] for row in rows].count(last_template) == 1
    zeroed = [0, 5, len(rows) - 1]  # 1.jpg and 6.jpg share their templates with other images
    for k in zeroed:
        lines[k] = lines[k].rsplit(" ", 1)[0] + " 0"
    path.write_text("\n".join(lines) + "\n")
    ijb_release.log.addHandler(caplog.handler)  # the module's logger does not propagate
    try:
        r = ijb_release.load_release(root, "IJBC")
    finally:
        ijb_release.log.removeHandler(caplog.handler)
    assert r.zero_faceness == [rows[k][0] for k in zeroed] == ["1.jpg", "6.jpg", "52.jpg"]
    assert (r.faceness == 0).sum() == 3
    assert f"{path}: 3 images have faceness 0" in caplog.text
    assert "(1.jpg, 6.jpg, 52.jpg)" in caplog.text
    assert f"1 template(s) have no other image ({last_template})" in caplog.text


# ----------------------------------------------------------------------------- the CLI

EMBEDDING = 32
CHUNK = 20  # images per cache chunk in these tests: the 48 images make three chunks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from models import build_model

    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_model("ir_narrow", embedding_size=EMBEDDING)
    torch.save(model.state_dict(), folder / "backbone.pt")
    (folder / "config.json").write_text(json.dumps({"network": "ir_narrow",
                                                    "embedding_size": EMBEDDING}))
    return folder / "backbone.pt"


@pytest.fixture
def embed_calls(monkeypatch):
    monkeypatch.setattr(ijb_features, "CHUNK_IMAGES", CHUNK)
    calls = []
    real = ijb_features.embed_raw

    def counting(model, crops, batch_size, device):
        calls.append(len(crops))
        return real(model, crops, batch_size, device)

    monkeypatch.setattr(ijb_features, "embed_raw", counting)
    return calls


def _cli(release_root, checkpoint, out, *extra):
    return ijb_eval.main(["--checkpoint", str(checkpoint), "--ijb-dir", str(release_root),
                          "--out", str(out), "--device", "cpu", "--batch-size", "16",
                          "--workers", "2", *extra])


def _reference(raw, written, release, mode):
    """The protocol for one mode from the cached raw features, written out independently."""
    use_norm, detector, flip = (c == "1" for c in mode[1::2])  # N1: InsightFace's norm score
    feats = raw[:, 0] + raw[:, 1] if flip else raw[:, 0]
    ids, pooled = _loop_templates(feats, release.templates, release.medias,
                                  release.faceness if detector else None, not use_norm)
    row = {t: i for i, t in enumerate(ids.tolist())}
    scores = np.array([pooled[row[a]] @ pooled[row[b]] for a, b in
                       zip(release.pairs_t1, release.pairs_t2, strict=True)])
    labels = release.pairs_label
    n_imp = int((~labels).sum())
    tar = {f"{f:.0e}": (_brute_tar(scores, labels, f) if f * n_imp >= 1 else None)
           for f in ijb_eval.VERIFICATION_FARS}
    search = {}
    probe_ids, probe_subjects = release.search["probe"]
    probes = pooled[[row[t] for t in probe_ids]]
    for g in ("G1", "G2", "merged"):
        names = ("G1", "G2") if g == "merged" else (g,)
        g_ids = np.concatenate([release.search[n][0] for n in names])
        g_subjects = np.concatenate([release.search[n][1] for n in names])
        search[g] = _brute_search(probes, probe_subjects, pooled[[row[t] for t in g_ids]],
                                  g_subjects, (1, 5, 10), (0.01, 0.1))
    return tar, search


def test_zero_faceness_count_is_in_the_results(release_dir, checkpoint, tmp_path, capsys):
    """The faceness-0 images were only logged: the results JSON did not say the D1 modes ran
    without them."""
    root = _copy_release(release_dir[0], tmp_path / "IJBC")
    path = root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    for k in (2, 7):
        lines[k] = lines[k].rsplit(" ", 1)[0] + " 0"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert _cli(root, checkpoint, out) == 0
    rows = release_dir[1]["rows"]
    results = json.loads((out / "ijbc_results.json").read_text())
    assert results["zero_faceness"] == {"images": 2, "first": [rows[2][0], rows[7][0]]}


def test_cli_end_to_end_against_the_reference(release_dir, checkpoint, tmp_path, embed_calls,
                                              monkeypatch, capsys):
    root, written = release_dir
    out = tmp_path / "out"
    assert _cli(root, checkpoint, out, "--modes", "N1D1F1", "N0D0F0") == 0
    printed = capsys.readouterr().out
    assert embed_calls == [CHUNK, CHUNK, IMAGES - 2 * CHUNK]
    results = json.loads((out / "ijbc_results.json").read_text())
    assert results["target"] == "IJBC" and results["images"] == IMAGES
    assert results["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert results["templates"] == TEMPLATES and results["mode"] == "N1D1F1"
    assert "use_norm_score" in results["mode_letters"]  # which N convention the file uses
    assert results["zero_faceness"] == {"images": 0, "first": []}
    assert set(results["modes"]) == {"N1D1F1", "N0D0F0"}
    assert (out / "ijbc_roc.png").stat().st_size > 0 and (out / "ijbc_cmc.png").is_file()
    assert "N1D1F1" in printed and "G2" in printed and "merged*" in printed
    for g in ("G1", "G2"):  # NONMATED (10) non-mated probes: FPIR 0.01 is n/a, and says why
        assert results["identification"][g]["not_measured"] == {
            "0.01": "n/a (needs >= 100 non-mated probes)"}
        assert results["identification"][g]["threshold_at_fpir"]["0.01"] is None  # as its TPIR
        assert f"  {g} FPIR 0.01: n/a (needs >= 100 non-mated probes)\n" in printed

    # The cache: each image's raw embedding and its mirror's, from its aligned crop.
    chunks = sorted((out / "features").glob("*/chunk_*.npy"))
    assert len(chunks) == 3
    raw = np.concatenate([np.load(c) for c in chunks])
    assert raw.shape == (IMAGES, 2, EMBEDDING)
    release = ijb_release.load_release(root, "IJBC")
    from models import load_backbone

    model = load_backbone(checkpoint)
    for i in (0, 23, IMAGES - 1):
        crop = ijb_features.aligned_crop(release.crop_dir / release.names[i],
                                         release.landmarks[i])
        x = (torch.from_numpy(crop).permute(2, 0, 1).float()[None] - 127.5) / 127.5
        with torch.no_grad():
            ref = torch.cat([model(x), model(x.flip(3))]).numpy()
        np.testing.assert_allclose(raw[i], ref, atol=1e-4)

    for mode in ("N1D1F1", "N0D0F0"):
        tar, search = _reference(raw, written, release, mode)
        got = results["modes"][mode]
        for key, value in tar.items():
            if value is None:
                assert got["verification"]["tar_at_far"][key] is None, key
            else:
                assert got["verification"]["tar_at_far"][key] == pytest.approx(value), key
        for g, (rank, tpir) in search.items():
            block = got["identification"][g]
            assert block["rank"] == pytest.approx({str(k): v for k, v in rank.items()}), g
            if g != "merged":  # 10 non-mated probes: FPIR 0.01 is not measurable
                assert block["num_nonmated"] == NONMATED
                assert block["tpir_at_fpir"] == pytest.approx({"0.01": None, "0.1": tpir[0.1]})
        mean = got["identification"]["mean"]["rank"]["1"]
        assert mean == pytest.approx((search["G1"][0][1] + search["G2"][0][1]) / 2)

    # A killed run resumes at the missing chunk (a damaged one is made again; a killed
    # writer's temporary is removed); a complete cache needs no model at all.
    chunks[1].unlink()
    chunks[2].write_bytes(chunks[2].read_bytes()[:200])
    stale = chunks[1].parent / f".{chunks[1].name}.x1y2.tmp"
    stale.write_bytes(b"half")
    embed_calls.clear()
    assert _cli(root, checkpoint, out, "--modes", "N1D1F1", "N0D0F0") == 0
    assert embed_calls == [CHUNK, IMAGES - 2 * CHUNK] and not stale.exists()
    again = json.loads((out / "ijbc_results.json").read_text())
    assert again["modes"] == results["modes"]
    import models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every feature is cached")

    monkeypatch.setattr(models, "load_backbone", no_model)
    assert _cli(root, checkpoint, out, "--modes", "all") == 0
    assert len(json.loads((out / "ijbc_results.json").read_text())["modes"]) == 8


def test_unreadable_crops_are_all_named_after_the_other_chunks_are_cached(
        release_dir, checkpoint, embed_calls, tmp_path):
    root = _copy_release(release_dir[0], tmp_path / "IJBC")
    out = tmp_path / "out"
    broken = [root / "loose_crop" / "5.jpg", root / "loose_crop" / "45.jpg"]  # chunks 0, 2
    good = [p.read_bytes() for p in broken]
    for p in broken:
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ImageReadError) as info:
        _cli(root, checkpoint, out)
    message = str(info.value)
    assert message.startswith(f"{root / 'loose_crop'}: 2 loose crops cannot be read")
    assert str(broken[0]) in message and str(broken[1]) in message
    assert embed_calls == [CHUNK]  # chunk 1 (images 21-40) is embedded and cached
    assert [c.name for c in (out / "features").glob("*/chunk_*.npy")] == ["chunk_000001.npy"]
    assert not (out / "ijbc_results.json").exists()
    for p, data in zip(broken, good, strict=True):
        p.write_bytes(data)
    embed_calls.clear()
    assert _cli(root, checkpoint, out) == 0
    assert embed_calls == [CHUNK, IMAGES - 2 * CHUNK]  # only the chunks left undone


def test_cli_ijbb_names_and_verification_only(tmp_path, checkpoint, embed_calls, capsys):
    root = tmp_path / "IJBB"
    write_release(root, prefix="ijbb", galleries=("S1", "S2"))
    out = tmp_path / "out"
    assert _cli(root, checkpoint, out) == 0  # the target from the folder name
    results = json.loads((out / "ijbb_results.json").read_text())
    assert results["target"] == "IJBB"
    assert set(results["identification"]) == {"S1", "S2", "mean", "merged"}
    (root / "meta" / "ijbb_1N_gallery_S2.csv").unlink()  # 1:1 only without all 1:N files
    assert _cli(root, checkpoint, out) == 0
    results = json.loads((out / "ijbb_results.json").read_text())
    assert "identification" not in results and results["verification"]["num_genuine"] == 12



@pytest.mark.slow  # subprocesses of the CLI
def test_cli_errors_are_one_line(release_dir, checkpoint, tmp_path):
    root = _copy_release(release_dir[0], tmp_path / "IJBC")
    pairs = root / "meta" / "ijbc_template_pair_label.txt"
    pairs.write_text(_line(5, lambda s: "100 204")(pairs.read_text()))
    proc = subprocess.run([sys.executable, str(ROOT / "ijb_eval.py"), "--checkpoint",
                           str(checkpoint), "--ijb-dir", str(root), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: {pairs}:5: expected 'template1 template2 label', got '100 204'"]
    assert not (tmp_path / "out" / "ijbc_results.json").exists()
    # weights that do not fit the network: one line too, before any output
    proc = subprocess.run([sys.executable, str(ROOT / "ijb_eval.py"), "--checkpoint",
                           str(checkpoint), "--ijb-dir", str(release_dir[0]), "--network",
                           "mobilefacenet", "--out", str(tmp_path / "out2")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {checkpoint}: weights do not match network")


def test_non_finite_embeddings_are_refused_naming_the_image_and_never_cached(
        release_dir, checkpoint, tmp_path, monkeypatch):
    """A model that overflows on one image (finite weights, an inf embedding): the image is
    named and counted, its chunk is not cached, and nothing is scored. It used to be cached
    and pooled into templates scored NaN."""
    from utils import ToolkitError

    root, _ = release_dir
    monkeypatch.setattr(ijb_features, "CHUNK_IMAGES", CHUNK)
    real = ijb_features.embed_raw
    calls = []

    def overflowing(model, crops, batch_size, device):
        out = real(model, crops, batch_size, device)
        calls.append(len(crops))
        if len(calls) == 2:  # the second chunk: images CHUNK .. 2 * CHUNK - 1
            out[3, 1, 0] = np.inf  # the mirror of image CHUNK + 3
            out[5, 0, :] = np.nan
        return out

    monkeypatch.setattr(ijb_features, "embed_raw", overflowing)
    out = tmp_path / "out"
    with pytest.raises(ToolkitError) as err:
        _cli(root, checkpoint, out, "--cache-dir", str(tmp_path / "cache"))
    message = str(err.value)
    first = root / "loose_crop" / f"{CHUNK + 4}.jpg"  # names are 1-based row numbers
    assert message.startswith(f"{first}: the model gives a non-finite (NaN/inf) embedding "
                              f"(2 of {CHUNK} images of this chunk)"), message
    assert "\n" not in message
    chunks = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(chunks) == 1  # the first chunk only
    assert np.isfinite(np.load(chunks[0])).all()
    assert not (out / "ijbc_results.json").exists()


def test_non_finite_features_in_an_old_cache_are_refused(tmp_path):
    """A cache made before non-finite embeddings were refused (same key: the checkpoint's
    content) was read without a check and its NaN pooled into NaN scores (TAR 0)."""
    paths = []
    for i in range(2):
        chunk = np.ones((3, 2, 4), np.float32)
        if i == 1:
            chunk[2, 0, 1] = np.nan  # image 3 + 3 = 6 of the release
        paths.append(tmp_path / f"chunk_{i:06d}.npy")
        np.save(paths[-1], chunk)
    for flip in (True, False):
        with pytest.raises(ijb_features.NonFiniteEmbeddingError,
                           match=rf"^{paths[1]}: image 6 .*non-finite.*delete"):
            ijb_features.mode_features(paths, flip, 6)
    np.save(paths[1], np.ones((3, 2, 4), np.float32))
    assert ijb_features.mode_features(paths, True, 6).tolist() == [[2.0] * 4] * 6


def test_feature_cache_key_follows_the_checkpoint_content(release_dir, tmp_path):
    """The cache was keyed by the checkpoint's path, size and mtime: another model of the
    same network written over it with the old time stamp (cp -p, rsync -t) reused the old
    model's features."""
    from models import build_model

    release = ijb_release.load_release(release_dir[0], "IJBC")
    ckpt = tmp_path / "backbone.pt"
    keys = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        stamp = ckpt.stat() if ckpt.exists() else None
        torch.save(build_model("ir_narrow", embedding_size=EMBEDDING).state_dict(), ckpt)
        if stamp is not None:  # the same size; the old time stamp put back
            os.utime(ckpt, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
            assert ckpt.stat().st_size == stamp.st_size
        keys.append(ijb_features.cache_key(release, ckpt, None, None))
    assert keys[0] != keys[1]
    # the same content elsewhere is the same model: its cache is shared
    copy = tmp_path / "copy" / "backbone.pt"
    copy.parent.mkdir()
    copy.write_bytes(ckpt.read_bytes())
    assert ijb_features.cache_key(release, copy, None, None) == keys[1]


def test_stale_caches_of_a_replaced_checkpoint_are_deleted_and_only_those(release_dir,
                                                                         tmp_path, caplog):
    """The cache key is the checkpoint's content: after a retrain over the same path, the old
    key's 1.9 GB (IJB-C) stayed on disk forever, never to be read again."""

    release = ijb_release.load_release(release_dir[0], "IJBC", with_search=False)
    root = tmp_path / "features"
    ckpt, other = tmp_path / "run" / "backbone.pt", tmp_path / "run2" / "backbone.pt"
    for path, content in ((ckpt, b"first weights"), (other, b"other model")):
        path.parent.mkdir()
        path.write_bytes(content)

    def fill(checkpoint: Path) -> Path:
        folder = root / ijb_features.cache_key(release, checkpoint, None, None)
        ijb_features.cached_features(
            release, folder, lambda crops: np.zeros((len(crops), 2, 4), np.float32),
            workers=1, progress=False, checkpoint=checkpoint)
        return folder

    old, others = fill(ckpt), fill(other)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["checkpoint"] == str(ckpt.resolve())
    assert manifest["checkpoint_sha256"] == hashlib.sha256(b"first weights").hexdigest()
    mine = root / ("f" * ijb_features.KEY_CHARS)  # looks like ours, holds a user's file
    shutil.copytree(old, mine)
    (mine / "notes.txt").write_text("keep me")
    shutil.copytree(old, root / "backup")  # not named by a key
    ckpt.write_bytes(b"retrained weights")  # train.py --overwrite: a new key
    ijb_features.log.addHandler(caplog.handler)  # the module's logger does not propagate
    try:
        new = fill(ckpt)
    finally:
        ijb_features.log.removeHandler(caplog.handler)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [new.name, others.name, mine.name, "backup"])
    assert f"deleted 1 stale feature cache(s) of {ckpt.resolve()}" in caplog.text
    assert old.name in caplog.text


def test_caches_made_before_the_checkpoint_was_recorded_are_named_or_attributed(
        release_dir, tmp_path, caplog):
    """A manifest without the checkpoint was never pruned nor named: an old cache of the
    release lingered unseen. One of ours that is read again gets its checkpoint; one not read
    (maybe another model's) is kept and named in one line with how to delete it; a folder
    holding a file not ours, or of another release, is neither touched nor named."""
    release = ijb_release.load_release(release_dir[0], "IJBC", with_search=False)
    root = tmp_path / "features"
    ckpt = tmp_path / "run" / "backbone.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"first weights")

    def fill() -> Path:
        folder = root / ijb_features.cache_key(release, ckpt, None, None)
        ijb_features.cached_features(
            release, folder, lambda crops: np.zeros((len(crops), 2, 4), np.float32),
            workers=1, progress=False, checkpoint=ckpt)
        return folder

    def legacy(folder: Path, ijb_dir: str) -> None:  # the manifest as written before
        (folder / "manifest.json").write_text(json.dumps(
            {"format": 1, "images": len(release.names), "chunk_images": 8192,
             "ijb_dir": ijb_dir}))

    kept = fill()
    unknown, foreign, elsewhere = (root / (c * ijb_features.KEY_CHARS) for c in "abc")
    for folder, ijb_dir in ((kept, str(release.root)), (unknown, os.path.relpath(release.root)),
                            (foreign, str(release.root)), (elsewhere, str(tmp_path / "IJBB"))):
        if folder != kept:
            shutil.copytree(kept, folder)
        legacy(folder, ijb_dir)
    (foreign / "notes.txt").write_text("keep me")
    ijb_features.log.addHandler(caplog.handler)  # the module's logger does not propagate
    try:
        assert fill() == kept  # read again: the same content's key
        assert json.loads((kept / "manifest.json").read_text())["checkpoint"] == \
            str(ckpt.resolve())
        lines = [r.getMessage() for r in caplog.records if "before caches recorded" in r.message]
        assert len(lines) == 1 and "\n" not in lines[0], lines
        assert str(unknown) in lines[0] and "rm -r" in lines[0]
        assert str(foreign) not in lines[0] and str(elsewhere) not in lines[0]
        ckpt.write_bytes(b"retrained weights")  # now attributed: pruned as stale
        new = fill()
    finally:
        ijb_features.log.removeHandler(caplog.handler)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [new.name, unknown.name, foreign.name, elsewhere.name])
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_quality_csv_holds_each_images_own_norm_from_the_cache(release_dir, checkpoint,
                                                               tmp_path, embed_calls, capsys):
    """--quality: <prefix>_quality.csv holds the norm of each image's own embedding (not its
    mirror's), computed here in float64 from its aligned crop; a cached run embeds nothing."""
    from models import load_backbone

    root, _ = release_dir
    out = tmp_path / "out"
    assert _cli(root, checkpoint, out) == 0
    assert "quality" not in json.loads((out / "ijbc_results.json").read_text())
    assert not (out / "ijbc_quality.csv").exists()  # without the flag, nothing new
    embed_calls.clear()
    capsys.readouterr()
    assert _cli(root, checkpoint, out, "--quality") == 0
    assert embed_calls == []  # from the cached raw embeddings
    printed = capsys.readouterr().out
    release = ijb_release.load_release(root, "IJBC")
    model = load_backbone(checkpoint).double().eval()
    crops = np.stack([ijb_features.aligned_crop(release.crop_dir / n, release.landmarks[i])
                      for i, n in enumerate(release.names)])
    x = torch.from_numpy((crops.astype(np.float64) - 127.5) / 127.5).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = np.linalg.norm(model(x.contiguous()).numpy(), axis=1)
        mirror = np.linalg.norm(model(x.flip(3).contiguous()).numpy(), axis=1)
    assert np.abs(mirror - ref).max() > 1e-3 * ref.max()
    lines = (out / "ijbc_quality.csv").read_text().splitlines()
    assert lines[0] == "image,norm" and len(lines) == IMAGES + 1
    rows = [line.split(",") for line in lines[1:]]
    assert [name for name, _ in rows] == list(release.names)
    np.testing.assert_allclose([float(v) for _, v in rows], ref, rtol=1e-5)
    q = json.loads((out / "ijbc_results.json").read_text())["quality"]
    assert q["images"] == IMAGES and q["mean"] == pytest.approx(ref.mean(), rel=1e-5)
    assert q["lowest"][0]["image"] == release.names[int(np.argmin(ref))]
    quality_lines = [line for line in printed.splitlines() if line.startswith("quality (")]
    assert len(quality_lines) == 1 and str(out / "ijbc_quality.csv") in quality_lines[0]
