"""lfw_pairs.py's pairs.txt parsing; lfw_eval.py: the 10-fold protocol against a brute-force
reference, ROC metrics, safe .bin loading, flip-TTA embeddings, and the CLI on a tiny
synthetic LFW."""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from verification_testlib import brute_force_folds

import lfw_eval
from evaluation import lfw_pairs
from evaluation.bin_loader import UnsafePickleError

# ----------------------------------------------------------------------------- pairs.txt

NAMES = ["Aaron_Peirsol", "Abel_Pacheco", "Akhmed_Zakayev", "Amber_Tamblyn", "Anders_Fogh"]


def _write_pairs(path, nfolds=10, per_kind=3):
    """pairs.txt in LFW's own format, plus the (path1, path2, same) triples it encodes."""
    lines, expected = [f"{nfolds}\t{per_kind}"], []
    for fold in range(nfolds):
        for k in range(per_kind):
            name = NAMES[(fold + k) % len(NAMES)]
            i, j = k + 1, fold + k + 2
            lines.append(f"{name}\t{i}\t{j}")
            expected.append((f"{name}/{name}_{i:04d}.jpg", f"{name}/{name}_{j:04d}.jpg", True))
        for k in range(per_kind):
            a, b = NAMES[k % len(NAMES)], NAMES[(k + 1 + fold) % len(NAMES)]
            i, j = fold + 1, 10 * k + 1
            lines.append(f"{a}\t{i}\t{b}\t{j}")
            expected.append((f"{a}/{a}_{i:04d}.jpg", f"{b}/{b}_{j:04d}.jpg", False))
    path.write_text("\n".join(lines) + "\n")
    return expected


def test_parse_pairs_lfw_format(tmp_path):
    path = tmp_path / "pairs.txt"
    expected = _write_pairs(path)
    pairs = lfw_pairs.parse_pairs(path)
    assert [(p.path1, p.path2, p.same) for p in pairs] == expected
    assert pairs[0].path1 == "Aaron_Peirsol/Aaron_Peirsol_0001.jpg"
    assert path.read_text().splitlines()[11] == "Abel_Pacheco\t2\tAmber_Tamblyn\t11"
    assert pairs[10] == lfw_pairs.Pair("Abel_Pacheco/Abel_Pacheco_0002.jpg",
                                       "Amber_Tamblyn/Amber_Tamblyn_0011.jpg", False, fold=1)
    folds = lfw_pairs.pair_folds(pairs)
    assert len(folds) == 10
    assert [f.tolist() for f in folds] == [list(range(6 * k, 6 * k + 6)) for k in range(10)]


def test_parse_pairs_errors_name_the_line(tmp_path):
    path = tmp_path / "pairs.txt"
    _write_pairs(path, nfolds=2, per_kind=2)
    lines = path.read_text().splitlines()
    lines[4] = "Abel_Pacheco\t1"  # line 5 of the file: a different-person line cut short
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.txt:5:"):
        lfw_pairs.parse_pairs(path)
    lines[4] = "Abel_Pacheco\t1\tAmber_Tamblyn\tx"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.txt:5: image number 'x'"):
        lfw_pairs.parse_pairs(path)
    path.write_text("\n".join(lines[:-1]) + "\n")  # one pair missing
    with pytest.raises(ValueError, match="promises"):
        lfw_pairs.parse_pairs(path)


def test_parse_pairs_header_and_line_count_errors_name_the_line(tmp_path):
    path = tmp_path / "pairs.txt"
    _write_pairs(path, nfolds=2, per_kind=2)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:7]) + "\n")  # header promises 8 pairs, the file holds 6
    promises = r"header \(line 1\) promises 2 fold\(s\) x 2 x 2 = 8 pairs"
    with pytest.raises(lfw_pairs.PairsFileError,
                       match=r"pairs\.txt:8: .*ends after 6 pair lines.*" + promises):
        lfw_pairs.parse_pairs(path)
    path.write_text("\n".join(lines + ["Abel_Pacheco\t1\t2"]) + "\n")  # one line too many
    with pytest.raises(lfw_pairs.PairsFileError, match=r"pairs\.txt:10: 1 line.*" + promises):
        lfw_pairs.parse_pairs(path)
    lines[2] = "Abel_Pacheco 1 2 3 4 5"  # line 3: a same-person line with six fields
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(lfw_pairs.PairsFileError, match=r"pairs\.txt:3: expected a same-person"):
        lfw_pairs.parse_pairs(path)


@pytest.mark.parametrize("lines, line, field", [
    (["1\t1", "A\t1\t\u00b2", "A\t1\tB\t2"], 2, "image number '\u00b2'"),  # superscript 2
    (["1\t1", "A\t1\t2", "A\t\u0663\tB\t2"], 3, "image number '\u0663'"),  # Arabic-Indic 3
    (["\u00b9\t1", "A\t1\t2", "A\t1\tB\t2"], 1, "header"),
])
def test_parse_pairs_non_ascii_digits_are_one_line_naming_the_line(tmp_path, lines, line, field):
    """str.isdigit accepts '\u00b2' that int() refuses: a traceback, not a PairsFileError.
    LFW's numbers are ASCII digits; any other is refused naming the file and line."""
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(lfw_pairs.PairsFileError, match=rf"pairs\.txt:{line}: .*{field}"):
        lfw_pairs.parse_pairs(path)


@pytest.mark.parametrize("data, line, what", [
    (gzip.compress(b"10\t300\nA\t1\t2\n"), 1, "gzip"),
    (bytes(range(128, 256)) * 4, 1, "not UTF-8 text"),
    (b"\x00\x01\x80" * 100, 1, "NUL byte"),
    (b"2\t1\nA\t1\t2\nA\t1\tB\t\xff\n", 3, "not UTF-8 text"),
    (b"10\t300\x00\x00\n", 1, "NUL"),
])
def test_parse_pairs_binary_file_is_one_line_naming_file_and_line(tmp_path, data, line, what):
    path = tmp_path / "pairs.txt"
    path.write_bytes(data)
    with pytest.raises(lfw_pairs.PairsFileError, match=rf"pairs\.txt:{line}: .*{what}") as info:
        lfw_pairs.parse_pairs(path)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("bom, encoding", [
    (b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"),
    (b"\xff\xfe\x00\x00", "utf-32-le"),
])
def test_parse_pairs_saved_with_a_byte_order_mark(tmp_path, bom, encoding):
    path = tmp_path / "pairs.txt"
    expected = _write_pairs(path, nfolds=2, per_kind=2)
    text = path.read_text().replace("\n", "\r\n")  # as Notepad saves it
    path.write_bytes(bom + text.encode(encoding))
    pairs = lfw_pairs.parse_pairs(path)
    assert [(p.path1, p.path2, p.same) for p in pairs] == expected
    assert [p.fold for p in pairs] == [0] * 4 + [1] * 4
    path.write_bytes(b"\xff\xfe" + text.encode("utf-16-le")[:-1])  # cut mid-character
    with pytest.raises(lfw_pairs.PairsFileError, match=r"pairs\.txt: .*UTF-16-LE byte-order"):
        lfw_pairs.parse_pairs(path)


def test_check_pairs_exist_lists_every_missing_image(tmp_path):
    pairs = [lfw_pairs.Pair("A/A_0001.jpg", "A/A_0002.jpg", True),
             lfw_pairs.Pair("A/A_0001.jpg", "B/B_0001.jpg", False)]
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "A_0001.jpg").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as info:
        lfw_pairs.check_pairs_exist(pairs, tmp_path)
    assert "A/A_0002.jpg" in str(info.value) and "B/B_0001.jpg" in str(info.value)
    assert "2 of 3" in str(info.value)


# ----------------------------------------------------------------------------- 10-fold protocol

def _brute_force_ten_fold(sims, same, nfolds):
    """The protocol on contiguous folds (the first n % nfolds one pair longer), by the shared
    plain-loop reference: (mean accuracy, std, mean threshold)."""
    n = len(sims)
    sizes = [n // nfolds + (1 if f < n % nfolds else 0) for f in range(nfolds)]
    fold_of = [f for f in range(nfolds) for _ in range(sizes[f])]
    accs, thresholds = brute_force_folds(sims, same, fold_of)
    mean = sum(accs) / nfolds
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / nfolds)
    return mean, std, sum(thresholds) / nfolds


@pytest.mark.parametrize("seed,n,nfolds", [(0, 200, 10), (1, 203, 10), (2, 60, 5)])
def test_ten_fold_matches_brute_force_with_ties(seed, n, nfolds):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    # overlapping classes on a coarse grid: many ties, including ties across the classes
    sims = np.round(np.where(same, rng.normal(0.4, 0.25, n), rng.normal(0.1, 0.25, n)), 1)
    mean, std, threshold = lfw_eval.ten_fold_accuracy(sims, same, nfolds)
    ref = _brute_force_ten_fold(sims, same, nfolds)
    assert mean == pytest.approx(ref[0], abs=1e-12)
    assert std == pytest.approx(ref[1], abs=1e-12)
    assert threshold == pytest.approx(ref[2], abs=1e-12)
    assert 0.5 < mean < 1.0  # neither trivial nor broken


def test_ten_fold_edge_cases():
    same = np.array([True, False] * 50)
    mean, std, _ = lfw_eval.ten_fold_accuracy(np.where(same, 0.8, 0.2), same)
    assert (mean, std) == (1.0, 0.0)
    flat = np.full(100, 0.3)  # no decision possible: every threshold calls all pairs one way
    mean, _, _ = lfw_eval.ten_fold_accuracy(flat, same)
    assert mean == pytest.approx(0.5)
    with pytest.raises(ValueError, match="NaN"):
        lfw_eval.ten_fold_accuracy(np.array([np.nan] + [0.1] * 19), same[:20])


# ----------------------------------------------------------------------------- ROC

def test_roc_metrics_against_pairwise_definitions():
    rng = np.random.default_rng(3)
    n_imp, n_gen = 1500, 400
    same = np.concatenate([np.zeros(n_imp, bool), np.ones(n_gen, bool)])
    sims = np.round(np.where(same, rng.normal(0.5, 0.2, same.size),
                             rng.normal(0.0, 0.2, same.size)), 2)
    out = lfw_eval.roc_metrics(sims, same)
    gen, imp = sims[same], sims[~same]
    # AUC = P(genuine > impostor) + 0.5 P(tie), over all genuine x impostor pairs
    auc = ((gen[:, None] > imp[None, :]).sum() + 0.5 * (gen[:, None] == imp[None, :]).sum()) \
        / (n_gen * n_imp)
    assert out["auc"] == pytest.approx(auc, abs=1e-12)
    # TAR@FAR: the lowest threshold among all scores (and below them) with FAR <= 1e-3
    feasible = [t for t in np.unique(sims) if np.mean(imp > t) <= 1e-3]
    t = min(feasible)
    assert out["threshold@far=1e-03"] == pytest.approx(t)
    assert out["tar@far=1e-03"] == pytest.approx(np.mean(gen > t))
    assert "tar@far=1e-04" not in out  # 1,500 impostor pairs cannot measure FAR 1e-4


# ----------------------------------------------------------------------------- load_bin

def _png(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _test_images(n, size=112, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[:, :8, :8] = (255, 0, 0)  # a red corner: catches a BGR mix-up
    return images


def test_load_bin_py3_protocol2_jpeg_and_png(tmp_path):
    images = _test_images(4)
    bins = [_png(images[0]), _jpeg(images[1]), _png(images[2]), _jpeg(images[3])]
    path = tmp_path / "set.bin"
    path.write_bytes(pickle.dumps((bins, [True, False]), protocol=2))  # bytes via _codecs
    assert b"_codecs" in path.read_bytes()
    loaded, issame = lfw_eval.load_bin(path, progress=False)
    assert loaded.shape == (4, 112, 112, 3) and loaded.dtype == np.uint8
    assert issame.tolist() == [True, False]
    np.testing.assert_array_equal(loaded[0], images[0])  # PNG: lossless and RGB
    np.testing.assert_array_equal(loaded[2], images[2])
    for k in (1, 3):  # JPEG: the same pixels as PIL decodes them
        np.testing.assert_array_equal(loaded[k], np.asarray(Image.open(io.BytesIO(bins[k]))))
    assert tuple(loaded[0, 0, 0]) == (255, 0, 0)


def _py2_pickle(bins, issame):
    """What Python 2's cPickle (protocol 2) writes for (list of str, numpy bool array),
    assembled opcode by opcode: binary data as BINSTRING, numpy from numpy.core."""

    def binstring(data):
        return b"T" + struct.pack("<I", len(data)) + data

    def glob(module, name):
        return b"c" + module + b"\n" + name + b"\n"

    out = b"\x80\x02("  # PROTO 2, MARK for the outer tuple
    out += b"](" + b"".join(binstring(b) for b in bins) + b"e"  # EMPTY_LIST MARK ... APPENDS
    arr = np.asarray(issame, dtype=np.bool_)
    out += glob(b"numpy.core.multiarray", b"_reconstruct") + glob(b"numpy", b"ndarray")
    out += b"K\x00\x85" + binstring(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
    out += b"(K\x01K" + bytes([arr.size]) + b"\x85"  # state: (1, (n,), dtype, False, data)
    out += glob(b"numpy", b"dtype") + binstring(b"b1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + binstring(b"|") + b"NNNJ" + struct.pack("<i", -1) + b"J"
    out += struct.pack("<i", -1) + b"K\x00tb"  # dtype state, BUILD
    out += b"\x89" + binstring(arr.tobytes()) + b"tb"  # NEWFALSE (not Fortran), data; BUILD
    out += b"t."  # TUPLE, STOP
    return out


def test_load_bin_python2_pickle_with_numpy_labels(tmp_path):
    images = _test_images(4, size=100, seed=1)  # not 112: resized on load
    bins = [_png(im) for im in images]
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_pickle(bins, [False, True]))
    with pytest.raises(UnicodeDecodeError):  # what a plain Python 3 load does with it
        pickle.loads(path.read_bytes())
    loaded, issame = lfw_eval.load_bin(path, progress=False)
    assert issame.dtype == bool and issame.tolist() == [False, True]
    assert loaded.shape == (4, 112, 112, 3)
    big = np.asarray(Image.fromarray(images[2]).resize((112, 112), Image.BILINEAR))
    assert np.abs(loaded[2].astype(int) - big.astype(int)).mean() < 8  # same picture, resized


def test_load_bin_protocol5_numpy_entries(tmp_path):
    images = _test_images(2, seed=2)
    bins = [np.frombuffer(_png(im), dtype=np.uint8) for im in images]
    path = tmp_path / "p5.bin"
    path.write_bytes(pickle.dumps((bins, np.array([True])), protocol=5))
    loaded, issame = lfw_eval.load_bin(path, progress=False)
    np.testing.assert_array_equal(loaded, images)
    assert issame.tolist() == [True]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_bin_refuses_code_in_the_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(marker), b"x"], [True]), protocol=2))
    assert b"system" in path.read_bytes()
    with pytest.raises(UnsafePickleError, match=r"evil\.bin.*system"):
        lfw_eval.load_bin(path, progress=False)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(([_Evil(marker), b"x"], [True]), protocol=5))
    with pytest.raises(UnsafePickleError):
        lfw_eval.load_bin(path, progress=False)
    assert not marker.exists()


def test_load_bin_rejects_wrong_structure(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(([_png(_test_images(1)[0])] * 3, [True]), protocol=4))
    with pytest.raises(ValueError, match=r"odd\.bin: 3 images for 1 pairs"):
        lfw_eval.load_bin(path, progress=False)
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"odd\.bin: not a readable pickle"):
        lfw_eval.load_bin(path, progress=False)


def _valid_bin_bytes():
    images = _test_images(4, seed=6)
    return pickle.dumps(([_png(im) for im in images], [True, False]), protocol=4)


@pytest.mark.parametrize("make, what", [
    (lambda: b"", "not a readable pickle"),  # empty
    (lambda: _valid_bin_bytes()[:len(_valid_bin_bytes()) // 2], "not a readable pickle"),
    (lambda: _valid_bin_bytes()[:-1], "not a readable pickle"),  # the STOP opcode cut off
    (lambda: np.random.default_rng(0).bytes(5000), "not a readable pickle"),
    (lambda: gzip.compress(_valid_bin_bytes()), "not a readable pickle"),
    (lambda: pickle.dumps((5, [True])), "images"),  # bins is not a sequence
    (lambda: pickle.dumps(([b"x", b"y"], "yes")), "issame_list"),
    (lambda: pickle.dumps(([b"\xff\xd8 not a jpeg", b"\x89PNG?"], [True])), "2 undecodable"),
])
def test_load_bin_garbage_is_one_line_naming_the_file(tmp_path, make, what):
    from utils import ToolkitError

    path = tmp_path / "broken.bin"
    path.write_bytes(make())
    with pytest.raises(ToolkitError, match=what) as info:
        lfw_eval.load_bin(path, progress=False)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------- embed

class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 28 * 28, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _manual_embeddings(model, images, flip):
    model.eval()
    x = (images.astype(np.float64) - 127.5) / 127.5  # (N, H, W, 3)
    views = [x, x[:, :, ::-1]] if flip else [x]
    total = 0
    with torch.no_grad():
        for v in views:
            t = torch.tensor(np.ascontiguousarray(v.transpose(0, 3, 1, 2)), dtype=torch.float32)
            total = total + model(t).double().numpy()
    return total / np.linalg.norm(total, axis=1, keepdims=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_embed_flip_tta_matches_manual(channels_last):
    torch.manual_seed(0)
    model = _TinyNet()
    model.bn.running_mean.uniform_(-0.5, 0.5)  # eval-mode statistics differ from a batch's
    model.bn.running_var.uniform_(0.5, 2.0)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = _test_images(7, seed=4)
    model.train()
    got = lfw_eval.embed(model, images, batch_size=3, device="cpu", progress=False)
    assert model.training  # mode restored
    assert got.dtype == np.float32 and got.shape == (7, 8)
    ref = _manual_embeddings(model, images, flip=True)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    plain = lfw_eval.embed(model, images, batch_size=4, device="cpu", flip=False,
                           progress=False)
    np.testing.assert_allclose(plain, _manual_embeddings(model, images, flip=False), atol=2e-5)
    assert np.abs(plain - got).max() > 1e-3  # the mirror really contributes


def test_evaluate_verification_writes_json_and_pngs(tmp_path):
    torch.manual_seed(0)
    model = _TinyNet()
    images = _test_images(40, seed=5)
    images[1::4] = images[0::4]  # pairs 0, 2, 4, ...: the same image twice
    issame = np.arange(20) % 2 == 0
    r = lfw_eval.evaluate_verification(model, images, issame, batch_size=16, device="cpu",
                                       out_dir=tmp_path, name="toy", progress=False)
    assert r["accuracy"] == 1.0  # identical images score 1, distinct random ones lower
    saved = json.loads((tmp_path / "toy_results.json").read_text())
    assert saved["accuracy"] == 1.0 and saved["n_pairs"] == 20
    assert len(saved["fold_thresholds"]) == 10 and "auc" in saved
    for suffix in ("roc", "hist", "errors"):
        png = tmp_path / f"toy_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert min(Image.open(png).size) > 100


# ----------------------------------------------------------------------------- CLI end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny synthetic LFW (4 identities x 3 images, 10 folds of 1 + 1 pairs), a freshly
    built ir_narrow checkpoint with its config.json, and one run of the LFW CLI."""
    import models
    from synthetic import synthetic_faces

    root = tmp_path_factory.mktemp("cli")
    data = synthetic_faces.generate_dataset(root / "synth", train_identities=0,
                                            eval_identities=4, eval_images=3, folds=10,
                                            pairs_per_fold=1, progress=False)
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save(models.build_model("ir_narrow", 128).state_dict(), run / "backbone.pt")
    (run / "config.json").write_text(json.dumps({"network": "ir_narrow", "embedding_size": 128}))
    argv = ["--checkpoint", str(run / "backbone.pt"), "--lfw-dir", data["lfw_dir"],
            "--pairs", data["pairs"], "--device", "cpu"]
    rc = lfw_eval.main(argv)
    return {"root": root, "run": run, "lfw_dir": data["lfw_dir"], "rc": rc, "argv": argv}


def _raw_results(out: Path, tiny_run) -> Path:
    """The results file of tiny_run's raw LFW set in ``out``."""
    argv = tiny_run["argv"]
    return lfw_eval.lfw_results_path(out, tiny_run["lfw_dir"], argv[argv.index("--pairs") + 1])


def test_lfw_cli_writes_results_and_figures(tiny_run, capsys):
    assert tiny_run["rc"] == 0
    out = tiny_run["run"] / "eval"
    r = json.loads(_raw_results(out, tiny_run).read_text())
    assert r["n_pairs"] == 20 and r["nfolds"] == 10 and len(r["fold_accuracies"]) == 10
    # every fold holds one genuine and one impostor pair: its accuracy is 0, 1/2 or 1
    assert all(a in (0.0, 0.5, 1.0) for a in r["fold_accuracies"])
    assert r["accuracy"] == pytest.approx(np.mean(r["fold_accuracies"]))
    assert r["threshold"] == pytest.approx(np.mean(r["fold_thresholds"]))
    assert r["checkpoint"].endswith("backbone.pt") and r["faceless_images"] == []
    stem = _raw_results(out, tiny_run).name.removesuffix("_results.json")
    for name in (f"{stem}_roc.png", f"{stem}_hist.png", f"{stem}_errors.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    caches = list((tiny_run["root"] / "synth" / "lfw_aligned_cache").glob("aligned_*.npz"))
    assert len(caches) == 1
    with np.load(caches[0]) as cached:
        assert cached["crops"].shape == (12, 112, 112, 3)  # each distinct image aligned once
    # a second run reads the cache and reproduces the numbers
    capsys.readouterr()
    assert lfw_eval.main(tiny_run["argv"]) == 0
    printed = capsys.readouterr().out
    assert f"10-fold accuracy {100 * r['accuracy']:.2f} +- " in printed
    # 10 impostor pairs measure no TAR: the JSON and the printout say the same, no number
    assert r["not_measured"] == {"tar@far=1e-03": "n/a (needs >= 1,000 impostor pairs)",
                                 "tar@far=1e-04": "n/a (needs >= 10,000 impostor pairs)"}
    assert "  TAR@FAR=1e-03: n/a (needs >= 1,000 impostor pairs), 10 here\n" in printed
    assert "  TAR@FAR=1e-04: n/a (needs >= 10,000 impostor pairs), 10 here\n" in printed
    again = json.loads(_raw_results(out, tiny_run).read_text())
    assert again["fold_thresholds"] == pytest.approx(r["fold_thresholds"], abs=1e-6)
    # a cache cut short by a kill (empty, or half a zip) is realigned, not a traceback
    whole = caches[0].read_bytes()
    for cut in (b"", whole[:len(whole) // 2]):
        caches[0].write_bytes(cut)
        assert lfw_eval.main(tiny_run["argv"]) == 0
        redone = json.loads(_raw_results(out, tiny_run).read_text())
        assert redone["fold_thresholds"] == pytest.approx(r["fold_thresholds"], abs=1e-6)
        with np.load(caches[0]) as cached:  # rewritten whole
            assert cached["crops"].shape == (12, 112, 112, 3)


def test_lfw_cli_scores_the_pairs_whose_images_read_and_names_the_others(tiny_run, tmp_path,
                                                                         capsys):
    """One truncated jpg in the tree: refused by default (a score on fewer pairs is not the
    protocol's), one line with the count and the file; with --skip-unreadable its pairs are
    left out and listed, the rest scored."""
    import shutil

    from utils import run_cli

    lfw = tmp_path / "lfw"
    shutil.copytree(tiny_run["lfw_dir"], lfw)
    names = sorted(d.name for d in lfw.iterdir() if d.is_dir())
    a, b, c = names[:3]
    lines = ["2\t3"]
    for fold in range(2):  # per fold 3 same + 3 different pairs over 3 images per identity
        lines += [f"{a}\t{1 + fold}\t3", f"{b}\t{1 + fold}\t3", f"{c}\t1\t2"]
        lines += [f"{a}\t{1 + fold}\t{b}\t2", f"{b}\t1\t{c}\t3", f"{c}\t2\t{a}\t1"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    bad = lfw / b / f"{b}_0003.jpg"  # in one same pair of each fold, in no different pair
    bad.write_bytes(bad.read_bytes()[:200])
    argv = ["--checkpoint", str(tiny_run["run"] / "backbone.pt"), "--device", "cpu",
            "--lfw-dir", str(lfw), "--pairs", str(tmp_path / "pairs.txt"),
            "--out", str(tmp_path / "eval"), "--cache-dir", str(tmp_path / "cache")]
    rel = f"{b}/{b}_0003.jpg"
    capsys.readouterr()
    assert run_cli(lfw_eval.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: --lfw-dir ") and "1 of 9 pair images cannot be read" in err
    assert rel in err, err
    assert "--skip-unreadable" in err and not list((tmp_path / "eval").glob("*_results.json"))
    assert lfw_eval.main(argv + ["--skip-unreadable"]) == 0
    out = capsys.readouterr().out
    r = json.loads(lfw_eval.lfw_results_path(tmp_path / "eval", lfw, tmp_path / "pairs.txt")
                   .read_text())
    assert list(r["unreadable_images"]) == [rel] and rel in r["unreadable_images"][rel]
    assert r["pairs_left_out"] == 2 and r["n_pairs"] == 12 - 2
    assert r["nfolds"] == 2 and len(r["fold_accuracies"]) == 2
    assert f"  2 pairs left out: 1 of their images cannot be read ({rel})" in out
    assert not list((tmp_path / "cache").glob("*.npz"))  # an unreadable file is never cached


def test_skip_unreadable_counts_left_out_pairs_when_the_file_repeats_a_pair(tiny_run, tmp_path,
                                                                          capsys):
    """A pairs file may list one pair twice in a fold (a hand-made subset): both are scored,
    and ``pairs_left_out`` counts the lines naming an unreadable image, not lines minus the
    distinct kept pairs."""
    import shutil

    lfw = tmp_path / "lfw"
    shutil.copytree(tiny_run["lfw_dir"], lfw)
    a, b, c = sorted(d.name for d in lfw.iterdir() if d.is_dir())[:3]
    diffs = [f"{a}\t1\t{b}\t2", f"{b}\t1\t{c}\t3", f"{c}\t2\t{a}\t1"]
    lines = ["2\t3", f"{b}\t1\t3", f"{c}\t1\t2", f"{c}\t1\t2", *diffs,  # fold 1 repeats c 1 2
             f"{a}\t2\t3", f"{b}\t2\t3", f"{c}\t1\t2", *diffs]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    bad = lfw / b / f"{b}_0003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    # the truth, line by line: a pair line is left out when it names image 3 of b
    named = 0
    for line in lines[1:]:
        f = line.split("\t")
        images = [(f[0], f[1]), (f[0], f[2])] if len(f) == 3 else [(f[0], f[1]), (f[2], f[3])]
        named += (b, "3") in images
    assert named == 2
    argv = ["--checkpoint", str(tiny_run["run"] / "backbone.pt"), "--device", "cpu",
            "--lfw-dir", str(lfw), "--pairs", str(tmp_path / "pairs.txt"),
            "--out", str(tmp_path / "eval"), "--cache-dir", str(tmp_path / "cache"),
            "--skip-unreadable"]
    assert lfw_eval.main(argv) == 0
    out = capsys.readouterr().out
    r = json.loads(lfw_eval.lfw_results_path(tmp_path / "eval", lfw, tmp_path / "pairs.txt")
                   .read_text())
    assert r["n_pairs"] == 12 - named and r["pairs_left_out"] == named
    assert f"  {named} pairs left out: 1 of their images cannot be read" in out


def _compare(tiny_run, capsys, a, b, *extra):
    capsys.readouterr()
    rc = lfw_eval.main(["--checkpoint", str(tiny_run["run"] / "backbone.pt"), "--device", "cpu",
                        "--compare", str(a), str(b), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _printed_similarity(text):
    line = next(x for x in text.splitlines() if x.startswith("cosine similarity:"))
    return float(line.split(":")[1])


def test_compare_two_photos(tiny_run, capsys):
    import models
    from faces.aligner import FaceAligner
    from utils import read_image, write_image

    assert tiny_run["rc"] == 0
    lfw = tiny_run["lfw_dir"]
    names = sorted(p.name for p in Path(lfw).iterdir() if p.is_dir())
    a1, a2 = (Path(lfw) / names[0] / f"{names[0]}_{k:04d}.jpg" for k in (1, 2))
    b1 = Path(lfw) / names[1] / f"{names[1]}_0001.jpg"
    saved = _raw_results(tiny_run["run"] / "eval", tiny_run)
    threshold = json.loads(saved.read_text())["threshold"]
    model = models.load_backbone(tiny_run["run"] / "backbone.pt")
    aligner = FaceAligner(device="cpu")
    for x, y in ((a1, a2), (a1, b1)):  # one identity, then two
        rc, out, err = _compare(tiny_run, capsys, x, y)
        assert rc == 0, err
        sim = _printed_similarity(out)
        crops = np.stack([aligner.align(read_image(p)).crop for p in (x, y)])
        e = _manual_embeddings(model, crops, flip=True)
        assert sim == pytest.approx(float(e[0] @ e[1]), abs=2e-4)
        verdict = "same person" if sim > threshold else "different people"
        assert f"verdict: {verdict}" in out and f"{threshold:.4f}" in out
    # an explicit threshold decides the verdict
    rc, out, _ = _compare(tiny_run, capsys, a1, b1, "--threshold", "-1")
    assert rc == 0 and "verdict: same person" in out
    rc, out, _ = _compare(tiny_run, capsys, a1, b1, "--threshold", "1")
    assert rc == 0 and "verdict: different people" in out
    # a photo without a face is named, and the command fails
    gray = tiny_run["root"] / "gray.png"
    write_image(gray, np.full((250, 250, 3), 128, np.uint8))
    rc, out, err = _compare(tiny_run, capsys, a1, gray)
    assert rc == lfw_eval.EXIT_NO_FACE
    assert f"no face found in {gray}" in err and str(a1) not in err
    assert "verdict" not in out
    # no saved LFW threshold and none given: said clearly, non-zero exit
    rc, out, err = _compare(tiny_run, capsys, a1, a2, "--out", str(tiny_run["root"] / "none"))
    assert rc == lfw_eval.EXIT_NO_THRESHOLD and "--threshold" in err


def _cli_error(argv, capsys):
    """What a user sees: run_cli's exit code and the one line on stderr."""
    from utils import run_cli

    capsys.readouterr()
    rc = run_cli(lfw_eval.main, argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1.5", "-1.01"])
def test_compare_refuses_a_threshold_outside_cosine_range(tiny_run, capsys, value):
    lfw = Path(tiny_run["lfw_dir"])
    photo = next(lfw.rglob("*.jpg"))
    err = _cli_error(["--checkpoint", str(tiny_run["run"] / "backbone.pt"), "--device", "cpu",
                      "--compare", str(photo), str(photo), f"--threshold={value}"], capsys)
    assert "--threshold" in err and "[-1, 1]" in err


def test_compare_refuses_a_non_finite_saved_threshold(tiny_run, capsys, tmp_path):
    (tmp_path / "lfw_results.json").write_text('{"threshold": NaN}')
    photo = next(Path(tiny_run["lfw_dir"]).rglob("*.jpg"))
    err = _cli_error(["--checkpoint", str(tiny_run["run"] / "backbone.pt"), "--device", "cpu",
                      "--compare", str(photo), str(photo), "--out", str(tmp_path)], capsys)
    assert str(tmp_path / "lfw_results.json") in err and "threshold" in err


def test_threshold_without_compare_is_refused(tiny_run, capsys):
    err = _cli_error(tiny_run["argv"] + ["--threshold", "0.3"], capsys)
    assert "--threshold" in err and "--compare" in err


def test_cli_errors_are_one_line(tiny_run, capsys, tmp_path):
    ckpt = str(tiny_run["run"] / "backbone.pt")
    err = _cli_error(["--checkpoint", str(tmp_path / "missing.pt"), "--bin",
                      str(tmp_path / "x.bin"), "--device", "cpu"], capsys)
    assert str(tmp_path / "missing.pt") in err
    (tmp_path / "empty.bin").write_bytes(b"")
    err = _cli_error(["--checkpoint", ckpt, "--bin", str(tmp_path / "empty.bin"), "--device",
                      "cpu"], capsys)
    assert str(tmp_path / "empty.bin") in err
    (tmp_path / "pairs.txt").write_bytes(gzip.compress(b"10\t300\n"))
    err = _cli_error(["--checkpoint", ckpt, "--lfw-dir", tiny_run["lfw_dir"], "--pairs",
                      str(tmp_path / "pairs.txt"), "--device", "cpu"], capsys)
    assert f"{tmp_path / 'pairs.txt'}:1:" in err
    pairs = tmp_path / "few.txt"
    pairs.write_text("2\t1\nNobody\t1\t2\nNobody\t1\tNoone\t1\n"
                     "Nobody\t1\t3\nNobody\t1\tNoone\t1\n")
    err = _cli_error(["--checkpoint", ckpt, "--lfw-dir", tiny_run["lfw_dir"], "--pairs",
                      str(pairs), "--device", "cpu"], capsys)
    assert "4 of 4 pair images missing" in err and "Nobody/Nobody_0001.jpg" in err


# ----------------------------------------------------------------------------- fold layouts

def _pairs_from_lfw(lfw_dir, header, nfolds, per_kind):
    """A pairs file over the tiny LFW's images: ``nfolds`` blocks (one when ``header`` is a
    single number) of ``per_kind`` same then ``per_kind`` different pairs."""
    names = sorted(p.name for p in Path(lfw_dir).iterdir() if p.is_dir())
    same = [(n, i, j) for n in names for i, j in ((1, 2), (1, 3), (2, 3))]
    diff = [(a, i, b, j) for k, a in enumerate(names) for b in names[k + 1:]
            for i, j in ((1, 1), (2, 3))]
    lines, labels = [header], []
    for f in range(nfolds):
        lines += ["\t".join(map(str, p)) for p in same[f * per_kind:(f + 1) * per_kind]]
        lines += ["\t".join(map(str, p)) for p in diff[f * per_kind:(f + 1) * per_kind]]
        labels += [True] * per_kind + [False] * per_kind
    return "\n".join(lines) + "\n", np.array(labels)


def _pair_similarities(tiny_run, pairs_path):
    """Each pair's cosine similarity from the cached aligned crops (embedded as the CLI does)."""
    import models

    pairs = lfw_pairs.parse_pairs(pairs_path)
    caches = list((Path(tiny_run["lfw_dir"]).parent / "lfw_aligned_cache").glob("*.npz"))
    crops = {}
    for cache in caches:
        with np.load(cache) as data:
            crops.update(zip((str(p) for p in data["paths"]), data["crops"], strict=True))
    model = models.load_backbone(tiny_run["run"] / "backbone.pt")
    images = np.stack([crops[p] for pair in pairs for p in (pair.path1, pair.path2)])
    feats = lfw_eval.embed(model, images, device="cpu", progress=False).astype(np.float64)
    return np.einsum("ij,ij->i", feats[0::2], feats[1::2])


@pytest.mark.parametrize("layout", ["two_folds", "single_set"])
def test_lfw_cli_scores_the_files_own_folds(tiny_run, capsys, tmp_path, layout):
    """A 2-fold file is scored and reported as 2 folds; a single-set file (header: one
    number, like pairsDevTest.txt) with stratified folds that each hold both kinds."""
    if layout == "two_folds":
        text, same = _pairs_from_lfw(tiny_run["lfw_dir"], "2\t4", 2, 4)
        fold_of = [0] * 8 + [1] * 8
    else:
        text, same = _pairs_from_lfw(tiny_run["lfw_dir"], "10", 1, 10)
        fold_of = [i % 10 for i in range(10)] * 2  # i-th same and i-th different: fold i % 10
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(text)
    capsys.readouterr()
    out = tmp_path / "eval"
    assert lfw_eval.main(["--checkpoint", str(tiny_run["run"] / "backbone.pt"), "--lfw-dir",
                          tiny_run["lfw_dir"], "--pairs", str(pairs), "--device", "cpu",
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(lfw_eval.lfw_results_path(out, tiny_run["lfw_dir"], pairs).read_text())
    sims = _pair_similarities(tiny_run, pairs)
    expected, _ = brute_force_folds(sims, same, fold_of)
    assert r["nfolds"] == len(expected) == len(r["fold_accuracies"])
    assert r["fold_accuracies"] == pytest.approx(expected, abs=1e-12)
    if layout == "two_folds":
        assert "2-fold accuracy" in printed and "10-fold" not in printed
        assert "2 folds of 4 same + 4 different pairs" in r["folds"]
    else:
        assert "10-fold accuracy" in printed and "stratified" in printed
        assert "single set of 10 same + 10 different pairs" in r["folds"]
        assert "stratified" in r["folds"]


def test_bin_set_ordered_same_then_different_gets_stratified_folds(tmp_path):
    """A .bin whose contiguous blocks are all-same or all-different (not InsightFace's
    layout) is scored on stratified folds, said in the results, matching brute force."""
    torch.manual_seed(0)
    model = _TinyNet()
    images = _test_images(40, seed=7)
    images[1:20:2] = images[0:20:2] + 8  # the first 10 pairs: near-identical images
    issame = np.arange(20) < 10
    r = lfw_eval.evaluate_verification(model, images, issame, device="cpu", progress=False,
                                       name="ordered")
    feats = _manual_embeddings(model, images, flip=True)
    sims = np.einsum("ij,ij->i", feats[0::2], feats[1::2])
    fold_of = [i % 10 for i in range(10)] * 2
    assert r["nfolds"] == 10 and "stratified" in r["folds"]
    assert r["fold_accuracies"] == pytest.approx(brute_force_folds(sims, issame, fold_of)[0],
                                                 abs=1e-12)


def test_compare_refuses_non_finite_embeddings(tiny_run, capsys, monkeypatch):
    """A NaN similarity is never turned into the verdict 'different people'."""
    class NaNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x.flatten(1)[:, :4] * self.w * float("nan")

    monkeypatch.setattr(lfw_eval, "_load_model", lambda args, device: NaNNet())
    names = sorted(p.name for p in Path(tiny_run["lfw_dir"]).iterdir() if p.is_dir())
    a, b = (Path(tiny_run["lfw_dir"]) / names[0] / f"{names[0]}_{k:04d}.jpg" for k in (1, 2))
    err = _cli_error(["--checkpoint", str(tiny_run["run"] / "backbone.pt"), "--device", "cpu",
                      "--compare", str(a), str(b), "--threshold", "0.3"], capsys)
    assert "non-finite" in err and "backbone.pt" in err


def test_alignment_cache_is_reused_only_by_the_same_alignment(tmp_path):
    """Crops cached by one aligner are read back by an aligner with the same settings, and
    realigned by one with other settings (another detect size, refine steps or class)."""
    from evaluation.lfw_images import load_lfw_crops
    from evaluation.lfw_pairs import Pair

    for name in ("a", "b"):
        (tmp_path / "lfw" / name).mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), 60, np.uint8)).save(
            tmp_path / "lfw" / name / f"{name}_0001.jpg")
    pairs = [Pair("a/a_0001.jpg", "b/b_0001.jpg", False)]

    class Counting:
        def __init__(self, detect_size: int, refine_steps: int = 2, rule: int = 2) -> None:
            self.detect_size, self.refine_steps, self.calls = detect_size, refine_steps, 0
            self.landmark_rule = rule  # what the refined landmarks mean (align_faces)

        def align_batch(self, images, hint_box=None):
            self.calls += 1
            return [None] * len(images)  # faceless: centre crops

    first = Counting(512)
    load_lfw_crops(tmp_path / "lfw", pairs, first, tmp_path / "cache")
    same, other_size, other_refine = Counting(512), Counting(640), Counting(512, 0)
    other_rule = Counting(512, rule=1)
    for aligner in (same, other_size, other_refine, other_rule):
        load_lfw_crops(tmp_path / "lfw", pairs, aligner, tmp_path / "cache")
    assert (first.calls, same.calls, other_size.calls, other_refine.calls,
            other_rule.calls) == (1, 0, 1, 1, 1)
    assert len(list((tmp_path / "cache").glob("aligned_*.npz"))) == 4


OVERFLOW_SCALE = 1e30  # fc weights and BN scale of this size: finite, but their product is inf


def test_cli_refuses_non_finite_weights_and_embeddings_before_scoring(tiny_run, capsys,
                                                                     tmp_path):
    """One NaN weight: the checkpoint and tensor named before any image is read. Finite
    weights whose embeddings overflow: refused with the count, nothing scored or written."""
    import shutil

    from utils import run_cli

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("eval"))
    checkpoint = run / "backbone.pt"
    argv = [*tiny_run["argv"], "--checkpoint", str(checkpoint)]  # the last one counts
    good = torch.load(checkpoint, weights_only=True)
    state = {k: v.clone() for k, v in good.items()}
    state["fc.weight"].view(-1)[3] = float("nan")
    torch.save(state, checkpoint)
    err = _cli_error(argv, capsys)
    assert err.startswith(f"error: {checkpoint}: not finite: tensor 'fc.weight' holds 1 "
                          "NaN/inf value of its"), err
    assert not (run / "eval").exists()

    state = {k: v.clone() for k, v in good.items()}
    state["fc.weight"] *= OVERFLOW_SCALE
    state["features.weight"].fill_(OVERFLOW_SCALE)
    torch.save(state, checkpoint)
    capsys.readouterr()
    assert run_cli(lfw_eval.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    found = re.search(r"lfw: (\d+) of (\d+) images have non-finite \(NaN/inf\) embeddings", err)
    assert found and found.group(1) == found.group(2) != "0", err
    assert not list((run / "eval").glob("*_results.json"))


def test_alignment_cache_of_a_read_only_lfw_goes_to_the_user_cache(tmp_path, monkeypatch,
                                                                   capsys, read_only):
    """Raw LFW on a read-only disk: the crops are cached under the user cache dir (found
    again by the next run), nothing is written beside LFW; a --cache-dir that cannot be
    written is refused before the model is loaded or any photo aligned."""
    from evaluation.lfw_images import default_cache_dir, load_lfw_crops
    from evaluation.lfw_pairs import Pair

    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / "lfw" / name).mkdir(parents=True)
        Image.fromarray(np.full((40, 40, 3), 60, np.uint8)).save(
            data / "lfw" / name / f"{name}_0001.jpg")
    pairs = [Pair("a/a_0001.jpg", "b/b_0001.jpg", False)]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    read_only(data)

    class Faceless:
        calls = 0

        def align_batch(self, images, hint_box=None):
            Faceless.calls += 1
            return [None] * len(images)

    cache_dir = default_cache_dir(data / "lfw")
    assert cache_dir.parent == tmp_path / "cache" / "arcface-toolkit"
    for _ in range(2):
        load_lfw_crops(data / "lfw", pairs, Faceless(), cache_dir)
    assert Faceless.calls == 1  # the second run read the cache
    assert sorted(p.name for p in data.iterdir()) == ["lfw"]

    (tmp_path / "pairs.txt").write_text("1\t2\na\t1\t1\nb\t1\t1\na\t1\tb\t1\nb\t1\ta\t1\n")
    (tmp_path / "ckpt.pt").write_bytes(b"never loaded")
    monkeypatch.setattr(lfw_eval, "_load_model", None)
    err = _cli_error(["--checkpoint", str(tmp_path / "ckpt.pt"), "--device", "cpu",
                      "--lfw-dir", str(data / "lfw"), "--pairs", str(tmp_path / "pairs.txt"),
                      "--cache-dir", str(data / "crops")], capsys)
    assert err == f"error: --cache-dir {data / 'crops'}: cannot write in it; name a writable folder"


# ----------------------------------------------------------------------------- provenance

BIN_PAIRS = 20  # 10 contiguous folds of one same and one different pair


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _other_checkpoint(folder: Path, seed: int) -> Path:
    """Another ir_narrow backbone.pt (other weights) with its config.json, in ``folder``."""
    import models

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(models.build_model("ir_narrow", 128).state_dict(), folder / "backbone.pt")
    (folder / "config.json").write_text(json.dumps({"network": "ir_narrow",
                                                    "embedding_size": 128}))
    return folder / "backbone.pt"


def test_lfw_results_record_the_checkpoint_and_pairs_they_came_from(tiny_run):
    assert tiny_run["rc"] == 0
    r = json.loads(_raw_results(tiny_run["run"] / "eval", tiny_run).read_text())
    pairs = tiny_run["argv"][tiny_run["argv"].index("--pairs") + 1]
    assert r["checkpoint_sha256"] == _sha256(tiny_run["run"] / "backbone.pt")
    assert r["pairs_sha256"] == _sha256(pairs) and r["pairs"] == pairs


def test_bin_results_keep_lfw_results_and_same_named_sets_apart(tiny_run, tmp_path, capsys):
    """`--bin lfw.bin` wrote eval/lfw_results.json over raw LFW's (and its threshold), and
    two sets named lfw.bin in two folders wrote one file."""
    out = tmp_path / "eval"
    out.mkdir()
    raw_path = _raw_results(out, tiny_run)
    raw = _raw_results(tiny_run["run"] / "eval", tiny_run).read_bytes()
    raw_path.write_bytes(raw)
    bins = [tmp_path / "a" / "lfw.bin", tmp_path / "b" / "lfw.bin"]
    for k, path in enumerate(bins):
        path.parent.mkdir()
        images = _test_images(2 * BIN_PAIRS, seed=20 + k)
        path.write_bytes(pickle.dumps(([_png(im) for im in images],
                                       [True, False] * (BIN_PAIRS // 2)), protocol=4))
    ckpt = tiny_run["run"] / "backbone.pt"
    assert lfw_eval.main(["--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out),
                          "--bin", str(bins[0]), "--bin", str(bins[1])]) == 0
    assert raw_path.read_bytes() == raw  # raw LFW's results untouched
    written = sorted(out.glob("*_results.json"))
    assert len(written) == 3, written
    saved = [json.loads(p.read_text()) for p in written if p != raw_path]
    assert sorted(s["bin"] for s in saved) == sorted(str(b) for b in bins)
    for s in saved:
        assert s["bin_sha256"] == _sha256(s["bin"]) and s["checkpoint_sha256"] == _sha256(ckpt)


def test_raw_lfw_results_of_two_pairs_files_stay_apart_and_compare_reads_the_named_one(
        tiny_run, tmp_path, capsys):
    """Raw LFW wrote <out>/lfw_results.json whatever the pairs file: a second pairs file's
    results replaced the first's (and the threshold --compare reads)."""
    import hashlib

    lfw = tiny_run["lfw_dir"]
    first = tiny_run["argv"][tiny_run["argv"].index("--pairs") + 1]
    second = tmp_path / "two_folds.txt"
    second.write_text(_pairs_from_lfw(lfw, "2\t4", 2, 4)[0])
    out = tmp_path / "eval"
    ckpt = str(tiny_run["run"] / "backbone.pt")
    for pairs in (first, second):
        assert lfw_eval.main(["--checkpoint", ckpt, "--lfw-dir", lfw, "--pairs", str(pairs),
                              "--device", "cpu", "--out", str(out)]) == 0

    def named(pairs) -> Path:  # lfw_ + 12 hex of sha256("<image folder>\n<pairs file>")
        key = f"{Path(lfw).resolve()}\n{Path(pairs).resolve()}".encode()
        return out / f"lfw_{hashlib.sha256(key).hexdigest()[:12]}_results.json"

    assert sorted(out.glob("*_results.json")) == sorted([named(first), named(second)])
    results = {p: json.loads(named(p).read_text()) for p in (first, second)}
    assert results[first]["n_pairs"] == 20 and results[first]["pairs"] == first
    assert results[second]["n_pairs"] == 16 and results[second]["pairs"] == str(second)
    photo = next(Path(lfw).rglob("*.jpg"))
    compare = ["--checkpoint", ckpt, "--device", "cpu", "--out", str(out), "--compare",
               str(photo), str(photo)]
    err = _cli_error(compare, capsys)  # two sets and neither named: which threshold?
    assert "LFW results of 2 pairs files" in err and str(second) in err and "--pairs" in err
    assert lfw_eval.main([*compare, "--lfw-dir", lfw, "--pairs", str(second)]) == 0
    printed = capsys.readouterr().out
    assert f"threshold: {results[second]['threshold']:.4f} (from {named(second)})" in printed


def test_compare_refuses_a_threshold_of_another_checkpoint(tiny_run, tmp_path, capsys):
    """After `train.py --overwrite` the run's eval/ kept the deleted model's threshold, and
    --compare used it."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    results = run / "eval" / "lfw_results.json"
    # under the name of versions before the set hash: still read, and checked alike
    results.write_bytes(_raw_results(tiny_run["run"] / "eval", tiny_run).read_bytes())
    ckpt = _other_checkpoint(run, seed=1)  # the run trained anew over the evaluated one
    photo = next(Path(tiny_run["lfw_dir"]).rglob("*.jpg"))
    argv = ["--checkpoint", str(ckpt), "--device", "cpu", "--compare", str(photo), str(photo)]
    err = _cli_error(argv, capsys)
    assert str(results) in err and str(ckpt) in err and "another checkpoint" in err
    # results that predate the record: unknown provenance, refused as well
    old = json.loads(results.read_text())
    del old["checkpoint_sha256"]
    results.write_text(json.dumps(old))
    err = _cli_error(argv, capsys)
    assert str(results) in err and "does not record" in err
    # an explicit threshold needs no saved one
    rc, out, _ = _compare(tiny_run | {"run": run}, capsys, photo, photo, "--threshold", "0.5")
    assert rc == 0 and "verdict: same person" in out


# ----------------------------------------------------------------------------- quality (--quality)

def _float64_norms(model, images):
    """The L2 norm of each image's own unnormalised embedding, the model run in float64 on
    (x - 127.5) / 127.5 (no mirror)."""
    reference = copy.deepcopy(model).double().eval()
    x = (images.astype(np.float64) - 127.5) / 127.5
    with torch.no_grad():
        out = reference(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    return np.linalg.norm(out.numpy(), axis=1)


def test_embed_norms_are_each_images_own_unnormalised_norm():
    torch.manual_seed(0)
    model = _TinyNet()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    images = _test_images(7, seed=8)
    default = lfw_eval.embed(model, images, batch_size=3, device="cpu", progress=False)
    assert isinstance(default, np.ndarray)  # the default return value is unchanged
    feats, norms = lfw_eval.embed(model, images, batch_size=3, device="cpu", progress=False,
                                  norms=True)
    np.testing.assert_array_equal(feats, default)
    assert norms.shape == (7,) and norms.dtype == np.float64
    ref = _float64_norms(model, images)
    np.testing.assert_allclose(norms, ref, rtol=1e-5)
    mirror = _float64_norms(model, np.ascontiguousarray(images[:, :, ::-1]))
    assert np.abs(mirror - ref).max() > 1e-3 * ref.max()  # the mirror's norm is another
    for kwargs in ({"flip": False}, {"raw_pairs": True}):  # the same, however it is embedded
        _, other = lfw_eval.embed(model, images, batch_size=4, device="cpu", progress=False,
                                  norms=True, **kwargs)
        np.testing.assert_allclose(other, ref, rtol=1e-5)
    empty, none = lfw_eval.embed(model, images[:0], device="cpu", progress=False, norms=True)
    assert empty.shape[0] == 0 and none.shape == (0,)


def _cached_crops(tiny_run):
    crops = {}
    for cache in (Path(tiny_run["lfw_dir"]).parent / "lfw_aligned_cache").glob("*.npz"):
        with np.load(cache) as data:
            crops.update(zip((str(p) for p in data["paths"]), data["crops"], strict=True))
    return crops


def test_lfw_cli_quality_records_each_images_norm(tiny_run, tmp_path, capsys):
    import models

    assert tiny_run["rc"] == 0
    plain = json.loads(_raw_results(tiny_run["run"] / "eval", tiny_run).read_text())
    assert "quality" not in plain  # without the flag the results are as before
    out = tmp_path / "eval"
    capsys.readouterr()
    assert lfw_eval.main(tiny_run["argv"] + ["--out", str(out), "--quality"]) == 0
    printed = capsys.readouterr().out
    r = json.loads(_raw_results(out, tiny_run).read_text())
    assert {k: v for k, v in r.items() if k not in ("quality", "files")} == \
        {k: v for k, v in plain.items() if k != "files"}
    crops = _cached_crops(tiny_run)
    names = sorted(crops)
    model = models.load_backbone(tiny_run["run"] / "backbone.pt")
    ref = dict(zip(names, _float64_norms(model, np.stack([crops[n] for n in names])),
                   strict=True))
    q = r["quality"]
    assert q["images"] == len(ref) == 12 and set(q["per_image"]) == set(ref)
    for name, norm in ref.items():
        assert q["per_image"][name] == pytest.approx(norm, rel=1e-5), name
    values = np.array(list(ref.values()))
    assert q["mean"] == pytest.approx(values.mean(), rel=1e-5)
    assert (q["min"], q["max"]) == pytest.approx((values.min(), values.max()), rel=1e-5)
    by_norm = sorted(ref, key=ref.get)
    assert [e["image"] for e in q["lowest"]] == by_norm[:10]
    assert "mirror" in q["measure"]
    lines = [line for line in printed.splitlines() if "quality (" in line]
    assert len(lines) == 1 and "of 12 images" in lines[0] and by_norm[0] in lines[0]


def test_bin_cli_quality_names_images_by_index(tiny_run, tmp_path, capsys):
    import models

    path = tmp_path / "set.bin"
    images = _test_images(2 * BIN_PAIRS, seed=30)
    path.write_bytes(pickle.dumps(([_png(im) for im in images],
                                   [True, False] * (BIN_PAIRS // 2)), protocol=4))
    ckpt = tiny_run["run"] / "backbone.pt"
    out = tmp_path / "eval"
    capsys.readouterr()
    assert lfw_eval.main(["--checkpoint", str(ckpt), "--device", "cpu", "--out", str(out),
                          "--bin", str(path), "--quality"]) == 0
    printed = capsys.readouterr().out
    (written,) = out.glob("set_*_results.json")
    q = json.loads(written.read_text())["quality"]
    ref = _float64_norms(models.load_backbone(ckpt), images)
    assert q["images"] == 2 * BIN_PAIRS
    np.testing.assert_allclose([q["per_image"][str(i)] for i in range(len(ref))], ref,
                               rtol=1e-5)
    lowest = np.argsort(ref)[:10].tolist()
    assert [e["image"] for e in q["lowest"]] == lowest
    lines = [line for line in printed.splitlines() if "quality (" in line]
    assert len(lines) == 1 and f"lowest: #{lowest[0]} (" in lines[0]


def test_quality_with_compare_is_refused(tiny_run, capsys):
    photo = next(Path(tiny_run["lfw_dir"]).rglob("*.jpg"))
    err = _cli_error(["--checkpoint", str(tiny_run["run"] / "backbone.pt"), "--device", "cpu",
                      "--compare", str(photo), str(photo), "--quality"], capsys)
    assert "--quality" in err and "--compare" in err
