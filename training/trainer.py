"""What one training step touches and how a run stops: the ``Trainer`` (model, head,
optimisers, schedules, grad scaler), the RNG state a checkpoint records, fp16 overflow
agreement across ranks, the errors and exit statuses of train.py, and the test-only fault
injection. Used by train.py and training/train_checkpoints.py."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from training.distributed import DistInfo, all_reduce_sum_
from utils import ToolkitError

# ----------------------------------------------------------------------------- errors

EXIT_BAD_INPUT = ToolkitError.exit_code  # train.py's status for every other ToolkitError
EXIT_NON_FINITE = 2  # train.py's exit status when it stopped on a NaN/inf loss


class NonFiniteLossError(ToolkitError, RuntimeError):
    """Training met a NaN/inf loss, gradient norm or weight; nothing after it was saved."""

    exit_code = EXIT_NON_FINITE


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
    clip_head: bool = True  # False: grad_clip bounds the backbone's gradient only
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

    def grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Where a micro-batch's forward and backward run: with ``sync`` False under DDP
        its ``no_sync`` (the gradient stays in this rank's .grad, to be all-reduced with
        the last micro-batch's, which syncs); a no-op otherwise."""
        ddp = getattr(self.model, "_orig_mod", self.model)  # under torch.compile
        if sync or not isinstance(ddp, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return ddp.no_sync()


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
