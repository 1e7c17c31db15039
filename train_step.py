"""One training step and what it touches: the ``Trainer`` (backbone, head, optimisers,
schedules, grad scaler), its construction from a Config, the forward/backward with global
gradient clipping, and the weight update that a non-finite step halts on the device.

train.py runs the loop around these; bench/train_throughput.py times them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from arcface_loss import clip_grad_norm_sharded
from config import COMPILE_MODES, Config  # noqa: F401 - COMPILE_MODES re-exported (train.py)
from distributed import DistInfo, all_reduce_sum_
from train_utils import build_optimizer, lr_factor, param_groups, step_is_finite
from utils import seed_everything

FLIP_PROBABILITY = 0.5


@dataclass
class Trainer:
    """Everything one training step touches."""
    backbone: nn.Module  # the bare module (state dicts are saved from it)
    model: nn.Module  # the module called in the step: DDP- and/or compile-wrapped backbone
    head: nn.Module
    opt_backbone: torch.optim.Optimizer
    opt_head: torch.optim.Optimizer
    sched_backbone: torch.optim.lr_scheduler.LambdaLR
    sched_head: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    grad_clip: float
    info: DistInfo
    # 1.0 on the device once a step had a non-finite loss or gradient norm: every later
    # update is skipped there, without the host having to look at the step first
    halted: torch.Tensor

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum_(tensor, self.info)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def amp_dtype_for(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 (default) or fp16 autocast on CUDA; on the CPU bf16 only when cfg.cpu_amp."""
    if device.type != "cuda":
        return torch.bfloat16 if cfg.cpu_amp else None
    # cfg.amp is one of config.AMP_MODES (checked by Config)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[cfg.amp]


def build_head(cfg: Config, num_classes: int, info: DistInfo) -> nn.Module:
    """The margin head with its softmax loss, its centres split over the ranks (all of them
    on this rank with one process)."""
    import arcface_loss

    # DDP averages the backbone gradients over ranks, while each rank already holds its
    # full share of the global-batch loss's gradient: scale by the world size to undo it.
    return arcface_loss.build_head(
        cfg.head, cfg.embedding_size, num_classes, s=cfg.scale_s, m=cfg.margin_m,
        m1=cfg.margin_m1, m3=cfg.margin_m3, easy_margin=cfg.easy_margin,
        sample_rate=cfg.sample_rate, focal_gamma=cfg.focal_gamma,
        embedding_grad_scale=float(info.world_size))


def build_trainer(cfg: Config, num_classes: int, info: DistInfo, total_steps: int,
                  steps_per_epoch: int) -> Trainer:
    """Backbone, head, optimisers, lr schedules and grad scaler on ``info.device``."""
    import models

    device = info.device
    seed_everything(cfg.seed)  # the same backbone on every rank (DDP also broadcasts it)
    backbone = models.build_model(cfg.network, cfg.embedding_size, cfg.dropout).to(device)
    channels_last = cfg.channels_last
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    seed_everything(cfg.seed + info.rank)  # distinct head shards and augmentation per rank
    head = build_head(cfg, num_classes, info).to(device)

    model: nn.Module = backbone
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True)
    if cfg.compile:  # cfg.compile_mode is one of COMPILE_MODES (checked by Config)
        model = torch.compile(model, mode=cfg.compile_mode)

    global_batch = cfg.batch_size * info.world_size
    lr = cfg.lr * global_batch / cfg.base_batch_size
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, cfg.scheduler)

    opt_b = build_optimizer(param_groups([backbone], cfg.weight_decay), cfg.optimizer, lr,
                            cfg.momentum, cfg.nesterov, fused=True)
    opt_h = build_optimizer(param_groups([head], cfg.weight_decay), cfg.optimizer, lr,
                            cfg.momentum, cfg.nesterov, fused=True)
    amp_dtype = amp_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if scaler.is_enabled():  # skipped overflow steps still advance the schedule, on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step")
    return Trainer(backbone=backbone, model=model, head=head,
                   opt_backbone=opt_b, opt_head=opt_h,
                   sched_backbone=torch.optim.lr_scheduler.LambdaLR(opt_b, factor),
                   sched_head=torch.optim.lr_scheduler.LambdaLR(opt_h, factor),
                   scaler=scaler, device=device, amp_dtype=amp_dtype,
                   channels_last=channels_last, grad_clip=cfg.grad_clip, info=info,
                   halted=torch.zeros((), device=device))


# ----------------------------------------------------------------------------- one step


def prepare_batch(images: torch.Tensor, device: torch.device, channels_last: bool
                  ) -> torch.Tensor:
    """A loader batch as float32 Nx3xHxW ``(x - 127.5) / 127.5`` on ``device``: a float
    batch is moved as it is; a uint8 NxHxWx3 one is moved first (4x fewer bytes) and
    normalised there, to the same values."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if images.dtype == torch.uint8:
        import data_gen

        images = data_gen.normalize_batch(images.to(device, non_blocking=True))
        return images.contiguous(memory_format=memory_format)
    return images.to(device, non_blocking=True, memory_format=memory_format)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image with probability FLIP_PROBABILITY. The coin flips come from the
    global torch RNG of the main process, whose state every checkpoint records."""
    # non_blocking: a blocking host-to-GPU copy would wait for the whole queue every step
    flip = (torch.rand(images.shape[0]) < FLIP_PROBABILITY).to(images.device, non_blocking=True)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def forward_backward(tr: Trainer, images: torch.Tensor, labels: torch.Tensor,
                     inject_nan: bool = False) -> torch.Tensor:
    """Forward, backward and gradient clipping; returns [loss, batch accuracy, gradient
    norm], averaged over ranks (one all-reduce; NaN anywhere reaches every rank).
    The weights are not updated yet: the caller checks these values first."""
    images = prepare_batch(images, tr.device, tr.channels_last)
    labels = labels.to(tr.device, non_blocking=True)
    images = random_flip(images)
    with tr.autocast():
        embeddings = tr.model(images)
    embeddings = embeddings.float()  # the head and the loss run in float32
    loss, accuracy = tr.head(embeddings, labels)
    if inject_nan:
        loss = loss * float("nan")
    tr.scaler.scale(loss).backward()
    tr.scaler.unscale_(tr.opt_backbone)
    tr.scaler.unscale_(tr.opt_head)
    if tr.scaler.is_enabled():
        agree_on_overflow(tr.scaler, (tr.opt_backbone, tr.opt_head), tr.reduce_sum)
    # One global norm over the backbone (equal on all ranks after DDP) and every rank's
    # shard of centres; with max_norm inf it only measures the norm.
    max_norm = tr.grad_clip if tr.grad_clip > 0 else float("inf")
    grad_norm = clip_grad_norm_sharded(list(tr.backbone.parameters()),
                                       list(tr.head.parameters()), max_norm,
                                       all_reduce_sum_=tr.reduce_sum)
    stats = torch.stack([loss.detach().float(), accuracy.detach().float(),
                         grad_norm.detach().float().to(loss.device)])
    return all_reduce_sum_(stats, tr.info) / tr.info.world_size


def agree_on_overflow(scaler: torch.amp.GradScaler, optimizers: Sequence[torch.optim.Optimizer],
                      all_reduce_sum_: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """fp16: make every optimiser on every rank skip the step when any of them found an
    inf/NaN gradient, and back the scale off alike. GradScaler decides per optimiser from
    local gradients; with the head sharded, one rank's centres can overflow while another's
    do not, and a backbone updated on some ranks only would leave DDP's replicas apart.
    Call after ``unscale_`` on each optimiser; no host sync.

    Uses GradScaler's per-optimiser ``found_inf_per_device`` record (a private field, stable
    in the pinned torch)."""
    records = [scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
               for opt in optimizers]
    flags = [flag for record in records for flag in record.values()]
    if not flags:
        return
    anywhere = all_reduce_sum_(torch.stack([f.to(flags[0].device) for f in flags]).sum())
    agreed = (anywhere > 0).float()  # exactly 1.0: what the fused optimisers test for
    for flag in flags:
        flag.copy_(agreed)


def optimizer_step(tr: Trainer, stats: torch.Tensor) -> None:
    """Update the weights and the lr schedules. A step whose ``stats`` (forward_backward's)
    fail step_is_finite halts all updates from then on, decided on the device (the fused
    optimisers' ``found_inf``), so no update ever waits for the host to read the loss.
    Under fp16 the grad scaler does this itself (and skips inf steps)."""
    if not tr.scaler.is_enabled():
        finite = step_is_finite(stats)
        torch.maximum(tr.halted, (~finite).to(tr.halted.dtype), out=tr.halted)
    for opt in (tr.opt_backbone, tr.opt_head):
        if tr.scaler.is_enabled():
            tr.scaler.step(opt)
        else:
            opt.found_inf = tr.halted  # read by fused SGD/AdamW: skip the update when 1
            opt.step()
            del opt.found_inf
    tr.scaler.update()
    tr.opt_backbone.zero_grad(set_to_none=True)
    tr.opt_head.zero_grad(set_to_none=True)
    tr.sched_backbone.step()
    tr.sched_head.step()


def defer_loss_check(tr: Trainer) -> bool:
    """Read each step's loss one step late (CUDA, no fp16 scaler): the host then queues step
    t+1 before waiting for step t, so the GPU never idles between steps. Safe because a
    non-finite step halts the updates on the device (see optimizer_step)."""
    return tr.device.type == "cuda" and not tr.scaler.is_enabled()
