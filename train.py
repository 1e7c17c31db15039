"""Train an ArcFace (or CosFace / combined-margin) face model on an IR-ResNet backbone.

One device::

    python train.py --rec data/faces_emore/train.rec --output runs/ms1mv2_ir50
    python train.py --preset demo                      # the CPU demo of `make demo`

Many devices, one process each (NCCL on CUDA, gloo on the CPU); several nodes through
torchrun's own flags (``--nnodes 2 --node_rank 0 --rdzv_endpoint host:29500``)::

    torchrun --nproc_per_node=8 train.py --preset ms1mv2_ir50

With more than one process the backbone is wrapped in DistributedDataParallel and the class
centres are sharded across ranks (``cfg.sample_rate < 1`` samples negatives: Partial FC). The
lr is ``cfg.lr * global_batch / cfg.base_batch_size``.

Files in ``cfg.output``:

- ``config.json``: the config used (``models.load_backbone`` reads it beside backbone.pt);
- ``backbone.pt``: the bare backbone state dict for evaluation, rewritten at each checkpoint;
- ``checkpoint.pt`` (rank 0): backbone, its optimiser and scheduler, grad scaler, epoch,
  step, world size, number of classes and config. It is written last and is the commit
  record of a checkpoint;
- ``checkpoint_rank{r}_step{S}.pt`` (one per rank): that rank's head (its shard of the class
  centres), the head's optimiser and scheduler, and the rank's RNG states (Python, NumPy,
  torch, CUDA). The step in the name ties it to the ``checkpoint.pt`` of that step; older
  ones are deleted once a newer checkpoint is committed;
- ``tensorboard/``: loss, batch accuracy, lr, images/s, gradient norm, margin m and the
  verification accuracies;
- ``training_curves.png`` (rank 0): the same curves as a PNG, rewritten at checkpoints (at
  most once a minute) and at the end; the logged history travels in ``checkpoint.pt``, so
  the curves survive resumes.

With ``cfg.num_workers > 0`` the workers decode uint8 batches into a fixed ring of shared
memory (``fast_loader.RingBufferLoader``; ``RING_LOADER = False`` below goes back to torch's
DataLoader, which allocates shared memory for every batch) and the step normalises them on
the training device.

``--resume`` continues from ``checkpoint.pt`` exactly, mid-epoch too: the data order is a
function of (seed, epoch), so the resumed run skips the batches already done (resuming needs
the same global batch; with another world size, e.g. 8 x 64 -> 4 x 128, the head's shards
are re-cut and the run continues, no longer bit-exact). A NaN or infinite loss stops
training before the weights are updated (exit status 2) and names the last good checkpoint,
which is never overwritten. The step itself (Trainer, forward/backward, update) is in
train_step.py; its update is skipped on the device once a step is non-finite, so on CUDA the
host reads each step's loss one step late and never stalls the GPU between steps. Test-only
fault injection: ``FACE_TRAIN_FAULT=nan@STEP`` or ``kill@STEP`` (see
train_utils.injected_fault).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from config import Config, build_parser, parse_config
from distributed import (
    DistInfo,
    all_ranks_true,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from train_step import (  # noqa: F401 - the step's API, also used as train.X
    COMPILE_MODES,
    Trainer,
    build_trainer,
    defer_loss_check,
    forward_backward,
    optimizer_step,
    prepare_batch,
)
from train_utils import (
    BACKBONE_NAME,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    STATS,
    LabelRangeError,
    NonFiniteLossError,
    QueuedStep,
    ResumableBatchSampler,
    all_finite,
    check_labels,
    head_checkpoint_path,
    injected_fault,
    kill_self,
    margin_at,
    reshard_head_state,
    rng_state,
    set_rng_state,
    stale_head_files,
)
from training_monitor import CURVES_NAME, CurvesWriter, Monitor
from utils import (
    get_logger,
    load_backbone_state,
    load_checkpoint,
    run_cli,
    save_checkpoint,
    seed_everything,
)

LOG = get_logger("train")
EXIT_BAD_INPUT = 1
EXIT_NON_FINITE = 2
# worker batches through fast_loader's ring of shared-memory slots (False: torch's DataLoader)
RING_LOADER = True
# Fields that must match between a checkpoint and the run resuming it (the data order, the
# shapes of the weights and the meaning of a step depend on them), as must the global batch
# (batch_size x world size); the world size may change with it (8 x 64 -> 4 x 128): the
# head's shards are then re-cut from the saved ones.
RESUME_FIXED_FIELDS = ("network", "embedding_size", "head", "sample_rate", "seed", "rec",
                       "image_folder")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed by this run (missing, or a different setup)."""


# ----------------------------------------------------------------------------- data


def build_dataset(cfg: Config) -> tuple[torch.utils.data.Dataset, str]:
    """The training set (RecordIO, or an image folder when cfg.image_folder is set) and the
    file or folder it came from, for error messages."""
    import data_gen

    # train=False: no flip in the loader; the step flips on the device from the checkpointed
    # RNG instead (see random_flip), so augmentation resumes exactly with any num_workers.
    dataset = data_gen.build_dataset(cfg.rec, cfg.image_folder, train=False,
                                     allow_lost_records=cfg.allow_lost_records)
    return dataset, cfg.image_folder or cfg.rec


def build_loader(dataset: torch.utils.data.Dataset, sampler: ResumableBatchSampler,
                 cfg: Config, info: DistInfo, ring: bool = RING_LOADER) -> Iterable:
    """Batches of ``sampler``'s indices: float32 Nx3xHxW normalised, or with worker
    processes uint8 NxHxWx3 (see prepare_batch), whose trip through shared memory costs a
    quarter of float32's. With workers and ``ring`` a ``fast_loader.RingBufferLoader``
    (persistent workers; each uint8 batch is valid until the next one is requested, and the
    step copies it to the device first thing), else a DataLoader."""
    import data_gen

    # The loader's own generator draws the worker base seed, so creating an iterator does
    # not advance the global RNG whose state a checkpoint records.
    generator = torch.Generator().manual_seed(cfg.seed + info.rank)
    if cfg.num_workers > 0 and ring:
        from fast_loader import RingBufferLoader

        batches = torch.utils.data.BatchSampler(sampler, cfg.batch_size, drop_last=True)
        return RingBufferLoader(dataset, batches, num_workers=cfg.num_workers,
                                persistent_workers=True, generator=generator)
    if cfg.num_workers > 0:
        dataset = data_gen.RawUint8View(dataset)
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        pin_memory=info.device.type == "cuda", drop_last=True, generator=generator,
        persistent_workers=cfg.num_workers > 0)


# ----------------------------------------------------------------------------- checkpoints


def save_training_checkpoint(tr: Trainer, cfg: Config, step: int, epoch: int,
                             num_classes: int, logs: dict[str, list] | None = None) -> Path:
    """Per-rank files first, then ``checkpoint.pt`` (the commit, with ``logs``: the logged
    history so far), then ``backbone.pt``; all atomic. Refuses to save non-finite weights,
    so a good checkpoint is never replaced by a bad one. Returns the path of
    ``checkpoint.pt``."""
    output, info = Path(cfg.output), tr.info
    if not all_ranks_true(all_finite([tr.backbone, tr.head]), info):
        raise NonFiniteLossError(f"non-finite weights at step {step}; checkpoint not written")
    save_checkpoint({"head": tr.head.state_dict(), "optimizer": tr.opt_head.state_dict(),
                     "scheduler": tr.sched_head.state_dict(), "rng": rng_state(),
                     "step": step, "rank": info.rank, "world_size": info.world_size},
                    head_checkpoint_path(output, info.rank, step))
    barrier(info)
    path = output / CHECKPOINT_NAME
    if info.is_main:
        backbone_state = tr.backbone.state_dict()
        save_checkpoint({"backbone": backbone_state,
                         "optimizer": tr.opt_backbone.state_dict(),
                         "scheduler": tr.sched_backbone.state_dict(),
                         "scaler": tr.scaler.state_dict(), "step": step, "epoch": epoch,
                         "world_size": info.world_size, "num_classes": num_classes,
                         "config": cfg.to_dict(), "logs": logs or {}}, path)
        save_checkpoint(backbone_state, output / BACKBONE_NAME)
    barrier(info)
    for stale in stale_head_files(output, info.rank, info.world_size, keep_step=step):
        stale.unlink(missing_ok=True)
    return path


def resume_training(tr: Trainer, cfg: Config, num_classes: int
                    ) -> tuple[int, dict[str, list]]:
    """Load ``checkpoint.pt`` and this rank's file into ``tr``, restore the RNG states, and
    return the step to continue from and the logs saved with it."""
    output, info = Path(cfg.output), tr.info
    path = output / CHECKPOINT_NAME
    if not path.is_file():
        raise ResumeError(f"--resume: no checkpoint to resume at {path}")
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_FIXED_FIELDS
               if saved.get(k) != getattr(cfg, k)]
    saved_world = int(ckpt["world_size"])
    if saved["batch_size"] * saved_world != cfg.batch_size * info.world_size:
        changed.append(f"global batch: {saved['batch_size']} x {saved_world} ranks -> "
                       f"{cfg.batch_size} x {info.world_size}")
    if ckpt["num_classes"] != num_classes:
        changed.append(f"classes: {ckpt['num_classes']} -> {num_classes}")
    if changed:
        raise ResumeError(f"{path}: cannot resume exactly with a different setup ("
                          + "; ".join(changed) + ")")
    step = int(ckpt["step"])

    def load_rank(rank: int) -> dict[str, Any]:
        rank_path = head_checkpoint_path(output, rank, step)
        if not rank_path.is_file():
            raise ResumeError(f"{path} (step {step}) needs {rank_path}, which is missing")
        return load_checkpoint(rank_path)

    if saved_world == info.world_size:
        rank_state = load_rank(info.rank)
        set_rng_state(rank_state["rng"])
    else:
        rank_state = reshard_head_state(load_rank, num_classes, saved_world, info.world_size,
                                        info.rank)
        # no saved stream belongs to this rank: a fresh one per (rank, step)
        seed_everything(cfg.seed + info.rank + step * info.world_size)
        if info.is_main:
            LOG.info("resuming %d ranks' run on %d: head shards re-cut from the saved ones; "
                     "data order and lr schedule continue as before, augmentation draws and "
                     "BatchNorm batches differ from an uninterrupted run", saved_world,
                     info.world_size)
    tr.backbone.load_state_dict(ckpt["backbone"])
    tr.opt_backbone.load_state_dict(ckpt["optimizer"])
    tr.sched_backbone.load_state_dict(ckpt["scheduler"])
    tr.scaler.load_state_dict(ckpt["scaler"])
    tr.head.load_state_dict(rank_state["head"])
    tr.opt_head.load_state_dict(rank_state["optimizer"])
    tr.sched_head.load_state_dict(rank_state["scheduler"])
    return step, ckpt.get("logs", {})


# ----------------------------------------------------------------------------- logging


def load_val_bins(cfg: Config, info: DistInfo) -> dict[str, tuple[Any, Any]]:
    """The pairs of each of cfg.val_bins, decoded once before training (rank 0 only; a bad
    file fails now rather than at the first check), keyed by set name."""
    if not (info.is_main and cfg.val_bins and cfg.verify_every > 0):
        return {}
    import lfw_eval

    return {Path(path).stem: lfw_eval.load_bin(path, progress=False) for path in cfg.val_bins}


def verify(tr: Trainer, step: int, monitor: Monitor,
           val_sets: dict[str, tuple[Any, Any]]) -> dict[str, float]:
    """10-fold verification accuracy on each decoded set of ``val_sets`` (rank 0; the
    others wait)."""
    results: dict[str, float] = {}
    if tr.info.is_main:
        import lfw_eval

        tr.backbone.eval()
        for name, (images, issame) in val_sets.items():
            res = lfw_eval.evaluate_verification(tr.backbone, images, issame,
                                                 device=tr.device, name=name, progress=False)
            results[name] = float(res["accuracy"])
            monitor.scalar(f"verification/{name}_accuracy", results[name], step)
            monitor.scalar(f"verification/{name}_accuracy_std", float(res["accuracy_std"]),
                           step)
            LOG.info("step %d: %s accuracy %.4f +- %.4f", step, name, res["accuracy"],
                     res["accuracy_std"])
        tr.backbone.train()
    barrier(tr.info)
    return results


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, resume: bool = False, init_checkpoint: str | None = None
          ) -> dict[str, Any]:
    """Train as ``cfg`` says (one process, or one rank of a torchrun job); returns a
    summary: steps, final loss and accuracy, checkpoint paths, seconds, images/s."""
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, resume, init_checkpoint)
    finally:
        cleanup_distributed()


def _train(cfg: Config, info: DistInfo, resume: bool, init_checkpoint: str | None
           ) -> dict[str, Any]:
    t_start = time.perf_counter()
    output = Path(cfg.output)
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        LOG.info("config (world size %d, device %s):\n%s", info.world_size, info.device,
                 cfg.pretty())
        cfg.save(output / CONFIG_NAME)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    dataset, source = build_dataset(cfg)
    num_classes = int(dataset.num_classes)
    check_labels(dataset.labels, num_classes, source)
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, info.world_size, info.rank,
                                    seed=cfg.seed)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    tr = build_trainer(cfg, num_classes, info, total_steps, steps_per_epoch)
    loader = build_loader(dataset, sampler, cfg, info)

    step, last_ckpt = 0, None
    # the logged values (returned in the summary, saved with each checkpoint, plotted):
    # one dict per logged step, and one per verification check
    logs: dict[str, list[dict[str, float]]] = {"history": [], "verification": []}
    if resume:
        step, saved_logs = resume_training(tr, cfg, num_classes)
        logs.update(saved_logs)
        last_ckpt = output / CHECKPOINT_NAME
    elif init_checkpoint:
        tr.backbone.load_state_dict(load_backbone_state(init_checkpoint))
    if info.is_main:
        LOG.info("%s: %d images of %d identities; %d steps per epoch of %d images, %d steps"
                 " in all%s", source, len(dataset), num_classes, steps_per_epoch,
                 sampler.global_batch, total_steps,
                 f", resuming after step {step}" if step else "")

    monitor = Monitor(cfg, info, step, last_step)
    values = dict.fromkeys(STATS, float("nan"))
    verification: dict[str, float] = {}
    val_sets = load_val_bins(cfg, info)
    saved_step = step if resume else -1
    curves = CurvesWriter(output / CURVES_NAME) if info.is_main else None
    first_step = step + 1
    steps_run = 0
    # queued steps whose values the host has not read yet: none on the CPU, at most one on
    # CUDA (see defer_loss_check)
    pending: list[QueuedStep] = []
    lag = 1 if defer_loss_check(tr) else 0

    def read(queued: QueuedStep) -> dict[str, float]:
        """The step's values; a non-finite one stops training here (its update, and every
        later one, was skipped on the device)."""
        got = queued.values()
        if not queued.finite(loss_only=tr.scaler.is_enabled()):
            where = (f"last good checkpoint: {last_ckpt} (step {saved_step})"
                     if last_ckpt else "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"non-finite training loss {got['loss']} (gradient norm {got['grad_norm']}) "
                f"at step {queued.step}, epoch {queued.epoch + 1}; stopped before updating "
                f"the weights; {where}")
        log = queued.step % cfg.log_every == 0 or queued.step in (last_step, first_step)
        monitor.step(queued.step, got, queued.lr, queued.margin, log)
        if log:
            logs["history"].append({"step": queued.step, **got, "lr": queued.lr,
                                    "margin_m": queued.margin,
                                    "images_per_second": monitor.images_per_second})
        return got

    t_loop = time.perf_counter()
    try:
        epoch, start_batch = divmod(step, steps_per_epoch)
        while step < last_step:
            sampler.set_epoch(epoch, start_batch)
            for images, labels in loader:
                margin = margin_at(step, total_steps, cfg.margin_m, cfg.margin_warmup)
                tr.head.m = margin  # read at forward time
                lr = tr.opt_backbone.param_groups[0]["lr"]
                step += 1
                fault = injected_fault(step)
                stats = forward_backward(tr, images, labels, inject_nan=fault == "nan")
                optimizer_step(tr, stats)
                steps_run += 1
                pending.append(QueuedStep(stats, step, epoch, lr, margin))
                verify_now = bool(cfg.val_bins) and cfg.verify_every > 0 and (
                    step % cfg.verify_every == 0 or step == last_step)
                save_now = step % cfg.save_every == 0 or step % steps_per_epoch == 0 \
                    or step == last_step
                # every queued step is read before anything is verified or written
                keep = 0 if verify_now or save_now or fault == "kill" else lag
                while len(pending) > keep:
                    values = read(pending.pop(0))
                # verification before the checkpoint, so its result is saved with it
                if verify_now:
                    verification = verify(tr, step, monitor, val_sets)
                    if verification:  # rank 0
                        logs["verification"].append({"step": step, **verification})
                if save_now:
                    last_ckpt = save_training_checkpoint(tr, cfg, step, step // steps_per_epoch,
                                                         num_classes, logs)
                    saved_step = step
                    if curves:
                        curves.update(logs["history"], logs["verification"])
                if fault == "kill":
                    kill_self()
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
    summary = {
        "steps": step, "steps_run": steps_run, "epochs": step / steps_per_epoch,
        "final_loss": values["loss"], "final_accuracy": values["accuracy"],
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "backbone": str(output / BACKBONE_NAME), "config": str(output / CONFIG_NAME),
        "seconds": time.perf_counter() - t_start,
        "images_per_second": steps_run * sampler.global_batch / max(loop_seconds, 1e-9),
        "verification": verification, "world_size": info.world_size,
        "history": logs["history"], "verification_history": logs["verification"],
    }
    if info.is_main:
        LOG.info("done: %d steps (%.2f epochs) in %.1f s, %.1f images/s; final loss %.4f, "
                 "batch accuracy %.3f\n  checkpoint: %s\n  backbone:   %s\n  config:     %s"
                 "\n  tensorboard: %s\n  curves:     %s", step, summary["epochs"],
                 summary["seconds"], summary["images_per_second"], summary["final_loss"],
                 summary["final_accuracy"], summary["checkpoint"], summary["backbone"],
                 summary["config"], output / "tensorboard", output / CURVES_NAME)
    return summary


# ----------------------------------------------------------------------------- CLI


def build_arg_parser():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true",
                        help="continue exactly from <output>/checkpoint.pt")
    parser.add_argument("--init-checkpoint", default=None,
                        help="start from these backbone weights (backbone.pt or a checkpoint)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(argv, parser=build_arg_parser())
    try:
        train(cfg, resume=args.resume, init_checkpoint=args.init_checkpoint)
    except NonFiniteLossError as e:
        LOG.error("%s", e)
        return EXIT_NON_FINITE
    except (LabelRangeError, ResumeError, FileNotFoundError) as e:
        LOG.error("%s", e)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
