"""Margin heads against their formulas written out in float64, the criterion, and the sharded
head on 2 gloo processes against a single-process float64 computation."""

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_testlib import run_ranks

from arcface_loss import (
    AddMarginProduct,
    ArcFaceMargin,
    ArcMarginProduct,
    CombinedMarginProduct,
    CosFaceMargin,
    ShardedMarginSoftmax,
    build_head,
    clip_grad_norm_sharded,
    shard_range,
)

E, C = 8, 7


def _batch(seed=0, n=6):
    """Embeddings whose target cosines cover near +1, near -1 (theta + m > pi), and random."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, E, generator=g)
    labels = torch.randint(0, C, (n,), generator=g)
    x = torch.randn(n, E, generator=g)
    unit = F.normalize(weight, dim=1)
    x[0] = 3.0 * unit[labels[0]] + 0.05 * torch.randn(E, generator=g)  # cos ~ +1
    x[1] = -2.0 * unit[labels[1]] + 0.05 * torch.randn(E, generator=g)  # cos ~ -1
    x[2] = -unit[labels[2]] + 0.6 * torch.randn(E, generator=g)  # cos moderately negative
    return x, weight, labels


def _cos64(x, weight):
    x = x.double().numpy()
    w = weight.double().numpy()
    return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ \
        (w / np.linalg.norm(w, axis=1, keepdims=True)).T


def _expected(x, weight, labels, target_fn, s):
    """s * cos everywhere, s * target_fn(cos) at each row's label, in float64."""
    cos = _cos64(x, weight)
    out = s * cos
    for i, y in enumerate(labels.tolist()):
        out[i, y] = s * target_fn(cos[i, y])
    return out


def _arcface(m, easy=False):
    def target(c):
        theta = math.acos(c)
        if easy:
            return math.cos(theta + m) if c > 0 else c
        return math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)
    return target


def _check(head, x, labels, expected, autocast):
    if autocast:
        x = x.bfloat16()  # what a backbone under bf16 autocast would hand over
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x, labels)
    else:
        out = head(x, labels)
    assert out.dtype == torch.float32
    # the reference sees exactly the (possibly bf16-rounded) inputs the head saw
    np.testing.assert_allclose(out.detach().double().numpy(), expected, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_arcface_logits_match_formula(autocast):
    x, weight, labels = _batch()
    xin = x.bfloat16().float() if autocast else x
    cos = _cos64(xin, weight)
    assert cos[1, labels[1]] < -math.cos(0.5)  # the theta + m > pi branch is exercised
    for s, m in [(64.0, 0.5), (32.0, 0.3)]:
        head = ArcMarginProduct(E, C, s=s, m=m)
        head.weight.data.copy_(weight)
        _check(head, x, labels, _expected(xin, weight, labels, _arcface(m), s), autocast)


@pytest.mark.parametrize("autocast", [False, True])
def test_easy_margin_cosface_combined(autocast):
    x, weight, labels = _batch(1)
    xin = x.bfloat16().float() if autocast else x
    head = ArcMarginProduct(E, C, s=30.0, m=0.4, easy_margin=True)
    head.weight.data.copy_(weight)
    _check(head, x, labels, _expected(xin, weight, labels, _arcface(0.4, True), 30.0), autocast)

    head = AddMarginProduct(E, C, s=30.0, m=0.35)
    head.weight.data.copy_(weight)
    _check(head, x, labels, _expected(xin, weight, labels, lambda c: c - 0.35, 30.0), autocast)

    m1, m2, m3 = 0.9, 0.4, 0.15
    head = CombinedMarginProduct(E, C, s=30.0, m1=m1, m2=m2, m3=m3)
    head.weight.data.copy_(weight)
    expected = _expected(xin, weight, labels,
                         lambda c: math.cos(m1 * math.acos(c) + m2) - m3, 30.0)
    _check(head, x, labels, expected, autocast)


def test_margin_is_read_at_forward_time():
    x, weight, labels = _batch(2)
    head = build_head("arcface", E, C, s=16.0, m=0.5)
    head.weight.data.copy_(weight)
    head.margin.m = 0.0  # warm-up start: plain scaled cosine
    np.testing.assert_allclose(head.logits(x, labels).detach().double().numpy(),
                               16.0 * _cos64(x, weight), rtol=1e-5, atol=1e-4)
    head.margin.m, head.margin.s = 0.2, 8.0
    _check(head.logits, x, labels, _expected(x, weight, labels, _arcface(0.2), 8.0), False)
    with pytest.raises(ValueError, match="unknown head"):
        build_head("sphereface", E, C)


@pytest.mark.parametrize("name", ["arcface", "cosface", "combined"])
def test_gradients_finite_at_cos_plus_minus_one(name):
    weight = torch.randn(C, E)
    labels = torch.tensor([0, 1, 2, 3])
    x = torch.stack([weight[0], -weight[1], 2 * weight[2], -weight[3]]).requires_grad_()
    head = build_head(name, E, C, s=64.0, m=0.5)
    head.weight.data.copy_(weight)
    loss, _ = head(x, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_head_loss_is_cross_entropy_or_focal_of_its_logits():
    """The head's loss on one process: mean cross-entropy (or focal loss) of the margin
    logits, written out in float64."""
    x, weight, labels = _batch(3)
    for gamma in (0.0, 2.0):
        head = build_head("cosface", E, C, s=5.0, m=0.2, focal_gamma=gamma)
        head.weight.data.copy_(weight)
        z = _expected(x, weight, labels, lambda c: c - 0.2, 5.0)
        logp = z - z.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        target_logp = logp[np.arange(len(labels)), labels.numpy()]
        expected = ((1 - np.exp(target_logp)) ** gamma * -target_logp).mean()
        loss, accuracy = head(x, labels)
        np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
        cos = _cos64(x, weight)
        assert accuracy.item() == pytest.approx((cos.argmax(1) == labels.numpy()).mean())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x.bfloat16(), labels)[0].dtype == torch.float32
    assert head(x, labels, accuracy=False)[1] is None


def test_partial_fc_accuracy_counts_every_centre():
    """With Partial FC the logged accuracy still asks whether the row's own centre is the
    nearest of all centres, not only of the sampled ones."""
    x, weight, labels = _batch(5, n=3)
    head = build_head("arcface", E, C, s=8.0, m=0.3, sample_rate=0.01)
    head.weight.data.copy_(weight)
    torch.manual_seed(0)
    _, accuracy = head(x, labels)
    assert head.last_index is not None and len(head.last_index) < C  # it did sample
    expected = (_cos64(x, weight).argmax(1) == labels.numpy()).mean()
    assert accuracy.item() == pytest.approx(expected)


@pytest.mark.parametrize("classes, rate, present", [
    (10, 0.25, [4]),  # 2.5 centres: 2, not 3
    (7, 0.5, [0, 6]),  # 3.5: 3
    (10, 0.3, [0, 2, 5, 7, 9]),  # more positives than 3: the positives alone
    (10, 0.05, [1, 8]),  # 0.5: none sampled beyond the positives
    (10, 0.0, [3, 5, 6]),  # 0: the positives alone (arcface_torch's wf42m_pfc0008 configs)
])
def test_partial_fc_samples_as_many_centres_as_partial_fc_v2(classes, rate, present):
    """PartialFC_V2's num_sample = int(sample_rate * num_local); its sample() keeps the
    top num_sample of random scores with the positives above them, or the positives alone
    when they are more."""
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor(present * 2)
    head = build_head("arcface", E, classes, s=8.0, m=0.3, sample_rate=rate)
    head(torch.randn(len(labels), E, generator=g), labels)
    num_sample = int(rate * classes)
    expected = num_sample if num_sample - len(present) >= 0 else len(present)
    assert head.last_index is not None
    assert len(head.last_index) == expected
    assert set(present) <= set(head.last_index.tolist())


def test_shard_range_covers_classes():
    for num_classes, world in [(7, 2), (10, 3), (8, 4), (5, 5)]:
        ranges = [shard_range(num_classes, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
        assert all(a[1] == b[0] for a, b in pairwise(ranges))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1


# ----------------------------------------------------------------------------- sharded head

S, M = 32.0, 0.5
N_PER_RANK = 4
NUM_CLASSES = 11  # not divisible by the world size
WORLD = 2


def _sharded_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(NUM_CLASSES, E, generator=g)
    x = torch.randn(WORLD * N_PER_RANK, E, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (WORLD * N_PER_RANK,), generator=g)
    labels[0], labels[-1] = 0, NUM_CLASSES - 1  # targets on both shards
    x[1] = -weight[labels[1]]  # theta + m > pi on one row
    # two rows classified right; not at cos = 1 exactly, where float32 rounding of cos moves
    # theta by sqrt(eps) (d acos / d cos is infinite there) for any implementation
    x[0] = 2 * weight[labels[0]] + 0.3 * torch.randn(E, generator=g)
    x[-1] = weight[labels[-1]] + 0.3 * torch.randn(E, generator=g)
    return x, weight, labels


def _reference(x, weight, labels, margin_target, s, gamma=0.0, classes=None):
    """Single-process loss and gradients in float64 (autograd of the written-out loss),
    optionally over a subset of classes (Partial FC's sampled centres)."""
    x = x.double().clone().requires_grad_()
    w = weight.double().clone().requires_grad_()
    classes = torch.arange(NUM_CLASSES) if classes is None else classes
    cos = F.normalize(x) @ F.normalize(w[classes]).T
    cols = torch.searchsorted(classes, labels)
    assert torch.equal(classes[cols], labels)
    onehot = F.one_hot(cols, len(classes)).bool()
    logits = torch.where(onehot, margin_target(cos), cos) * s
    logp = F.log_softmax(logits, dim=1).gather(1, cols[:, None]).squeeze(1)
    loss = ((1 - logp.exp()) ** gamma * -logp).mean()
    loss.backward()
    return loss.item(), x.grad, w.grad


def _arc_target64(m):
    def target(c):
        with_margin = torch.cos(torch.acos(c.clamp(-1, 1)) + m)
        return torch.where(torch.acos(c.clamp(-1, 1)) + m <= math.pi, with_margin,
                           c - m * math.sin(m))
    return target


def _worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(100 + rank)  # Partial FC samples differently on each rank
        x, weight, labels = _sharded_data()
        mine = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        out = {}
        for case, margin, gamma, rate in [("arc", ArcFaceMargin(S, M), 0.0, 1.0),
                                          ("cos_focal", CosFaceMargin(S, 0.35), 2.0, 1.0),
                                          ("partial", ArcFaceMargin(S, M), 0.0, 0.5)]:
            head = ShardedMarginSoftmax(margin, E, NUM_CLASSES, sample_rate=rate,
                                        focal_gamma=gamma)
            head.weight.data.copy_(weight[head.start:head.end])
            xr = x[mine].clone().requires_grad_()
            loss, acc = head(xr, labels[mine])
            loss.backward()
            out[case] = dict(loss=loss.item(), acc=acc.item(), x_grad=xr.grad.clone(),
                             w_grad=head.weight.grad.clone(), start=head.start, end=head.end,
                             index=head.last_index)
            if case == "arc":  # global clipping: a replicated parameter plus the shards
                rep = torch.nn.Parameter(torch.zeros(3))
                rep.grad = torch.full((3,), 0.5)
                w_grad = head.weight.grad.clone()
                norm = clip_grad_norm_sharded([rep], [head.weight], max_norm=1e-3)
                out[case].update(norm=norm.item(), ratio=head.weight.grad / w_grad,
                                 rep_ratio=rep.grad / 0.5)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    return run_ranks(_worker, WORLD)


def _check_against_reference(results, case, ref):
    loss, x_grad, w_grad = ref
    for rank, res in enumerate(results):
        r = res[case]
        assert abs(r["loss"] - loss) < 1e-5, (case, rank, r["loss"], loss)
        mine = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        torch.testing.assert_close(r["x_grad"].double(), x_grad[mine], rtol=0, atol=1e-5)
        torch.testing.assert_close(r["w_grad"].double(), w_grad[r["start"]:r["end"]],
                                   rtol=0, atol=1e-5)


@pytest.mark.slow  # two spawned gloo processes
def test_sharded_arcface_equals_single_process(two_rank_results):
    x, weight, labels = _sharded_data()
    assert [(r["arc"]["start"], r["arc"]["end"]) for r in two_rank_results] == [(0, 6), (6, 11)]
    ref = _reference(x, weight, labels, _arc_target64(M), S)
    _check_against_reference(two_rank_results, "arc", ref)
    # batch accuracy: argmax of the plain cosine over all classes
    cos = _cos64(x, weight)
    expected_acc = (cos.argmax(1) == labels.numpy()).mean()
    assert expected_acc > 0
    assert all(abs(r["arc"]["acc"] - expected_acc) < 1e-6 for r in two_rank_results)


@pytest.mark.slow  # two spawned gloo processes
def test_sharded_focal_cosface_equals_single_process(two_rank_results):
    x, weight, labels = _sharded_data()
    ref = _reference(x, weight, labels, lambda c: c - 0.35, S, gamma=2.0)
    _check_against_reference(two_rank_results, "cos_focal", ref)


@pytest.mark.slow  # two spawned gloo processes
def test_partial_fc_keeps_positives_and_matches_sampled_softmax(two_rank_results):
    x, weight, labels = _sharded_data()
    sampled = []
    for res in two_rank_results:
        r = res["partial"]
        index = r["index"]
        assert index is not None  # sampling happened
        mine = labels[(labels >= r["start"]) & (labels < r["end"])] - r["start"]
        assert set(mine.tolist()) <= set(index.tolist())  # every positive kept
        # PartialFC_V2's int(0.5 * shard) rows, or all positives if more
        assert len(index) == max(int(0.5 * (r["end"] - r["start"])), len(set(mine.tolist())))
        unsampled = torch.ones(r["end"] - r["start"], dtype=torch.bool)
        unsampled[index] = False
        assert unsampled.any() and (r["w_grad"][unsampled] == 0).all()  # SGD-safe
        sampled.append(index + r["start"])
    classes = torch.cat(sampled)
    ref = _reference(x, weight, labels, _arc_target64(M), S, classes=classes)
    _check_against_reference(two_rank_results, "partial", ref)


@pytest.mark.slow  # two spawned gloo processes
def test_sharded_clip_uses_global_norm(two_rank_results):
    x, weight, labels = _sharded_data()
    _, _, w_grad = _reference(x, weight, labels, _arc_target64(M), S)
    expected = math.sqrt(3 * 0.5**2 + w_grad.pow(2).sum().item())
    for res in two_rank_results:
        assert abs(res["arc"]["norm"] - expected) < 1e-5 * expected
        # every gradient, sharded and replicated, scaled by the same max_norm / norm
        for ratio in (res["arc"]["ratio"], res["arc"]["rep_ratio"]):
            torch.testing.assert_close(ratio.double(), torch.full(ratio.shape, 1e-3 / expected,
                                       dtype=torch.float64), rtol=1e-4, atol=0)


def test_sharded_world_size_one_without_process_group():
    assert not dist.is_initialized()
    x, weight, labels = _sharded_data(4)
    head = ShardedMarginSoftmax(ArcFaceMargin(S, 0.0), E, NUM_CLASSES)
    head.margin.m = M  # ramped, read at forward time
    head.weight.data.copy_(weight)
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = head(xr, labels)
    assert loss.dtype == torch.float32
    loss.backward()
    ref_loss, ref_x, ref_w = _reference(x, weight, labels, _arc_target64(M), S)
    assert abs(loss.item() - ref_loss) < 1e-5
    torch.testing.assert_close(xr.grad.double(), ref_x, rtol=0, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), ref_w, rtol=0, atol=1e-5)


def test_cosine_matrix_matches_normalised_product_and_its_gradients():
    from arcface_loss import cosine_similarity_matrix

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(7, 8, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    g = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    # written out: cos_ij = <x_i, w_j> / (|x_i| |w_j|)
    expected = (x @ w.T) / (x.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :])
    got = cosine_similarity_matrix(x, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    gx, gw = torch.autograd.grad((got * g).sum(), (x, w))
    ex, ew = torch.autograd.grad((expected * g).sum(), (x, w))
    torch.testing.assert_close(gx, ex, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=0, atol=1e-12)


def test_cosine_matrix_gradients_with_a_zero_centre_and_frozen_centres():
    """A centre of norm 0 is clamped as F.normalize clamps it (the hand-written backward must
    drop the radial term there), and frozen centres get no gradient computed."""
    from arcface_loss import cosine_similarity_matrix

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    w[2] = 0.0
    w.requires_grad_()
    g = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    expected = F.linear(F.normalize(x, eps=1e-12), F.normalize(w, eps=1e-12))
    gx, gw = torch.autograd.grad((cosine_similarity_matrix(x, w) * g).sum(), (x, w))
    ex, ew = torch.autograd.grad((expected * g).sum(), (x, w))
    torch.testing.assert_close(gx, ex, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-12, atol=1e-12)
    (only_x,) = torch.autograd.grad((cosine_similarity_matrix(x, w.detach()) * g).sum(), (x,))
    torch.testing.assert_close(only_x, ex, rtol=1e-12, atol=1e-12)
