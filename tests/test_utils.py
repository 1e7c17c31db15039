import os

import cv2
import numpy as np
import pytest
import torch

import utils


def _rgb_test_image() -> np.ndarray:
    """Left third pure red, middle pure green, right pure blue (RGB)."""
    img = np.zeros((24, 36, 3), np.uint8)
    img[:, :12, 0] = 255
    img[:, 12:24, 1] = 255
    img[:, 24:, 2] = 255
    return img


@pytest.mark.parametrize("ext", [".png", ".bmp", ".jpg"])
def test_colour_contract_read_write(tmp_path, ext):
    img = _rgb_test_image()
    path = tmp_path / f"c{ext}"
    utils.write_image(path, img)
    # Independent check of what landed on disk: OpenCV reads BGR, so blue is channel 0.
    on_disk = cv2.imread(str(path))
    assert on_disk[5, 30, 0] > 200 and on_disk[5, 30, 2] < 50  # blue region stored as blue
    back = utils.read_image(path)
    assert back.dtype == np.uint8 and back.shape == img.shape
    assert back[5, 5, 0] > 200 and back[5, 5, 2] < 50  # red stays red
    assert back[5, 30, 2] > 200 and back[5, 30, 0] < 50  # blue stays blue
    if ext != ".jpg":
        np.testing.assert_array_equal(back, img)


def test_file_written_by_opencv_reads_as_rgb(tmp_path):
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    rgb = utils.read_image(tmp_path / "red.png")
    assert rgb[0, 0].tolist() == [255, 0, 0]


def test_grayscale_and_alpha_become_rgb(tmp_path):
    cv2.imwrite(str(tmp_path / "g.png"), np.full((5, 6), 77, np.uint8))
    gray = utils.read_image(tmp_path / "g.png")
    assert gray.shape == (5, 6, 3) and (gray == 77).all()
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 0] = 255  # blue
    bgra[..., 3] = 128
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    rgba = utils.read_image(tmp_path / "a.png")
    assert rgba.shape == (4, 4, 3) and rgba[0, 0].tolist() == [0, 0, 255]


def test_unreadable_image_error_names_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(utils.ImageReadError, match="broken.jpg"):
        utils.read_image(bad)
    with pytest.raises(utils.ImageReadError, match="missing.jpg"):
        utils.read_image(tmp_path / "missing.jpg")


def test_atomic_checkpoint_interrupted_before_rename_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    utils.save_checkpoint({"w": torch.ones(3), "step": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint({"w": torch.zeros(3), "step": 2}, path)
    monkeypatch.undo()

    state = utils.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left


def test_atomic_checkpoint_interrupted_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    utils.save_checkpoint({"step": 1}, path)
    real_save = torch.save

    def half_write(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError):
        utils.save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert utils.load_checkpoint(path)["step"] == 1


class WholeObject:  # a pickled whole object, not a state dict
    pass


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"model": WholeObject()}, path)
    with pytest.raises(RuntimeError, match="obj.pt"):
        utils.load_checkpoint(path)


def test_strip_module_prefix_and_backbone_state(tmp_path):
    sd = {"module.conv.weight": torch.ones(1), "_orig_mod.module.fc.bias": torch.zeros(1)}
    assert sorted(utils.strip_module_prefix(sd)) == ["conv.weight", "fc.bias"]
    utils.save_checkpoint({"backbone": sd, "step": 3}, tmp_path / "full.pt")
    assert sorted(utils.load_backbone_state(tmp_path / "full.pt")) == ["conv.weight", "fc.bias"]


def test_seed_and_device():
    utils.seed_everything(7)
    a = (torch.rand(3), np.random.rand(3))
    utils.seed_everything(7)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert utils.get_device("auto").type == expected
    assert utils.get_device("cpu").type == "cpu"


def test_decode_into_buffer_matches_plain_decode():
    img = _rgb_test_image()
    data = utils.encode_image(img, ".png")
    out = np.zeros_like(img)
    assert utils.decode_image(data, out=out) is out
    np.testing.assert_array_equal(out, img)
    wrong = np.zeros((5, 5, 3), np.uint8)  # another size: a new array, buffer untouched
    other = utils.decode_image(data, out=wrong)
    assert other is not wrong and (wrong == 0).all()
    np.testing.assert_array_equal(other, img)


_RSS_AFTER_FREE = """
import sys
import numpy as np
sys.path.insert(0, {root!r})
import utils
if {reuse}:
    assert utils.reuse_freed_memory()
page = 4096
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * page
block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
before = rss()
del block
print(before - rss())
"""


def test_reuse_freed_memory_keeps_large_blocks_in_the_process():
    """Without it glibc unmaps a freed 64 MiB block at once (RSS falls by ~64 MiB); with it
    the block stays in the heap for the next allocation (RSS stays)."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(utils.__file__).resolve().parent)

    def released(reuse: bool) -> int:
        code = _RSS_AFTER_FREE.format(root=root, reuse=reuse)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.strip())

    mib = 2**20
    assert released(False) > 60 * mib
    assert released(True) < 4 * mib


# ----------------------------------------------------------------------------- bad days

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    """A file written through a temporary gets the mode a plain open() would give it
    (0o666 less the umask), not mkstemp's 0o600."""
    old = os.umask(umask)
    try:
        utils.atomic_write_text(tmp_path / "report.txt", "x")
        utils.save_checkpoint({"w": torch.zeros(2)}, tmp_path / "c.pt")
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() does
            f.write("x")
    finally:
        os.umask(old)
    expected = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("report.txt", "c.pt"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == expected, name


def test_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    import errno

    target = tmp_path / "out.bin"
    target.write_bytes(b"good")

    def disk_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        utils._atomic_write(target, disk_full)
    assert info.value.filename == str(target)
    assert utils.describe_error(info.value) == f"{target}: no space left on device"
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary left


def test_remove_stale_temporaries_only_touches_that_files_temporaries(tmp_path):
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".other.pt.abc.tmp").write_bytes(b"keep")
    (tmp_path / "checkpoint.pt").write_bytes(b"good")
    removed = utils.remove_stale_temporaries(tmp_path, "checkpoint.pt")
    assert [p.name for p in removed] == [".checkpoint.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc.tmp", "checkpoint.pt"]


def test_remove_stale_temporaries_reads_a_name_as_spelled_not_as_a_glob(tmp_path):
    """'model[v2].onnx' was a glob: its '[v2]' matched 'v', so its own temporaries stayed and
    those of modelv.onnx (another output, perhaps being written now) were deleted."""
    ours = [utils.temp_path_for(tmp_path / "model[v2].onnx") for _ in range(2)]
    theirs = [utils.temp_path_for(tmp_path / name) for name in ("modelv.onnx", "model2.onnx")]
    removed = utils.remove_stale_temporaries(tmp_path, "model[v2].onnx")
    assert sorted(removed) == sorted(ours)
    assert sorted(tmp_path.iterdir()) == sorted(theirs)


LONG_NAME_CHARS = 246  # a legal name (< 255 bytes) that ".<name>.<random>.tmp" would pass


def test_temporaries_of_a_246_character_name_fit_the_name_limit_and_are_told_apart(tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    long_a = "a" * (LONG_NAME_CHARS - 4) + ".jpg"
    long_b = "a" * (LONG_NAME_CHARS - 5) + "b.jpg"  # the same start as long_a
    utils.atomic_write_bytes(tmp_path / long_a, b"crop")  # ENAMETOOLONG before
    assert (tmp_path / long_a).read_bytes() == b"crop"
    temps = [utils.temp_path_for(tmp_path / name) for name in (long_a, long_b, long_a)]
    assert all(len(os.fsencode(t.name)) <= name_max for t in temps)
    assert len({t.name for t in temps}) == 3
    # a name with undecodable bytes and multi-byte characters is cut to whole bytes too
    odd = os.fsdecode(b"\xe9" * 100 + "\u00e9".encode() * 70 + b".png")
    odd_temp = utils.temp_path_for(tmp_path / odd)
    assert len(os.fsencode(odd_temp.name)) <= name_max
    # a killed writer's temporaries of long_a are found, long_b's are left
    removed = utils.remove_stale_temporaries(tmp_path, long_a)
    assert sorted(removed) == sorted([temps[0], temps[2]])
    assert temps[1].exists() and (tmp_path / long_a).exists()


def test_run_cli_prints_one_line_for_user_errors_and_keeps_bugs_loud(capsys):
    def bad_input(argv):
        raise utils.ImageReadError("photos/a.jpg: not a decodable image (3 bytes)")

    assert utils.run_cli(bad_input, []) == 1
    err = capsys.readouterr().err
    assert err == "error: photos/a.jpg: not a decodable image (3 bytes)\n"

    def missing(argv):
        open("/nonexistent/dir/x.txt")

    assert utils.run_cli(missing, []) == 1
    assert capsys.readouterr().err == \
        "error: /nonexistent/dir/x.txt: No such file or directory\n"

    with pytest.raises(utils.ImageReadError):  # --debug: the traceback
        utils.run_cli(bad_input, ["--debug"])

    def bug(argv):
        raise KeyError("a bug, not the user's fault")

    with pytest.raises(KeyError):
        utils.run_cli(bug, [])


# ------------------------------------------------------------------ untrusted checkpoints

class RunsCommand:  # what a malicious checkpoint holds: unpickling it calls os.system
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize("payload", [WholeObject, RunsCommand], ids=["object", "os.system"])
def test_checkpoint_with_python_objects_is_refused_without_the_unsafe_advice(
        tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)  # where the payload would write
    path = tmp_path / "evil.pt"
    torch.save({"backbone": {"w": torch.ones(2)}, "extra": payload()}, path)
    with pytest.raises(utils.CheckpointError) as info:
        utils.load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "not trusted" in message
    assert "arbitrary Python objects" in message
    assert "weights_only" not in message and "add_safe_globals" not in message
    assert "\n" not in message  # one line for run_cli
    assert isinstance(info.value, RuntimeError)  # what callers caught before
    assert not (tmp_path / "pwned.txt").exists()
    with pytest.raises(utils.CheckpointError, match="not trusted"):
        utils.load_backbone_state(path)


def test_corrupt_checkpoints_get_one_line_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4000.0)}, good)
    data = good.read_bytes()
    cases = {"empty.pt": b"", "head.pt": data[:50], "tail.pt": data[:-300],
             "text.pt": b"not a checkpoint\n" * 8}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(utils.CheckpointError) as info:
            utils.load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: "), message
        assert "\n" not in message and "weights_only" not in message, message
        assert utils.run_cli(lambda argv, p=tmp_path / name: utils.load_checkpoint(p), []) == 1
    assert "empty" in str(pytest.raises(utils.CheckpointError, utils.load_checkpoint,
                                        tmp_path / "empty.pt").value)
    assert torch.equal(utils.load_checkpoint(good)["w"], torch.arange(4000.0))


def test_missing_checkpoint_is_file_not_found_and_says_so(tmp_path, capsys):
    missing = tmp_path / "none.pt"
    with pytest.raises(FileNotFoundError) as info:
        utils.load_checkpoint(missing)
    assert isinstance(info.value, utils.CheckpointError)
    assert utils.run_cli(lambda argv: utils.load_checkpoint(missing), []) == 1
    assert capsys.readouterr().err == f"error: checkpoint not found: {missing}\n"
    with pytest.raises(utils.CheckpointError, match="folder"):
        utils.load_checkpoint(tmp_path)


def test_checkpoint_with_a_damaged_pickle_is_corrupt_not_untrusted(tmp_path):
    import zipfile

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():  # the same archive with garbage opcodes in data.pkl
            data = b"\x80\x02\xfe\xfe" if name.endswith("data.pkl") else src.read(name)
            dst.writestr(zipfile.ZipInfo(name), data)
    with pytest.raises(utils.CheckpointError, match="bad.pt.*corrupt") as info:
        utils.load_checkpoint(bad)
    assert not isinstance(info.value, utils.UntrustedCheckpointError)


def test_backbone_state_that_is_not_a_dict_is_named(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(utils.CheckpointError, match="list.pt: holds a list, not a state dict"):
        utils.load_backbone_state(tmp_path / "list.pt")


def test_corrupt_checkpoint_reason_is_torchs_first_sentence(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:50])
    with pytest.raises(utils.CheckpointError) as info:
        utils.load_checkpoint(tmp_path / "cut.pt")
    # torch says: "PytorchStreamReader failed ...: failed finding central directory. This is
    # an internal miniz error. If you are seeing this error, ..." - only the fact is kept
    assert str(info.value).endswith("failed finding central directory)"), str(info.value)


def test_unusable_device_is_a_one_line_toolkit_error(capsys):
    for name, expected in (("gpu", "not a device"), ("cuda:99", "CUDA")):
        with pytest.raises(utils.DeviceError, match=expected):
            utils.get_device(name)
        assert utils.run_cli(lambda argv, n=name: utils.get_device(n), []) == 1
        assert capsys.readouterr().err.startswith(f"error: --device {name}: ")


# ----------------------------------------------------------------------------- EXIF orientation

def _save_with_orientation(path, stored: np.ndarray, orientation: int, fmt: str) -> None:
    """Write ``stored`` pixels with an EXIF Orientation tag, through PIL (not our code)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.fromarray(stored).save(path, format=fmt, exif=exif, **extra)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_every_exif_orientation_reads_as_pil_shows_it(tmp_path, fmt):
    """The upright image of all eight orientations, against PIL's ImageOps.exif_transpose."""
    from PIL import Image, ImageOps

    stored = np.random.default_rng(3).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    stored = cv2.GaussianBlur(stored, (5, 5), 0)  # smooth: JPEG keeps it within a few levels
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.{fmt.lower()}"
        _save_with_orientation(path, stored, orientation, fmt)
        with Image.open(path) as im:
            expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        assert utils.exif_orientation(path.read_bytes()) == orientation
        got = utils.read_image(path)
        assert got.shape == expected.shape, (fmt, orientation)
        tolerance = 12 if fmt == "JPEG" else 0  # two JPEG decoders differ by a few levels
        assert np.abs(got.astype(int) - expected).max() <= tolerance, (fmt, orientation)


@pytest.mark.parametrize("orientation,turn_stored", [
    (6, cv2.ROTATE_90_COUNTERCLOCKWISE),  # phone held upright, camera sensor sideways
    (3, cv2.ROTATE_180),
    (8, cv2.ROTATE_90_CLOCKWISE),
])
def test_sideways_photo_with_exif_orientation_reads_upright(tmp_path, orientation, turn_stored):
    from skimage import data

    upright = data.astronaut()[:, 64:]  # 512x448: not square, so a sideways read shows
    path = tmp_path / "phone.jpg"
    _save_with_orientation(path, cv2.rotate(upright, turn_stored), orientation, "JPEG")
    got = utils.read_image(path)
    assert got.shape == upright.shape
    diff = np.abs(got.astype(int) - upright)
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 16  # JPEG quality 95's error
    # the training loader's buffer path: a buffer of the upright shape is filled
    out = np.zeros_like(upright)
    assert utils.decode_image(path.read_bytes(), out=out) is out
    np.testing.assert_array_equal(out, got)


def test_broken_exif_header_still_decodes(tmp_path):
    """A corrupt EXIF block is no reason to lose the photo: read as stored (upright)."""
    img = _rgb_test_image()
    jpeg = utils.encode_image(img, ".jpg")
    # an APP1 EXIF segment whose TIFF header points its first directory past the end
    payload = b"Exif\x00\x00" + b"II*\x00" + (10_000).to_bytes(4, "little")
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    data = jpeg[:2] + app1 + jpeg[2:]
    assert utils.exif_orientation(data) == 1
    np.testing.assert_array_equal(utils.decode_image(data), utils.decode_image(jpeg))
    truncated = jpeg[:2] + app1[:9]  # header cut inside the EXIF segment
    assert utils.exif_orientation(truncated) == 1


# ----------------------------------------------------------------------------- reduced JPEG decode

@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_shape_and_reduced_decode_match_pils_draft_mode(tmp_path, orientation):
    """decode_image(reduce=r) against PIL's own DCT-scaled decode (Image.draft) turned upright
    by ImageOps.exif_transpose, for all eight orientations, on sides that are no multiple of
    8; jpeg_shape against PIL's upright size."""
    from PIL import Image, ImageOps

    stored = np.random.default_rng(orientation).integers(0, 256, (203, 301, 3), dtype=np.uint8)
    stored = cv2.GaussianBlur(stored, (9, 9), 0)
    path = tmp_path / "photo.jpg"
    _save_with_orientation(path, stored, orientation, "JPEG")
    data = path.read_bytes()
    with Image.open(path) as im:
        upright_size = ImageOps.exif_transpose(im).size  # (W, H)
    assert utils.jpeg_shape(data) == upright_size[::-1]
    for reduce in (2, 4, 8):
        with Image.open(path) as im:
            im.draft("RGB", (301 // reduce, 203 // reduce))  # PIL: the largest scale fitting
            assert im.size == (-(-301 // reduce), -(-203 // reduce))  # PIL scaled by 1/reduce
            expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        got = utils.decode_image(data, reduce=reduce)
        assert got.shape == expected.shape, (orientation, reduce)
        # two libjpeg builds' scaled IDCT and upsampling differ by a few levels, not more
        assert np.abs(got.astype(int) - expected).mean() < 2.0, (orientation, reduce)


def test_reduced_decode_is_the_block_average_of_the_full_decode():
    """Pixel u of a 1/r decode is about the mean of full-size pixels [u r, (u + 1) r): smooth
    content agrees with a block average of the full decode within JPEG's error."""
    img = cv2.GaussianBlur(np.random.default_rng(5).integers(0, 256, (240, 320, 3), np.uint8),
                           (15, 15), 0)
    data = utils.encode_image(img, ".jpg", quality=98)
    full = utils.decode_image(data).astype(float)
    for reduce in (2, 4, 8):
        blocks = full.reshape(240 // reduce, reduce, 320 // reduce, reduce, 3).mean(axis=(1, 3))
        got = utils.decode_image(data, reduce=reduce)
        assert np.abs(got - blocks).mean() < 1.5, reduce
        shifted = np.abs(got[:, 1:] - blocks[:, :-1]).mean()  # a pixel off reads worse
        assert shifted > 2 * np.abs(got - blocks).mean(), reduce


def test_reduce_is_refused_for_other_formats_and_factors():
    img = _rgb_test_image()
    with pytest.raises(ValueError, match="JPEG"):
        utils.decode_image(utils.encode_image(img, ".png"), reduce=2)
    with pytest.raises(ValueError, match="reduce"):
        utils.decode_image(utils.encode_image(img, ".jpg"), reduce=3)
    assert utils.jpeg_shape(utils.encode_image(img, ".png")) is None
    assert utils.jpeg_shape(b"\xff\xd8\xff\xd9") is None  # a JPEG without a frame header


def test_save_checkpoint_on_a_full_disk_is_the_oserror_naming_the_file(tmp_path, monkeypatch):
    """torch's zip writer turns a failed write into RuntimeError('unexpected pos ...');
    save_checkpoint reports the disk-full OSError underneath, naming the file, and keeps
    the old checkpoint."""
    import errno

    path = tmp_path / "checkpoint.pt"
    utils.save_checkpoint({"step": 1}, path)
    real_save = torch.save

    class FullDisk:  # writes fail with ENOSPC once 4 KiB are written
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, FullDisk(f),
                                                                          *a, **k))
    with pytest.raises(OSError) as info:
        utils.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert utils.describe_error(info.value) == f"{path}: no space left on device"
    monkeypatch.setattr(torch, "save", real_save)
    assert utils.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("ext", [".tif", ".png"])
def test_16_bit_image_becomes_8_bit_by_257(tmp_path, ext):
    values = [0, 128, 129, 255, 385, 386, 32767, 32768, 65407, 65408, 65534, 65535]
    bgr = np.array(values, np.uint16).reshape(4, 1, 3)
    path = tmp_path / f"deep{ext}"
    assert cv2.imwrite(str(path), bgr)
    # the nearest 8-bit value: v * 255 / 65535 rounded, in exact integer arithmetic
    want = [(v * 255 * 2 + 65535) // (2 * 65535) for v in values]
    got = utils.read_image(path)
    assert got.dtype == np.uint8 and got.shape == (4, 1, 3)
    assert got[..., ::-1].reshape(-1).tolist() == want  # back to the file's BGR order


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_tiff_maps_zero_one_to_0_255_clipping_the_rest(tmp_path, dtype):
    values = [-0.5, 0.0, 0.1234, 0.5002, 0.9999, 1.0, 1.7, 0.25, 0.003]
    bgr = np.array(values, dtype).reshape(3, 1, 3)
    path = tmp_path / "float.tif"
    assert cv2.imwrite(str(path), bgr)
    want = [round(255 * min(1.0, max(0.0, float(dtype(v))))) for v in values]
    got = utils.read_image(path)
    assert got.dtype == np.uint8 and got[..., ::-1].reshape(-1).tolist() == want
    gray = np.array([[0.0, 0.5002], [1.0, 2.0]], dtype)  # one channel, then RGB as any gray
    assert cv2.imwrite(str(path), gray)
    assert utils.read_image(path)[..., 0].tolist() == [[0, 128], [255, 255]]


def test_float_tiff_with_a_nan_or_signed_samples_is_refused_naming_the_file(tmp_path):
    image = np.full((2, 2, 3), 0.5, np.float32)
    image[1, 0, 2] = np.nan
    image[0, 1, 1] = np.inf
    path = tmp_path / "nan.tif"
    assert cv2.imwrite(str(path), image)
    with pytest.raises(utils.ImageReadError, match=r"nan\.tif: 2 floating-point samples"):
        utils.read_image(path)
    signed = tmp_path / "signed.tif"
    assert cv2.imwrite(str(signed), np.full((2, 2, 3), -3, np.int16))
    with pytest.raises(utils.ImageReadError, match=r"signed\.tif: int16 samples"):
        utils.read_image(signed)


def test_a_checkpoint_with_a_non_finite_value_is_refused_naming_the_tensor(tmp_path):
    """A backbone with one NaN weight used to load and score (a perfect rank-1 once)."""
    state = {"conv.weight": torch.zeros(2, 3), "labels": torch.arange(4),
             "fc.weight": torch.ones(4, 5), "bn.weight": torch.full((3,), float("inf"))}
    state["fc.weight"][1, 2] = float("nan")
    state["fc.weight"][3, 0] = float("-inf")
    path = tmp_path / "backbone.pt"
    torch.save(state, path)
    for load in (utils.load_checkpoint, utils.load_backbone_state):
        with pytest.raises(utils.CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: not finite: tensor 'fc.weight' holds 2 NaN/inf "
                                  "values of its 20"), message
        assert "1 more tensor" in message, message  # bn.weight
    # nested in a training checkpoint: the tensor's whole name
    momentum = torch.zeros(6)
    momentum[5] = float("nan")
    torch.save({"backbone": {"fc.weight": torch.ones(2, 2)}, "step": 3,
                "optimizer": {"state": {0: {"momentum_buffer": momentum}}, "param_groups": []}},
               path)
    with pytest.raises(utils.CheckpointError,
                       match=r"tensor 'optimizer\.state\.0\.momentum_buffer' holds 1 NaN/inf "
                             r"value of its 6"):
        utils.load_checkpoint(path)
    # finite floats, integers and plain values load as saved
    good = {"w": torch.randn(3, 3), "rng": torch.arange(5, dtype=torch.uint8), "lr": 0.1,
            "logs": {"loss": [float("nan")]}}
    torch.save(good, path)
    loaded = utils.load_checkpoint(path)
    assert torch.equal(loaded["w"], good["w"]) and loaded["lr"] == 0.1


def test_file_sha256_is_the_content_hash_and_sees_a_rewrite_under_the_old_time_stamp(tmp_path):
    import hashlib

    from utils import HASH_CHUNK_BYTES, file_sha256

    path = tmp_path / "weights.pt"
    first = os.urandom(HASH_CHUNK_BYTES + 7)  # more than one read
    path.write_bytes(first)
    assert file_sha256(path) == hashlib.sha256(first).hexdigest()
    stamp = path.stat()
    second = bytes(reversed(first))  # same size
    path.write_bytes(second)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert file_sha256(path) == hashlib.sha256(second).hexdigest()
