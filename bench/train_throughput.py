"""Images/s of a whole training step next to the bare backbone forward+backward.

The step is train.py's own ``train_step``: the batch to the device, flip, backbone forward
and backward, the ArcFace head over ``--num-classes`` centres (MS1MV2 has 85,742), gradient
clipping and SGD on backbone and head; as in train.py nothing waits for the loss between
steps (train.py reads it every log_every steps; here at the end of each timed round). The
bare measurement is the same backbone, same precision and memory format, forward plus
backward from a fixed gradient, no head and no optimiser. Inputs are random tensors already
in memory, so data loading is not measured. The two are timed in alternating rounds
(medians), so a change in machine load hits both alike.

On the CPU the head's large gradients are page-faulted in afresh every step unless malloc
keeps freed memory: ``--keep-freed-memory`` applies it (train.py: the keep_freed_memory
config field); the header says which setting ran.

    python bench/train_throughput.py                     # CPU: ir18, ir50 at batch 32
    python bench/train_throughput.py --device cuda       # ir50, ir100 at 128, bf16, NHWC
    python bench/train_throughput.py --device cuda --compile
    python bench/train_throughput.py --device cuda --compile --compile-mode max-autotune

Model FLOP utilisation = forward FLOPs per image x 3 (forward + backward) x images/s / peak;
the peak is ``--peak-tflops`` (989 = H100 SXM bf16 dense); printed on CUDA or with a peak given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models  # noqa: E402
import train  # noqa: E402
from config import COMPILE_MODES, make_config  # noqa: E402
from training.distributed import DistInfo  # noqa: E402
from utils import (  # noqa: E402
    device_name,
    get_device,
    int_at_least,
    positive_float,
    positive_int,
    reuse_freed_memory,
)

MS1MV2_CLASSES = 85742
H100_BF16_DENSE_TFLOPS = 989.0
BACKWARD_FLOPS_FACTOR = 3  # forward + backward is about 3x the forward's FLOPs
DEFAULTS = {  # per device type: networks, batch, timed iterations per round, warm-up
    "cpu": (("ir18", "ir50"), 32, 1, 1),
    "cuda": (("ir50", "ir100"), 128, 20, 5),
}
# Alternating bare/step rounds; the median of 5 keeps one disturbed CPU round (another
# process, a page-cache flush) from moving the ratio by several points as 3 rounds did.
ROUNDS = 5
COMPILE_WARMUP = 3  # extra untimed steps while torch.compile builds its graphs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def measure(network: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    amp = args.amp if args.amp else ("bf16" if device.type == "cuda" else "none")
    cfg = make_config({"network": network, "batch_size": args.batch_size,
                       "device": str(device), "amp": "none" if amp == "none" else amp,
                       "cpu_amp": device.type == "cpu" and amp == "bf16",
                       "channels_last": args.channels_last, "compile": args.compile,
                       "compile_mode": args.compile_mode})
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    trainer = train.build_trainer(cfg, args.num_classes, info, total_steps=10**6,
                             steps_per_epoch=10**4)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = torch.randn(args.batch_size, 3, models.IMAGE_SIZE, models.IMAGE_SIZE,
                         device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    grad = torch.randn(args.batch_size, cfg.embedding_size, device=device)

    def bare() -> None:
        with trainer.autocast():
            emb = trainer.model(images)
        emb.float().backward(grad)
        trainer.opt_backbone.zero_grad(set_to_none=True)

    def step() -> None:  # as train.py's loop between two reads of the loss
        train.train_step(trainer, images, labels)

    warmup = args.warmup + (COMPILE_WARMUP if args.compile else 0)
    for fn in (bare, step):
        for _ in range(warmup):
            fn()
    bare_s, step_s = [], []
    for _ in range(args.rounds):
        bare_s.append(_time(bare, args.iters, device))
        step_s.append(_time(step, args.iters, device))
    flops = models.model_flops(trainer.backbone)
    return {"bare": args.batch_size / statistics.median(bare_s),
            "step": args.batch_size / statistics.median(step_s),
            "gflops": flops / 1e9, "precision": amp}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--networks", nargs="+", default=None,
                   help="default: ir18 ir50 on the CPU, ir50 ir100 on CUDA")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="default: 32 CPU, 128 CUDA")
    p.add_argument("--iters", type=positive_int, default=None, help="timed steps per round")
    p.add_argument("--warmup", type=int_at_least(0), default=None, help="untimed steps first")
    p.add_argument("--rounds", type=positive_int, default=ROUNDS,
                   help="alternating bare/step rounds")
    p.add_argument("--num-classes", type=int_at_least(2), default=MS1MV2_CLASSES)
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None,
                   help="default: bf16 on CUDA, none (float32) on the CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--peak-tflops", type=positive_float, default=None,
                   help=f"for MFU (default {H100_BF16_DENSE_TFLOPS:g} on CUDA: H100 bf16)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=False,
                   help="malloc keeps freed memory (utils.reuse_freed_memory; train.py's "
                        "keep_freed_memory field); default off, as train.py")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    device = get_device(args.device)
    networks, batch, iters, warmup = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    args.networks = args.networks or list(networks)
    args.batch_size = args.batch_size or batch
    args.iters = args.iters or iters
    args.warmup = warmup if args.warmup is None else args.warmup
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = args.keep_freed_memory and reuse_freed_memory()
    peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"# {where}; batch {args.batch_size}, {args.num_classes} classes, channels_last "
          f"{args.channels_last}, compile {args.compile and args.compile_mode}, "
          f"keep_freed_memory {kept}; {args.rounds} rounds x "
          f"{args.iters} steps after {args.warmup} warm-up; medians")
    header = f"{'network':<8} {'prec':<5} {'GFLOPs':>7} {'bare img/s':>11} " \
             f"{'step img/s':>11} {'step/bare':>9}"
    if peak:
        header += f" {'MFU bare':>9} {'MFU step':>9}"
    print(header)
    for network in args.networks:
        r = measure(network, args, device)
        line = f"{network:<8} {r['precision']:<5} {r['gflops']:>7.2f} {r['bare']:>11.1f} " \
               f"{r['step']:>11.1f} {r['step'] / r['bare']:>9.3f}"
        if peak:
            mfu = [r[k] * r["gflops"] * 1e9 * BACKWARD_FLOPS_FACTOR / (peak * 1e12)
                   for k in ("bare", "step")]
            line += f" {mfu[0]:>9.1%} {mfu[1]:>9.1%}"
        print(line, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
