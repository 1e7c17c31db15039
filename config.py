"""Every default of the toolkit in one dataclass, overridable from a config file and the CLI.

Precedence, lowest to highest: the dataclass defaults, a named preset (``--preset demo``),
a config file (``--config my.json``, ``--config my.py`` defining a dict ``config``, or an
InsightFace arcface_torch config, read without running it: training/arcface_torch_config.py),
then individual flags (``--lr 0.05``). Every script builds its parser with :func:`build_parser`
and gets its settings from :func:`parse_config`, then prints and saves what it used.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import re
import runpy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from training.arcface_torch_config import (
    ARCFACE_CLIP,
    SAME_MEANING,
    ArcfaceConfigError,
    load_arcface_torch_config,
    looks_like_arcface_torch,
)
from utils import (
    ToolkitError,
    add_debug_flag,
    atomic_write_text,
    get_device,
    run_cli,
    unsupported_device,
)


class ConfigError(ToolkitError, ValueError):
    """A config value, file or field name that cannot be used; the message names it.
    ``field``: the Config field whose value is wrong, when one is (make_config adds where
    that value came from); ``related``: other fields the message names, which make_config
    renames as their source spells them (a flag, an arcface_torch config's field)."""

    def __init__(self, message: str, field: str | None = None,
                 related: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.related = related


# Allowed values of the fields that name a choice. The network and head names are spelled
# here, not imported from models.py and arcface_loss.py, so that reading a config does not
# import torch (~1.2 s); tests/test_config.py checks they agree with those modules' own lists.
NETWORK_NAMES = ("ir18", "ir34", "ir50", "ir100", "ir200", "ir_se50", "ir_se100", "mobilefacenet",
                 "ir_narrow", "vit_t", "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0",
                 "vit_b", "vit_b_dp005_mask_005", "vit_l_dp005_mask_005", "vit_h",
                 "r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large")
HEAD_NAMES = ("arcface", "cosface", "combined", "adaface", "curricularface", "magface",
              "elasticface-arc", "elasticface-cos")
# The largest margins a head can learn with: the target class's cosine at theta = 0, its
# best, must stay above 0, where an unrelated centre lies among thousands of classes;
# cos(theta + m) and cos(theta) - m reach 0 there at m = pi/2 and m = 1 (see arcface_loss.py).
MAX_ANGLE_MARGIN = math.pi / 2  # ArcFace's m, the combined margin's m2 (exclusive)
MAX_COSINE_MARGIN = 1.0  # CosFace's m (exclusive); the combined m3 stays below cos(m2)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("poly", "cosine", "linear")
AMP_MODES = ("bf16", "fp16", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Config:
    # --- paths (everything large lives under data/ and runs/, both ignored by git)
    rec: str = "data/faces_emore/train.rec"  # InsightFace RecordIO training set
    image_folder: str = ""  # alternative training source: aligned tree identity/image.jpg
    allow_lost_records: bool = False  # train on a RecordIO set whose index counts damaged records
    output: str = "runs/default"  # checkpoints, TensorBoard logs, config.json
    val_bins: list[str] = field(default_factory=list)  # InsightFace .bin sets checked in training
    lfw_dir: str = "data/lfw"
    pairs: str = "data/lfw/pairs.txt"

    # --- network
    network: str = "ir50"  # ir18/34/50/100/200, ir_se50/100, mobilefacenet (models.py)
    embedding_size: int = 512  # the face embedding's dimension
    dropout: float = 0.0

    # --- margin head (ArcFace by default: s * cos(theta + m) on the target logit)
    head: str = "arcface"  # arcface cosface combined adaface curricularface magface elasticface-*
    margin_m: float = 0.5  # ArcFace additive angle; CosFace uses 0.35
    scale_s: float = 64.0  # s: every logit is s * cos(...)
    margin_m1: float = 1.0  # combined margin: cos(m1 * theta + m2) - m3, m2 = margin_m
    margin_m3: float = 0.0
    easy_margin: bool = False
    margin_warmup: float = 0.0  # fraction of all steps over which m ramps up from 0
    focal_gamma: float = 0.0  # 0 = plain cross-entropy
    # the batch's own classes are always among the sampled; 0 as arcface_torch's wf42m_pfc0008
    sample_rate: float = 1.0  # Partial FC: fraction of class centres per step (0: the batch's)
    # the newer heads' own options (paper defaults; margin_m is their m: AdaFace 0.4)
    adaface_h: float = 0.333  # AdaFace: how far the feature norm moves the margin
    adaface_t_alpha: float = 0.01  # AdaFace: momentum of the running norm mean and std
    magface_l_a: float = 10.0  # MagFace: feature norms clipped to [l_a, u_a]
    magface_u_a: float = 110.0
    magface_l_m: float = 0.45  # MagFace: margins from l_m (norm l_a) to u_m (norm u_a)
    magface_u_m: float = 0.8
    magface_lambda_g: float = 35.0  # MagFace: weight of the norm regulariser (>= ~22.6)
    elastic_sigma: float = 0.05  # ElasticFace: std of the margin drawn per sample
    elastic_plus: bool = False  # ElasticFace+: larger drawn margins to rows far from centre

    # --- optimisation
    batch_size: int = 128  # per device
    gradient_acc: int = 1  # micro-batches per optimiser step; global batch batch_size x devices x k
    lr: float = 0.1  # for a global batch of base_batch_size, scaled linearly
    base_batch_size: int = 512  # the global batch that lr is given for
    scale_lr: bool = True  # lr * global batch / base_batch_size; off: lr as given (arcface_torch)
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # not applied to BatchNorm weights or biases
    decay_all: bool = False  # weight decay on every parameter, norms and biases too (arcface_torch)
    scheduler: str = "poly"  # poly | cosine | linear (arcface_torch's PolynomialLRWarmup)
    warmup_epochs: float = 0.0
    epochs: int = 20
    grad_clip: float = 5.0  # max gradient norm; 0 disables
    clip_head: bool = True  # one norm over backbone + head; False: backbone only (arcface_torch)

    # --- runtime
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:1
    amp: str = "bf16"  # bf16 | fp16 | none; only used on CUDA unless cpu_amp
    cpu_amp: bool = False  # bf16 autocast on the CPU too
    channels_last: bool = True
    compile: bool = False  # torch.compile the backbone
    compile_mode: str = "default"  # reduce-overhead (CUDA graphs) | max-autotune | ...
    num_workers: int = 4  # loader processes (0: decode in the training process)
    # workers decode into a fixed ring of shared memory (fast_loader.RingBufferLoader) instead
    # of torch's DataLoader, which allocates shared memory per batch: 83% against 47% of
    # bare decoding with 1 worker on 2 CPU cores (bench/data_throughput.py)
    ring_loader: bool = False  # with num_workers > 0: the shared-memory ring loader
    # glibc malloc keeps freed memory (utils.reuse_freed_memory, process-wide): large
    # tensors are then not page-faulted in afresh every step. On 2 CPU cores the
    # 85,742-class head's forward+backward+SGD went from 578 to 287 ms, and the demo's step
    # (ir_narrow, batch 64, bf16) from 266-275 to 324-339 images/s
    keep_freed_memory: bool = False  # malloc keeps freed memory for reuse (Linux, glibc)
    seed: int = 42
    save_every: int = 2000  # steps between checkpoints (0: only at epoch ends and the end)
    verify_every: int = 2000  # steps between verification on val_bins (0: none)
    log_every: int = 50  # steps between logged values (0: only the first and last step)
    max_steps: int = 0  # stop after this many steps in total (0 = run all epochs)
    # what an arcface_torch config says its training set holds, recorded with the run
    num_classes: int = 0  # identities the training set should hold (0: not stated)
    num_image: int = 0  # images the training set should hold (0: not stated)

    def __post_init__(self) -> None:
        """Refuse a value of the wrong type or out of range, naming the field, before any
        script uses it (JSON and Python config files reach here unchecked)."""
        _check_types(self)
        _check_values(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def global_batch(self, world_size: int) -> int:
        """Images in one optimiser step over ``world_size`` ranks: batch_size x ranks x
        gradient_acc (what lr scaling, images/s and a resume's batch check count)."""
        return self.batch_size * world_size * self.gradient_acc

    def save(self, path: str | Path) -> None:
        """Write the config as JSON (atomically, so a crash never leaves half a file)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def pretty(self) -> str:
        width = max(len(f.name) for f in fields(self))
        return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in self.to_dict().items())


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"
            }.get(tp, "a list of strings")


def _check_types(cfg: Config) -> None:
    """Each field's value has its declared type: int (not bool), float (an int is taken and
    converted), str, bool, or list[str] (a tuple is taken). Non-finite floats are refused."""
    hints = get_type_hints(Config)
    for f in fields(cfg):
        tp, value = hints[f.name], getattr(cfg, f.name)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an integer past float's range: as inf, not a traceback
                raise ConfigError(f"must be a finite number, got an integer of "
                                  f"{value.bit_length()} bits", f.name) from None
        elif get_origin(tp) is list and isinstance(value, tuple):
            value = list(value)
        if tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif get_origin(tp) is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, tp)
        if not ok:
            raise ConfigError(f"must be {_type_name(tp)}, got {value!r}", f.name)
        if tp is float and not math.isfinite(value):
            raise ConfigError(f"must be a finite number, got {value!r}", f.name)
        setattr(cfg, f.name, value)


_CHOICES: dict[str, tuple[str, ...]] = {
    "network": NETWORK_NAMES, "head": HEAD_NAMES, "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS, "amp": AMP_MODES, "compile_mode": COMPILE_MODES}


# The loader reads the k micro-batches of an optimiser step as one batch of k x batch_size
# images (train.py splits it): arcface_torch's largest is 12; beyond this a typo (a global
# batch for a per-device one) would ask for a loader batch no memory holds
MAX_GRADIENT_ACC = 1024

# torch.manual_seed takes a 64-bit integer; this bound keeps seed + rank and seed + epoch
# (the per-rank and per-epoch generators) inside it
SEED_LIMIT = 2**62

# (field, test, what the test says): the range every numeric field must lie in, checked in
# this order (a field's lower bound before its upper one)
_RANGES: tuple[tuple[str, Any, str], ...] = (
    *((name, lambda v: v >= 1, ">= 1") for name in ("batch_size", "base_batch_size", "epochs",
                                                     "embedding_size", "gradient_acc")),
    ("gradient_acc", lambda v: v <= MAX_GRADIENT_ACC, f"<= {MAX_GRADIENT_ACC}"),
    # margin_m1 multiplies the angle: at 0 or below the target's logit no longer falls as
    # the embedding turns away from its centre
    *((name, lambda v: v > 0, "> 0") for name in ("lr", "scale_s", "margin_m1")),
    ("sample_rate", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    # 0 means off for the intervals and max_steps, and "none" for the rest
    *((name, lambda v: v >= 0, ">= 0") for name in (
        "save_every", "verify_every", "log_every", "max_steps", "num_workers", "margin_m",
        "margin_m3", "momentum", "weight_decay", "grad_clip", "warmup_epochs", "margin_warmup",
        "focal_gamma", "num_classes", "num_image")),
    # a fraction of all steps: beyond 1 the margin would never reach margin_m
    ("margin_warmup", lambda v: v <= 1, "<= 1 (a fraction of all steps)"),
    # at 1 SGD's velocity never decays: every past gradient counts forever (AdamW ignores it)
    ("momentum", lambda v: v < 1, "< 1"),
    ("seed", lambda v: -SEED_LIMIT < v < SEED_LIMIT, "in (-2**62, 2**62)"),
)


# The Config fields holding each newer head's options (arcface_loss.HEAD_OPTIONS names).
class HeadConfigError(ToolkitError, ValueError):
    """A margin head that cannot be built as asked (unknown name or option, impossible
    split); ``option`` names the head option at fault, if one is."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def _in(low: float, high: float, rule: str) -> tuple[Callable[[float], bool], str]:
    return (lambda v: low <= v <= high), rule


# Each new head's options by name: (test, the rule it states). AdaFace's h scales the norm
# deviation fed to the margin (0 turns AdaFace into CosFace+ArcFace); t_alpha in (0, 1] is the
# running statistics' momentum; MagFace's norm range must be positive and ordered, its margins
# angles below pi/2; ElasticFace's sigma is a standard deviation.
HEAD_OPTIONS: dict[str, dict[str, tuple[Callable[[float], bool], str]]] = {
    "adaface": {"h": _in(0.0, 1.0, "in [0, 1]"),
                "t_alpha": ((lambda v: 0.0 < v <= 1.0), "in (0, 1]")},
    "magface": {"l_a": ((lambda v: v > 0), "> 0"), "u_a": ((lambda v: v > 0), "> 0"),
                "l_m": _in(0.0, MAX_ANGLE_MARGIN, "in [0, pi/2]"),
                "u_m": _in(0.0, MAX_ANGLE_MARGIN, "in [0, pi/2]"),
                "lambda_g": ((lambda v: v >= 0), ">= 0")},
    **{name: {"sigma": ((lambda v: v >= 0), ">= 0"),
              "plus": ((lambda v: isinstance(v, bool)), "True or False")}
       for name in ("elasticface-arc", "elasticface-cos")},
}


def check_head_options(name: str, options: dict) -> None:
    """Refuse, by name, an option ``name``'s head does not take or a value out of its range."""
    allowed = HEAD_OPTIONS.get(name, {})
    for key, value in options.items():
        if key not in allowed:
            takes = ", ".join(allowed) or "no options"
            raise HeadConfigError(f"unknown option {key!r} for head {name} (it takes {takes})",
                                  key)
        test, rule = allowed[key]
        if not test(value):
            raise HeadConfigError(f"{name} option {key} must be {rule}, got {value!r}", key)
    if name == "magface":
        for low, high, default in (("l_a", "u_a", (10.0, 110.0)), ("l_m", "u_m", (0.45, 0.8))):
            lo, hi = options.get(low, default[0]), options.get(high, default[1])
            if not lo < hi:
                raise HeadConfigError(f"magface option {low} must be below {high}, got "
                                      f"{lo!r} >= {hi!r}", low)


HEAD_OPTION_FIELDS = {
    "adaface": {"h": "adaface_h", "t_alpha": "adaface_t_alpha"},
    "magface": {"l_a": "magface_l_a", "u_a": "magface_u_a", "l_m": "magface_l_m",
                "u_m": "magface_u_m", "lambda_g": "magface_lambda_g"},
    **{name: {"sigma": "elastic_sigma", "plus": "elastic_plus"}
       for name in ("elasticface-arc", "elasticface-cos")},
}


def head_options(cfg: Config) -> dict[str, Any]:
    """The options of ``cfg.head`` by the names arcface_loss.build_head takes."""
    return {option: getattr(cfg, name)
            for option, name in HEAD_OPTION_FIELDS.get(cfg.head, {}).items()}


def _check_margin(cfg: Config) -> None:
    """The head's margin must leave the target class a positive cosine at theta = 0, its best
    case (see MAX_ANGLE_MARGIN): ArcFace's m and the combined m2 below pi/2,
    CosFace's m below 1, the combined m3 below cos(m2); the same for AdaFace's,
    CurricularFace's and ElasticFace's m; each newer head's options in their ranges."""
    try:
        check_head_options(cfg.head, head_options(cfg))
    except HeadConfigError as e:
        raise ConfigError(str(e), HEAD_OPTION_FIELDS[cfg.head].get(e.option or "")) from e
    if cfg.head in ("cosface", "elasticface-cos") and not cfg.margin_m < MAX_COSINE_MARGIN:
        raise ConfigError(f"must be < {MAX_COSINE_MARGIN:g} for CosFace (cos(theta) - m), "
                          f"got {cfg.margin_m!r}", "margin_m")
    if cfg.head in ("arcface", "combined", "adaface", "curricularface", "elasticface-arc") \
            and not cfg.margin_m < MAX_ANGLE_MARGIN:
        raise ConfigError(f"must be < pi/2 = {MAX_ANGLE_MARGIN:.4f} for {cfg.head} (an angle "
                          f"added to theta), got {cfg.margin_m!r}", "margin_m")
    if cfg.head == "combined" and not cfg.margin_m3 < math.cos(cfg.margin_m):
        raise ConfigError(f"must be < cos(margin_m) = {math.cos(cfg.margin_m):.4f} "
                          f"(cos(m1 * theta + m2) - m3), got {cfg.margin_m3!r}", "margin_m3")


def _check_values(cfg: Config) -> None:
    for name, allowed in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}",
                              name)
    for name, test, rule in _RANGES:
        value = getattr(cfg, name)
        if not test(value):
            raise ConfigError(f"must be {rule}, got {value!r}", name)
    _check_margin(cfg)
    problem = unsupported_device(cfg.device)
    if problem:
        raise ConfigError(f"{cfg.device!r} is {problem}", "device")
    if cfg.nesterov and cfg.optimizer == "sgd" and cfg.momentum == 0:  # torch's SGD refuses it
        raise ConfigError("needs momentum > 0 (momentum is 0)", "nesterov")
    if cfg.warmup_epochs > cfg.epochs:  # the lr would never reach its peak, nor decay
        raise ConfigError(f"{cfg.warmup_epochs!r} is more than epochs ({cfg.epochs!r}): the "
                          "lr would still be warming up when training ends", "warmup_epochs",
                          ("epochs",))


# arcface_torch's WebFace42M ViT recipes, as its configs/wf42m_pfc03_40epoch_*gpu_vit_*.py
# over its base.py train them (what `--config` makes of those files, but the paths):
# CosFace m 0.4 (margin_list (1, 0, 0.4)) at s 64, Partial FC 0.3, AdamW at lr 1e-3 as
# given, weight decay 0.1 on every parameter, 40 epochs with 4 of linear warm-up, then a
# linear decay, fp16, the backbone's gradient clipped at 5, its seed, workers and intervals.
WF42M_VIT = dict(rec="data/webface42m/train.rec", embedding_size=512, head="cosface",
                 margin_m=0.4, scale_s=64.0, sample_rate=0.3, optimizer="adamw", lr=1e-3,
                 scale_lr=False, weight_decay=0.1, decay_all=True, scheduler="linear",
                 epochs=40, warmup_epochs=4.0, amp="fp16", clip_head=False,
                 num_classes=2059906, num_image=42474557, seed=2048, num_workers=2,
                 verify_every=2000, log_every=10)
# (preset, its network, per-GPU batch, gradient_acc): ViT-T and ViT-B from its 8-GPU files,
# ViT-S and ViT-L from its 64-GPU ones (it has no 8-GPU file for them). ViT-B's 12
# micro-batches clip their mean at 5 / 12 where it clips their sum at 5 (the same step:
# training/arcface_torch_config._accumulation).
WF42M_VITS = (("vit_t", "vit_t_dp005_mask0", 512, 1), ("vit_s", "vit_s_dp005_mask_0", 384, 1),
              ("vit_b", "vit_b_dp005_mask_005", 256, 12),
              ("vit_l", "vit_l_dp005_mask_005", 384, 1))

# Named configs, each overriding the base like arcface_torch's configs/*.py.
PRESETS: dict[str, dict[str, Any]] = {
    # MS1MV2 (faces_emore) as the ArcFace paper trains it (its sec. 4.1): lr 0.1 for a batch of
    # 512 (4 GPUs x 128; scaled linearly to the global batch here, where arcface_torch's
    # ms1mv2_r50/r100.py give 0.1 unscaled to 8 x 128), momentum 0.9, weight decay 5e-4, s 64,
    # m 0.5, 512-d. The paper's lr / 10 at 100K and 160K of 180K steps (~16 epochs) has no
    # step scheduler here: arcface_torch's 20 epochs with its former PolyScheduler (power 2).
    # Its recipe as it is now (linear decay, decay on norms and biases, backbone-only clip,
    # fp16, seed 2048) is its file itself: --config configs/ms1mv2_r50.py.
    "ms1mv2_ir50": dict(rec="data/faces_emore/train.rec", network="ir50", epochs=20,
                        batch_size=128, lr=0.1, margin_m=0.5, scale_s=64.0,
                        val_bins=["data/faces_emore/lfw.bin", "data/faces_emore/cfp_fp.bin",
                                  "data/faces_emore/agedb_30.bin"]),
    "ms1mv2_ir100": dict(rec="data/faces_emore/train.rec", network="ir100", epochs=20,
                         batch_size=128, lr=0.1,
                         val_bins=["data/faces_emore/lfw.bin", "data/faces_emore/cfp_fp.bin",
                                   "data/faces_emore/agedb_30.bin"]),
    # MS1MV2 R100 with each newer head as its paper trains it (s 64; batch 512 over GPUs,
    # lr 0.1, 20-26 epochs in the papers: the per-device batch and epochs as ms1mv2_ir100).
    # Their step schedules (AdaFace's scripts: lr / 10 at epochs 12, 20, 24 of 26) have no
    # step scheduler here: the poly decay of ms1mv2_ir100 instead.
    **{f"ms1mv2_r100_{key}": dict(rec="data/faces_emore/train.rec", network="ir100", epochs=20,
                                  batch_size=128, lr=0.1, scale_s=64.0, head=head, **extra,
                                  val_bins=["data/faces_emore/lfw.bin",
                                            "data/faces_emore/cfp_fp.bin",
                                            "data/faces_emore/agedb_30.bin"])
       for key, head, extra in (
           ("adaface", "adaface", dict(margin_m=0.4, adaface_h=0.333, adaface_t_alpha=0.01)),
           ("curricularface", "curricularface", dict(margin_m=0.5)),
           ("magface", "magface", dict(magface_lambda_g=35.0)),
           ("elasticface_arc", "elasticface-arc", dict(margin_m=0.5, elastic_sigma=0.05)),
           ("elasticface_cos", "elasticface-cos", dict(margin_m=0.35, elastic_sigma=0.05)))},
    # The CPU demo of `make demo` (see README): a narrow IR net on synthetic identities.
    # Its output is not demo.py's runs/demo, so retraining never meets the demo's own run.
    "demo": dict(rec="data/demo/train.rec", output="runs/demo_train", network="ir_narrow",
                 embedding_size=128, scale_s=32.0, margin_m=0.3, margin_warmup=0.3,
                 optimizer="sgd", nesterov=True, lr=0.1, base_batch_size=64, batch_size=64,
                 scheduler="cosine", warmup_epochs=0.0, epochs=8, grad_clip=5.0,
                 weight_decay=5e-4, cpu_amp=True, num_workers=1, ring_loader=True,
                 keep_freed_memory=True, save_every=200, verify_every=0, log_every=10),
    **{f"wf42m_{name}": dict(WF42M_VIT, output=f"runs/wf42m_{name}", network=network,
                             batch_size=batch, gradient_acc=acc, grad_clip=ARCFACE_CLIP / acc)
       for name, network, batch, acc in WF42M_VITS},
}


def _arg_type(tp: Any) -> Any:
    return {int: int, float: float, str: str}.get(tp, str)


def _field_comments() -> dict[str, str]:
    """Each Config field's trailing comment in this file: the flags' help text, so the
    explanation lives in one place."""
    pattern = re.compile(r"^\s+(\w+):[^=]+=.*\s#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for line in inspect.getsource(Config).splitlines()
            if (m := pattern.match(line))}


def build_parser(description: str = "", add_help: bool = True,
                 only: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """A parser with --preset, --config and one flag per Config field, or per field named in
    ``only`` (a script's --help then lists just what it uses). Defaults are left unset, so
    only what the user typed overrides the preset and the file."""
    unknown = set(only or ()) - {f.name for f in fields(Config)}
    if unknown:
        raise ValueError(f"not Config fields: {sorted(unknown)}")
    # Each flag's help names its default itself: the parser's own defaults are None so that
    # only what the user typed overrides the preset and the config file.
    parser = argparse.ArgumentParser(description=description, add_help=add_help)
    add_debug_flag(parser)
    group = parser.add_argument_group("configuration (defaults in config.py)")
    group.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="named config applied over the defaults")
    group.add_argument("--config", default=None,
                       help="JSON file, Python file defining a dict `config`, or an "
                       "arcface_torch config (configs/ms1mv3_r50.py)")
    hints = get_type_hints(Config)
    comments = _field_comments()
    for f in fields(Config):
        if only is not None and f.name not in only:
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        about = comments.get(f.name, "")
        about = about + " " if about else ""
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=f"{about}(default {default})")
        elif get_origin(tp) is list:
            (item,) = get_args(tp)
            group.add_argument(flag, dest=f.name, nargs="*", type=_arg_type(item),
                               default=None, help=f"{about}(default {default})")
        else:
            group.add_argument(flag, dest=f.name, type=_arg_type(tp), default=None,
                               help=f"{about}(default {default!r})")
    return parser


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read overrides from a JSON file, a Python file that defines ``config = dict(...)``, or
    an arcface_torch config (``config.<field> = value`` lines), parsed, never run."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file (.json or .py)")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".py" and looks_like_arcface_torch(path):
        try:
            return load_arcface_torch_config(path)
        except ArcfaceConfigError as e:
            raise ConfigError(str(e)) from None
    if path.suffix == ".py":
        try:
            values = runpy.run_path(str(path)).get("config")
        # the file's own error (syntax, a name, an exit() in it): one line naming it
        except (Exception, SystemExit) as e:
            raise ConfigError(f"{path}: {type(e).__name__}: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a Python config file must define a dict named `config`")
        return values
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # JSON files are UTF-8 (RFC 8259)
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields")
    return values


COMMAND_LINE = "command line"  # the overrides' source when they are flags


def _describe_unknown(names: set[str], known: set[str]) -> str:
    """Unknown field names, each with the closest known one when there is one."""
    described = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, known, n=1)
        described.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return ", ".join(described)


def make_config(overrides: dict[str, Any] | None = None, preset: str | None = None,
                config_file: str | Path | None = None,
                overrides_source: str = "overrides") -> Config:
    """Defaults, then preset, then file, then explicit overrides; unknown keys and bad
    values are a ConfigError naming the layer they came from (``overrides_source``: what
    to call the overrides, e.g. COMMAND_LINE)."""
    known = {f.name for f in fields(Config)}
    values: dict[str, Any] = {}
    source_of: dict[str, str] = {}
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        layers.append((f"preset {preset}", PRESETS[preset]))
    if config_file:
        layers.append((str(config_file), load_config_file(config_file)))
    layers.append((overrides_source, overrides or {}))
    for source, layer in layers:
        unknown = set(layer) - known
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) "
                              f"{_describe_unknown(unknown, known)}")
        values.update(layer)
        source_of.update(dict.fromkeys(layer, source))
    their_names = {} if not (config_file and Path(config_file).suffix == ".py"
                             and looks_like_arcface_torch(config_file)) else \
        {str(config_file): {ours: theirs for theirs, ours in SAME_MEANING.items()}}
    try:
        return Config(**values)
    except ConfigError as e:
        if e.field is None:
            raise
        message = str(e)
        for name in e.related:  # each as its own source spells it
            message = re.sub(rf"\b{name}\b", _spelled(name, source_of, their_names), message)
        source = source_of.get(e.field, "default")
        where = _spelled(e.field, source_of, their_names)
        where = where if source == COMMAND_LINE else f"{source}: {where}"
        raise ConfigError(f"{where}: {message}", e.field) from None


def _spelled(name: str, source_of: dict[str, str],
             their_names: dict[str, dict[str, str]]) -> str:
    """Config field ``name`` as the layer that set it spells it: a flag on the command line,
    an arcface_torch config's own field name (num_epoch for epochs), else the field."""
    source = source_of.get(name, "default")
    if source == COMMAND_LINE:
        return "--" + name.replace("_", "-")
    return their_names.get(source, {}).get(name, name)


def parse_config(argv: Sequence[str] | None = None, description: str = "",
                 parser: argparse.ArgumentParser | None = None
                 ) -> tuple[Config, argparse.Namespace]:
    """Parse the command line; return the Config and the whole namespace (for script-only
    flags a script added to ``parser`` itself)."""
    parser = parser or build_parser(description)
    args = parser.parse_args(argv)
    field_names = {f.name for f in fields(Config)}
    overrides = {k: v for k, v in vars(args).items() if k in field_names and v is not None}
    cfg = make_config(overrides, preset=args.preset, config_file=args.config,
                      overrides_source=COMMAND_LINE)
    # a script that runs on cfg.device needs one this machine has, refused here before any
    # work (Config checks only the name: a run's config may be read on another machine)
    if "device" in vars(args):
        get_device(cfg.device)
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    """`python config.py --preset demo --lr 0.05` prints the config those flags resolve to."""
    resolved, _ = parse_config(argv, description="Print the config that these flags resolve to.")
    print(resolved.pretty())
    return 0


if __name__ == "__main__":  # a bad file or value: one `error:` line (run_cli), no traceback
    sys.exit(run_cli(main))
