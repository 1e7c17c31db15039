"""Read an InsightFace arcface_torch config file (``configs/ms1mv3_r50.py``: lines of
``config.<field> = value`` over ``configs/base.py`` beside it) without running it, and map
its fields onto ours.

The file is parsed with ``ast``, never executed: only the easydict boilerplate, docstrings
and assignments of literals (or of arithmetic over literals and the file's earlier fields,
as in ``config.warmup_epoch = config.num_epoch // 10``) are accepted; anything else is
refused in one line naming the file and line. Its fields become Config overrides here;
config.py turns them into a Config.
"""

from __future__ import annotations

import ast
import operator
from pathlib import Path
from typing import Any

from utils import ToolkitError, get_logger

BASE_FILE = "base.py"  # arcface_torch's get_config reads configs/base.py, then the job's file
CONFIG_NAME = "config"
DEFAULT_OUTPUT_ROOT = "work_dirs"  # where arcface_torch puts a run whose output is None
ARCFACE_SCALE = 64.0  # arcface_torch's CombinedMarginLoss is built with s = 64
ARCFACE_CLIP = 5.0  # its train_v2.py clips the backbone's gradient at norm 5
ARCFACE_MOMENTUM = 0.9  # its train_v2.py builds its SGD with momentum=0.9, not config.momentum
TRAIN_REC = "train.rec"  # its rec field is a folder holding train.rec/train.idx
# its network names that are ours under another name; the rest (vit_*, mbf, mbf_large)
# are ours under its own
NETWORKS = {"r18": "ir18", "r34": "ir34", "r50": "ir50", "r100": "ir100", "r200": "ir200"}
# its fields copied onto ours unchanged, under our name
SAME_MEANING = {"embedding_size": "embedding_size", "sample_rate": "sample_rate",
                "batch_size": "batch_size", "optimizer": "optimizer", "lr": "lr",
                "weight_decay": "weight_decay", "seed": "seed",
                "num_workers": "num_workers", "num_epoch": "epochs",
                "warmup_epoch": "warmup_epochs", "verbose": "verify_every",
                "frequent": "log_every", "num_classes": "num_classes",
                "num_image": "num_image"}
# switches of machinery we do not have: named in one warning when on
SWITCHED_OFF_HERE = ("dali", "dali_aug", "using_wandb", "save_artifacts", "wandb_resume")
# details of that machinery, meaningless without it, and save_all_states, always so here (every
# checkpoint.pt holds the optimiser and schedule): dropped silently
DROPPED = ("wandb_key", "wandb_entity", "wandb_project", "wandb_log_all", "suffix_run_name",
           "save_all_states")
# fields that change the training, accepted only at the value that leaves it as ours:
# (field, inert value, why refused otherwise)
ONLY_INERT = (("resume", False, "resume with train.py --resume instead"),
              ("interclass_filtering_threshold", 0, "inter-class filtering is not supported"))
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# arithmetic is on numbers only, and powers small: `9 ** 9 ** 9` or `"x" * 10 ** 9` in a
# config would otherwise stall or fill the memory while it is merely being read
MAX_EXPONENT = 64


class ArcfaceConfigError(ToolkitError, ValueError):
    """An arcface_torch config this reader refuses; the message names file and line."""


def _config_field(target: ast.expr) -> str | None:
    """``field`` for an assignment target ``config.field``, else None."""
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
            and target.value.id == CONFIG_NAME:
        return target.attr
    return None


def looks_like_arcface_torch(path: str | Path) -> bool:
    """Whether a Python file assigns attributes of ``config`` at module level, as
    arcface_torch's configs do (ours define a dict named ``config`` instead)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return False
    return any(isinstance(node, ast.Assign) and any(_config_field(t) for t in node.targets)
               for node in tree.body)


def _value(node: ast.expr, known: dict[str, Any], where: str) -> Any:
    """A literal, a tuple or list of them, or arithmetic over them and earlier fields."""
    if isinstance(node, ast.Constant) and not isinstance(node.value, bytes):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_value(item, known, where) for item in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand, known, where))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, known, where), _value(node.right, known, where)
        if not all(isinstance(v, (int, float)) for v in (left, right)) or \
                (isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT):
            raise ArcfaceConfigError(f"{where}: {ast.unparse(node)!r}: only arithmetic on "
                                     f"numbers (exponents up to {MAX_EXPONENT}) is read")
        try:
            return _BINARY[type(node.op)](left, right)
        except (TypeError, ArithmeticError) as e:
            raise ArcfaceConfigError(f"{where}: {ast.unparse(node)}: {e}") from None
    name = _config_field(node)
    if name is not None:
        if name not in known:
            raise ArcfaceConfigError(f"{where}: config.{name} is used before it is set")
        return known[name]
    raise ArcfaceConfigError(f"{where}: {ast.unparse(node)!r} is not a literal (an "
                             "arcface_torch config is read, never run)")


def _boilerplate(node: ast.stmt) -> bool:
    """The easydict import, ``config = edict()`` and docstrings: accepted, ignored."""
    if isinstance(node, ast.ImportFrom):
        return node.module == "easydict" and [(a.name, a.asname) for a in node.names] == \
            [("EasyDict", "edict")]
    if isinstance(node, ast.Assign) and len(node.targets) == 1 \
            and isinstance(node.targets[0], ast.Name) and node.targets[0].id == CONFIG_NAME:
        call = node.value
        return isinstance(call, ast.Call) and isinstance(call.func, ast.Name) \
            and call.func.id == "edict" and not call.args and not call.keywords
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
        and isinstance(node.value.value, str)


def read_fields(path: str | Path) -> dict[str, Any]:
    """The fields one arcface_torch config file assigns, in order, read without running it."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise ArcfaceConfigError(f"{path}:{e.lineno}: not valid Python ({e.msg})") from None
    fields: dict[str, Any] = {}
    for node in tree.body:
        where = f"{path}:{node.lineno}"
        if _boilerplate(node):
            continue
        name = _config_field(node.targets[0]) if isinstance(node, ast.Assign) \
            and len(node.targets) == 1 else None
        if name is None:
            raise ArcfaceConfigError(f"{where}: only `config.<field> = <literal>` lines are "
                                     f"read, got {ast.unparse(node).splitlines()[0]!r}")
        fields[name] = _value(node.value, fields, where)
    return fields


def resolve_fields(path: str | Path) -> dict[str, Any]:
    """The job file's fields over ``base.py`` beside it (when there is one), and the output
    folder arcface_torch gives a run whose output is None."""
    path = Path(path)
    base = path.with_name(BASE_FILE)
    fields = read_fields(base) if base.is_file() and base.resolve() != path.resolve() else {}
    fields.update(read_fields(path))
    if fields.get("output") is None:
        fields["output"] = str(Path(DEFAULT_OUTPUT_ROOT) / path.stem)
    return fields


def _margins(margin_list: Any, where: str) -> dict[str, Any]:
    """Its (m1, m2, m3) as our head, as its CombinedMarginLoss.forward runs them: m1 = 1
    and m3 = 0 is ArcFace with m2; otherwise m3 > 0 is CosFace with m3, m1 and m2 ignored
    there (named in a warning); anything else fails there and is refused here."""
    if not (isinstance(margin_list, (tuple, list)) and len(margin_list) == 3):
        raise ArcfaceConfigError(f"{where}: margin_list must be (m1, m2, m3), "
                                 f"got {margin_list!r}")
    m1, m2, m3 = (float(m) for m in margin_list)
    if m1 == 1.0 and m3 == 0.0 and m2 > 0.0:
        return {"head": "arcface", "margin_m": m2}
    if m1 == 1.0 and m3 == 0.0:  # cos(theta + m2) at m2 <= 0
        return {"head": "combined", "margin_m1": m1, "margin_m": m2, "margin_m3": m3}
    if m3 > 0.0:
        if (m1, m2) != (1.0, 0.0):
            get_logger("face.config").warning(
                "%s: margin_list %r: arcface_torch applies m3 alone when m3 > 0 (its m1 and "
                "m2 unused): CosFace m = %g here too", where, tuple(margin_list), m3)
        return {"head": "cosface", "margin_m": m3}
    raise ArcfaceConfigError(f"{where}: margin_list {tuple(margin_list)!r}: arcface_torch's "
                             "CombinedMarginLoss runs (1.0, m2, 0.0) or m3 > 0 only and fails "
                             "on this one")


def _accumulation(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """Its gradient_acc k as ours, the same steps. Its loss is not divided by k, so it steps
    on the sum of the k micro-batches' gradients, ours on their mean: its clipping of the
    sum at norm 5 is ours of the mean at 5 / k; AdamW's step is the same on either (but for
    its eps); SGD's would be k times larger, so SGD takes lr x k and weight decay / k (the
    same step, each momentum buffer 1/k of its)."""
    k = fields.get("gradient_acc", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        return {"gradient_acc": k}  # Config refuses it, naming the field
    out: dict[str, Any] = {"gradient_acc": k, "grad_clip": ARCFACE_CLIP / k}
    if k > 1 and fields.get("optimizer", "sgd") == "sgd":
        missing = [name for name in ("lr", "weight_decay") if name not in fields]
        if missing:
            raise ArcfaceConfigError(f"{where}: config.gradient_acc = {k} with SGD needs "
                                     f"config.{' and config.'.join(missing)}")
        out.update(lr=fields["lr"] * k, weight_decay=fields["weight_decay"] / k)
    return out


def _check_unsupported(fields: dict[str, Any], where: str) -> None:
    """Refuse fields that would change the training; name the switched-on ones we ignore."""
    for name, inert, why in ONLY_INERT:
        if name in fields and fields[name] != inert:
            raise ArcfaceConfigError(f"{where}: config.{name} = {fields[name]!r}: {why}")
    on = [name for name in SWITCHED_OFF_HERE if fields.get(name)]
    if on:
        get_logger("face.config").warning("%s: ignored, not supported here: %s", where,
                                          ", ".join(on))


def to_overrides(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """arcface_torch's fields as Config overrides: its lr applied as given (no rescaling),
    its linear warm-up and decay, its weight decay on every parameter, its SGD momentum of
    0.9, its clipping of the backbone only, its gradient_acc (_accumulation), fp16 autocast
    when it asks for fp16 (fp32 otherwise)."""
    known = {*SAME_MEANING, *SWITCHED_OFF_HERE, *DROPPED, *(n for n, _, _ in ONLY_INERT),
             "margin_list", "network", "fp16", "rec", "val_targets", "output", "gradient_acc",
             "momentum"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ArcfaceConfigError(f"{where}: arcface_torch field(s) not understood here: "
                                 f"{', '.join(unknown)}")
    _check_unsupported(fields, where)
    out = {ours: fields[theirs] for theirs, ours in SAME_MEANING.items() if theirs in fields}
    out.update(scale_s=ARCFACE_SCALE, scale_lr=False, scheduler="linear", decay_all=True,
               clip_head=False, momentum=ARCFACE_MOMENTUM)
    if fields.get("momentum", ARCFACE_MOMENTUM) != ARCFACE_MOMENTUM \
            and fields.get("optimizer", "sgd") == "sgd":
        get_logger("face.config").warning(
            "%s: config.momentum = %r: arcface_torch's SGD runs at momentum %g whatever it "
            "says; %g here too", where, fields["momentum"], ARCFACE_MOMENTUM, ARCFACE_MOMENTUM)
    out.update(_accumulation(fields, where))
    if "margin_list" in fields:
        out.update(_margins(fields["margin_list"], where))
    if "network" in fields:
        out["network"] = NETWORKS.get(fields["network"], fields["network"])
    if "fp16" in fields:
        out["amp"] = "fp16" if fields["fp16"] else "none"
    if fields.get("output") is not None:
        out["output"] = fields["output"]
    if "rec" in fields:
        out["rec"] = str(Path(fields["rec"]) / TRAIN_REC)
        out["val_bins"] = [str(Path(fields["rec"]) / f"{name}.bin")
                           for name in fields.get("val_targets") or ()]
    return out


def load_arcface_torch_config(path: str | Path) -> dict[str, Any]:
    """Config overrides from an arcface_torch config file (and base.py beside it)."""
    return to_overrides(resolve_fields(path), str(path))
