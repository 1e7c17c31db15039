"""Step time of each margin head against ArcFace's at MS1MV2's 85,742 classes.

One step: the head's forward (cosines, margin, loss; AdaFace and CurricularFace update
their statistics, ElasticFace draws its margins, MagFace adds its regulariser), backward
and an SGD update of the centres, from a fixed batch of random embeddings (no backbone).
Heads are timed in alternating rounds (median per head), so a change in machine load hits
all alike; the ratio is each head's median over ArcFace's.

    python bench/head_step_time.py                       # CPU: batch 64, 3 rounds
    python bench/head_step_time.py --device cuda --batch 512 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arcface_loss import HEAD_NAMES, build_head  # noqa: E402
from utils import device_name, int_at_least, positive_int  # noqa: E402

MS1MV2_CLASSES = 85_742
EMBEDDING_SIZE = 512
MEAN_NORM = 30.0  # a trained backbone's embedding norms sit around here (AdaFace, MagFace)
HEAD_LR = 0.1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(head: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
              labels: torch.Tensor) -> float:
    """Seconds of one forward + backward + SGD step (the device waited for)."""
    _sync(x.device)
    start = time.perf_counter()
    loss, _ = head(x, labels, accuracy=False)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(x.device)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_name, default="cpu")
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--classes", type=int_at_least(2), default=MS1MV2_CLASSES)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--heads", nargs="+", choices=HEAD_NAMES, default=list(HEAD_NAMES))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, EMBEDDING_SIZE, generator=gen) * MEAN_NORM / EMBEDDING_SIZE**0.5
         ).to(device).requires_grad_()
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)
    runs = {}
    for name in args.heads:
        head = build_head(name, EMBEDDING_SIZE, args.classes).to(device)
        runs[name] = (head, torch.optim.SGD(head.parameters(), lr=HEAD_LR))
        time_step(*runs[name], x, labels)  # warm-up: allocations, first-call costs
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (head, optimizer) in runs.items():
            times[name].append(time_step(head, optimizer, x, labels))
    base = statistics.median(times["arcface"]) if "arcface" in times else None
    print(f"# {args.classes} classes, embedding {EMBEDDING_SIZE}, batch {args.batch}, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.rounds}")
    print(f"{'head':<18}{'ms/step':>10}{'x ArcFace':>11}")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / base:.2f}" if base else "-"
        print(f"{name:<18}{median * 1e3:>10.1f}{ratio:>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
