"""Pieces of `train.py` that are not the loop itself: the resumable sampler, the lr schedule,
optimiser parameter groups, RNG state capture, label checks, checkpoint file names and
writing, what a resumed run may change, and the test-only fault injection."""

from __future__ import annotations

import math
import os
import random
import re
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils import ToolkitError, save_checkpoint

# ----------------------------------------------------------------------------- errors

EXIT_NON_FINITE = 2  # train.py's exit status when it stopped on a NaN/inf loss


class NonFiniteLossError(ToolkitError, RuntimeError):
    """Training met a NaN/inf loss, gradient norm or weight and stopped before using it."""

    exit_code = EXIT_NON_FINITE


class LabelRangeError(ToolkitError, ValueError):
    """A training label lies outside [0, num_classes); the message names the data file."""


class ResumeError(ToolkitError, ValueError):
    """A checkpoint that cannot be resumed by this run (missing, damaged, or a different
    setup); the message names the file or the field."""


class CheckpointFileError(ToolkitError, RuntimeError):
    """A checkpoint file that cannot be read (damaged, truncated, missing a part) or whose
    weights do not fit this run's network; the message names the file."""


class DataSetError(ToolkitError, ValueError):
    """A training set that cannot be trained on (empty, too small for one batch); the
    message names the file or folder."""


class OutputFolderError(ToolkitError, ValueError):
    """An --output that cannot take this run (a file, or a folder holding another run)."""


class CheckpointWriteError(ToolkitError, OSError):
    """A checkpoint could not be written (disk full, permissions); the message names the
    file and the last complete checkpoint, which is kept."""


# ----------------------------------------------------------------------------- step values

STATS = ("loss", "accuracy", "grad_norm")  # each step's values, copied to the host together


def step_is_finite(stats: torch.Tensor, loss_only: bool = False) -> torch.Tensor:
    """The one rule for a usable step, on the device or on a host copy: a finite loss and,
    unless ``loss_only`` (fp16, where the grad scaler itself skips inf gradients), a finite
    gradient norm. A bool tensor on ``stats``' device."""
    finite = torch.isfinite(stats[STATS.index("loss")])
    return finite if loss_only else finite & torch.isfinite(stats[STATS.index("grad_norm")])


class QueuedStep:
    """A training step's values tensor ([loss, accuracy, gradient norm]) and its place in
    the run. On CUDA the values are copied to pinned host memory at once, behind the step's
    own kernels, and an event marks the copy's end: ``values()`` then waits for that step
    only, not for the steps queued after it."""

    def __init__(self, stats: torch.Tensor, step: int, epoch: int, lr: float, margin: float
                 ) -> None:
        self.step, self.epoch, self.lr, self.margin = step, epoch, lr, margin
        self.ready = None
        if stats.device.type == "cuda":
            self.host = stats.detach().to("cpu", non_blocking=True)  # pinned, asynchronous
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = stats.detach()

    def values(self) -> dict[str, float]:
        if self.ready is not None:
            self.ready.synchronize()
        return dict(zip(STATS, self.host.tolist(), strict=True))

    def finite(self, loss_only: bool = False) -> bool:
        """step_is_finite on the copied values (after ``values()``)."""
        return bool(step_is_finite(self.host, loss_only))


# ----------------------------------------------------------------------------- sampler


class ResumableBatchSampler(torch.utils.data.Sampler[int]):
    """Sample indices for one rank, deterministic in (seed, epoch), resumable mid-epoch.

    Epoch e shuffles all samples with a generator seeded by ``seed + e``; global batch b is
    ``perm[b*G:(b+1)*G]`` with G = batch_size * world_size, and rank r takes the r-th slice
    of it. The incomplete last global batch is dropped. ``set_epoch(e, start_batch=k)`` starts
    the epoch at batch k, so a resumed run reads exactly the batches the interrupted one had
    left, without loading the skipped ones. The order depends only on the seed, epoch and
    global batch, never on the RNG state of the process."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} samples are fewer than one global batch of "
                             f"{self.global_batch} ({batch_size} x {world_size} ranks)")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.global_batch + self.rank * self.batch_size
            yield from order[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


# ----------------------------------------------------------------------------- schedules

POLY_POWER = 2  # arcface_torch's PolyScheduler


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the base lr for 0-based ``step``: linear warm-up to 1 over
    ``warmup_steps``, then ``poly`` ((1 - progress)^2, as arcface_torch) or ``cosine``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "poly":
        return (1.0 - progress) ** POLY_POWER
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler {kind!r}; choose poly or cosine")



def margin_at(step: int, total_steps: int, margin: float, warmup_fraction: float) -> float:
    """The margin m ramped linearly from 0 over the first ``warmup_fraction`` of the steps."""
    ramp = warmup_fraction * total_steps
    if ramp <= 0:
        return margin
    return margin * min(1.0, step / ramp)


# ----------------------------------------------------------------------------- optimiser


def param_groups(modules: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay for weights, none for BatchNorm scales/shifts and biases."""
    decay, no_decay, seen = [], [], set()
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                (no_decay if isinstance(sub, norm_types) or name.endswith("bias")
                 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(groups: list[dict[str, Any]], name: str, lr: float, momentum: float,
                    nesterov: bool, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; ``fused`` (CUDA or CPU) updates every
    parameter in one kernel per tensor instead of several (on the CPU: 175 MB of centres
    updated in ~21 ms against ~46 ms for the per-op loop, measured on 2 cores)."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                               fused=fused or None)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adamw")


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states in a form torch.load(weights_only)
    accepts (NumPy's key array becomes a tensor)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                       int(np_has_gauss), float(np_gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_value))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- data checks


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    """Refuse labels outside [0, num_classes) before training starts, naming the file."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise LabelRangeError(
            f"{source}: {bad.size} of {labels.size} labels lie outside [0, {num_classes}) "
            f"(first: sample {i} has label {int(labels[i])}); the data set declares "
            f"{num_classes} identities")


# ----------------------------------------------------------------------------- files

CHECKPOINT_NAME = "checkpoint.pt"
# the checkpoint before the latest, kept until the next one is whole: a damaged
# checkpoint.pt falls back to it
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"
BACKBONE_NAME = "backbone.pt"
CONFIG_NAME = "config.json"
HEAD_FILE_PATTERN = "checkpoint_rank*_step*.pt"
_HEAD_RE = re.compile(r"checkpoint_rank(\d+)_step(\d+)\.pt$")


def write_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """utils.save_checkpoint (atomic), with a failed write reported as the OSError it is:
    torch's zip writer turns it into ``RuntimeError('unexpected pos ...')`` and keeps the
    OSError (e.g. ENOSPC, disk full) only as that error's context."""
    try:
        save_checkpoint(state, path)
    except RuntimeError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from e
        raise


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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, pickled objects: all unusable alike
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointFileError(f"{path}: damaged ({reason})") from e
    if not isinstance(state, dict):
        raise CheckpointFileError(f"{path}: damaged (not a checkpoint dict)")
    return state


def reshard_head_state(load_rank: Callable[[int], dict[str, Any]], num_classes: int,
                       old_world: int, new_world: int, new_rank: int) -> dict[str, Any]:
    """``new_rank``'s head file contents for a world of ``new_world`` ranks, cut from the files
    of a run with ``old_world`` ranks (``load_rank(r)`` reads old rank r's file; only the
    ones whose classes overlap are read, one at a time). Per-centre tensors (the centres and
    their optimiser moments: the rows of a shard) are sliced and joined; everything else
    (param groups, scheduler, scalar optimiser state) comes from the first file read."""
    from arcface_loss import shard_range

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


# ----------------------------------------------------------------------------- resuming

# What a resumed run may change. Everything here is read from the config afresh (the lr,
# momentum and weight decay are put back into the optimisers over the saved ones) and each
# change is logged.
RESUME_MAY_CHANGE = frozenset({
    # where things are, and what is checked along the way
    "output", "val_bins", "lfw_dir", "pairs", "allow_lost_records",
    # optimiser hyperparameters: from the resumed step on
    "lr", "base_batch_size", "momentum", "nesterov", "weight_decay", "grad_clip",
    # the loss: margins and scale are plain numbers read at each step
    "margin_m", "scale_s", "margin_m1", "margin_m3", "easy_margin", "focal_gamma", "dropout",
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


def all_finite(modules: Sequence[nn.Module]) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


# ----------------------------------------------------------------------------- fault injection

FAULT_ENV = "FACE_TRAIN_FAULT"


def injected_fault(step: int) -> str | None:
    """Test-only fault injection: ``FACE_TRAIN_FAULT=nan@7`` turns the loss of step 7 into
    NaN; ``kill@7`` kills the process (SIGKILL, no clean-up) once step 7 and any checkpoint
    due at it are done. Steps count from 1. Unset in normal use."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    kind, _, at = spec.partition("@")
    if kind not in ("nan", "kill") or not at.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected nan@STEP or kill@STEP")
    return kind if int(at) == step else None


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
