"""Continue a run that InsightFace's arcface_torch wrote (its train_v2.py with
``save_all_states``): ``train.py --resume`` on its output folder.

Each of its ranks saves ``checkpoint_gpu_{rank}.pt`` at an epoch's end: ``epoch`` (epochs
done), ``global_step``, ``state_dict_backbone`` (the DDP module's own state dict),
``state_dict_softmax_fc`` (that rank's ``weight``: the contiguous class range
training.distributed.shard_range cuts), ``state_optimizer`` (one SGD or AdamW over two groups,
the backbone's ``parameters()`` then that weight) and ``state_lr_scheduler`` (its
PolynomialLRWarmup). Here the backbone is loaded strictly, the shards are joined and re-cut
for this world size (as ours are, arcface_torch's files read only where they hold this
rank's classes), each parameter's optimiser state (SGD momentum buffer; AdamW moments and
step) goes to the same parameter of our optimisers, found by name, and the run continues
after its step on this run's schedule, which must span the same steps as its own (with
gradient_acc k its step and schedule count micro-batches, ours optimiser steps). Data
order, augmentation draws and the fp16 grad scaler start afresh. A run that has once saved
here continues from its own checkpoint.pt after that.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from config import Config
from training.distributed import all_ranks_true, shard_range
from training.train_checkpoints import (
    ARCFACE_TORCH_PATTERN,
    CHECKPOINT_NAME,
    OPTIMIZER_FIELDS,
    PREVIOUS_CHECKPOINT_NAME,
    CheckpointFileError,
    Resumed,
    ResumeError,
    SavedSteps,
    check_fields,
    read_checkpoint_file,
    reshard_head_state,
    restore_optimizer,
)
from training.trainer import Trainer
from utils import (
    CORRUPT_REASON_CHARS,
    ToolkitError,
    get_logger,
    seed_everything,
    strip_module_prefix,
)

LOG = get_logger("train")

_FILE_RE = re.compile(r"checkpoint_gpu_(\d+)\.pt$")
FILE_FIELDS: dict[str, type] = {
    "epoch": int, "global_step": int, "state_dict_backbone": dict,
    "state_dict_softmax_fc": dict, "state_optimizer": dict, "state_lr_scheduler": dict}
# its optimiser's param groups: [backbone.parameters()], [partial fc weight]
BACKBONE_GROUP, HEAD_GROUP = 0, 1
# an AdamW param group has betas, an SGD one momentum
OPTIMIZER_MARK = {"adamw": "betas", "sgd": "momentum"}


def rank_file(output: Path, rank: int) -> Path:
    return output / f"checkpoint_gpu_{rank}.pt"


def holds_arcface_torch_run(output: Path) -> bool:
    """Whether ``output`` holds arcface_torch's rank files and no checkpoint of ours (ours,
    written once its run continued here, come first)."""
    ours = any((output / name).is_file() for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME))
    return not ours and any(output.glob(ARCFACE_TORCH_PATTERN))


def saved_world_size(output: Path) -> int:
    """The number of ranks that wrote the run: its files must be those of ranks 0..W-1."""
    ranks = {int(m.group(1)) for p in output.glob(ARCFACE_TORCH_PATTERN)
             if (m := _FILE_RE.search(p.name))}
    for rank in range(max(ranks) + 1):
        if rank not in ranks:
            raise ResumeError(f"{rank_file(output, rank)}: missing, while ranks up to "
                              f"{max(ranks)} saved theirs: every rank's file is needed")
    return len(ranks)


def _read_rank(output: Path, rank: int, world: int, num_classes: int, embedding_size: int,
               first: dict[str, Any]) -> dict[str, Any]:
    """Rank ``rank``'s file, checked, as reshard_head_state reads a head file (``head``,
    ``optimizer`` holding the centres' state only); the file's whole contents ride along
    under ``arcface_torch``."""
    path = rank_file(output, rank)
    state = read_checkpoint_file(path)
    check_fields(state, FILE_FIELDS, path)
    check_fields(state["state_dict_softmax_fc"], {"weight": torch.Tensor}, path,
                 prefix="state_dict_softmax_fc.")
    check_fields(state["state_optimizer"], OPTIMIZER_FIELDS, path, prefix="state_optimizer.")
    weight = state["state_dict_softmax_fc"]["weight"]
    lo, hi = shard_range(num_classes, world, rank)
    if weight.ndim != 2 or weight.shape[0] != hi - lo:
        raise ResumeError(
            f"{path}: holds {weight.shape[0]} class centres where rank {rank} of {world} "
            f"holds {hi - lo} of the set's {num_classes} classes: its shards do not add up "
            "to this set's classes (another set, or files of another world size)")
    if weight.shape[1] != embedding_size:
        raise ResumeError(f"{path}: its class centres have {weight.shape[1]} dimensions, "
                          f"this run's embedding_size is {embedding_size}")
    first.setdefault("step", (state["global_step"], path))
    if state["global_step"] != first["step"][0]:
        raise ResumeError(f"{path}: saved at step {state['global_step']}, "
                          f"{first['step'][1].name} at {first['step'][0]}: files of two runs")
    groups = state["state_optimizer"]["param_groups"]
    if len(groups) != 2 or len(groups[HEAD_GROUP].get("params", ())) != 1:
        raise ResumeError(f"{path}: state_optimizer holds {len(groups)} param group(s), not "
                          "arcface_torch's two (the backbone's parameters, then its weight)")
    head_index = groups[HEAD_GROUP]["params"][0]
    return {"head": {"weight": weight},
            "optimizer": {"state": {0: state["state_optimizer"]["state"].get(head_index, {})},
                          "param_groups": []},
            "scheduler": {}, "arcface_torch": state, "path": path}


def _load_backbone(trainer: Trainer, saved: Mapping[str, Any], path: Path, cfg: Config
                   ) -> list[str]:
    """The saved backbone, strictly; returns its parameter names in its own parameters()
    order (a state dict lists each module's parameters, then its buffers, module by module,
    as parameters() walks them)."""
    state = strip_module_prefix(saved)
    try:
        trainer.backbone.load_state_dict(state)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:CORRUPT_REASON_CHARS]
        raise ResumeError(f"{path}: its backbone does not fit network {cfg.network!r} with "
                          f"embedding size {cfg.embedding_size} ({reason}); name its network "
                          "with its config file (--config) or --network") from None
    params = dict(trainer.backbone.named_parameters())
    return [name for name in state if name in params]


def _optimizer_state(opt: torch.optim.Optimizer, saved: Mapping[Any, Any],
                     by_param: Mapping[int, Any]) -> dict[str, Any]:
    """``opt``'s state dict (its own hyperparameters) holding ``saved[i]`` for each of its
    parameters that ``by_param`` maps (id of the parameter -> saved index) to a state."""
    state = opt.state_dict()
    ours = [p for group in opt.param_groups for p in group["params"]]
    state["state"] = {index: saved[by_param[id(p)]] for index, p in enumerate(ours)
                      if id(p) in by_param and saved.get(by_param[id(p)])}
    return state


def _check_optimizer(saved: Mapping[str, Any], path: Path, cfg: Config, names: list[str]
                     ) -> list[int]:
    """The saved optimiser's indices of the backbone's parameters, in its order; refused
    when it is another optimiser than this run's or holds another number of them."""
    groups = saved["param_groups"]
    kind = "adamw" if OPTIMIZER_MARK["adamw"] in groups[BACKBONE_GROUP] else "sgd"
    if kind != cfg.optimizer:
        raise ResumeError(f"{path}: its optimiser state is {kind}'s, this run's optimizer is "
                          f"{cfg.optimizer}; resume with --optimizer {kind}")
    indices = list(groups[BACKBONE_GROUP].get("params", ()))
    if len(indices) != len(names):
        raise ResumeError(f"{path}: its optimiser holds {len(indices)} backbone parameters, "
                          f"network {cfg.network!r} has {len(names)}")
    return indices


def _check_schedule(saved: Mapping[str, Any], path: Path, cfg: Config, total_steps: int,
                    warmup_steps: int) -> None:
    """Its PolynomialLRWarmup must span this run's steps: another global batch, number of
    epochs or warm-up would bend the schedule where the run stands. It counts micro-batches,
    m = N // (B W) an epoch, ours optimiser steps of k: N // (B W k) = m // k, so its totals
    are k x ours plus r = m % k (0 <= r < k) an epoch, and r x warmup_epoch in warm-up."""
    if cfg.scheduler != "linear":
        raise ResumeError(f"{path}: arcface_torch's lr schedule is linear, this run's "
                          f"scheduler is {cfg.scheduler}; resume with its config (--config) or "
                          "--scheduler linear")
    k = cfg.gradient_acc
    total, warmup = saved.get("total_iters"), saved.get("warmup_iters")
    extra, rest = divmod(total - k * total_steps, cfg.epochs) if isinstance(total, int) \
        else (-1, 0)
    if rest or not 0 <= extra < k or warmup != k * warmup_steps + extra * cfg.warmup_epochs:
        ours = f"{total_steps} ({warmup_steps})" if k == 1 else (
            f"{total_steps} optimiser steps ({warmup_steps}) of {k} micro-batches, not {k} x "
            f"those plus up to {k - 1} an epoch")
        raise ResumeError(
            f"{path}: its lr schedule spans {total} {'steps' if k == 1 else 'micro-batches'} "
            f"({warmup} of warm-up), this run's {ours}: resume with its global batch (its "
            "ranks x batch_size), num_epoch, warmup_epoch and gradient_acc")


def _optimizer_steps(saved: Mapping[str, Any], path: Path, k: int) -> int:
    """The optimiser steps in its ``global_step`` micro-batches: it counts each before
    running it and steps after the one where global_step % k == 0. It saves at epochs'
    ends, inside a window when its micro-batches an epoch are not a multiple of k: the
    window's gradients are not in the file."""
    step = int(saved["global_step"])
    if step % k:
        raise ResumeError(f"{path}: saved after micro-batch {step}, {step % k} into a "
                          f"gradient_acc window of {k}: those micro-batches' gradients are not "
                          "saved, so its run cannot go on exactly; start anew from its model.pt "
                          "(--init-checkpoint)")
    return step // k


def _in_our_units(saved: Mapping[Any, Any], k: int) -> dict[Any, Any]:
    """Its loss is not divided by k (ours is, see arcface_torch_config._accumulation):
    its moments are of k x our gradients, SGD's buffer (its weight decay k x ours too) and
    AdamW's first moment k x ours, the second k^2 x."""
    powers = {"momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2}
    return {index: {key: value / k ** powers[key] if key in powers else value
                    for key, value in state.items()} for index, state in saved.items()}


def _restore(trainer: Trainer, cfg: Config, state: dict[str, Any], total_steps: int,
             warmup_steps: int) -> int:
    """Put the re-cut state into ``trainer``; returns the step it continues after."""
    saved, path = state["arcface_torch"], state["path"]
    _check_schedule(saved["state_lr_scheduler"], path, cfg, total_steps, warmup_steps)
    names = _load_backbone(trainer, saved["state_dict_backbone"], path, cfg)
    indices = _check_optimizer(saved["state_optimizer"], path, cfg, names)
    params = dict(trainer.backbone.named_parameters())
    step = _optimizer_steps(saved, path, cfg.gradient_acc)
    # the step our LambdaLR has taken: restore_optimizer sets the lr of this run's schedule
    schedule = {"last_epoch": step, "_step_count": step + 1}
    backbone_state = _optimizer_state(
        trainer.opt_backbone, _in_our_units(saved["state_optimizer"]["state"], cfg.gradient_acc),
        {id(params[name]): index for name, index in zip(names, indices, strict=True)})
    restore_optimizer(trainer.opt_backbone, trainer.sched_backbone, backbone_state,
                      {**trainer.sched_backbone.state_dict(), **schedule})
    head = trainer.head.state_dict()
    head["weight"] = state["head"]["weight"]
    trainer.head.load_state_dict(head)
    head_state = _optimizer_state(trainer.opt_head,
                                  _in_our_units(state["optimizer"]["state"], cfg.gradient_acc),
                                  {id(trainer.head.weight): 0})
    restore_optimizer(trainer.opt_head, trainer.sched_head, head_state,
                      {**trainer.sched_head.state_dict(), **schedule})
    return step


def resume_arcface_torch(trainer: Trainer, cfg: Config, num_classes: int, total_steps: int,
                         steps_per_epoch: int) -> Resumed:
    """Load the arcface_torch run in cfg.output into ``trainer`` (see the module's
    docstring) and return the step to continue after. ResumeError (or CheckpointFileError
    for a damaged file) names the file: a rank's file missing, shards that do not add up to
    the set's classes, a backbone of another network, another optimiser or schedule."""
    output, info = Path(cfg.output), trainer.info
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))  # as train.build_trainer
    error: ToolkitError | None = None
    try:
        world = saved_world_size(output)
        first: dict[str, Any] = {}  # the step of the first file read, and its path

        def load_rank(rank: int) -> dict[str, Any]:
            return _read_rank(output, rank, world, num_classes, cfg.embedding_size, first)

        state = reshard_head_state(load_rank, num_classes, world, info.world_size, info.rank)
        step = _restore(trainer, cfg, state, total_steps, warmup_steps)
    except (ResumeError, CheckpointFileError) as e:
        error = e
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:  # torch refused
        error = CheckpointFileError(f"{output}: arcface_torch's files do not fit this run "
                                    f"({' '.join(str(e).split())[:CORRUPT_REASON_CHARS]})")
    if not all_ranks_true(error is None, info):  # every rank resumes, or none
        raise error or ResumeError(f"{output}: another rank could not read arcface_torch's "
                                   "files")
    # no saved stream belongs to this rank: a fresh one per (rank, step), as a re-cut resume
    seed_everything(cfg.seed + info.rank + step * info.world_size)
    epoch = state["arcface_torch"]["epoch"]
    if info.is_main:
        LOG.info("resuming arcface_torch's run of %d rank(s) in %s after epoch %d, step %d, "
                 "on %d rank(s): backbone, class centres and optimiser state carried over; "
                 "data order, augmentation and grad scaler start afresh", world, output,
                 epoch, step, info.world_size)
        if step != epoch * steps_per_epoch:
            LOG.warning("%s: step %d ends epoch %d there; at %d steps per epoch here the run "
                        "goes on in epoch %d", state["path"], step, epoch, steps_per_epoch,
                        step // steps_per_epoch + 1)
    return Resumed(step, {}, SavedSteps())

