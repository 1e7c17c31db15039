import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import export_onnx
import utils


class TinyEmbedder(nn.Module):
    """A small conv net with BN and PReLU, like the IR blocks, with a 16-D embedding."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.BatchNorm2d(4),
                                  nn.PReLU(4), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(16, 16), nn.BatchNorm1d(16))

    def forward(self, x):
        return self.body(x)


class ExportDivergentModel(TinyEmbedder):
    """Permutes its embedding only while being exported, so the ONNX graph disagrees."""

    def forward(self, x):
        out = self.body(x)
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():
            out = torch.roll(out, shifts=1, dims=1)
        return out


def _trained_like(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():  # non-trivial BN statistics so eval-mode BN matters
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_onnx_parity_dynamic_batch(tmp_path):
    model = _trained_like(TinyEmbedder())
    diff = export_onnx.export_and_verify(model, tmp_path / "m.onnx")
    assert diff < export_onnx.PARITY_TOLERANCE
    # independent check with a batch size never used at export, against eager PyTorch
    x = torch.randn(5, 3, 112, 112)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (5, 16)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_real_backbone_parity(tmp_path):
    from models import build_model

    model = _trained_like(build_model("ir_narrow", embedding_size=32))
    assert export_onnx.export_and_verify(model, tmp_path / "b.onnx") < 1e-4


def test_mismatch_is_refused_and_file_removed(tmp_path):
    with pytest.raises(export_onnx.ParityError, match="differ"):
        export_onnx.export_and_verify(_trained_like(ExportDivergentModel()), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_cli_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    from utils import run_cli

    assert run_cli(export_onnx.main, ["--checkpoint", str(tmp_path / "none.pt")]) == 1
    # one line naming the file (printed by run_cli, as every script's errors)
    assert capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'none.pt'}\n"
    assert not list(tmp_path.iterdir())  # and no ONNX file was written


# ----------------------------------------------------------------------------- the written file

def _run_alone(onnx_file, x):
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"images": x.numpy()})
    return got


def test_small_model_is_one_self_contained_file(tmp_path):
    """The weights live inside the .onnx: copied alone to another folder it loads and
    computes what eager PyTorch does; nothing else is left beside it; umask mode."""
    from models import build_model

    model = _trained_like(build_model("ir_narrow", embedding_size=16))
    umask = 0o027  # not the usual 0o022, so following it is seen
    old = os.umask(umask)
    try:
        export_onnx.export_and_verify(model, tmp_path / "out" / "b.onnx")
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.onnx"]
    assert (tmp_path / "out" / "b.onnx").stat().st_mode & 0o777 == 0o666 & ~umask
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "out" / "b.onnx", elsewhere / "copy.onnx")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(_run_alone(elsewhere / "copy.onnx", x), want,
                               atol=1e-4, rtol=1e-4)


def test_external_data_is_named_after_the_final_file(tmp_path):
    """Past the single-file limit (forced low here) the weights go to <out>.data, renamed
    together with the .onnx; the pair moved elsewhere still loads."""
    model = _trained_like(TinyEmbedder())
    out = tmp_path / "out" / "m.onnx"
    export_onnx.export_onnx(model, out, single_file_max_bytes=0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    moved = tmp_path / "moved"
    shutil.move(out.parent, moved)
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(_run_alone(moved / "m.onnx", x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("external", [False, True], ids=["single", "external"])
def test_failed_export_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch, external):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    real_save = torch.onnx.ONNXProgram.save

    def save_then_fail(self, destination, **kwargs):
        real_save(self, destination, **kwargs)  # the files are written, then it breaks
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", save_then_fail)
    with pytest.raises(OSError):
        export_onnx.export_onnx(_trained_like(TinyEmbedder()), out,
                                single_file_max_bytes=0 if external else 2**40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert out.read_bytes() == b"the previous export"


def test_parity_failure_writes_nothing(tmp_path):
    out = tmp_path / "bad.onnx"
    out.write_bytes(b"the previous export")
    with pytest.raises(export_onnx.ParityError) as info:
        export_onnx.export_and_verify(_trained_like(ExportDivergentModel()), out)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]
    assert out.read_bytes() == b"the previous export"


def test_cli_empty_checkpoint_is_one_line(tmp_path, capsys):
    from utils import run_cli

    (tmp_path / "empty.pt").write_bytes(b"")
    argv = ["--checkpoint", str(tmp_path / "empty.pt"), "--out", str(tmp_path / "m.onnx")]
    assert run_cli(export_onnx.main, argv) == 1
    expected = f"error: {tmp_path / 'empty.pt'}: empty file, not a checkpoint\n"
    assert capsys.readouterr().err == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.pt"]


def test_remove_stale_staging_only_touches_that_exports_folders(tmp_path):
    stale = tmp_path / ".m.onnx.k2j4.onnx-staging"
    stale.mkdir()
    (stale / "m.onnx.data").write_bytes(b"half")
    (tmp_path / ".other.onnx.x1.onnx-staging").mkdir()
    (tmp_path / "m.onnx").write_bytes(b"good")
    assert utils.remove_stale_temporaries(tmp_path, "m.onnx", export_onnx.STAGING_SUFFIX) \
        == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.onnx.x1.onnx-staging",
                                                          "m.onnx"]


# ----------------------------------------------------------------------------- non-finite models

OVERFLOW_SCALE = 1e30  # fc weights and BN scale of this size: finite, but their product is inf


def _saved_ir_narrow(tmp_path, change) -> "os.PathLike":
    from models import build_model

    model = build_model("ir_narrow", embedding_size=16).eval()
    with torch.no_grad():
        change(model)
    path = tmp_path / "backbone.pt"
    torch.save(model.state_dict(), path)
    return path


def test_cli_non_finite_weights_name_the_checkpoint_and_tensor(tmp_path, capsys):
    """One NaN weight used to be exported and fail as "differ from PyTorch by nan"."""
    from utils import run_cli

    path = _saved_ir_narrow(tmp_path, lambda m: m.fc.weight.view(-1)[7].fill_(float("nan")))
    argv = ["--checkpoint", str(path), "--network", "ir_narrow", "--out", str(tmp_path / "m.onnx")]
    assert run_cli(export_onnx.main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: not finite: tensor 'fc.weight' holds 1 NaN/inf "
                          "value of its") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt"]


def test_cli_a_model_that_overflows_is_named_before_any_export(tmp_path, capsys, monkeypatch):
    """Finite weights whose embeddings overflow to inf: the checkpoint is named, not a NaN
    parity difference, and nothing is exported."""
    from utils import run_cli

    def overflow(model):
        model.fc.weight.mul_(OVERFLOW_SCALE)
        model.features.weight.fill_(OVERFLOW_SCALE)

    path = _saved_ir_narrow(tmp_path, overflow)
    monkeypatch.setattr(export_onnx, "export_onnx",
                        lambda *a, **k: pytest.fail("exported a model that gives inf"))
    argv = ["--checkpoint", str(path), "--network", "ir_narrow", "--out", str(tmp_path / "m.onnx")]
    assert run_cli(export_onnx.main, argv) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {path}: the model gives non-finite (NaN/inf) embeddings for "
                   f"{export_onnx.PARITY_BATCH} of {export_onnx.PARITY_BATCH} test images; "
                   "nothing was written\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt"]


def test_cli_export_records_the_checkpoint_it_came_from(tmp_path):
    """The .onnx said nothing of its checkpoint: a deployed model could not be matched with
    the weights (and evaluation results) it came from."""
    import hashlib

    path = _saved_ir_narrow(tmp_path, lambda m: None)
    out = tmp_path / "m.onnx"
    assert export_onnx.main(["--checkpoint", str(path), "--network", "ir_narrow",
                             "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    # and how to feed it (the protocol: RGB crops, (x - 127.5) / 127.5), undocumented before
    convention = meta.pop("input")
    assert "float32 N x 3 x 112 x 112" in convention and "RGB" in convention
    assert "(pixel - 127.5) / 127.5" in convention
    assert meta == {"checkpoint": str(path),
                    "checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_metadata_with_external_weights_keeps_the_pair_loadable(tmp_path):
    model = _trained_like(TinyEmbedder())
    out = tmp_path / "out" / "m.onnx"
    export_onnx.export_onnx(model, out, single_file_max_bytes=0,
                            metadata={"checkpoint_sha256": "ab" * 32})
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(_run_alone(out, x), want, atol=1e-4, rtol=1e-4)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == {"checkpoint_sha256": "ab" * 32}


def test_cli_refuses_a_checkpoint_named_as_the_weights_file_of_out(tmp_path, capsys):
    """--out m.onnx with --checkpoint m.onnx.data: a one-file export unlinked <out>.data (a
    larger one replaced it), so the export deleted the checkpoint it was made from."""
    from utils import run_cli

    path = _saved_ir_narrow(tmp_path, lambda m: None).rename(tmp_path / "m.onnx.data")
    before = path.read_bytes()
    argv = ["--checkpoint", str(path), "--network", "ir_narrow", "--out", str(tmp_path / "m.onnx")]
    assert run_cli(export_onnx.main, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and str(path) in err and err.count("\n") == 1, err
    assert path.read_bytes() == before  # the checkpoint is still there, unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]
