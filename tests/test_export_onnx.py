import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import export_onnx


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


def test_cli_missing_checkpoint_is_a_clear_error(tmp_path, caplog):
    export_onnx.log.addHandler(caplog.handler)  # the module's logger does not propagate
    try:
        assert export_onnx.main(["--checkpoint", str(tmp_path / "none.pt")]) == 1
    finally:
        export_onnx.log.removeHandler(caplog.handler)
    assert str(tmp_path / "none.pt") in caplog.text  # the error names the file
    assert not list(tmp_path.iterdir())  # and no ONNX file was written
