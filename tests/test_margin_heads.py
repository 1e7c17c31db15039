"""AdaFace, CurricularFace, MagFace and ElasticFace against their formulas written out in
float64 here: logits and loss, batch statistics carried over two steps, a state-dict resume,
the numerical traps, and 1 process against 2 gloo ranks with sharded centres (Partial FC on)."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_testlib import run_ranks

from arcface_loss import build_head, magface_lambda_bound

E, C, N = 6, 9, 8
S = 16.0


def _batch(seed, n=N, classes=C):
    """Unnormalised embeddings with norms spread over 5..60 (AdaFace's and MagFace's range),
    one row near its own centre and one near the opposite of it."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, E, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = F.normalize(torch.randn(n, E, generator=g, dtype=torch.float64))
    unit = F.normalize(weight)
    x[0] = F.normalize(unit[labels[0]] + 0.05 * x[0], dim=0)
    x[1] = F.normalize(-unit[labels[1]] + 0.05 * x[1], dim=0)
    norms = torch.linspace(5.0, 60.0, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    return x * norms[:, None], weight, labels


def _cos(x, weight):
    x, w = x.numpy(), weight.numpy()
    return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ \
        (w / np.linalg.norm(w, axis=1, keepdims=True)).T


def _ce(z, labels):
    z = np.asarray(z)
    top = z.max(1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(1)) + top[:, 0]
    return float((lse - z[np.arange(len(labels)), labels]).mean())


def _arc(c, m):
    theta = math.acos(min(1.0, max(-1.0, c)))
    return math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)


def _adaface_ref(x, weight, labels, mu, sigma, m, h):
    eps = 1e-3
    cos = np.clip(_cos(x, weight), -1 + eps, 1 - eps)
    out = S * cos
    for i, y in enumerate(labels.tolist()):
        n = min(100.0, max(1e-3, float(x[i].norm())))
        g = min(1.0, max(-1.0, h * (n - mu) / (sigma + eps)))
        theta = min(math.pi - eps, max(eps, math.acos(cos[i, y]) - m * g))
        out[i, y] = S * (math.cos(theta) - (m + m * g))
    return out


def _curricular_ref(x, weight, labels, t, m):
    cos = np.clip(_cos(x, weight), -1, 1)
    out = S * cos
    for i, y in enumerate(labels.tolist()):
        threshold = math.cos(math.acos(cos[i, y]) + m)
        for j in range(cos.shape[1]):
            if j != y and cos[i, j] > threshold:
                out[i, j] = S * cos[i, j] * (t + cos[i, j])
        out[i, y] = S * _arc(cos[i, y], m)
    return out


def _per_row_ref(x, weight, labels, margins, kind):
    cos = _cos(x, weight)
    out = S * cos
    for i, y in enumerate(labels.tolist()):
        out[i, y] = S * (_arc(cos[i, y], margins[i]) if kind == "arc" else cos[i, y] - margins[i])
    return out


MAG = dict(l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0)


def _magface_ref(x, weight, labels):
    a = np.clip(np.linalg.norm(x.numpy(), axis=1), MAG["l_a"], MAG["u_a"])
    margins = (MAG["u_m"] - MAG["l_m"]) / (MAG["u_a"] - MAG["l_a"]) * (a - MAG["l_a"]) + MAG["l_m"]
    z = _per_row_ref(x, weight, labels, margins, "arc")
    reg = MAG["lambda_g"] * float(np.mean(a / MAG["u_a"] ** 2 + 1 / a))
    return z, reg


def _head(name, classes=C, **kw):
    head = build_head(name, E, classes, s=S, **kw).double()
    return head


def test_adaface_two_steps_statistics_before_use_and_resume():
    m, h, alpha = 0.4, 0.333, 0.3
    head = _head("adaface", m=m, h=h, t_alpha=alpha)
    mu, sigma = 20.0, 100.0
    for step in range(2):
        x, weight, labels = _batch(step)
        head.weight.data.copy_(weight)
        norms = np.clip(np.linalg.norm(x.numpy(), axis=1), 1e-3, 100)
        mu = alpha * norms.mean() + (1 - alpha) * mu  # updated before use
        sigma = alpha * norms.std(ddof=1) + (1 - alpha) * sigma
        loss, _ = head(x, labels)
        z = _adaface_ref(x, weight, labels, mu, sigma, m, h)
        assert loss.item() == pytest.approx(_ce(z, labels.numpy()), rel=1e-10)
        assert head.margin.mu.item() == pytest.approx(mu, rel=1e-12)
        assert head.margin.sigma.item() == pytest.approx(sigma, rel=1e-12)
        # logits(): the statistics as they stand, not updated
        np.testing.assert_allclose(head.logits(x, labels).detach().numpy(), z, rtol=1e-10,
                                   atol=1e-10)
        assert head.margin.mu.item() == pytest.approx(mu, rel=1e-12)
    _check_resume(head, "adaface", dict(m=m, h=h, t_alpha=alpha), ("margin.mu", "margin.sigma"))


def test_adaface_one_sample_batch_keeps_sigma_and_gradients_finite():
    head = _head("adaface")
    x, weight, labels = _batch(3)
    head.weight.data.copy_(weight)
    xr = x[:1].clone().requires_grad_()
    loss, _ = head(xr, labels[:1])
    loss.backward()
    assert head.margin.sigma.item() == 100.0  # no std of one sample: skipped, not NaN
    assert head.margin.mu.item() == pytest.approx(0.01 * float(x[0].norm()) + 0.99 * 20.0)
    assert torch.isfinite(loss) and torch.isfinite(xr.grad).all()


def test_curricularface_two_steps_and_resume():
    m = 0.5
    head = _head("curricularface", m=m)
    t = 0.0
    for step in range(2):
        x, weight, labels = _batch(10 + step)
        head.weight.data.copy_(weight)
        cos = np.clip(_cos(x, weight), -1, 1)
        t = 0.01 * cos[np.arange(N), labels.numpy()].mean() + 0.99 * t
        loss, _ = head(x, labels)
        z = _curricular_ref(x, weight, labels, t, m)
        assert (np.abs(z - S * cos) > 1e-9).sum() > N  # hard negatives were modulated
        assert loss.item() == pytest.approx(_ce(z, labels.numpy()), rel=1e-10)
        assert head.margin.t.item() == pytest.approx(t, rel=1e-12)
        np.testing.assert_allclose(head.logits(x, labels).detach().numpy(), z, rtol=1e-10,
                                   atol=1e-10)
    _check_resume(head, "curricularface", dict(m=m), ("margin.t",))


def _check_resume(head, name, kw, buffers):
    """A fresh head loading the state dict continues exactly as the original."""
    state = head.state_dict()
    assert set(buffers) <= set(state)
    fresh = _head(name, **kw)
    fresh.load_state_dict(state)
    x, weight, labels = _batch(99)
    losses = [h(x, labels)[0].item() for h in (head, fresh)]
    assert losses[0] == losses[1]
    for key in buffers:
        assert head.state_dict()[key].item() == fresh.state_dict()[key].item()


def test_magface_loss_gradients_and_lambda_warning():
    head = _head("magface", **MAG)
    x, weight, labels = _batch(20)
    x[2] *= 3.0  # one norm above u_a: clipped
    head.weight.data.copy_(weight)
    xr = x.clone().requires_grad_()
    loss, _ = head(xr, labels)
    loss.backward()
    z, reg = _magface_ref(x, weight, labels)
    assert reg > 0.1
    assert loss.item() == pytest.approx(_ce(z, labels.numpy()) + reg, rel=1e-10)
    # the gradient against central differences of the float64 formula
    for i, j in [(0, 0), (3, 2), (5, 4)]:
        step = 1e-6
        up, down = x.clone(), x.clone()
        up[i, j] += step
        down[i, j] -= step
        numeric = sum(sign * (_ce(zz, labels.numpy()) + rr) for sign, (zz, rr) in
                      ((1, _magface_ref(up, weight, labels)),
                       (-1, _magface_ref(down, weight, labels)))) / (2 * step)
        assert xr.grad[i, j].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert magface_lambda_bound(64.0, 10.0, 110.0, 0.45, 0.8) == pytest.approx(22.59, abs=0.01)
    with pytest.warns(UserWarning, match="lambda_g=20 is below 22.6"):
        build_head("magface", E, C, s=64.0, lambda_g=20.0)


def test_elasticface_draws_from_the_rng_plus_order_and_resume():
    for name, kind, m in [("elasticface-arc", "arc", 0.5), ("elasticface-cos", "cos", 0.35)]:
        for plus in (False, True):
            head = _head(name, m=m, sigma=0.3, plus=plus)
            x, weight, labels = _batch(30)
            head.weight.data.copy_(weight)
            torch.manual_seed(5)
            state = torch.get_rng_state()
            loss, _ = head(x, labels)
            torch.manual_seed(5)
            drawn = torch.normal(m, 0.3, (N,)).double().clamp(min=0.0)
            margins = head.margin.last_margins
            assert sorted(margins.tolist()) == sorted(drawn.tolist())
            if plus:  # the row nearest its centre gets the smallest margin, and so on
                target = _cos(x, weight)[np.arange(N), labels.numpy()]
                assert margins[np.argsort(-target)].tolist() == sorted(drawn.tolist())
            else:
                assert margins.tolist() == drawn.tolist()
            z = _per_row_ref(x, weight, labels, margins.tolist(), kind)
            assert loss.item() == pytest.approx(_ce(z, labels.numpy()), rel=1e-10)
            torch.set_rng_state(state)  # a resume restores the RNG: the same margins
            assert head(x, labels)[0].item() == loss.item()
            np.testing.assert_allclose(head.logits(x, labels).detach().numpy(),
                                       _per_row_ref(x, weight, labels, [m] * N, kind),
                                       rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["adaface", "curricularface", "magface", "elasticface-arc",
                                  "elasticface-cos"])
def test_gradients_finite_at_cos_plus_minus_one(name):
    weight = torch.randn(C, E)
    labels = torch.tensor([0, 1, 2, 3])
    x = 20 * torch.stack([weight[0], -weight[1], 2 * weight[2], -weight[3]])
    x.requires_grad_()
    head = build_head(name, E, C, s=64.0, sigma=0.3) if name.startswith("elastic") \
        else build_head(name, E, C, s=64.0)
    head.weight.data.copy_(weight)
    loss, _ = head(x, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_options_refused_by_name():
    cases = [(dict(name="adaface", q=1.0), "unknown option 'q' for head adaface"),
             (dict(name="adaface", h=2.0), "adaface option h must be in"),
             (dict(name="adaface", t_alpha=0.0), "t_alpha must be in"),
             (dict(name="arcface", h=0.3), "unknown option 'h' for head arcface"),
             (dict(name="magface", l_a=120.0), "magface option l_a must be below u_a"),
             (dict(name="magface", lambda_g=-1.0), "lambda_g must be"),
             (dict(name="elasticface-cos", sigma=-0.1), "sigma must be"),
             (dict(name="curricularface", sigma=0.1), "unknown option 'sigma'")]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            build_head(kw.pop("name"), E, C, **kw)
    assert build_head("adaface", E, C).margin.m == 0.4  # the paper's m by default
    assert build_head("elasticface-cos", E, C).margin.m == 0.35


# ------------------------------------------------------------------- 1 process vs 2 ranks

WORLD, PER_RANK, SHARDED_C = 2, 4, 11
CASES = [("adaface", dict(t_alpha=0.3), 1.0), ("adaface", dict(t_alpha=0.3), 0.5),
         ("curricularface", {}, 1.0), ("curricularface", {}, 0.5),
         ("magface", MAG, 1.0), ("elasticface-arc", dict(plus=True, sigma=0.2), 1.0)]


def _run_steps(head, batches, rows, seed):
    """Two training steps; (losses, buffers, embedding gradients, sampled classes)."""
    torch.manual_seed(seed)
    out = dict(loss=[], grad=[], index=[])
    for x, labels in batches:
        xr = x[rows].clone().requires_grad_()
        loss, _ = head(xr, labels[rows])
        loss.backward()
        out["loss"].append(loss.item())
        out["grad"].append(xr.grad.clone())
        out["index"].append(None if head.last_index is None else head.last_index + head.start)
    out["buffers"] = {k: v.clone() for k, v in head.state_dict().items() if k != "weight"}
    return out


def _sharded_batches():
    batches, weight = [], None
    for step in range(2):
        x, w, labels = _batch(40 + step, n=WORLD * PER_RANK, classes=SHARDED_C)
        labels[0], labels[-1] = 0, SHARDED_C - 1  # targets on both shards
        batches.append((x, labels))
        weight = w if weight is None else weight
    return batches, weight


def _sharded_worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        batches, weight = _sharded_batches()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        out = []
        for name, kw, rate in CASES:
            head = build_head(name, E, SHARDED_C, s=S, sample_rate=rate, **kw).double()
            head.weight.data.copy_(weight[head.start:head.end])
            # rank 0 draws ElasticFace's margins, as the single process with the same seed
            out.append(_run_steps(head, batches, rows, seed=7 if rank == 0 else 100 + rank))
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_sharded_worker, WORLD)


@pytest.mark.slow  # two spawned gloo processes
@pytest.mark.parametrize("case", range(len(CASES)))
def test_two_ranks_equal_one_process(two_ranks, case):
    name, kw, rate = CASES[case]
    batches, weight = _sharded_batches()
    single = build_head(name, E, SHARDED_C, s=S, **kw).double()
    single.weight.data.copy_(weight)
    one = _run_steps(single, batches, slice(None), seed=7)
    for rank, res in enumerate(two_ranks):
        got = res[case]
        for key, value in one["buffers"].items():  # the global batch's statistics
            assert got["buffers"][key].item() == pytest.approx(value.item(), rel=1e-12), key
        if rate == 1.0:
            assert got["loss"] == pytest.approx(one["loss"], rel=1e-12)
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            for g_ranks, g_one in zip(got["grad"], one["grad"], strict=True):
                torch.testing.assert_close(g_ranks, g_one[rows], rtol=1e-9, atol=1e-12)
    if rate < 1.0:  # Partial FC: the loss over the classes both ranks sampled, in float64
        mu, sigma, t = 20.0, 100.0, 0.0
        for step, (x, labels) in enumerate(batches):
            classes = torch.cat([res[case]["index"][step] for res in two_ranks])
            assert len(classes) < SHARDED_C
            cols = torch.searchsorted(classes, labels).numpy()
            cos = np.clip(_cos(x, weight), -1, 1)
            if name == "adaface":
                norms = np.clip(np.linalg.norm(x.numpy(), axis=1), 1e-3, 100)
                mu = 0.3 * norms.mean() + 0.7 * mu
                sigma = 0.3 * norms.std(ddof=1) + 0.7 * sigma
                z = _adaface_ref(x, weight, labels, mu, sigma, 0.4, 0.333)
            else:
                t = 0.01 * cos[np.arange(len(labels)), labels.numpy()].mean() + 0.99 * t
                z = _curricular_ref(x, weight, labels, t, 0.5)
            expected = _ce(z[:, classes.numpy()], cols)
            for res in two_ranks:
                assert res[case]["loss"][step] == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------- config and training loop

def test_config_presets_options_and_refusals():
    import config

    for key, head in [("adaface", "adaface"), ("curricularface", "curricularface"),
                      ("magface", "magface"), ("elasticface_arc", "elasticface-arc"),
                      ("elasticface_cos", "elasticface-cos")]:
        cfg = config.make_config(preset=f"ms1mv2_r100_{key}")
        assert (cfg.head, cfg.network, cfg.scale_s) == (head, "ir100", 64.0)
        margin = build_head(cfg.head, E, C, s=cfg.scale_s, m=cfg.margin_m,
                            **config.head_options(cfg)).margin
        assert margin.m == {"adaface": 0.4, "magface": 0.8, "elasticface_cos": 0.35}.get(key, 0.5)
    cfg = config.make_config(preset="ms1mv2_r100_adaface")
    assert config.head_options(cfg) == {"h": 0.333, "t_alpha": 0.01}
    assert config.head_options(config.make_config({"head": "magface"}))["lambda_g"] == 35.0
    for overrides, field in [({"head": "adaface", "adaface_t_alpha": 0.0}, "adaface_t_alpha"),
                             ({"head": "magface", "magface_l_a": 200.0}, "magface_l_a"),
                             ({"head": "elasticface-cos", "elastic_sigma": -1.0}, "elastic_sigma"),
                             ({"head": "elasticface-cos", "margin_m": 1.0}, "margin_m"),
                             ({"head": "adaface", "margin_m": 1.6}, "margin_m")]:
        with pytest.raises(config.ConfigError) as info:
            config.make_config(overrides)
        assert info.value.field == field, overrides
    # another head's options are not checked: they are not used
    assert config.make_config({"head": "arcface", "adaface_t_alpha": 0.0}).head == "arcface"


def test_margin_ramp_drives_each_new_heads_margin():
    import train

    for name in ("adaface", "curricularface", "elasticface-arc", "elasticface-cos"):
        head = build_head(name, E, C)
        train.set_ramped_margin(head.margin, 0.1, 0.5)
        assert head.margin.m == 0.1
    head = _head("magface", **MAG)
    train.set_ramped_margin(head.margin, 0.25, 0.5)  # half way: every m(a) halved
    x, weight, labels = _batch(50)
    head.weight.data.copy_(weight)
    a = np.clip(np.linalg.norm(x.numpy(), axis=1), MAG["l_a"], MAG["u_a"])
    margins = 0.5 * ((MAG["u_m"] - MAG["l_m"]) / (MAG["u_a"] - MAG["l_a"]) * (a - MAG["l_a"])
                     + MAG["l_m"])
    np.testing.assert_allclose(head.logits(x, labels).detach().numpy(),
                               _per_row_ref(x, weight, labels, margins, "arc"), rtol=1e-10,
                               atol=1e-10)


def test_margin_product_takes_a_batch_margin():
    from arcface_loss import AdaFaceMargin, MarginProduct

    x, weight, labels = _batch(60)
    product = MarginProduct(E, C, AdaFaceMargin(S, 0.4, 0.333, 0.5)).double()
    product.weight.data.copy_(weight)
    norms = np.clip(np.linalg.norm(x.numpy(), axis=1), 1e-3, 100)
    mu, sigma = 0.5 * norms.mean() + 10.0, 0.5 * norms.std(ddof=1) + 50.0
    np.testing.assert_allclose(product(x, labels).detach().numpy(),
                               _adaface_ref(x, weight, labels, mu, sigma, 0.4, 0.333),
                               rtol=1e-10, atol=1e-10)
