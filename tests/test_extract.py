"""extract.py: unpacking, idempotence, destinations, and refusal of escaping members."""

from __future__ import annotations

import io
import random
import tarfile
import zipfile
from pathlib import Path

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
    out = capsys.readouterr().out
    assert "FAILED" in out and "evil.zip" in out and "'../evil'" in out
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
