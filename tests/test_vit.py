"""The face ViTs against arcface_torch's: a reference written out here with its module names
and layout (backbones/vit.py, get_model's widths, depths, drop-path rates and mask ratios)
loads strictly into ours and gives the same embeddings, in eval and, seeded, in training."""

import json

import pytest
import torch
from torch import nn

import models
from models import build_model, count_parameters, load_backbone, model_flops

# get_model's arguments: embed_dim, depth, drop_path_rate, mask_ratio, using_checkpoint
ARCFACE_VITS = {
    "vit_t": (256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0, False),
    "vit_s": (512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0, False),
    "vit_b": (512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05, True),
    "vit_h": (1024, 48, 0.1, 0.0, True),
}
# its model zoo's "GFLOPs", which are multiply-accumulates (ours count 2 FLOPs each)
ZOO_GMACS = {"vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4, "vit_l_dp005_mask_005": 25.3}
TOKENS, PATCH, HEADS = 144, 9, 8


class RefDropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        mask = x.new_empty((x.shape[0], 1, 1)).bernoulli_(1 - self.p)
        return x * (mask / (1 - self.p))


class RefMlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.ReLU6(), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, d // HEADS).unbind(2)  # b t h c
        scores = torch.einsum("bqhc,bkhc->bhqk", q, k) / (d // HEADS) ** 0.5
        out = torch.einsum("bhqk,bkhc->bqhc", scores.softmax(-1), v)
        return self.proj(out.reshape(b, t, d))


class RefBlock(nn.Module):
    def __init__(self, d, dp):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = RefAttention(d), RefMlp(d)
        self.drop_path = RefDropPath(dp) if dp > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RefPatchEmbed(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Conv2d(3, d, PATCH, PATCH)


class RefViT(nn.Module):
    """arcface_torch's VisionTransformer (norm_layer "ln", img 112, patch 9, qkv_bias False)."""

    def __init__(self, d, depth, dpr, mask_ratio, e=512):
        super().__init__()
        self.patch_embed = RefPatchEmbed(d)
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS, d) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        rates = [dpr * i / (depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(RefBlock(d, r) for r in rates)
        self.norm = nn.LayerNorm(d)
        self.feature = nn.Sequential(
            nn.Linear(TOKENS * d, d, bias=False), nn.BatchNorm1d(d, eps=2e-5),
            nn.Linear(d, e, bias=False), nn.BatchNorm1d(e, eps=2e-5))
        self.mask_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.mask_ratio = mask_ratio

    def forward(self, x):
        b = x.shape[0]
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:  # its random_masking(x), called with its default ratio 0.1
            keep = int(TOKENS * (1 - 0.1))
            perm = torch.rand(b, TOKENS).argsort(1)
            x = x[torch.arange(b)[:, None], perm[:, :keep]]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if masking:
            full = self.mask_token.expand(b, TOKENS, -1).clone()
            full[torch.arange(b)[:, None], perm[:, :keep]] = x
            x = full
        return self.feature(x.reshape(b, -1))


def _randomise(model):
    """Every parameter and BN statistic random, so nothing passes by being 0 or 1."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) * 0.2 + 0.9 if t.ndim == 1 else t.normal_(0, 0.05))


@pytest.mark.parametrize("name", sorted(ARCFACE_VITS))
def test_state_dict_keys_and_shapes_match_arcface_torch(name):
    d, depth, dpr, mask, _ = ARCFACE_VITS[name]
    with torch.device("meta"):
        ours, ref = build_model(name, 512), RefViT(d, depth, dpr, mask)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert count_parameters(ours) == count_parameters(ref)
    assert ours.checkpointing == ARCFACE_VITS[name][4]


def test_arcface_weights_load_strictly_and_embed_the_same():
    torch.manual_seed(0)
    ref = RefViT(256, 12, 0.1, 0.1, e=64).double()
    _randomise(ref)
    ours = build_model("vit_t", 64).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-9, atol=1e-9)


def test_training_forward_matches_arcface_torch_seeded():
    # masking, stochastic depth and batch statistics, drawn in arcface_torch's order
    torch.manual_seed(1)
    ref = RefViT(32, 3, 0.5, 0.05, e=16).double()
    _randomise(ref)
    ours = models.VisionTransformer(32, 3, 0.5, 0.05, embedding_size=16).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 3, 112, 112, dtype=torch.float64)
    torch.manual_seed(7)
    want = ref.train()(x)
    torch.manual_seed(7)
    got = ours.train()(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_masking_only_in_training():
    torch.manual_seed(0)
    masked = models.VisionTransformer(32, 2, 0.0, 0.05, embedding_size=8)
    plain = models.VisionTransformer(32, 2, 0.0, 0.0, embedding_size=8)
    assert masked.masked_fraction == 0.1  # arcface_torch masks 10% for any ratio > 0
    seen = []
    masked.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    x = torch.randn(3, 3, 112, 112)

    def two_draws(model):
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        return a, model(x)

    with torch.no_grad():
        a, b = two_draws(masked.train())
        assert not torch.allclose(a, b) and seen == [int(TOKENS * 0.9)] * 2
        a, b = two_draws(masked.eval())
        assert torch.equal(a, b) and seen[-1] == TOKENS
        a, b = two_draws(plain.train())
        assert torch.equal(a, b)


def test_gradient_checkpointing_changes_nothing():
    torch.manual_seed(0)
    plain = models.VisionTransformer(32, 2, 0.3, 0.1, embedding_size=8).double()
    ckpt = models.VisionTransformer(32, 2, 0.3, 0.1, checkpointing=True, embedding_size=8)
    ckpt = ckpt.double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 112, 112, dtype=torch.float64)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        model.train()(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for g1, g2 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g2)


def test_vit_t_forward_backward_and_autocast(monkeypatch):
    torch.manual_seed(0)
    model = build_model("vit_t", 32).train()
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 32)
    out.square().mean().backward()
    assert model.mask_token.grad is not None and model.pos_embed.grad.abs().sum() > 0
    softmax, score_types = torch.softmax, []

    def recording_softmax(scores, dim):
        score_types.append(scores.dtype)
        return softmax(scores, dim)

    monkeypatch.setattr(torch, "softmax", recording_softmax)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval()(torch.randn(2, 3, 112, 112))
    assert torch.isfinite(out).all()
    assert score_types == [torch.float32] * 12  # attention in float32 under autocast


def test_vit_exports_to_onnx(tmp_path):
    # the export its users take a model.pt to: same embeddings through onnxruntime
    from export_onnx import export_and_verify  # onnx is heavy: only this test loads it

    torch.manual_seed(0)
    model = models.VisionTransformer(32, 1, 0.1, 0.1, embedding_size=8).eval()
    assert export_and_verify(model, tmp_path / "vit.onnx", 1e-4, source="vit") < 1e-4


@pytest.mark.parametrize("name", sorted(ZOO_GMACS))
def test_flops_match_arcface_zoo(name):
    with torch.device("meta"):
        model = build_model(name, 512)
    gmacs = model_flops(model) / 2e9
    assert abs(gmacs - ZOO_GMACS[name]) / ZOO_GMACS[name] < 0.02


def test_arcface_names_and_model_pt_load(tmp_path):
    with torch.device("meta"):
        assert count_parameters(build_model("r50")) == count_parameters(build_model("ir50"))
    torch.manual_seed(0)
    ref = RefViT(256, 12, 0.1, 0.1, e=16)
    _randomise(ref)
    torch.save(ref.state_dict(), tmp_path / "model.pt")
    model = load_backbone(tmp_path / "model.pt", network="vit_t")  # E read from the weights
    assert model.feature[3].num_features == 16 and not model.training
    torch.testing.assert_close(model.feature[2].weight, ref.feature[2].weight, rtol=0, atol=0)
    (tmp_path / "config.json").write_text(json.dumps({"network": "vit_s"}))
    with pytest.raises(models.CheckpointMismatchError, match="vit_s"):
        load_backbone(tmp_path / "model.pt")


def test_features_head_runs_in_float32_under_autocast():
    """arcface_torch's ViT runs its features head (after norm(x.float())) outside autocast, in
    float32; under bf16/fp16 autocast ours gave a half-precision embedding."""
    torch.manual_seed(0)
    model = models.VisionTransformer(32, 1, embedding_size=8)
    with torch.no_grad():  # eval statistics away from the identity
        for bn in (model.feature[1], model.feature[3]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    seen = []
    model.norm.register_forward_hook(lambda m, i, o: seen.append(o.flatten(1)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 112, 112))
    x = seen[0].double()
    for lin, bn in ((model.feature[0], model.feature[1]), (model.feature[2], model.feature[3])):
        x = x @ lin.weight.double().T  # no bias, as arcface_torch
        x = (x - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps) \
            * bn.weight.double() + bn.bias.double()
    torch.testing.assert_close(out.double(), x.detach(), rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32
