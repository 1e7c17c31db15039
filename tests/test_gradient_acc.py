"""Gradient accumulation (``gradient_acc`` k): one optimiser step over k micro-batches of B
equals one over a batch of kB (BatchNorm in eval mode, float64), on one process and with the
head sharded over 2 gloo ranks under DDP (which all-reduces once per step); Partial FC's
sampled centres accumulate as arcface_torch's do; an arcface_torch config's gradient_acc
gives its step (the sum of the micro-batches' gradients, clipped at 5); the schedule, the
epochs and the checkpoints count optimiser steps."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.distributed as dist
from distributed_testlib import run_ranks
from test_train import TINY, pattern_images, write_rec

import train
from config import ConfigError, make_config
from training.distributed import DistInfo
from training.train_checkpoints import ResumeError, check_resumable
from utils import load_checkpoint

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
NUM_CLASSES = 5
STEP_BATCH = 4  # images of one optimiser step per rank
EXACT = dict(rtol=0, atol=1e-12)  # float64: only the order of summation differs
WORLD = 2
# our clipping factor is computed from a float32 norm (arcface_loss.clip_grad_norm_sharded),
# torch's clip_grad_norm_ in the parameters' float64: they differ in float32's last digit
CLIP_IN_FLOAT32 = dict(rtol=1e-6, atol=1e-9)  # 1e-6 of an AdamW step of lr 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def float64_trainer(k: int, info: DistInfo = CPU, **overrides) -> train.Trainer:
    """A tiny trainer in float64 with the backbone's BatchNorm in eval mode (running
    statistics: a micro-batch then sees what the whole batch sees); momentum, weight decay
    and a warm-up. No clipping: a bound that acts would hide a gradient k times too large
    (the arcface_torch test below clips)."""
    cfg = make_config({**TINY, "batch_size": STEP_BATCH // k, "gradient_acc": k,
                       "weight_decay": 0.01, "grad_clip": 0.0, "warmup_epochs": 1.0,
                       **overrides})
    torch.set_default_dtype(torch.float64)
    try:
        trainer = train.build_trainer(cfg, NUM_CLASSES, info, total_steps=6, steps_per_epoch=3)
    finally:
        torch.set_default_dtype(torch.float32)
    trainer.backbone.eval()
    return trainer


def step_data(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(STEP_BATCH, 3, 112, 112, generator=g, dtype=torch.float64),
             torch.randint(0, NUM_CLASSES, (STEP_BATCH,), generator=g)) for _ in range(steps)]


def parameters(trainer: train.Trainer) -> dict[str, torch.Tensor]:
    out = {f"backbone.{k}": v.clone() for k, v in trainer.backbone.state_dict().items()}
    out.update({f"head.{k}": v.clone() for k, v in trainer.head.state_dict().items()})
    for name, opt in (("backbone", trainer.opt_backbone), ("head", trainer.opt_head)):
        for i, state in opt.state_dict()["state"].items():  # momenta, Adam's moments
            out.update({f"{name}.{key}.{i}": value.clone() for key, value in state.items()
                        if key != "step"})
    return out


def run_steps(trainer: train.Trainer, k: int, steps: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)  # the same flips (drawn for the whole step's batch) for every k
    for images, labels in step_data(steps):
        train.train_step(trainer, images, labels, micro_batches=k)
    return parameters(trainer)


def test_k_micro_batches_equal_one_batch_of_k_times_b():
    """Two steps (momentum, the schedule's warm-up): k = 2 and 4 give
    the parameters and momenta of k = 1, bar float64 rounding; the lr scales with the
    global batch (batch_size x k)."""
    whole_trainer = float64_trainer(1)
    start = parameters(whole_trainer)
    whole = run_steps(whole_trainer, 1)
    assert start["head.weight"].dtype == torch.float64
    named = [f"backbone.{n}" for n, p in whole_trainer.backbone.named_parameters()
             if p.requires_grad]
    assert all(not torch.equal(start[n], whole[n]) for n in [*named, "head.weight"])
    for k in (2, 4):
        torch.testing.assert_close(run_steps(float64_trainer(k), k), whole, **EXACT)


def test_a_batch_that_does_not_split_into_k_equal_micro_batches_is_refused():
    """4 images in 3 micro-batches: chunk() makes 2 slices of 2, each loss divided by 3, so
    the step would apply 2/3 of the batch's gradient (and DDP, waiting for slice 3, never
    sync); refused before anything changes."""
    assert [len(part) for part in torch.arange(STEP_BATCH).chunk(3)] == [2, 2]
    trainer = float64_trainer(1)
    before = parameters(trainer)
    (images, labels), = step_data(1)
    with pytest.raises(ValueError, match=f"{STEP_BATCH} images does not split into 3 "):
        train.train_step(trainer, images, labels, micro_batches=3)
    torch.testing.assert_close(parameters(trainer), before, rtol=0, atol=0)


def test_partial_fc_accumulates_each_micro_batch_sample():
    """sample_rate 0.6 (3 of the 5 centres, more than a micro-batch's 2 positives): each
    micro-batch draws its own centres (its positives always in); the step's head gradient
    is the mean of the micro-batches' gradients, as arcface_torch's PartialFC_V2 sums them
    into its weight's .grad, and one SGD step with momentum follows.
    The reference is written out here: per micro-batch a forward over the drawn rows and
    backward of loss / k, then clipping and SGD from torch."""
    k, rate = 2, 0.6
    trainer = float64_trainer(k, sample_rate=rate)
    backbone, head = copy.deepcopy(trainer.backbone), copy.deepcopy(trainer.head)
    lr = trainer.opt_backbone.param_groups[0]["lr"]
    (images, labels), = step_data(1, seed=3)
    torch.manual_seed(11)
    train.train_step(trainer, images, labels, micro_batches=k)

    torch.manual_seed(11)
    images = train.random_flip(images)
    sampled = []
    for part, part_labels in zip(images.chunk(k), labels.chunk(k), strict=True):
        loss, _ = head(backbone(part), part_labels)
        (loss / k).backward()
        sampled.append(set(head.last_index.tolist()))
        assert set(part_labels.tolist()) <= sampled[-1]
    assert sampled[0] != sampled[1]  # the micro-batches drew different centres
    touched = (head.weight.grad != 0).any(dim=1).nonzero().flatten().tolist()
    assert set(touched) == sampled[0] | sampled[1]
    for module in (backbone, head):
        torch.optim.SGD(train.param_groups([module], 0.01), lr=lr, momentum=0.9).step()
    ours = {**{f"b.{n}": v for n, v in trainer.backbone.state_dict().items()},
            **{f"h.{n}": v for n, v in trainer.head.state_dict().items()}}
    reference = {**{f"b.{n}": v for n, v in backbone.state_dict().items()},
                 **{f"h.{n}": v for n, v in head.state_dict().items()}}
    torch.testing.assert_close(ours, reference, **EXACT)


def _ddp_worker(rank, port, results):
    """Each rank: DDP backbone and its shard of the centres, a step with k = 1 (batch 4 per
    rank) and with k = 2 (2 x 2), counting DDP's gradient all-reduces."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(1)
        info = DistInfo(rank=rank, world_size=WORLD, local_rank=rank,
                        device=torch.device("cpu"))
        out = {}
        for k in (1, 2):
            trainer = float64_trainer(k, info)
            calls = []

            def counting_allreduce(state, bucket, calls=calls):
                calls.append(1)
                tensor = bucket.buffer().div_(WORLD)
                return dist.all_reduce(tensor, async_op=True).get_future().then(
                    lambda fut: fut.value()[0])

            trainer.model.register_comm_hook(None, counting_allreduce)
            torch.manual_seed(7)
            g = torch.Generator().manual_seed(1)  # each rank its slice of the global batch
            images = torch.randn(WORLD, STEP_BATCH, 3, 112, 112, generator=g,
                                 dtype=torch.float64)[rank]
            labels = torch.randint(0, NUM_CLASSES, (WORLD, STEP_BATCH), generator=g)[rank]
            train.train_step(trainer, images, labels, micro_batches=k)
            out[k] = (parameters(trainer), len(calls), trainer.head.start, trainer.head.end)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo processes
def test_two_ranks_sharded_head_k_micro_batches_equal_one_batch():
    results = run_ranks(_ddp_worker, WORLD)
    assert [r[1][2:] for r in results] == [(0, 3), (3, 5)]  # the centres are sharded
    for rank in results:
        whole, whole_calls = rank[1][:2]
        split, split_calls = rank[2][:2]
        torch.testing.assert_close(split, whole, **EXACT)
        assert whole_calls > 0 and split_calls == whole_calls  # no_sync: one all-reduce a step
    torch.testing.assert_close(
        {n: v for n, v in results[0][2][0].items() if n.startswith("backbone.")},
        {n: v for n, v in results[1][2][0].items() if n.startswith("backbone.")}, **EXACT)


# ----------------------------------------------------------------------------- arcface_torch


def test_arcface_torch_gradient_acc_is_its_step(tmp_path):
    """Its train_v2.py with gradient_acc 2: loss.backward() per micro-batch (no division),
    clip_grad_norm_(backbone, 5) and AdamW (lr 1e-3, wd 0.1 on every parameter) once per 2;
    SGD likewise. Ours from its config: the same parameters after two steps; with AdamW
    but for its eps, added to the root of the second moment of the sum of 2 gradients
    where ours adds it to their mean's: its step with eps 2 x 1e-8 is ours exactly."""
    adam_eps = 1e-8  # torch's default, arcface_torch's and ours
    for optimizer, lr, weight_decay in (("adamw", 1e-3, 0.1), ("sgd", 0.05, 5e-4)):
        path = tmp_path / f"{optimizer}.py"
        path.write_text(f"config.network = 'r18'\nconfig.gradient_acc = 2\n"
                        f"config.optimizer = {optimizer!r}\nconfig.lr = {lr}\n"
                        f"config.weight_decay = {weight_decay}\nconfig.momentum = 0.9\n")
        mapped = make_config(config_file=path)
        assert mapped.gradient_acc == 2
        overrides = {name: getattr(mapped, name) for name in (
            "gradient_acc", "optimizer", "lr", "weight_decay", "grad_clip", "clip_head",
            "decay_all", "scale_lr", "momentum", "scheduler", "warmup_epochs")}
        trainer = float64_trainer(2, **overrides, scale_s=64.0)
        backbone, head = copy.deepcopy(trainer.backbone), copy.deepcopy(trainer.head)
        params = [*backbone.parameters(), *head.parameters()]
        theirs = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                   eps=2 * adam_eps) \
            if optimizer == "adamw" else \
            torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        ours = run_steps(trainer, 2)
        torch.manual_seed(7)
        norms = []
        # its linear decay over the trainer's 6 steps, no warm-up: step 0 at the full lr
        for (images, labels), factor in zip(step_data(2), (1.0, 5 / 6), strict=True):
            for group in theirs.param_groups:
                group["lr"] = lr * factor
            for part, part_labels in zip(train.random_flip(images).chunk(2),
                                         labels.chunk(2), strict=True):
                loss, _ = head(backbone(part), part_labels)
                loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0).item())
            theirs.step()
            theirs.zero_grad()
        assert max(norms) > 5.0  # its clipping acted
        reference = {f"backbone.{n}": v for n, v in backbone.state_dict().items()}
        reference.update({f"head.{n}": v for n, v in head.state_dict().items()})
        torch.testing.assert_close({n: ours[n] for n in reference}, reference,
                                   **CLIP_IN_FLOAT32)


# ----------------------------------------------------------------------------- a run


def test_run_counts_optimiser_steps(tmp_path):
    """24 images, 2 micro-batches of 2 per step: 6 optimiser steps an epoch (not 12); the lr
    of each (linear warm-up over half an epoch, then linear decay) is the formula in
    optimiser steps; the checkpoint at the epoch's end."""
    rec = tmp_path / "tiny.rec"
    write_rec(rec, *pattern_images(6, 4))
    cfg = make_config({**TINY, "rec": str(rec), "output": str(tmp_path / "run"),
                       "batch_size": 2, "gradient_acc": 2, "epochs": 1, "save_every": 0,
                       "scheduler": "linear", "warmup_epochs": 0.5, "scale_lr": False})
    summary = train.train(cfg)
    total, warmup, lr = 6, 3, TINY["lr"]
    expected = [lr] + [lr * s / warmup if s <= warmup else lr * (1 - (s - warmup) /
                                                                  (total - warmup))
                       for s in range(1, total)]
    assert [h["step"] for h in summary["history"]] == list(range(1, total + 1))
    assert [h["lr"] for h in summary["history"]] == pytest.approx(expected, abs=1e-15)
    assert summary["steps"] == total and summary["epochs"] == 1
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (ckpt["step"], ckpt["epoch"]) == (total, 1)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["gradient_acc"], saved["batch_size"]) == (2, 2)


def test_gradient_acc_bounds_named():
    for value, rule in ((0, ">= 1"), (4096, "<= 1024")):
        with pytest.raises(ConfigError, match=rf"gradient_acc: must be {rule}"):
            make_config({"gradient_acc": value})
    with pytest.raises(ConfigError, match=r"--gradient-acc: must be >= 1"):
        train.parse_config(["--gradient-acc", "0"], parser=train.build_arg_parser())


def test_resume_compares_the_global_batch_with_its_micro_batches(tmp_path):
    """4 x 1 rank x 1 may resume as 2 x 1 x 2 (the same global batch, data order and step);
    2 x 1 x 1 and 4 x 1 x 2 may not; a checkpoint from before gradient_acc counts as 1."""
    saved = make_config({**TINY}).to_dict()
    del saved["gradient_acc"]
    ckpt = {"config": saved, "world_size": 1, "num_classes": NUM_CLASSES}
    path = tmp_path / "checkpoint.pt"
    allowed = check_resumable(ckpt, path, make_config({**TINY, "batch_size": 2,
                                                       "gradient_acc": 2}), NUM_CLASSES, None, 1)
    assert allowed == ["gradient_acc: 1 -> 2"]
    for batch, k, said in ((2, 1, "4 x 1 ranks -> 2 x 1 ("),
                           (4, 2, "4 x 1 ranks -> 4 x 1 x 2 micro-batches (")):
        cfg = make_config({**TINY, "batch_size": batch, "gradient_acc": k})
        with pytest.raises(ResumeError, match=re.escape(f"global batch: {said}")):
            check_resumable(ckpt, path, cfg, NUM_CLASSES, None, 1)
