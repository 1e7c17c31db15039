"""Backbones: parameter counts against InsightFace's, shapes, FLOPs against a hand count,
and loading saved weights."""

import json

import pytest
import torch

import models
from models import build_model, count_parameters, load_backbone, model_flops

# InsightFace arcface_torch's iresnet parameter counts at E=512, in millions.
INSIGHTFACE_PARAMS_M = {"ir18": 24.0, "ir34": 34.1, "ir50": 43.6, "ir100": 65.2, "ir200": 118.8}


@pytest.mark.parametrize("name", sorted(INSIGHTFACE_PARAMS_M))
def test_parameter_counts_match_insightface(name):
    with torch.device("meta"):  # construction only: no memory, no forward
        model = build_model(name, 512)
    params_m = count_parameters(model) / 1e6
    assert abs(params_m - INSIGHTFACE_PARAMS_M[name]) / INSIGHTFACE_PARAMS_M[name] < 0.01


def test_light_models_parameter_counts():
    with torch.device("meta"):
        narrow = build_model("ir_narrow", 128)
        mobile = build_model("mobilefacenet", 128)
        ir50 = build_model("ir50", 512)
        se50 = build_model("ir_se50", 512)
    assert abs(count_parameters(narrow) / 1e6 - 1.1) < 0.05  # issue 6: ~1.1M at E=128
    assert abs(count_parameters(mobile) / 1e6 - 0.99) < 0.02  # MobileFaceNet paper: 0.99M
    assert count_parameters(se50) > count_parameters(ir50)  # SE units add weights


@pytest.mark.parametrize("name", ["ir_narrow", "ir18", "mobilefacenet"])
def test_forward_shape(name):
    torch.manual_seed(0)
    model = build_model(name, embedding_size=64, dropout=0.1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_squeeze_excitation_forward():
    torch.manual_seed(0)
    model = models.IResNet((1, 1, 1, 1), models.NARROW_WIDTHS, models.NARROW_STRIDES,
                           stem_stride=2, embedding_size=16, use_se=True).eval()
    assert isinstance(model.layer1[0].se, models.SEModule)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_every_name_builds_and_unknown_name_is_refused():
    with torch.device("meta"):
        for name in models.MODEL_NAMES:
            assert isinstance(build_model(name, 32), torch.nn.Module)
    with pytest.raises(ValueError, match="unknown network"):
        build_model("ir51")


def test_channels_last_and_training_step():
    torch.manual_seed(0)
    model = build_model("ir_narrow", 32).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    model.train()
    model(torch.randn(2, 3, 112, 112)).square().mean().backward()
    assert model.conv1.weight.grad is not None
    assert model.features.weight.grad is None  # BN1d scale frozen at 1, as InsightFace


def _conv_macs(cin, cout, k, out_hw, groups=1):
    return cin // groups * cout * k * k * out_hw * out_hw


def test_flops_against_hand_count():
    # ir_narrow, E=32, counted by hand from its layout: stem 3->16 stride 2 (56x56), stage 1
    # 16->16 stride 1 (identity shortcut), stages 2-4 stride 2 with 1x1 projection shortcuts.
    e = 32
    macs = _conv_macs(3, 16, 3, 56)
    macs += 2 * _conv_macs(16, 16, 3, 56)
    for cin, cout, in_hw in [(16, 32, 56), (32, 64, 28), (64, 128, 14)]:
        out_hw = in_hw // 2
        macs += _conv_macs(cin, cout, 3, in_hw)  # conv1 keeps the resolution
        macs += _conv_macs(cout, cout, 3, out_hw)  # conv2 strides
        macs += _conv_macs(cin, cout, 1, out_hw)  # projection shortcut
    macs += 128 * 7 * 7 * e
    assert model_flops(build_model("ir_narrow", e)) == 2 * macs


def test_cli_prints_params_and_flops(capsys):
    models.main(["--network", "ir18"])
    out = capsys.readouterr().out
    assert "24.03M parameters" in out and "GFLOPs" in out


def _save_state(path, model, wrap=False, prefix=""):
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"backbone": state, "epoch": 3} if wrap else state, path)


@pytest.mark.parametrize("wrap,prefix", [(False, ""), (True, "module.")])
def test_load_backbone_round_trip(tmp_path, wrap, prefix):
    torch.manual_seed(0)
    model = build_model("ir_narrow", 16)
    model.train()
    model(torch.randn(4, 3, 112, 112))  # move the BN running statistics off their defaults
    model.eval()
    path = tmp_path / "run" / "backbone.pt"
    path.parent.mkdir()
    _save_state(path, model, wrap, prefix)
    (path.parent / "config.json").write_text(json.dumps({"network": "ir_narrow",
                                                         "embedding_size": 16}))
    loaded = load_backbone(path)
    assert not loaded.training
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_load_backbone_reads_embedding_size_from_weights(tmp_path):
    model = build_model("ir_narrow", 24)
    path = tmp_path / "weights.pt"
    _save_state(path, model)
    loaded = load_backbone(path, network="ir_narrow")
    assert loaded.fc.out_features == 24


def test_load_backbone_errors_name_the_file(tmp_path):
    path = tmp_path / "weights.pt"
    _save_state(path, build_model("ir_narrow", 16))
    with pytest.raises(ValueError, match="weights.pt.*network"):
        load_backbone(path)  # no network given, no config.json
    with pytest.raises(ValueError, match="weights.pt.*do not match") as err:
        load_backbone(path, network="mobilefacenet")
    assert "\n" not in str(err.value) and "missing (e.g." in str(err.value)
    # the same network with another embedding size: the shapes that differ, from the file
    state = build_model("ir_narrow", 16).state_dict()
    expected = build_model("ir_narrow", 24).state_dict()
    reshaped = [k for k in state if state[k].shape != expected[k].shape]
    with pytest.raises(ValueError, match="do not match") as err:
        load_backbone(path, network="ir_narrow", embedding_size=24)
    message = str(err.value)
    assert "\n" not in message and f"{len(reshaped)} of another shape" in message
    assert "missing" not in message and "unexpected" not in message
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_backbone(tmp_path / "missing.pt", network="ir_narrow", embedding_size=16)


def test_load_backbone_reports_the_file_before_the_network(tmp_path):
    """A missing or empty checkpoint, with no network known, is reported as what it is, not
    as 'cannot tell which network it holds'."""
    import utils

    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_backbone(missing)
    assert str(info.value) == f"checkpoint not found: {missing}"
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(utils.CheckpointError) as info:
        load_backbone(tmp_path / "empty.pt")
    assert "empty" in str(info.value) and "network" not in str(info.value)
    with pytest.raises(utils.ToolkitError, match="unknown network"):  # one line via run_cli
        load_backbone(_save_state_file(tmp_path), network="resnet9000")


def _save_state_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("ir_narrow", 8).state_dict(), path)
    return path


def test_lfw_eval_cli_names_a_missing_or_empty_checkpoint(tmp_path, capsys):
    import lfw_eval
    from utils import run_cli

    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, expected in (("missing.pt", "checkpoint not found: {}"),
                           ("empty.pt", "{}: empty file, not a checkpoint")):
        ckpt = tmp_path / name
        rc = run_cli(lfw_eval.main, ["--checkpoint", str(ckpt), "--bin",
                                     str(tmp_path / "empty.bin"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc != 0 and err == f"error: {expected.format(ckpt)}\n", err



def _output_layer_in_float64(h, fc, bn):
    """Linear then eval-mode BatchNorm1d, written out in float64."""
    y = h.double() @ fc.weight.detach().double().T
    if fc.bias is not None:
        y = y + fc.bias.detach().double()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return (y - bn.running_mean.double()) * scale + bn.bias.detach().double()


OUTPUT_LAYER_NETS = {  # networks whose Linear + BN1d output layer must run in float32
    "ir": lambda: models.IResNet((1, 1, 1, 1), models.NARROW_WIDTHS, models.NARROW_STRIDES,
                                 stem_stride=2, embedding_size=16),
    "ir_se": lambda: models.IResNet((1, 1, 1, 1), models.NARROW_WIDTHS, models.NARROW_STRIDES,
                                    stem_stride=2, embedding_size=16, use_se=True),
    "mobilefacenet": lambda: models.MobileFaceNet(embedding_size=16),
}


@pytest.mark.parametrize("net", sorted(OUTPUT_LAYER_NETS))
def test_output_layer_runs_in_float32_under_autocast(net):
    """arcface_torch runs the IR nets' fc and features BN outside autocast, in float32 (its
    mbf likewise); under bf16/fp16 autocast ours gave a half-precision embedding (about 3
    significant digits), the IR nets and the paper MobileFaceNet alike."""
    torch.manual_seed(0)
    model = OUTPUT_LAYER_NETS[net]()
    with torch.no_grad():  # eval statistics away from the identity
        model.features.running_mean.uniform_(-0.5, 0.5)
        model.features.running_var.uniform_(0.5, 2.0)
        model.features.bias.uniform_(-0.5, 0.5)
    model.eval()
    seen = []
    model.dropout.register_forward_hook(lambda m, i, o: seen.append(torch.flatten(o, 1)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 112, 112))
    want = _output_layer_in_float64(seen[0], model.fc, model.features)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32
