"""End-to-end check of train.py's loop on a device (for a GPU session): a short run on
generated identities must lower its loss and write its checkpoints, and a NaN injected
mid-run must stop training at the next read of the loss (every ``--log-every`` steps) with
the right step named and the checkpoint before it intact, nothing saved after it.

On CUDA this is the path the CPU tests cannot reach: the first non-finite step noted on the
GPU between two reads of the loss, without the host waiting for any step in between.

    python bench/train_smoke.py --device cuda              # ir18, batch 64, 60 steps
    python bench/train_smoke.py --device cpu --network ir_narrow --steps 12 --batch-size 8

Prints PASS/FAIL per check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from config import make_config  # noqa: E402
from training.train_checkpoints import CHECKPOINT_NAME  # noqa: E402
from training.trainer import FAULT_ENV, NonFiniteLossError  # noqa: E402
from utils import (  # noqa: E402
    device_name,
    int_at_least,
    load_checkpoint,
    positive_int,
    write_image,
)

CROP = 112
NOISE = 24  # per-image pixel noise around an identity's base image: learnable, not trivial
MIN_IDENTITIES = 2  # a classification head needs two classes to learn anything


def make_identities(root: Path, identities: int, per_identity: int, seed: int = 0) -> None:
    """identity/k.jpg trees: each identity a random base image, each sample base + noise."""
    rng = np.random.default_rng(seed)
    for i in range(identities):
        base = rng.integers(0, 256, (CROP, CROP, 3)).astype(np.int16)
        for k in range(per_identity):
            noisy = base + rng.integers(-NOISE, NOISE + 1, base.shape)
            write_image(root / f"id{i:04d}" / f"{k}.jpg", noisy.clip(0, 255).astype(np.uint8))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--network", default="ir18")
    p.add_argument("--steps", type=positive_int, default=60)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--identities", type=int_at_least(MIN_IDENTITIES), default=32)
    p.add_argument("--workers", type=int_at_least(0), default=4)
    p.add_argument("--log-every", type=positive_int, default=5,
                   help="steps between reads of the loss")
    p.add_argument("--output", default="runs/train_smoke")
    args = p.parse_args(argv)

    out = Path(args.output)
    faces = out / "faces"
    # one epoch longer than the run, so the only checkpoints are every save_every steps
    per_identity = -(-args.batch_size * (args.steps + 1) // args.identities)
    if not faces.exists():
        make_identities(faces, args.identities, per_identity)
    save_every = args.steps // 2
    base = dict(image_folder=str(faces), rec="", device=args.device, network=args.network,
                embedding_size=128, batch_size=args.batch_size,
                base_batch_size=args.batch_size, lr=0.05, scale_s=32.0, margin_m=0.3,
                epochs=1, max_steps=args.steps, save_every=save_every, log_every=args.log_every,
                num_workers=args.workers, verify_every=0)
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {what}", flush=True)

    # overwrite: a rerun of this check replaces the runs of the last one
    summary = train.train(make_config({**base, "output": str(out / "clean")}), overwrite=True)
    losses = [h["loss"] for h in summary["history"]]
    k = max(1, len(losses) // 3)  # a third of the logged steps at each end
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    print(f"clean run: {summary['steps']} steps, {summary['images_per_second']:.0f} img/s, "
          f"loss {first:.3f} -> {last:.3f} (means of the first and last {k} logged "
          "steps)")
    check(summary["steps"] == args.steps, f"ran {args.steps} steps")
    check(last < first, "the loss went down")
    check(load_checkpoint(out / "clean" / CHECKPOINT_NAME)["step"] == args.steps,
          "the final checkpoint is the last step's")

    bad_step = save_every + 3
    os.environ[FAULT_ENV] = f"nan@{bad_step}"
    try:
        train.train(make_config({**base, "output": str(out / "nan")}), overwrite=True)
        check(False, f"a NaN at step {bad_step} stops training")
    except NonFiniteLossError as err:
        message = str(err)
        print(f"NaN run stopped: {message}")
        check(f"at step {bad_step}," in message and f"(step {save_every})" in message,
              f"the message names step {bad_step} and the checkpoint of step {save_every}")
    finally:
        del os.environ[FAULT_ENV]
    kept = load_checkpoint(out / "nan" / CHECKPOINT_NAME)
    check(kept["step"] == save_every, f"checkpoint.pt still holds step {save_every}")
    later = [p.name for p in (out / "nan").glob("checkpoint_rank*_step*.pt")
             if int(p.stem.rpartition("step")[2]) > save_every]
    check(not later, f"no head file saved after step {save_every} ({later or 'none'})")
    check(all(bool(torch.isfinite(v).all()) for v in kept["backbone"].values()
              if v.is_floating_point()), "its weights are finite")
    print(f"{'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
