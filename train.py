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
  step, world size, number of classes and images, and config. It is written last and is
  the commit record of a checkpoint;
- ``checkpoint.prev.pt``: the checkpoint before it (a second name for the old file, kept
  until the new one is whole), which ``--resume`` falls back to, with a warning, when
  ``checkpoint.pt`` or a head file of its step is damaged or missing;
- ``checkpoint_rank{r}_step{S}.pt`` (one per rank): that rank's head (its shard of the class
  centres), the head's optimiser and scheduler, and the rank's RNG states (Python, NumPy,
  torch, CUDA). The step in the name ties it to the ``checkpoint.pt`` (or
  ``checkpoint.prev.pt``) of that step; those of older steps are deleted once a newer
  checkpoint is committed;
- ``tensorboard/``: loss, batch accuracy, lr, images/s, gradient norm, margin m and the
  verification accuracies;
- ``training_curves.png`` (rank 0): the same curves as a PNG, rewritten at checkpoints (at
  most once a minute) and at the end; the logged history travels in ``checkpoint.pt``, so
  the curves survive resumes.

With ``cfg.num_workers > 0`` the workers send uint8 batches, which the step normalises on
the training device; with ``cfg.ring_loader`` they decode into a fixed ring of shared memory
(``fast_loader.RingBufferLoader``) instead of torch's DataLoader, which allocates shared
memory for every batch.

Nothing is written before the whole setup is checked (config values, the output folder,
the data set, the checkpoint to resume): a refused run leaves ``cfg.output`` as it was. An
output folder holding a run is refused unless ``--resume`` continues it or ``--overwrite``
replaces it (deleting its files). Temporaries that a killed run left there are deleted at
the next start. A checkpoint that cannot be written (disk full) stops training with one
line naming the file; the last complete checkpoint is kept.

``--resume`` continues from ``checkpoint.pt`` exactly, mid-epoch too: the data order is a
function of (seed, epoch), so the resumed run skips the batches already done (resuming needs
the same global batch; with another world size, e.g. 8 x 64 -> 4 x 128, the head's shards
are re-cut and the run continues, no longer bit-exact). What else may change on resume
is decided field by field in train_utils: RESUME_MAY_CHANGE (lr, momentum, intervals,
max_steps, device, ...: applied from the resumed step on, and logged) and RESUME_REFUSED
(network, head, data set, seed, epochs and the schedules' shape, ...: refused by name).
A NaN or infinite loss stops
training before the weights are updated (exit status 2) and names the last good checkpoint,
which is never overwritten. The step itself (Trainer, forward/backward, update) is in
train_step.py; its update is skipped on the device once a step is non-finite, so on CUDA the
host reads each step's loss one step late and never stalls the GPU between steps. Test-only
fault injection: ``FACE_TRAIN_FAULT=nan@STEP`` or ``kill@STEP`` (see
train_utils.injected_fault).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
from train_utils import (  # noqa: F401 - the errors are also used as train.X
    BACKBONE_NAME,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    EXIT_NON_FINITE,
    HEAD_FILE_PATTERN,
    PREVIOUS_CHECKPOINT_NAME,
    STATS,
    CheckpointFileError,
    CheckpointWriteError,
    DataSetError,
    LabelRangeError,
    NonFiniteLossError,
    OutputFolderError,
    QueuedStep,
    ResumableBatchSampler,
    ResumeError,
    all_finite,
    check_labels,
    head_checkpoint_path,
    injected_fault,
    keep_as_previous,
    kill_self,
    margin_at,
    read_checkpoint_file,
    reshard_head_state,
    restore_optimizer,
    resume_differences,
    rng_state,
    set_rng_state,
    stale_head_files,
    write_checkpoint,
)
from training_monitor import CURVES_NAME, TENSORBOARD_NAME, CurvesWriter, Monitor
from utils import (
    ToolkitError,
    describe_error,
    get_logger,
    load_backbone_state,
    remove_stale_temporaries,
    reuse_freed_memory,
    run_cli,
    seed_everything,
)

LOG = get_logger("train")
EXIT_BAD_INPUT = 1  # every ToolkitError but the non-finite loss (EXIT_NON_FINITE)
# The files a run writes into its output folder (besides the per-rank head files)
RUN_FILE_NAMES = (CONFIG_NAME, CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, BACKBONE_NAME,
                  CURVES_NAME, TENSORBOARD_NAME)


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


def open_training_set(cfg: Config, global_batch: int
                      ) -> tuple[torch.utils.data.Dataset, str]:
    """build_dataset, refusing a set too small for one global batch. data_gen's ValueErrors
    (an empty or unreadable set; their messages name the file) become DataSetErrors: one
    line for the user, not a traceback."""
    try:
        dataset, source = build_dataset(cfg)
    except ValueError as e:
        if isinstance(e, ToolkitError):
            raise
        raise DataSetError(str(e)) from e
    if len(dataset) < global_batch:
        raise DataSetError(f"{source}: {len(dataset)} images, fewer than one global batch of "
                           f"{global_batch}; lower --batch-size")
    return dataset, source


def build_loader(dataset: torch.utils.data.Dataset, sampler: ResumableBatchSampler,
                 cfg: Config, info: DistInfo, ring: bool | None = None) -> Iterable:
    """Batches of ``sampler``'s indices: float32 Nx3xHxW normalised, or with worker
    processes uint8 NxHxWx3 (see prepare_batch), whose trip through shared memory costs a
    quarter of float32's. With workers and ``ring`` (default cfg.ring_loader) a
    ``fast_loader.RingBufferLoader``
    (persistent workers; each uint8 batch is valid until the next one is requested, and the
    step copies it to the device first thing), else a DataLoader."""
    import data_gen

    ring = cfg.ring_loader if ring is None else ring
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


# ----------------------------------------------------------------------------- output folder


def run_files(output: Path) -> list[Path]:
    """What a run left in ``output``: its files, TensorBoard folder and head files."""
    found = [output / name for name in RUN_FILE_NAMES if (output / name).exists()]
    return found + sorted(output.glob(HEAD_FILE_PATTERN))


def check_output_folder(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an --output this run cannot use, before anything is written: a file; a
    folder holding another run unless resuming it or --overwrite; --resume without a
    checkpoint. Reads only, on every rank (each must refuse alike)."""
    if output.exists() and not output.is_dir():
        raise OutputFolderError(f"--output {output}: is a file, not a folder")
    if resume:
        if not any((output / name).is_file()
                   for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME)):
            raise ResumeError(f"--resume: no checkpoint to resume at {output / CHECKPOINT_NAME}")
        return
    found = run_files(output)
    if found and not overwrite:
        raise OutputFolderError(
            f"{output} already holds a run ({', '.join(p.name for p in found)}); continue it "
            "with --resume, train into a new --output, or replace it with --overwrite")


def prepare_output(output: Path, cfg: Config, overwrite: bool) -> None:
    """Rank 0, once every check has passed: create the folder, delete the old run's files
    when overwriting it, delete temporaries that a killed run left (no writer of these
    names runs now), and write config.json."""
    output.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in run_files(output):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    orphans = [p for name in (*RUN_FILE_NAMES, HEAD_FILE_PATTERN)
               for p in remove_stale_temporaries(output, name)]
    if orphans:
        LOG.info("removed %d temporary file(s) left by an interrupted run: %s", len(orphans),
                 ", ".join(p.name for p in orphans))
    cfg.save(output / CONFIG_NAME)


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class SavedSteps:
    """The steps the output folder's checkpoints hold, as far as this run knows: a
    complete checkpoint.pt (None: none yet, or a damaged one the next save replaces) and
    checkpoint.prev.pt (None: none, or not known). The head files of both are kept."""
    current: int | None = None
    previous: int | None = None

    def last_complete(self, output: Path) -> tuple[Path, int] | None:
        # checkpoint.pt is gone only where keep_as_previous had to rename it
        if self.current is not None and (output / CHECKPOINT_NAME).is_file():
            return output / CHECKPOINT_NAME, self.current
        if self.previous is not None:
            return output / PREVIOUS_CHECKPOINT_NAME, self.previous
        return None


def raise_unless_all_written(error: OSError | None, info: DistInfo, step: int,
                             saved: SavedSteps, output: Path) -> None:
    """A collective: when any rank failed to write its part of step ``step``'s checkpoint,
    every rank raises CheckpointWriteError naming the file and the checkpoint kept."""
    if all_ranks_true(error is None, info):
        return
    what = describe_error(error) if error else "another rank could not write its head file"
    last = saved.last_complete(output)
    kept = (f"the last complete checkpoint, {last[0]} (step {last[1]}), is kept" if last
            else "no complete checkpoint was written before")
    raise CheckpointWriteError(f"{what}; the checkpoint of step {step} was not saved; {kept}")


def save_training_checkpoint(tr: Trainer, cfg: Config, step: int, epoch: int,
                             num_classes: int, num_samples: int, saved: SavedSteps,
                             logs: dict[str, list] | None = None) -> Path:
    """Per-rank files first, then ``checkpoint.pt`` (the commit, with ``logs``: the logged
    history so far), then ``backbone.pt``; all atomic. The checkpoint.pt being replaced
    stays as checkpoint.prev.pt (with its head files) until the next one is whole. Refuses
    to save non-finite weights, so a good checkpoint is never replaced by a bad one; a
    failed write (disk full) raises CheckpointWriteError on every rank. Updates ``saved``
    and returns the path of ``checkpoint.pt``."""
    output, info = Path(cfg.output), tr.info
    if not all_ranks_true(all_finite([tr.backbone, tr.head]), info):
        raise NonFiniteLossError(f"non-finite weights at step {step}; checkpoint not written")
    error: OSError | None = None
    try:
        write_checkpoint({"head": tr.head.state_dict(), "optimizer": tr.opt_head.state_dict(),
                          "scheduler": tr.sched_head.state_dict(), "rng": rng_state(),
                          "step": step, "rank": info.rank, "world_size": info.world_size},
                         head_checkpoint_path(output, info.rank, step))
    except OSError as e:
        error = e
    raise_unless_all_written(error, info, step, saved, output)
    path = output / CHECKPOINT_NAME
    rotate = saved.current is not None  # a damaged checkpoint.pt is not kept as previous
    if info.is_main:
        try:
            backbone_state = tr.backbone.state_dict()
            if rotate:
                keep_as_previous(path, output / PREVIOUS_CHECKPOINT_NAME)
            write_checkpoint({"backbone": backbone_state,
                              "optimizer": tr.opt_backbone.state_dict(),
                              "scheduler": tr.sched_backbone.state_dict(),
                              "scaler": tr.scaler.state_dict(), "step": step, "epoch": epoch,
                              "world_size": info.world_size, "num_classes": num_classes,
                              "num_samples": num_samples, "config": cfg.to_dict(),
                              "logs": logs or {}}, path)
            write_checkpoint(backbone_state, output / BACKBONE_NAME)
        except OSError as e:
            error = e
    if rotate:  # the same on every rank: checkpoint.prev.pt now holds what checkpoint.pt held
        saved.previous = saved.current
    raise_unless_all_written(error, info, step, saved, output)
    saved.current = step
    for stale in stale_head_files(output, info.rank, info.world_size,
                                  keep_steps={step, saved.previous}):
        stale.unlink(missing_ok=True)
    return path


# keys every checkpoint.pt has; one without them is damaged
CHECKPOINT_KEYS = ("backbone", "optimizer", "scheduler", "scaler", "step", "world_size",
                   "num_classes", "config")


class Resumed(NamedTuple):
    step: int  # the step to continue from
    logs: dict[str, list]  # the logged history saved with the checkpoint
    saved: SavedSteps  # what the output folder's checkpoints hold


def check_resumable(ckpt: dict[str, Any], path: Path, cfg: Config, num_classes: int,
                    num_samples: int | None, world_size: int) -> list[str]:
    """Refuse (ResumeError, naming each field) a checkpoint this run cannot continue: see
    train_utils.RESUME_REFUSED, plus the global batch, the classes and the number of
    images. Returns the allowed changes, ``field: old -> new``."""
    allowed, refused = resume_differences(ckpt["config"], cfg.to_dict(), Config().to_dict())
    saved_batch, saved_world = ckpt["config"]["batch_size"], int(ckpt["world_size"])
    if saved_batch * saved_world != cfg.batch_size * world_size:
        refused.append(f"global batch: {saved_batch} x {saved_world} ranks -> "
                       f"{cfg.batch_size} x {world_size}")
    if ckpt["num_classes"] != num_classes:
        refused.append(f"classes: {ckpt['num_classes']} -> {num_classes}")
    saved_samples = ckpt.get("num_samples")  # absent from older checkpoints
    if None not in (saved_samples, num_samples) and saved_samples != num_samples:
        refused.append(f"images: {saved_samples} -> {num_samples}")
    if refused:
        raise ResumeError(f"{path}: cannot resume with a different setup ("
                          + "; ".join(refused) + "); to train with it, start a new run "
                          "(another --output, --init-checkpoint for the weights)")
    return allowed


def read_resume_state(path: Path, tr: Trainer, cfg: Config, num_classes: int,
                      num_samples: int | None) -> tuple[dict[str, Any], dict[str, Any],
                                                        list[str]]:
    """``path`` (checkpoint.pt or its previous copy), this rank's head state from the head
    files of its step (re-cut when the world size changed) and the allowed setting
    changes. CheckpointFileError names a missing or damaged file; ResumeError a setup the
    checkpoint cannot continue."""
    output, info = path.parent, tr.info
    ckpt = read_checkpoint_file(path)
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise CheckpointFileError(f"{path}: damaged (no {', '.join(missing)})")
    changes = check_resumable(ckpt, path, cfg, num_classes, num_samples, info.world_size)
    step, saved_world = int(ckpt["step"]), int(ckpt["world_size"])

    def load_rank(rank: int) -> dict[str, Any]:
        return read_checkpoint_file(head_checkpoint_path(output, rank, step))

    if saved_world == info.world_size:
        return ckpt, load_rank(info.rank), changes
    return ckpt, reshard_head_state(load_rank, num_classes, saved_world, info.world_size,
                                    info.rank), changes


def resume_training(tr: Trainer, cfg: Config, num_classes: int,
                    num_samples: int | None = None) -> Resumed:
    """Load ``checkpoint.pt`` and this rank's file into ``tr``, restore the RNG states, and
    return the step to continue from and the logs saved with it. A damaged or missing
    checkpoint.pt (or head file) falls back to checkpoint.prev.pt with a warning; when
    neither is usable, ResumeError names them. Settings that may change (train_utils.
    RESUME_MAY_CHANGE: lr, momentum, ...) are this run's and logged; the others must match."""
    output, info = Path(cfg.output), tr.info
    problems: list[str] = []
    for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME):
        path, problem = output / name, None
        try:
            ckpt, rank_state, changes = read_resume_state(path, tr, cfg, num_classes,
                                                          num_samples)
        except CheckpointFileError as e:
            problem = str(e)
        if all_ranks_true(problem is None, info):  # every rank resumes from the same step
            break
        problems.append(problem or f"{path}: another rank's head file is missing or damaged")
    else:
        raise ResumeError("cannot resume: " + "; ".join(problems))
    step = int(ckpt["step"])
    if info.is_main and problems:
        LOG.warning("%s; resuming from %s (step %d) instead", "; ".join(problems), path, step)
    if info.is_main and changes:
        LOG.info("resuming with changed settings: %s", "; ".join(changes))
    saved_world = int(ckpt["world_size"])
    if saved_world == info.world_size:
        set_rng_state(rank_state["rng"])
    else:
        # no saved stream belongs to this rank: a fresh one per (rank, step)
        seed_everything(cfg.seed + info.rank + step * info.world_size)
        if info.is_main:
            LOG.info("resuming %d ranks' run on %d: head shards re-cut from the saved ones; "
                     "data order and lr schedule continue as before, augmentation draws and "
                     "BatchNorm batches differ from an uninterrupted run", saved_world,
                     info.world_size)
    tr.backbone.load_state_dict(ckpt["backbone"])
    restore_optimizer(tr.opt_backbone, tr.sched_backbone, ckpt["optimizer"], ckpt["scheduler"])
    # the grad scaler has state only under fp16; amp may change between runs
    if tr.scaler.is_enabled() and ckpt["scaler"]:
        tr.scaler.load_state_dict(ckpt["scaler"])
    tr.head.load_state_dict(rank_state["head"])
    restore_optimizer(tr.opt_head, tr.sched_head, rank_state["optimizer"],
                      rank_state["scheduler"])
    saved = (SavedSteps(current=step) if path.name == CHECKPOINT_NAME
             else SavedSteps(previous=step))
    return Resumed(step, ckpt.get("logs", {}), saved)


def load_init_weights(tr: Trainer, path: str, network: str) -> None:
    """--init-checkpoint: backbone weights from backbone.pt or a checkpoint; a damaged file
    or one of another network is a CheckpointFileError naming it."""
    try:
        state = load_backbone_state(path)
    except RuntimeError as e:
        raise CheckpointFileError(" ".join(str(e).split())) from e
    try:
        tr.backbone.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointFileError(f"{path}: not weights of network {network!r} ("
                                  + " ".join(str(e).split())[:300] + ")") from e


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


def train(cfg: Config, resume: bool = False, init_checkpoint: str | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Train as ``cfg`` says (one process, or one rank of a torchrun job); returns a
    summary: steps, final loss and accuracy, checkpoint paths, seconds, images/s.
    ``resume``: continue the run in cfg.output; ``overwrite``: replace the run there;
    ``init_checkpoint``: start a new run from these backbone weights."""
    if resume and (overwrite or init_checkpoint):
        raise ResumeError("--resume continues the run in --output with its own weights; it "
                          "cannot be combined with --overwrite or --init-checkpoint")
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, resume, init_checkpoint, overwrite)
    finally:
        cleanup_distributed()


def _train(cfg: Config, info: DistInfo, resume: bool, init_checkpoint: str | None,
           overwrite: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    output = Path(cfg.output)
    if info.is_main:
        LOG.info("config (world size %d, device %s):\n%s", info.world_size, info.device,
                 cfg.pretty())
    if cfg.keep_freed_memory and not reuse_freed_memory():  # process-wide, see config.py
        LOG.warning("keep_freed_memory: not applied (needs Linux with glibc's mallopt)")
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Everything is checked before anything is written: a refused run leaves the output
    # folder as it was.
    check_output_folder(output, resume, overwrite)
    dataset, source = open_training_set(cfg, cfg.batch_size * info.world_size)
    num_classes = int(dataset.num_classes)
    check_labels(dataset.labels, num_classes, source)
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, info.world_size, info.rank,
                                    seed=cfg.seed)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    tr = build_trainer(cfg, num_classes, info, total_steps, steps_per_epoch)
    step, saved = 0, SavedSteps()
    # the logged values (returned in the summary, saved with each checkpoint, plotted):
    # one dict per logged step, and one per verification check
    logs: dict[str, list[dict[str, float]]] = {"history": [], "verification": []}
    if resume:
        step, saved_logs, saved = resume_training(tr, cfg, num_classes, len(dataset))
        logs.update(saved_logs)
    elif init_checkpoint:
        load_init_weights(tr, init_checkpoint, cfg.network)
    val_sets = load_val_bins(cfg, info)
    barrier(info)  # every rank has checked the folder before rank 0 changes it
    if info.is_main:
        prepare_output(output, cfg, overwrite)
        LOG.info("%s: %d images of %d identities; %d steps per epoch of %d images, %d steps"
                 " in all%s", source, len(dataset), num_classes, steps_per_epoch,
                 sampler.global_batch, total_steps,
                 f", resuming after step {step}" if step else "")
    barrier(info)  # no rank writes before rank 0 has cleared the folder

    loader = build_loader(dataset, sampler, cfg, info)
    monitor = Monitor(cfg, info, step, last_step)
    values = dict.fromkeys(STATS, float("nan"))
    verification: dict[str, float] = {}
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
            last = saved.last_complete(output)
            where = (f"last good checkpoint: {last[0]} (step {last[1]})"
                     if last else "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"non-finite training loss {got['loss']} (gradient norm {got['grad_norm']}) "
                f"at step {queued.step}, epoch {queued.epoch + 1}; stopped before updating "
                f"the weights; {where}")
        # log_every 0: no periodic logging, only the first and the last step
        log = (cfg.log_every > 0 and queued.step % cfg.log_every == 0) \
            or queued.step in (last_step, first_step)
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
                # save_every 0: no periodic checkpoints, only at epoch ends and the end
                save_now = (cfg.save_every > 0 and step % cfg.save_every == 0) \
                    or step % steps_per_epoch == 0 or step == last_step
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
                    save_training_checkpoint(tr, cfg, step, step // steps_per_epoch,
                                             num_classes, len(dataset), saved, logs)
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
    last_ckpt = saved.last_complete(output)
    summary = {
        "steps": step, "steps_run": steps_run, "epochs": step / steps_per_epoch,
        "final_loss": values["loss"], "final_accuracy": values["accuracy"],
        "checkpoint": str(last_ckpt[0]) if last_ckpt else None,
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
                 summary["config"], output / TENSORBOARD_NAME, output / CURVES_NAME)
    return summary


# ----------------------------------------------------------------------------- CLI


def build_arg_parser():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true",
                        help="continue exactly from <output>/checkpoint.pt (or, when that is "
                             "damaged, checkpoint.prev.pt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --output that holds a run, deleting its "
                             "checkpoints, config, curves and TensorBoard logs")
    parser.add_argument("--init-checkpoint", default=None,
                        help="start from these backbone weights (backbone.pt or a checkpoint)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; errors reach run_cli, which prints them as one line (exit status
    EXIT_NON_FINITE for a non-finite loss, else EXIT_BAD_INPUT)."""
    cfg, args = parse_config(argv, parser=build_arg_parser())
    train(cfg, resume=args.resume, init_checkpoint=args.init_checkpoint,
          overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
