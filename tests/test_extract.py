"""extract.py: unpacking, idempotence, destinations, and refusal of escaping members."""

from __future__ import annotations

import io
import random
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

import extract

FILES = {"faces_emore/train.rec": b"rec" * 100, "faces_emore/property": b"85742,112,112\n",
         "faces_emore/lfw.bin": bytes(range(256)) * 4}
LFW = {"lfw/Aaron_Eckhart/Aaron_Eckhart_0001.jpg": b"\xff\xd8 jpeg bytes",
       "lfw/Zico/Zico_0001.jpg": b"\xff\xd8 more bytes"}


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz",
              links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file() and not p.name.startswith(".extracted-")}


def test_zip_extracts_once(tmp_path):
    archive = write_zip(tmp_path / "faces_emore.zip", FILES)
    dest = tmp_path / "data"
    first = extract.extract_archive(archive, dest, progress=False)
    assert tree(dest) == FILES
    assert (first["skipped"], first["files"], first["top_level"]) == (False, 3, ["faces_emore"])
    assert first["bytes"] == sum(len(v) for v in FILES.values())
    stamp = (dest / "faces_emore" / "train.rec").stat().st_mtime_ns
    second = extract.extract_archive(archive, dest, progress=False)
    assert second["skipped"] is True and second["files"] == 3
    assert (dest / "faces_emore" / "train.rec").stat().st_mtime_ns == stamp
    # the extracted folder removed: the marker alone does not count as done
    for p in (dest / "faces_emore").iterdir():
        p.unlink()
    (dest / "faces_emore").rmdir()
    assert extract.extract_archive(archive, dest, progress=False)["skipped"] is False
    assert tree(dest) == FILES


def test_tgz_extracts_once_and_a_changed_archive_again(tmp_path):
    archive = write_tar(tmp_path / "lfw.tgz", LFW)
    dest = tmp_path / "data"
    assert extract.extract_archive(archive, dest, progress=False)["files"] == 2
    assert tree(dest) == LFW
    assert extract.extract_archive(archive, dest, progress=False)["skipped"] is True
    changed = dict(LFW, **{"lfw/Zico/Zico_0002.jpg": b"new"})
    write_tar(archive, changed)  # a re-download with different content
    assert extract.extract_archive(archive, dest, progress=False)["skipped"] is False
    assert tree(dest) == changed


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/tmp/evil_abs_member"])
def test_zip_member_escaping_is_refused(tmp_path, name):
    archive = write_zip(tmp_path / "bad.zip", {"ok/file.txt": b"fine", name: b"gotcha"})
    dest = tmp_path / "data"
    with pytest.raises(extract.UnsafeArchiveError) as err:
        extract.extract_archive(archive, dest, progress=False)
    assert "bad.zip" in str(err.value) and repr(name) in str(err.value)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil_abs_member").exists()
    assert not (dest / "ok" / "file.txt").exists()  # zips are checked before writing


@pytest.mark.parametrize("name", ["../evil", "sub/../../evil", "/tmp/evil_abs_member"])
def test_tar_member_escaping_is_refused(tmp_path, name):
    archive = write_tar(tmp_path / "bad.tar", {name: b"gotcha"}, mode="w")
    with pytest.raises(extract.UnsafeArchiveError) as err:
        extract.extract_archive(archive, tmp_path / "data", progress=False)
    assert "bad.tar" in str(err.value) and repr(name) in str(err.value)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil_abs_member").exists()
    assert not list((tmp_path / "data").glob(".extracted-*"))  # not marked done


@pytest.mark.parametrize("target", ["../../outside", "/etc/passwd", "x/../../../outside"])
def test_tar_symlink_pointing_out_is_refused(tmp_path, target):
    archive = write_tar(tmp_path / "links.tar.gz", {}, links={"set/link": target})
    with pytest.raises(extract.UnsafeArchiveError, match="link"):
        extract.extract_archive(archive, tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "set" / "link").is_symlink()


def test_tar_symlink_inside_is_kept(tmp_path):
    archive = write_tar(tmp_path / "ok.tar", {"set/a.txt": b"A"}, mode="w",
                        links={"set/sub/link": "../a.txt"})
    extract.extract_archive(archive, tmp_path / "data", progress=False)
    assert (tmp_path / "data" / "set" / "sub" / "link").read_bytes() == b"A"


def test_corrupt_and_unknown_archives_are_named(tmp_path):
    good = write_tar(tmp_path / "x.tgz", LFW).read_bytes()
    truncated = tmp_path / "truncated.tgz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(extract.ArchiveError, match="truncated.tgz"):
        extract.extract_archive(truncated, tmp_path / "data", progress=False)
    # truncated after the first members: found mid-stream, no marker left
    rng = random.Random(0)
    big = {f"set/f{i}.bin": rng.randbytes(20_000) for i in range(3)}
    cut = write_tar(tmp_path / "cut.tar.gz", big).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(cut[: int(len(cut) * 0.6)])
    with pytest.raises(extract.ArchiveError, match="cut.tar.gz"):
        extract.extract_archive(tmp_path / "cut.tar.gz", tmp_path / "data2", progress=False)
    assert (tmp_path / "data2" / "set" / "f0.bin").is_file()
    assert not list((tmp_path / "data2").glob(".extracted-*"))
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not an archive" * 10)
    with pytest.raises(extract.ArchiveError, match="junk.zip"):
        extract.extract_archive(junk, tmp_path / "data", progress=False)


def test_destinations():
    assert extract.default_destination("dl/MegaFace_Images.tar.gz", "d") == Path("d/megaface")
    assert extract.default_destination("facescrub_images.tar", "d") == Path("d/megaface")
    assert extract.default_destination("faces_emore.zip", "d") == Path("d")
    assert extract.archive_stem("lfw-funneled.tgz") == "lfw-funneled"
    assert extract.archive_stem("x.tar.gz") == "x"


def test_cli_places_archives_and_pairs(tmp_path, capsys):
    emore = write_zip(tmp_path / "faces_emore.zip", FILES)
    loose = write_zip(tmp_path / "loose.zip", {"a.txt": b"a", "b/c.txt": b"c"})
    lfw = write_tar(tmp_path / "lfw.tgz", LFW)
    (tmp_path / "pairs.txt").write_text("10\t300\n")
    evil = write_zip(tmp_path / "evil.zip", {"../evil": b"x"})
    data = tmp_path / "data"
    argv = [str(emore), str(loose), str(lfw), str(evil), "--dest", str(data), "--no-progress"]
    assert extract.main(argv) == 1  # the evil archive fails, the rest is unpacked
    captured = capsys.readouterr()
    [error] = captured.err.splitlines()  # one line for the one failure
    assert error.startswith("error: ") and "evil.zip" in error and "'../evil'" in error
    assert "evil" not in captured.out and "faces_emore.zip" in captured.out
    assert (data / "faces_emore" / "train.rec").read_bytes() == FILES["faces_emore/train.rec"]
    assert (data / "loose" / "a.txt").read_bytes() == b"a"  # loose members get a folder
    assert (data / "lfw" / "Zico" / "Zico_0001.jpg").is_file()
    assert (data / "lfw" / "pairs.txt").read_text() == "10\t300\n"  # copied from beside
    assert not (tmp_path / "evil").exists()
    assert extract.main(argv[:3] + ["--dest", str(data), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("already extracted") == 3
    other_pairs = tmp_path / "elsewhere" / "pairs.txt"
    other_pairs.parent.mkdir()
    other_pairs.write_text("1\t2\n")
    assert extract.main([str(other_pairs), "--dest", str(data)]) == 0
    assert (data / "lfw" / "pairs.txt").read_text() == "1\t2\n"


# ----------------------------------------------------------------------------- hostile archives

def _zip_symlink(zf: zipfile.ZipFile, name: str, target: str) -> None:
    """A symlink member as Info-ZIP stores one: S_IFLNK in external_attr's high 16 bits."""
    import stat

    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so the mode bits count
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


def _snapshot(root: Path, skip: Path) -> dict[str, bytes | str]:
    """Every file and link under ``root`` outside ``skip``: content or link target."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        if skip == p or skip in p.parents:
            continue
        if p.is_symlink():
            out[str(p)] = "-> " + str(p.readlink())
        elif p.is_file():
            out[str(p)] = p.read_bytes()
    return out


def test_zip_symlink_chain_cannot_write_outside_dest(tmp_path, capsys):
    """faces_emore/x -> .., faces_emore/x/y -> .. (each fine as text), then a file under
    x/y/: written naively it lands in dest's parent and overwrites what is there."""
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_bytes(b"original")
    archive = tmp_path / "dl" / "faces_emore.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("faces_emore/ok.txt", b"fine")
        _zip_symlink(zf, "faces_emore/x", "..")
        _zip_symlink(zf, "faces_emore/x/y", "..")
        zf.writestr("faces_emore/x/y/outside/victim.txt", b"pwned")
    dest = tmp_path / "data"
    before = _snapshot(tmp_path, dest)
    with pytest.raises(extract.UnsafeArchiveError) as err:
        extract.extract_archive(archive, dest, progress=False)
    assert "faces_emore.zip" in str(err.value) and "'faces_emore/x'" in str(err.value)
    assert isinstance(err.value, ValueError)  # what callers caught before
    assert _snapshot(tmp_path, dest) == before  # nothing outside dest written or changed
    assert victim.read_bytes() == b"original"
    assert not dest.exists() or not any(dest.rglob("*"))  # checked before writing anything
    assert extract.main([str(archive), "--dest", str(dest), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "'faces_emore/x'" in error
    assert victim.read_bytes() == b"original" and _snapshot(tmp_path, dest) == before


def test_zip_member_through_a_symlink_already_in_dest_is_refused(tmp_path):
    """A link left in dest (by an earlier archive or by hand) that leads outside: a member
    written through it would land outside, so its resolved path is checked too."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "faces_emore").symlink_to(outside)
    archive = write_zip(tmp_path / "faces_emore.zip", FILES)
    with pytest.raises(extract.UnsafeArchiveError, match="faces_emore/train.rec"):
        extract.extract_archive(archive, dest, progress=False)
    assert list(outside.iterdir()) == []


def _write_tar_entries(path: Path, entries: list[tuple[str, str, Any]], mode: str = "w"
                       ) -> Path:
    """A tar (``mode`` "w:gz": a .tgz) of (name, kind, value) members: a file's bytes, or a
    link's target (hard links as GNU tar writes a file's later names)."""
    with tarfile.open(path, mode) as tf:
        for name, kind, value in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = value or ""
            tf.addfile(info)
    return path


HOSTILE_TARS = {
    "symlink chain": [("faces_emore/x", "sym", ".."), ("faces_emore/x/y", "sym", ".."),
                      ("faces_emore/x/y/outside/victim.txt", "file", b"pwned")],
    # each link points inside when it is made; the second turns the first into an escape
    "link made to escape later": [("s/z", "sym", "c/b/../.."), ("s/c", "dir", None),
                                  ("s/c/b", "sym", "..")],
    "hard link out": [("s/h", "hard", "../outside/victim.txt")],
    "absolute symlink": [("s/l", "sym", "/etc")],
    "character device": [("s/null", "chr", None)],
    "fifo": [("s/pipe", "fifo", None)],
}


@pytest.mark.parametrize("case", list(HOSTILE_TARS))
def test_hostile_tar_leaves_nothing_escaping(tmp_path, case):
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_bytes(b"original")
    archive = _write_tar_entries(tmp_path / "evil.tar", HOSTILE_TARS[case])
    dest = tmp_path / "data"
    before = _snapshot(tmp_path, dest)
    with pytest.raises(extract.UnsafeArchiveError, match="evil.tar"):
        extract.extract_archive(archive, dest, progress=False)
    assert _snapshot(tmp_path, dest) == before
    real_dest = dest.resolve()
    for p in dest.rglob("*"):  # whatever was written stays inside, links included
        assert real_dest == p.resolve() or real_dest in p.resolve().parents, p
        assert p.is_symlink() or p.is_file() or p.is_dir(), p
    assert not list(dest.glob(".extracted-*"))


# ----------------------------------------------------------------------------- size limits

ZEROS = 3 * 2**20  # compresses to a few KB: a bomb in miniature


def write_deflated_zip(path: Path, members: dict[str, bytes]) -> Path:
    """Like write_zip, but compressed (a ZipInfo passed to writestr keeps ZIP_STORED)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _small_limits() -> "extract.SizeLimits":
    return extract.SizeLimits(max_ratio=50, ratio_free_bytes=2**20, max_bytes=2**30)


def test_zip_bomb_is_refused_before_writing(tmp_path):
    archive = write_deflated_zip(tmp_path / "bomb.zip",
                                 {"set/a.txt": b"fine", "set/zeros": bytes(ZEROS)})
    assert archive.stat().st_size * 50 < ZEROS  # independent: the ratio really is that high
    dest = tmp_path / "data"
    with pytest.raises(extract.ArchiveTooLargeError) as err:
        extract.extract_archive(archive, dest, progress=False, limits=_small_limits())
    assert "bomb.zip" in str(err.value) and "--allow-large" in str(err.value)
    assert not dest.exists() or not any(dest.rglob("*"))
    done = extract.extract_archive(archive, dest, progress=False, limits=None)  # allowed
    assert (dest / "set" / "zeros").stat().st_size == ZEROS and done["bytes"] == ZEROS + 4


def test_zip_total_size_limit_applies_whatever_the_ratio(tmp_path):
    import random

    data = random.Random(1).randbytes(200_000)  # incompressible
    archive = write_zip(tmp_path / "big.zip", {"set/r.bin": data})
    limits = extract.SizeLimits(max_ratio=100, ratio_free_bytes=0, max_bytes=100_000)
    with pytest.raises(extract.ArchiveTooLargeError, match="big.zip"):
        extract.extract_archive(archive, tmp_path / "data", progress=False, limits=limits)
    assert extract.extract_archive(archive, tmp_path / "data", progress=False,
                                   limits=extract.SizeLimits())["bytes"] == len(data)


def test_zip_lying_about_sizes_is_stopped_while_streaming(tmp_path, monkeypatch):
    """Declared sizes can lie; the bytes actually written are counted too."""
    archive = write_deflated_zip(tmp_path / "liar.zip", {"set/zeros": bytes(ZEROS)})
    monkeypatch.setattr(extract, "_declared_size", lambda info: 10)  # what the headers claim
    dest = tmp_path / "data"
    with pytest.raises(extract.ArchiveTooLargeError, match="'set/zeros'"):
        extract.extract_archive(archive, dest, progress=False, limits=_small_limits())
    assert not (dest / "set" / "zeros").exists()  # the partial output is removed


def test_tar_bomb_is_stopped_while_streaming(tmp_path):
    archive = write_tar(tmp_path / "bomb.tar.gz",
                        {"set/a.txt": b"fine", "set/zeros": bytes(ZEROS), "set/z.txt": b"late"})
    assert archive.stat().st_size * 50 < ZEROS
    dest = tmp_path / "data"
    with pytest.raises(extract.ArchiveTooLargeError, match="bomb.tar.gz.*'set/zeros'"):
        extract.extract_archive(archive, dest, progress=False, limits=_small_limits())
    assert not (dest / "set" / "zeros").exists() and not (dest / "set" / "z.txt").exists()
    assert not list(dest.glob(".extracted-*"))
    extract.extract_archive(archive, dest, progress=False, limits=None)
    assert (dest / "set" / "zeros").read_bytes() == bytes(ZEROS)


def test_default_limits_let_real_archives_through_and_cli_documents_the_flag(capsys):
    limits = extract.SizeLimits()
    assert limits.allowed(20 * 2**30) >= 20 * 2**30  # a 20 GB faces_emore.zip: ratio ~1
    assert limits.allowed(1000) >= 2**20  # a small text archive compressing 10x or more
    assert limits.allowed(2**20) < 1000 * 2**20  # a 1 MB archive cannot expand 1000x
    with pytest.raises(SystemExit):
        extract.main(["--help"])
    assert "--allow-large" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad inputs

def test_cli_bad_inputs_are_one_line_errors_naming_the_file(tmp_path, capsys):
    from utils import run_cli

    good = write_zip(tmp_path / "faces_emore.zip", FILES)
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    assert run_cli(extract.main, [str(good), "--dest", str(a_file), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and str(a_file) in captured.err
    assert "not a folder" in captured.err and a_file.read_text() == "x"
    # a file where the archive's destination folder (data/megaface) should be
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "megaface").write_text("x")
    mega = write_zip(tmp_path / "megaface.zip", {"m/a.txt": b"a"})
    empty = tmp_path / "empty.zip"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(good.read_bytes()[:-30])  # central directory cut short
    for archive, expected in ((tmp_path / "missing.zip", "not found"),
                              (empty, "empty file"), (corrupt, "corrupt.zip"),
                              (tmp_path, "folder"),
                              (mega, str(tmp_path / "data" / "megaface"))):
        rc = run_cli(extract.main, [str(archive), "--dest", str(tmp_path / "data"),
                                    "--no-progress"])
        out = capsys.readouterr()
        text = out.out + out.err
        assert rc == 1 and str(archive) in text and expected in text, text
        assert "Traceback" not in text


# ----------------------------------------------------------------------------- damaged re-downloads

GOOD_JPG = random.Random(2).randbytes(60_000)  # incompressible, like a real JPEG
LFW_BIG = {"lfw/Aaron_Eckhart/Aaron_Eckhart_0001.jpg": b"\xff\xd8 jpeg bytes",
           "lfw/Zico/Zico_0001.jpg": GOOD_JPG}


def _every_file(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, hidden ones (temporaries) included, markers excluded."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(extract.MARKER_PREFIX)}


def _flip_inside(path: Path, content: bytes) -> None:
    """Flip one byte in the middle of ``content`` where it is stored in the file at ``path``
    (a stored zip member, an uncompressed gzip block): a download damaged in transit."""
    data = bytearray(path.read_bytes())
    at = data.find(content)
    assert at >= 0 and data.find(content, at + len(content)) < 0
    data[at + len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _patch_zip_member(path: Path, name: str, *, flags: int = 0, method: int | None = None) -> None:
    """Set general-purpose flag bits and/or the compression method of member ``name`` in its
    local header and its central-directory entry, as an encrypting or Deflate64 zipper
    writes them (APPNOTE 4.3.7 / 4.3.12 field layouts)."""
    import struct

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    central = data.find(b"PK\x01\x02")
    while data[central + 46: central + 46 + len(name)] != name.encode():
        central = data.find(b"PK\x01\x02", central + 1)
        assert central >= 0
    for flag_at, method_at in ((local + 6, local + 8), (central + 8, central + 10)):
        struct.pack_into("<H", data, flag_at, struct.unpack_from("<H", data, flag_at)[0] | flags)
        if method is not None:
            struct.pack_into("<H", data, method_at, method)
    path.write_bytes(bytes(data))


def _stored_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _damage_zip(case: str, path: Path) -> None:
    member = "faces_emore/train.rec"
    if case == "bad crc":
        _flip_inside(path, FILES[member])
    elif case == "encrypted":
        _patch_zip_member(path, member, flags=0x1)  # bit 0: encrypted
    else:  # Deflate64, method 9: what Windows' Explorer writes for big files
        _patch_zip_member(path, member, method=9)


@pytest.mark.parametrize("case,expected", [("bad crc", "CRC"), ("encrypted", "encrypted"),
                                           ("deflate64", "Deflate64")])
def test_damaged_zip_over_a_good_extraction_keeps_the_good_files(tmp_path, capsys, case,
                                                                 expected):
    from utils import run_cli

    archive = _stored_zip(tmp_path / "faces_emore.zip", FILES)
    dest = tmp_path / "data"
    extract.extract_archive(archive, dest, progress=False)
    assert _every_file(dest) == FILES
    _damage_zip(case, archive)  # the re-download
    with pytest.raises(extract.ArchiveError) as err:
        extract.extract_archive(archive, dest, progress=False, force=True)
    message = str(err.value)
    assert "faces_emore.zip" in message and "'faces_emore/train.rec'" in message
    assert expected in message
    assert _every_file(dest) == FILES  # the good files, and no temporary left
    rc = run_cli(extract.main, [str(archive), "--dest", str(tmp_path / "data2"),
                                "--no-progress"])
    err_text = capsys.readouterr().err
    assert rc == 1 and err_text.startswith("error: ") and err_text.count("\n") == 1
    assert "'faces_emore/train.rec'" in err_text and "Traceback" not in err_text


@pytest.mark.parametrize("case", ["encrypted", "deflate64"])
def test_unreadable_zip_member_is_refused_before_anything_is_written(tmp_path, case):
    archive = _stored_zip(tmp_path / "faces_emore.zip", FILES)
    _damage_zip(case, archive)
    dest = tmp_path / "data"
    with pytest.raises(extract.ArchiveError, match="'faces_emore/train.rec'"):
        extract.extract_archive(archive, dest, progress=False)
    assert not dest.exists() or not any(dest.rglob("*"))


def test_tgz_truncated_mid_member_keeps_the_good_file(tmp_path):
    archive = write_tar(tmp_path / "lfw.tgz", LFW_BIG)
    dest = tmp_path / "data"
    extract.extract_archive(archive, dest, progress=False)
    good = archive.read_bytes()
    archive.write_bytes(good[: len(good) // 2])  # a download cut off inside Zico_0001.jpg
    with pytest.raises(extract.ArchiveError) as err:
        extract.extract_archive(archive, dest, progress=False)
    assert "lfw.tgz" in str(err.value) and "'lfw/Zico/Zico_0001.jpg'" in str(err.value)
    assert _every_file(dest) == LFW_BIG  # the good jpg whole, no temporary left
    assert not extract.already_extracted(archive, dest)


def test_tgz_with_silently_wrong_bytes_fails_its_gzip_crc(tmp_path):
    """A flipped byte in an uncompressed (stored) deflate block decodes without complaint:
    only the gzip trailer's CRC tells, so the stream is read to its end and checked."""
    archive = tmp_path / "lfw.tgz"
    with tarfile.open(archive, "w:gz", compresslevel=0) as tf:
        for name, data in LFW_BIG.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    _flip_inside(archive, GOOD_JPG[1000:2000])  # within one stored block
    dest = tmp_path / "data"
    with pytest.raises(extract.ArchiveError, match=r"lfw\.tgz.*CRC"):
        extract.extract_archive(archive, dest, progress=False)
    assert not extract.already_extracted(archive, dest)
    assert not [p for p in dest.rglob(".*") if p.name.endswith(".tmp")]


def _no_space() -> OSError:
    import errno
    import os

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullDisk:
    """``open`` for a disk with ``room`` bytes free: a write past it writes what fits and
    raises ENOSPC, as a real full disk does (or what ``failure`` makes)."""

    def __init__(self, room: int, failure=_no_space) -> None:
        self.room, self.failure = room, failure
        self.real_open = open

    def __call__(self, file, mode="r", *args, **kwargs):
        f = self.real_open(file, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        disk = self

        class Writer(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, b) -> int:
                fits = min(len(b), disk.room)
                f.write(bytes(b[:fits]))
                disk.room -= fits
                if fits < len(b):
                    raise disk.failure()
                return fits

            def close(self) -> None:
                f.close()
                super().close()

        return Writer()


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_disk_full_names_archive_and_member_and_leaves_no_truncated_file(tmp_path, monkeypatch,
                                                                         kind):
    members = {"set/a.bin": b"a" * 1000, "set/b.bin": b"b" * 1000, "set/c.bin": b"c" * 10}
    if kind == "zip":
        archive = _stored_zip(tmp_path / "set.zip", members)
    else:
        archive = write_tar(tmp_path / "set.tgz", members)
    monkeypatch.setattr(extract, "open", _FullDisk(room=1500), raising=False)
    dest = tmp_path / "data"
    with pytest.raises(extract.ToolkitError) as err:
        extract.extract_archive(archive, dest, progress=False)
    message = str(err.value).lower()
    assert archive.name in message and "'set/b.bin'" in message and "no space left" in message
    assert _every_file(dest) == {"set/a.bin": members["set/a.bin"]}  # b.bin: nothing at all
    assert not extract.already_extracted(archive, dest)


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_member_names_at_the_filesystem_limit_extract(tmp_path, kind):
    """A temporary named '.<member name>.<random>.tmp' would pass the 255-byte name limit."""
    import os

    names = {"set/" + "n" * 242 + ".jpg": b"ascii name", "set/" + "é" * 121 + ".jpg": b"utf-8"}
    assert all(len(Path(n).name.encode()) == 246 for n in names)
    if kind == "zip":
        archive = _stored_zip(tmp_path / "set.zip", names)
    else:
        archive = write_tar(tmp_path / "set.tgz", names)
    dest = tmp_path / "data"
    extract.extract_archive(archive, dest, progress=False)
    assert _every_file(dest) == names
    if kind == "zip":  # a new file's mode follows the umask, like any file a tool writes
        umask = os.umask(0o022)
        os.umask(umask)
        for name in names:
            assert (dest / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_interrupted_re_extraction_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C halfway through a member over an earlier extraction."""
    archive = _stored_zip(tmp_path / "faces_emore.zip", FILES)
    dest = tmp_path / "data"
    extract.extract_archive(archive, dest, progress=False)

    half = len(FILES["faces_emore/train.rec"]) // 2
    monkeypatch.setattr(extract, "open", _FullDisk(half, failure=KeyboardInterrupt),
                        raising=False)
    with pytest.raises(KeyboardInterrupt):
        extract.extract_archive(archive, dest, progress=False, force=True)
    assert _every_file(dest) == FILES


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_a_killed_runs_temporaries_go_when_their_member_is_written_again(tmp_path, kind):
    """A SIGKILLed extraction left hidden .<name>.<hex>.tmp files (half a train.rec) beside
    its members, and every later run kept them."""
    import os

    archive = _stored_zip(tmp_path / "faces_emore.zip", FILES) if kind == "zip" else \
        write_tar(tmp_path / "faces_emore.tgz", FILES)
    dest = tmp_path / "data"
    folder = dest / "faces_emore"
    folder.mkdir(parents=True)
    # what a kill leaves: a temporary of a member, written part way
    fd, killed = extract._member_temp(folder / "train.rec")
    os.write(fd, b"rec" * 10)
    os.close(fd)
    (folder / ".property.0123abcd.tmp").write_bytes(b"85742,")
    kept = {".other.rec.0123abcd.tmp": b"a member of no archive here",  # not ours to judge
            ".notes.tmp": b"a user's file", ".train.rec.not-hex!.tmp": b"not our pattern"}
    for name, data in kept.items():
        (folder / name).write_bytes(data)
    extract.extract_archive(archive, dest, progress=False)
    assert not killed.exists() and not (folder / ".property.0123abcd.tmp").exists()
    assert _every_file(dest) == {**FILES, **{f"faces_emore/{n}": d for n, d in kept.items()}}


def test_tar_hard_links_extract_and_extract_again(tmp_path):
    """A re-extraction (--force, a re-download) met the link's existing name: tarfile's
    fallback seeks back in the stream, and the run ended in a StreamError traceback."""
    import os

    archive = _write_tar_entries(tmp_path / "lfw.tgz", [
        ("lfw/a.jpg", "file", b"face a"), ("lfw/b.jpg", "hard", "lfw/a.jpg"),
        ("lfw/c.jpg", "file", b"face c")], "w:gz")
    dest = tmp_path / "data"
    for force in (False, True):
        summary = extract.extract_archive(archive, dest, progress=False, force=force)
        assert _every_file(dest) == {"lfw/a.jpg": b"face a", "lfw/b.jpg": b"face a",
                                     "lfw/c.jpg": b"face c"}
        assert os.path.samefile(dest / "lfw/a.jpg", dest / "lfw/b.jpg")
        assert summary["files"] == 3 and extract.already_extracted(archive, dest)


@pytest.mark.parametrize("target", ["lfw/later.jpg", "lfw/absent.jpg"])
def test_tar_hard_link_to_no_earlier_member_is_one_error_naming_it(tmp_path, capsys, target):
    """tarfile looked the target up in the archive, which a stream cannot: a KeyError
    traceback."""
    archive = _write_tar_entries(tmp_path / "lfw.tgz", [
        ("lfw/b.jpg", "hard", target), ("lfw/later.jpg", "file", b"face")], "w:gz")
    dest = tmp_path / "data"
    assert extract.main([str(archive), "--dest", str(dest), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err
    assert "lfw.tgz" in err and "'lfw/b.jpg'" in err and target in err
    assert not extract.already_extracted(archive, dest)


def test_tar_hard_link_where_the_filesystem_has_none_is_a_copy(tmp_path, monkeypatch):
    import errno
    import os

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    archive = _write_tar_entries(tmp_path / "lfw.tgz", [
        ("lfw/a.jpg", "file", b"face a"), ("lfw/b.jpg", "hard", "lfw/a.jpg")], "w:gz")
    dest = tmp_path / "data"
    extract.extract_archive(archive, dest, progress=False)
    assert _every_file(dest) == {"lfw/a.jpg": b"face a", "lfw/b.jpg": b"face a"}


def test_zip_member_name_flagged_utf8_but_not_utf8_is_one_error_naming_the_archive(
        tmp_path, capsys):
    """zipfile decodes such a name strictly when it reads the directory: the CLI ended in a
    UnicodeDecodeError traceback."""
    archive = _stored_zip(tmp_path / "faces.zip", {"faces/ab.jpg": b"jpeg"})
    _patch_zip_member(archive, "faces/ab.jpg", flags=0x800)  # APPNOTE bit 11: name is UTF-8
    data = archive.read_bytes()
    assert data.count(b"faces/ab.jpg") == 2  # local header and central directory
    archive.write_bytes(data.replace(b"faces/ab.jpg", b"faces/\xff\xfe.jpg"))
    dest = tmp_path / "data"
    assert extract.main([str(archive), "--dest", str(dest), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err
    assert "faces.zip" in err and "UTF-8" in err
    assert not dest.exists() or not any(dest.rglob("*.jpg"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_tar_file_modes_lose_what_the_umask_takes(tmp_path, umask):
    """The tar's own modes were kept whole: a private umask (077) still gave 0644 files,
    readable by every user, where a zip's members (and tar, for a user) give 0600."""
    import os

    modes = {"set/a.jpg": 0o644, "set/run.sh": 0o755, "set/private.txt": 0o600}
    archive = tmp_path / "set.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, mode in modes.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = 1, mode
            tf.addfile(info, io.BytesIO(b"x"))
    dest = tmp_path / "data"
    old = os.umask(umask)
    try:
        extract.extract_archive(archive, dest, progress=False)
    finally:
        os.umask(old)
    for name, mode in modes.items():
        assert (dest / name).stat().st_mode & 0o7777 == mode & ~umask, name


def test_zip_folder_member_where_a_file_member_is_fails_alone_in_one_line(tmp_path, capsys):
    """'set/a/x' as a file, then 'set/a/x/' as a folder: mkdir's FileExistsError left the
    CLI without naming the archive or member, and the archives after it were not extracted."""
    bad = tmp_path / "one.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("set/a/x", b"file")
        zf.writestr("set/a/x/", b"")
    good = write_zip(tmp_path / "faces_emore.zip", FILES)
    dest = tmp_path / "data"
    assert extract.main([str(bad), str(good), "--dest", str(dest), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "one.zip" in err and "'set/a/x/'" in err
    assert {k: v for k, v in tree(dest).items() if k.startswith("faces_emore/")} == FILES
    assert not extract.already_extracted(bad, dest / "one")


@pytest.mark.parametrize("after", [[], [("set/z", "file", b"z")]])
def test_tar_symlink_where_a_folder_is_is_one_error_naming_it(tmp_path, capsys, after):
    """tarfile, failing to replace the folder, looked for the link's target in the archive:
    on a stream that read the rest of it, so a later member was reported damaged, and with
    none the run ended 'unpacked', marked done, the link missing."""
    archive = _write_tar_entries(tmp_path / "set.tar", [
        ("set/d", "dir", None), ("set/d/f", "file", b"x"), ("set/d", "sym", "e"), *after])
    dest = tmp_path / "data"
    assert extract.main([str(archive), "--dest", str(dest), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "set.tar" in err and "'set/d'" in err
    assert "damaged" not in err
    assert not extract.already_extracted(archive, dest)


def test_tar_symlinks_extract_again_over_themselves(tmp_path):
    archive = write_tar(tmp_path / "lfw.tgz", LFW, links={"lfw/latest": "Zico"})
    dest = tmp_path / "data"
    for force in (False, True):
        extract.extract_archive(archive, dest, progress=False, force=force)
        assert (dest / "lfw/latest").is_symlink()
        assert (dest / "lfw/latest").readlink() == Path("Zico")
        assert _every_file(dest) == LFW
    assert sorted(p.name for p in (dest / "lfw").iterdir()) == ["Aaron_Eckhart", "Zico",
                                                                 "latest"]


def test_plain_tar_whose_last_member_is_a_zip_is_unpacked_as_the_tar(tmp_path):
    """zipfile.is_zipfile, asked first, found the inner zip's directory near the tar's end:
    its members were unpacked and the tar's were not."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("inner/only.txt", b"inside the zip")
    members = {"devkit/readme.txt": b"read me", "devkit/templatelists.zip": inner.getvalue()}
    archive = write_tar(tmp_path / "megaface_devkit.tar", members, mode="w")
    dest = tmp_path / "data"
    summary = extract.extract_archive(archive, dest, progress=False)
    assert tree(dest) == members and summary["top_level"] == ["devkit"]


def test_pairs_txt_is_replaced_whole_not_rewritten_in_place(tmp_path, capsys):
    """pairs.txt was copied over the old file in place (shutil.copyfile): a full disk or
    Ctrl-C left it cut short, and an evaluation reading it saw it change under it."""
    old, new = "10\t300\n" + "Aaron\t1\t2\n" * 50, "1\t2\n"
    target = tmp_path / "data" / "lfw" / "pairs.txt"
    target.parent.mkdir(parents=True)
    target.write_text(old)
    given = tmp_path / "download" / "pairs.txt"
    given.parent.mkdir()
    given.write_text(new)
    with target.open() as reader:  # an evaluation that opened it before
        assert extract.main([str(given), "--dest", str(tmp_path / "data")]) == 0
        assert reader.read() == old
    assert target.read_text() == new
    assert sorted(p.name for p in target.parent.iterdir()) == ["pairs.txt"]  # no temporary


@pytest.mark.parametrize("limit", [-1, 0])
def test_a_filesystem_that_states_no_name_limit_still_extracts(tmp_path, monkeypatch, limit):
    """pathconf's -1 (no limit) or a FUSE statfs's 0 made the temporaries' room negative:
    the loop shortening a member's name never ended (an empty name is still 'too long')."""
    import os

    monkeypatch.setattr(os, "pathconf", lambda path, name: limit)
    archive = write_zip(tmp_path / "faces_emore.zip", FILES)
    dest = tmp_path / "data"
    extract.extract_archive(archive, dest, progress=False)
    assert _every_file(dest) == FILES


@pytest.mark.parametrize("marker", ["[]", '"done"', '{"archive": %s}'])
def test_a_marker_that_is_not_our_record_means_extract_again(tmp_path, marker):
    """A marker holding JSON other than our record (edited, another program's) ended the run
    in an AttributeError or KeyError traceback instead of extracting again."""
    import json

    archive = write_zip(tmp_path / "faces_emore.zip", FILES)
    dest = tmp_path / "data"
    (dest / "faces_emore").mkdir(parents=True)
    st = archive.stat()
    identity = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns})
    (dest / ".extracted-faces_emore.zip.json").write_text(marker.replace("%s", identity))
    summary = extract.extract_archive(archive, dest, progress=False)
    assert not summary["skipped"] and tree(dest) == FILES
    assert extract.already_extracted(archive, dest)


def test_tar_hard_link_to_its_own_name_leaves_no_temporary(tmp_path):
    """rename(2) of one name of a file onto another name of it does nothing: the link's
    temporary stayed beside the member."""
    archive = _write_tar_entries(tmp_path / "set.tgz", [
        ("set/a.jpg", "file", b"face"), ("set/a.jpg", "hard", "set/a.jpg")], "w:gz")
    dest = tmp_path / "data"
    extract.extract_archive(archive, dest, progress=False)
    assert _every_file(dest) == {"set/a.jpg": b"face"}


def test_zip_of_loose_files_named_dot_slash_gets_its_own_folder(tmp_path, capsys):
    """'./a.txt', './b.txt' were taken for members of one folder '.', so the loose files
    spilled into DEST instead of DEST/<archive name>/."""
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("./a.txt", "./b.txt"):
            zf.writestr(zipfile.ZipInfo(name), name.encode())
    data = tmp_path / "data"
    assert extract.main([str(archive), "--dest", str(data), "--no-progress"]) == 0
    assert tree(data) == {"bundle/a.txt": b"./a.txt", "bundle/b.txt": b"./b.txt"}
