"""Flags and values are checked where they are parsed: a bad --device or an impossible number
is one ``error:`` line naming the flag, before any work, in every script (issue 17, class 6).
Parsing only: every command names inputs that do not exist, so a value that got through
would end in another error (not naming the flag) instead of running anything."""

import argparse
import importlib
import math

import pytest
import torch

from config import ConfigError, make_config
from utils import (
    DeviceError,
    fraction,
    get_device,
    int_at_least,
    positive_float,
    positive_int,
    run_cli,
)

# "cuda" where this machine has no CUDA; where it has, a GPU index it lacks
ABSENT_CUDA = (f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda")
BAD_DEVICES = ["mps", "meta", "gpu0", "CPU", "cuda:", "cuda:-1", "cuda:1 ", ABSENT_CUDA]


def _refusal(module: str, argv: list[str], capsys) -> tuple[int, str]:
    """Run ``module.main(argv)`` as the script would (run_cli; argparse's own exit) and
    return the exit status and stderr."""
    main = importlib.import_module(module).main
    try:
        code = run_cli(main, argv)
    except SystemExit as stop:  # argparse refuses a flag's value with exit status 2
        code = stop.code
    return code, capsys.readouterr().err


def _assert_one_error_naming(code: int, err: str, *named: str) -> None:
    assert isinstance(code, int) and code != 0, (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert all(word in errors[0] for word in named), errors[0]


def _device_commands(tmp: str) -> dict[str, list[str]]:
    """Each script with a --device flag, with inputs that do not exist."""
    return {
        "train": ["--rec", f"{tmp}/none.rec", "--output", f"{tmp}/run"],
        "lfw_eval": ["--checkpoint", f"{tmp}/none.pt", "--lfw-dir", f"{tmp}/lfw"],
        "megaface": ["--action", "evaluate", "--features-dir", f"{tmp}/features"],
        "ijb_eval": ["--checkpoint", f"{tmp}/none.pt", "--ijb-dir", f"{tmp}/ijb"],
        "align_faces": [f"{tmp}/src", f"{tmp}/dst"],
    }


@pytest.mark.parametrize("script", sorted(_device_commands("")))
@pytest.mark.parametrize("device", BAD_DEVICES)
def test_every_device_flag_refuses_what_the_toolkit_cannot_run_on(script, device, tmp_path,
                                                                   capsys):
    argv = _device_commands(str(tmp_path))[script] + ["--device", device]
    code, err = _refusal(script, argv, capsys)
    _assert_one_error_naming(code, err, "--device", device.strip())
    assert err.count("\n") == 1 and err.startswith("error: "), err  # no usage either
    if device != ABSENT_CUDA:  # a name of no device: the line lists what is accepted
        assert "auto, cpu, cuda or cuda:N" in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_get_device_accepts_this_machines_devices_and_refuses_the_rest():
    accepted = ["auto", "cpu"] + (["cuda", "cuda:0"] if torch.cuda.is_available() else [])
    for name in accepted:
        expected = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
        assert get_device(name) == torch.device(expected)
    for name in BAD_DEVICES:
        with pytest.raises(DeviceError, match=f"--device {name}: "):
            get_device(name)


def test_a_config_file_device_is_checked_by_spelling_not_by_this_machine(tmp_path):
    """A run's config names the device of the machine it trained on: another machine may read
    it; a device the toolkit never runs on is refused wherever it comes from."""
    assert make_config({"device": "cuda:3"}).device == "cuda:3"
    path = tmp_path / "exp.json"
    path.write_text('{"device": "mps"}')
    with pytest.raises(ConfigError, match=r"exp\.json: device: 'mps' is not a device"):
        make_config(config_file=path)


def test_a_script_refuses_a_config_files_device_that_this_machine_lacks(tmp_path, capsys):
    path = tmp_path / "exp.json"
    path.write_text(f'{{"device": "{ABSENT_CUDA}"}}')
    argv = ["--config", str(path), "--checkpoint", str(tmp_path / "none.pt")]
    code, err = _refusal("lfw_eval", argv, capsys)
    _assert_one_error_naming(code, err, f"--device {ABSENT_CUDA}: ")


# (script, its other arguments with {tmp} for a missing folder, the flag, the bad value)
NUMBER_CASES = [
    ("train", ["--rec", "{tmp}/none.rec", "--output", "{tmp}/run"], "--embedding-size", "0"),
    ("train", ["--rec", "{tmp}/none.rec", "--output", "{tmp}/run"], "--margin-m", "10"),
    ("train", ["--rec", "{tmp}/none.rec", "--output", "{tmp}/run"], "--margin-warmup", "2"),
    ("train", ["--rec", "{tmp}/none.rec", "--output", "{tmp}/run"], "--momentum", "1.5"),
    ("train", ["--rec", "{tmp}/none.rec", "--output", "{tmp}/run", "--head", "cosface"],
     "--margin-m", "1.0"),
    ("train", ["--rec", "{tmp}/none.rec", "--output", "{tmp}/run"], "--margin-m1", "0"),
    ("train", ["--rec", "{tmp}/none.rec", "--output", "{tmp}/run"], "--margin-m3", "-0.1"),
    ("train", ["--rec", "{tmp}/none.rec", "--output", "{tmp}/run"], "--seed", str(2**64)),
    ("lfw_eval", ["--checkpoint", "{tmp}/none.pt"], "--embedding-size", "0"),
    ("ijb_eval", ["--checkpoint", "{tmp}/none.pt", "--ijb-dir", "{tmp}/ijb"], "--workers", "0"),
    ("megaface", ["--action", "evaluate", "--features-dir", "{tmp}/f"], "--chunk-size", "-5"),
    ("megaface", ["--action", "evaluate", "--features-dir", "{tmp}/f"], "--sizes", "0"),
    ("megaface", ["--action", "evaluate", "--features-dir", "{tmp}/f"], "--max-rank", "0"),
    ("megaface", ["--action", "evaluate", "--features-dir", "{tmp}/f"], "--fars", "1.5"),
    ("megaface", ["--action", "evaluate", "--features-dir", "{tmp}/f"], "--fars", "0"),
    ("pre_process", ["--pack", "{tmp}/src", "--out", "{tmp}/x.rec"], "--quality", "500"),
    ("pre_process", ["--pack", "{tmp}/src", "--out", "{tmp}/x.rec"], "--quality", "-1"),
    ("pre_process", ["--pack", "{tmp}/src", "--out", "{tmp}/x.rec"], "--image-size", "0"),
    ("models", [], "--image-size", "0"),
    ("models", [], "--embedding-size", "0"),
    ("export_onnx", ["--checkpoint", "{tmp}/none.pt"], "--embedding-size", "0"),
    ("export_onnx", ["--checkpoint", "{tmp}/none.pt"], "--tolerance", "0"),
    ("export_onnx", ["--checkpoint", "{tmp}/none.pt"], "--tolerance", "nan"),
    ("data_gen", ["--rec", "{tmp}/none.rec"], "--batches", "0"),
    ("records.recordio", ["{tmp}/none.rec"], "--limit", "0"),
    ("demo", ["--data-dir", "{tmp}/data", "--run-dir", "{tmp}/run"], "--eval-images", "1"),
    ("demo", ["--data-dir", "{tmp}/data", "--run-dir", "{tmp}/run"], "--train-identities",
     "0"),
    ("demo", ["--data-dir", "{tmp}/data", "--run-dir", "{tmp}/run"], "--epochs", "0"),
]


@pytest.mark.parametrize("script, args, flag, value", NUMBER_CASES,
                         ids=[f"{c[0]}{c[2]}={c[3]}" for c in NUMBER_CASES])
def test_impossible_numbers_are_refused_naming_the_flag(script, args, flag, value, tmp_path,
                                                        capsys):
    argv = [a.format(tmp=tmp_path) for a in args] + [flag, value]
    code, err = _refusal(script, argv, capsys)
    _assert_one_error_naming(code, err, flag, value)
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_the_number_types_accept_their_whole_range():
    assert int_at_least(0, 100)("0") == 0 and int_at_least(0, 100)("100") == 100
    assert positive_int("1") == 1 and positive_float("1e-9") == 1e-9
    assert fraction("1") == 1.0 and fraction("1e-6") == 1e-6
    for parse, text in ((int_at_least(0, 100), "101"), (positive_int, "1.5"),
                        (positive_float, "inf"), (positive_float, "-1"), (fraction, "nan"),
                        (fraction, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("values", [
    {"head": "arcface", "margin_m": 1.5},  # unusual (about 86 degrees), not impossible
    {"head": "cosface", "margin_m": 0.9},
    {"head": "combined", "margin_m1": 1.35, "margin_m": 0.5, "margin_m3": 0.8},
    {"head": "combined", "margin_m1": 0.9, "margin_m": 0.0, "margin_m3": 0.0},
    {"margin_warmup": 1.0, "momentum": 0.99, "seed": -1, "embedding_size": 1},
])
def test_unusual_but_learnable_values_are_accepted(values):
    cfg = make_config(values)
    assert all(getattr(cfg, k) == v for k, v in values.items())


ACOS_SLACK = 2e-3  # cos(acos(1 - 1e-6) + m) differs from cos(m) by at most ~1.4e-3
MARGIN_STEP = 1e-2  # how far inside a bound a margin is still learnable


def _best_target_cosine(head: str, m: float, m3: float = 0.0) -> float:
    """The target's cosine at theta = 0 from the formulas themselves (float64)."""
    from arcface_loss import arcface_target, combined_target, cosface_target

    one = torch.ones(1, 1, dtype=torch.float64)
    target = {"arcface": lambda: arcface_target(one, m),
              "cosface": lambda: cosface_target(one, m),
              "combined": lambda: combined_target(one, 1.0, m, m3)}[head]
    return float(target())


@pytest.mark.parametrize("head, m, m3", [("arcface", math.pi / 2, 0.0), ("cosface", 1.0, 0.0),
                                         ("combined", math.pi / 2, 0.0),
                                         ("combined", 0.5, math.cos(0.5))])
def test_a_margin_is_refused_where_the_target_can_no_longer_beat_an_unrelated_class(
        head, m, m3):
    """At the bound the target's best cosine (theta = 0) is 0, an unrelated centre's; just
    inside it, positive: the formulas, not the bounds, say where learning ends."""
    # combined_target's acos is clamped inside [-1, 1], so theta = 0 is 1.4e-3 there
    assert _best_target_cosine(head, m, m3) == pytest.approx(0.0, abs=ACOS_SLACK)
    inside = (m - MARGIN_STEP, m3) if m3 == 0.0 else (m, m3 - MARGIN_STEP)
    assert _best_target_cosine(head, *inside) > 0
    make_config({"head": head, "margin_m": inside[0], "margin_m3": inside[1]})
    with pytest.raises(ConfigError, match="margin_m"):
        make_config({"head": head, "margin_m": m, "margin_m3": m3})


def test_models_counts_the_flops_of_the_image_size_asked_for(capsys):
    """A network built for 224 px inputs does exactly 4x the 112 px work: every layer that
    FlopCounterMode counts (convolutions, the output Linear over C x h x w) scales with the
    area (ir_narrow: no squeeze-excitation, whose pooled layers would not)."""
    from models import build_model, main, model_flops

    with torch.device("meta"):
        small, large = build_model("ir_narrow"), build_model("ir_narrow", image_size=224)
    assert model_flops(large, 224) == 4 * model_flops(small, 112)
    main(["--network", "ir_narrow", "--image-size", "56"])
    assert "per 56x56 image" in capsys.readouterr().out
