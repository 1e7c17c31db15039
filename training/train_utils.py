"""What `train.py` uses besides the step and the checkpoints: the errors it stops with, the
``Trainer`` (what one step touches), the resumable sampler, the lr and margin schedules,
optimiser groups, RNG state capture, label checks, the loader, the TensorBoard/tqdm monitor
and curves PNG, verification on .bin sets, fp16 overflow agreement across ranks, and the
test-only fault injection."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from config import Config
from evaluation.bin_loader import load_bin
from evaluation.verification import evaluate_verification
from records.record_index import DatasetError
from training.distributed import DistInfo, all_reduce_sum_, barrier
from utils import ToolkitError, get_logger

LOG = get_logger("train")

# ----------------------------------------------------------------------------- errors

EXIT_BAD_INPUT = ToolkitError.exit_code  # train.py's status for every other ToolkitError
EXIT_NON_FINITE = 2  # train.py's exit status when it stopped on a NaN/inf loss


class NonFiniteLossError(ToolkitError, RuntimeError):
    """Training met a NaN/inf loss, gradient norm or weight; nothing after it was saved."""

    exit_code = EXIT_NON_FINITE


class LabelRangeError(ToolkitError, ValueError):
    """A training label lies outside [0, num_classes); the message names the data file."""


# ----------------------------------------------------------------------------- the trainer


@dataclass
class Trainer:
    """Everything one training step touches (built by train.build_trainer)."""
    backbone: nn.Module  # the bare module (state dicts are saved from it)
    model: nn.Module  # the module called in the step: DDP- and/or compile-wrapped backbone
    head: nn.Module  # arcface_loss.ShardedMarginSoftmax: this rank's centres and the loss
    opt_backbone: torch.optim.Optimizer
    opt_head: torch.optim.Optimizer
    sched_backbone: torch.optim.lr_scheduler.LambdaLR
    sched_head: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # enabled under fp16 only
    amp_dtype: torch.dtype | None  # autocast dtype of the backbone; None: float32
    channels_last: bool
    grad_clip: float
    info: DistInfo
    # what the step's gradient clipping walks, listed once (load_state_dict keeps them)
    backbone_params: list[nn.Parameter] = field(init=False, repr=False)
    head_params: list[nn.Parameter] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.backbone_params = list(self.backbone.parameters())
        self.head_params = list(self.head.parameters())

    @property
    def device(self) -> torch.device:
        return self.info.device

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum_(tensor, self.info)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


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


def check_enough_images(num_images: int, global_batch: int, source: str) -> None:
    """Refuse a set smaller than one global batch (no step could run), naming it."""
    if num_images < global_batch:
        raise DatasetError(f"{source}: {num_images} images, fewer than one global batch of "
                           f"{global_batch}; lower --batch-size")


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


# ----------------------------------------------------------------------------- data


def build_loader(dataset: torch.utils.data.Dataset, sampler: ResumableBatchSampler,
                 cfg: Config, info: DistInfo, ring: bool | None = None) -> Iterable:
    """Batches of ``sampler``'s indices: float32 Nx3xHxW normalised, or with worker
    processes uint8 NxHxWx3 (train.prepare_batch normalises them on the device), whose
    trip through shared memory costs a quarter of float32's. With workers and ``ring``
    (default: cfg.ring_loader) a ``fast_loader.RingBufferLoader`` (persistent workers
    decoding into a fixed ring of shared memory; each batch is valid until the next one is
    requested), else a DataLoader (shared memory allocated for every batch)."""
    import data_gen

    ring = cfg.ring_loader if ring is None else ring
    # The loader's own generator draws the worker base seed, so creating an iterator does
    # not advance the global RNG whose state a checkpoint records.
    generator = torch.Generator().manual_seed(cfg.seed + info.rank)
    if cfg.num_workers > 0 and ring:
        from training.fast_loader import RingBufferLoader

        batches = torch.utils.data.BatchSampler(sampler, cfg.batch_size, drop_last=True)
        return RingBufferLoader(dataset, batches, num_workers=cfg.num_workers,
                                persistent_workers=True, generator=generator)
    if cfg.num_workers > 0:
        dataset = data_gen.RawUint8View(dataset)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        pin_memory=info.device.type == "cuda", drop_last=True, generator=generator,
        persistent_workers=cfg.num_workers > 0)


# ----------------------------------------------------------------------------- fp16


def agree_on_overflow(scaler: torch.amp.GradScaler, optimizers: Sequence[torch.optim.Optimizer],
                      all_reduce_sum_: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """fp16: make every optimiser on every rank skip the step when any of them found an
    inf/NaN gradient, and back the scale off alike. GradScaler decides per optimiser from
    local gradients; with the head sharded, one rank's centres can overflow while another's
    do not, and a backbone updated on some ranks only would leave DDP's replicas apart.
    Call after ``unscale_`` on each optimiser; no host sync. Uses GradScaler's
    per-optimiser ``found_inf_per_device`` record (a private field, stable in the pinned
    torch)."""
    flags = [flag for opt in optimizers
             for flag in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()]
    if not flags:
        return
    anywhere = all_reduce_sum_(torch.stack([f.to(flags[0].device) for f in flags]).sum())
    agreed = (anywhere > 0).float()  # exactly 1.0: what the fused optimisers test for
    for flag in flags:
        flag.copy_(agreed)


# ----------------------------------------------------------------------------- monitor

CURVES_NAME = "training_curves.png"
TENSORBOARD_NAME = "tensorboard"  # the folder of TensorBoard event files in the output
FIGURE_SIZE = (15, 8)  # inches: a 2 x 3 grid of panels
# (history key, panel title, y-axis label), one panel each, in grid order
PANELS = (
    ("loss", "loss", "loss"),
    ("accuracy", "batch accuracy", "accuracy"),
    ("lr", "learning rate", "lr"),
    ("margin_m", "margin m", "m"),
    ("images_per_second", "throughput", "images / s"),
)
VERIFICATION_TITLE = "verification accuracy"
# Checkpoints closer together than this rewrite the PNG only at the end (real runs
# checkpoint minutes apart, so there every checkpoint gets its plot).
MIN_PLOT_INTERVAL_S = 60.0


class Monitor:
    """TensorBoard scalars, the tqdm bar and the images/s meter (rank 0 only), updated at
    each logged step."""

    def __init__(self, cfg: Config, info: DistInfo, start_step: int, last_step: int) -> None:
        self.enabled = info.is_main
        self.global_batch = cfg.batch_size * info.world_size
        self.writer = self.bar = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(str(Path(cfg.output) / TENSORBOARD_NAME))
            self.bar = tqdm(total=last_step, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)
        self.window_start, self.window_step = time.perf_counter(), start_step

    def log(self, step: int, values: Mapping[str, float]) -> float:
        """Write ``values`` (loss, accuracy, lr, ...) for ``step``; returns the images/s
        since the last logged step."""
        now = time.perf_counter()
        images_per_second = ((step - self.window_step) * self.global_batch
                             / max(now - self.window_start, 1e-9))
        self.window_start, self.window_step = now, step
        if self.enabled:
            for name, value in {**values, "images_per_second": images_per_second}.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['accuracy']:.3f}",
                                 img_s=f"{images_per_second:.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
        return images_per_second

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


# ----------------------------------------------------------------------------- curves PNG


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``key`` over the rows that have it."""
    kept = [r for r in rows if key in r]
    return (np.array([r["step"] for r in kept], dtype=np.float64),
            np.array([r[key] for r in kept], dtype=np.float64))


def training_curves_figure(history: Sequence[Mapping[str, Any]],
                           verification: Sequence[Mapping[str, Any]] = ()):
    """A matplotlib Figure of the curves. ``history``: one dict per logged step with
    ``step`` and any of the PANELS keys; ``verification``: one dict per check with ``step``
    and one accuracy per set name. Each panel's title names it; each curve is one line whose
    data are the steps and values given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_SIZE)
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, title, ylabel) in zip(axes, PANELS, strict=False):
        steps, values = _series(history, key)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, lw=1.2)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    ax = axes[len(PANELS)]
    names = sorted({k for row in verification for k in row if k != "step"})
    for name in names:
        steps, values = _series(verification, name)
        ax.plot(steps, values, marker="o", lw=1.2, label=name)
    if names:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no verification sets", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    ax.set_title(VERIFICATION_TITLE)
    ax.set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path,
                         verification: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write :func:`training_curves_figure` to ``path`` as a PNG (atomically)."""
    from evaluation.verification_plots import save_figure

    return save_figure(training_curves_figure(history, verification), path)


class CurvesWriter:
    """Keeps the curves PNG at ``path`` up to date without rendering too often: a render
    costs about half a second, and small runs checkpoint every few steps."""

    def __init__(self, path: str | Path, min_interval: float = MIN_PLOT_INTERVAL_S) -> None:
        self.path = Path(path)
        self.min_interval = min_interval
        self.written_sizes: tuple[int, int] | None = None
        self.written_at = -math.inf

    def update(self, history: Sequence[Mapping[str, Any]],
               verification: Sequence[Mapping[str, Any]] = (), force: bool = False) -> bool:
        """Rewrite the PNG if the logs grew since the last one and, unless ``force``, at
        least ``min_interval`` seconds have passed; returns whether it was written."""
        sizes = (len(history), len(verification))
        if not history or sizes == self.written_sizes:
            return False
        if not force and time.monotonic() - self.written_at < self.min_interval:
            return False
        plot_training_curves(history, self.path, verification)
        self.written_sizes, self.written_at = sizes, time.monotonic()
        return True


# ----------------------------------------------------------------------------- verification


def load_val_bins(cfg: Config, info: DistInfo) -> dict[str, tuple[Any, Any]]:
    """The pairs of each of cfg.val_bins, decoded once before training (rank 0 only; a bad
    file fails now rather than at the first check), keyed by set name."""
    if not (info.is_main and cfg.val_bins and cfg.verify_every > 0):
        return {}
    return {Path(path).stem: load_bin(path, progress=False) for path in cfg.val_bins}


def verify(trainer: Trainer, step: int, monitor: Monitor,
           val_sets: dict[str, tuple[Any, Any]]) -> dict[str, float]:
    """10-fold verification accuracy on each decoded set of ``val_sets`` (rank 0; the
    others wait)."""
    results: dict[str, float] = {}
    if trainer.info.is_main:
        trainer.backbone.eval()
        for name, (images, issame) in val_sets.items():
            res = evaluate_verification(trainer.backbone, images, issame,
                                        device=trainer.device, name=name, progress=False)
            results[name] = float(res["accuracy"])
            monitor.scalar(f"verification/{name}_accuracy", results[name], step)
            monitor.scalar(f"verification/{name}_accuracy_std", float(res["accuracy_std"]),
                           step)
            LOG.info("step %d: %s accuracy %.4f +- %.4f", step, name, res["accuracy"],
                     res["accuracy_std"])
        trainer.backbone.train()
    barrier(trainer.info)
    return results


# ----------------------------------------------------------------------------- fault injection

FAULT_ENV = "FACE_TRAIN_FAULT"


def inject_fault(step: int, backbone: nn.Module) -> None:
    """Test-only fault injection, called as step ``step`` (from 1) begins; a no-op unless
    the environment asks. ``FACE_TRAIN_FAULT=nan@7`` puts NaN into the backbone's weights,
    so step 7's loss is NaN; ``kill@7`` kills the process (SIGKILL, no clean-up) as step 8
    begins, i.e. once step 7 and any checkpoint due at it are done."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    kind, _, at = spec.partition("@")
    if kind not in ("nan", "kill") or not at.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected nan@STEP or kill@STEP")
    if kind == "nan" and step == int(at):
        with torch.no_grad():
            for p in backbone.parameters():
                p.fill_(math.nan)
    elif kind == "kill" and step == int(at) + 1:
        os.kill(os.getpid(), signal.SIGKILL)
