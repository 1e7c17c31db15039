"""train.py --resume on a folder InsightFace's arcface_torch wrote: its checkpoint_gpu_{rank}.pt
files are written here in its format (train_v2.py's checkpoint dict; one torch.optim
optimiser over [backbone.parameters()] + [that rank's weight shard], one real step taken so
the momentum buffers hold something), then resumed on one rank and re-cut for others."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_testlib import run_ranks
from test_train import pattern_images, write_rec

import models
import train
from config import make_config
from training.arcface_torch_checkpoint import holds_arcface_torch_run, resume_arcface_torch
from training.distributed import DistInfo, shard_range
from training.train_checkpoints import (
    CheckpointFileError,
    OutputFolderError,
    ResumeError,
    load_init_weights,
)
from utils import load_checkpoint

CLASSES, PER_CLASS, EMBEDDING = 6, 4, 32
THEIR_WORLD, THEIR_BATCH = 2, 2  # 2 ranks x 2 images: our 1 x 4, the same global batch
EPOCHS, WARMUP_EPOCHS = 4, 1
STEPS_PER_EPOCH = CLASSES * PER_CLASS // (THEIR_WORLD * THEIR_BATCH)  # its N // global batch
TOTAL, WARMUP = EPOCHS * STEPS_PER_EPOCH, WARMUP_EPOCHS * STEPS_PER_EPOCH  # 24, 6
SAVED_EPOCH = 2
SAVED_STEP = SAVED_EPOCH * STEPS_PER_EPOCH  # 12, where it saved at the end of epoch 2
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
SHARDS = [(0, 3), (3, 6)]  # 6 classes over 2 ranks, its num_local / class_start
INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def our_cfg(rec, output, **overrides):
    """Ours, as its config maps: lr as given, linear schedule, decay on every parameter."""
    return make_config({
        "network": "ir_narrow", "embedding_size": EMBEDDING, "batch_size": 4, "lr": LR,
        "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "scale_lr": False,
        "scheduler": "linear", "decay_all": True, "clip_head": False, "epochs": EPOCHS,
        "warmup_epochs": WARMUP_EPOCHS, "scale_s": 64.0, "margin_m": 0.5, "rec": str(rec),
        "output": str(output), "device": "cpu", "num_workers": 0, "channels_last": False,
        "cpu_amp": False, "log_every": 1, "seed": 5, **overrides})


def pfc_shard(num_classes, world, rank):
    """PartialFC_V2.__init__'s class_start and class_start + num_local, as it writes them."""
    num_local = num_classes // world + int(rank < num_classes % world)
    class_start = num_classes // world * rank + min(rank, num_classes % world)
    return class_start, class_start + num_local


def write_their_run(folder, optimizer="sgd", prefix="", per_epoch=STEPS_PER_EPOCH,
                    epoch=SAVED_EPOCH, classes=CLASSES, world=THEIR_WORLD,
                    warmup_epochs=WARMUP_EPOCHS):
    """Its ``world`` rank files (each its PartialFC_V2 shard of ``classes``) and model.pt,
    saved at the end of ``epoch`` of ``per_epoch`` micro-batches (its global_step and
    PolynomialLRWarmup count them); returns what they hold: the backbone module and, per
    rank, its centres shard and optimiser state dict."""
    torch.manual_seed(0)
    net = models.build_model("ir_narrow", EMBEDDING)
    centres = torch.randn(classes, EMBEDDING) * 0.01
    images = torch.randn(4, 3, 112, 112)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = []
    for rank in range(world):
        lo, hi = pfc_shard(classes, world, rank)
        backbone = copy.deepcopy(net)  # DDP: the same backbone and gradient on every rank
        weight = torch.nn.Parameter(centres[lo:hi].clone())
        groups = [{"params": backbone.parameters()}, {"params": [weight]}]
        opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY) \
            if optimizer == "sgd" else torch.optim.AdamW(groups, lr=LR, weight_decay=0.1)
        embeddings = backbone(images)
        loss = embeddings.square().mean() + (embeddings.detach() @ weight.T).sin().sum()
        loss.backward()
        opt.step()
        step = epoch * per_epoch
        scheduler = {"total_iters": EPOCHS * per_epoch, "power": 1.0,
                     "warmup_iters": warmup_epochs * per_epoch, "base_lrs": [LR, LR],
                     "last_epoch": step, "verbose": False, "_step_count": step + 1,
                     "_get_lr_called_within_step": False, "_last_lr": [LR, LR]}
        state_dict = {prefix + k: v for k, v in backbone.state_dict().items()}
        torch.save({"epoch": epoch, "global_step": step,
                    "state_dict_backbone": state_dict,
                    "state_dict_softmax_fc": {"weight": weight.detach()},
                    "state_optimizer": opt.state_dict(), "state_lr_scheduler": scheduler},
                   folder / f"checkpoint_gpu_{rank}.pt")
        ranks.append({"weight": weight.detach(), "optimizer": opt.state_dict()})
    torch.save(backbone.state_dict(), folder / "model.pt")
    return backbone, ranks


@pytest.fixture
def rec(tmp_path):
    path = tmp_path / "data" / "train.rec"
    path.parent.mkdir()
    write_rec(path, *pattern_images(CLASSES, PER_CLASS))
    return path


def trainer_for(cfg, num_classes=CLASSES):
    return train.build_trainer(cfg, num_classes, INFO, total_steps=TOTAL,
                               steps_per_epoch=STEPS_PER_EPOCH)


@pytest.mark.parametrize("optimizer, keys", [("sgd", ["momentum_buffer"]),
                                             ("adamw", ["exp_avg", "exp_avg_sq", "step"])])
def test_its_checkpoint_loads_on_one_rank(rec, tmp_path, optimizer, keys):
    """Backbone (a ``module.`` prefix stripped), both shards joined, every parameter's
    optimiser state under the same parameter of ours, the step carried over."""
    backbone, ranks = write_their_run(tmp_path / "run", optimizer, prefix="module.")
    cfg = our_cfg(rec, tmp_path / "run", optimizer=optimizer)
    trainer = trainer_for(cfg)
    assert resume_arcface_torch(trainer, cfg, CLASSES, TOTAL, STEPS_PER_EPOCH).step == SAVED_STEP

    ours = trainer.backbone.state_dict()
    for name, value in backbone.state_dict().items():
        assert torch.equal(ours[name], value), name
    assert torch.equal(trainer.head.weight.detach(), torch.cat([r["weight"] for r in ranks]))
    # its optimiser numbers the backbone's parameters in parameters() order, frozen ones too
    theirs = ranks[0]["optimizer"]["state"]
    ours_by_name = dict(trainer.backbone.named_parameters())
    mapped = 0
    for index, (name, param) in enumerate(backbone.named_parameters()):
        if not param.requires_grad:  # the frozen BN scale: in neither optimiser's state
            assert index not in theirs and ours_by_name[name] not in trainer.opt_backbone.state
            continue
        for key in keys:
            assert torch.equal(trainer.opt_backbone.state[ours_by_name[name]][key].cpu(),
                               theirs[index][key]), (name, key)
        mapped += 1
    assert mapped == len(theirs) - 1  # every backbone state; the last is the head's
    head_index = len(list(backbone.parameters()))
    head_state = trainer.opt_head.state[trainer.head.weight]
    for key in keys:
        parts = [r["optimizer"]["state"][head_index][key] for r in ranks]
        expected = parts[0] if key == "step" else torch.cat(parts)
        assert torch.equal(head_state[key].cpu(), expected), key


ITS_CONFIG = """from easydict import EasyDict as edict
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "ir_narrow"
config.embedding_size = {embedding}
config.fp16 = False
config.batch_size = {batch}
config.lr = {lr}
config.momentum = {momentum}
config.weight_decay = {weight_decay}
config.rec = {rec!r}
config.num_classes = {classes}
config.num_epoch = {epochs}
config.warmup_epoch = {warmup}
config.val_targets = []
config.output = {output!r}
config.num_workers = 0
config.frequent = 1
config.save_all_states = True
config.seed = 5
"""


def test_train_resume_continues_its_run_at_its_step_on_the_linear_schedule(rec, tmp_path):
    """The command a user runs: its config file (per-GPU batch 2 on 2 GPUs; here one
    process takes the global batch of 4) and --resume on its output folder."""
    run = tmp_path / "run"
    write_their_run(run)
    config = tmp_path / "ms1m_ir_narrow.py"
    config.write_text(ITS_CONFIG.format(
        embedding=EMBEDDING, batch=THEIR_BATCH, lr=LR, momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY, rec=str(rec.parent), classes=CLASSES, epochs=EPOCHS,
        warmup=WARMUP_EPOCHS, output=str(run)))
    assert train.main(["--config", str(config), "--resume", "--batch-size", "4",
                       "--device", "cpu", "--no-channels-last",
                       "--max-steps", str(SAVED_STEP + 2)]) == 0
    ours = load_checkpoint(run / "checkpoint.pt")
    # the epoch goes on: step 14 lies in the third epoch (index 2), the one after its saved 2
    assert (ours["step"], ours["epoch"]) == (SAVED_STEP + 2, SAVED_EPOCH)
    history = ours["logs"]["history"]
    assert [h["step"] for h in history] == [SAVED_STEP + 1, SAVED_STEP + 2]
    # PolynomialLRWarmup (power 1) after `last_epoch` scheduler steps, past the warm-up:
    # base_lr * (1 - (last_epoch - warmup) / (total - warmup))
    expected = [LR * (1 - (last - WARMUP) / (TOTAL - WARMUP))
                for last in (SAVED_STEP, SAVED_STEP + 1)]
    assert [h["lr"] for h in history] == pytest.approx(expected, rel=1e-12)
    saved = json.loads((run / "config.json").read_text())
    assert (saved["network"], saved["scheduler"], saved["decay_all"]) == \
        ("ir_narrow", "linear", True)
    # its files stay; the next --resume continues from our checkpoint.pt
    assert (run / "checkpoint_gpu_1.pt").is_file() and not holds_arcface_torch_run(run)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_centres_are_recut_for_other_world_sizes(rec, tmp_path, world, monkeypatch):
    """Each of our ranks gets its contiguous classes (C // W each, the first C % W one more)
    with their momentum rows; only the files holding them are read."""
    import training.arcface_torch_checkpoint as module  # to watch which files are read

    _, ranks = write_their_run(tmp_path / "run")
    full = torch.cat([r["weight"] for r in ranks])
    momentum = torch.cat([r["optimizer"]["state"][max(r["optimizer"]["state"])]
                          ["momentum_buffer"] for r in ranks])
    ranges = {2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)],
              4: [(0, 2), (2, 4), (4, 5), (5, 6)]}[world]
    read = []
    original = module.read_checkpoint_file
    monkeypatch.setattr(module, "read_checkpoint_file",
                        lambda path: read.append(path.name) or original(path))
    cfg = our_cfg(rec, tmp_path / "run")
    for rank, (lo, hi) in enumerate(ranges):
        read.clear()
        trainer = trainer_for(cfg)
        trainer.info = DistInfo(rank=rank, world_size=world, local_rank=0,
                                device=torch.device("cpu"))
        trainer.head.weight = torch.nn.Parameter(torch.zeros(hi - lo, EMBEDDING))
        trainer.opt_head.param_groups[0]["params"] = [trainer.head.weight]
        monkeypatch.setattr(module, "all_ranks_true", lambda flag, info: flag)
        resume_arcface_torch(trainer, cfg, CLASSES, TOTAL, STEPS_PER_EPOCH)
        assert torch.equal(trainer.head.weight.detach(), full[lo:hi])
        assert torch.equal(trainer.opt_head.state[trainer.head.weight]["momentum_buffer"],
                           momentum[lo:hi])
        assert read == [f"checkpoint_gpu_{r}.pt" for r, (a, b) in enumerate(SHARDS)
                        if a < hi and lo < b]


def test_shard_range_is_partial_fc_v2s_cut():
    """training.distributed.shard_range against PartialFC_V2's num_local / class_start for
    every remainder, more ranks than classes included (its surplus ranks hold none)."""
    for classes in range(1, 30):
        for world in range(1, 9):
            for rank in range(world):
                assert shard_range(classes, world, rank) == pfc_shard(classes, world, rank), \
                    (classes, world, rank)


UNEVEN = 7  # classes no world size 2 or 3 divides: its first C % W ranks hold one more


def resume_as(cfg, rank, world, classes, monkeypatch):
    """Our rank ``rank`` of ``world`` (its shard's rows, the process group's agreement
    assumed) resumed from cfg.output; returns the trainer."""
    import training.arcface_torch_checkpoint as module  # its collective, answered here

    monkeypatch.setattr(module, "all_ranks_true", lambda flag, info: flag)
    trainer = trainer_for(cfg, classes)
    lo, hi = pfc_shard(classes, world, rank)
    trainer.info = DistInfo(rank=rank, world_size=world, local_rank=0,
                            device=torch.device("cpu"))
    trainer.head.weight = torch.nn.Parameter(torch.zeros(hi - lo, EMBEDDING))
    trainer.opt_head.param_groups[0]["params"] = [trainer.head.weight]
    assert resume_arcface_torch(trainer, cfg, classes, TOTAL, STEPS_PER_EPOCH).step \
        == SAVED_STEP
    return trainer


@pytest.mark.parametrize("optimizer, keys", [("sgd", ["momentum_buffer"]),
                                             ("adamw", ["exp_avg", "exp_avg_sq"])])
@pytest.mark.parametrize("their_world", [1, 2, 3])
def test_uneven_classes_recut_between_world_sizes(rec, tmp_path, monkeypatch, their_world,
                                                  optimizer, keys):
    """7 classes its 1, 2 or 3 ranks held (3 + 2 + 2 on 3), resumed on our 1, 2 and 3
    ranks: each of ours gets PartialFC_V2's rows for its rank, centres and per-centre
    moments, and AdamW's step count."""
    _, ranks = write_their_run(tmp_path / "run", optimizer, classes=UNEVEN, world=their_world)
    head_index = [max(r["optimizer"]["state"]) for r in ranks]
    full = torch.cat([r["weight"] for r in ranks])
    moments = {key: torch.cat([r["optimizer"]["state"][i][key]
                               for r, i in zip(ranks, head_index, strict=True)])
               for key in keys}
    cfg = our_cfg(rec, tmp_path / "run", optimizer=optimizer)
    for world in (1, 2, 3):
        for rank in range(world):
            trainer = resume_as(cfg, rank, world, UNEVEN, monkeypatch)
            lo, hi = pfc_shard(UNEVEN, world, rank)
            assert torch.equal(trainer.head.weight.detach(), full[lo:hi]), (world, rank)
            state = trainer.opt_head.state[trainer.head.weight]
            for key in keys:
                assert torch.equal(state[key].cpu(), moments[key][lo:hi]), (world, rank, key)
            if optimizer == "adamw":  # one step taken on every one of its ranks
                assert float(state["step"]) == 1.0


def polynomial_lr_warmup(base_lr, warmup, total, last_epoch, power=1.0):
    """lr_scheduler.py's PolynomialLRWarmup after ``last_epoch`` steps, stepped through its
    chained get_lr in float64: its construction's step leaves the lr as given, the warm-up
    sets base_lr * l / warmup, later steps multiply by the ratio of successive factors,
    past total_iters the lr stays."""
    lr = base_lr
    for step in range(1, last_epoch + 1):
        if step > total:
            continue
        if step <= warmup:
            lr = base_lr * step / warmup
        else:
            lr *= ((1.0 - (step - warmup) / (total - warmup))
                   / (1.0 - (step - 1 - warmup) / (total - warmup))) ** power
    return lr


@pytest.mark.parametrize("warmup_epochs", [2, 0])  # 0: most of its configs
def test_resume_after_epoch_1_follows_its_schedule(rec, tmp_path, warmup_epochs):
    """Saved after epoch 1 of 4 (6 steps) with 2 epochs of warm-up (12 steps) or none: the
    lr of each next step is its PolynomialLRWarmup's at last_epoch = its global_step and
    on, through the end of the warm-up, the decay and past its total_iters."""
    write_their_run(tmp_path / "run", epoch=1, warmup_epochs=warmup_epochs)
    cfg = our_cfg(rec, tmp_path / "run", warmup_epochs=warmup_epochs)
    trainer = trainer_for(cfg)
    step = resume_arcface_torch(trainer, cfg, CLASSES, TOTAL, STEPS_PER_EPOCH).step
    assert step == STEPS_PER_EPOCH
    warmup = warmup_epochs * STEPS_PER_EPOCH
    for last_epoch in range(step, TOTAL + 2):
        expected = polynomial_lr_warmup(LR, warmup, TOTAL, last_epoch)
        for opt in (trainer.opt_backbone, trainer.opt_head):
            assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), \
                last_epoch
        trainer.sched_backbone.step()
        trainer.sched_head.step()


RUN_DIR_VARIABLE = "ARCFACE_TORCH_TEST_RUN"  # where the spawned ranks find the run


def _resume_worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=THEIR_WORLD)
    try:
        torch.set_num_threads(1)
        run = Path(os.environ[RUN_DIR_VARIABLE])
        cfg = our_cfg(run / "data" / "train.rec", run, batch_size=THEIR_BATCH)
        info = DistInfo(rank=rank, world_size=THEIR_WORLD, local_rank=rank,
                        device=torch.device("cpu"))
        trainer = train.build_trainer(cfg, CLASSES, info, total_steps=TOTAL,
                                      steps_per_epoch=STEPS_PER_EPOCH)
        step = resume_arcface_torch(trainer, cfg, CLASSES, TOTAL, STEPS_PER_EPOCH).step
        results[rank] = {
            "step": step, "weight": trainer.head.weight.detach().clone(),
            "momentum": trainer.opt_head.state[trainer.head.weight]["momentum_buffer"].clone(),
            "backbone": {k: v.clone() for k, v in trainer.backbone.state_dict().items()}}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_two_ranks_resume_its_two_rank_run(tmp_path, monkeypatch):
    """Through the process group: each rank takes its own file's shard and momentum."""
    run = tmp_path / "run"
    write_their_run(run)
    (run / "data").mkdir()
    write_rec(run / "data" / "train.rec", *pattern_images(CLASSES, PER_CLASS))
    monkeypatch.setenv(RUN_DIR_VARIABLE, str(run))
    got = run_ranks(_resume_worker, THEIR_WORLD)
    for rank in range(THEIR_WORLD):
        saved = torch.load(run / f"checkpoint_gpu_{rank}.pt")
        state = saved["state_optimizer"]["state"]
        assert got[rank]["step"] == SAVED_STEP
        assert torch.equal(got[rank]["weight"], saved["state_dict_softmax_fc"]["weight"])
        assert torch.equal(got[rank]["momentum"], state[max(state)]["momentum_buffer"])
        for key, value in saved["state_dict_backbone"].items():
            assert torch.equal(got[rank]["backbone"][key], value), key


def test_its_model_pt_starts_a_run(rec, tmp_path):
    backbone, _ = write_their_run(tmp_path / "run")
    trainer = trainer_for(our_cfg(rec, tmp_path / "new"))
    load_init_weights(trainer, str(tmp_path / "run" / "model.pt"), "ir_narrow")
    for name, value in backbone.state_dict().items():
        assert torch.equal(trainer.backbone.state_dict()[name], value), name


@pytest.mark.parametrize("case, overrides, match", [
    ("missing rank", {}, r"checkpoint_gpu_0\.pt: missing, while ranks up to 1"),
    ("other classes", {}, r"checkpoint_gpu_0\.pt: holds 3 class centres where rank 0 of 2 "
                          r"holds 4 of the set's 8 classes"),
    ("other network", {"network": "mobilefacenet"},
     r"checkpoint_gpu_0\.pt: its backbone does not fit network 'mobilefacenet'"),
    ("other optimiser", {"optimizer": "adamw"},
     r"checkpoint_gpu_0\.pt: its optimiser state is sgd's, this run's optimizer is adamw"),
    ("other schedule", {"epochs": EPOCHS + 1},
     r"checkpoint_gpu_0\.pt: its lr schedule spans 24 steps \(6 of warm-up\), this run's 30"),
    ("two runs", {}, r"checkpoint_gpu_1\.pt: saved at step 6, checkpoint_gpu_0\.pt at 12"),
])
def test_a_run_that_does_not_fit_is_refused_naming_the_file(rec, tmp_path, case, overrides,
                                                          match):
    run = tmp_path / "run"
    write_their_run(run)
    classes, total = CLASSES, TOTAL
    if case == "missing rank":
        (run / "checkpoint_gpu_0.pt").unlink()
    elif case == "other classes":
        classes = 8
    elif case == "two runs":
        state = torch.load(run / "checkpoint_gpu_1.pt")
        torch.save({**state, "global_step": STEPS_PER_EPOCH}, run / "checkpoint_gpu_1.pt")
    elif case == "other schedule":
        total = TOTAL + STEPS_PER_EPOCH
    cfg = our_cfg(rec, run, **overrides)
    trainer = train.build_trainer(cfg, classes, INFO, total_steps=total,
                                  steps_per_epoch=STEPS_PER_EPOCH)
    with pytest.raises((ResumeError, CheckpointFileError), match=match) as refused:
        resume_arcface_torch(trainer, cfg, classes, total, STEPS_PER_EPOCH)
    assert "\n" not in str(refused.value)


# gradient_acc 2 on 2 ranks of 4 images: its 24 // 8 = 3 micro-batches an epoch, our
# 24 // 16 = 1 optimiser step: its 4 epochs span 12 micro-batches (3 of warm-up), ours 4 (1)
ACC, ACC_BATCH = 2, 8  # our one process takes its global micro-batch of 2 x 4
ACC_PER_EPOCH = CLASSES * PER_CLASS // ACC_BATCH
ACC_STEPS_PER_EPOCH = CLASSES * PER_CLASS // (ACC_BATCH * ACC)


def acc_trainer(rec, run, epochs=EPOCHS):
    cfg = our_cfg(rec, run, batch_size=ACC_BATCH, gradient_acc=ACC, epochs=epochs)
    total = epochs * ACC_STEPS_PER_EPOCH
    trainer = train.build_trainer(cfg, CLASSES, INFO, total_steps=total,
                                  steps_per_epoch=ACC_STEPS_PER_EPOCH)
    return cfg, trainer, total


def test_its_run_with_gradient_acc_resumes_at_its_optimiser_step(rec, tmp_path):
    """Saved after epoch 2, global_step 6: it stepped at micro-batches 2, 4 and 6 (after
    the one where global_step % 2 == 0), so 3 optimiser steps; the lr of the next is ours,
    linear over 4 steps with 1 of warm-up; its momentum (of summed micro-batch gradients)
    becomes ours (of their mean): half of it."""
    _, ranks = write_their_run(tmp_path / "run", per_epoch=ACC_PER_EPOCH)
    cfg, trainer, total = acc_trainer(rec, tmp_path / "run")
    steps = SAVED_EPOCH * ACC_PER_EPOCH // ACC
    assert resume_arcface_torch(trainer, cfg, CLASSES, total, ACC_STEPS_PER_EPOCH).step == 3
    warmup = WARMUP_EPOCHS * ACC_STEPS_PER_EPOCH
    expected = LR * (1.0 - (steps - warmup) / (total - warmup))  # 0.05 x (1 - 2 / 3)
    for opt in (trainer.opt_backbone, trainer.opt_head):
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    head = ranks[0]["optimizer"]["state"]
    head_buffers = [r["optimizer"]["state"][max(head)]["momentum_buffer"] for r in ranks]
    assert torch.equal(trainer.opt_head.state[trainer.head.weight]["momentum_buffer"],
                       torch.cat(head_buffers) / ACC)


@pytest.mark.parametrize("case, epoch, epochs, match", [
    ("mid-window", 1, EPOCHS, r"checkpoint_gpu_0\.pt: saved after micro-batch 3, 1 into a "
                              r"gradient_acc window of 2"),
    ("other schedule", SAVED_EPOCH, EPOCHS + 1,
     r"checkpoint_gpu_0\.pt: its lr schedule spans 12 micro-batches \(3 of warm-up\), this "
     r"run's 5 optimiser steps \(1\)"),
])
def test_its_gradient_acc_run_that_does_not_fit_is_refused(rec, tmp_path, case, epoch,
                                                           epochs, match):
    """Saved after 1 epoch of 3 micro-batches: the third's gradient is not in the file.
    5 epochs here: its 12 micro-batches lie between 2 x 5 and 2 x 5 + 5 x (2 - 1) but are
    not 2 x 5 plus a whole number of micro-batches an epoch."""
    write_their_run(tmp_path / "run", per_epoch=ACC_PER_EPOCH, epoch=epoch)
    cfg, trainer, total = acc_trainer(rec, tmp_path / "run", epochs)
    with pytest.raises(ResumeError, match=match) as refused:
        resume_arcface_torch(trainer, cfg, CLASSES, total, ACC_STEPS_PER_EPOCH)
    assert "\n" not in str(refused.value)


def test_a_new_run_into_its_folder_is_refused_without_resume(rec, tmp_path):
    write_their_run(tmp_path / "run")
    with pytest.raises(OutputFolderError, match="checkpoint_gpu_0.pt"):
        train.train(our_cfg(rec, tmp_path / "run", max_steps=1))
