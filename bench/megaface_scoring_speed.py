"""The MegaFace evaluator (evaluation.megaface_eval) against one torch.mm, synthetic features.

3,500 unit probes of 80 identities against 1e5 unit distractors (1e6 with --full), 512-D:
the evaluator's wall time (CMC ranks 1..10 at every N = 10 .. 1e5/1e6 and TAR at FAR
1e-6/1e-5/1e-4, in one pass) next to ONE torch.mm of the same shape (probes x distractors^T)
in the same run, and the evaluator's peak memory above what was resident before it (targets:
time within 1.5x the mm, peak under 1.5x the distractor array, i.e. extra < 0.5x).

Peak memory: Linux's VmHWM after resetting it through /proc/self/clear_refs (CPU); CUDA:
torch.cuda.max_memory_allocated. When the mm's output would be too big (over 4 GiB on the CPU,
over half the free memory on a GPU) it is computed in column blocks into one reused buffer,
and the table says so.

  python bench/megaface_scoring_speed.py [--full] [--device cpu|cuda] [--distractors N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._peak_memory import peak_above, start_peak  # noqa: E402
from evaluation import megaface_eval as me  # noqa: E402
from utils import device_name, positive_int  # noqa: E402

NUM_PROBES = 3500
NUM_IDENTITIES = 80
DIM = 512
DEFAULT_DISTRACTORS = 100_000
FULL_DISTRACTORS = 1_000_000
PROBE_NOISE = 2.0  # norm of a probe's offset from its identity centre (non-trivial rates)
WARMUP_DISTRACTORS = 4096
GEN_BLOCK = 65536
MM_MAX_OUTPUT_BYTES = 4 * 2**30  # CPU: a larger mm output is computed in reused column blocks
MM_BLOCK = 65536


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_features(num_distractors: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = _normalise_rows(rng.standard_normal((NUM_IDENTITIES, DIM)))
    labels = rng.integers(0, NUM_IDENTITIES, NUM_PROBES)
    noise = rng.standard_normal((NUM_PROBES, DIM)) * (PROBE_NOISE / np.sqrt(DIM))
    probes = _normalise_rows(centres[labels] + noise).astype(np.float32)
    distractors = np.empty((num_distractors, DIM), dtype=np.float32)
    for start in range(0, num_distractors, GEN_BLOCK):  # in blocks: no full-size temporaries
        block = distractors[start:start + GEN_BLOCK]
        block[:] = rng.standard_normal(block.shape, dtype=np.float32)
        _normalise_rows(block)
    return probes, labels, distractors


def time_mm(probes_t, distractors_t, device) -> tuple[float, str]:
    n = distractors_t.shape[0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    limit = torch.cuda.mem_get_info()[0] // 2 if device.type == "cuda" else MM_MAX_OUTPUT_BYTES
    if probes_t.shape[0] * n * 4 <= limit:
        sync()
        t0 = time.perf_counter()
        out = torch.mm(probes_t, distractors_t.t())
        sync()
        elapsed = time.perf_counter() - t0
        del out
        return elapsed, "one mm"
    buf = torch.empty(probes_t.shape[0], MM_BLOCK, device=device)
    sync()
    t0 = time.perf_counter()
    for start in range(0, n, MM_BLOCK):
        block = distractors_t[start:start + MM_BLOCK]
        target = buf if block.shape[0] == MM_BLOCK else buf[:, :block.shape[0]]
        torch.mm(probes_t, block.t(), out=target)
    sync()
    return time.perf_counter() - t0, f"mm in {MM_BLOCK}-column blocks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="1e6 distractors")
    parser.add_argument("--distractors", type=positive_int, default=None)
    parser.add_argument("--device", type=device_name,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=positive_int, default=None)
    args = parser.parse_args()
    n = args.distractors or (FULL_DISTRACTORS if args.full else DEFAULT_DISTRACTORS)
    device = torch.device(args.device)

    t0 = time.perf_counter()
    probes, labels, distractors = make_features(n)
    print(f"generated {NUM_PROBES} probes ({NUM_IDENTITIES} ids) and {n:,} distractors x {DIM} "
          f"in {time.perf_counter() - t0:.1f}s; device {device}, torch threads "
          f"{torch.get_num_threads()}")
    distractor_bytes = distractors.nbytes
    # warm-up: the first call pages in torch's kernels, which is not the evaluator's memory
    me.megaface_evaluate(probes, labels, distractors[:WARMUP_DISTRACTORS], device=device,
                         progress=False)
    if device.type == "cuda":  # both timings start from features already on the GPU
        distractors = torch.from_numpy(distractors).to(device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = start_peak()

    t0 = time.perf_counter()
    results = me.megaface_evaluate(probes, labels, distractors, sizes=me.DEFAULT_SIZES,
                                   chunk_size=args.chunk_size, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    eval_s = time.perf_counter() - t0
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
        mem_note = "CUDA max_memory_allocated"
    elif (extra := peak_above(base)) is not None:
        mem_note = "VmHWM - VmRSS before"
    else:
        extra, mem_note = float("nan"), "unavailable"

    probes_t = torch.from_numpy(probes).to(device)
    distractors_t = torch.as_tensor(distractors).to(device)
    time_mm(probes_t, distractors_t[:MM_BLOCK], device)  # warm-up (BLAS/cuBLAS init)
    mm_s, mm_kind = time_mm(probes_t, distractors_t, device)

    print()
    print(f"{'what':<44} {'value':>12}")
    print(f"{'evaluator (all sizes, CMC + TAR@FAR) s':<44} {eval_s:>12.2f}")
    print(f"{'torch.mm ' + f'{NUM_PROBES}x{DIM} @ {DIM}x{n} s ({mm_kind})':<44} {mm_s:>12.2f}")
    print(f"{'ratio evaluator / mm (target <= 1.5)':<44} {eval_s / mm_s:>12.2f}")
    print(f"{'distractor array MiB':<44} {distractor_bytes / 2**20:>12.1f}")
    print(f"{'evaluator extra peak MiB (' + mem_note + ')':<44} {extra / 2**20:>12.1f}")
    print(f"{'(array + extra) / array (target < 1.5)':<44} "
          f"{(distractor_bytes + extra) / distractor_bytes:>12.2f}")
    print()
    print(me.format_results(results))


if __name__ == "__main__":
    main()
