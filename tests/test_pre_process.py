"""pre_process.py: indexing InsightFace / im2rec files, the CLI summary, and --pack."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import recordio_testlib as lib

import pre_process
from records import record_index, recordio
from utils import LOCK_SUFFIX, run_cli

ROOT = Path(__file__).resolve().parent.parent

COUNTS = (3, 5, 2, 6)


def _expected_labels(expected):
    return [cls for _, cls, _ in expected]


def test_index_insightface_set_with_and_without_idx(tmp_path):
    rec, offsets, expected = lib.build_insightface_set(tmp_path, COUNTS)
    index = record_index.index_record_file(rec, progress=False)
    assert index.has_header and index.num_classes == len(COUNTS)
    assert index.labels.dtype == np.int64
    assert index.labels.tolist() == _expected_labels(expected)
    assert index.keys.tolist() == [k for k, _, _ in expected]
    assert index.offsets.tolist() == [offsets[k] for k, _, _ in expected]
    assert index.class_counts.tolist() == list(COUNTS)
    assert index.corrupt_count == 0 and index.identity_mismatches == 0

    rec.with_suffix(".idx").unlink()  # now the file must be scanned
    scanned = record_index.index_record_file(rec, progress=False)
    assert scanned.has_header and scanned.labels.tolist() == index.labels.tolist()
    assert scanned.offsets.tolist() == index.offsets.tolist()


def test_index_im2rec_file_without_header(tmp_path):
    labels = [2, 0, 1, 2, 2, 0]
    records = []
    for n, label in enumerate(labels):
        enc = lib.jpeg_bytes(lib.textured_image(n))
        lab = float(label) if n % 2 else [float(label), 0.25]  # both label layouts
        records.append((100 + 7 * n, lib.ir_payload(lab, enc)))  # arbitrary keys
    rec = tmp_path / "plain.rec"
    offsets = lib.write_rec(rec, records)
    for use_idx in (True, False):
        if not use_idx:
            rec.with_suffix(".idx").unlink()
        index = record_index.index_record_file(rec, progress=False)
        assert not index.has_header and index.num_classes == 3
        assert index.labels.tolist() == labels
        assert index.offsets.tolist() == list(offsets.values())
        assert index.class_counts.tolist() == [2, 1, 3]
    assert index.keys.tolist() == list(range(len(labels)))  # scanned: position in the file


def test_corrupt_records_are_skipped_and_counted(tmp_path):
    rec, offsets, expected = lib.build_insightface_set(tmp_path, COUNTS)
    # damage two image records in place: a payload too short for its header, and a magic
    data = bytearray(rec.read_bytes())
    struct.pack_into("<II", data, offsets[4], lib.MAGIC, 5)  # length 5 < 24-byte IRHeader
    struct.pack_into("<I", data, offsets[9], 0xDEADBEEF)
    rec.write_bytes(bytes(data))
    index = record_index.index_record_file(rec, progress=False)
    assert index.corrupt_count == 2
    assert any("bad magic" in m and f"byte offset {offsets[9]}" in m for m in index.corrupt)
    want = [(k, c) for k, c, _ in expected if k not in (4, 9)]
    assert list(zip(index.keys.tolist(), index.labels.tolist(), strict=True)) == want
    # the saved index keeps the count and the byte offsets of the skipped records
    record_index.save_index(index)
    loaded = record_index.load_index(rec)
    assert loaded.corrupt_count == 2 and loaded.corrupt_offsets.tolist() == [offsets[4],
                                                                             offsets[9]]


def test_check_images_finds_undecodable_jpeg(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS, corrupt_jpeg_at=5)
    assert record_index.index_record_file(rec, progress=False).corrupt_count == 0
    index = record_index.index_record_file(rec, check_images=True, progress=False)
    assert index.corrupt_count == 1 and 5 not in index.keys.tolist()
    assert len(index) == len(expected) - 1


def test_cli_summary_and_saved_index(tmp_path, capsys):
    rec, offsets, expected = lib.build_insightface_set(tmp_path, COUNTS)
    assert pre_process.main(["--rec", str(rec), "--no-progress"]) == 0
    out = capsys.readouterr().out
    counts = sorted(COUNTS)
    assert f"images                       : {sum(COUNTS)}" in out
    assert f"identities                   : {len(COUNTS)}" in out
    assert f"images per identity min      : {counts[0]}" in out
    assert f"images per identity median   : {np.median(counts)}" in out
    assert f"images per identity max      : {counts[-1]}" in out
    assert "corrupt records              : 0" in out

    saved = tmp_path / "train.index.npz"
    assert saved.is_file()
    with np.load(saved) as z:
        assert z["labels"].tolist() == _expected_labels(expected)
        assert z["offsets"].tolist() == [offsets[k] for k, _, _ in expected]
        assert z["class_counts"].tolist() == list(COUNTS)
    loaded = record_index.load_index(rec)
    assert loaded is not None and loaded.labels.tolist() == _expected_labels(expected)
    # a changed .rec makes the saved index stale
    st = rec.stat()
    os.utime(rec, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert record_index.load_index(rec) is None


def test_cli_reports_missing_file(tmp_path, capsys):
    assert run_cli(pre_process.main, ["--rec", str(tmp_path / "nope.rec"), "--no-progress"]) == 1
    assert "nope.rec" in capsys.readouterr().err


def _make_tree(root):
    """identity folders (deliberately not created in sorted order) with 112x112 JPEGs and
    PNGs, one 90x100 image, one unreadable file and an empty folder."""
    tree = {}
    for name, n in (("zed", 2), ("amy", 3), ("bob", 2)):
        folder = root / name
        folder.mkdir(parents=True)
        for j in range(n):
            rgb = lib.textured_image(100 * ord(name[0]) + j)
            if j == 0:
                path = folder / f"{j}.png"
                path.write_bytes(lib.png_bytes(rgb))
            else:
                path = folder / f"{j}.jpg"
                path.write_bytes(lib.jpeg_bytes(rgb))
            tree[path] = name
    (root / "bob" / "small.jpg").write_bytes(lib.jpeg_bytes(lib.textured_image(5, 96)[:90]))
    (root / "amy" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "empty").mkdir()
    return tree


def test_pack_round_trip(tmp_path, capsys):
    src = tmp_path / "aligned"
    tree = _make_tree(src)
    out = tmp_path / "mine" / "train.rec"
    assert pre_process.main(["--pack", str(src), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "unreadable       : 1" in printed and "broken.jpg" in printed
    assert "wrong size       : 1" in printed and "small.jpg (96x90)" in printed
    assert (out.parent / "property").read_text().strip() == "3,112,112"

    # parse the result with the test's own reader: header, images, identity records
    records = lib.read_all_records(out)
    idx = [line.split("\t") for line in out.with_suffix(".idx").read_text().splitlines()]
    assert [int(o) for _, o in idx] == [o for o, _, _ in records]
    payloads = [p for _, _, p in records]
    flag, (id_start, id_end), image = lib.parse_payload(payloads[0])
    assert flag == 2 and image == b""
    id_start, id_end = int(id_start), int(id_end)
    names = ["amy", "bob", "zed"]  # sorted identity order = labels 0..2
    n_images = len(tree) + 1  # + the resized small.jpg; broken.jpg skipped
    assert (id_start, id_end) == (n_images + 1, n_images + 1 + len(names))
    sources = sorted(tree) + [src / "bob" / "small.jpg"]
    by_label: dict[int, list[bytes]] = {}
    for payload in payloads[1:id_start]:
        _, label, image = lib.parse_payload(payload)
        by_label.setdefault(int(label), []).append(image)
    for cls, name in enumerate(names):
        originals = [p for p in sources if p.parent.name == name]
        assert len(by_label[cls]) == len(originals)
        _, (start, end), _ = lib.parse_payload(payloads[id_start + cls])
        assert end - start == len(originals)
        for path in originals:
            if path.name == "small.jpg":
                continue
            data = path.read_bytes()
            if path.suffix == ".jpg":  # 112x112 JPEG: passed through byte for byte
                assert data in by_label[cls]
            else:  # PNG re-encoded as RGB-correct JPEG of the default quality 95
                want = lib.rgb_of(lib.jpeg_bytes(lib.rgb_of(data), quality=95))
                assert any(np.array_equal(lib.rgb_of(img), want) for img in by_label[cls])
    # and the packed file indexes as an InsightFace set
    index = record_index.index_record_file(out, progress=False)
    assert index.has_header and index.num_classes == 3 and index.corrupt_count == 0
    assert index.class_counts.tolist() == [3, 3, 2]


def test_pack_is_readable_without_idx(tmp_path):
    src = tmp_path / "aligned"
    _make_tree(src)
    out = tmp_path / "o" / "train.rec"
    summary = pre_process.pack_folder(src, out, progress=False)
    copy = tmp_path / "copy.rec"
    shutil.copy(out, copy)  # no .idx beside the copy: the scan must find the same images
    a = record_index.index_record_file(out, progress=False)
    b = record_index.index_record_file(copy, progress=False)
    assert summary.images == len(a) == len(b)
    assert a.labels.tolist() == b.labels.tolist() and a.offsets.tolist() == b.offsets.tolist()
    independent = {off: payload for off, _, payload in lib.read_all_records(out)}
    with recordio.RecordReader(out) as reader:
        for off in a.offsets.tolist():
            assert reader.read_at(off) == independent[off]


DAMAGE_CASES = [(how, True) for how in lib.DAMAGES] + [("truncated", False), ("garbage", False)]


@pytest.mark.parametrize("how,idx", DAMAGE_CASES)
def test_cli_refuses_a_set_that_lost_records(tmp_path, capsys, how, idx):
    rec, at, lost, surviving = lib.damaged_insightface_set(tmp_path, how, COUNTS, idx=idx)
    assert run_cli(pre_process.main, ["--rec", str(rec), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(rec) in err and f"{lost} record(s) lost or damaged" in err
    assert f"byte offset(s) {at}" in err  # the first damaged offset leads the list
    # bytes that belong to no readable record: the cut-off record's head, or the garbage
    unreadable = {"truncated": lib.TRUNCATE_AFTER, "garbage": len(lib.GARBAGE)}.get(how, 0)
    assert (f"{unreadable} byte(s) unreadable" in err) == bool(unreadable)
    identities = len({c for _, c in surviving})
    assert f"{len(surviving)} of {sum(COUNTS)} images" in err
    assert f"{identities} of {len(COUNTS)} identities" in err
    # accepted with the flag; the saved index holds exactly the surviving records
    assert pre_process.main(["--rec", str(rec), "--no-progress", "--allow-lost-records"]) == 0
    index = record_index.load_index(rec)
    assert index is not None and index.lost == lost and index.unreadable_bytes == unreadable
    assert list(zip(index.offsets.tolist(), index.labels.tolist(), strict=True)) == surviving
    # training through the saved index refuses it the same way
    import data_gen

    with pytest.raises(record_index.LostRecordsError, match=f"{lost} record"):
        data_gen.FaceRecordDataset(rec)


def test_uncovered_stretches():
    starts = np.array([40, 0, 10, 10, 12], np.int64)  # unsorted, a duplicate, one nested
    ends = np.array([50, 8, 20, 20, 16], np.int64)
    assert record_index._uncovered(starts, ends, 60) == [(8, 10), (20, 40), (50, 60)]
    assert record_index._uncovered(starts[:0], ends[:0], 60) == [(0, 60)]
    assert record_index._uncovered(np.array([0]), np.array([60]), 60) == []


def test_idx_that_misses_records_of_a_headerless_file_is_refused(tmp_path, capsys):
    labels = [0, 1, 2, 0, 1, 2]
    records = [(n, lib.ir_payload(float(c), lib.jpeg_bytes(lib.textured_image(n))))
               for n, c in enumerate(labels)]
    rec = tmp_path / "plain.rec"
    offsets = lib.write_rec(rec, records)
    idx = rec.with_suffix(".idx")
    idx.write_text("".join(f"{k}\t{offsets[k]}\n" for k in range(4)))  # last two left out
    assert run_cli(pre_process.main, ["--rec", str(rec), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(rec) in err and "2 record(s) lost or damaged" in err
    assert "unreadable" not in err  # every byte is in a readable record, listed or not
    assert f"byte offset(s) {offsets[4]}, {offsets[5]}" in err and str(idx) in err
    index = record_index.index_record_file(rec, progress=False)
    assert index.lost == 2 and index.labels.tolist() == labels[:4]


@pytest.mark.parametrize("keep", [0, 100, "half"])
def test_truncated_saved_index_is_rebuilt_with_a_warning(tmp_path, caplog, keep):
    rec, offsets, expected = lib.build_insightface_set(tmp_path, COUNTS)
    saved = record_index.save_index(record_index.index_record_file(rec, progress=False))
    data = saved.read_bytes()
    saved.write_bytes(data[:len(data) // 2 if keep == "half" else keep])
    record_index.log.addHandler(caplog.handler)  # the module's logger does not propagate
    try:
        assert record_index.load_index(rec) is None
        index = record_index.load_or_build_index(rec)
    finally:
        record_index.log.removeHandler(caplog.handler)
    assert f"cannot use index {saved}" in caplog.text and "rebuilding" in caplog.text
    assert index.offsets.tolist() == [offsets[k] for k, _, _ in expected]
    assert index.labels.tolist() == _expected_labels(expected)
    # the CLI writes a whole one again
    assert run_cli(pre_process.main, ["--rec", str(rec), "--no-progress"]) == 0
    assert record_index.load_index(rec).labels.tolist() == _expected_labels(expected)


# ----------------------------------------------------------------------------- safe --pack

def _small_tree(root, names=("amy", "bob"), per=2, seed=0):
    for n, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for j in range(per):
            rgb = lib.textured_image(seed + 10 * n + j)
            (root / name / f"{j}.jpg").write_bytes(lib.jpeg_bytes(rgb))
    return root


def _set_files(rec):
    return {p.name: p.read_bytes() for p in sorted(rec.parent.iterdir())}


def _contents(rec):
    """What a trainer reads from the set at ``rec``: labels and record payloads (the test's
    own reader finds the same payloads at those offsets)."""
    import data_gen

    ds = data_gen.FaceRecordDataset(rec, train=False)
    by_offset = {o: p for o, _, p in lib.read_all_records(rec)}
    payloads = [by_offset[o] for o in ds.offsets.tolist()]
    assert payloads == [ds.reader.read_at(o) for o in ds.offsets.tolist()]
    return ds.labels.tolist(), payloads


def test_pack_killed_midway_leaves_the_previous_set_byte_identical(tmp_path):
    out = tmp_path / "set" / "train.rec"
    pre_process.pack_folder(_small_tree(tmp_path / "old"), out, progress=False)
    before = _set_files(out)
    assert set(before) == {"train.rec", "train.idx", "train.index.npz", "property"}
    new_src = _small_tree(tmp_path / "new", ("cat", "dan", "eve"), per=3, seed=50)
    # the child kills itself with SIGKILL while decoding its 4th source image
    child = ("import os, signal, sys\n"
             "import pre_process\n"
             "real, calls = pre_process.decode_image, []\n"
             "def dying(data, source='<buffer>', out=None):\n"
             "    calls.append(source)\n"
             "    if len(calls) == 4:\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return real(data, source, out)\n"
             "pre_process.decode_image = dying\n"
             "sys.exit(pre_process.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", child, "--pack", str(new_src), "--out",
                           str(out), "--no-progress"], cwd=ROOT, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL
    # its lock file stays (the lock itself died with it: utils.claim_output)
    after = {k: v for k, v in _set_files(out).items() if not k.endswith(LOCK_SUFFIX)}
    leftovers = [name for name in after if name.endswith(".tmp")]
    assert leftovers  # it was killed in the middle of writing
    assert {k: v for k, v in after.items() if k not in leftovers} == before
    # the next pack clears what the killed one left and replaces the set
    pre_process.pack_folder(new_src, out, progress=False)
    assert sorted(_set_files(out)) == sorted(before)
    labels, _ = _contents(out)
    assert labels == [0] * 3 + [1] * 3 + [2] * 3
    assert (out.parent / "property").read_text() == "3,112,112\n"


def test_pack_failing_midway_leaves_the_previous_set_and_no_temporaries(tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "set" / "train.rec"
    pre_process.pack_folder(_small_tree(tmp_path / "old"), out, progress=False)
    before = _set_files(out)
    write = recordio.RecordWriter.write

    def failing(self, payload, key=None):
        if key == 3:
            raise OSError(28, "No space left on device")  # the disk filled up
        return write(self, payload, key)

    monkeypatch.setattr(recordio.RecordWriter, "write", failing)
    with pytest.raises(OSError, match="No space"):
        pre_process.pack_folder(_small_tree(tmp_path / "new", seed=7), out, progress=False)
    assert _set_files(out) == before


@pytest.mark.parametrize("crash_at", range(5))
def test_pack_interrupted_while_renaming_leaves_a_whole_set(tmp_path, monkeypatch, crash_at):
    """Between any two of the final renames the folder holds a set that reads back whole:
    the old one or the new one, never the new .rec through the old .idx."""
    old_src = _small_tree(tmp_path / "old", ("amy", "bob"), per=2)
    new_src = _small_tree(tmp_path / "new", ("cat", "dan", "eve"), per=3, seed=50)
    want = []
    for name, src in (("a", old_src), ("b", new_src)):
        pre_process.pack_folder(src, tmp_path / name / "train.rec", progress=False)
        want.append(_contents(tmp_path / name / "train.rec"))
    out = tmp_path / "set" / "train.rec"
    pre_process.pack_folder(old_src, out, progress=False)

    class Crash(Exception):
        pass

    replace_set = pre_process._replace_set

    def crashing(*args):
        steps = []

        def step(real):
            def call(*a, **k):
                steps.append(a)
                if len(steps) == crash_at + 1:
                    raise Crash
                return real(*a, **k)
            return call

        with monkeypatch.context() as m:
            m.setattr(os, "replace", step(os.replace))
            m.setattr(os, "unlink", step(os.unlink))
            replace_set(*args)

    monkeypatch.setattr(pre_process, "_replace_set", crashing)
    with pytest.raises(Crash):
        pre_process.pack_folder(new_src, out, progress=False)
    monkeypatch.undo()
    got = _contents(out)
    assert got in want
    index = record_index.load_or_build_index(out)
    assert index.lost == 0


def test_pack_refuses_out_inside_the_source_and_leaves_the_photo(tmp_path, capsys):
    src = _small_tree(tmp_path / "aligned")
    photo = src / "amy" / "0.jpg"
    original = photo.read_bytes()
    for out in (photo, src / "train.rec", src / "amy" / "x" / "train.rec"):
        assert run_cli(pre_process.main, ["--pack", str(src), "--out", str(out),
                                          "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert f"--out {out} is inside the folder being packed ({src})" in err
    assert photo.read_bytes() == original
    assert sorted(p.name for p in src.rglob("*")) == ["0.jpg", "0.jpg", "1.jpg", "1.jpg",
                                                       "amy", "bob"]


def test_pack_refuses_a_second_set_in_the_same_folder_but_repacks_the_same(tmp_path,
                                                                           capsys):
    out = tmp_path / "set" / "train.rec"
    src = _small_tree(tmp_path / "aligned")
    pre_process.pack_folder(src, out, progress=False)
    before = _set_files(out)
    other = out.with_name("val.rec")
    assert run_cli(pre_process.main, ["--pack", str(src), "--out", str(other),
                                      "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{out.parent} already holds another set (train.rec)" in err and "property" in err
    assert _set_files(out) == before
    # re-packing the same set in place is what --out is for
    assert run_cli(pre_process.main, ["--pack", str(src), "--out", str(out),
                                      "--no-progress"]) == 0
    assert _set_files(out)["train.rec"] == before["train.rec"]


# ----------------------------------------------------------------------------- tree depth

def _jpeg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lib.jpeg_bytes(lib.textured_image(seed)))
    return path


def _refused_pack(tmp_path, capsys, src):
    out = tmp_path / "out" / "train.rec"
    assert run_cli(pre_process.main, ["--pack", str(src), "--out", str(out),
                                      "--no-progress"]) == 1
    assert not out.parent.exists()  # nothing written
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_pack_refuses_images_in_sub_folders_of_an_identity(tmp_path, capsys):
    src = tmp_path / "aligned"
    _jpeg(src / "amy" / "0.jpg", 1)
    _jpeg(src / "bob" / "0.jpg", 2)
    deep = _jpeg(src / "bob" / "holiday" / "1.jpg", 3)  # was merged into bob silently
    err = _refused_pack(tmp_path, capsys, src)
    assert "2 image(s) at depth 2" in err and f"1 image(s) at depth 3 (e.g. {deep})" in err
    assert f"sub-folders such as {deep.parent} would be merged into identity 'bob'" in err


def test_pack_refuses_a_folder_one_level_too_high(tmp_path, capsys):
    src = tmp_path / "datasets"
    for n, (part, person) in enumerate((("setA", "amy"), ("setA", "bob"), ("setB", "cat"))):
        _jpeg(src / part / person / "0.jpg", n)  # was: setA = amy + bob as one label
    err = _refused_pack(tmp_path, capsys, src)
    assert f"3 image(s) at depth 3 (e.g. {src / 'setA' / 'amy' / '0.jpg'})" in err
    assert f"pack {src / 'setA'} instead?" in err


def test_pack_refuses_images_directly_in_the_root(tmp_path, capsys):
    src = tmp_path / "aligned"
    _jpeg(src / "amy" / "0.jpg", 1)
    loose = _jpeg(src / "stray.jpg", 2)  # was ignored with a warning
    err = _refused_pack(tmp_path, capsys, src)
    assert f"1 image(s) at depth 1 (e.g. {loose})" in err and "belong to no identity" in err
    only_loose = tmp_path / "amy_only"
    _jpeg(only_loose / "0.jpg", 3)
    err = _refused_pack(tmp_path, capsys, only_loose)
    assert f"is {only_loose} itself one identity's folder?" in err


# ----------------------------------------------------------------------------- bad paths

@pytest.mark.slow  # one subprocess per bad path
def test_cli_bad_paths_are_one_line_errors_naming_the_path(tmp_path):
    empty, folder, src = tmp_path / "empty.rec", tmp_path / "dir", tmp_path / "src"
    empty.write_bytes(b"")
    folder.mkdir()
    _jpeg(src / "amy" / "0.jpg", 1)
    garbage = tmp_path / "garbage.rec"
    garbage.write_bytes(b"not a RecordIO file at all" * 10)
    missing = tmp_path / "missing"
    cases = [(["--rec", str(tmp_path / "missing.rec")], tmp_path / "missing.rec"),
             (["--rec", str(empty)], empty),
             (["--rec", str(folder)], folder),
             (["--rec", str(garbage)], garbage),
             (["--pack", str(missing), "--out", str(tmp_path / "p" / "train.rec")], missing),
             (["--pack", str(empty), "--out", str(tmp_path / "p" / "train.rec")], empty),
             (["--pack", str(src), "--out", str(folder)], folder)]
    for args, path in cases:
        proc = subprocess.run([sys.executable, "pre_process.py", *args, "--no-progress"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.splitlines()
        errors = [ln for ln in lines if ln.startswith("error: ")]
        assert proc.returncode == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(errors) == 1, (args, proc.stderr)
        assert str(path) in errors[0], (args, errors)
    assert not (tmp_path / "p").exists() and sorted(folder.iterdir()) == []


def _headerless(tmp_path, garbage_after=None, idx=True):
    records = [(n, lib.ir_payload(float(n % 3), lib.jpeg_bytes(lib.textured_image(n))))
               for n in range(6)]
    rec = tmp_path / "plain.rec"
    return rec, lib.write_rec(rec, records, idx=idx, garbage_after=garbage_after)


def test_unaligned_garbage_without_idx_reports_the_unreadable_bytes(tmp_path, capsys):
    """A scan resynchronises only on 4-aligned magics, so after 5 stray bytes every later
    record is out of reach; the count of damaged stretches (1) understates that, the bytes
    do not."""
    rec, offsets = _headerless(tmp_path, garbage_after={1: b"12345"}, idx=False)
    assert run_cli(pre_process.main, ["--rec", str(rec), "--no-progress"]) == 1
    err = capsys.readouterr().err
    garbage_at = offsets[2] - 5  # write_rec's offsets are those of the file it wrote
    unreadable = rec.stat().st_size - garbage_at
    assert f"{rec}: 1 record(s) lost or damaged, {unreadable} byte(s) unreadable" in err
    assert f"byte offset(s) {garbage_at};" in err and "2 images of 2 identities remain" in err


def test_garbage_between_listed_records_loses_nothing_and_is_warned_about(tmp_path, caplog):
    rec, offsets = _headerless(tmp_path, garbage_after={1: lib.GARBAGE})
    index = record_index.index_record_file(rec, progress=False)
    assert index.lost == 0 and index.unreadable_bytes == len(lib.GARBAGE)
    assert index.offsets.tolist() == list(offsets.values())
    record_index.log.addHandler(caplog.handler)  # the module's logger does not propagate
    try:
        record_index.require_complete(index)
    finally:
        record_index.log.removeHandler(caplog.handler)
    assert f"{rec}: {len(lib.GARBAGE)} byte(s) between records belong to no record" \
        in caplog.text



@pytest.mark.parametrize("where", ["header", "identity"])
def test_infinite_header_or_identity_label_is_a_damaged_record(tmp_path, where):
    """A header or identity record whose label pair holds an infinity (a damaged float) is
    not a header or identity record, rather than an OverflowError out of int()."""
    rec, offsets, expected = lib.build_insightface_set(tmp_path, COUNTS)
    key = 0 if where == "header" else len(expected) + 1 + 2  # the third identity record
    data = bytearray(rec.read_bytes())
    # record head (magic, length) 8 bytes, IRHeader 24, then the float32 pair [start, end)
    struct.pack_into("<f", data, offsets[key] + 8 + 24 + 4, float("inf"))
    rec.write_bytes(bytes(data))
    index = record_index.index_record_file(rec, progress=False)
    if where == "header":  # then it reads as a headerless file: no record lacks an image
        assert not index.has_header and index.corrupt_count == 0
        assert index.non_image_records == 1 + len(COUNTS)  # header + identity records
    else:
        assert index.has_header and index.corrupt_count == 1
        assert f"identity record {key} is missing or malformed" in index.corrupt[0]
    assert index.labels.tolist() == _expected_labels(expected)


def test_pack_turns_float_and_16_bit_images_into_8_bit_ones(tmp_path):
    """A float32 TIFF ([0, 1]) and a 16-bit PNG are packed as the 8-bit pictures they show."""
    import cv2

    rng = np.random.default_rng(3)
    src = tmp_path / "aligned"
    for name in ("amy", "bob"):
        (src / name).mkdir(parents=True)
    shown = rng.integers(0, 256, (112, 112, 3)).astype(np.float64)  # what each file shows
    smooth = cv2.GaussianBlur(shown, (0, 0), 3)  # JPEG keeps smooth pictures closely
    cv2.imwrite(str(src / "amy" / "f.tif"), (smooth[..., ::-1] / 255).astype(np.float32))
    cv2.imwrite(str(src / "bob" / "d.png"), np.round(smooth[..., ::-1] * 257).astype(np.uint16))
    pre_process.pack_folder(src, tmp_path / "o" / "train.rec", progress=False)
    images = [lib.parse_payload(p)[2] for _, _, p in lib.read_all_records(tmp_path / "o" /
                                                                        "train.rec")]
    decoded = [lib.rgb_of(im).astype(np.float64) for im in images if im]
    assert len(decoded) == 2
    for rgb in decoded:  # re-encoded as JPEG (quality 95) from the right 8-bit values
        assert np.abs(rgb - np.round(smooth)).mean() < 1.0


# ----------------------------------------------------------------------------- odd but legal inputs

def test_pack_of_odd_names_and_a_symlinked_identity_lists_the_bad_file_packs_the_rest(
        tmp_path, monkeypatch):
    """A non-UTF-8 name, a 246-character name, a symlinked identity folder with a loop in
    it: the broken file is listed (its name's bytes printed as they are, even where stdout is
    strict UTF-8), the others are packed under their identity's label."""
    import io

    want = lib.make_odd_tree(tmp_path)
    src, out = tmp_path / "src", tmp_path / "set" / "train.rec"
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", errors="strict"))
    assert run_cli(pre_process.main, ["--pack", str(src), "--out", str(out),
                                      "--no-progress"]) == 0
    sys.stdout.flush()
    printed = raw.getvalue()
    broken = [rel for rel, readable in want.items() if not readable]
    assert b"unreadable       : 1 " in printed and os.fsencode(src / broken[0]) in printed
    images = [lib.parse_payload(p) for _, _, p in lib.read_all_records(out)[1:len(want)]]
    identity = {"amy": 0, "bob": 1, "cid": 2}
    assert sorted(label for _, label, _ in images) == sorted(
        identity[rel.split("/")[0]] for rel, readable in want.items() if readable)


@pytest.mark.parametrize("case", ["lst", "big label", "not images"])
def test_a_file_that_is_no_set_of_faces_is_refused_in_one_line_before_any_index(
        tmp_path, capsys, case):
    """A .lst given as --rec, a label of 16,000,000 among 6 identities, payloads that are
    text: one line naming the file (and the record), and no index written."""
    rec, named = lib.odd_record_sets(tmp_path)[case]
    before = sorted(rec.parent.iterdir())
    assert run_cli(pre_process.main, ["--rec", str(rec), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {named}"), err
    assert sorted(rec.parent.iterdir()) == before  # no .index.npz beside it


def test_index_of_a_set_in_a_read_only_folder_goes_to_the_user_cache(tmp_path, monkeypatch,
                                                                     capsys, read_only):
    rec, _, expected = lib.build_insightface_set(tmp_path / "ro", COUNTS)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    before = sorted(rec.parent.iterdir())
    read_only(rec.parent)
    assert run_cli(pre_process.main, ["--rec", str(rec), "--no-progress"]) == 0
    assert sorted(rec.parent.iterdir()) == before  # nothing written beside the set
    saved = [p for p in cache.rglob("*") if p.is_file()]
    assert [p.name for p in saved] == ["train.index.npz"]
    assert saved[0].parent.parent == cache / "arcface-toolkit"
    assert str(saved[0]) in capsys.readouterr().out  # the summary says where
    # training's loader finds it there (rather than indexing the set again)
    monkeypatch.setattr(record_index, "index_record_file", None)
    loaded = record_index.load_or_build_index(rec)
    assert loaded.labels.tolist() == _expected_labels(expected)
    # an --index-out that cannot be written is refused before the set is read
    monkeypatch.setattr(pre_process, "index_record_file", None)
    out = rec.parent / "elsewhere.index.npz"
    assert run_cli(pre_process.main, ["--rec", str(rec), "--index-out", str(out),
                                      "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --index-out {out}: cannot write in {rec.parent}; name a "
                   f"writable place with --index-out"]


def test_pack_keeps_the_identity_names_in_label_order_in_its_index(tmp_path):
    src = tmp_path / "aligned"
    _make_tree(src)
    out = tmp_path / "set" / "train.rec"
    pre_process.pack_folder(src, out, progress=False)
    index = record_index.load_index(out)
    assert index is not None and index.identities == ["amy", "bob", "zed"]  # sorted folders
    assert index.num_classes == len(index.identities)
    # an index rebuilt from the .rec alone does not know them; `--rec` re-indexing the same
    # file keeps them
    assert record_index.index_record_file(out, progress=False).identities is None
    assert pre_process.main(["--rec", str(out), "--no-progress"]) == 0
    assert record_index.load_index(out).identities == ["amy", "bob", "zed"]


def test_pack_of_a_tree_with_no_readable_image_leaves_the_previous_set(tmp_path):
    """A tree whose every image is unreadable packs no image: the run fails in one line
    naming the source, and the set already at --out stays byte for byte (it was replaced by
    an empty set before the refusal)."""
    out = tmp_path / "set" / "train.rec"
    pre_process.pack_folder(_small_tree(tmp_path / "old"), out, progress=False)
    before = _set_files(out)
    bad = tmp_path / "bad"
    for name in ("amy", "bob"):
        (bad / name).mkdir(parents=True)
        (bad / name / "0.jpg").write_bytes(b"not a photo")
    proc = subprocess.run([sys.executable, "pre_process.py", "--pack", str(bad), "--out",
                           str(out), "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: --pack {bad}: no readable image") \
        and "2 unreadable" in proc.stderr
    assert _set_files(out) == before


def test_idx_with_crlf_shuffled_lines_and_no_final_newline_indexes_the_same(tmp_path):
    """A .idx edited on Windows (CRLF), its lines out of key order, a blank line, no newline
    after the last: the same images, labels and byte offsets as the test library wrote."""
    rec, offsets, expected = lib.build_insightface_set(tmp_path, COUNTS)
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    shuffled = lines[::-1][:3] + [""] + lines[::-1][3:]
    idx.write_bytes("\r\n".join(shuffled).encode())
    index = record_index.index_record_file(rec, progress=False)
    assert index.has_header and index.lost == 0 and index.unreadable_bytes == 0
    assert index.keys.tolist() == [k for k, _, _ in expected]  # image keys 1..N in order
    assert index.offsets.tolist() == [offsets[k] for k, _, _ in expected]
    assert index.labels.tolist() == _expected_labels(expected)


@pytest.mark.parametrize("flags, named", [
    (["--pack", "SRC", "--out", "OUT", "--idx", "x.idx"], "--idx"),
    (["--pack", "SRC", "--out", "OUT", "--check-images"], "--check-images"),
    (["--rec", "REC", "--out", "OUT"], "--out"),
])
def test_a_flag_of_the_other_mode_is_refused_not_ignored(tmp_path, capsys, flags, named):
    """--pack used to ignore --idx and --check-images, and indexing ignored --out: one line
    naming the flag, before any work (nothing written)."""
    src = _small_tree(tmp_path / "aligned")
    rec = lib.build_insightface_set(tmp_path, COUNTS)[0] if "--rec" in flags else None
    paths = {"SRC": str(src), "OUT": str(tmp_path / "out" / "train.rec"), "REC": str(rec)}
    argv = [paths.get(f, f) for f in flags] + ["--no-progress"]
    assert run_cli(pre_process.main, argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {named} ") and "\n" not in err
    assert not (tmp_path / "out").exists()
