"""Process-group plumbing for `torchrun` training: init from its environment, helpers.

One process per device. `torchrun --nproc_per_node=N train.py ...` sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python train.py` sets none of them and
runs as world 1 without a process group. Multi-node is torchrun's business too
(`--nnodes`, `--node_rank`, `--rdzv_endpoint`); nothing here changes for it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils import DeviceError, get_device

# A slow verification pass on rank 0 must not trip the collective timeout of the others.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU), or run
    alone when its variables are absent. Each process takes the device of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = get_device(device_name)  # DeviceError: an unknown name, no CUDA, no such GPU
    if device.type == "cuda":
        index = local_rank if device.index is None or world > 1 else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device_name}: LOCAL_RANK {local_rank} has no GPU "
                              f"(this machine has {torch.cuda.device_count()})")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                world_size=world, timeout=PROCESS_GROUP_TIMEOUT, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum over ranks (a no-op alone); NaN or inf on any rank reaches every rank."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min_(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place minimum over ranks (a no-op alone)."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_ranks_true(flag: bool, info: DistInfo) -> bool:
    """True only when ``flag`` holds on every rank."""
    if not info.distributed:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() == 0.0)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous class range [start, end) held by ``rank``: C // world classes each, the
    first C % world ranks one more (arcface_loss's sharded head; its Partial FC cuts alike)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
