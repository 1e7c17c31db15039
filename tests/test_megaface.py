"""MegaFace: the devkit feature format (megaface_features), the evaluator against brute force,
noise removal (megaface_noise), the CLI.

Reference computations here are written independently of megaface_eval: float64 loops over
every (probe, gallery, distractor) triple and every impostor pair. Features are random but
quantised to multiples of 1/16, so every score is exact in float32 too and the exact
comparisons (ties included) must agree to the last pair.
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import megaface
from evaluation import megaface_eval as me
from evaluation import megaface_features, megaface_noise

QUANT = 16  # feature entries are k / QUANT: exact float32 scores, and plenty of ties
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU where present


def quantised(rng, n, dim=6, levels=8):
    return (rng.integers(-levels, levels + 1, size=(n, dim)) / QUANT).astype(np.float32)


def ref_score(a, b):
    """1 - |a - b|^2 / 2 in float64 (the score the module documents)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return 1.0 - 0.5 * float(d @ d)


def brute_cmc(probes, labels, distractors, max_rank):
    """For each ordered (p, g) of one identity, p != g: count distractors scoring strictly
    above score(p, g); right at rank k when that count is < k."""
    correct, pairs = np.zeros(max_rank), 0
    dscore = [[ref_score(p, d) for d in distractors] for p in probes]
    for i in range(len(probes)):
        for j in range(len(probes)):
            if i == j or labels[i] != labels[j]:
                continue
            genuine = ref_score(probes[i], probes[j])
            above = sum(s > genuine for s in dscore[i])
            correct += [above < k for k in range(1, max_rank + 1)]
            pairs += 1
    return correct / pairs


def brute_tar(probes, labels, distractors, far):
    genuine = [ref_score(probes[i], probes[j]) for i in range(len(probes))
               for j in range(i + 1, len(probes)) if labels[i] == labels[j]]
    impostor = sorted((ref_score(p, d) for p in probes for d in distractors), reverse=True)
    allowed = int(np.floor(far * len(impostor) + 1e-9))
    threshold = impostor[allowed]
    return np.mean([g > threshold for g in genuine]), threshold


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def features():
    """90 probes of 12 identities (a centre plus small quantised noise), 260 distractors."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 12, size=90)
    centres = quantised(rng, 12)
    probes = centres[labels] + quantised(rng, 90, levels=5)
    return probes.astype(np.float32), labels, quantised(rng, 260)


# ----------------------------------------------------------------------------- feature files

def test_write_feature_bytes_match_struct(tmp_path):
    vec = [0.5, -1.25, 3.0, 1e-3]
    path = tmp_path / "a" / "x.jpg_0.bin"
    megaface_features.write_feature(path, vec)
    expected = struct.pack("<iiii", 4, 1, 4, 5) + struct.pack("<ffff", *vec)
    assert path.read_bytes() == expected


def test_feature_of_a_name_near_the_name_limit_is_written(tmp_path):
    """A legal 252-character feature name: its temporary stays within NAME_MAX too."""
    vec = [0.5, -1.25]
    path = tmp_path / ("x" * 242 + ".jpg_0.bin")
    assert len(path.name) == 252
    megaface_features.write_feature(path, vec)
    assert path.read_bytes() == struct.pack("<iiii", 2, 1, 4, 5) + struct.pack("<ff", *vec)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_read_feature_round_trip_and_struct_written_file(tmp_path):
    vec = np.random.default_rng(0).standard_normal(513).astype(np.float32)
    megaface_features.write_feature(tmp_path / "f.bin", vec)
    np.testing.assert_array_equal(megaface_features.read_feature(tmp_path / "f.bin"), vec)
    (tmp_path / "g.bin").write_bytes(struct.pack("<4i", 3, 1, 4, 5) + struct.pack("<3f", 1, 2, 3))
    out = megaface_features.read_feature(tmp_path / "g.bin")
    assert out.dtype == np.float32 and out.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("data, message", [
    (struct.pack("<4i", 3, 1, 4, 6) + bytes(12), "type=6"),  # CV_64F header
    (struct.pack("<4i", 3, 2, 4, 5) + bytes(24), "cols=2"),
    (struct.pack("<4i", 3, 1, 4, 5) + bytes(8), "header says 3 floats"),  # truncated
    (b"\x00" * 7, "shorter than the 16-byte header"),
    (struct.pack("<4i", 2, 1, 4, 5) + struct.pack("<2f", 1, float("nan")), "1 of 2 values are "
     "non-finite"),
])
def test_read_feature_rejects_bad_files_naming_them(tmp_path, data, message):
    path = tmp_path / "bad_0.bin"
    path.write_bytes(data)
    with pytest.raises(megaface_features.FeatureFormatError, match=message) as info:
        megaface_features.read_feature(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- identification

@pytest.mark.parametrize("chunk_size, ranks", [
    (None, (1, 2, 5, 10)),  # one chunk
    (37, (1, 2, 5, 10)),  # ragged chunks (one tile a row)
    (256, (1, 2, 5, 10)),  # 4 tiles a chunk, all of them candidates
    (192, (1, 2)),  # 3 tiles a chunk, the best 2 of them candidates
])
def test_identification_matches_brute_force(features, chunk_size, ranks, device):
    probes, labels, distractors = features
    expected = brute_cmc(probes, labels, distractors, 10)
    got = me.megaface_identification(probes, labels, distractors, ranks=ranks,
                                     chunk_size=chunk_size, device=device)
    assert list(got) == list(ranks)
    for r, rate in got.items():
        assert rate == pytest.approx(expected[r - 1], abs=1e-12)
    assert 0.05 < got[1] < got[ranks[-1]] < 1  # a regime where ranks differ


def test_cmc_per_size_and_random_order_match_brute_force(features, device):
    probes, labels, distractors = features
    perm = np.random.default_rng(3).permutation(len(distractors))
    res = me.megaface_evaluate(probes, labels, distractors, sizes=(10, 100, 260, 10**6),
                               fars=(), chunk_size=48, device=device, order=perm,
                               progress=False)
    assert sorted(res) == [10, 100, 260]  # sizes above the available count are dropped
    for n, r in res.items():
        np.testing.assert_allclose(r["cmc"], brute_cmc(probes, labels, distractors[perm[:n]],
                                                       10), atol=1e-12)


def test_ties_do_not_count_against_the_probe(device):
    # unit vectors with entries +-1/2: every score is exact; d0 ties score(p0, p1) = 1/2
    p = np.array([[.5, .5, .5, .5], [.5, .5, .5, -.5]], np.float32)
    d_tie = np.array([[.5, .5, -.5, .5]], np.float32)
    assert ref_score(p[0], d_tie[0]) == ref_score(p[0], p[1]) == 0.5
    assert me.megaface_identification(p, [0, 0], d_tie, ranks=(1,), device=device) == {1: 1.0}
    d_above = np.array([[.5, .5, .5, .5]], np.float32)  # scores 1 > 1/2 against p0 only
    assert me.megaface_identification(p, [0, 0], np.vstack([d_tie, d_above]), ranks=(1, 2),
                                      device=device) == {1: 0.5, 2: 1.0}


def test_more_ranks_than_distractors_are_all_right(features):
    probes, labels, distractors = features
    assert me.megaface_identification(probes, labels, distractors[:3], ranks=(4,),
                                      device="cpu") == {4: 1.0}


# ----------------------------------------------------------------------------- verification

@pytest.mark.parametrize("block, chunk_size", [
    (None, 64),  # the impostor buffer keeps every score
    (256, 64),  # a running threshold, later chunks screened by tiles
    (256, None),  # threshold started and applied within one chunk (ties at it kept)
])
def test_verification_tar_matches_brute_force(features, monkeypatch, block, chunk_size, device):
    probes, labels, distractors = features
    if block:
        monkeypatch.setattr(me, "BUFFER_MIN_ELEMENTS", block)
    fars = (1e-4, 1e-3, 1e-2)
    res = me.megaface_evaluate(probes, labels, distractors, max_rank=1, fars=fars,
                               chunk_size=chunk_size, device=device,
                               progress=False)[len(distractors)]
    for far in fars:
        tar, threshold = brute_tar(probes, labels, distractors, far)
        got = res["verification"][far]
        assert got["tar"] == pytest.approx(tar, abs=1e-12)
        assert got["threshold"] == pytest.approx(threshold, abs=1e-6)
        assert got["far_achieved"] <= far
    assert me.megaface_verification(probes, labels, distractors, fars=(1e-2,), device=device) \
        == {1e-2: pytest.approx(brute_tar(probes, labels, distractors, 1e-2)[0], abs=1e-12)}


def test_unresolvable_far_is_printed_as_the_json_says(features, device):
    probes, labels, distractors = features
    res = me.megaface_evaluate(probes, labels, distractors[:10], max_rank=1, fars=(1e-3, 1e-2),
                               device=device, progress=False)
    ver = res[10]["verification"]  # 90 probes x 10 distractors = 900 impostor pairs
    assert not ver[1e-3]["resolvable"] and ver[1e-2]["resolvable"]
    assert ver[1e-3]["not_measured"] == "n/a (needs >= 1,000 impostor pairs)"
    assert "not_measured" not in ver[1e-2]
    table = me.format_results(res, (1e-3, 1e-2)).splitlines()
    assert table[1].split()[-2:] == ["n/a", f"{100 * ver[1e-2]['tar']:.2f}"]
    assert table[2:] == ["  TAR@0.001: n/a (needs >= 1,000 impostor pairs) (probes x "
                         "distractors)"]


def test_roc_curve_holds_only_fars_its_impostors_measure(features):
    """The ROC points (JSON and roc.png) follow the table's rule: a FAR below 1 / #impostors
    is not measured, so no TAR is given for it (900 impostor pairs: FAR >= 1/900 only)."""
    probes, labels, distractors = features
    for fars, size in (((1e-3,), 10), ((1e-2,), 10), ((1e-2,), 260)):
        roc = me.megaface_evaluate(probes, labels, distractors[:size], max_rank=1, fars=fars,
                                   device="cpu", progress=False)[size]["roc"]
        impostors = len(probes) * size
        assert all(f * impostors >= 1 - 1e-9 for f in roc["far"]), (size, roc["far"])
        if fars[0] * impostors >= 1:  # a measurable FAR: the curve reaches it from 1/#impostors
            assert roc["far"][0] == pytest.approx(1 / impostors)
            assert roc["far"][-1] == pytest.approx(fars[0]) and len(roc["tar"]) == len(roc["far"])
        else:
            assert roc["far"] == [] and roc["tar"] == []


def test_verification_with_every_impostor_score_tied(monkeypatch, device):
    # unit probes with entries +-1/2 against zero distractors: every impostor scores 1/2
    monkeypatch.setattr(me, "BUFFER_MIN_ELEMENTS", 64)  # the threshold starts in chunk one
    probes = np.array([[.5, .5, .5, .5], [.5, .5, .5, -.5], [-.5, .5, .5, .5],
                       [-.5, -.5, .5, .5], [.5, -.5, -.5, .5], [.5, -.5, -.5, -.5]], np.float32)
    labels, distractors = [0, 0, 1, 1, 2, 2], np.zeros((100, 4), np.float32)
    got = me.megaface_evaluate(probes, labels, distractors, max_rank=1, fars=(0.05,),
                               device=device, progress=False)[100]["verification"][0.05]
    tar, threshold = brute_tar(probes, labels, distractors, 0.05)
    assert threshold == 0.5 and got["threshold"] == 0.5 and got["tar"] == tar == 0.0
    assert got["far_achieved"] == 0.0  # a tie at the threshold is never accepted


def test_auto_chunk_keeps_the_score_block_bounded():
    for probes, n, device_type in [(3500, 10**5, "cpu"), (3500, 10**5, "cuda"),
                                   (3500, 10**6, "cuda"), (10, 10**6, "cuda")]:
        chunk = me.auto_chunk_size(probes, n, 512, device_type)
        assert chunk % me.TILE == 0 and chunk >= me.MIN_CHUNK
        block_bytes, array_bytes = probes * chunk * 4, n * 512 * 4
        assert block_bytes <= max(array_bytes / 3, 4 * me.SCORE_BLOCK_ELEMENTS) \
            and block_bytes <= 2**30 + probes * me.TILE * 4


def test_bad_inputs_are_clear_errors(features):
    probes, labels, distractors = features
    with pytest.raises(ValueError, match="probe labels"):
        me.megaface_evaluate(probes, labels[:5], distractors)
    with pytest.raises(ValueError, match="distractor_feats"):
        me.megaface_evaluate(probes, labels, distractors[:, :3])


# ----------------------------------------------------------------------------- noise removal

def _write_tree(root, features_by_rel, suffix="_0.bin"):
    for rel, vec in features_by_rel.items():
        megaface_features.write_feature(root / (rel + suffix), vec)


def test_remove_noises_on_tiny_tree(tmp_path):
    rng = np.random.default_rng(1)
    unit = lambda v: (v / np.linalg.norm(v)).astype(np.float32)  # noqa: E731
    probes = {f"{who}/{who}_{i}.png": unit(rng.standard_normal(8))
              for who, n in (("Aaron_Eckhart", 3), ("Ben_Stiller", 2)) for i in range(n)}
    distractors = {f"375/3753@N00/41_{i}.jpg": unit(rng.standard_normal(8)) for i in range(3)}
    src, out = tmp_path / "feat", tmp_path / "clean"
    _write_tree(src / "facescrub", probes)
    _write_tree(src / "megaface", distractors)
    (tmp_path / "fs.txt").write_text("#comment line\nAaron_Eckhart_1.png\nNobody_9.png\n")
    (tmp_path / "mf.txt").write_text("#comment\n375/3753@N00/41_2.jpg\n999/x@N00/1_0.jpg\n")
    before = sorted(p.name for p in src.rglob("*.bin"))
    summary = megaface_noise.remove_noises(src, out, tmp_path / "mf.txt", tmp_path / "fs.txt",
                                           progress=False)
    assert megaface.main(["--action", "remove_noises", "--features-dir", str(src),
                          "--clean-features-dir", str(tmp_path / "clean2"), "--megaface-noises",
                          str(tmp_path / "mf.txt"), "--facescrub-noises",
                          str(tmp_path / "fs.txt")]) == 0  # the CLI writes the same tree
    assert sorted(p.name for p in (tmp_path / "clean2").rglob("*.bin")) == before
    assert sorted(p.name for p in src.rglob("*.bin")) == before  # nothing deleted
    assert sorted(p.name for p in out.rglob("*.bin")) == before  # nothing dropped
    assert summary["probes_replaced"] == 1 and summary["distractors_flagged"] == 1
    record = json.loads((out / "remove_noises.json").read_text())
    assert record["summary"] == summary and record["megaface_noises"] == str(tmp_path / "mf.txt")
    for rel, vec in distractors.items():
        got = megaface_features.read_feature(out / "megaface" / (rel + "_0.bin"))
        np.testing.assert_array_equal(got[:8], vec)
        assert got[8] == (100.0 if rel.endswith("41_2.jpg") else 0.0)
    mean = (probes["Aaron_Eckhart/Aaron_Eckhart_0.png"]
            + probes["Aaron_Eckhart/Aaron_Eckhart_2.png"]) / 2
    for rel, vec in probes.items():
        got = megaface_features.read_feature(out / "facescrub" / (rel + "_0.bin"))
        assert got.shape == (9,) and got[8] == 0.0
        if rel.endswith("Aaron_Eckhart_1.png"):
            np.testing.assert_allclose(got[:8], mean / np.linalg.norm(mean), atol=5e-3)
            assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)
            assert np.abs(got[:8] - vec).max() > 0.05  # really replaced
        else:
            np.testing.assert_array_equal(got[:8], vec)


def test_noisy_probe_is_the_sum_of_its_mates_plus_noise_as_insightface_writes_it(tmp_path):
    """InsightFace's remove_noises.py replaces a listed probe by (sum of its identity's clean
    features + U(-1e-3, 1e-3) per dimension), normalised: with 40 mates the noise moves it
    ~1e-4 off the centre's direction. Noise of that amplitude added to the MEAN (norm ~1/6
    here) would move it 40x as far."""
    rng = np.random.default_rng(5)
    dim, mates = 8, 40
    unit = lambda v: (v / np.linalg.norm(v)).astype(np.float32)  # noqa: E731
    probes = {f"Ann/Ann_{i}.png": unit(rng.standard_normal(dim)) for i in range(mates + 1)}
    src = tmp_path / "feat"
    _write_tree(src / "facescrub", probes)
    _write_tree(src / "megaface", {"1/u@N00/1_0.jpg": unit(rng.standard_normal(dim))})
    (tmp_path / "fs.txt").write_text("Ann_0.png\n")
    (tmp_path / "mf.txt").write_text("9/x@N00/9_0.jpg\n")
    megaface_noise.remove_noises(src, tmp_path / "clean", tmp_path / "mf.txt",
                                 tmp_path / "fs.txt", progress=False)
    got = megaface_features.read_feature(tmp_path / "clean/facescrub/Ann/Ann_0.png_0.bin")
    total = np.sum([np.float64(v) for k, v in probes.items() if k != "Ann/Ann_0.png"], axis=0)
    # the reference's bound, in float64: |u| <= 1e-3 * sqrt(dim) moves f/|f| by at most
    # 2|u|/|sum| (and the extra dimension stays 0)
    bound = 2 * 1e-3 * np.sqrt(dim) / np.linalg.norm(total)
    assert np.linalg.norm(got[:dim] - total / np.linalg.norm(total)) <= bound + 1e-6
    assert got[dim] == 0.0 and np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)


def test_flagged_distractor_cannot_outrank_anything(features):
    probes, labels, distractors = features
    ext = lambda x, v: np.hstack([x, np.full((len(x), 1), v, np.float32)])  # noqa: E731
    flagged = ext(probes[:20], 100.0)  # copies of probes: without the flag they would win
    assert me.megaface_identification(ext(probes, 0.0), labels, flagged, ranks=(1,),
                                      device="cpu") == {1: 1.0}


def test_parse_noise_list_formats(tmp_path):
    (tmp_path / "mf.txt").write_text("#c\n\n3/1@N0/7_0.jpg\nx\t/abs/root/4/2@N0/8_1.jpg\n")
    assert megaface_noise.parse_noise_list(tmp_path / "mf.txt", "megaface") == \
        {"3/1@N0/7_0.jpg", "4/2@N0/8_1.jpg"}
    (tmp_path / "fs.txt").write_text("#c\nAdam McKay_468.png\n")
    assert megaface_noise.parse_noise_list(tmp_path / "fs.txt", "facescrub") == \
        {"Adam_McKay_468.png"}


# ----------------------------------------------------------------------------- CLI

def _evaluate_tree(tmp_path, features):
    probes, labels, distractors = features
    root = tmp_path / "feat"
    _write_tree(root / "facescrub", {f"id{labels[i]}/id{labels[i]}_{i}.png": v
                                     for i, v in enumerate(probes)})
    _write_tree(root / "megaface", {f"{i % 7}/u{i % 3}@N00/{i:04d}_0.jpg": v
                                    for i, v in enumerate(distractors)})
    order = sorted(range(len(distractors)), key=lambda i: f"{i % 7}/u{i % 3}@N00/{i:04d}_0.jpg")
    return root, order


def test_evaluate_cli_writes_json_and_pngs(tmp_path, features, device):
    probes, labels, distractors = features
    root, order = _evaluate_tree(tmp_path, features)
    out = tmp_path / "results"
    assert megaface.main(["--action", "evaluate", "--features-dir", str(root), "--results-dir",
                          str(out), "--sizes", "10", "100", "--fars", "1e-3", "--device",
                          device, "--chunk-size", "40"]) == 0
    report = json.loads((out / "megaface_results.json").read_text())
    assert report["num_probes"] == len(probes) and report["protocol"]["subset"] == "first"
    walked = distractors[order]  # the tree walk's (sorted) order: the first N of it
    for n in (10, 100):
        np.testing.assert_allclose(report["sizes"][str(n)]["cmc"],
                                   brute_cmc(probes, labels, walked[:n], 10), atol=1e-12)
    assert report["sizes"]["100"]["verification"]["0.001"]["tar"] == pytest.approx(
        brute_tar(probes, labels, walked[:100], 1e-3)[0], abs=1e-12)
    for png in ("cmc.png", "rank1_vs_distractors.png", "roc.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_evaluate_without_fars_leaves_no_roc_of_an_earlier_run(tmp_path, features):
    """Evaluate with --fars, then again without into the same --results-dir: the first run's
    roc.png must not stay beside the second run's results (which have no verification)."""
    root, _ = _evaluate_tree(tmp_path, features)
    argv = ["--action", "evaluate", "--features-dir", str(root), "--results-dir",
            str(tmp_path / "r"), "--sizes", "100", "--device", "cpu", "--fars"]
    assert megaface.main(argv + ["1e-2"]) == 0 and (tmp_path / "r" / "roc.png").is_file()
    assert megaface.main(argv) == 0
    report = json.loads((tmp_path / "r" / "megaface_results.json").read_text())
    assert report["sizes"]["100"]["verification"] == {} and "roc" not in report["sizes"]["100"]
    assert not (tmp_path / "r" / "roc.png").exists()


def test_evaluate_cli_uses_devkit_lists(tmp_path, features):
    probes, labels, distractors = features
    root, order = _evaluate_tree(tmp_path, features)
    lists = tmp_path / "templatelists"
    lists.mkdir()
    probe_paths = [f"id{lab}/id{lab}_{i}.png" for i, lab in enumerate(labels)]
    (lists / "facescrub_features_list.json").write_text(json.dumps(
        {"path": probe_paths, "id": [f"person{lab}" for lab in labels]}))
    chosen = [5, 17, 3, 99, 250, 42, 8, 77, 120, 64]
    (lists / "megaface_features_list.json_10_1").write_text(json.dumps(
        {"path": [f"{i % 7}/u{i % 3}@N00/{i:04d}_0.jpg" for i in chosen]}))
    out = tmp_path / "results"
    megaface.main(["--action", "evaluate", "--features-dir", str(root), "--results-dir",
                   str(out), "--templatelists", str(lists), "--fars", "--device", "cpu"])
    report = json.loads((out / "megaface_results.json").read_text())
    assert report["protocol"]["subset"] == "devkit" and list(report["sizes"]) == ["10"]
    np.testing.assert_allclose(report["sizes"]["10"]["cmc"],
                               brute_cmc(probes, labels, distractors[chosen], 10), atol=1e-12)


def test_devkit_list_none_of_whose_distractors_loaded_is_named(tmp_path, features, capsys):
    """A devkit size list none of whose files are in the tree (while another list's are):
    one error line naming the list and its size, not an array shape."""
    root, _ = _evaluate_tree(tmp_path, features)
    lists = tmp_path / "templatelists"
    lists.mkdir()
    (lists / "megaface_features_list.json_10_1").write_text(json.dumps(
        {"path": [f"9/gone@N00/{i}_0.jpg" for i in range(10)]}))
    (lists / "megaface_features_list.json_100_1").write_text(json.dumps(
        {"path": [f"{i % 7}/u{i % 3}@N00/{i:04d}_0.jpg" for i in range(100)]}))
    from utils import run_cli

    capsys.readouterr()
    assert run_cli(megaface.main, ["--action", "evaluate", "--features-dir", str(root),
                                   "--results-dir", str(tmp_path / "r"), "--templatelists",
                                   str(lists), "--sizes", "10", "100", "--fars", "--device",
                                   "cpu"]) == 1
    err = capsys.readouterr().err.split("\r")[-1].strip()  # after the progress bars
    assert err.startswith("error: ") and "\n" not in err, err
    assert "megaface_features_list.json_10_1" in err and "none of its 10" in err, err


def test_cli_names_missing_arguments(capsys):
    """One line ``error: ...`` as every other bad input (a bare SystemExit printed no prefix)."""
    assert _cli_error(capsys, ["--action", "devkit"]) == \
        "error: --action devkit needs --devkit-dir"
    assert _cli_error(capsys, ["--action", "remove_noises"]) == \
        "error: --action remove_noises needs --megaface-noises, --facescrub-noises"
    assert _cli_error(capsys, ["--action", "crop_megaface"]) == \
        "error: --action crop_megaface needs --megaface-images and/or --facescrub-images"


def test_devkit_action_prints_and_runs_the_command(tmp_path, capsys):
    devkit = tmp_path / "devkit"
    (devkit / "experiments").mkdir(parents=True)
    (devkit / "experiments" / "run_experiment.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open('called.json', 'w'))\n")
    for name in ("megaface", "facescrub"):
        (tmp_path / "feat" / name).mkdir(parents=True)
    argv = ["--action", "devkit", "--devkit-dir", str(devkit), "--features-dir",
            str(tmp_path / "feat"), "--results-dir", str(tmp_path / "res"), "--sizes", "10",
            "1000000", "--devkit-python", sys.executable]
    assert megaface.main(argv + ["--run"]) == 0
    printed = capsys.readouterr().out
    assert f"cd {devkit.resolve() / 'experiments'} && " in printed
    called = json.loads((devkit / "experiments" / "called.json").read_text())
    assert called["argv"] == [
        str((tmp_path / "feat" / "megaface").resolve()),
        str((tmp_path / "feat" / "facescrub").resolve()), "_0.bin",
        str((tmp_path / "res").resolve()), "-s", "10", "1000000", "-p",
        str(devkit.resolve() / "templatelists" / "facescrub_features_list.json")]


# ----------------------------------------------------------------------------- crop / features

class _FakeAligner:
    """Stands in for MTCNN: no face in images whose top-left pixel is 0; records hints."""
    batch_size = 4

    def __init__(self):
        self.hints = []

    def align_batch(self, images, hint_box=None):
        from faces.aligner import AlignedFace

        self.hints += list(hint_box)
        return [None if im[0, 0, 0] == 0 else AlignedFace(
            crop=np.full((112, 112, 3), 200, np.uint8), box=np.zeros(4),
            landmarks=np.zeros((5, 2)), score=0.99) for im in images]


def test_crop_tree_uses_json_box_lists_faceless_and_resumes(tmp_path):
    from utils import write_image

    src, dst = tmp_path / "raw", tmp_path / "aligned"
    write_image(src / "1/a@N00/1_0.jpg", np.full((60, 80, 3), 90, np.uint8))
    write_image(src / "1/a@N00/2_0.jpg", np.zeros((60, 80, 3), np.uint8))
    (src / "1/a@N00/1_0.jpg.json").write_text(json.dumps(
        {"bounding_box": {"x": 10, "y": 5, "width": 30, "height": 40}}))
    (src / "1/a@N00/3_0.jpg").write_bytes(b"not an image")
    aligner = _FakeAligner()
    summary = megaface.crop_tree(aligner, src, dst, progress=False)
    assert summary == {"images": 3, "skipped_existing": 0, "aligned": 1, "faceless": 1,
                       "unreadable": 1, "with_box": 1}
    assert (10.0, 5.0, 40.0, 45.0) in aligner.hints
    assert (dst / "faceless.txt").read_text().split() == ["1/a@N00/2_0.jpg"]
    assert "3_0.jpg" in (dst / "unreadable.txt").read_text()
    again = megaface.crop_tree(_FakeAligner(), src, dst, progress=False)
    assert again["skipped_existing"] == 2 and again["aligned"] == 0
    assert (dst / "faceless.txt").read_text().count("2_0.jpg") == 1


def test_crops_record_their_source_and_are_never_mixed(tmp_path):
    """crop_megaface into a tree of another raw tree's crops resumed over them (two sources'
    crops in one tree), and the crops recorded nothing of where they came from."""
    from utils import ProvenanceError, write_image

    first, second, dst = tmp_path / "raw1", tmp_path / "raw2", tmp_path / "aligned"
    for src in (first, second):
        write_image(src / "1/a@N00/1_0.jpg", np.full((60, 80, 3), 90, np.uint8))
    megaface.crop_tree(_FakeAligner(), first, dst, progress=False)
    record = json.loads((dst / "crops_source.json").read_text())
    assert record["source"] == str(first.resolve()) and record["aligner"] == "_FakeAligner"
    write_image(second / "1/a@N00/2_0.jpg", np.full((60, 80, 3), 90, np.uint8))
    with pytest.raises(ProvenanceError) as e:
        megaface.crop_tree(_FakeAligner(), second, dst, progress=False)
    assert str(dst) in str(e.value) and str(first.resolve()) in str(e.value)
    assert str(second.resolve()) in str(e.value) and not (dst / "1/a@N00/2_0.jpg").exists()
    other = _FakeAligner()
    other.refine_steps = 0  # another aligner setting: crops that would not match
    with pytest.raises(ProvenanceError, match="other aligner settings"):
        megaface.crop_tree(other, first, dst, progress=False)
    (dst / "crops_source.json").unlink()  # crops that do not say where they came from
    with pytest.raises(ProvenanceError, match="do not record what they came from"):
        megaface.crop_tree(_FakeAligner(), first, dst, progress=False)


def test_features_of_crops_remade_from_another_source_are_refused(tmp_path):
    """The aligned folder re-cropped from another raw tree kept its path: gen_features
    resumed into features of the old crops (written=0)."""
    from utils import ProvenanceError, write_image

    raw, dst = tmp_path / "raw", tmp_path / "aligned"
    write_image(raw / "1/a@N00/1_0.jpg", np.full((60, 80, 3), 90, np.uint8))
    megaface.crop_tree(_FakeAligner(), raw, dst, progress=False)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(16), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 49, 8))
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    features = tmp_path / "features"
    kwargs = dict(device="cpu", progress=False, checkpoint=ckpt)
    assert megaface.gen_features(model, dst, features, **kwargs)["written"] == 1
    saved = json.loads((features / "features_source.json").read_text())
    assert saved["crops"]["source"] == str(raw.resolve())
    import shutil

    shutil.rmtree(dst)
    shutil.copytree(raw, tmp_path / "raw2")
    megaface.crop_tree(_FakeAligner(), tmp_path / "raw2", dst, progress=False)
    with pytest.raises(ProvenanceError) as e:
        megaface.gen_features(model, dst, features, **kwargs)
    assert str(features) in str(e.value) and str((tmp_path / "raw2").resolve()) in str(e.value)


def test_gen_features_writes_unit_devkit_files_and_resumes(tmp_path):
    from utils import write_image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 112, 112, 3), dtype=np.uint8)
    for i in range(3):
        write_image(tmp_path / "al" / f"p/x{i}.png", images[i])  # PNG: read back exactly
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(16), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 49, 8))
    summary = megaface.gen_features(model, tmp_path / "al", tmp_path / "f", batch_size=2,
                                    device="cpu", progress=False)
    assert summary["written"] == 3
    # the same net written out in float64 numpy: 16x16 means (C, H, W order), then the
    # linear layer, on the image and its mirror; summed and L2-normalised
    weight = model[2].weight.detach().double().numpy()
    bias = model[2].bias.detach().double().numpy()

    def net(x):
        pooled = x.reshape(7, 16, 7, 16, 3).mean(axis=(1, 3)).transpose(2, 0, 1).reshape(-1)
        return weight @ pooled + bias

    for i in range(3):
        vec = megaface_features.read_feature(tmp_path / "f" / f"p/x{i}.png_0.bin")
        x = (images[i].astype(np.float64) - 127.5) / 127.5
        want = net(x) + net(x[:, ::-1])
        np.testing.assert_allclose(vec, want / np.linalg.norm(want), atol=1e-5)
        assert vec.shape == (8,) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    assert megaface.gen_features(model, tmp_path / "al", tmp_path / "f", progress=False,
                                 device="cpu")["skipped_existing"] == 3


def test_read_bbox_json_missing_and_malformed(tmp_path):
    img = tmp_path / "x.jpg"
    assert megaface.read_bbox_json(img) is None
    (tmp_path / "x.jpg.json").write_text("{broken")
    assert megaface.read_bbox_json(img) is None
    Path(tmp_path / "x.jpg.json").write_text(json.dumps(
        {"bounding_box": {"x": 1, "y": 2, "width": 3, "height": 4}}))
    assert megaface.read_bbox_json(img) == (1.0, 2.0, 4.0, 6.0)


# ----------------------------------------------------------------------------- bad features

def _raw_feature(path, values, header=None):
    """A devkit-format file written byte by byte (write_feature refuses non-finite values)."""
    values = np.asarray(values, dtype="<f4")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<4i", *(header or (values.size, 1, 4, 5))) + values.tobytes())


def test_evaluate_skips_and_counts_bad_distractors(tmp_path, features, capsys):
    """A NaN distractor, one of another dimension and one in float64 format sort first in the
    walk; the result must be brute force on the finite, right-sized distractors alone."""
    probes, labels, distractors = features
    root, order = _evaluate_tree(tmp_path, features)
    bad = {"0/a0@N00/nan_0.jpg": "non-finite", "0/a1@N00/dim_0.jpg": "dims",
           "0/a2@N00/f64_0.jpg": "type=6"}
    _raw_feature(root / "megaface" / "0/a0@N00/nan_0.jpg_0.bin", [np.nan] + [0.0] * 5)
    _raw_feature(root / "megaface" / "0/a1@N00/dim_0.jpg_0.bin", np.zeros(7))
    _raw_feature(root / "megaface" / "0/a2@N00/f64_0.jpg_0.bin", np.zeros(12), (6, 1, 8, 6))
    out = tmp_path / "results"
    assert megaface.main(["--action", "evaluate", "--features-dir", str(root), "--results-dir",
                          str(out), "--sizes", "10", "100", "--fars", "1e-2", "--device",
                          "cpu"]) == 0
    report = json.loads((out / "megaface_results.json").read_text())
    walked = distractors[order]
    for n in (10, 100):
        np.testing.assert_allclose(report["sizes"][str(n)]["cmc"],
                                   brute_cmc(probes, labels, walked[:n], 10), atol=1e-12)
    assert report["sizes"]["100"]["verification"]["0.01"]["tar"] == pytest.approx(
        brute_tar(probes, labels, walked[:100], 1e-2)[0], abs=1e-12)
    assert report["num_distractors_loaded"] == len(distractors)
    assert report["skipped"]["distractors"] == 3 and report["skipped"]["probes"] == 0
    listed = report["skipped"]["distractor_files"]
    for rel, reason in bad.items():
        assert any(rel in line and reason in line for line in listed), (rel, listed)
    captured = capsys.readouterr()
    assert "3 distractor features skipped" in captured.out + captured.err


def test_evaluate_refuses_a_bad_probe(tmp_path, features):
    """A probe is never dropped quietly: its pairs define the protocol."""
    from utils import ToolkitError

    root, _ = _evaluate_tree(tmp_path, features)
    probe = root / "facescrub" / "id0/id0_zz.png_0.bin"
    _raw_feature(probe, [0.0, np.inf, 0, 0, 0, 0])
    argv = ["--action", "evaluate", "--features-dir", str(root), "--results-dir",
            str(tmp_path / "r"), "--sizes", "10", "--fars", "--device", "cpu"]
    with pytest.raises(ToolkitError, match="non-finite") as info:
        megaface.main(argv)
    assert str(probe) in str(info.value) and isinstance(info.value, ValueError)
    _raw_feature(probe, np.zeros(5))
    with pytest.raises(ToolkitError, match="5 dims, expected 6"):
        megaface.main(argv)
    assert not (tmp_path / "r" / "megaface_results.json").exists()


def test_evaluate_skips_and_counts_probes_missing_from_the_devkit_list(tmp_path, features):
    probes, labels, distractors = features
    root, order = _evaluate_tree(tmp_path, features)
    paths = [f"id{lab}/id{lab}_{i}.png" for i, lab in enumerate(labels)]
    listed = tmp_path / "facescrub_features_list.json"
    listed.write_text(json.dumps({"path": paths + ["id0/never_downloaded.png"],
                                  "id": [str(lab) for lab in labels] + ["0"]}))
    out = tmp_path / "results"
    assert megaface.main(["--action", "evaluate", "--features-dir", str(root), "--results-dir",
                          str(out), "--facescrub-list", str(listed), "--sizes", "10", "--fars",
                          "--device", "cpu"]) == 0
    report = json.loads((out / "megaface_results.json").read_text())
    assert report["skipped"]["probes"] == 1 and report["num_probes"] == len(probes)
    assert "never_downloaded.png" in report["skipped"]["probe_files"][0]
    np.testing.assert_allclose(report["sizes"]["10"]["cmc"],
                               brute_cmc(probes, labels, distractors[order][:10], 10),
                               atol=1e-12)


def test_megaface_evaluate_refuses_non_finite_features(features):
    probes, labels, distractors = features
    bad = distractors.copy()
    bad[200, 3] = np.nan
    with pytest.raises(ValueError, match="distractor 200"):
        me.megaface_evaluate(probes, labels, bad, sizes=[260], fars=(), device="cpu",
                             chunk_size=64)
    bad_probes = probes.copy()
    bad_probes[4, 0] = np.inf
    with pytest.raises(ValueError, match="probe 4"):
        me.megaface_evaluate(bad_probes, labels, distractors, device="cpu")


def test_remove_noises_skips_and_counts_bad_distractors(tmp_path):
    rng = np.random.default_rng(2)
    probes = {f"A/A_{i}.png": rng.standard_normal(4).astype(np.float32) for i in range(2)}
    good = {f"1/u@N00/{i}_0.jpg": rng.standard_normal(4).astype(np.float32) for i in range(3)}
    src = tmp_path / "feat"
    _write_tree(src / "facescrub", probes)
    _write_tree(src / "megaface", good)
    _raw_feature(src / "megaface" / "1/u@N00/nan_0.jpg_0.bin", [1, np.nan, 0, 0])
    _raw_feature(src / "megaface" / "1/u@N00/wide_0.jpg_0.bin", np.zeros(5))
    (tmp_path / "fs.txt").write_text("A_1.png\n")
    (tmp_path / "mf.txt").write_text("1/u@N00/2_0.jpg\n")
    summary = megaface_noise.remove_noises(src, tmp_path / "clean", tmp_path / "mf.txt",
                                           tmp_path / "fs.txt", progress=False)
    assert summary["distractors"] == 3 and summary["distractors_skipped"] == 2
    written = sorted(p.name for p in (tmp_path / "clean" / "megaface").rglob("*.bin"))
    assert written == sorted(rel.split("/")[-1] + "_0.bin" for rel in good)


def test_remove_noises_never_adds_to_a_clean_tree_of_another_checkpoint(tmp_path):
    """Checkpoint A's features cleaned into one folder, then checkpoint B's (fewer
    distractors) into the same one: A's leftover distractors would be scored with B's probes
    under B's record. Refused, naming both; the same checkpoint again is fine."""
    from utils import CHECKPOINT_HASH_KEY, ProvenanceError

    rng = np.random.default_rng(4)
    clean = tmp_path / "clean"
    (tmp_path / "fs.txt").write_text("A_1.png\n")
    (tmp_path / "mf.txt").write_text("1/u@N00/0_0.jpg\n")

    def features_of(name, n_distractors):
        src = tmp_path / name
        _write_tree(src / "facescrub", {f"A/A_{i}.png": rng.standard_normal(4)
                                        for i in range(3)})
        _write_tree(src / "megaface", {f"1/u@N00/{i}_0.jpg": rng.standard_normal(4)
                                       for i in range(n_distractors)})
        record = {"checkpoint": f"{name}.pt", CHECKPOINT_HASH_KEY: name * 64}
        for tree in ("facescrub", "megaface"):
            megaface_features.write_feature_source(src / tree, record)
        return src

    a, b = features_of("a", 5), features_of("b", 2)
    megaface_noise.remove_noises(a, clean, tmp_path / "mf.txt", tmp_path / "fs.txt",
                                 progress=False)
    megaface_noise.remove_noises(a, clean, tmp_path / "mf.txt", tmp_path / "fs.txt",
                                 progress=False)  # a rerun of the same features
    before = {p: p.read_bytes() for p in clean.rglob("*")if p.is_file()}
    with pytest.raises(ProvenanceError, match=r"a\.pt.*b\.pt|b\.pt.*a\.pt") as info:
        megaface_noise.remove_noises(b, clean, tmp_path / "mf.txt", tmp_path / "fs.txt",
                                     progress=False)
    assert str(clean) in str(info.value) and "\n" not in str(info.value)
    assert {p: p.read_bytes() for p in clean.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- bad inputs

def _noise_tree(tmp_path, n_probes=4, n_distractors=6):
    rng = np.random.default_rng(3)
    src = tmp_path / "feat"
    _write_tree(src / "facescrub", {f"A/A_{i}.png": rng.standard_normal(4)
                                    for i in range(n_probes)})
    _write_tree(src / "megaface", {f"1/u@N00/{i}_0.jpg": rng.standard_normal(4)
                                   for i in range(n_distractors)})
    return src


@pytest.mark.parametrize("which", ["facescrub", "megaface"])
def test_remove_noises_refuses_a_noise_list_that_names_nothing(tmp_path, monkeypatch, which):
    """Names in another convention (here: another root) must not give a 'clean' tree."""
    from utils import ToolkitError

    src = _noise_tree(tmp_path)
    monkeypatch.setattr(megaface_noise, "FACESCRUB_PROBES", 8)  # 4 entries x 4 probes / 8: 2 due
    monkeypatch.setattr(megaface_noise, "MEGAFACE_DISTRACTORS", 12)  # 4 x 6 / 12: 2 due
    fs, mf = tmp_path / "fs.txt", tmp_path / "mf.txt"
    fs.write_text("# names\n" + "".join(f"A_{i}.png\n" for i in range(4)))
    mf.write_text("".join(f"1/u@N00/{i}_0.jpg\n" for i in range(4)))
    wrong = fs if which == "facescrub" else mf
    wrong.write_text("".join(f"Zed/x@N00/Z_{i}.png\n" for i in range(4)))
    with pytest.raises(ToolkitError, match="none of its 4 entries") as info:
        megaface_noise.remove_noises(src, tmp_path / "clean", mf, fs, progress=False)
    assert str(wrong) in str(info.value) and "Z_" in str(info.value)
    assert not (tmp_path / "clean").exists()  # checked before anything is written
    # a tree too small for the list to be expected to name any of it: only a warning
    monkeypatch.setattr(megaface_noise, "FACESCRUB_PROBES", 3530)
    monkeypatch.setattr(megaface_noise, "MEGAFACE_DISTRACTORS", 10**6)
    summary = megaface_noise.remove_noises(src, tmp_path / "clean", mf, fs, progress=False)
    assert summary["probes"] == 4


def test_remove_noises_refuses_an_empty_noise_list(tmp_path):
    from utils import ToolkitError

    src = _noise_tree(tmp_path)
    (tmp_path / "fs.txt").write_text("# only a comment\n\n")
    (tmp_path / "mf.txt").write_text("1/u@N00/1_0.jpg\n")
    with pytest.raises(ToolkitError, match=r"fs\.txt: the facescrub noise list holds no entries"):
        megaface_noise.remove_noises(src, tmp_path / "c", tmp_path / "mf.txt",
                                     tmp_path / "fs.txt", progress=False)


def _cli_error(capsys, argv):
    """What a user sees: run_cli's exit code and its one line on stderr."""
    from utils import run_cli

    capsys.readouterr()
    rc = run_cli(megaface.main, argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_missing_and_empty_inputs_are_errors_naming_the_folder(tmp_path, capsys):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    for flag in ("--megaface-images", "--facescrub-images"):
        err = _cli_error(capsys, ["--action", "crop_megaface", flag, str(missing)])
        assert str(missing) in err and "not found" in err
        err = _cli_error(capsys, ["--action", "crop_megaface", flag, str(empty)])
        assert str(empty) in err and "no images" in err
    ckpt = ["--checkpoint", str(tmp_path / "backbone.pt")]
    err = _cli_error(capsys, ["--action", "gen_features", "--aligned-dir", str(missing), *ckpt])
    assert str(missing) in err
    aligned = tmp_path / "aligned"
    (aligned / "megaface").mkdir(parents=True)  # there but empty; facescrub/ absent
    err = _cli_error(capsys, ["--action", "gen_features", "--aligned-dir", str(aligned), *ckpt])
    assert str(aligned / "megaface") in err and "no images" in err
    err = _cli_error(capsys, ["--action", "evaluate", "--features-dir", str(missing)])
    assert str(missing) in err and "not found" in err
    (tmp_path / "feat" / "facescrub").mkdir(parents=True)
    (tmp_path / "feat" / "megaface").mkdir(parents=True)
    err = _cli_error(capsys, ["--action", "evaluate", "--features-dir", str(tmp_path / "feat")])
    assert str(tmp_path / "feat" / "facescrub") in err and "no feature files" in err
    err = _cli_error(capsys, ["--action", "devkit", "--devkit-dir", str(tmp_path),
                              "--features-dir", str(missing)])
    assert str(missing) in err


@pytest.fixture
def megaface_log():
    """The messages megaface's logger emits (it does not propagate to caplog); megaface_noise,
    which warns about features that are not cleaned, logs to it."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    megaface_noise.log.addHandler(handler)
    yield records
    megaface_noise.log.removeHandler(handler)


def test_crop_tree_names_its_unreadable_images_and_crops_the_others(tmp_path, megaface_log):
    from utils import write_image

    src, dst = tmp_path / "raw", tmp_path / "aligned"
    for k in range(3):
        write_image(src / f"1/a@N00/{k}_0.jpg", np.full((60, 80, 3), 90, np.uint8))
    (src / "1/a@N00/1_0.jpg").write_bytes(b"\xff\xd8 a truncated download")
    summary = megaface.crop_tree(_FakeAligner(), src, dst, progress=False)
    assert summary["aligned"] == 2 and summary["unreadable"] == 1
    assert sorted(p.name for p in dst.rglob("*.jpg")) == ["0_0.jpg", "2_0.jpg"]
    assert megaface_log == [f"1 of 3 images under {src} cannot be read (the others are "
                            f"cropped), listed in {dst / 'unreadable.txt'}: 1/a@N00/1_0.jpg"]


def test_evaluate_and_devkit_warn_on_features_that_are_not_cleaned(tmp_path, features,
                                                                   megaface_log):
    root, _ = _evaluate_tree(tmp_path, features)
    argv = ["--action", "evaluate", "--features-dir", str(root), "--results-dir",
            str(tmp_path / "r"), "--sizes", "10", "--fars", "--device", "cpu"]
    warned = lambda: any("not the noise-removed features" in m for m in megaface_log)  # noqa: E731
    assert megaface.main(argv) == 0 and warned()
    megaface_log.clear()
    (root / "remove_noises.json").write_text("{}")
    assert megaface.main(argv) == 0 and not warned()
    (root / "remove_noises.json").unlink()
    assert megaface.main(["--action", "devkit", "--devkit-dir", str(tmp_path), "--features-dir",
                          str(root)]) == 0 and warned()


def test_evaluate_warns_when_distractor_subsets_are_not_the_devkits(tmp_path, features,
                                                                  megaface_log):
    """Without the devkit's megaface_features_list.json_<N>_1 the N distractors are the first
    N of the sorted tree (one Flickr folder for small N) or a seeded draw: not the published
    protocol's sets, so the run says so; with the lists it does not."""
    probes, labels, distractors = features
    root, _ = _evaluate_tree(tmp_path, features)
    (root / "remove_noises.json").write_text("{}")  # only the subset warning is under test
    argv = ["--action", "evaluate", "--features-dir", str(root), "--results-dir",
            str(tmp_path / "r"), "--sizes", "10", "--fars", "--device", "cpu"]
    warned = lambda: [m for m in megaface_log if "--templatelists" in m]  # noqa: E731
    for subset in ("first", "random"):
        megaface_log.clear()
        assert megaface.main(argv + ["--subset", subset]) == 0
        assert len(warned()) == 1 and "not the devkit's" in warned()[0], megaface_log
    lists = tmp_path / "templatelists"
    lists.mkdir()
    (lists / "megaface_features_list.json_10_1").write_text(json.dumps(
        {"path": [f"{i % 7}/u{i % 3}@N00/{i:04d}_0.jpg" for i in range(10)]}))
    megaface_log.clear()
    assert megaface.main(argv + ["--templatelists", str(lists)]) == 0
    assert not warned(), megaface_log


def test_gen_features_refuses_non_finite_embeddings(tmp_path):
    from utils import ToolkitError, write_image

    write_image(tmp_path / "al" / "p/x0.png", np.full((112, 112, 3), 9, np.uint8))

    class NaNNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x.flatten(1)[:, :4] * self.w * float("nan")

    with pytest.raises(ToolkitError, match=r"p/x0\.png: the model gives a non-finite"):
        megaface.gen_features(NaNNet(), tmp_path / "al", tmp_path / "f", device="cpu",
                              progress=False)
    assert not list((tmp_path / "f").rglob("*.bin"))  # nothing written


def test_gen_features_refuses_a_checkpoint_with_a_nan_weight(tmp_path, capsys):
    """One NaN weight once gave a perfect rank-1; the checkpoint and tensor are named before
    any feature is written."""
    from models import build_model
    from utils import encode_image, run_cli

    image = tmp_path / "aligned" / "megaface" / "0" / "a@N00" / "x.jpg"
    image.parent.mkdir(parents=True)
    image.write_bytes(encode_image(np.full((112, 112, 3), 128, np.uint8), ".jpg"))
    state = build_model("ir_narrow", embedding_size=16).state_dict()
    state["bn1.weight"][2] = float("nan")
    checkpoint = tmp_path / "backbone.pt"
    torch.save(state, checkpoint)
    argv = ["--action", "gen_features", "--checkpoint", str(checkpoint), "--network",
            "ir_narrow", "--aligned-dir", str(tmp_path / "aligned"), "--features-dir",
            str(tmp_path / "features"), "--device", "cpu"]
    assert run_cli(megaface.main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {checkpoint}: not finite: tensor 'bn1.weight' holds 1 "
                          "NaN/inf value of its") and err.count("\n") == 1, err
    assert not (tmp_path / "features").exists()


# ----------------------------------------------------------------------------- provenance

def _backbone(folder: Path, seed: int) -> Path:
    """An ir_narrow backbone.pt of its own weights, with the config.json that names it."""
    import models

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    torch.save(models.build_model("ir_narrow", 16).state_dict(), folder / "backbone.pt")
    (folder / "config.json").write_text(json.dumps({"network": "ir_narrow",
                                                    "embedding_size": 16}))
    return folder / "backbone.pt"


def test_features_of_two_checkpoints_are_never_mixed(tmp_path, capsys):
    """gen_features into a folder of another checkpoint's features kept them (written=0),
    and evaluate then scored one model's probes against another's distractors."""
    from utils import write_image

    rng = np.random.default_rng(3)
    aligned = tmp_path / "aligned"
    for rel in ("megaface/1/a@N00/0_0.jpg", "facescrub/P/P_0.png", "facescrub/P/P_1.png"):
        write_image(aligned / rel.replace(".jpg", ".png"),
                    rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    first, second = _backbone(tmp_path / "m1", 1), _backbone(tmp_path / "m2", 2)

    def gen(ckpt, features):
        return ["--action", "gen_features", "--aligned-dir", str(aligned), "--features-dir",
                str(features), "--checkpoint", str(ckpt), "--device", "cpu", "--num-workers",
                "1"]

    assert megaface.main(gen(first, tmp_path / "f1")) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "f1").rglob("*.bin")}
    assert len(before) == 3
    err = _cli_error(capsys, gen(second, tmp_path / "f1"))
    assert str(first) in err and str(second) in err and str(tmp_path / "f1") in err
    assert {p: p.read_bytes() for p in (tmp_path / "f1").rglob("*.bin")} == before
    # the same checkpoint again resumes (nothing to redo)
    capsys.readouterr()
    assert megaface.main(gen(first, tmp_path / "f1")) == 0
    assert "written=0" in capsys.readouterr().out
    # evaluate refuses probes and distractors of two checkpoints
    assert megaface.main(gen(second, tmp_path / "f2")) == 0
    err = _cli_error(capsys, ["--action", "evaluate", "--probe-features",
                              str(tmp_path / "f1" / "facescrub"), "--distractor-features",
                              str(tmp_path / "f2" / "megaface"), "--sizes", "1", "--fars",
                              "--results-dir", str(tmp_path / "r"), "--device", "cpu"])
    assert str(first) in err and str(second) in err
    assert not (tmp_path / "r").exists()
    # remove_noises refuses such a pair too, and its clean trees keep the record
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "f1" / "facescrub", mixed / "facescrub")
    shutil.copytree(tmp_path / "f2" / "megaface", mixed / "megaface")
    (tmp_path / "fs.txt").write_text("Nobody_9.png\n")
    (tmp_path / "mf.txt").write_text("999/x@N00/1_0.jpg\n")

    def clean(features, out):
        return ["--action", "remove_noises", "--features-dir", str(features),
                "--clean-features-dir", str(out), "--megaface-noises",
                str(tmp_path / "mf.txt"), "--facescrub-noises", str(tmp_path / "fs.txt")]

    err = _cli_error(capsys, clean(mixed, tmp_path / "c1"))
    assert str(first) in err and str(second) in err and not (tmp_path / "c1").exists()
    assert megaface.main(clean(tmp_path / "f2", tmp_path / "c2")) == 0
    for tree in ("facescrub", "megaface"):
        record = json.loads((tmp_path / "c2" / tree / "features_source.json").read_text())
        assert record["checkpoint"] == str(second)
    # a folder of features that do not say where they came from is not added to
    foreign = tmp_path / "f3" / "megaface"
    _write_tree(foreign, {"1/a@N00/0_0.png": np.ones(16, np.float32) / 4})
    err = _cli_error(capsys, gen(first, tmp_path / "f3"))
    assert str(foreign) in err and "do not record the checkpoint" in err
