"""train.py on the CPU with a tiny network: torchrun with 2 processes, exact resume after a
kill, NaN handling, label checks, a loss that goes down on synthetic identities, uint8 worker
batches normalised in the step, and the training-curves PNG.

The RecordIO files are written here by a small independent writer of the InsightFace /
dmlc layout (not recordio.py), so the trainer is checked against the format itself."""

from __future__ import annotations

import copy
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import recordio_testlib
import torch
import torch.nn.functional as F
from distributed_testlib import free_port

import data_gen
import train
from arcface_loss import build_margin, clip_grad_norm_sharded
from config import make_config
from data_gen import LabelRangeError, ResumableBatchSampler, check_labels
from evaluation.verification_plots import FIGURE_DPI
from train import lr_factor, param_groups
from training.distributed import DistInfo
from training.fast_loader import RingBufferLoader
from training.monitor import (
    FIGURE_SIZE,
    VERIFICATION_TITLE,
    CurvesWriter,
    plot_training_curves,
    training_curves_figure,
)
from training.train_checkpoints import (
    RESUME_MAY_CHANGE,
    RESUME_REFUSED,
    CheckpointFileError,
    OutputFolderError,
    ResumeError,
    all_finite,
    reshard_head_state,
    resume_training,
)
from training.trainer import (
    EXIT_BAD_INPUT,
    EXIT_NON_FINITE,
    FAULT_ENV,
    NonFiniteLossError,
    agree_on_overflow,
)
from utils import encode_image, load_checkpoint, run_cli

ROOT = Path(__file__).resolve().parent.parent
RECORD_MAGIC = 0xCED7230A
IMAGE_SIDE = 112
FACE_CROP = 150  # pixels of the 250x250 synthetic canvas kept around the head centre
FACE_SEED_BASE = 500
VAL_PAIRS = 40
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 10_000  # a 2 x 3 grid of drawn panels, not an empty canvas
LOSS_STEPS = 150  # 8 images a step: 50 epochs of the 24 images
TINY = dict(network="ir_narrow", embedding_size=32, batch_size=4, base_batch_size=4,
            lr=0.05, scale_s=16.0, margin_m=0.2, device="cpu", num_workers=0,
            channels_last=False, cpu_amp=False, log_every=1, seed=3)


# One thread: on this shared 2-core machine a second OpenMP thread, spinning while the
# other is descheduled, made the steps up to 10x slower. Subprocesses get the same setting,
# so the killed run and the in-process runs compute identically.
THREADS = 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- data


def write_rec(rec_path: Path, images: list[np.ndarray], labels: list[int]) -> None:
    """im2rec layout without a header record: one record per image, payload = IRHeader
    (flag=0, float label, id, id2) + JPEG bytes, 4-byte aligned, keys in a tab .idx."""
    lines = []
    with open(rec_path, "wb") as f:
        for key, (image, label) in enumerate(zip(images, labels, strict=True)):
            payload = struct.pack("<IfQQ", 0, float(label), key, 0) + encode_image(image)
            assert struct.pack("<I", RECORD_MAGIC) not in payload[::4]  # no record split
            lines.append(f"{key}\t{f.tell()}\n")
            f.write(struct.pack("<II", RECORD_MAGIC, len(payload)))
            f.write(payload + b"\0" * (-len(payload) % 4))
    rec_path.with_suffix(".idx").write_text("".join(lines))


def pattern_images(num_classes: int, per_class: int, seed: int = 0
                   ) -> tuple[list[np.ndarray], list[int]]:
    """Class-conditional images: a class colour and stripe frequency, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE]
    images, labels = [], []
    for c in range(num_classes):
        colour = rng.uniform(40, 215, size=3)
        stripes = np.sin(xx * (c + 1) * 0.08 + yy * 0.03 * c)[..., None]
        for _ in range(per_class):
            img = colour + 40 * stripes + rng.normal(0, 12, size=(IMAGE_SIDE, IMAGE_SIDE, 3))
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return images, labels


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory) -> Path:
    """6 identities x 4 images: 6 steps per epoch at batch 4."""
    rec = tmp_path_factory.mktemp("data") / "tiny.rec"
    write_rec(rec, *pattern_images(6, 4))
    return rec


def tiny_cfg(rec: Path, output: Path, **overrides):
    return make_config({**TINY, "rec": str(rec), "output": str(output), **overrides})


def cli_args(cfg) -> list[str]:
    """The command line that reproduces ``cfg``'s non-default fields."""
    args = []
    for key, value in {**TINY, "rec": cfg.rec, "output": cfg.output, "epochs": cfg.epochs,
                       "save_every": cfg.save_every, "max_steps": cfg.max_steps}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def weights(output: Path) -> dict[str, torch.Tensor]:
    """Backbone, head shard(s) and optimiser momenta of the run's latest checkpoint."""
    ckpt = load_checkpoint(output / "checkpoint.pt")
    out = {f"backbone.{k}": v for k, v in ckpt["backbone"].items()}
    for i, st in ckpt["optimizer"]["state"].items():
        out[f"momentum.{i}"] = st["momentum_buffer"]
    for rank in range(ckpt["world_size"]):
        shard = load_checkpoint(output / f"checkpoint_rank{rank}_step{ckpt['step']}.pt")
        out[f"head{rank}.weight"] = shard["head"]["weight"]
    return out


def run_script(args: list[str], env_extra: dict[str, str] | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def face_images(num_identities: int, per_identity: int) -> tuple[list[np.ndarray], list[int]]:
    """Synthetic identities (issue 2), centre-cropped around the head to 112x112."""
    import cv2

    from synthetic.synthetic_faces import make_identity, render_image
    from synthetic.synthetic_faces_assets import HEAD_CENTRE

    half = FACE_CROP // 2
    cx, cy = int(HEAD_CENTRE[0]), int(HEAD_CENTRE[1])
    images, labels = [], []
    for c in range(num_identities):
        identity = make_identity(FACE_SEED_BASE + c)
        rng = np.random.default_rng([FACE_SEED_BASE, c])
        for _ in range(per_identity):
            crop = render_image(identity, rng)[cy - half:cy + half, cx - half:cx + half]
            images.append(cv2.resize(crop, (IMAGE_SIDE, IMAGE_SIDE),
                                     interpolation=cv2.INTER_AREA))
            labels.append(c)
    return images, labels


def assert_png(path: Path) -> tuple[int, int]:
    """``path`` is a PNG of some substance; returns its (width, height) from the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    assert len(data) > MIN_PNG_BYTES, len(data)
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- helpers alone


def test_sampler_splits_global_batches_and_resumes_mid_epoch():
    n, batch, world = 23, 3, 2  # 3 global batches of 6; 5 samples dropped
    per_rank = []
    for rank in range(world):
        s = ResumableBatchSampler(n, batch, world, rank, seed=7)
        s.set_epoch(4)
        per_rank.append(list(s))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7 + 4)).tolist()
    for b in range(3):  # global batch b = perm[6b:6b+6], rank r holds its r-th third
        for rank in range(world):
            assert per_rank[rank][b * batch:(b + 1) * batch] == \
                order[b * 6 + rank * batch:b * 6 + (rank + 1) * batch]
    resumed = ResumableBatchSampler(n, batch, world, 1, seed=7)
    resumed.set_epoch(4, start_batch=2)
    assert list(resumed) == per_rank[1][2 * batch:] and len(resumed) == batch


def test_lr_schedule_and_weight_decay_groups():
    total, warm = 100, 10
    assert lr_factor(0, total, warm, "poly") == pytest.approx(1 / 10)
    assert lr_factor(9, total, warm, "poly") == pytest.approx(1.0)
    assert lr_factor(55, total, warm, "poly") == pytest.approx((1 - 45 / 90) ** 2)
    assert lr_factor(55, total, warm, "cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 45 / 90)))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.PReLU(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups([net], 5e-4)
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[2].weight),
                                                id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight),
                                                   id(net[1].bias), id(net[3].bias)}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0


def test_margin_ramp_drives_each_heads_margin():
    """margin_at against the ramp written out; set_ramped_margin changes the logits the
    head computes next (ArcFace's m, the combined margin's angular m2)."""
    assert train.margin_at(0, 100, 0.5, 0.2) == 0.0
    assert train.margin_at(10, 100, 0.5, 0.2) == pytest.approx(0.5 * 10 / 20)
    assert train.margin_at(60, 100, 0.5, 0.2) == 0.5 and train.margin_at(0, 100, 0.5, 0) == 0.5
    cos, labels = torch.tensor([[0.6, 0.1]]), torch.tensor([0])
    for head, field in (("arcface", "m"), ("combined", "m2")):
        margin = build_margin(head, s=2.0, m=0.5)
        train.set_ramped_margin(margin, 0.2)
        assert getattr(margin, field) == 0.2
        assert margin(cos, labels)[0, 0].item() == pytest.approx(
            2.0 * math.cos(math.acos(0.6) + 0.2), rel=1e-5)


def test_global_gradient_clipping_counts_every_shard():
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 4, 5))
    a.grad, b.grad, c.grad = torch.full((3,), 2.0), torch.full((4,), -1.0), torch.ones(5)
    # c is a head shard; a second rank holds a shard with the same squared norm (5)
    norm = clip_grad_norm_sharded([a, b], [c], max_norm=1.0, all_reduce_sum_=lambda t: 2 * t)
    expected = math.sqrt(3 * 4.0 + 4 * 1.0 + 2 * 5 * 1.0)
    assert norm.item() == pytest.approx(expected)
    scale = 1.0 / (expected + 1e-6)
    torch.testing.assert_close(a.grad, torch.full((3,), 2.0 * scale))
    torch.testing.assert_close(c.grad, torch.full((5,), scale))



HEAD_ONLY_CLIP = 0.01  # far below both gradients' norms: every clipping choice acts


def _clip_step(clip_head: bool) -> tuple[train.Trainer, dict[str, torch.Tensor], float]:
    """One SGD step of a tiny trainer, and the step written out as arcface_torch takes it:
    clip_grad_norm_ on the backbone's parameters only, then plain SGD on both modules.
    Returns the trainer, the reference's parameters and the reference head's grad norm."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = make_config({**TINY, "momentum": 0.0, "weight_decay": 0.0,
                       "grad_clip": HEAD_ONLY_CLIP, "clip_head": clip_head})
    trainer = train.build_trainer(cfg, 5, info, total_steps=10, steps_per_epoch=5)
    backbone, head = copy.deepcopy(trainer.backbone), copy.deepcopy(trainer.head)
    lr = trainer.opt_backbone.param_groups[0]["lr"]
    images = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 4])
    torch.manual_seed(5)  # the same flips in both
    train.train_step(trainer, images, labels)

    torch.manual_seed(5)
    loss, _ = head(backbone(train.random_flip(images)).float(), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(backbone.parameters(), HEAD_ONLY_CLIP)
    head_norm = torch.linalg.vector_norm(head.weight.grad).item()
    torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=lr).step()
    reference = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                 **{f"head.{k}": v for k, v in head.state_dict().items()}}
    return trainer, reference, head_norm


def test_clip_head_false_clips_the_backbone_only_as_arcface_torch():
    trainer, reference, head_norm = _clip_step(clip_head=False)
    ours = {**{f"backbone.{k}": v for k, v in trainer.backbone.state_dict().items()},
            **{f"head.{k}": v for k, v in trainer.head.state_dict().items()}}
    torch.testing.assert_close(ours, reference)
    # the head's gradient is far above the bound, so one global clip scales it down
    assert head_norm > 10 * HEAD_ONLY_CLIP
    global_clip, _, _ = _clip_step(clip_head=True)
    assert not torch.allclose(global_clip.head.weight, trainer.head.weight)


def test_non_finite_weights_are_found_in_any_module():
    """save_training_checkpoint refuses weights with one NaN or inf anywhere."""
    backbone, head = torch.nn.Linear(3, 2), torch.nn.Linear(2, 4)
    assert all_finite([backbone, head])
    for bad in (math.nan, math.inf):
        with torch.no_grad():
            head.bias[3] = bad
        assert not all_finite([backbone, head]) and all_finite([backbone])


def test_training_curves_plot_the_given_history(tmp_path):
    n = 7
    history = [{"step": 10 * (k + 1), "loss": 30.0 - 3 * k, "accuracy": 0.1 * k,
                "grad_norm": 1.0, "lr": 0.1 / (k + 1), "margin_m": min(0.5, 0.1 * k),
                "images_per_second": 100.0 + k} for k in range(n)]
    verification = [{"step": 30, "lfw": 0.61, "cfp_fp": 0.55},
                    {"step": 70, "lfw": 0.83, "cfp_fp": 0.72}]
    fig = training_curves_figure(history, verification)
    panels = {ax.get_title(): ax for ax in fig.axes}
    steps = [10.0 * (k + 1) for k in range(n)]
    for title, key in (("loss", "loss"), ("batch accuracy", "accuracy"),
                       ("learning rate", "lr"), ("margin m", "margin_m"),
                       ("throughput", "images_per_second")):
        (line,) = panels[title].get_lines()
        np.testing.assert_array_equal(line.get_xdata(), steps, err_msg=title)
        np.testing.assert_array_equal(line.get_ydata(), [h[key] for h in history],
                                      err_msg=title)
    lines = {line.get_label(): line for line in panels[VERIFICATION_TITLE].get_lines()}
    assert sorted(lines) == ["cfp_fp", "lfw"]
    np.testing.assert_array_equal(lines["lfw"].get_xdata(), [30, 70])
    np.testing.assert_array_equal(lines["cfp_fp"].get_ydata(), [0.55, 0.72])

    path = plot_training_curves(history, tmp_path / "curves.png", verification)
    assert assert_png(path) == (FIGURE_SIZE[0] * FIGURE_DPI, FIGURE_SIZE[1] * FIGURE_DPI)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind

    # the writer renders new logs, but not more often than asked unless forced
    writer = CurvesWriter(tmp_path / "w.png", min_interval=3600)
    assert writer.update(history[:3]) and assert_png(tmp_path / "w.png")
    assert not writer.update(history[:3], force=True)  # nothing new
    assert not writer.update(history)  # new rows, but too soon
    assert writer.update(history, verification, force=True)


@pytest.mark.slow
def test_uint8_worker_batches_normalise_to_the_float_values(tiny_rec, tmp_path):
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches, indices = {}, None
    # in-process; a worker through torch's DataLoader; a worker through the ring (the
    # ring_loader field)
    for workers, ring in ((0, False), (1, False), (1, True)):
        cfg = tiny_cfg(tiny_rec, tmp_path, num_workers=workers, ring_loader=ring)
        dataset, _ = train.build_dataset(cfg)
        sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed)
        indices = list(sampler)[:cfg.batch_size]
        loader = train.training_loader(dataset, sampler, cfg, info)
        assert isinstance(loader, RingBufferLoader) == ring
        images, labels = next(iter(loader))
        batches[workers, ring] = images.clone(), labels.clone()
        if ring:
            loader.close()
        del loader  # shuts the worker down
    (floats, labels0), (raw, labels1) = batches[0, False], batches[1, False]
    assert torch.equal(batches[1, True][0], raw) and torch.equal(batches[1, True][1], labels1)
    assert floats.dtype == torch.float32 and raw.dtype == torch.uint8  # workers send uint8
    assert raw.shape == (len(indices), IMAGE_SIDE, IMAGE_SIDE, 3)
    assert labels0.tolist() == labels1.tolist() == [int(dataset.labels[i]) for i in indices]
    # independent reference: the decoded RGB images, (x - 127.5) / 127.5 in float64
    x = np.stack([dataset.read(i)[0] for i in indices]).transpose(0, 3, 1, 2)
    reference = (x.astype(np.float64) - 127.5) / 127.5
    for channels_last in (False, True):
        a = train.prepare_batch(floats, info.device, channels_last)
        b = train.prepare_batch(raw, info.device, channels_last)
        assert b.dtype == torch.float32 and b.shape == a.shape == reference.shape
        assert torch.equal(a, b)  # the same float32 values whichever way they came
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt)
        np.testing.assert_allclose(b.double().numpy(), reference, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_torchrun_two_processes_trains_and_checkpoints(tiny_rec, tmp_path):
    cfg = tiny_cfg(tiny_rec, tmp_path / "ddp", max_steps=3, save_every=1)
    port = free_port()
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2",
                       f"--master_port={port}", "train.py", *cli_args(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(cfg.output)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and ckpt["num_classes"] == 6
    shards = [load_checkpoint(out / f"checkpoint_rank{r}_step3.pt") for r in range(2)]
    assert [s["rank"] for s in shards] == [0, 1]
    # classes split 3 + 3 across the ranks, each shard trained (moved from its init)
    assert [tuple(s["head"]["weight"].shape) for s in shards] == [(3, 32), (3, 32)]
    # checkpoint.prev.pt (step 2) keeps its head files; older ones are removed
    assert load_checkpoint(out / "checkpoint.prev.pt")["step"] == 2
    assert sorted(p.name for p in out.glob("checkpoint_rank*_step2.pt")) == \
        ["checkpoint_rank0_step2.pt", "checkpoint_rank1_step2.pt"]
    assert not list(out.glob("checkpoint_rank*_step1.pt"))  # superseded files removed
    import models

    net = models.load_backbone(out / "backbone.pt")
    emb = net(torch.zeros(2, 3, IMAGE_SIDE, IMAGE_SIDE))
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_rec, tmp_path):
    # 6 steps per epoch, 12 in all; checkpoints at 4, 6 (epoch end), 8, 12. The straight
    # run reads through a worker process (uint8 batches normalised in the step), the broken
    # one in-process (float32 batches): the weights must agree all the same.
    straight = tiny_cfg(tiny_rec, tmp_path / "straight", epochs=2, save_every=4,
                        num_workers=1)
    reference = train.train(straight)

    broken = tiny_cfg(tiny_rec, tmp_path / "broken", epochs=2, save_every=4)
    proc = run_script(["train.py", *cli_args(broken)], env_extra={FAULT_ENV: "kill@9"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # killed after step 9: the last checkpoint is step 8, mid-way through epoch 2
    assert load_checkpoint(tmp_path / "broken" / "checkpoint.pt")["step"] == 8

    summary = train.train(broken, resume=True)
    assert summary["steps"] == 12 and summary["steps_run"] == 4
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "broken")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    # the history logged before the kill came back from checkpoint.pt (steps 1-8), so the
    # resumed run's curves cover every step, with the straight run's values
    resumed = summary["history"]
    assert [h["step"] for h in resumed] == [h["step"] for h in reference["history"]] \
        == list(range(1, 13))
    for key in ("loss", "accuracy", "lr", "margin_m"):
        np.testing.assert_allclose([h[key] for h in resumed],
                                   [h[key] for h in reference["history"]], rtol=1e-5,
                                   err_msg=key)
    for run in ("straight", "broken"):
        assert_png(tmp_path / run / "training_curves.png")


@pytest.mark.parametrize("head, extra", [("adaface", dict(adaface_t_alpha=0.5)),
                                         ("curricularface", {}),
                                         ("elasticface-arc", dict(elastic_plus=True))])
def test_batch_margin_heads_resume_exactly(tiny_rec, tmp_path, head, extra):
    """A run stopped after step 2 and resumed gives the straight run's losses: the batch
    statistics travel as head buffers, ElasticFace's draws with the saved RNG."""
    cfg = dict(head=head, epochs=1, save_every=2, **extra)
    straight = train.train(tiny_cfg(tiny_rec, tmp_path / "straight", max_steps=4, **cfg))
    train.train(tiny_cfg(tiny_rec, tmp_path / "broken", max_steps=2, **cfg))
    resumed = train.train(tiny_cfg(tiny_rec, tmp_path / "broken", max_steps=4, **cfg),
                          resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    heads = [load_checkpoint(tmp_path / run / "checkpoint_rank0_step4.pt")["head"]
             for run in ("straight", "broken")]
    buffers = [k for k in heads[0] if k.startswith("margin.")]
    assert len(buffers) == {"elasticface-arc": 0, "adaface": 2}.get(head, 1)
    for key in buffers:
        assert heads[0][key].item() == heads[1][key].item() != 0.0


def test_head_shards_are_recut_for_another_world_size():
    """11 classes saved by 3 ranks (4, 4, 3 rows), re-cut for 1, 2 and 4 ranks: each new
    shard is its class range of the full matrix (ranges written out: C // W classes each,
    the first C % W ranks one more); per-centre optimiser rows follow, scalars are kept."""
    classes, width = 11, 5
    full = torch.arange(classes * width, dtype=torch.float64).reshape(classes, width)
    moment = -full
    old_ranges = [(0, 4), (4, 8), (8, 11)]
    read = []

    def load_rank(rank: int) -> dict:
        read.append(rank)
        lo, hi = old_ranges[rank]
        return {"head": {"weight": full[lo:hi].clone()},
                "optimizer": {"state": {0: {"exp_avg": moment[lo:hi].clone(),
                                            "step": torch.tensor(7.0)}},
                              "param_groups": [{"params": [0], "lr": 0.1}]},
                "scheduler": {"last_epoch": 7}, "rng": f"rank{rank}"}

    expected = {1: [(0, 11)], 2: [(0, 6), (6, 11)], 4: [(0, 3), (3, 6), (6, 9), (9, 11)]}
    for world, ranges in expected.items():
        for rank, (lo, hi) in enumerate(ranges):
            read.clear()
            got = reshard_head_state(load_rank, classes, 3, world, rank)
            assert torch.equal(got["head"]["weight"], full[lo:hi])
            state = got["optimizer"]["state"][0]
            assert torch.equal(state["exp_avg"], moment[lo:hi])
            assert state["step"].item() == 7.0 and got["scheduler"] == {"last_epoch": 7}
            assert got["optimizer"]["param_groups"] == [{"params": [0], "lr": 0.1}]
            # only the old shards that hold some of these classes were read
            assert read == [r for r, (a, b) in enumerate(old_ranges) if a < hi and lo < b]
            assert (got["rank"], got["world_size"]) == (rank, world)


@pytest.mark.slow
def test_two_rank_run_resumes_on_one_rank_with_the_same_global_batch(tiny_rec, tmp_path):
    """2 ranks x 2 images -> 1 rank x 4: the head is rebuilt whole from the two shards (with
    its momentum), training continues to the end, and the second rank's files go. A changed
    global batch or network is refused by name."""
    cfg = tiny_cfg(tiny_rec, tmp_path / "moved", max_steps=3, save_every=3)
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2",
                       f"--master_port={free_port()}", "train.py", *cli_args(cfg),
                       "--batch-size", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(cfg.output)
    shards = [load_checkpoint(out / f"checkpoint_rank{r}_step3.pt") for r in range(2)]

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = train.build_trainer(cfg, 6, info, total_steps=12, steps_per_epoch=6)
    step = resume_training(trainer, cfg, 6).step
    assert step == 3
    torch.testing.assert_close(trainer.head.weight.detach(),
                               torch.cat([s["head"]["weight"] for s in shards]), rtol=0, atol=0)
    momentum = trainer.opt_head.state[trainer.head.weight]["momentum_buffer"]
    torch.testing.assert_close(
        momentum, torch.cat([s["optimizer"]["state"][0]["momentum_buffer"] for s in shards]),
        rtol=0, atol=0)

    summary = train.train(tiny_cfg(tiny_rec, out, max_steps=9, save_every=3), resume=True)
    assert summary["steps"] == 9 and summary["steps_run"] == 6
    assert math.isfinite(summary["final_loss"])
    # the head files of checkpoint.pt (9) and checkpoint.prev.pt (6) stay; the second rank's
    # (step 3) went with the step-3 checkpoint
    assert sorted(p.name for p in out.glob("checkpoint_rank*.pt")) == \
        ["checkpoint_rank0_step6.pt", "checkpoint_rank0_step9.pt"]

    with pytest.raises(ResumeError, match=r"global batch: 4 x 1 ranks -> 2 x 1"):
        train.train(tiny_cfg(tiny_rec, out, max_steps=12, batch_size=2), resume=True)
    with pytest.raises(ResumeError, match=r"network: 'ir_narrow' -> 'ir18'"):
        train.train(tiny_cfg(tiny_rec, out, max_steps=12, network="ir18"), resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_rec, tmp_path, monkeypatch):
    reference = tiny_cfg(tiny_rec, tmp_path / "reference", epochs=2, save_every=3,
                         max_steps=6)
    train.train(reference)  # the same run, stopped cleanly at step 6

    cfg = tiny_cfg(tiny_rec, tmp_path / "nan", epochs=2, save_every=3)
    monkeypatch.setenv(FAULT_ENV, "nan@7")
    with pytest.raises(NonFiniteLossError) as err:
        train.train(cfg)
    message = str(err.value)
    assert "step 7" in message and str(tmp_path / "nan" / "checkpoint.pt") in message
    assert "(step 6)" in message
    assert load_checkpoint(tmp_path / "nan" / "checkpoint.pt")["step"] == 6
    good, kept = weights(tmp_path / "reference"), weights(tmp_path / "nan")
    for key in good:
        assert torch.isfinite(kept[key]).all(), key
        torch.testing.assert_close(kept[key], good[key], rtol=0, atol=0, msg=key)
    # and the command line reports it with its own exit status
    monkeypatch.setenv(FAULT_ENV, "nan@1")
    assert run_cli(train.main, cli_args(tiny_cfg(tiny_rec, tmp_path / "cli"))) == \
        EXIT_NON_FINITE


@pytest.mark.parametrize("log_every, save_every, stops_at", [(5, 3, 9), (5, 0, 10)])
def test_a_nan_between_reads_stops_at_the_next_read_and_saves_nothing_after_it(
        tiny_rec, tmp_path, monkeypatch, log_every, save_every, stops_at):
    """The loss is read only at logged steps and checkpoints (6 steps an epoch; the run
    resumed after step 6 reads at steps 7, 9, 10, 12 or 7, 10, 12). A NaN at step 8 stops it
    at the next read: a checkpoint (step 9, then not written) or a logged step (10). The
    error names step 8, not the step that read it; every checkpoint file is byte for byte
    what it was at step 6, whose weights are those of a run stopped cleanly there."""
    spaced = dict(epochs=2, log_every=log_every, save_every=save_every)
    train.train(tiny_cfg(tiny_rec, tmp_path / "reference", max_steps=6, **spaced))
    out = tmp_path / "nan"
    train.train(tiny_cfg(tiny_rec, out, max_steps=6, **spaced))

    def checkpoint_files() -> dict[str, bytes]:
        return {name: data for name, data in files_of(out).items() if name.endswith(".pt")}

    before = checkpoint_files()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6
    monkeypatch.setenv(FAULT_ENV, "nan@8")
    with pytest.raises(NonFiniteLossError) as err:
        train.train(tiny_cfg(tiny_rec, out, **spaced), resume=True)
    message = str(err.value)
    assert "at step 8, epoch 2;" in message and f"stopped at step {stops_at} " in message
    assert f"{out / 'checkpoint.pt'} (step 6)" in message
    assert checkpoint_files() == before  # nothing written after the NaN, nothing changed
    good, kept = weights(tmp_path / "reference"), weights(out)
    for key in good:
        torch.testing.assert_close(kept[key], good[key], rtol=0, atol=0, msg=key)


def test_fp16_overflow_anywhere_skips_every_update_on_every_rank():
    """GradScaler alone decides per optimiser on local gradients: an inf in this rank's
    head shard would still let the backbone step, and another rank's overflow would go
    unseen here. After agree_on_overflow neither optimiser steps and the scale backs off."""
    init_scale = 16.0

    def run(head_grad: float, other_ranks_overflowed: bool) -> tuple[bool, bool, float]:
        backbone, head = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
        opts = [torch.optim.SGD([p], lr=0.1, fused=True) for p in (backbone, head)]
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        scaler.scale(torch.ones(()))  # as scaling a loss does: creates the scale tensor
        backbone.grad = torch.full((3,), init_scale)  # gradients of the scaled loss
        head.grad = torch.full((2,), head_grad)
        for opt in opts:
            scaler.unscale_(opt)
        agree_on_overflow(scaler, opts,
                          lambda t: t + 1.0 if other_ranks_overflowed else t)  # fake all-reduce
        for opt in opts:
            scaler.step(opt)
        scaler.update()
        moved = [not torch.equal(p.detach(), torch.ones_like(p)) for p in (backbone, head)]
        return moved[0], moved[1], scaler.get_scale()

    backoff = init_scale * 0.5  # GradScaler's default backoff factor
    assert run(1.0, other_ranks_overflowed=False) == (True, True, init_scale)
    assert run(float("inf"), other_ranks_overflowed=False) == (False, False, backoff)
    assert run(1.0, other_ranks_overflowed=True) == (False, False, backoff)


def test_labels_outside_the_class_range_are_refused(tiny_rec, tmp_path, monkeypatch):
    with pytest.raises(LabelRangeError, match=r"bad\.rec.*sample 1 has label -1"):
        check_labels(np.array([0, -1, 2]), 3, "bad.rec")

    class OffByOne(data_gen.FaceRecordDataset):
        """A data source whose last label equals the class count (one past the end)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.labels = self.labels.copy()
            self.labels[-1] = self.num_classes

    monkeypatch.setattr(data_gen, "FaceRecordDataset", OffByOne)
    cfg = tiny_cfg(tiny_rec, tmp_path / "labels")
    expected = re.escape(str(tiny_rec)) + r": .*outside \[0, 6\).*sample 23 has label 6"
    with pytest.raises(LabelRangeError, match=expected):
        train.train(cfg)
    assert not (tmp_path / "labels" / "checkpoint.pt").exists()  # refused before step 1
    assert run_cli(train.main, cli_args(cfg)) == EXIT_BAD_INPUT


def write_bin(path: Path, images: list[np.ndarray], labels: list[int], pairs: int) -> None:
    """An InsightFace verification .bin: pickle of (JPEG bytes of both images of each pair
    in turn, is-same flags); pairs alternate same / different identity."""
    rng = np.random.default_rng(1)
    by_id = {c: [i for i, lab in enumerate(labels) if lab == c] for c in set(labels)}
    blobs, issame = [], []
    for k in range(pairs):
        a, b = rng.choice(sorted(by_id), size=2, replace=False)
        i, j = (rng.choice(by_id[a], size=2, replace=False) if k % 2 == 0
                else (rng.choice(by_id[a]), rng.choice(by_id[b])))
        blobs += [encode_image(images[i]), encode_image(images[j])]
        issame.append(k % 2 == 0)
    path.write_bytes(pickle.dumps((blobs, issame), protocol=2))


@pytest.mark.slow
def test_loss_goes_down_on_synthetic_identities(tmp_path, monkeypatch):
    num_ids, per_id = 6, 4
    rec = tmp_path / "faces.rec"
    images, labels = face_images(num_ids, per_id)
    write_rec(rec, images, labels)
    write_bin(tmp_path / "val.bin", images, labels, VAL_PAIRS)
    cfg = tiny_cfg(rec, tmp_path / "faces", batch_size=8, base_batch_size=8, lr=0.1,
                   epochs=LOSS_STEPS // (num_ids * per_id // 8), save_every=10_000,
                   log_every=10, margin_warmup=0.3, cpu_amp=True, channels_last=True,
                   val_bins=[str(tmp_path / "val.bin")], verify_every=LOSS_STEPS // 2)
    from training import monitor  # the module whose load_bin training calls

    loads = []
    real_load_bin = monitor.load_bin
    monkeypatch.setattr(monitor, "load_bin",
                        lambda *a, **k: loads.append(a) or real_load_bin(*a, **k))
    summary = train.train(cfg)
    # the periodic verification ran twice on the .bin (pairs of training identities here),
    # which was decoded once
    assert len(loads) == 1
    checks = summary["verification_history"]
    assert [c["step"] for c in checks] == [LOSS_STEPS // 2, LOSS_STEPS]
    assert 0.5 < summary["verification"]["val"] == checks[-1]["val"] <= 1.0
    history = summary["history"]
    assert [h["step"] for h in history] == [1, *range(10, LOSS_STEPS + 1, 10)]
    assert all(h["images_per_second"] > 0 for h in history)
    assert_png(tmp_path / "faces" / "training_curves.png")
    first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-3:]])
    assert summary["steps"] == LOSS_STEPS and last < 0.25 * first, history

    # Independently of the logged numbers: with the saved weights, every training image's
    # nearest class centre (cosine) is mostly its own identity; chance is 1/6.
    import models

    net = models.load_backbone(tmp_path / "faces" / "backbone.pt")
    centres = load_checkpoint(tmp_path / "faces" / "checkpoint_rank0_step"
                              f"{LOSS_STEPS}.pt")["head"]["weight"]
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        emb = net((x - 127.5) / 127.5)
    cos = F.normalize(emb) @ F.normalize(centres).T
    accuracy = (cos.argmax(1).numpy() == np.array(labels)).mean()
    assert accuracy >= 0.8, accuracy


def test_compile_mode_reaches_torch_compile_and_bad_modes_are_refused(monkeypatch):
    """The backbone is compiled with the configured mode; a misspelt mode fails at build
    time, before any data is read (not deep inside torch.compile on the first step)."""
    calls = []

    def fake_compile(model, mode=None):
        calls.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    overrides = {"network": "ir_narrow", "embedding_size": 16, "device": "cpu",
                 "compile": True, "compile_mode": "max-autotune"}
    trainer = train.build_trainer(make_config(overrides), 5, info, total_steps=10,
                             steps_per_epoch=5)
    assert calls == ["max-autotune"] and trainer.model is trainer.backbone
    with pytest.raises(ValueError, match="compile_mode 'max-autotun'"):
        train.build_trainer(make_config({**overrides, "compile_mode": "max-autotun"}), 5, info,
                            total_steps=10, steps_per_epoch=5)
    assert calls == ["max-autotune"]


# ----------------------------------------------------------------------------- issue 10


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (a run's state on disk)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_refused_resume_writes_nothing(tiny_rec, tmp_path):
    """config.json used to be rewritten before the resume was checked: a refused resume
    left the old run's backbone.pt beside a config naming another network."""
    out = tmp_path / "run"
    train.train(tiny_cfg(tiny_rec, out, max_steps=2, save_every=2))
    before = files_of(out)
    other_rec = tmp_path / "other.rec"
    write_rec(other_rec, *pattern_images(6, 4, seed=1))
    for change, named in (({"network": "ir18"}, "network: 'ir_narrow' -> 'ir18'"),
                          ({"rec": str(other_rec)}, "rec: "),
                          ({"epochs": 3}, "epochs: 20 -> 3"),
                          ({"batch_size": 2}, "global batch: 4 x 1 ranks -> 2 x 1 (the data "
                                              "order and the step depend on the global batch)")):
        rec = change.pop("rec", tiny_rec)
        with pytest.raises(ResumeError, match=re.escape(named)):
            train.train(tiny_cfg(rec, out, max_steps=4, **change), resume=True)
        assert files_of(out) == before, change
    # a data set that is not there is found before anything is written, too
    with pytest.raises(OSError):
        train.train(tiny_cfg(tmp_path / "missing.rec", out, max_steps=4), resume=True)
    assert files_of(out) == before


def test_an_output_folder_holding_a_run_is_refused_without_resume(tiny_rec, tmp_path,
                                                                  capsys):

    out = tmp_path / "run"
    train.train(tiny_cfg(tiny_rec, out, max_steps=1))
    before = files_of(out)
    with pytest.raises(OutputFolderError) as err:
        train.train(tiny_cfg(tiny_rec, out, max_steps=2))
    message = str(err.value)
    assert str(out) in message and "--resume" in message and "--output" in message \
        and "--overwrite" in message
    assert files_of(out) == before
    # --overwrite starts afresh: the old run's files and TensorBoard events are gone
    summary = train.train(tiny_cfg(tiny_rec, out, max_steps=2), overwrite=True)
    assert summary["steps"] == summary["steps_run"] == 2
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert not (out / "checkpoint.prev.pt").exists()  # one save in the new run
    # an --output that is a file: one line, nothing written
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    capsys.readouterr()  # what the runs above printed
    code = run_cli(train.main, cli_args(tiny_cfg(tiny_rec, a_file, max_steps=1)))
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err_lines == [f"error: --output {a_file}: is a file, not a folder"]
    assert a_file.read_text() == "x"


def test_resume_applies_a_changed_lr_and_names_a_refused_field(tiny_rec, tmp_path):
    # every Config field is decided one way or the other
    field_names = {f for f in make_config().to_dict()}
    assert RESUME_MAY_CHANGE | set(RESUME_REFUSED) == field_names
    assert not RESUME_MAY_CHANGE & set(RESUME_REFUSED)

    out = tmp_path / "run"
    train.train(tiny_cfg(tiny_rec, out, epochs=2, max_steps=3, save_every=3))
    new_lr, total = 0.2, 12  # 2 epochs of 6 steps; global batch 4 = base batch 4
    cfg = tiny_cfg(tiny_rec, out, epochs=2, max_steps=5, save_every=5, lr=new_lr,
                   momentum=0.5, weight_decay=1e-3)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = train.build_trainer(cfg, 6, info, total_steps=total, steps_per_epoch=6)
    assert resume_training(trainer, cfg, 6, 24).step == 3
    for opt in (trainer.opt_backbone, trainer.opt_head):  # weight decay in the first group only
        for k, group in enumerate(opt.param_groups):
            assert group["lr"] == pytest.approx(new_lr * lr_factor(3, total, 0, "poly"))
            assert group["momentum"] == 0.5
            assert group["weight_decay"] == (1e-3 if k == 0 else 0.0)
        assert opt.state  # the momentum buffers came back from the checkpoint
    summary = train.train(cfg, resume=True)
    lrs = {h["step"]: h["lr"] for h in summary["history"]}
    for step in (4, 5):  # the lr used by step k is the schedule's at k - 1
        assert lrs[step] == pytest.approx(new_lr * lr_factor(step - 1, total, 0, "poly"))
    assert lrs[3] == pytest.approx(TINY["lr"] * lr_factor(2, total, 0, "poly"))
    with pytest.raises(ResumeError, match=r"head: 'arcface' -> 'cosface'"):
        train.train(tiny_cfg(tiny_rec, out, epochs=2, max_steps=6, head="cosface"),
                    resume=True)


def test_orphan_temporaries_are_removed_on_the_next_start(tiny_rec, tmp_path):
    out = tmp_path / "run"
    train.train(tiny_cfg(tiny_rec, out, max_steps=1))
    orphans = [".checkpoint.pt.k2j3h4.tmp", ".backbone.pt.a8b7c6.tmp",
               ".checkpoint_rank0_step1.pt.x1y2z3.tmp", ".config.json.qq11ww.tmp"]
    unrelated = [".notes.txt.abc.tmp", "notes.txt"]
    for name in orphans + unrelated:
        (out / name).write_bytes(b"partial")
    train.train(tiny_cfg(tiny_rec, out, max_steps=2), resume=True)
    assert not [name for name in orphans if (out / name).exists()]
    assert all((out / name).exists() for name in unrelated)


@pytest.mark.slow  # three short training runs
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tiny_rec, tmp_path):
    """Checkpoints at steps 2 and 4; checkpoint.pt (then step 4's head file) truncated: the
    run resumes from step 2 and ends with the weights of an uninterrupted run."""
    straight = tiny_cfg(tiny_rec, tmp_path / "straight", max_steps=6, save_every=2)
    train.train(straight)
    for damaged in ("checkpoint.pt", "checkpoint_rank0_step4.pt"):
        out = tmp_path / damaged
        train.train(tiny_cfg(tiny_rec, out, max_steps=4, save_every=2))
        assert load_checkpoint(out / "checkpoint.prev.pt")["step"] == 2
        data = (out / damaged).read_bytes()
        (out / damaged).write_bytes(data[:len(data) // 2])
        summary = train.train(tiny_cfg(tiny_rec, out, max_steps=6, save_every=2),
                              resume=True)
        assert summary["steps"] == 6 and summary["steps_run"] == 4, damaged
        a, b = weights(tmp_path / "straight"), weights(out)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)

    # nothing usable: one line naming both files
    out = tmp_path / "checkpoint.pt"
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(ResumeError) as err:
        train.train(tiny_cfg(tiny_rec, out, max_steps=8, save_every=2), resume=True)
    message = str(err.value)
    assert "\n" not in message
    assert str(out / "checkpoint.pt") in message and "checkpoint.prev.pt" in message


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tiny_rec, tmp_path,
                                                               monkeypatch):
    import errno

    out = tmp_path / "run"
    train.train(tiny_cfg(tiny_rec, out, max_steps=2, save_every=2))
    good = files_of(out)["checkpoint.pt"]
    real_save = torch.save
    room = 4096  # bytes the disk takes before it is full

    class FullDisk:
        """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "backbone" in obj:  # checkpoint.pt
            f = FullDisk(f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(OSError) as err:
        train.train(tiny_cfg(tiny_rec, out, max_steps=4, save_every=2), resume=True)
    message = str(err.value)
    assert "no space left on device" in message and str(out / "checkpoint.pt") in message
    assert f"{out / 'checkpoint.pt'} (step 2)" in message  # the checkpoint that was kept
    assert files_of(out)["checkpoint.pt"] == good
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert not list(out.glob(".*.tmp"))


def test_a_full_disk_at_backbone_pt_names_the_checkpoint_on_disk(tiny_rec, tmp_path,
                                                                  monkeypatch):
    """backbone.pt cannot be written at step 4's checkpoint: the error's "last good
    checkpoint" is the step checkpoint.pt really holds, and backbone.pt holds that
    checkpoint's backbone (checkpoint.pt, the commit record, is written last)."""
    import errno

    out = tmp_path / "run"
    train.train(tiny_cfg(tiny_rec, out, max_steps=2, save_every=2))
    real_save = torch.save

    def backbone_pt_on_a_full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and not {"backbone", "head", "step"} & set(obj):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", backbone_pt_on_a_full_disk)
    with pytest.raises(OSError) as err:
        train.train(tiny_cfg(tiny_rec, out, max_steps=4, save_every=2), resume=True)
    monkeypatch.undo()
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert f"{out / 'checkpoint.pt'} (step {ckpt['step']})" in str(err.value)
    backbone = load_checkpoint(out / "backbone.pt")
    assert backbone.keys() == ckpt["backbone"].keys()
    for key, value in backbone.items():
        assert torch.equal(value, ckpt["backbone"][key]), key


def test_zero_intervals_mean_off(tiny_rec, tmp_path):
    summary = train.train(tiny_cfg(tiny_rec, tmp_path / "run", max_steps=3, save_every=0,
                                   log_every=0, verify_every=0))
    assert summary["steps"] == 3
    assert [h["step"] for h in summary["history"]] == [1, 3]  # the first and the last
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3  # the end only
    assert not (tmp_path / "run" / "checkpoint.prev.pt").exists()


@pytest.mark.slow
def test_bad_setups_fail_in_one_line_before_writing_anything(tiny_rec, tmp_path, capsys):
    empty = tmp_path / "empty.rec"
    empty.write_bytes(b"")
    empty.with_suffix(".idx").write_text("")
    bad_file = tmp_path / "bad.json"
    bad_file.write_text('{"momentum": "big"}')
    out = tmp_path / "out"
    base = ["--device", "cpu", "--num-workers", "0", "--output", str(out)]
    # the command itself, twice (what the user sees: one line, no traceback)
    for args, named in (
            (["--rec", str(tiny_rec), "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
            (["--rec", str(tiny_rec), "--config", str(bad_file)],
             f"{bad_file}: momentum: must be a number, got 'big'")):
        proc = run_script(["train.py", *base, *args], timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: {named}"], proc.stderr
        assert not out.exists(), args
    # the same path in-process (run_cli, as train.py's __main__), for the data sets
    for args, named in ((["--rec", str(tmp_path / "missing.rec")], "missing.rec"),
                        (["--rec", str(empty)], f"{empty}: "),
                        (["--rec", str(tiny_rec), "--batch-size", "25"],
                         "24 images, fewer than one global batch of 25")):
        capsys.readouterr()
        assert run_cli(train.main, [*base, *args]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error: ") and named in lines[-1], lines
        assert "Traceback" not in "".join(lines)
        assert not out.exists(), args


def test_one_image_per_micro_batch_is_refused_before_writing(tiny_rec, tmp_path, capsys):
    """BatchNorm cannot normalise one image in training mode (torch refuses the forward
    pass), so --batch-size 1 (with or without micro-batches) fails in one line naming it,
    before the output folder is made, instead of in a traceback at the first step."""
    import models

    with pytest.raises(ValueError, match="more than 1 value per channel"):
        models.build_model("ir_narrow", 32).train()(torch.zeros(1, 3, IMAGE_SIDE, IMAGE_SIDE))
    out = tmp_path / "out"
    for acc in ("1", "4"):
        capsys.readouterr()
        assert run_cli(train.main, ["--rec", str(tiny_rec), "--network", "ir_narrow",
                                    "--embedding-size", "32", "--device", "cpu",
                                    "--num-workers", "0", "--output", str(out),
                                    "--batch-size", "1", "--gradient-acc", acc]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error: batch_size: 1 image per device"), lines
        assert not out.exists()


@pytest.mark.parametrize("case", ["lst", "big label", "not images"])
def test_a_rec_that_is_no_set_of_faces_is_refused_before_the_output_is_made(tmp_path, capsys,
                                                                             case):
    """A .lst as --rec, a label of 16,000,000 among 6 identities (a classifier of 16 million
    rows), payloads that are text: one line naming the file, before --output exists."""
    rec, named = recordio_testlib.odd_record_sets(tmp_path / "sets")[case]
    out = tmp_path / "run"
    assert run_cli(train.main, cli_args(tiny_cfg(rec, out))) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {named}"), lines
    assert not out.exists()


def test_an_unknown_or_absent_device_is_named():
    from training.distributed import init_distributed
    from utils import DeviceError

    with pytest.raises(DeviceError, match=r"--device bogus: not a device"):
        init_distributed("bogus")
    with pytest.raises(DeviceError, match=r"--device cuda:999: "):
        init_distributed("cuda:999")  # no CUDA here, or no GPU of that index


def test_a_bad_init_checkpoint_or_val_bin_is_found_before_writing(tiny_rec, tmp_path):
    out = tmp_path / "run"
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(CheckpointFileError, match=re.escape(str(damaged))):
        train.train(tiny_cfg(tiny_rec, out, max_steps=1), init_checkpoint=str(damaged))
    with pytest.raises(OSError, match="missing.bin"):
        train.train(tiny_cfg(tiny_rec, out, max_steps=1, verify_every=1,
                             val_bins=[str(tmp_path / "missing.bin")]))
    assert not out.exists()
    # weights of another network: named, with the network they do not fit
    other = tmp_path / "other"
    train.train(tiny_cfg(tiny_rec, other, max_steps=1, embedding_size=16))
    with pytest.raises(CheckpointFileError,
                       match=re.escape(str(other / "backbone.pt")) + ".*'ir_narrow'"):
        train.train(tiny_cfg(tiny_rec, out, max_steps=1),
                    init_checkpoint=str(other / "backbone.pt"))
    assert not out.exists()


# ----------------------------------------------------------------------------- other layouts

HEAD_FILE_2 = "checkpoint_rank0_step2.pt"  # the head file of the latest checkpoint below
# A resume reads checkpoints of another layout (an older or edited run): each case is
# (file changed, how its dict changes, the field the one-line error must name).
OTHER_LAYOUTS = {
    "checkpoint without its step": ("checkpoint.pt",
                                    lambda s: {k: v for k, v in s.items() if k != "step"},
                                    "'step' is missing"),
    "config not a dict": ("checkpoint.pt", lambda s: {**s, "config": ["ir_narrow"]},
                          "'config' is a list, not a dict"),
    "config without batch_size": (
        "checkpoint.pt",
        lambda s: {**s, "config": {k: v for k, v in s["config"].items() if k != "batch_size"}},
        "'config.batch_size' is missing"),
    "step not a number": ("checkpoint.pt", lambda s: {**s, "step": "two"},
                          "'step' is a str, not an int"),
    "backbone of another layout": (
        "checkpoint.pt",
        lambda s: {**s, "backbone": {"encoder." + k: v for k, v in s["backbone"].items()}},
        "'backbone' does not fit"),
    "optimizer without param groups": (
        "checkpoint.pt", lambda s: {**s, "optimizer": {"state": s["optimizer"]["state"]}},
        "'optimizer.param_groups' is missing"),
    "logs not a dict": ("checkpoint.pt", lambda s: {**s, "logs": [1.0, 2.0]},
                        "'logs' is a list, not a dict"),
    "head file without its RNG state": (
        HEAD_FILE_2, lambda s: {k: v for k, v in s.items() if k != "rng"}, "'rng' is missing"),
    "head file without centres": (HEAD_FILE_2, lambda s: {**s, "head": {}},
                                  "'head.weight' is missing"),
    # not another layout, but as unusable: a NaN weight is refused where the file is read
    "a NaN weight": ("checkpoint.pt", lambda s: {**s, "backbone": _with_nan(s["backbone"])},
                     "not finite: tensor 'backbone.conv1.weight' holds 1 NaN/inf value"),
}


def _with_nan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in state.items()}
    out["conv1.weight"].view(-1)[0] = math.nan
    return out


@pytest.fixture(scope="module")
def two_checkpoints(tiny_rec, tmp_path_factory) -> Path:
    """A run with checkpoints at steps 1 (checkpoint.prev.pt) and 2 (checkpoint.pt)."""
    out = tmp_path_factory.mktemp("two") / "run"
    train.train(tiny_cfg(tiny_rec, out, max_steps=2, save_every=1))
    return out


@pytest.mark.parametrize("case", list(OTHER_LAYOUTS))
def test_a_checkpoint_of_another_layout_falls_back_or_is_named_in_one_line(
        case, tiny_rec, two_checkpoints, tmp_path, monkeypatch):
    """These were KeyError / AttributeError / RuntimeError tracebacks, never a fallback."""
    import shutil

    from training import train_checkpoints

    name, change, named = OTHER_LAYOUTS[case]
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    torch.save(change(load_checkpoint(out / name)), out / name)
    cfg = tiny_cfg(tiny_rec, out, max_steps=4, save_every=1)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    warnings: list[str] = []
    monkeypatch.setattr(train_checkpoints.LOG, "warning",
                        lambda fmt, *args: warnings.append(fmt % args))
    trainer = train.build_trainer(cfg, 6, info, total_steps=24, steps_per_epoch=6)
    resumed = resume_training(trainer, cfg, 6, 24)
    assert resumed.step == 1, case  # from checkpoint.prev.pt
    assert isinstance(resumed.logs, dict)
    assert len(warnings) == 1 and str(out / name) in warnings[0] and named in warnings[0], \
        warnings
    prev = load_checkpoint(out / "checkpoint.prev.pt")["backbone"]
    for key, value in trainer.backbone.state_dict().items():
        torch.testing.assert_close(value, prev[key], rtol=0, atol=0, msg=key)
    # with no previous checkpoint: one line naming the file and the field
    (out / "checkpoint.prev.pt").unlink()
    with pytest.raises(ResumeError) as err:
        resume_training(train.build_trainer(cfg, 6, info, total_steps=24, steps_per_epoch=6),
                        cfg, 6, 24)
    message = str(err.value)
    assert "\n" not in message and str(out / name) in message and named in message, message


def test_init_weights_with_a_nan_are_refused_before_writing(tiny_rec, two_checkpoints,
                                                            tmp_path):
    """--init-checkpoint used to start a run from a NaN weight (the first loss then NaN)."""
    path = tmp_path / "backbone.pt"
    torch.save(_with_nan(load_checkpoint(two_checkpoints / "backbone.pt")), path)
    out = tmp_path / "run"
    with pytest.raises(CheckpointFileError) as err:
        train.train(tiny_cfg(tiny_rec, out, max_steps=1), init_checkpoint=str(path))
    assert str(err.value).startswith(f"{path}: not finite: tensor 'conv1.weight' holds 1 "
                                     "NaN/inf value of its"), err.value
    assert not out.exists()


def test_resume_refuses_a_repacked_set_whose_identities_were_renamed(tmp_path):
    """Re-packing after renaming an identity folder shifts every label (identities are
    numbered in sorted order) while the set keeps its size: --resume went on without a
    word, training each class centre on another person's images."""
    import pre_process

    images, labels = pattern_images(3, 4)
    src = tmp_path / "aligned"
    names = ["amy", "bob", "cat"]
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = src / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k}.jpg").write_bytes(encode_image(image))
    rec = tmp_path / "set" / "train.rec"
    pre_process.pack_folder(src, rec, progress=False)
    out = tmp_path / "run"
    train.train(tiny_cfg(rec, out, max_steps=1, save_every=1))
    before = files_of(out)
    (src / "amy").rename(src / "zoe")  # now bob=0, cat=1, zoe=2: same size, same counts
    pre_process.pack_folder(src, rec, progress=False)
    with pytest.raises(ResumeError, match="identit") as err:
        train.train(tiny_cfg(rec, out, max_steps=2), resume=True)
    assert str(out / "checkpoint.pt") in str(err.value)
    assert files_of(out) == before
    # the identities as they were: the resume goes on
    (src / "zoe").rename(src / "amy")
    pre_process.pack_folder(src, rec, progress=False)
    assert train.train(tiny_cfg(rec, out, max_steps=2), resume=True)["steps"] == 2


def test_identity_list_without_names_still_compares_images_per_label():
    """InsightFace's own sets keep no names: the images per label are compared then; a
    checkpoint that predates the record is not refused."""
    from training.train_checkpoints import identity_differences, identity_list

    labels = np.repeat([0, 1, 2], 4)
    saved = identity_list(None, labels, 3)
    assert identity_differences(saved, identity_list(None, labels.copy(), 3)) == []
    moved = labels.copy()
    moved[4] = 0  # one image of identity 1 now labelled 0: 5, 3, 4
    assert "images per identity" in identity_differences(saved, identity_list(None, moved, 3))[0]
    named = identity_list(["a", "b", "c"], labels, 3)
    assert identity_differences(saved, named) == []  # names known on one side only
    assert "identity names" in identity_differences(
        named, identity_list(["a", "b", "d"], labels, 3))[0]
    assert identity_differences(None, named) == []  # an older checkpoint
