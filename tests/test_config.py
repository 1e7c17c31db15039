import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import config
from config import Config, make_config, parse_config


def test_defaults_match_the_arcface_recipe():
    cfg = Config()
    assert (cfg.network, cfg.embedding_size, cfg.margin_m, cfg.scale_s) == ("ir50", 512, 0.5, 64.0)
    assert cfg.rec.startswith("data/")
    assert (cfg.momentum, cfg.weight_decay, cfg.grad_clip) == (0.9, 5e-4, 5.0)


def test_cli_flags_override_defaults():
    cfg, _ = parse_config(["--lr", "0.05", "--batch-size", "32", "--network", "ir18",
                           "--no-channels-last", "--val-bins", "a.bin", "b.bin"])
    assert cfg.lr == 0.05 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 32 and isinstance(cfg.batch_size, int)
    assert cfg.network == "ir18"
    assert cfg.channels_last is False
    assert cfg.val_bins == ["a.bin", "b.bin"]
    # untouched fields keep their defaults
    assert cfg.margin_m == Config().margin_m


def test_precedence_defaults_preset_file_flags(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"lr": 0.2, "epochs": 3, "network": "ir34"}))
    cfg, _ = parse_config(["--preset", "demo", "--config", str(path), "--epochs", "5"])
    assert cfg.epochs == 5  # flag beats file
    assert cfg.lr == 0.2 and cfg.network == "ir34"  # file beats preset
    assert cfg.embedding_size == config.PRESETS["demo"]["embedding_size"]  # preset beats default
    assert cfg.margin_m1 == Config().margin_m1  # default where nobody spoke


def test_python_config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("config = dict(scale_s=30.0, head='cosface')\n")
    cfg = make_config(config_file=path)
    assert cfg.scale_s == 30.0 and cfg.head == "cosface"


@pytest.mark.parametrize("content, message", [
    ('{"learning_rate": 1}', "unknown config field"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_config_file_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        make_config(config_file=path)
    assert "bad.json" in str(info.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ValueError, match="unknown preset"):
        make_config(preset="nope")
    with pytest.raises(FileNotFoundError):
        make_config(config_file="does/not/exist.json")


def test_save_round_trip(tmp_path):
    cfg = make_config({"lr": 0.3, "val_bins": ["x.bin"]})
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert Config(**saved) == cfg
    assert "lr" in cfg.pretty()


def test_help_explains_the_flags_from_the_dataclass_comments():
    text = " ".join(config.build_parser("x").format_help().split())  # unwrap argparse's lines
    assert "--lr LR for a global batch of base_batch_size, scaled linearly (default 0.1)" \
        in text
    assert "Partial FC: fraction of class centres per step (0: the batch's) (default 1.0)" in text
    assert "--seed SEED (default 42)" in text  # no comment: the default alone


def test_demo_preset_names_what_the_demo_builds():
    """`python train.py --preset demo` after `make demo` trains on the set the demo packed,
    into a folder of its own: the demo's run in runs/demo would (rightly) be refused as an
    output that already holds a run."""
    import demo

    cfg = make_config(preset="demo")
    assert Path(cfg.rec) == Path(demo.DEFAULT_DATA_DIR) / demo.REC_NAME
    assert Path(cfg.output) != Path(demo.DEFAULT_RUN_DIR)


def test_a_script_parser_lists_only_the_fields_it_uses():
    parser = config.build_parser("eval", only=["batch_size", "device"])
    text = parser.format_help()
    assert "--batch-size" in text and "--device" in text
    assert "--lr" not in text and "--margin-m" not in text
    cfg, _ = config.parse_config(["--batch-size", "7", "--preset", "demo"], parser=parser)
    assert cfg.batch_size == 7 and cfg.network == config.PRESETS["demo"]["network"]
    with pytest.raises(SystemExit):  # a training flag is not accepted by an eval script
        config.parse_config(["--lr", "0.1"], parser=parser)
    with pytest.raises(ValueError, match="not Config fields"):
        config.build_parser("x", only=["batch_sise"])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field, value, expected", [
    ("batch_size", 0, ">= 1"),
    ("batch_size", -1, ">= 1"),
    ("base_batch_size", 0, ">= 1"),
    ("lr", 0.0, "> 0"),
    ("lr", -0.0125, "> 0"),
    ("lr", float("nan"), "finite"),
    ("scale_s", 0.0, "> 0"),
    ("margin_m", -0.1, ">= 0"),
    ("sample_rate", -0.1, "in [0, 1]"),
    ("sample_rate", 1.5, "in [0, 1]"),
    ("epochs", 0, ">= 1"),
    ("save_every", -1, ">= 0"),
    ("verify_every", -5, ">= 0"),
    ("log_every", -1, ">= 0"),
    ("momentum", -0.9, ">= 0"),
    ("weight_decay", -1e-4, ">= 0"),
    ("grad_clip", -1.0, ">= 0"),
    ("num_workers", -1, ">= 0"),
    ("max_steps", -1, ">= 0"),
    ("dropout", 1.0, "in [0, 1)"),
    ("warmup_epochs", -1.0, ">= 0"),
    ("margin_warmup", -0.5, ">= 0"),
    ("focal_gamma", -1.0, ">= 0"),
])
def test_values_out_of_range_are_refused_by_name(field, value, expected):
    with pytest.raises(config.ConfigError) as info:
        make_config({field: value})
    message = str(info.value)
    assert field in message and expected in message, message


@pytest.mark.parametrize("field, value, choices", [
    ("network", "ir51", "ir50"),
    ("head", "arcfcae", "cosface"),
    ("optimizer", "adam", "adamw"),
    ("scheduler", "step", "cosine"),
    ("amp", "fp8", "bf16"),
    ("compile_mode", "max-autotun", "max-autotune"),
])
def test_unknown_choices_are_refused_with_the_choices(field, value, choices):
    with pytest.raises(config.ConfigError) as info:
        make_config({field: value})
    message = str(info.value)
    assert field in message and repr(value) in message and choices in message, message


def test_nesterov_without_momentum_is_refused():
    with pytest.raises(config.ConfigError, match=r"nesterov: needs momentum > 0"):
        make_config({"nesterov": True, "momentum": 0.0})
    assert make_config({"nesterov": True, "momentum": 0.0, "optimizer": "adamw"}).nesterov


def test_warmup_longer_than_training_is_refused_naming_both_fields(tmp_path, capsys):
    """warmup_epochs 5 of epochs 3 was accepted: the lr never reached its peak."""
    from utils import run_cli

    with pytest.raises(config.ConfigError) as e:
        make_config({"warmup_epochs": 5.0, "epochs": 3})
    assert str(e.value).startswith("overrides: warmup_epochs: 5.0 is more than epochs (3)")
    capsys.readouterr()
    assert run_cli(lambda argv: parse_config(argv), ["--epochs", "2", "--warmup-epochs",
                                                     "2.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --warmup-epochs: 2.5 is more than --epochs (2)"), err
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"warmup_epochs": 4}))
    with pytest.raises(config.ConfigError, match=rf"^{re.escape(str(path))}: warmup_epochs: 4.0 "
                                                 r"is more than --epochs \(3\)"):
        make_config({"epochs": 3}, config_file=path, overrides_source=config.COMMAND_LINE)
    # as long as training, or shorter: accepted
    assert make_config({"warmup_epochs": 3.0, "epochs": 3}).warmup_epochs == 3.0


def test_the_choice_lists_agree_with_the_models_and_heads_they_name():
    # config.py spells the names so that reading a config does not import torch
    import arcface_loss
    import models

    assert config.NETWORK_NAMES == models.MODEL_NAMES
    assert config.HEAD_NAMES == arcface_loss.HEAD_NAMES


def test_reading_a_config_does_not_import_torch():
    import subprocess
    import sys

    probe = "import sys, config; config.make_config({}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(config.__file__).parent).stdout
    assert out.strip() == "False"


def test_every_named_choice_is_accepted():
    import arcface_loss
    import models

    for name in models.MODEL_NAMES:
        assert make_config({"network": name}).network == name
    for head in arcface_loss.HEAD_NAMES:
        assert make_config({"head": head}).head == head
    zero_is_off = make_config({"save_every": 0, "verify_every": 0, "log_every": 0,
                               "max_steps": 0, "margin_m": 0.0, "grad_clip": 0.0})
    assert zero_is_off.save_every == zero_is_off.log_every == 0


@pytest.mark.parametrize("field, value, kind", [
    ("momentum", "big", "number"),
    ("batch_size", 4.0, "integer"),
    ("batch_size", True, "integer"),  # bool is not an int here
    ("epochs", "20", "integer"),
    ("channels_last", "yes", "true or false"),
    ("channels_last", 1, "true or false"),
    ("network", 50, "string"),
    ("val_bins", "lfw.bin", "list of strings"),
    ("val_bins", ["lfw.bin", 3], "list of strings"),
])
def test_config_file_values_of_the_wrong_type_are_refused(tmp_path, field, value, kind):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(config.ConfigError) as info:
        make_config(config_file=path)
    message = str(info.value)
    assert str(path) in message and field in message and kind in message, message


def test_numbers_are_accepted_as_their_field_type(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("config = dict(lr=1, margin_m=0, val_bins=('a.bin',))\n")
    cfg = make_config(config_file=path)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.margin_m == 0.0 and isinstance(cfg.margin_m, float)
    assert cfg.val_bins == ["a.bin"]


def test_a_misspelt_field_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text('{"learning_rate": 0.1, "batchsize": 64}')
    with pytest.raises(config.ConfigError) as info:
        make_config(config_file=path)
    message = str(info.value)
    assert "exp.json" in message and "batchsize" in message and "batch_size" in message


def test_a_bad_flag_value_names_the_flag():
    with pytest.raises(config.ConfigError, match=r"--batch-size: must be >= 1, got 0"):
        parse_config(["--batch-size", "0"])


def test_a_python_config_file_that_fails_is_named(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("config = dict(lr=0.1,\n")
    with pytest.raises(config.ConfigError, match=re.escape(str(path)) + r".*SyntaxError"):
        make_config(config_file=path)
    path.write_text("config = dict(lr=undefined_name)\n")
    with pytest.raises(config.ConfigError, match=r"NameError.*undefined_name"):
        make_config(config_file=path)


@pytest.mark.parametrize("script", ["lfw_eval", "megaface", "pre_process"])
def test_evaluation_and_data_scripts_list_no_training_fields(script):
    import importlib

    text = importlib.import_module(script).build_arg_parser().format_help()
    for training_flag in ("--lr", "--margin-m", "--epochs", "--output"):
        assert training_flag not in text, (script, training_flag)


# ----------------------------------------------------------------------------- bad files, one line

def _run_config_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "config.py", *argv], capture_output=True, text=True,
                          cwd=Path(config.__file__).parent, timeout=60)


def test_config_cli_bad_file_is_one_error_line(tmp_path):
    """`python config.py --config bad.json` ended in a ConfigError traceback (no run_cli)."""
    path = tmp_path / "bad.json"
    path.write_text('{"batch_size": 0}')
    done = _run_config_cli("--config", str(path))
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {path}: batch_size: must be >= 1, got 0", done.stderr
    assert _run_config_cli("--lr", "0.05").stdout.count("lr") >= 1


def test_a_json_file_that_is_not_utf8_is_named(tmp_path):
    """A UTF-16 (or binary) file given as JSON ended in a UnicodeDecodeError traceback."""
    path = tmp_path / "exp.json"
    path.write_bytes('{"lr": 0.1}'.encode("utf-16"))  # starts with the BOM ff fe
    with pytest.raises(config.ConfigError, match=re.escape(str(path)) + ": not valid JSON"):
        make_config(config_file=path)


def test_a_folder_given_as_the_config_file_is_named_as_a_folder(tmp_path):
    """It was reported as "config file not found" though the path exists."""
    with pytest.raises(config.ConfigError, match=re.escape(str(tmp_path)) + ": a folder"):
        make_config(config_file=tmp_path)


def test_an_integer_past_float_range_is_refused_by_name(tmp_path):
    """JSON reads 1 followed by 400 zeros as a Python int; float() of it raised OverflowError."""
    path = tmp_path / "exp.json"
    path.write_text('{"lr": 1' + "0" * 400 + "}")
    with pytest.raises(config.ConfigError, match=re.escape(str(path)) + ": lr: must be a "
                                                 "finite number"):
        make_config(config_file=path)


def test_a_python_config_file_that_exits_is_named(tmp_path):
    """exit() in a Python config file ended the script silently with the file's own status."""
    path = tmp_path / "exp.py"
    path.write_text("config = dict(lr=0.1)\nraise SystemExit(3)\n")
    with pytest.raises(config.ConfigError, match=re.escape(str(path)) + ": SystemExit: 3"):
        make_config(config_file=path)


# ----------------------------------------------------------------------------- presets vs sources

def _lr_at(cfg: Config, global_batch: int) -> float:
    """The lr a run uses: train.py's rule as its docstring states it, written out."""
    return cfg.lr * global_batch / cfg.base_batch_size if cfg.scale_lr else cfg.lr


# ArcFace paper (Deng et al., CVPR 2019, sec. 4.1), transcribed: batch 512 on 4 GPUs, lr 0.1,
# momentum 0.9, weight decay 5e-4, s 64, m 0.5, 512-d embedding; arcface_torch's
# configs/ms1mv2_r50.py and ms1mv2_r100.py: num_epoch 20, batch_size 128 per GPU.
ARCFACE_PAPER = dict(global_batch=512, gpus=4, lr=0.1, momentum=0.9, weight_decay=5e-4,
                     s=64.0, m=0.5, embedding=512)
ARCFACE_TORCH_MS1MV2 = dict(num_epoch=20, batch_size=128, rec="faces_emore")


@pytest.mark.parametrize("preset, network", [("ms1mv2_ir50", "ir50"), ("ms1mv2_ir100", "ir100")])
def test_ms1mv2_presets_train_as_the_arcface_paper(preset, network):
    cfg = make_config(preset=preset)
    p, t = ARCFACE_PAPER, ARCFACE_TORCH_MS1MV2
    assert cfg.network == network and cfg.head == "arcface"
    assert (cfg.scale_s, cfg.margin_m, cfg.embedding_size) == (p["s"], p["m"], p["embedding"])
    assert (cfg.momentum, cfg.weight_decay, cfg.optimizer) == (p["momentum"], p["weight_decay"],
                                                               "sgd")
    assert cfg.global_batch(p["gpus"]) == p["global_batch"]
    assert _lr_at(cfg, cfg.global_batch(p["gpus"])) == pytest.approx(p["lr"], rel=1e-12)
    assert (cfg.epochs, cfg.batch_size) == (t["num_epoch"], t["batch_size"])
    assert t["rec"] in cfg.rec and cfg.warmup_epochs == 0.0


# AdaFace's scripts/run_ir101_ms1mv2.sh and head.py (mk-minchul/AdaFace), transcribed:
# --m 0.4 --h 0.333 --lr 0.1 --batch_size 512 (the total: main.py divides it over --gpus),
# s 64, t_alpha 0.01, SGD momentum 0.9, weight decay 5e-4 (train_val.py).
# CurricularFace (Huang et al., CVPR 2020): m 0.5, s 64 (its t momentum 0.01 is
# arcface_loss.CURRICULAR_MOMENTUM). MagFace: l_a 10, u_a 110, l_m 0.45, u_m 0.8,
# lambda_g 35. ElasticFace's config/config.py: s 64, m 0.5 (Arc) / 0.35 (Cos), std 0.05.
HEAD_PAPERS = {
    "ms1mv2_r100_adaface": dict(head="adaface", margin_m=0.4, adaface_h=0.333,
                                adaface_t_alpha=0.01),
    "ms1mv2_r100_curricularface": dict(head="curricularface", margin_m=0.5),
    "ms1mv2_r100_magface": dict(head="magface", magface_l_a=10.0, magface_u_a=110.0,
                                magface_l_m=0.45, magface_u_m=0.8, magface_lambda_g=35.0),
    "ms1mv2_r100_elasticface_arc": dict(head="elasticface-arc", margin_m=0.5,
                                        elastic_sigma=0.05, elastic_plus=False),
    "ms1mv2_r100_elasticface_cos": dict(head="elasticface-cos", margin_m=0.35,
                                        elastic_sigma=0.05, elastic_plus=False),
}


@pytest.mark.parametrize("preset", sorted(HEAD_PAPERS))
def test_head_presets_use_their_papers_values(preset):
    cfg = make_config(preset=preset)
    expected = {**HEAD_PAPERS[preset], "network": "ir100", "scale_s": 64.0, "momentum": 0.9,
                "weight_decay": 5e-4, "optimizer": "sgd", "embedding_size": 512}
    assert {name: getattr(cfg, name) for name in expected} == expected
    # lr 0.1 for the papers' global batch of 512
    assert _lr_at(cfg, 512) == pytest.approx(0.1, rel=1e-12)
    if cfg.head == "curricularface":  # its t <- 0.01 mean(cos_y) + 0.99 t
        import arcface_loss  # torch: only for this case

        assert arcface_loss.CURRICULAR_MOMENTUM == 0.01
