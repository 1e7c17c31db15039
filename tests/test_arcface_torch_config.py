"""arcface_torch config files read without running them, and its linear schedule.

The config texts below are short copies of deepinsight/insightface
recognition/arcface_torch/configs/{base.py, ms1mv3_r50.py, wf42m_pfc03_40epoch_8gpu_vit_t.py};
the schedule's reference is its lr_scheduler.PolynomialLRWarmup.get_lr, written out here."""

import json
import logging
import re

import pytest
import torch
from test_train import pattern_images, write_rec

from config import ConfigError, make_config, parse_config
from train import check_stated_size, lr_factor, param_groups, train
from training.arcface_torch_config import resolve_fields, to_overrides
from utils import get_logger

BASE_PY = '''from easydict import EasyDict as edict

# make training faster
config = edict()

# Margin Base Softmax
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = "ms1mv3_arcface_r50"
config.embedding_size = 512
config.sample_rate = 1
config.interclass_filtering_threshold = 0
config.fp16 = False
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 2000
config.frequent = 10
config.dali = False
config.gradient_acc = 1
config.seed = 2048
config.num_workers = 2
config.wandb_key = "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
config.suffix_run_name = None
config.using_wandb = False
config.wandb_entity = "entity"
config.wandb_project = "project"
config.wandb_log_all = True
config.save_artifacts = False
config.wandb_resume = False # resume wandb run
'''

MS1MV3_R50_PY = '''from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.2
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 25
config.warmup_epoch = 2
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]
'''

VIT_T_PY = '''from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_t_dp005_mask0"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 512
config.optimizer = "adamw"
config.lr = 0.001
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
'''


@pytest.fixture
def configs(tmp_path):
    """A configs/ folder holding base.py and the two job files."""
    folder = tmp_path / "configs"
    folder.mkdir()
    for name, text in (("base", BASE_PY), ("ms1mv3_r50", MS1MV3_R50_PY),
                       ("wf42m_pfc03_40epoch_8gpu_vit_t", VIT_T_PY)):
        (folder / f"{name}.py").write_text(text)
    return folder


def test_ms1mv3_r50_resolves_over_base(configs):
    cfg, _ = parse_config(["--config", str(configs / "ms1mv3_r50.py")])
    assert (cfg.network, cfg.head, cfg.margin_m, cfg.scale_s) == ("ir50", "arcface", 0.5, 64.0)
    assert (cfg.embedding_size, cfg.sample_rate, cfg.amp) == (512, 1.0, "fp16")
    assert (cfg.batch_size, cfg.optimizer, cfg.lr, cfg.scale_lr) == (128, "sgd", 0.2, False)
    assert (cfg.momentum, cfg.weight_decay, cfg.decay_all) == (0.9, 5e-4, True)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.scheduler) == (25, 2.0, "linear")
    assert (cfg.grad_clip, cfg.clip_head) == (5.0, False)  # its backbone-only clipping
    assert cfg.rec == "/train_tmp/ms1m-retinaface-t1/train.rec"
    assert cfg.val_bins == [f"/train_tmp/ms1m-retinaface-t1/{n}.bin"
                            for n in ("lfw", "cfp_fp", "agedb_30")]
    assert (cfg.num_classes, cfg.num_image) == (93431, 5179510)
    # from base.py: the job file does not set them
    assert (cfg.seed, cfg.num_workers, cfg.log_every, cfg.verify_every) == (2048, 2, 10, 2000)
    # output None: arcface_torch's work_dirs/<config name>, not base.py's
    assert cfg.output == "work_dirs/ms1mv3_r50"


def test_base_alone_and_cli_flags_override(configs):
    cfg, _ = parse_config(["--config", str(configs / "base.py"), "--lr", "0.05",
                           "--network", "ir18", "--scheduler", "poly"])
    assert (cfg.lr, cfg.network, cfg.scheduler) == (0.05, "ir18", "poly")
    assert (cfg.amp, cfg.output, cfg.head) == ("none", "ms1mv3_arcface_r50", "arcface")


def test_warmup_past_num_epoch_is_refused_in_its_own_field_names(configs):
    """config.warmup_epoch = 30 over num_epoch = 25 was accepted."""
    job = configs / "long_warmup.py"
    job.write_text(MS1MV3_R50_PY + "config.warmup_epoch = 30\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(job))}: warmup_epoch: 30.0 is "
                                          r"more than num_epoch \(25\): the lr would still"):
        make_config(config_file=job)


def test_vit_config_fields(configs):
    path = configs / "wf42m_pfc03_40epoch_8gpu_vit_t.py"
    fields = resolve_fields(path)
    assert fields["warmup_epoch"] == 4  # config.num_epoch // 10
    overrides = to_overrides(fields, str(path))
    assert overrides["network"] == "vit_t_dp005_mask0"  # passed through to models' names
    assert (overrides["head"], overrides["margin_m"]) == ("cosface", 0.4)
    # until the ViTs are registered, the rest resolves with a network we have
    cfg = make_config({"network": "ir18"}, config_file=path)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.sample_rate) == ("adamw", 1e-3, 0.1, 0.3)
    assert (cfg.batch_size, cfg.epochs, cfg.warmup_epochs, cfg.val_bins) == (512, 40, 4.0, [])
    assert (cfg.num_classes, cfg.num_image) == (2059906, 42474557)


def _read_logged(path, caplog):
    """make_config on ``path`` with face.config's records caught by ``caplog``."""
    log = get_logger("face.config")
    log.addHandler(caplog.handler)  # the project's loggers do not propagate
    try:
        return make_config(config_file=path)
    finally:
        log.removeHandler(caplog.handler)


@pytest.mark.parametrize("margins, expected", [
    ("(1.0, 0.5, 0.0)", dict(head="arcface", margin_m=0.5)),
    ("(1.0, 0.0, 0.4)", dict(head="cosface", margin_m=0.4)),
    # its CombinedMarginLoss.forward: `elif self.m3 > 0` subtracts m3 alone, m1 and m2 unused
    ("(0.9, 0.4, 0.15)", dict(head="cosface", margin_m=0.15)),
    ("(1.0, 0.3, 0.2)", dict(head="cosface", margin_m=0.2)),
])
def test_margin_list_to_our_head(tmp_path, caplog, margins, expected):
    path = tmp_path / "m.py"
    path.write_text(f"config.margin_list = {margins}\nconfig.network = 'r18'\n")
    cfg = _read_logged(path, caplog)
    assert {k: getattr(cfg, k) for k in expected} == pytest.approx(expected)
    # an m1 or m2 its loss leaves unused is named
    unused = expected["head"] == "cosface" and not margins.startswith("(1.0, 0.0,")
    assert any("m2 unused" in r.getMessage() for r in caplog.records) == unused


def test_its_sgd_momentum_is_0_9_whatever_its_config_says(tmp_path, caplog):
    """train_v2.py: torch.optim.SGD(..., momentum=0.9, ...); config.momentum is not read."""
    path = tmp_path / "m.py"
    path.write_text("config.network = 'r18'\nconfig.optimizer = 'sgd'\nconfig.momentum = 0.5\n")
    cfg = _read_logged(path, caplog)
    assert cfg.momentum == 0.9
    assert any("config.momentum = 0.5" in r.getMessage() for r in caplog.records)


def test_sample_rate_0_is_read_as_its_positives_only_partial_fc(tmp_path):
    """Its wf42m_pfc0008_32gpu_r100.py sets sample_rate = 0: PartialFC_V2 then keeps
    int(0 * C_r) = 0 sampled centres, the batch's own classes alone (refused here before)."""
    path = tmp_path / "wf42m_pfc0008_32gpu_r100.py"
    path.write_text("config.network = 'r18'\nconfig.sample_rate = 0\n")
    assert make_config(config_file=path).sample_rate == 0.0


@pytest.mark.parametrize("margins", ["(0.9, 0.4, 0.0)", "(1.0, 0.5, -0.1)"])
def test_margin_list_its_loss_cannot_run_is_refused(tmp_path, margins):
    """Neither m1 = 1 with m3 = 0 nor m3 > 0: its CombinedMarginLoss reaches its bare raise."""
    path = tmp_path / "m.py"
    path.write_text(f"config.margin_list = {margins}\nconfig.network = 'r18'\n")
    with pytest.raises(ConfigError, match=r"m\.py: margin_list .*fails on this one"):
        make_config(config_file=path)


@pytest.mark.parametrize("line", [
    "config.lr = float('0.1')",
    "import os",
    "config.output = f'runs/{{1}}'",
    "open({marker!r}, 'w').write('ran')",
    "config.lr = __import__('os').system('touch {marker}')",
    "config.lr = config.momentum",  # not set yet in this file
    "config.lr = 9 ** 9 ** 9",  # would stall if evaluated
    "config.output = 'x' * 10 ** 9",  # would fill the memory
])
def test_code_is_refused_not_run(tmp_path, line):
    marker = tmp_path / "ran"
    path = tmp_path / "bad.py"
    path.write_text("from easydict import EasyDict as edict\nconfig = edict()\n"
                    "config.network = 'r18'\n" + line.format(marker=str(marker)) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: "):
        make_config(config_file=path)
    assert not marker.exists()


@pytest.mark.parametrize("line, named", [
    ("config.resume = True", "resume"),
    ("config.interclass_filtering_threshold = 0.2", "interclass_filtering_threshold"),
    ("config.image_size = 112", "image_size"),
])
def test_fields_that_change_training_are_refused(tmp_path, line, named):
    path = tmp_path / "c.py"
    path.write_text(f"config.network = 'r18'\n{line}\n")
    with pytest.raises(ConfigError, match=named):
        make_config(config_file=path)


def test_unsupported_switches_named_in_one_warning(tmp_path, caplog):
    path = tmp_path / "c.py"
    path.write_text("config.network = 'r18'\nconfig.dali = True\nconfig.using_wandb = True\n"
                    "config.wandb_key = 'x'\nconfig.save_all_states = True\n")
    _read_logged(path, caplog)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "dali, using_wandb" in warned[0]
    assert "save_all_states" not in warned[0]  # our checkpoints always hold every state


def test_our_python_config_still_runs(tmp_path):
    path = tmp_path / "ours.py"
    path.write_text("config = dict(lr=0.3, epochs=2 * 3)\n")
    cfg = make_config(config_file=path)
    assert (cfg.lr, cfg.epochs, cfg.scheduler, cfg.scale_lr) == (0.3, 6, "poly", True)


def arcface_torch_lrs(base_lr, warmup, total, steps):
    """The lr each optimiser step uses under its PolynomialLRWarmup(power=1), stepped once per
    optimiser step: get_lr's recurrence as lr_scheduler.py writes it."""
    lr, lrs, power = base_lr, [], 1.0
    for last_epoch in range(steps):
        if last_epoch == 0 or last_epoch > total:
            pass  # [group["lr"] for group in ...]: unchanged
        elif last_epoch <= warmup:
            lr = base_lr * last_epoch / warmup
        else:
            ll, w, t = last_epoch, warmup, total
            lr *= ((1.0 - (ll - w) / (t - w)) / (1.0 - (ll - 1 - w) / (t - w))) ** power
        lrs.append(lr)
    return lrs


@pytest.mark.parametrize("warmup, total", [(10, 100), (0, 37), (3, 4), (25, 250)])
def test_linear_schedule_is_polynomial_lr_warmup(warmup, total):
    base_lr = 0.2
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, "linear"))
    ours = []
    for _ in range(total + 3):  # a few past the end: it stays at 0
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert ours == pytest.approx(arcface_torch_lrs(base_lr, warmup, total, total + 3), abs=1e-12)
    assert ours[total] == pytest.approx(0.0, abs=1e-12)


TINY_RUN = """from easydict import EasyDict as edict
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r18"
config.embedding_size = 32
config.fp16 = False
config.batch_size = 4
config.lr = 0.05
config.rec = {rec!r}
config.num_classes = 6
config.num_image = 24
config.num_epoch = 1
config.warmup_epoch = 0
config.val_targets = []
config.output = {output!r}
config.num_workers = 0
config.seed = 5
"""


def test_tiny_run_from_an_arcface_torch_config(tmp_path):
    """r18 on the CPU for one epoch of 6 steps: its lr as given, decaying linearly."""
    folder = tmp_path / "ms1m"
    folder.mkdir()
    write_rec(folder / "train.rec", *pattern_images(6, 4))
    path = tmp_path / "tiny_r18.py"
    path.write_text(TINY_RUN.format(rec=str(folder), output=str(tmp_path / "run")))
    cfg = make_config({"device": "cpu", "channels_last": False, "log_every": 1},
                      config_file=path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread spins on this shared machine (test_train.py)
    try:
        summary = train(cfg)
    finally:
        torch.set_num_threads(threads)
    total = 6
    lrs = [entry["lr"] for entry in summary["history"]]
    assert lrs == pytest.approx([0.05 * (1 - k / total) for k in range(total)])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["network"], saved["scheduler"], saved["scale_lr"]) == ("ir18", "linear", False)
    assert (saved["num_classes"], saved["num_image"], saved["amp"]) == (6, 24, "none")


def test_stated_set_size_is_checked():
    cfg = make_config({"num_classes": 6, "num_image": 24})
    check_stated_size(cfg, 6, 24, "train.rec")
    check_stated_size(make_config(), 7, 25, "train.rec")  # 0: not stated, not checked
    with pytest.raises(ConfigError, match="num_classes: the config says 6, train.rec holds 7"):
        check_stated_size(cfg, 7, 24, "train.rec")
    with pytest.raises(ConfigError, match="num_image: the config says 24, train.rec holds 23"):
        check_stated_size(cfg, 6, 23, "train.rec")


def test_decay_all_puts_every_parameter_in_one_decayed_group():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    (group,) = param_groups([net, net], 0.1, decay_all=True)  # a module twice: once each
    assert group["weight_decay"] == 0.1
    assert {id(p) for p in group["params"]} == {id(p) for p in net.parameters()}
    assert len(group["params"]) == len(list(net.parameters()))


VIT_B_PY = '''from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_b_dp005_mask_005"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 256
config.gradient_acc = 12 # total batchsize is 256 * 12
config.optimizer = "adamw"
config.lr = 0.001
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
'''

# What configs/wf42m_pfc03_40epoch_*gpu_vit_*.py over base.py say, as our fields: margin_list
# (1.0, 0.0, 0.4) is CosFace m 0.4 at its s 64; fp16; AdamW lr 0.001 as given (no
# rescaling), weight decay 0.1 on every parameter; num_epoch 40, warmup_epoch 40 // 10, its
# linear schedule; its backbone-only clipping at 5; base.py's seed, workers, frequent and
# verbose; num_classes and num_image of WebFace42M; val_targets [].
WF42M_FIELDS = dict(head="cosface", margin_m=0.4, margin_m1=1.0, margin_m3=0.0, scale_s=64.0,
                    embedding_size=512, sample_rate=0.3, amp="fp16", optimizer="adamw",
                    lr=0.001, scale_lr=False, weight_decay=0.1, decay_all=True,
                    scheduler="linear", epochs=40, warmup_epochs=4.0, clip_head=False,
                    num_classes=2059906, num_image=42474557, seed=2048, num_workers=2,
                    log_every=10, verify_every=2000, val_bins=[])


@pytest.mark.parametrize("preset, network, batch_size, gradient_acc", [
    ("wf42m_vit_t", "vit_t_dp005_mask0", 512, 1),  # its 8gpu_vit_t file
    ("wf42m_vit_s", "vit_s_dp005_mask_0", 384, 1),  # its 64gpu_vit_s (no 8-GPU file)
    ("wf42m_vit_b", "vit_b_dp005_mask_005", 256, 12),  # its 8gpu_vit_b: 256 x 12 per GPU
    ("wf42m_vit_l", "vit_l_dp005_mask_005", 384, 1),  # its 64gpu_vit_l (no 8-GPU file)
])
def test_wf42m_vit_presets_train_as_its_configs(preset, network, batch_size, gradient_acc):
    cfg = make_config(preset=preset)
    # its clip_grad_norm_(backbone, 5) acts on the sum of the micro-batches' gradients
    expected = {**WF42M_FIELDS, "network": network, "batch_size": batch_size,
                "gradient_acc": gradient_acc, "grad_clip": 5.0 / gradient_acc}
    assert {name: getattr(cfg, name) for name in expected} == expected
    assert (cfg.rec, cfg.output) == ("data/webface42m/train.rec", f"runs/{preset}")


def test_wf42m_presets_equal_reading_its_files(configs):
    """The presets are what --config makes of its files, but for the paths."""
    for name, text, preset in (("wf42m_pfc03_40epoch_8gpu_vit_t", VIT_T_PY, "wf42m_vit_t"),
                               ("wf42m_pfc03_40epoch_8gpu_vit_b", VIT_B_PY, "wf42m_vit_b")):
        (configs / f"{name}.py").write_text(text)
        read = make_config(config_file=configs / f"{name}.py").to_dict()
        ours = make_config(preset=preset).to_dict()
        paths = ("rec", "output", "val_bins")
        assert {k: v for k, v in read.items() if k not in paths} == \
            {k: v for k, v in ours.items() if k not in paths}
