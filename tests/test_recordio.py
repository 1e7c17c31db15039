"""recordio.py against files written and parsed by the independent code in recordio_testlib."""

from __future__ import annotations

import multiprocessing
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import recordio_testlib as lib

import utils
from records import recordio

ROOT = Path(__file__).resolve().parent.parent


def _payloads():
    jpeg = lib.jpeg_bytes(lib.textured_image(1))
    return {
        0: lib.ir_payload(3.0, lib.png_bytes(lib.textured_image(0))),
        1: lib.ir_payload([4.0, 7.5, -1.0], jpeg, id_=11, id2=12),
        2: lib.ir_payload(5.0, lib.with_magic_comment(jpeg, 24)),
        3: lib.ir_payload(6.0, b"abc"),  # odd length: padding
        4: lib.ir_payload([1.0, 2.0]),  # no image (identity-style)
    }


def test_reader_reads_independently_written_records(tmp_path):
    payloads = _payloads()
    rec = tmp_path / "a.rec"
    offsets = lib.write_rec(rec, list(payloads.items()))
    # the independent writer really split record 2 into first / middle / last parts
    flags = {off: f for off, f, _ in lib.read_all_records(rec)}
    assert flags[offsets[2]] == [1, 2, 3]
    assert flags[offsets[0]] == [0]

    keys, offs = recordio.read_idx(rec.with_suffix(".idx"))
    assert keys.tolist() == list(payloads) and offs.tolist() == list(offsets.values())
    with recordio.RecordReader(rec) as reader:
        for key, payload in payloads.items():
            assert reader.read_at(offsets[key]) == payload
        scanned = [(o, p) for o, p, err in reader.scan() if err is None]
    assert scanned == [(offsets[k], p) for k, p in payloads.items()]


def test_unpack_payload_labels_and_image():
    payloads = _payloads()
    header, image = recordio.unpack_payload(payloads[1])
    assert header.flag == 3 and header.id == 11 and header.id2 == 12
    np.testing.assert_array_equal(header.label, np.array([4.0, 7.5, -1.0], np.float32))
    assert image == payloads[1][24 + 12:]
    assert recordio.first_label(header) == 4.0
    header, image = recordio.unpack_payload(payloads[3])
    assert header.flag == 0 and header.label == 6.0 and image == b"abc"
    with pytest.raises(recordio.RecordIOError, match="announces 9 labels"):
        recordio.unpack_payload(struct.pack("<IfQQ", 9, 0.0, 0, 0) + b"1234")
    with pytest.raises(recordio.RecordIOError, match="shorter"):
        recordio.unpack_payload(b"short")


def test_writer_output_parses_with_independent_reader(tmp_path):
    payloads = _payloads()
    rec = tmp_path / "w.rec"
    with recordio.RecordWriter(rec) as writer:
        offsets = {k: writer.write(p, key=k) for k, p in payloads.items()}
    assert writer.split_records == 1
    parsed = lib.read_all_records(rec)
    assert [p for _, _, p in parsed] == list(payloads.values())
    assert [o for o, _, _ in parsed] == list(offsets.values())
    assert parsed[2][1] == [1, 2, 3]  # split exactly as dmlc does
    # the .idx lines are key<TAB>offset
    lines = rec.with_suffix(".idx").read_text().splitlines()
    assert lines == [f"{k}\t{o}" for k, o in offsets.items()]
    # the payload parses with the test's own IRHeader code
    flag, label, image = lib.parse_payload(parsed[1][2])
    assert flag == 3 and label == [4.0, 7.5, -1.0]


def test_bad_magic_names_file_and_offset(tmp_path):
    rec = tmp_path / "b.rec"
    offsets = lib.write_rec(rec, list(_payloads().items()))
    reader = recordio.RecordReader(rec)
    bad = offsets[1] + 4
    with pytest.raises(recordio.RecordIOError) as err:
        reader.read_at(bad)
    assert str(rec) in str(err.value) and f"byte offset {bad}" in str(err.value)
    with pytest.raises(recordio.RecordIOError, match="truncated"):
        reader.read_at(rec.stat().st_size - 4)


def test_scan_resynchronises_after_garbage(tmp_path):
    payloads = _payloads()
    rec = tmp_path / "g.rec"
    # 12 bytes of junk (aligned) after record 0, then a stray continuation part
    stray = struct.pack("<II", lib.MAGIC, (3 << 29) | 4) + b"tail"
    offsets = lib.write_rec(rec, list(payloads.items()),
                            garbage_after={0: b"junk" * 3 + stray})
    results = list(recordio.RecordReader(rec).scan())
    errors = [(o, e) for o, p, e in results if e is not None]
    good = {o: p for o, p, e in results if e is None}
    assert len(errors) == 1 and "bad magic" in errors[0][1]
    assert good == {offsets[k]: p for k, p in payloads.items()}


def _read_in_child(reader, offset, queue):
    queue.put(reader.read_at(offset))


def test_reader_reopens_after_fork(tmp_path):
    payloads = _payloads()
    rec = tmp_path / "f.rec"
    offsets = lib.write_rec(rec, list(payloads.items()))
    reader = recordio.RecordReader(rec)
    assert reader.read_at(offsets[1]) == payloads[1]  # the parent opened its handle
    parent_fd = reader._fd
    for method in ("fork", "spawn"):
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(reader, offsets[2], queue))
        child.start()
        got = queue.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0 and got == payloads[2]
    # the parent's descriptor survived the children
    assert reader._fd == parent_fd and reader.read_at(offsets[3]) == payloads[3]


def test_reader_refuses_directory_and_empty_file(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        recordio.RecordReader(tmp_path)
    empty = tmp_path / "empty.rec"
    empty.write_bytes(b"")
    with pytest.raises(recordio.RecordIOError, match="empty file") as err:
        recordio.RecordReader(empty)
    assert str(empty) in str(err.value)
    assert isinstance(err.value, utils.ToolkitError)  # run_cli prints it as one line


def test_cli_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.rec"
    empty.write_bytes(b"")
    for path in (empty, tmp_path, tmp_path / "missing.rec"):
        proc = subprocess.run([sys.executable, "-m", "records.recordio", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: ") and str(path) in proc.stderr


@pytest.mark.parametrize("line, why", [("1\t-8", "negative"), (f"1\t{2**64}", "past"),
                                       (f"{2**63}\t0", "past")])
def test_idx_offset_out_of_range_is_one_error_naming_the_idx_line(tmp_path, line, why):
    """A .idx line whose key or offset no int64 byte offset can be (a negative offset ended
    in os.pread's bare 'Invalid argument'; 2**64 in NumPy's OverflowError) is refused naming
    the .idx and its line, as a line that is no number is."""
    rec = tmp_path / "o.rec"
    lib.write_rec(rec, list(_payloads().items()))
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    lines[1] = line
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(recordio.RecordIOError, match=why) as err:
        recordio.read_idx(idx)
    assert f"{idx}:2:" in str(err.value)
    proc = subprocess.run([sys.executable, "pre_process.py", "--rec", str(rec), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {idx}:2:" in proc.stderr


def test_idx_listing_a_key_twice_is_refused_naming_both_lines(tmp_path):
    """A .idx that lists key 2 twice (here the same line appended again) made a headerless
    set index record 2 twice: one image trained twice an epoch, without a word."""
    from records import record_index

    payloads = {k: lib.ir_payload(float(k % 2), lib.jpeg_bytes(lib.textured_image(k)))
                for k in range(4)}
    rec = tmp_path / "plain.rec"
    offsets = lib.write_rec(rec, list(payloads.items()))
    idx = rec.with_suffix(".idx")
    idx.write_text(idx.read_text() + f"2\t{offsets[2]}\n")  # line 5 repeats line 3
    with pytest.raises(recordio.RecordIOError) as err:
        record_index.index_record_file(rec, progress=False)
    assert f"{idx}:5: key 2 is listed again (first on line 3)" in str(err.value)
