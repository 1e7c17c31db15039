"""Train a face model on an IR-ResNet backbone with a margin head: ArcFace by default, or
CosFace, the combined margin, AdaFace, CurricularFace, MagFace, ElasticFace (``--head``;
``--preset ms1mv2_r100_adaface`` and the like train each as its paper does).

One device::

    python train.py --rec data/faces_emore/train.rec --output runs/ms1mv2_ir50
    python train.py --preset demo                      # the CPU demo of `make demo`

Many devices, one process each (NCCL on CUDA, gloo on the CPU); several nodes through
torchrun's own flags (``--nnodes 2 --node_rank 0 --rdzv_endpoint host:29500``)::

    torchrun --nproc_per_node=8 train.py --preset ms1mv2_ir50

With more than one process the backbone is wrapped in DistributedDataParallel and the class
centres are sharded across ranks (``cfg.sample_rate < 1`` samples negatives: Partial FC). The
lr is ``cfg.lr * global_batch / cfg.base_batch_size`` (``cfg.lr`` itself with ``scale_lr`` off).
``--gradient-acc k``: each optimiser step is k micro-batches of ``batch_size`` per device
(global batch batch_size x devices x k); every count (schedule, warm-up, margin ramp, logging,
checkpoints, epochs) is in optimiser steps, and checkpoints fall between them only.

This file reads top to bottom: the knobs (lr schedule, margin ramp, optimiser and its
parameter groups), the model (``build_trainer``), one step (``train_step``, which
bench/train_throughput.py times as it is), then ``train``: ``set_up``, then the loop in
``_train``. What a run writes into ``cfg.output`` (config.json, backbone.pt, checkpoint.pt,
checkpoint.prev.pt, one head file per rank, tensorboard/, training_curves.png) and how it
resumes is in training/train_checkpoints.py; the ``Trainer`` and fp16 overflow agreement in
training/trainer.py; TensorBoard, curves and verification in training/monitor.py; the
sampler and the loader in data_gen.py.

Nothing is written before the whole setup is checked (config values, the output folder,
the data set, the checkpoint to resume): a refused run leaves ``cfg.output`` as it was. An
output folder holding a run is refused unless ``--resume`` continues it or ``--overwrite``
replaces it. ``--resume`` continues from ``checkpoint.pt`` exactly, mid-epoch too (the data
order is a function of seed and epoch); with another world size and the same global batch
the head's shards are re-cut (no longer bit-exact). What else may change on resume is decided
field by field (train_checkpoints.RESUME_MAY_CHANGE and RESUME_REFUSED). A checkpoint that
cannot be written (disk full) stops training with one line naming the file.

The loss is read back every ``log_every`` steps and before each verification and checkpoint,
as nanoGPT does; in between, the first step with a non-finite loss or gradient norm is noted
on the device. Such a step stops training at the next read (exit status 2), naming it and the
last good checkpoint, which is never overwritten: checkpoints are saved only after the check.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

import data_gen
import models
from arcface_loss import (
    CombinedMargin,
    MagFaceMargin,
    Margin,
    build_head,
    clip_grad_norm_sharded,
)
from config import Config, ConfigError, build_parser, head_options, parse_config
from data_gen import FLIP_PROBABILITY
from training.arcface_torch_checkpoint import holds_arcface_torch_run, resume_arcface_torch
from training.distributed import (
    DistInfo,
    all_reduce_min_,
    all_reduce_sum_,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from training.monitor import CurvesWriter, Monitor, load_val_bins, verify
from training.train_checkpoints import (
    BACKBONE_NAME,
    CURVES_NAME,
    TENSORBOARD_NAME,
    ResumeError,
    SavedSteps,
    check_output_folder,
    claim_run_folder,
    identity_list,
    load_init_weights,
    prepare_output,
    resume_training,
    save_training_checkpoint,
)
from training.trainer import NonFiniteLossError, Trainer, agree_on_overflow, inject_fault
from utils import CONFIG_FILE, get_logger, reuse_freed_memory, run_cli, seed_everything

LOG = get_logger("train")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}  # on CUDA


# ------------------------------------------------ the knobs: lr schedule, margin ramp, optimiser

POLY_POWER = 2  # arcface_torch's former PolyScheduler (its train_v2 decays linearly)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the base lr for 0-based ``step``: linear warm-up to 1 over
    ``warmup_steps``, then ``poly`` ((1 - progress)^2, as arcface_torch's former
    PolyScheduler) or ``cosine``; ``linear`` is its current PolynomialLRWarmup with power 1
    (linear_factor)."""
    if kind == "linear":
        return linear_factor(step, total_steps, warmup_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "poly":
        return (1.0 - progress) ** POLY_POWER
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler {kind!r}; choose poly, cosine or linear")


def linear_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """arcface_torch's PolynomialLRWarmup (power 1) at its ``last_epoch`` = ``step``, the
    0-based optimiser step: step / warmup_steps up to warmup_steps, then falling linearly
    to 0 at total_steps, 0 after. Step 0 runs at the full lr, as there: its get_lr leaves
    the optimiser's lr unchanged at last_epoch 0."""
    if step == 0:
        return 1.0
    if step <= warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return max(0.0, 1.0 - (step - warmup_steps) / span)


def margin_at(step: int, total_steps: int, margin: float, warmup_fraction: float) -> float:
    """The margin m ramped linearly from 0 over the first ``warmup_fraction`` of the steps."""
    ramp = warmup_fraction * total_steps
    if ramp <= 0:
        return margin
    return margin * min(1.0, step / ramp)


def set_ramped_margin(margin: Margin, value: float, full: float | None = None) -> None:
    """The margin the ramp drives: ArcFace's, CosFace's, AdaFace's, CurricularFace's and
    ElasticFace's (mean) ``m``, the combined margin's angular ``m2``, and MagFace's whole
    m(a) scaled by ``value / full`` (its margin is a function of the norm, not margin_m);
    the head reads it at its next forward pass."""
    if isinstance(margin, CombinedMargin):
        margin.m2 = value
    elif isinstance(margin, MagFaceMargin):
        margin.ramp = value / full if full else 1.0
    else:
        margin.m = value


def param_groups(modules: Sequence[nn.Module], weight_decay: float, decay_all: bool = False
                 ) -> list[dict[str, Any]]:
    """Two groups: weight decay for weights, none for BatchNorm scales/shifts and biases;
    ``decay_all``: one group, every parameter decayed (as arcface_torch does)."""
    if decay_all:
        params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}
                      .values())
        return [{"params": params, "weight_decay": weight_decay}]
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


# ----------------------------------------------------------------------------- data and model


def build_dataset(cfg: Config) -> tuple[torch.utils.data.Dataset, str]:
    """The training set (RecordIO, or an image folder when cfg.image_folder is set) and the
    file or folder it came from. An unusable set raises a ToolkitError naming the file."""
    # train=False: no flip in the loader; the step flips on the device from the checkpointed
    # RNG instead (random_flip), so augmentation resumes exactly
    dataset = data_gen.build_dataset(cfg.rec, cfg.image_folder, train=False,
                                     allow_lost_records=cfg.allow_lost_records)
    return dataset, cfg.image_folder or cfg.rec


def build_trainer(cfg: Config, num_classes: int, info: DistInfo, total_steps: int,
                  steps_per_epoch: int) -> Trainer:
    """Backbone, margin head, optimisers, lr schedules and grad scaler on ``info.device``."""
    device = info.device
    seed_everything(cfg.seed)  # the same backbone on every rank (DDP also broadcasts it)
    backbone = models.build_model(cfg.network, cfg.embedding_size, cfg.dropout).to(device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    seed_everything(cfg.seed + info.rank)  # distinct head shards and augmentation per rank
    # This rank's share of the class centres (all of them alone). DDP averages the backbone
    # gradients over ranks while each rank already holds its full share of the global-batch
    # loss's gradient: embedding_grad_scale undoes the average.
    head = build_head(cfg.head, cfg.embedding_size, num_classes, s=cfg.scale_s, m=cfg.margin_m,
                      m1=cfg.margin_m1, m3=cfg.margin_m3, easy_margin=cfg.easy_margin,
                      sample_rate=cfg.sample_rate, focal_gamma=cfg.focal_gamma,
                      embedding_grad_scale=float(info.world_size),
                      **head_options(cfg)).to(device)
    model: nn.Module = backbone
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True)
    if cfg.compile:
        model = torch.compile(model, mode=cfg.compile_mode)

    lr = cfg.lr * cfg.global_batch(info.world_size) / cfg.base_batch_size if cfg.scale_lr \
        else cfg.lr  # arcface_torch applies its lr as given
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, cfg.scheduler)

    backbone_optimizer, head_optimizer = (
        build_optimizer(param_groups([module], cfg.weight_decay, cfg.decay_all), cfg.optimizer, lr,
                        cfg.momentum, cfg.nesterov, fused=True) for module in (backbone, head))
    # bf16 (default) or fp16 autocast on CUDA; on the CPU bf16 only when cfg.cpu_amp
    amp_dtype = AMP_DTYPES[cfg.amp] if device.type == "cuda" else \
        (torch.bfloat16 if cfg.cpu_amp else None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if scaler.is_enabled():  # skipped overflow steps still advance the schedule, on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step")
    return Trainer(backbone=backbone, model=model, head=head, opt_backbone=backbone_optimizer,
                   opt_head=head_optimizer,
                   sched_backbone=torch.optim.lr_scheduler.LambdaLR(backbone_optimizer, factor),
                   sched_head=torch.optim.lr_scheduler.LambdaLR(head_optimizer, factor),
                   scaler=scaler, amp_dtype=amp_dtype, channels_last=cfg.channels_last,
                   grad_clip=cfg.grad_clip, info=info, clip_head=cfg.clip_head)


# ----------------------------------------------------------------------------- one step


def prepare_batch(images: torch.Tensor, device: torch.device, channels_last: bool
                  ) -> torch.Tensor:
    """A loader batch as float32 Nx3xHxW ``(x - 127.5) / 127.5`` on ``device``: a float
    batch is moved as it is; a uint8 NxHxWx3 one (from worker processes) is moved first
    (4x fewer bytes) and normalised there, to the same values."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if images.dtype == torch.uint8:
        images = models.normalize_batch(images.to(device, non_blocking=True))
        return images.contiguous(memory_format=memory_format)
    return images.to(device, non_blocking=True, memory_format=memory_format)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image with probability FLIP_PROBABILITY. The coin flips come from the
    global torch RNG of the main process, whose state every checkpoint records, so
    augmentation resumes exactly whatever the number of loader workers."""
    # non_blocking: a blocking host-to-GPU copy would wait for the whole queue every step
    flip = (torch.rand(images.shape[0]) < FLIP_PROBABILITY).to(images.device, non_blocking=True)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


class Step(NamedTuple):
    """One step's values, left on the device (reading them makes the host wait)."""
    loss: torch.Tensor
    accuracy: torch.Tensor | None  # own centre nearest of all; None unless asked for
    grad_norm: torch.Tensor  # global, before clipping
    finite: torch.Tensor  # bool: a finite loss and (but under fp16) gradient norm


def train_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor,
               accuracy: bool = False, micro_batches: int = 1) -> Step:
    """One optimiser step: the batch to the device, a random flip; then for each of its
    ``micro_batches`` k (cfg.gradient_acc; equal slices of the batch) the backbone, the
    margin head and its loss / k, backward, the gradients summing in .grad (DDP all-reduces
    them with the last one's); then global gradient clipping, both optimisers, the
    schedules. k micro-batches of B give the step of one batch of kB, but for what sees B
    rows at a time: BatchNorm's statistics, the batch margins' (AdaFace, CurricularFace,
    ElasticFace) and Partial FC's sampled centres (a sample per micro-batch, its positives
    always in: as arcface_torch's PartialFC_V2 accumulates). Reports the micro-batches' mean
    loss and accuracy."""
    if images.shape[0] % micro_batches:  # chunk() would give fewer slices, each loss / k
        raise ValueError(f"a batch of {images.shape[0]} images does not split into "
                         f"{micro_batches} equal micro-batches")
    images = random_flip(prepare_batch(images, trainer.device, trainer.channels_last))
    labels = labels.to(trainer.device, non_blocking=True)
    losses, accuracies = [], []
    for i, (part, part_labels) in enumerate(zip(images.chunk(micro_batches),
                                                labels.chunk(micro_batches), strict=True)):
        with trainer.grad_sync(i == micro_batches - 1):
            with trainer.autocast():
                embeddings = trainer.model(part)
            # at least float32 (bf16 under autocast), so the head gathers and reduces in it
            embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            loss, part_accuracy = trainer.head(embeddings, part_labels, accuracy=accuracy)
            # the scaler acts under fp16 only
            trainer.scaler.scale(loss / micro_batches).backward()
        losses.append(loss.detach())
        accuracies.append(part_accuracy)
    loss = torch.stack(losses).mean()
    batch_accuracy = torch.stack(accuracies).mean() if accuracy else None
    optimizers = (trainer.opt_backbone, trainer.opt_head)
    for opt in optimizers:
        trainer.scaler.unscale_(opt)
    if trainer.scaler.is_enabled():
        agree_on_overflow(trainer.scaler, optimizers, trainer.reduce_sum)
    # One global norm over the backbone (equal on all ranks after DDP) and every rank's
    # shard of centres, reported whatever is clipped; with max_norm inf it only measures
    # it. clip_head False bounds the backbone's own norm only, as arcface_torch does.
    grad_norm = clip_grad_norm_sharded(trainer.backbone_params, trainer.head_params,
                                       trainer.grad_clip if trainer.grad_clip > 0 else math.inf,
                                       all_reduce_sum_=trainer.reduce_sum,
                                       clip_sharded=trainer.clip_head)
    for opt in optimizers:
        trainer.scaler.step(opt)  # under fp16 skipped, on every rank, when a gradient overflowed
    trainer.scaler.update()
    for opt, sched in zip(optimizers, (trainer.sched_backbone, trainer.sched_head), strict=True):
        opt.zero_grad(set_to_none=True)
        sched.step()
    finite = torch.isfinite(loss)
    if not trainer.scaler.is_enabled():  # fp16 overflows make inf norms that the scaler skips
        finite = finite & torch.isfinite(grad_norm)
    return Step(loss, batch_accuracy, grad_norm, finite)


def read_step(result: Step, first_bad: torch.Tensor, info: DistInfo
              ) -> tuple[dict[str, float], float]:
    """A step's loss, accuracy and gradient norm averaged over ranks, and the first
    non-finite step on any rank (inf: none). The host waits for the device here only."""
    accuracy = result.accuracy if result.accuracy is not None else \
        torch.full_like(result.loss, math.nan)
    stats = torch.stack([result.loss.float(), accuracy.float(),
                         result.grad_norm.float().to(result.loss.device)])
    stats = all_reduce_sum_(stats, info) / info.world_size
    first = all_reduce_min_(first_bad.clone(), info).item()
    return dict(zip(("loss", "accuracy", "grad_norm"), stats.tolist(), strict=True)), first


# ----------------------------------------------------------------------------- training


def train(cfg: Config, resume: bool = False, init_checkpoint: str | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Train as ``cfg`` says (one process, or one rank of a torchrun job); returns a
    summary: steps, final loss and accuracy, checkpoint paths, seconds, images/s and the
    logged history. ``resume``: continue the run in cfg.output; ``overwrite``: replace the
    run there; ``init_checkpoint``: start a new run from these backbone weights."""
    if resume and (overwrite or init_checkpoint):
        raise ResumeError("--resume continues the run in --output with its own weights; it "
                          "cannot be combined with --overwrite or --init-checkpoint")
    info = init_distributed(cfg.device)
    try:
        # refused before anything is written: a run still training, a file, another run
        with claim_run_folder(cfg, info, init_checkpoint):
            check_output_folder(Path(cfg.output), resume, overwrite)
            summary = _train(cfg, info, resume, init_checkpoint, overwrite)
        # no rank tears its process group down while another still uses it (a gloo rank
        # that did so aborted at exit now and then on a loaded machine)
        barrier(info)
        return summary
    finally:
        cleanup_distributed()


class Run(NamedTuple):
    """What the set-up hands the loop."""
    trainer: Trainer
    dataset: torch.utils.data.Dataset
    sampler: data_gen.ResumableBatchSampler
    num_classes: int
    identities: dict[str, str | None]
    total_steps: int
    last_step: int  # total_steps, or cfg.max_steps when that stops earlier
    step: int  # steps already done: 0, or those of the run resumed
    saved: SavedSteps
    # the logged values (returned in the summary, saved with each checkpoint, plotted):
    # one dict per logged step, and one per verification check
    logs: dict[str, list[dict[str, float]]]
    val_sets: dict[str, tuple[Any, Any]]


def check_stated_size(cfg: Config, num_classes: int, num_images: int, source: str) -> None:
    """The training set holds the identities and images the config says (an arcface_torch
    config's num_classes and num_image), where it says: another set is refused, not run."""
    for name, stated, found in (("num_classes", cfg.num_classes, num_classes),
                                ("num_image", cfg.num_image, num_images)):
        if stated and stated != found:
            raise ConfigError(f"{name}: the config says {stated}, {source} holds {found}", name)


def check_micro_batch(cfg: Config, backbone: nn.Module) -> None:
    """A micro-batch of one image cannot train a backbone with BatchNorm (every network
    here has one): its first step would fail inside torch, after the output was written."""
    if cfg.batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                   for m in backbone.modules()):
        raise ConfigError(f"batch_size: 1 image per device and micro-batch cannot train "
                          f"{cfg.network}, whose BatchNorm layers need at least 2 in "
                          "training mode", "batch_size")


def set_up(cfg: Config, info: DistInfo, resume: bool, init_checkpoint: str | None,
           overwrite: bool) -> Run:
    """Check the data, build the trainer, resume or load initial weights, decode the
    verification sets; then (rank 0) clear and prepare the output folder. Everything is
    checked before anything is written (the output folder in train()): a refused run leaves
    the output folder as it was."""
    if info.is_main:
        LOG.info("config (world size %d, device %s):\n%s", info.world_size, info.device,
                 cfg.pretty())
    if cfg.keep_freed_memory and not reuse_freed_memory():  # process-wide, see config.py
        LOG.warning("keep_freed_memory: not applied (needs Linux with glibc's mallopt)")
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dataset, source = build_dataset(cfg)
    # the sampler's batches are optimiser steps: gradient_acc micro-batches, split in the step
    step_batch = cfg.batch_size * cfg.gradient_acc
    data_gen.check_enough_images(len(dataset), step_batch * info.world_size, source)
    num_classes = int(dataset.num_classes)
    data_gen.check_labels(dataset.labels, num_classes, source)
    check_stated_size(cfg, num_classes, len(dataset), source)
    identities = identity_list(getattr(dataset, "classes", None), dataset.labels, num_classes)
    sampler = data_gen.ResumableBatchSampler(len(dataset), step_batch, info.world_size,
                                             info.rank, seed=cfg.seed)
    total_steps = cfg.epochs * sampler.batches_per_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    trainer = build_trainer(cfg, num_classes, info, total_steps, sampler.batches_per_epoch)
    check_micro_batch(cfg, trainer.backbone)
    step, saved = 0, SavedSteps()
    logs: dict[str, list[dict[str, float]]] = {"history": [], "verification": []}
    if resume and holds_arcface_torch_run(Path(cfg.output)):
        step, _, saved = resume_arcface_torch(trainer, cfg, num_classes, total_steps,
                                              sampler.batches_per_epoch)
    elif resume:
        step, saved_logs, saved = resume_training(trainer, cfg, num_classes, len(dataset),
                                                  identities)
        logs.update(saved_logs)
    elif init_checkpoint:
        load_init_weights(trainer, init_checkpoint, cfg.network)
    val_sets = load_val_bins(cfg, info)
    barrier(info)  # every rank has checked the folder before rank 0 changes it
    if info.is_main:
        prepare_output(Path(cfg.output), cfg, overwrite)
        LOG.info("%s: %d images of %d identities; %d steps per epoch of %d images, %d steps"
                 " in all%s", source, len(dataset), num_classes, sampler.batches_per_epoch,
                 sampler.global_batch, total_steps,
                 f", resuming after step {step}" if step else "")
    barrier(info)  # no rank writes before rank 0 has cleared the folder
    return Run(trainer, dataset, sampler, num_classes, identities, total_steps, last_step,
               step, saved, logs, val_sets)


def training_loader(dataset: torch.utils.data.Dataset, sampler: data_gen.ResumableBatchSampler,
                    cfg: Config, info: DistInfo) -> Iterable:
    """``data_gen.build_loader`` as ``cfg`` asks: with worker processes uint8 batches
    (prepare_batch normalises them on the device), whose trip through shared memory costs a
    quarter of float32's, through fast_loader's ring when cfg.ring_loader; the loader's
    generator seeded per rank; one batch per optimiser step (its gradient_acc micro-batches)."""
    return data_gen.build_loader(dataset, sampler.batch_size, cfg.num_workers,
                                 seed=cfg.seed + info.rank, sampler=sampler,
                                 raw_uint8=cfg.num_workers > 0, ring=cfg.ring_loader,
                                 pin_memory=info.device.type == "cuda")


def _train(cfg: Config, info: DistInfo, resume: bool, init_checkpoint: str | None,
           overwrite: bool) -> dict[str, Any]:
    """Set up, then the loop: every step the margin ramp, the step (whose schedulers set the
    next lr), and what is due (log, verify, checkpoint; the loss is read back only then)."""
    t_start = time.perf_counter()
    run = set_up(cfg, info, resume, init_checkpoint, overwrite)
    trainer, sampler, logs, saved, step = run.trainer, run.sampler, run.logs, run.saved, run.step
    output, steps_per_epoch, last_step = Path(cfg.output), sampler.batches_per_epoch, run.last_step
    loader = training_loader(run.dataset, sampler, cfg, info)
    monitor = Monitor(cfg, info, step, last_step, output / TENSORBOARD_NAME)
    curves = CurvesWriter(output / CURVES_NAME) if info.is_main else None
    values = {"loss": math.nan, "accuracy": math.nan, "grad_norm": math.nan}
    verification: dict[str, float] = {}
    first_step, steps_run = step + 1, 0
    # the first step whose loss or gradient norm was not finite (inf: none yet), kept on the
    # device so that no step waits for the host; read with the loss
    first_bad = torch.full((), math.inf, dtype=torch.float64, device=info.device)
    t_loop = time.perf_counter()
    try:
        epoch, start_batch = divmod(step, steps_per_epoch)
        while step < last_step:
            sampler.set_epoch(epoch, start_batch)
            for images, labels in loader:
                margin = margin_at(step, run.total_steps, cfg.margin_m, cfg.margin_warmup)
                set_ramped_margin(trainer.head.margin, margin, cfg.margin_m)
                lr = trainer.opt_backbone.param_groups[0]["lr"]
                step += 1
                log_now, verify_now, save_now = due_at(step, cfg, steps_per_epoch,
                                                       first_step, last_step)
                read_now = log_now or verify_now or save_now
                inject_fault(step, trainer.backbone)  # test-only: FACE_TRAIN_FAULT=nan@K, kill@K

                result = train_step(trainer, images, labels, accuracy=read_now,
                                    micro_batches=cfg.gradient_acc)
                first_bad = torch.where(result.finite, first_bad, first_bad.clamp(max=step))
                steps_run += 1

                if read_now:  # the only place the host waits for the device
                    values, bad = read_step(result, first_bad, info)
                    if math.isfinite(bad):
                        raise non_finite_error(int(bad), step, steps_per_epoch, values,
                                               saved.describe_last(output))
                if log_now:
                    scalars = {**values, "lr": lr, "margin_m": margin}
                    logs["history"].append({"step": step, **scalars,
                                            "images_per_second": monitor.log(step, scalars)})
                # verification before the checkpoint, so its result is saved with it
                if verify_now:
                    verification = verify(trainer, step, monitor, run.val_sets)
                    if verification:  # rank 0
                        logs["verification"].append({"step": step, **verification})
                if save_now:
                    save_training_checkpoint(trainer, cfg, step, step // steps_per_epoch,
                                             run.num_classes, len(run.dataset), saved, logs,
                                             run.identities)
                    if curves:
                        curves.update(logs["history"], logs["verification"])
                if step >= last_step:
                    break
            epoch, start_batch = epoch + 1, 0
    finally:
        monitor.close()
        if hasattr(loader, "close"):  # a RingBufferLoader's workers stop now, not at exit
            loader.close()
        if curves:  # also after a failure: the curves up to it
            curves.update(logs["history"], logs["verification"], force=True)
    loop_seconds = time.perf_counter() - t_loop
    return summarize(run, cfg, step, steps_run, values, verification,
                     time.perf_counter() - t_start, loop_seconds)


def due_at(step: int, cfg: Config, steps_per_epoch: int, first_step: int, last_step: int
           ) -> tuple[bool, bool, bool]:
    """Whether step ``step`` (from 1) logs, verifies and saves a checkpoint. log_every 0:
    only the first and the last step; save_every 0: checkpoints only at epoch ends and the
    end."""
    log_now = (cfg.log_every > 0 and step % cfg.log_every == 0) \
        or step in (first_step, last_step)
    verify_now = bool(cfg.val_bins) and cfg.verify_every > 0 and (
        step % cfg.verify_every == 0 or step == last_step)
    save_now = (cfg.save_every > 0 and step % cfg.save_every == 0) \
        or step % steps_per_epoch == 0 or step == last_step
    return log_now, verify_now, save_now


def non_finite_error(bad: int, step: int, steps_per_epoch: int, values: dict[str, float],
                     last_checkpoint: str) -> NonFiniteLossError:
    """The error that stops a run whose step ``bad`` had a non-finite loss or gradient
    norm, read back at step ``step``."""
    return NonFiniteLossError(
        f"non-finite training loss or gradient norm at step {bad}, epoch "
        f"{(bad - 1) // steps_per_epoch + 1}; stopped at step {step} (loss {values['loss']}, "
        f"gradient norm {values['grad_norm']}) without saving; {last_checkpoint}")


def summarize(run: Run, cfg: Config, step: int, steps_run: int, values: dict[str, float],
              verification: dict[str, float], seconds: float, loop_seconds: float
              ) -> dict[str, Any]:
    """train()'s summary of a finished run, logged by rank 0."""
    output, info = Path(cfg.output), run.trainer.info
    last_ckpt = run.saved.last_complete(output)
    summary = {
        "steps": step, "steps_run": steps_run, "epochs": step / run.sampler.batches_per_epoch,
        "final_loss": values["loss"], "final_accuracy": values["accuracy"],
        "checkpoint": str(last_ckpt[0]) if last_ckpt else None,
        "backbone": str(output / BACKBONE_NAME), "config": str(output / CONFIG_FILE),
        "seconds": seconds,
        "images_per_second": steps_run * run.sampler.global_batch / max(loop_seconds, 1e-9),
        "verification": verification, "world_size": info.world_size,
        "history": run.logs["history"], "verification_history": run.logs["verification"],
    }
    if info.is_main:
        LOG.info("done: %d steps (%.2f epochs) in %.1f s, %.1f images/s; final loss %.4f, "
                 "batch accuracy %.3f\n  checkpoint: %s\n  backbone:   %s\n  config:     %s"
                 "\n  tensorboard: %s\n  curves:     %s", step, summary["epochs"],
                 summary["seconds"], summary["images_per_second"], summary["final_loss"],
                 summary["final_accuracy"], summary["checkpoint"], summary["backbone"],
                 summary["config"], output / TENSORBOARD_NAME, output / CURVES_NAME)
    return summary


# ----------------------------------------------------------------------------- CLI


def build_arg_parser():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true",
                        help="continue exactly from <output>/checkpoint.pt (or, when that is "
                             "damaged, checkpoint.prev.pt); or continue the run arcface_torch "
                             "saved there (its checkpoint_gpu_<rank>.pt files)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --output that holds a run, deleting its "
                             "checkpoints, config, curves and TensorBoard logs")
    parser.add_argument("--init-checkpoint", default=None,
                        help="start from these backbone weights (backbone.pt or a checkpoint)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; errors reach run_cli, which prints them as one line (exit status
    2 for a non-finite loss, else 1)."""
    cfg, args = parse_config(argv, parser=build_arg_parser())
    train(cfg, resume=args.resume, init_checkpoint=args.init_checkpoint,
          overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
