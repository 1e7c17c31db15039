import json
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
    assert "Partial FC: fraction of negative class centres per step (default 1.0)" in text
    assert "--seed SEED (default 42)" in text  # no comment: the default alone


def test_demo_preset_names_what_the_demo_builds():
    """`python train.py --preset demo` after `make demo` trains on the set the demo packed
    and writes where the demo's run lives."""
    import demo

    cfg = make_config(preset="demo")
    assert Path(cfg.rec) == Path(demo.DEFAULT_DATA_DIR) / demo.REC_NAME
    assert Path(cfg.output) == Path(demo.DEFAULT_RUN_DIR)


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
