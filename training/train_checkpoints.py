"""A training run's files: the output folder's checks, checkpoint writing (atomic, the
previous one kept), resuming from it (field by field: what may change, what is refused),
and re-cutting the head's shards for another world size.

Files in a run's output folder:

- ``config.json``: the config used (``models.load_backbone`` reads it beside backbone.pt);
- ``backbone.pt``: the bare backbone state dict for evaluation, rewritten at each checkpoint;
- ``checkpoint.pt`` (rank 0): backbone, its optimiser and scheduler, grad scaler, epoch,
  step, world size, number of classes and images, the set's identity list (hashes, see
  :func:`identity_list`), config, and the logged history. Written last: it is the commit
  record of a checkpoint;
- ``checkpoint.prev.pt``: the checkpoint before it (a second name for the old file, kept
  until the new one is whole), which a resume falls back to, with a warning, when
  ``checkpoint.pt`` or a head file of its step is damaged, missing, of another layout (a
  field missing or of another type) or not finite;
- ``checkpoint_rank{r}_step{S}.pt`` (one per rank): that rank's head (its shard of the class
  centres), the head's optimiser and scheduler, and the rank's RNG states. The step in the
  name ties it to the ``checkpoint.pt`` (or ``checkpoint.prev.pt``) of that step; older
  ones are deleted once a newer checkpoint is committed;
- ``tensorboard/`` and ``training_curves.png`` (monitor.Monitor, CurvesWriter).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from config import Config
from training.distributed import DistInfo, all_ranks_true, shard_range
from training.trainer import NonFiniteLossError, Trainer, rng_state, set_rng_state
from utils import (
    CONFIG_FILE,
    CORRUPT_REASON_CHARS,
    SHORT_HASH_CHARS,
    CheckpointError,
    OutputBusyError,
    ToolkitError,
    claim_output,
    describe_error,
    get_logger,
    load_backbone_state,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    seed_everything,
)

LOG = get_logger("train")

CHECKPOINT_NAME = "checkpoint.pt"
# the checkpoint before the latest, kept until the next one is whole: a damaged
# checkpoint.pt falls back to it
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"
BACKBONE_NAME = "backbone.pt"
CURVES_NAME = "training_curves.png"
TENSORBOARD_NAME = "tensorboard"  # the folder of TensorBoard event files
HEAD_FILE_PATTERN = "checkpoint_rank*_step*.pt"
_HEAD_RE = re.compile(r"checkpoint_rank(\d+)_step(\d+)\.pt$")
# the per-rank files of a run InsightFace's arcface_torch saved (arcface_torch_checkpoint.py)
ARCFACE_TORCH_PATTERN = "checkpoint_gpu_*.pt"
# The files a run writes into its output folder (besides the per-rank head files)
RUN_FILE_NAMES = (CONFIG_FILE, CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, BACKBONE_NAME,
                  CURVES_NAME, TENSORBOARD_NAME)
# The fields a resume reads and their types. A file of another layout (an older toolkit's,
# or one edited by hand) is named by its first field that differs, and the resume falls back
# to checkpoint.prev.pt as for a damaged file.
CHECKPOINT_FIELDS: dict[str, type] = {
    "backbone": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "step": int,
    "world_size": int, "num_classes": int, "config": dict}
OPTIONAL_CHECKPOINT_FIELDS: dict[str, type] = {"logs": dict, "num_samples": int}  # newer
SAVED_CONFIG_FIELDS: dict[str, type] = {"batch_size": int}  # the global batch is compared
OPTIMIZER_FIELDS: dict[str, type] = {"state": dict, "param_groups": list}
HEAD_FILE_FIELDS: dict[str, type] = {"head": dict, "optimizer": dict, "scheduler": dict}
HEAD_FIELDS: dict[str, type] = {"weight": torch.Tensor}  # the shard of class centres
# trainer.rng_state's layout; read only when the world size is the same
RNG_FIELDS: dict[str, type | tuple[type, ...]] = {"python": (tuple, list),
                                                   "numpy": (tuple, list),
                                                   "torch": torch.Tensor}


class ResumeError(ToolkitError, ValueError):
    """A checkpoint that cannot be resumed by this run (missing, damaged, or a different
    setup); the message names the file or the field."""


class CheckpointFileError(ToolkitError, RuntimeError):
    """A checkpoint file that cannot be read (damaged, truncated, missing a part) or whose
    weights do not fit this run's network; the message names the file."""


class OutputFolderError(ToolkitError, ValueError):
    """An --output that cannot take this run (a file, or a folder holding another run)."""


class CheckpointWriteError(ToolkitError, OSError):
    """A checkpoint could not be written (disk full, permissions); the message names the
    file and the last complete checkpoint, which is kept."""


# ----------------------------------------------------------------------------- output folder


def run_files(output: Path) -> list[Path]:
    """What a run left in ``output``: its files, TensorBoard folder and head files."""
    found = [output / name for name in RUN_FILE_NAMES if (output / name).exists()]
    return found + sorted(output.glob(HEAD_FILE_PATTERN))


def check_output_folder(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an --output this run cannot use, before anything is written: a file; a
    folder holding another run unless resuming it or --overwrite; --resume without a
    checkpoint (ours or arcface_torch's). Reads only, on every rank (each must refuse
    alike)."""
    if output.exists() and not output.is_dir():
        raise OutputFolderError(f"--output {output}: is a file, not a folder")
    if resume:
        if not any((output / name).is_file()
                   for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME)) \
                and not any(output.glob(ARCFACE_TORCH_PATTERN)):
            raise ResumeError(f"--resume: no checkpoint to resume at {output / CHECKPOINT_NAME}")
        return
    found = run_files(output) + sorted(output.glob(ARCFACE_TORCH_PATTERN))
    if found and not overwrite:
        raise OutputFolderError(
            f"{output} already holds a run ({', '.join(p.name for p in found)}); continue it "
            "with --resume, train into a new --output, or replace it with --overwrite")


@contextmanager
def claim_run_folder(cfg: Config, info: DistInfo, init_checkpoint: str | None
                     ) -> Iterator[None]:
    """For the run's lifetime, rank 0 holds --output (:func:`utils.claim_output`: none of the
    run's inputs, one writer: a second training or a --resume of a run still training is
    refused with the holder's pid). The other ranks share rank 0's folder and its verdict
    (a collective), so every rank refuses alike."""
    inputs = {"--rec": cfg.rec, "--image-folder": cfg.image_folder,
              "--init-checkpoint": init_checkpoint, "--val-bins": cfg.val_bins}
    with ExitStack() as held:
        refused = None
        if info.is_main:
            try:
                held.enter_context(claim_output(cfg.output, "--output", inputs))
            except (ToolkitError, OSError) as e:  # every rank must reach the collective
                refused = e
        if not all_ranks_true(refused is None, info):
            raise refused or OutputBusyError(f"--output {cfg.output}: refused on rank 0")
        yield


def prepare_output(output: Path, cfg: Config, overwrite: bool) -> None:
    """Rank 0, once every check has passed: create the folder, delete the old run's files
    when overwriting it, delete temporaries that a killed run left (no writer of these
    names runs now), and write config.json."""
    output.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in run_files(output):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    orphans = [p for name in (*RUN_FILE_NAMES, HEAD_FILE_PATTERN)
               for p in remove_stale_temporaries(output, name,
                                                 name_is_pattern=name == HEAD_FILE_PATTERN)]
    if orphans:
        LOG.info("removed %d temporary file(s) left by an interrupted run: %s", len(orphans),
                 ", ".join(p.name for p in orphans))
    cfg.save(output / CONFIG_FILE)


# ----------------------------------------------------------------------------- files


def keep_as_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` hold the complete checkpoint now at ``path`` before a new one is
    renamed over ``path``. A hard link, so ``path`` itself stays whole meanwhile (and after
    a failed write); where the file system has none, a rename."""
    if not path.is_file():  # removed by hand meanwhile: nothing to keep
        return
    previous.unlink(missing_ok=True)
    try:
        os.link(path, previous)
    except OSError:
        os.replace(path, previous)


def read_checkpoint_file(path: Path) -> dict[str, Any]:
    """A checkpoint file's contents, or CheckpointFileError naming it (one line) when it is
    missing, truncated or otherwise unreadable."""
    if not path.is_file():
        raise CheckpointFileError(f"{path}: missing")
    try:
        state = load_checkpoint(path)  # truncated, garbage, pickled objects: one line
    except CheckpointError as e:
        raise CheckpointFileError(str(e)) from e
    if not isinstance(state, dict):
        raise CheckpointFileError(f"{path}: damaged (not a checkpoint dict)")
    return state


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = [k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,))]
    return " or ".join(("an " if n[0] in "aeiou" else "a ") + n for n in names)


def check_fields(state: Mapping[str, Any], fields: Mapping[str, type | tuple[type, ...]],
                 path: Path, prefix: str = "", optional: bool = False) -> None:
    """CheckpointFileError naming ``path`` and the first of ``fields`` that ``state`` lacks
    (unless ``optional``: absent or None is fine) or holds as another type."""
    for key, kind in fields.items():
        value = state.get(key)
        if value is None and optional:
            continue
        field = f"{prefix}{key}"
        if key not in state:
            raise CheckpointFileError(f"{path}: another checkpoint layout: field {field!r} "
                                      "is missing")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointFileError(
                f"{path}: another checkpoint layout: field {field!r} is "
                f"{_type_name(type(value))}, not {_type_name(kind)}")


def check_checkpoint_layout(ckpt: Mapping[str, Any], path: Path) -> None:
    """The fields of checkpoint.pt that a resume reads, before any is used."""
    check_fields(ckpt, CHECKPOINT_FIELDS, path)
    check_fields(ckpt, OPTIONAL_CHECKPOINT_FIELDS, path, optional=True)
    check_fields(ckpt["config"], SAVED_CONFIG_FIELDS, path, prefix="config.")
    check_fields(ckpt["optimizer"], OPTIMIZER_FIELDS, path, prefix="optimizer.")


def check_head_layout(state: Mapping[str, Any], path: Path, with_rng: bool) -> None:
    """The fields of a head file that a resume reads (its RNG state when ``with_rng``)."""
    check_fields(state, HEAD_FILE_FIELDS, path)
    check_fields(state["head"], HEAD_FIELDS, path, prefix="head.")
    check_fields(state["optimizer"], OPTIMIZER_FIELDS, path, prefix="optimizer.")
    if with_rng:
        check_fields(state, {"rng": dict}, path)
        check_fields(state["rng"], RNG_FIELDS, path, prefix="rng.")


def head_checkpoint_path(output: Path, rank: int, step: int) -> Path:
    """Per-rank head shard file; the step in its name ties it to one ``checkpoint.pt``."""
    return output / f"checkpoint_rank{rank}_step{step}.pt"


def stale_head_files(output: Path, rank: int, world_size: int, keep_steps: set[int]
                     ) -> list[Path]:
    """The head files ``rank`` removes once a checkpoint is saved, of steps not in
    ``keep_steps`` (those of checkpoint.pt and checkpoint.prev.pt): its own and, on rank 0,
    those of ranks >= ``world_size`` (left by a run with more ranks)."""
    stale = []
    for path in output.glob(HEAD_FILE_PATTERN):
        m = _HEAD_RE.search(path.name)
        if not m:
            continue
        owner, saved_step = int(m.group(1)), int(m.group(2))
        if saved_step not in keep_steps and \
                (owner == rank or (rank == 0 and owner >= world_size)):
            stale.append(path)
    return stale


# ----------------------------------------------------------------------------- identities

def identity_list(names: Sequence[str] | None, labels: np.ndarray,
                  num_classes: int) -> dict[str, str | None]:
    """What a checkpoint records of its set's label mapping, as hashes: the identity names
    in label order (``names``; None where the set does not keep them, as in InsightFace's
    own .rec) and the number of images of each label. A renamed, added or removed identity
    folder renumbers the labels of a re-packed set without changing its size."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype("<i8")
    # JSON with ensure_ascii: one unambiguous text for any name (newlines, undecodable bytes)
    named = None if names is None else \
        hashlib.sha256(json.dumps(list(names)).encode("ascii")).hexdigest()
    return {"names_sha256": named, "counts_sha256": hashlib.sha256(counts.tobytes()).hexdigest()}


def identity_differences(saved: Mapping[str, Any] | None,
                         current: Mapping[str, Any] | None) -> list[str]:
    """Why the set's identity list is not the checkpoint's (empty: the same, or not known
    on one side: a checkpoint that predates the record, a set that keeps no names)."""
    if not saved or not current:
        return []
    reason = ("the labels would name other people: each class centre would go on training "
              "on another identity's images; re-pack the set as it was or start a new run")
    for key, what in (("names_sha256", "identity names"),
                      ("counts_sha256", "images per identity")):
        old, new = saved.get(key), current.get(key)
        if old and new and old != new:
            return [f"identities: the set's {what} in label order differ from the "
                    f"checkpoint's (sha256 {old[:SHORT_HASH_CHARS]} -> "
                    f"{new[:SHORT_HASH_CHARS]}; {reason})"]
    return []


# ----------------------------------------------------------------------------- saving


@dataclass
class SavedSteps:
    """The steps the output folder's checkpoints hold, as far as this run knows: a
    complete checkpoint.pt (None: none yet, or a damaged one the next save replaces) and
    checkpoint.prev.pt (None: none, or not known). The head files of both are kept."""
    current: int | None = None
    previous: int | None = None

    def last_complete(self, output: Path) -> tuple[Path, int] | None:
        # checkpoint.pt is gone only where keep_as_previous had to rename it
        if self.current is not None and (output / CHECKPOINT_NAME).is_file():
            return output / CHECKPOINT_NAME, self.current
        if self.previous is not None:
            return output / PREVIOUS_CHECKPOINT_NAME, self.previous
        return None

    def describe_last(self, output: Path) -> str:
        last = self.last_complete(output)
        return (f"last good checkpoint: {last[0]} (step {last[1]})" if last
                else "no checkpoint had been written yet")


def raise_unless_all_written(error: OSError | None, info: DistInfo, step: int,
                             saved: SavedSteps, output: Path) -> None:
    """A collective: when any rank failed to write its part of step ``step``'s checkpoint,
    every rank raises CheckpointWriteError naming the file and the checkpoint kept."""
    if all_ranks_true(error is None, info):
        return
    what = describe_error(error) if error else "another rank could not write its head file"
    raise CheckpointWriteError(f"{what}; the checkpoint of step {step} was not saved; "
                               f"{saved.describe_last(output)}")


def all_finite(modules: list[torch.nn.Module]) -> bool:
    """Whether every parameter is finite; the host waits for the device once, not once per
    tensor."""
    flags = [torch.isfinite(p).all() for m in modules for p in m.parameters()]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def save_training_checkpoint(trainer: Trainer, cfg: Config, step: int, epoch: int,
                             num_classes: int, num_samples: int, saved: SavedSteps,
                             logs: dict[str, list] | None = None,
                             identities: dict[str, str | None] | None = None) -> Path:
    """Per-rank files first, then ``backbone.pt``, then ``checkpoint.pt`` (the commit, with
    ``logs``: the logged history so far); all atomic. The checkpoint.pt being replaced
    stays as checkpoint.prev.pt (with its head files) until the next one is whole. The
    caller has checked every step's loss since the last save; non-finite weights are
    refused here as well, so a good checkpoint is never replaced by a bad one. A failed
    write (disk full) raises CheckpointWriteError on every rank. Updates ``saved`` and
    returns the path of ``checkpoint.pt``."""
    output, info = Path(cfg.output), trainer.info
    if not all_ranks_true(all_finite([trainer.backbone, trainer.head]), info):
        raise NonFiniteLossError(f"non-finite weights at step {step}; checkpoint not "
                                 f"written; {saved.describe_last(output)}")
    error: OSError | None = None
    try:
        save_checkpoint({"head": trainer.head.state_dict(),
                         "optimizer": trainer.opt_head.state_dict(),
                         "scheduler": trainer.sched_head.state_dict(), "rng": rng_state(),
                         "step": step, "rank": info.rank, "world_size": info.world_size},
                         head_checkpoint_path(output, info.rank, step))
    except OSError as e:
        error = e
    raise_unless_all_written(error, info, step, saved, output)
    path = output / CHECKPOINT_NAME
    rotate = saved.current is not None  # a damaged checkpoint.pt is not kept as previous
    if info.is_main:
        try:
            backbone_state = trainer.backbone.state_dict()
            # before the commit record: a failure here leaves the last checkpoint whole
            save_checkpoint(backbone_state, output / BACKBONE_NAME)
            if rotate:
                keep_as_previous(path, output / PREVIOUS_CHECKPOINT_NAME)
            save_checkpoint({"backbone": backbone_state,
                              "optimizer": trainer.opt_backbone.state_dict(),
                              "scheduler": trainer.sched_backbone.state_dict(),
                              "scaler": trainer.scaler.state_dict(), "step": step, "epoch": epoch,
                              "world_size": info.world_size, "num_classes": num_classes,
                              "num_samples": num_samples, "identities": identities,
                              "config": cfg.to_dict(),
                              "logs": logs or {}}, path)
        except OSError as e:
            error = e
    if rotate:  # the same on every rank: checkpoint.prev.pt now holds what checkpoint.pt held
        saved.previous = saved.current
    raise_unless_all_written(error, info, step, saved, output)
    saved.current = step
    for stale in stale_head_files(output, info.rank, info.world_size,
                                  keep_steps={step, saved.previous}):
        stale.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- resuming

# What a resumed run may change. Everything here is read from the config afresh (the lr,
# momentum and weight decay are put back into the optimisers over the saved ones) and each
# change is logged.
RESUME_MAY_CHANGE = frozenset({
    # where things are, and what is checked along the way
    "output", "val_bins", "lfw_dir", "pairs", "allow_lost_records", "num_classes", "num_image",
    # optimiser hyperparameters: from the resumed step on
    "lr", "base_batch_size", "scale_lr", "momentum", "nesterov", "weight_decay", "grad_clip",
    "clip_head",
    # the micro-batches of a step: with the same global batch (compared), the same step
    "gradient_acc",
    # the loss: margins and scale are plain numbers read at each step
    "margin_m", "scale_s", "margin_m1", "margin_m3", "easy_margin", "focal_gamma", "dropout",
    # the newer heads' options: read when the head is built (their running statistics are
    # buffers in the head's state, resumed as saved)
    "adaface_h", "adaface_t_alpha", "magface_l_a", "magface_u_a", "magface_l_m", "magface_u_m",
    "magface_lambda_g", "elastic_sigma", "elastic_plus",
    # how and how long it runs
    "device", "amp", "cpu_amp", "channels_last", "compile", "compile_mode", "num_workers",
    "ring_loader", "keep_freed_memory", "save_every", "verify_every", "log_every",
    "max_steps",
})
# What must match the checkpoint, each with the reason the refusal gives. batch_size may
# change with the world size as long as the global batch stays (8 x 64 -> 4 x 128).
RESUME_REFUSED: dict[str, str] = {
    "network": "the saved weights are this network's",
    "embedding_size": "the saved weights have this shape",
    "head": "the class centres were trained for this margin",
    "sample_rate": "Partial FC and a full head keep different state",
    "optimizer": "the saved optimiser state is this optimiser's",
    "decay_all": "the saved optimiser state holds these parameter groups",
    "rec": "the data order is a function of the data set",
    "image_folder": "the data order is a function of the data set",
    "seed": "the data order is a function of the seed",
    "batch_size": "the data order and the step depend on the global batch",
    # the lr schedule and the margin ramp span all epochs: another value would bend them
    # where the run stands; to stop earlier, --max-steps may change
    "epochs": "the lr schedule and margin ramp span all epochs; use --max-steps to stop "
              "earlier",
    "scheduler": "the lr schedule would jump",
    "warmup_epochs": "the lr schedule would jump",
    "margin_warmup": "the margin ramp would jump",
}


def _same_data_path(saved: Any, current: Any) -> bool:
    """Equal strings, or two spellings (relative, absolute) of one existing file."""
    if saved == current:
        return True
    try:
        return bool(saved and current) and os.path.samefile(saved, current)
    except OSError:
        return False


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       defaults: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(changes a resumed run may make, refused changes), each as ``field: old -> new``.
    ``saved``: the checkpoint's config (a field it predates counts as its default);
    batch_size is not compared here (the caller compares the global batch)."""
    allowed, refused = [], []
    for name, value in current.items():
        old = saved.get(name, defaults[name])
        if name in ("rec", "image_folder") and _same_data_path(old, value):
            continue
        if old == value or name == "batch_size":
            continue
        change = f"{name}: {old!r} -> {value!r}"
        if name in RESUME_REFUSED:
            refused.append(f"{change} ({RESUME_REFUSED[name]})")
        else:
            allowed.append(change)
    return allowed, refused


def check_resumable(ckpt: dict[str, Any], path: Path, cfg: Config, num_classes: int,
                    num_samples: int | None, world_size: int,
                    identities: dict[str, str | None] | None = None) -> list[str]:
    """Refuse (ResumeError, naming each field) a checkpoint this run cannot continue: see
    RESUME_REFUSED, plus the global batch, the classes, the number of images and the
    identity list (:func:`identity_list`). Returns the allowed changes, ``field: old ->
    new``."""
    allowed, refused = resume_differences(ckpt["config"], cfg.to_dict(), Config().to_dict())
    saved_batch, saved_world = ckpt["config"]["batch_size"], int(ckpt["world_size"])
    saved_acc = ckpt["config"].get("gradient_acc", 1)  # absent from older checkpoints
    if saved_batch * saved_world * saved_acc != cfg.global_batch(world_size):
        def acc(k: int) -> str:
            return f" x {k} micro-batches" if k != 1 else ""
        refused.append(f"global batch: {saved_batch} x {saved_world} ranks{acc(saved_acc)} -> "
                       f"{cfg.batch_size} x {world_size}{acc(cfg.gradient_acc)} "
                       f"({RESUME_REFUSED['batch_size']})")
    if ckpt["num_classes"] != num_classes:
        refused.append(f"classes: {ckpt['num_classes']} -> {num_classes}")
    saved_samples = ckpt.get("num_samples")  # absent from older checkpoints
    if None not in (saved_samples, num_samples) and saved_samples != num_samples:
        refused.append(f"images: {saved_samples} -> {num_samples}")
    refused += identity_differences(ckpt.get("identities"), identities)
    if refused:
        raise ResumeError(f"{path}: cannot resume with a different setup ("
                          + "; ".join(refused) + "); to train with it, start a new run "
                          "(another --output, --init-checkpoint for the weights)")
    return allowed


def reshard_head_state(load_rank: Callable[[int], dict[str, Any]], num_classes: int,
                       old_world: int, new_world: int, new_rank: int) -> dict[str, Any]:
    """``new_rank``'s head file contents for a world of ``new_world`` ranks, cut from the files
    of a run with ``old_world`` ranks (``load_rank(r)`` reads old rank r's file; only the
    ones whose classes overlap are read, one at a time). Per-centre tensors (the centres and
    their optimiser moments: the rows of a shard) are sliced and joined; everything else
    (param groups, scheduler, scalar optimiser state) comes from the first file read."""
    start, end = shard_range(num_classes, new_world, new_rank)
    first: dict[str, Any] | None = None
    centres: list[torch.Tensor] = []
    rows: dict[tuple[int, str], list[torch.Tensor]] = {}  # (param index, key) -> slices
    for rank in range(old_world):
        lo, hi = shard_range(num_classes, old_world, rank)
        take_lo, take_hi = max(lo, start), min(hi, end)
        if take_lo >= take_hi:
            continue
        state = load_rank(rank)
        first = first or state
        centres.append(state["head"]["weight"][take_lo - lo:take_hi - lo])
        for index, param_state in state["optimizer"]["state"].items():
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == hi - lo:
                    rows.setdefault((index, key), []).append(value[take_lo - lo:take_hi - lo])
    if first is None:  # pragma: no cover - every range overlaps some old shard
        raise ValueError(f"no saved shard covers classes [{start}, {end})")
    optimizer_state = {index: dict(param_state)
                       for index, param_state in first["optimizer"]["state"].items()}
    for (index, key), parts in rows.items():
        optimizer_state[index][key] = torch.cat(parts)
    return {**first, "head": {**first["head"], "weight": torch.cat(centres)},
            "optimizer": {**first["optimizer"], "state": optimizer_state},
            "rank": new_rank, "world_size": new_world}


def read_resume_state(path: Path, trainer: Trainer, cfg: Config, num_classes: int,
                      num_samples: int | None,
                      identities: dict[str, str | None] | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``path`` (checkpoint.pt or its previous copy), this rank's head state from the head
    files of its step (re-cut when the world size changed) and the allowed setting
    changes. CheckpointFileError names a missing or damaged file, or the field of a file of
    another layout; ResumeError a setup the checkpoint cannot continue."""
    output, info = path.parent, trainer.info
    ckpt = read_checkpoint_file(path)
    check_checkpoint_layout(ckpt, path)
    changes = check_resumable(ckpt, path, cfg, num_classes, num_samples, info.world_size,
                              identities)
    step, saved_world = ckpt["step"], ckpt["world_size"]

    def load_rank(rank: int) -> dict[str, Any]:
        head_path = head_checkpoint_path(output, rank, step)
        state = read_checkpoint_file(head_path)
        check_head_layout(state, head_path, with_rng=saved_world == info.world_size)
        return state

    if saved_world == info.world_size:
        return ckpt, load_rank(info.rank), changes
    try:
        return ckpt, reshard_head_state(load_rank, num_classes, saved_world, info.world_size,
                                        info.rank), changes
    except (RuntimeError, ValueError, IndexError) as e:  # shards of other shapes
        raise CheckpointFileError(f"{output}: the head files of step {step} do not fit "
                                  f"together ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    """torch's reason for refusing a state, shortened to fit a one-line error."""
    reason = " ".join(str(e).split()) or type(e).__name__
    return reason if len(reason) <= CORRUPT_REASON_CHARS \
        else reason[:CORRUPT_REASON_CHARS - 3] + "..."


def _restore(path: Path | str, field: str, load: Callable[[], Any]) -> None:
    """``load()`` (a load_state_dict of ``field`` of ``path``); torch's refusal of a state
    of another shape or layout becomes a CheckpointFileError naming the file and field."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointFileError(f"{path}: field {field!r} does not fit this run "
                                  f"({_first_line(e)})") from e


def load_resume_state(trainer: Trainer, cfg: Config, path: Path, ckpt: dict[str, Any],
                      rank_state: dict[str, Any]) -> None:
    """Put what read_resume_state read into ``tr`` and set the RNG states; a part that does
    not fit is a CheckpointFileError naming its file and field (the caller falls back).
    Every part is loaded whole, so a later checkpoint loaded after a failed one leaves
    nothing of it; the grad scaler, which only an fp16 checkpoint sets, goes last."""
    info, step = trainer.info, ckpt["step"]
    same_world = ckpt["world_size"] == info.world_size
    head_file = head_checkpoint_path(path.parent, info.rank, step) if same_world \
        else f"{path.parent}: the head files of step {step}"
    _restore(path, "backbone", lambda: trainer.backbone.load_state_dict(ckpt["backbone"]))
    _restore(path, "optimizer", lambda: restore_optimizer(
        trainer.opt_backbone, trainer.sched_backbone, ckpt["optimizer"], ckpt["scheduler"]))
    _restore(head_file, "head", lambda: trainer.head.load_state_dict(rank_state["head"]))
    _restore(head_file, "optimizer", lambda: restore_optimizer(
        trainer.opt_head, trainer.sched_head, rank_state["optimizer"], rank_state["scheduler"]))
    if same_world:
        _restore(head_file, "rng", lambda: set_rng_state(rank_state["rng"]))
    else:  # no saved stream belongs to this rank: a fresh one per (rank, step)
        seed_everything(cfg.seed + info.rank + step * info.world_size)
    # the grad scaler has state only under fp16; amp may change between runs
    if trainer.scaler.is_enabled() and ckpt["scaler"]:
        _restore(path, "scaler", lambda: trainer.scaler.load_state_dict(ckpt["scaler"]))


def restore_optimizer(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
                      opt_state: dict[str, Any], sched_state: dict[str, Any]) -> None:
    """Load a saved optimiser and lr schedule but keep this run's hyperparameters (lr,
    momentum, weight decay, ...), which ``load_state_dict`` would replace with the saved
    run's whatever the config says now. The lr is this run's base lr at the saved step."""
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    for group, values in zip(opt.param_groups, hyper, strict=True):
        group.update(values)
    sched.base_lrs = [group["initial_lr"] for group in opt.param_groups]
    lrs = [base * factor(sched.last_epoch)
           for base, factor in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs  # what get_last_lr() reports


class Resumed(NamedTuple):
    step: int  # the step to continue from
    logs: dict[str, list]  # the logged history saved with the checkpoint
    saved: SavedSteps  # what the output folder's checkpoints hold


def resume_training(trainer: Trainer, cfg: Config, num_classes: int,
                    num_samples: int | None = None,
                    identities: dict[str, str | None] | None = None) -> Resumed:
    """Load ``checkpoint.pt`` and this rank's file into ``tr``, restore the RNG states, and
    return the step to continue from and the logs saved with it. A damaged or missing
    checkpoint.pt (or head file), or one of another layout (a field missing or of another
    type or shape), falls back to checkpoint.prev.pt with a warning; when
    neither is usable, ResumeError names them. Settings that may change (RESUME_MAY_CHANGE:
    lr, momentum, ...) are this run's and logged; the others must match."""
    output, info = Path(cfg.output), trainer.info
    problems: list[str] = []
    for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME):
        path, problem = output / name, None
        try:
            ckpt, rank_state, changes = read_resume_state(path, trainer, cfg, num_classes,
                                                          num_samples, identities)
            load_resume_state(trainer, cfg, path, ckpt, rank_state)
        except CheckpointFileError as e:
            problem = str(e)
        if all_ranks_true(problem is None, info):  # every rank resumes from the same step
            break
        problems.append(problem or f"{path}: another rank's head file is missing or damaged")
    else:
        raise ResumeError("cannot resume: " + "; ".join(problems))
    step = ckpt["step"]
    if info.is_main and problems:
        LOG.warning("%s; resuming from %s (step %d) instead", "; ".join(problems), path, step)
    if info.is_main and changes:
        LOG.info("resuming with changed settings: %s", "; ".join(changes))
    if info.is_main and identities and not ckpt.get("identities"):
        LOG.warning("%s predates the record of its set's identity list: that the labels "
                    "still name the same people cannot be checked", path)
    if info.is_main and ckpt["world_size"] != info.world_size:
        LOG.info("resuming %d ranks' run on %d: head shards re-cut from the saved ones; "
                 "data order and lr schedule continue as before, augmentation draws and "
                 "BatchNorm batches differ from an uninterrupted run", ckpt["world_size"],
                 info.world_size)
    saved = (SavedSteps(current=step) if path.name == CHECKPOINT_NAME
             else SavedSteps(previous=step))
    return Resumed(step, ckpt.get("logs") or {}, saved)


def load_init_weights(trainer: Trainer, path: str, network: str) -> None:
    """--init-checkpoint: backbone weights from backbone.pt or a checkpoint; a damaged file
    or one of another network is a CheckpointFileError naming it."""
    try:
        state = load_backbone_state(path)
    except RuntimeError as e:
        raise CheckpointFileError(" ".join(str(e).split())) from e
    try:
        trainer.backbone.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointFileError(f"{path}: not weights of network {network!r} ("
                                  + " ".join(str(e).split())[:300] + ")") from e
