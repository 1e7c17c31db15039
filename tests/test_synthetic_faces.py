"""synthetic_faces.py: formats (LFW tree, pairs.txt parsed here by our own reader), disjoint
splits, determinism, resumability, difficulty (images of one identity differ more than a
JPEG re-encode) and that MTCNN finds the faces; the base landmarks against MTCNN."""

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from faces.face_warp import estimate_similarity
from synthetic import synthetic_faces as sf
from synthetic import synthetic_faces_assets as sfa


def _read_pairs(path: Path) -> tuple[int, int, list[tuple[list, list]]]:
    """An independent reader of LFW's pairs.txt: header ``folds<TAB>n``, then per fold n
    lines ``name i j`` and n lines ``name1 i name2 j``."""
    lines = path.read_text().splitlines()
    folds, n = (int(x) for x in lines[0].split("\t"))
    body = [line.split("\t") for line in lines[1:]]
    assert len(body) == 2 * folds * n, "pairs.txt has the wrong number of lines"
    out = []
    for f in range(folds):
        block = body[2 * n * f: 2 * n * (f + 1)]
        same = [(p[0], int(p[1]), int(p[2])) for p in block[:n]]
        different = [(p[0], int(p[1]), p[2], int(p[3])) for p in block[n:]]
        assert all(len(p) == 3 for p in block[:n]) and all(len(p) == 4 for p in block[n:])
        out.append((same, different))
    return folds, n, out


def _lfw_file(root: Path, name: str, number: int) -> Path:
    return root / name / f"{name}_{number:04d}.jpg"


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = sf.generate_dataset(out, train_identities=3, train_images=2, eval_identities=4,
                                  eval_images=3, folds=2, seed=0, progress=False)
    return out, summary


def test_dataset_layout_and_pairs(small_set):
    out, summary = small_set
    train, lfw = out / "train", out / "lfw"
    train_names = sorted(p.name for p in train.iterdir())
    eval_names = sorted(p.name for p in lfw.iterdir() if p.is_dir())
    assert len(train_names) == 3 and len(eval_names) == 4
    assert not set(train_names) & set(eval_names)
    for root, names, count in ((train, train_names, 2), (lfw, eval_names, 3)):
        for name in names:
            files = sorted(p.name for p in (root / name).iterdir())
            assert files == [f"{name}_{k:04d}.jpg" for k in range(1, count + 1)]
    image = np.asarray(Image.open(_lfw_file(lfw, eval_names[0], 1)))
    assert image.shape == (250, 250, 3) and image.dtype == np.uint8

    folds, n, blocks = _read_pairs(lfw / "pairs.txt")
    assert folds == 2 and n == summary["pairs_per_fold"]
    # 4 identities x 3 images in 2 folds: 2 identities a fold, 2 * C(3,2) = 6 same pairs.
    assert n == 6 and summary["folds_identity_disjoint"]
    fold_names = []
    for same, different in blocks:
        assert len(same) == n and len(different) == n  # balanced
        assert len(set(same)) == n and len(set(different)) == n
        names = set()
        for name, i, j in same:
            assert i != j
            assert _lfw_file(lfw, name, i).is_file() and _lfw_file(lfw, name, j).is_file()
            names.add(name)
        for a, i, b, j in different:
            assert a != b and _lfw_file(lfw, a, i).is_file() and _lfw_file(lfw, b, j).is_file()
            names.update((a, b))
        assert names <= set(eval_names)
        fold_names.append(names)
    assert not fold_names[0] & fold_names[1]  # each identity in one fold, like LFW
    assert summary["written"] == 3 * 2 + 4 * 3 and summary["skipped"] == 0


def test_rerun_skips_and_restores_identical_bytes(small_set):
    out, _ = small_set
    victim = next((out / "train").iterdir())
    victim = sorted(victim.iterdir())[1]
    original = victim.read_bytes()
    pairs_before = (out / "lfw" / "pairs.txt").read_bytes()
    victim.unlink()
    empty = sorted((out / "lfw").glob("*/*_0001.jpg"))[0]
    original_empty = empty.read_bytes()
    empty.write_bytes(b"")  # an empty file counts as missing
    summary = sf.generate_dataset(out, train_identities=3, train_images=2, eval_identities=4,
                                  eval_images=3, folds=2, seed=0, progress=False)
    assert summary["written"] == 2 and summary["skipped"] == 3 * 2 + 4 * 3 - 2
    assert victim.read_bytes() == original and empty.read_bytes() == original_empty
    assert (out / "lfw" / "pairs.txt").read_bytes() == pairs_before


def test_few_identities_fall_back_to_shared_folds(tmp_path):
    summary = sf.generate_dataset(tmp_path, train_identities=0, eval_identities=3,
                                  eval_images=3, folds=2, seed=3, progress=False)
    assert not summary["folds_identity_disjoint"]
    folds, n, blocks = _read_pairs(tmp_path / "lfw" / "pairs.txt")
    # 3 identities x C(3,2) = 9 same pairs shared by 2 folds: at most 4 a fold.
    assert folds == 2 and n == 4
    every_pair = [p for same, diff in blocks for p in same + diff]
    assert len(every_pair) == len(set(every_pair)) == 4 * n
    with pytest.raises(ValueError, match="pairs_per_fold"):
        sf.generate_dataset(tmp_path, train_identities=0, eval_identities=3, eval_images=3,
                            folds=2, pairs_per_fold=5, progress=False)


def test_lfw_sized_pairs_and_name_disjointness():
    counts = {f"p{k}": 10 for k in range(100)}
    blocks, n, disjoint = sf.make_pairs(counts, 10, None, np.random.default_rng(0))
    assert n == 300 and disjoint and len(blocks) == 10  # LFW's 10 x (300 + 300)
    train = {sf.identity_name(sf.TRAIN_SPLIT, i) for i in range(3000)}
    held_out = {sf.identity_name(sf.EVAL_SPLIT, i) for i in range(3000)}
    assert len(train) == len(held_out) == 3000 and not train & held_out
    seeds = {sf.identity_seed(0, s, i) for s in (0, 1) for i in range(1000)}
    assert len(seeds) == 2000


def test_determinism():
    a1, a2 = sf.make_identity(11), sf.make_identity(11)
    np.testing.assert_array_equal(a1.texture, a2.texture)
    assert a1.texture.shape == (250, 250, 4)
    jpeg = sf.render_jpeg(a1, sf.image_rng(11, 1))
    assert jpeg == sf.render_jpeg(a2, sf.image_rng(11, 1))
    assert jpeg != sf.render_jpeg(a1, sf.image_rng(11, 2))  # another image
    b = sf.make_identity(12)
    assert not np.array_equal(a1.texture, b.texture)
    assert jpeg != sf.render_jpeg(b, sf.image_rng(11, 1))  # another person, same image seed


def test_same_bytes_with_workers_and_different_with_another_seed(tmp_path):
    kwargs = dict(train_identities=1, train_images=2, eval_identities=2, eval_images=2,
                  folds=1, progress=False)
    sf.generate_dataset(tmp_path / "s0", seed=0, **kwargs)
    sf.generate_dataset(tmp_path / "s0b", seed=0, workers=2, **kwargs)  # two processes
    sf.generate_dataset(tmp_path / "s1", seed=1, **kwargs)
    files = sorted(p.relative_to(tmp_path / "s0") for p in (tmp_path / "s0").rglob("*.jpg"))
    assert len(files) == 2 + 4
    for rel in files:
        assert (tmp_path / "s0" / rel).read_bytes() == (tmp_path / "s0b" / rel).read_bytes()
        assert (tmp_path / "s0" / rel).read_bytes() != (tmp_path / "s1" / rel).read_bytes()


def test_images_of_one_identity_differ_more_than_a_jpeg_reencode():
    for seed in (21, 22, 23):
        identity = sf.make_identity(seed)
        first, second = (sf.render_image(identity, sf.image_rng(seed, k)).astype(np.float64)
                         for k in (1, 2))
        # Re-encode at the generator's lowest JPEG quality: the harshest re-encode it uses.
        ok, buf = cv2.imencode(".jpg", first.astype(np.uint8),
                               [cv2.IMWRITE_JPEG_QUALITY, sf.JPEG_QUALITY_RANGE[0]])
        reencoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).astype(np.float64)
        jpeg_change = np.abs(first - reencoded).mean()
        between_images = np.abs(first - second).mean()
        assert between_images > 3 * jpeg_change, (seed, between_images, jpeg_change)


@pytest.fixture(scope="module")
def mtcnn():
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(1)
    return MTCNN(keep_all=True, min_face_size=40, device="cpu")


def test_mtcnn_finds_the_faces(mtcnn):
    # 10 images: 5 identities x 2 images, the seeds fixed in advance (not picked).
    images = [sf.render_image(sf.make_identity(1000 + k // 2), sf.image_rng(1000 + k // 2, k))
              for k in range(10)]
    boxes, _ = mtcnn.detect(np.stack(images))
    found = 0
    for image_boxes in boxes:
        if image_boxes is None:
            continue
        # the face it finds is the synthetic person's: its centre near the canvas centre
        centres = (image_boxes[:, :2] + image_boxes[:, 2:]) / 2
        found += bool((np.abs(centres - 125).max(axis=1) < 60).any())
    assert found >= 9, f"MTCNN found {found} of 10 faces"


def test_base_landmarks_match_mtcnn_and_canonical_frame(mtcnn):
    photos = sfa.load_base_photos()
    for name, photo in photos.items():
        _, _, landmarks = mtcnn.detect(photo, landmarks=True)
        best = landmarks[0]
        assert np.abs(best - sfa.BASE_LANDMARKS[name]).max() < 1.5, name
    # In the canonical frame, MTCNN finds each base face's landmarks where the fitted
    # similarity puts them (the template itself is only matched in the least-squares sense).
    assets = sfa.load_base_assets()
    for k, name in ((0, "astronaut"), (2, "grace_hopper")):
        canonical = np.clip((assets.bases_low[k] + assets.bases_detail[k]) * 255, 0, 255)
        _, _, landmarks = mtcnn.detect(canonical.astype(np.uint8), landmarks=True)
        src = sfa.BASE_LANDMARKS[name]
        matrix = estimate_similarity(src, sfa.CANONICAL_LANDMARKS)
        expected = src @ matrix[:, :2].T + matrix[:, 2]
        assert np.abs(landmarks[0] - expected).max() < 3.0, name
        assert np.abs(expected - sfa.CANONICAL_LANDMARKS).max() < 8.0, name


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(5)
    src = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + shift
    matrix = estimate_similarity(src, dst)
    np.testing.assert_allclose(matrix[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-7)


def test_cli_writes_and_rejects_bad_arguments(tmp_path, capsys):
    summary = sf.main(["--identities", "1", "--images-per-identity", "2", "--eval-identities",
                       "2", "--eval-images", "2", "--folds", "1", "--out", str(tmp_path),
                       "--no-progress"])
    assert len(list((tmp_path / "train").rglob("*.jpg"))) == 2
    assert len(list((tmp_path / "lfw").rglob("*.jpg"))) == 4
    assert summary["pairs_per_fold"] == 2  # 2 identities x C(2,2) same pairs
    with pytest.raises(SystemExit):
        sf.main(["--eval-images", "1", "--out", str(tmp_path / "bad")])
    assert "eval_images must be >= 2" in capsys.readouterr().err
    assert not list(itertools.islice((tmp_path / "bad").rglob("*"), 1))


@pytest.mark.slow
def test_script_exits_zero_after_writing(tmp_path):
    """`python synthetic_faces.py ...` as a user runs it: status 0, no traceback (main returns
    its summary dict, which is no exit status)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "synthetic.synthetic_faces", "--identities", "1",
                          "--images-per-identity", "2", "--eval-identities", "2",
                          "--eval-images", "2", "--folds", "1", "--out", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, timeout=120,
                         cwd=Path(sf.__file__).parent.parent)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert len(list((tmp_path / "lfw").rglob("*.jpg"))) == 4
