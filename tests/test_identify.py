"""identify.py and its gallery: rankings against a float64 brute force (an identity scored
by its best image), ties, removal, saved generations surviving a writer killed at any
rename and a real SIGKILL, the FAR threshold against a count of impostor pairs written
here, and the CLI end to end on synthetic face photos (enrol, rerun, refusals, search)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

import identify
from gallery import store
from identify import Gallery, GalleryError
from utils import run_cli

ROOT = Path(__file__).resolve().parent.parent


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries: np.ndarray, gallery: np.ndarray, names: list[str]) -> list[dict]:
    """Per query: identity -> its best image's score, in float64."""
    out = []
    for q in np.asarray(queries, np.float64):
        best: dict[str, float] = {}
        for x, name in zip(np.asarray(gallery, np.float64), names, strict=True):
            best[name] = max(best.get(name, -math.inf), float(q @ x))
        out.append(best)
    return out


def saved_ivf_gallery(path: Path, seed: int, n: int, **params) -> tuple[Gallery, np.ndarray,
                                                                        list[str]]:
    """A saved 16-D ivf gallery of ``n`` random images, 4 an identity; its images, names."""
    x = unit(np.random.default_rng(seed), n, 16)
    names = [f"n{i // 4:03d}" for i in range(n)]
    g = Gallery.create(path, 16, index="ivf", **params)
    g.add(x, names, [f"s{i}" for i in range(n)])
    g.save()
    return g, x, names


def assert_ranking(got: list[tuple[str, float]], truth: dict[str, float], k: int,
                   tol: float = 1e-5) -> None:
    """``got`` is a best-first top-k of ``truth`` up to rounding of ``tol``: distinct
    identities, each with its own best image's score, best first, and none left out that
    scores higher (the kth best score is within ``tol`` of the true kth best, whatever
    the rounding)."""
    names = [name for name, _ in got]
    scores = [score for _, score in got]
    assert len(names) == len(set(names)) == min(k, len(truth))
    assert scores == sorted(scores, reverse=True)
    for name, score in got:
        assert score == pytest.approx(truth[name], abs=tol)
    ranked = sorted(truth.values(), reverse=True)[:len(got)]
    np.testing.assert_allclose(scores, ranked, atol=tol)


# ----------------------------------------------------------------------------- the API

@pytest.mark.parametrize("block", [store.SCORE_BLOCK_ELEMENTS, 40])
@pytest.mark.parametrize("half", [False, True])
def test_search_equals_brute_force(tmp_path, monkeypatch, block, half):
    monkeypatch.setattr(store, "SCORE_BLOCK_ELEMENTS", block)  # 40: many blocks per search
    monkeypatch.setattr(store, "QUERY_CHUNK", 7)  # and several chunks of queries
    monkeypatch.setattr(store, "FIRST_BLOCK_IMAGES", min(store.FIRST_BLOCK_IMAGES, block // 9))
    rng = np.random.default_rng(1)
    for trial, (images, people, dim) in enumerate([(60, 12, 16), (200, 80, 32), (5, 5, 8)]):
        x = unit(rng, images, dim)
        names = [f"id{i:03d}" for i in rng.integers(0, people, images)]
        g = Gallery.create(tmp_path / f"g{trial}", dim, half=half)
        g.add(x[:images // 2], names[:images // 2], [f"p{i}" for i in range(images // 2)])
        g.add(x[images // 2:], names[images // 2:], [f"p{i}" for i in range(images // 2, images)])
        queries = unit(rng, 23, dim)
        truth = brute_force(queries, x, names)
        tol = 1e-3 if half else 1e-5  # float16: |q.e| <= |e| <= 2^-11 for unit q and x
        for k in (1, 3, len(set(names)) + 4):  # the last: more than there are identities
            for got, best in zip(g.search(queries, k=k), truth, strict=True):
                assert_ranking(got, best, k, tol)


@pytest.mark.parametrize("block", [store.SCORE_BLOCK_ELEMENTS, 1])
def test_ties_go_to_the_name_that_sorts_first(tmp_path, monkeypatch, block):
    monkeypatch.setattr(store, "SCORE_BLOCK_ELEMENTS", block)  # 1: an identity a block
    monkeypatch.setattr(store, "FIRST_BLOCK_IMAGES", min(store.FIRST_BLOCK_IMAGES, block))
    rng = np.random.default_rng(2)
    v = unit(rng, 1, 8)[0]
    others = unit(rng, 6, 8)
    g = Gallery.create(tmp_path / "g", 8)
    # three identities share the query's exact direction; c and a hold other images too
    g.add(np.vstack([others[:3], [v, v, v], others[3:]]),
          ["c", "z", "a", "c", "b", "a", "q", "r", "z"], [str(i) for i in range(9)])
    got = g.search(v[None], k=2)[0]
    assert [name for name, _ in got] == ["a", "b"]
    assert got[0][1] == got[1][1] == pytest.approx(1.0, abs=1e-6)
    assert [name for name, _ in g.search(v[None], k=3)[0]] == ["a", "b", "c"]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_an_approximate_search_breaks_ties_in_name_order_too(tmp_path, kind):
    """One photo enrolled under three names (a duplicate, a mislabel): the approximate
    indexes rank the three equal scores by name, as the exact search does, not in faiss's
    order of the images."""
    rng = np.random.default_rng(19)
    x = unit(rng, 40, 32)
    v = x[0]
    images = np.vstack([x, v, v])[::-1]
    names = [f"m{i:02d}" for i in range(40)] + ["zz", "aa"]
    params = {"nlist": 1, "rerank": 20} if kind == "ivf" else {}
    g = Gallery.create(tmp_path / "g", 32, index=kind, **params)
    g.add(images, names[::-1], [f"s{i}" for i in range(42)])
    truth = brute_force(v[None], images, names[::-1])[0]
    got = g.search(v, k=3)[0]
    assert [name for name, _ in got] == ["aa", "m00", "zz"]
    assert_ranking(got, truth, 3)


def test_remove_and_reopen(tmp_path):
    rng = np.random.default_rng(3)
    x = unit(rng, 30, 16)
    names = [f"n{i % 6}" for i in range(30)]
    g = Gallery.create(tmp_path / "g", 16)
    g.add(x, names, [f"s{i}" for i in range(30)])
    g.save()
    g = Gallery.open(tmp_path / "g")
    assert g.remove("n2") == 5 and len(g) == 25
    with pytest.raises(GalleryError, match="no identity 'n2'"):
        g.remove("n2")
    g.save()
    again = Gallery.open(tmp_path / "g")
    assert len(again) == 25 and again.identities() == ["n0", "n1", "n3", "n4", "n5"]
    kept = [i for i in range(30) if names[i] != "n2"]
    truth = brute_force(x[kept[:4]], x[kept], [names[i] for i in kept])
    for got, best in zip(again.search(x[kept[:4]], k=10), truth, strict=True):
        assert_ranking(got, best, 10)
        assert got[0][1] == pytest.approx(1.0, abs=1e-6)  # each image finds itself


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_a_gallery_emptied_and_saved_opens_and_takes_new_images(tmp_path, kind):
    """Every identity removed (enrol --remove each): the saved gallery names no index of
    the images it no longer holds, opens empty, and searches new images exactly."""
    rng = np.random.default_rng(17)
    x = unit(rng, 40, 16)
    names = [f"n{i % 4}" for i in range(40)]
    g = Gallery.create(tmp_path / "g", 16, index=kind)
    g.add(x, names, [f"s{i}" for i in range(40)])
    g.save()
    g = Gallery.open(tmp_path / "g")
    for name in sorted(set(names)):
        g.remove(name)
    g.save()
    g = Gallery.open(tmp_path / "g")
    assert len(g) == 0 and g.identities() == [] and g.search(x[:2], k=3) == [[], []]
    g.add(x[:3], ["c", "a", "b"], ["t0", "t1", "t2"])
    g.save()
    g = Gallery.open(tmp_path / "g")
    truth = brute_force(x[:5], x[:3], ["c", "a", "b"])
    for got, best in zip(g.search(x[:5], k=5), truth, strict=True):
        assert_ranking(got, best, 5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_is_saved_and_finds_the_exact_best(tmp_path, kind):
    rng = np.random.default_rng(4)
    x = unit(rng, 400, 32)
    names = [f"n{i % 150}" for i in range(400)]
    g = Gallery.create(tmp_path / "g", 32, index=kind)
    g.add(x[:300], names[:300], [f"s{i}" for i in range(300)])
    g.save()
    g = Gallery.open(tmp_path / "g")
    g.add(x[300:], names[300:], [f"s{i}" for i in range(300, 400)])  # extends the index
    g.remove("n7")
    g.save()
    assert any(p.suffix == ".faiss" for p in (tmp_path / "g").iterdir())
    g = Gallery.open(tmp_path / "g")
    queries = x[::7] + 0.05 * unit(rng, len(x[::7]), 32)
    truth = brute_force(queries, x[[n != "n7" for n in names]],
                        [n for n in names if n != "n7"])
    found = g.search(queries, k=3, with_sources=True)
    hits = [got[0][0] == max(best, key=best.get) for got, best in zip(found, truth, strict=True)]
    assert np.mean(hits) >= 0.95
    for q, got in zip(queries, found, strict=True):  # each score: the true cosine of its image
        for name, score, source in got:
            image = int(source[1:])
            assert names[image] == name
            assert score == pytest.approx(float(q @ x[image]) / np.linalg.norm(q), abs=1e-5)


def test_a_float16_hnsw_gallery_scores_images_as_stored_whether_built_or_added(tmp_path):
    """--half: hnsw returns its index's scores; images added to a saved index score like
    those it was built from: the cosine of the float16 embedding stored (float64 here), the
    same after a removal rebuilds the index."""
    rng = np.random.default_rng(20)
    x = unit(rng, 60, 16)
    stored = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    names = [f"n{i % 20:02d}" for i in range(60)]
    g = Gallery.create(tmp_path / "g", 16, index="hnsw", half=True)
    g.add(x[:30], names[:30], [str(i) for i in range(30)])
    g.save()  # the index built from the first 30 as stored
    g = Gallery.open(tmp_path / "g")
    g.add(x[30:], names[30:], [str(i) for i in range(30, 60)])  # added to the index
    queries = unit(rng, 10, 16)
    truth = queries @ stored.astype(np.float64).T
    for identities in (20, 19):
        if identities == 19:
            g.remove("n00")  # the index is built again at the next search
        for q, got in enumerate(g.search(queries, k=20, with_sources=True)):
            assert len(got) == identities
            for _, score, source in got:
                assert score == pytest.approx(truth[q, int(source)], abs=1e-6)


def test_embeddings_of_any_finite_float32_scale_keep_their_direction(tmp_path):
    """Rows whose squares leave float32's range (1e20: inf, 1e-25: 0) are normalised all
    the same: searched, each scores the float64 cosine (before, the first was stored as a
    zero vector scoring 0, the second refused as one)."""
    rng = np.random.default_rng(21)
    x = unit(rng, 3, 8)
    g = Gallery.create(tmp_path / "g", 8)
    g.add(x * np.array([[1e20], [1e-25], [3.0]]), ["a", "b", "c"], ["0", "1", "2"])
    queries = unit(rng, 4, 8)
    for got, best in zip(g.search(queries * 1e-22, k=3), brute_force(queries, x, ["a", "b", "c"]),
                         strict=True):
        assert_ranking(got, best, 3)
    with pytest.raises(GalleryError, match="zero vector"):
        g.add(np.zeros((1, 8)), ["d"], ["3"])


def test_gallery_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(GalleryError, match="pq_m 3 does not divide the embedding size 16"):
        Gallery.create(tmp_path / "codes", 16, index="ivf", pq_m=3)
    with pytest.raises(GalleryError, match="hnsw_m .* must be at least 1"):
        Gallery.create(tmp_path / "links", 16, index="hnsw", hnsw_m=0)
    g = Gallery.create(tmp_path / "g", 4)
    with pytest.raises(GalleryError, match="4-D"):
        g.add(np.ones((2, 5)), ["a", "b"], ["x", "y"])
    with pytest.raises(GalleryError, match="non-finite"):
        g.add(np.full((1, 4), np.nan), ["a"], ["x"])
    with pytest.raises(GalleryError, match="one of each"):
        g.add(np.ones((2, 4)), ["a"], ["x", "y"])
    with pytest.raises(GalleryError, match="no gallery here"):
        Gallery.open(tmp_path / "none")
    g.add(np.ones((1, 4)), ["a"], ["x"])
    g.save()
    with pytest.raises(GalleryError, match="already holds a gallery"):
        Gallery.create(tmp_path / "g", 4)
    other = Gallery.open(tmp_path / "g")
    g.add(np.ones((1, 4)), ["b"], ["y"])
    g.save()
    other.add(np.ones((1, 4)), ["c"], ["z"])
    with pytest.raises(GalleryError, match="another writer"):  # never silently lose b
        other.save()


class Killed(BaseException):
    """Stands for the process dying at that point."""


def test_a_writer_dying_at_any_rename_leaves_the_last_saved_gallery(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    x = unit(rng, 12, 8)
    path = tmp_path / "g"
    g = Gallery.create(path, 8, index="hnsw")
    g.add(x[:6], list("aabbcc"), [str(i) for i in range(6)])
    g.save()
    real_replace = os.replace
    for dies_at in range(4):  # embeddings, table, index, manifest
        calls = []

        def replace(src, dst, calls=calls, dies_at=dies_at):
            if len(calls) == dies_at:
                raise Killed
            calls.append(dst)
            real_replace(src, dst)

        g = Gallery.open(path)
        g.add(x[6:], list("ddeeff"), [str(i) for i in range(6, 12)])
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            g.save()
        monkeypatch.setattr(os, "replace", real_replace)
        survivor = Gallery.open(path)
        assert len(survivor) == 6 and survivor.identities() == ["a", "b", "c"]
    g = Gallery.open(path)
    g.add(x[6:], list("ddeeff"), [str(i) for i in range(6, 12)])
    g.save()  # removes the dead writers' files
    names = sorted(p.name.split("-")[0] for p in path.iterdir())
    assert names == ["embeddings", "gallery.json", "images", "index"], names
    assert len(Gallery.open(path)) == 12


def test_a_save_makes_its_manifest_durable_before_deleting_the_old_generation(
        tmp_path, monkeypatch):
    """A power cut may keep a deletion and lose an earlier rename that was never fsynced:
    the folder holding the new manifest is synced before the old generation's files go."""
    path = tmp_path / "g"
    g = Gallery.create(path, 4)
    g.add(np.eye(4), list("abcd"), list("0123"))
    g.save()
    g.remove("a")
    events = []
    real_replace, real_fsync, real_unlink = os.replace, os.fsync, Path.unlink
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(Path(dst).name),
                                                         real_replace(src, dst)))
    monkeypatch.setattr(os, "fsync", lambda fd: (
        events.append("sync folder" if os.path.samestat(os.fstat(fd), os.stat(path))
                      else "sync file"), real_fsync(fd)))
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **kw: (
        events.append(f"unlink {self.name}"), real_unlink(self, *a, **kw)))
    g.save()
    renamed, deleted = events.index("gallery.json"), next(
        i for i, e in enumerate(events) if e.startswith("unlink "))
    assert "sync folder" in events[renamed:deleted], events
    assert len(Gallery.open(path)) == 3


def test_far_threshold_against_counted_impostor_pairs(tmp_path):
    rng = np.random.default_rng(6)
    x = unit(rng, 40, 6)
    names = [f"n{i % 9}" for i in rng.permutation(40)]
    g = Gallery.create(tmp_path / "g", 6)
    g.add(x, names, [str(i) for i in range(40)])
    impostor = [float(x[i] @ x[j]) for i in range(40) for j in range(i + 1, 40)
                if names[i] != names[j]]
    n = len(impostor)
    ranked = sorted(impostor, reverse=True)
    for far in (0.5, 0.1, 0.013, 1.5 / n):
        found = g.far_threshold(far, progress=False)
        above = math.floor(far * n)
        assert found.pairs == n and found.images == 40 and not found.sampled
        assert ranked[above - 1] - ranked[above] > 1e-5  # the count below is well defined
        assert found.threshold == pytest.approx(ranked[above], abs=1e-6)
        assert sum(s > found.threshold + 1e-6 for s in impostor) == above == found.above
    with pytest.raises(identify.ToolkitError, match=f"{n:,} impostor pairs measure no FAR"):
        g.far_threshold(0.9 / n)
    sample = identify.far_threshold(x, np.array(names), 0.1, max_images=20, progress=False)
    assert sample.sampled and sample.images == 20


def test_far_threshold_counts_the_pairs_of_the_rate_as_written():
    """Two identities of 10 images: 10 x 10 = 100 impostor pairs. At FAR 0.29 exactly 29
    of them may score above the threshold (the 30th highest score), though 0.29 x 100 is
    28.999999999999996 in floating point; likewise 0.57."""
    x = unit(np.random.default_rng(18), 20, 6)
    labels = np.repeat([0, 1], 10)
    ranked = sorted((float(a @ b) for a in x[:10] for b in x[10:]), reverse=True)
    assert len(ranked) == 100
    for far, above in ((0.29, 29), (0.57, 57)):
        found = identify.far_threshold(x, labels, far, progress=False)
        assert found.pairs == 100 and found.above == above
        assert found.threshold == pytest.approx(ranked[above], abs=1e-6)


# ----------------------------------------------------------------------------- the CLI

def _photo_of_two_faces(path: Path) -> None:
    face = cv2.resize(data.astronaut()[30:330, 80:380], (200, 200), interpolation=cv2.INTER_AREA)
    canvas = np.full((260, 520, 3), 200, np.uint8)
    canvas[30:230, 30:230], canvas[30:230, 290:490] = face, face[:, ::-1]
    cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic people (4 identities x 2 photos, one photo without a face), two ir_narrow
    checkpoints (other weights) and a gallery enrolled from them by the CLI."""
    import torch

    import models
    from synthetic import synthetic_faces

    root = tmp_path_factory.mktemp("identify")
    made = synthetic_faces.generate_dataset(root / "synth", train_identities=0,
                                            eval_identities=4, eval_images=2, folds=1,
                                            pairs_per_fold=1, progress=False)
    people = root / "people"
    shutil.copytree(made["lfw_dir"], people, ignore=shutil.ignore_patterns("*.txt"))
    first = sorted(people.iterdir())[0]
    cv2.imwrite(str(first / "wall.jpg"), np.full((120, 120, 3), 128, np.uint8))
    checkpoints = []
    for seed in (0, 1):
        run = root / f"run{seed}"
        run.mkdir()
        torch.manual_seed(seed)
        torch.save(models.build_model("ir_narrow", 128).state_dict(), run / "backbone.pt")
        (run / "config.json").write_text(json.dumps({"network": "ir_narrow",
                                                     "embedding_size": 128}))
        checkpoints.append(run / "backbone.pt")
    gallery = root / "gallery"
    rc = run_cli(identify.main, ["enrol", "--gallery", str(gallery), "--photos", str(people),
                                 "--checkpoint", str(checkpoints[0]), "--device", "cpu"])
    assert rc == 0
    return {"root": root, "people": people, "checkpoints": checkpoints, "gallery": gallery}


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run_cli(identify.main, [*argv, "--device", "cpu"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_enrol_rerun_embeds_only_new_photos_and_lists_faceless_ones(world, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    shutil.copytree(world["gallery"], gallery)
    g = Gallery.open(gallery)
    assert len(g) == 8 and len(g.identities()) == 4
    assert g.model["checkpoint_sha256"] and g.model["network"] == "ir_narrow"
    person = sorted(world["people"].iterdir())[1]
    new = tmp_path / "people"
    shutil.copytree(world["people"], new)
    shutil.copy(next(person.glob("*_0001.jpg")), new / person.name / "again.jpg")
    rc, out, _ = _cli(["enrol", "--gallery", str(gallery), "--photos", str(new)], capsys)
    # the copied tree is another path: its 8 photos and the new one are enrolled
    assert rc == 0 and "enrolled 9 new photos (0 already enrolled" in out
    assert "no face found in 1 photos (not enrolled): " in out and "wall.jpg" in out
    rc, out, _ = _cli(["enrol", "--gallery", str(gallery), "--photos", str(new)], capsys)
    assert rc == 0 and "enrolled 0 new photos (9 already enrolled" in out
    changed = next((new / sorted(world["people"].iterdir())[3].name).glob("*_0001.jpg"))
    shutil.copy(next(person.glob("*_0002.jpg")), changed)  # same path, new content
    rc, out, _ = _cli(["enrol", "--gallery", str(gallery), "--photos", str(new)], capsys)
    assert rc == 0 and "enrolled 1 new photos (8 already enrolled, 1 replaced" in out
    assert len(Gallery.open(gallery)) == 17
    rc, out, _ = _cli(["enrol", "--gallery", str(gallery), "--remove", person.name], capsys)
    assert rc == 0 and f"removed {person.name}: 5 images" in out
    assert person.name not in Gallery.open(gallery).identities()


def test_refusals_are_one_line_errors(world, tmp_path, capsys):
    gallery = str(world["gallery"])
    other = str(world["checkpoints"][1])
    cases = [
        (["enrol", "--gallery", gallery, "--photos", str(world["people"]), "--checkpoint",
          other], "built with network ir_narrow"),
        (["enrol", "--gallery", gallery, "--remove", "Nobody"], "no identity 'Nobody'"),
        (["search", "--gallery", str(tmp_path / "none"), "--photos", str(world["people"])],
         "no gallery here"),
        (["enrol", "--gallery", str(tmp_path / "new"), "--photos", str(tmp_path / "empty"),
          "--checkpoint", other], "no photos in identity folders"),
        (["search", "--gallery", gallery, "--photos", str(world["people"]), "--far", "1e-9",
          "--out", str(tmp_path / "r.json")], "measure no FAR below"),
    ]
    cases.append((["search", "--gallery", gallery, "--photos", str(world["people"]),
                   "--nprobe", "8"], "has a flat index, not ivf"))
    (tmp_path / "empty" / "someone").mkdir(parents=True)
    cases.append((["search", "--gallery", gallery, "--photos", str(tmp_path / "empty")],
                  "holds no photos"))
    small = Gallery.create(tmp_path / "small", 64)
    small.add(np.ones((1, 64)), ["a"], ["x"])
    small.save()
    cases.append((["enrol", "--gallery", str(tmp_path / "small"), "--photos",
                   str(world["people"]), "--checkpoint", other], "holds 64-D"))
    anonymous = Gallery.create(tmp_path / "anonymous", 128)  # the API: no model recorded
    anonymous.add(np.ones((1, 128)), ["a"], ["x"])
    anonymous.save()
    anonymous_args = ["--gallery", str(tmp_path / "anonymous"), "--photos",
                      str(world["people"]), "--checkpoint", other]
    cases += [(["enrol", *anonymous_args], "records no network or checkpoint"),
              (["search", *anonymous_args, "--out", str(tmp_path / "anonymous.json")],
               "records no network or checkpoint")]
    broken = tmp_path / "broken"
    shutil.copytree(world["gallery"], broken)
    (broken / "gallery.json").write_text("{not json")
    cases.append((["search", "--gallery", str(broken), "--photos", str(world["people"])],
                  "not a gallery manifest"))
    cut = tmp_path / "cut"
    shutil.copytree(world["gallery"], cut)
    npy = next(cut.glob("embeddings-*.npy"))
    npy.write_bytes(npy.read_bytes()[:200])  # a file damaged behind the gallery's back
    cases.append((["search", "--gallery", str(cut), "--photos", str(world["people"])],
                  "a gallery file is damaged"))
    for argv, says in cases:
        rc, _, err = _cli(argv, capsys)
        assert rc == 1 and err.startswith("error: ") and says in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert len(Gallery.open(gallery)) == 8  # nothing refused was written
    assert len(Gallery.open(tmp_path / "anonymous")) == 1
    assert not (tmp_path / "anonymous.json").exists()


def test_a_read_only_gallery_is_refused_before_enrolling_and_still_searched(
        world, tmp_path, capsys, read_only):
    """Enrolling into a gallery that cannot be written is refused at once (not after
    aligning and embedding every photo, at the first save); searching it still works."""
    gallery = tmp_path / "gallery"
    shutil.copytree(world["gallery"], gallery)
    before = sorted(p.name for p in gallery.iterdir())
    read_only(gallery)
    for extra in (["--photos", str(world["people"])], ["--remove", "Nobody"]):
        rc, out, err = _cli(["enrol", "--gallery", str(gallery), *extra], capsys)
        assert rc == 1 and err.startswith("error: --gallery ") and "cannot write" in err
        assert len(err.strip().splitlines()) == 1 and "align" not in out + err
    assert sorted(p.name for p in gallery.iterdir()) == before
    rc, _, _ = _cli(["search", "--gallery", str(gallery), "--photos", str(world["people"]),
                     "--out", str(tmp_path / "r.json")], capsys)
    assert rc == 0 and len(json.loads((tmp_path / "r.json").read_text())) == 9


def test_search_finds_each_photo_as_its_own_identity(world, tmp_path, capsys):
    queries = tmp_path / "queries"
    queries.mkdir()
    person = sorted(world["people"].iterdir())[2]
    shutil.copy(next(person.glob("*_0002.jpg")), queries / "who.jpg")
    cv2.imwrite(str(queries / "wall.png"), np.full((90, 90, 3), 60, np.uint8))
    _photo_of_two_faces(queries / "two.jpg")
    out, sheet = tmp_path / "results.json", tmp_path / "sheet.png"
    rc, printed, _ = _cli(["search", "--gallery", str(world["gallery"]), "--photos",
                           str(queries), "--top-k", "3", "--far", "0.1", "--out", str(out),
                           "--gallery-plot", str(sheet), "--all-faces"], capsys)
    assert rc == 0
    results = json.loads(out.read_text())
    assert set(results) == {str(queries / n) for n in ("who.jpg", "wall.png", "two.jpg")}
    (who,) = results[str(queries / "who.jpg")]
    assert who["identity"] == person.name == who["matches"][0]["identity"]
    assert who["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(who["matches"]) == 3 and len(who["box"]) == 4
    assert results[str(queries / "wall.png")] == []
    assert len(results[str(queries / "two.jpg")]) == 2  # --all-faces: both astronauts
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    for face in [who, *results[str(queries / "two.jpg")]]:  # "unknown" at the threshold
        best = face["matches"][0]
        assert face["identity"] == (best["identity"] if best["score"] > meta["threshold"]
                                    else "unknown")
    assert meta["impostor_pairs"] == 8 * 7 // 2 - 4 and meta["far"] == 0.1
    saved = json.loads((world["gallery"] / "gallery.json").read_text())
    assert meta["gallery_generation"] == saved["generation"] >= 1  # which saved gallery
    assert meta["checkpoint_sha256"] == Gallery.open(world["gallery"]).model["checkpoint_sha256"]
    assert "impostor pairs of the gallery" in printed and f"{person.name}" in printed
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_at_an_fpir_names_a_face_above_the_gallerys_unknown_face_scores(
        world, tmp_path, capsys):
    """--fpir 0.25 over the gallery's 8 images: the threshold is the 3rd highest of their
    best scores over the other identities' images (float64, from the saved files), recorded
    in the meta; --fpir 0.1 (below 1/8) is refused naming the count; --far and --fpir
    together are refused by the parser."""
    manifest = json.loads((world["gallery"] / "gallery.json").read_text())
    emb = np.load(world["gallery"] / manifest["files"]["embeddings"]).astype(np.float64)
    names = json.loads((world["gallery"] / manifest["files"]["images"]).read_text())[
        "identities"]
    best = sorted((max(float(e @ f) for f, m in zip(emb, names, strict=True) if m != name)
                   for e, name in zip(emb, names, strict=True)), reverse=True)
    out = tmp_path / "results.json"
    argv = ["search", "--gallery", str(world["gallery"]), "--photos", str(world["people"]),
            "--out", str(out)]
    rc, printed, _ = _cli([*argv, "--fpir", "0.25"], capsys)
    assert rc == 0
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["threshold_from"] == "--fpir" and meta["fpir"] == 0.25
    assert (meta["unknown_probes"], meta["sampled"]) == (8, False)
    assert meta["threshold"] == pytest.approx(best[2], abs=1e-5)
    assert meta["unknown_probes_above"] == sum(s > best[2] + 1e-5 for s in best) <= 2
    assert f"at FPIR 0.25: {meta['unknown_probes_above']} of 8 enrolled images" in printed
    for faces in json.loads(out.read_text()).values():
        for face in faces:
            top = face["matches"][0]
            assert face["identity"] == (top["identity"] if top["score"] > meta["threshold"]
                                        else "unknown")
    rc, _, err = _cli([*argv, "--fpir", "0.1"], capsys)
    assert rc == 1 and err.startswith("error: --fpir 0.1: the gallery's 8 images searched")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as refused:
        identify.main([*argv, "--fpir", "0.25", "--far", "0.1"])
    assert refused.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.mark.slow  # a spawned process (torch and MTCNN load in it) killed with SIGKILL
def test_enrolment_killed_mid_way_then_rerun_completes(world, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    argv = ["enrol", "--gallery", str(gallery), "--photos", str(world["people"]),
            "--checkpoint", str(world["checkpoints"][0]), "--device", "cpu",
            "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(ROOT / "identify.py"), *argv], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (gallery / "gallery.json").exists() and child.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)  # after its first save, while it enrols the rest
    child.wait()
    saved = len(Gallery.open(gallery))
    assert 1 <= saved < 8  # killed mid-way: 7 photos, each embedded and saved, were left
    rc, out, _ = _cli(argv[:-2], capsys)
    assert rc == 0 and f"({saved} already enrolled" in out
    assert len(Gallery.open(gallery)) == 8
    assert not [p for p in gallery.iterdir() if p.name.startswith(".")]


def test_identify_help_names_both_commands(capsys):
    with pytest.raises(SystemExit) as done:
        identify.main(["--help"])
    assert done.value.code == 0 and "{enrol,search}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        identify.main(["search", "--help"])
    shown = capsys.readouterr().out
    assert done.value.code == 0 and "--far" in shown and "--fpir" in shown


def test_ivf_trains_on_a_bounded_sample_and_probing_every_list_is_exact(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    x = unit(rng, 2000, 16)
    names = [f"n{i // 4:04d}" for i in range(2000)]
    trained = []
    real_train = store.faiss.IndexIVFPQFastScan.train
    monkeypatch.setattr(store.faiss.IndexIVFPQFastScan, "train",
                        lambda self, rows: (trained.append(np.array(rows)),
                                            real_train(self, rows)))
    # every list probed and every image re-scored: exact, whatever the codes
    g = Gallery.create(tmp_path / "g", 16, index="ivf", nlist=4, nprobe=4, rerank=2000)
    g.add(x, names, [f"s{i}" for i in range(2000)])
    queries = x[::50] + 0.3 * unit(rng, 40, 16)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    got = g.search(queries, k=3)
    # faiss's practice: 64 points a list at most (4 lists: 256 of the 2,000)
    assert len(trained) == 1 and len(trained[0]) == 4 * 64
    match = trained[0].astype(np.float64) @ x.T  # each a distinct gallery image
    assert np.allclose(match.max(axis=1), 1.0, atol=1e-6)
    assert len(set(match.argmax(axis=1))) == 4 * 64
    truth = brute_force(queries, x, names)  # nprobe = nlist scans every image: exact
    for row, best in zip(got, truth, strict=True):
        assert_ranking(row, best, 3)


def test_an_index_build_leaves_float32_embeddings_uncopied(tmp_path):
    x = unit(np.random.default_rng(12), 20_000, 64).astype(np.float32)  # 5 MB
    g = Gallery.create(tmp_path / "g", 64, index="ivf", nlist=8)
    g.add(x, [f"n{i // 4:05d}" for i in range(20_000)], [f"s{i}" for i in range(20_000)])
    tracemalloc.start()  # numpy's buffers are traced, faiss's own are not: copies only
    g._build_index()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes / 4  # astype would copy all 5 MB


def test_nprobe_widens_one_search_of_an_ivf_gallery_to_exact(tmp_path):
    """--nprobe: an ivf gallery saved with nprobe 1 misses true best identities; probing
    every list for one search finds the brute force's, and the saved gallery keeps 1."""
    g, x, names = saved_ivf_gallery(tmp_path / "g", 13, 800, nlist=8, nprobe=1, rerank=800)
    queries = unit(np.random.default_rng(113), 60, 16)
    truth = brute_force(queries, x, names)
    best = [max(t, key=t.get) for t in truth]
    narrow = Gallery.open(tmp_path / "g")
    assert [r[0][0] for r in narrow.search(queries, k=1)] != best  # one list misses some
    wide = Gallery.open(tmp_path / "g")
    args = identify.build_parser().parse_args(
        ["search", "--gallery", str(tmp_path / "g"), "--photos", "q", "--nprobe", "8"])
    identify._search_breadth(args, wide)
    for row, t in zip(wide.search(queries, k=3), truth, strict=True):
        assert_ranking(row, t, 3)
    assert Gallery.open(tmp_path / "g").params["nprobe"] == 1


def test_ivf_codes_pick_candidates_and_the_embeddings_score_them(tmp_path):
    """One 4-bit code a 16-D image cannot tell near neighbours apart; re-scoring the
    codes' best ``rerank`` candidates from the embeddings returns each identity's true
    best cosine (float64 brute force), in the true order, and a re-rank as deep as the
    gallery with every list probed is exact."""
    rng = np.random.default_rng(14)
    x = unit(rng, 600, 16)
    names = [f"n{i // 3:03d}" for i in range(600)]
    g = Gallery.create(tmp_path / "g", 16, index="ivf", nlist=4, nprobe=4, pq_m=1,
                       rerank=600)
    g.add(x, names, [f"s{i}" for i in range(600)])
    queries = x[::20] + 0.2 * unit(rng, 30, 16)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = brute_force(queries, x, names)
    got = g.search(queries, k=4)
    assert g._index.nprobe == 4
    g.params["nprobe"] = 0  # the default: an eighth of the lists, at least one
    g.search(queries[:1])
    assert g._index.nprobe == 1
    codes_only = g._index.search(queries.astype(np.float32), 1)[0][:, 0]  # the estimates
    assert not np.allclose(codes_only, [max(t.values()) for t in truth], atol=1e-3)
    for row, best in zip(got, truth, strict=True):
        assert_ranking(row, best, 4)


def test_an_ivf_flat_index_of_an_earlier_version_is_rebuilt(tmp_path):
    """Galleries saved before the IVF index held codes: the IVF-Flat file is replaced by
    the codes index on the next search and save, the results exact where probed fully."""
    g, x, names = saved_ivf_gallery(tmp_path / "g", 15, 400, nlist=4, nprobe=4, rerank=400)
    manifest = json.loads((tmp_path / "g" / "gallery.json").read_text())
    old = store.faiss.IndexIVFFlat(store.faiss.IndexFlatIP(16), 16, 4,
                                   store.faiss.METRIC_INNER_PRODUCT)
    old.train(x.astype(np.float32))
    old.add_with_ids(x.astype(np.float32), np.arange(400))
    store.faiss.write_index(old, str(tmp_path / "g" / manifest["files"]["index"]))
    g = Gallery.open(tmp_path / "g")
    for row, best in zip(g.search(x[::40], k=2), brute_force(x[::40], x, names), strict=True):
        assert_ranking(row, best, 2)
    g.save()
    index = store.faiss.read_index(str(tmp_path / "g" / json.loads(
        (tmp_path / "g" / "gallery.json").read_text())["files"]["index"]))
    assert isinstance(store.faiss.downcast_index(index), store.faiss.IndexIVFPQFastScan)


def test_an_ivf_gallery_too_small_for_codes_is_searched_exactly(tmp_path):
    """Codes are trained by k-means (16 centroids a code): a gallery of fewer images keeps
    no index and is searched exactly, saved and reopened; past 15 images it gets its index."""
    rng = np.random.default_rng(16)
    x = unit(rng, 40, 32)
    names = [f"n{i // 2:02d}" for i in range(40)]
    g = Gallery.create(tmp_path / "g", 32, index="ivf")
    g.add(x[:5], names[:5], [f"s{i}" for i in range(5)])
    for row, best in zip(g.search(x[:5], k=2), brute_force(x[:5], x[:5], names[:5]),
                         strict=True):
        assert_ranking(row, best, 2)
    g.save()
    assert not any(p.suffix == ".faiss" for p in (tmp_path / "g").iterdir())
    g = Gallery.open(tmp_path / "g")
    g.add(x[5:], names[5:], [f"s{i}" for i in range(5, 40)])
    for row, best in zip(g.search(x[::4], k=2), brute_force(x[::4], x, names), strict=True):
        assert_ranking(row, best, 2)  # 40 images, rerank 100: every image re-scored
    g.save()
    assert any(p.suffix == ".faiss" for p in (tmp_path / "g").iterdir())
