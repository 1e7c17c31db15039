"""The IR-ResNet state dicts follow InsightFace's arcface_torch iresnet layout, name for name
and shape for shape, so its released backbone weights load with ``strict=True``.

The expected layout is written out here from the public description of that file (stem
conv1/bn1/prelu; blocks bn1-conv1-bn2-prelu-conv2-bn3 with a downsample conv1x1+BN at the start
of each stage; tail bn2, fc, features), not read from models.py."""

from __future__ import annotations

import pytest

import models

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
STAGE_WIDTHS = (64, 128, 256, 512)
DEPTHS = {"ir18": (2, 2, 2, 2), "ir50": (3, 4, 14, 3)}
FINAL_SPATIAL = 7  # 112 halved by four stride-2 stages


def insightface_layout(depths: tuple[int, ...], embedding: int) -> dict[str, tuple[int, ...]]:
    layout: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for field in BN:
            layout[f"{prefix}.{field}"] = () if field == "num_batches_tracked" else (channels,)

    layout["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    layout["prelu.weight"] = (64,)
    inplanes = 64
    for stage, (planes, depth) in enumerate(zip(STAGE_WIDTHS, depths, strict=True), start=1):
        for i in range(depth):
            p = f"layer{stage}.{i}"
            bn(f"{p}.bn1", inplanes)
            layout[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
            bn(f"{p}.bn2", planes)
            layout[f"{p}.prelu.weight"] = (planes,)
            layout[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if i == 0:
                layout[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
            inplanes = planes
    bn("bn2", 512)
    layout["fc.weight"] = (embedding, 512 * FINAL_SPATIAL ** 2)
    layout["fc.bias"] = (embedding,)
    bn("features", embedding)
    return layout


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_state_dict_matches_insightface_iresnet_layout(name):
    embedding = 512
    state = models.build_model(name, embedding).state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    expected = insightface_layout(DEPTHS[name], embedding)
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected



def _arcface_forward(sd: dict, x, depths, eps: float = 1e-5):
    """arcface_torch's IResNet.forward written out in float64 over a state dict: stem
    conv-BN-PReLU; blocks BN-conv-BN-PReLU-conv(stride)-BN + (downsample conv1x1+BN | x);
    tail BN2d, flatten, fc, features BN1d (eval mode)."""
    import torch.nn.functional as F

    def bn(t, p):
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"],
                            sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, eps)

    x = F.prelu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"), sd["prelu.weight"])
    for stage, depth in enumerate(depths, start=1):
        for i in range(depth):
            p, stride = f"layer{stage}.{i}", 2 if i == 0 else 1
            out = F.conv2d(bn(x, f"{p}.bn1"), sd[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(out, f"{p}.bn2"), sd[f"{p}.prelu.weight"])
            out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn3")
            if f"{p}.downsample.0.weight" in sd:
                x = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride),
                       f"{p}.downsample.1")
            x = out + x
    x = F.linear(bn(x, "bn2").flatten(1), sd["fc.weight"], sd["fc.bias"])
    return bn(x, "features")


def test_forward_is_arcface_torch_iresnet_in_float64():
    """The layer order, strides and shortcuts, not only the names: the same float64 embeddings
    as arcface_torch's forward written out (its layout at narrow widths, so it runs fast)."""
    import torch

    torch.manual_seed(0)
    depths = (2, 1, 2, 1)  # identity shortcuts in stages 1 and 3, projections at each start
    model = models.IResNet(depths, (8, 16, 16, 32), embedding_size=8).double()
    with torch.no_grad():  # every BN and PReLU away from the identity, so order matters
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            if name.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight")):
                t.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias", "prelu.weight")):
                t.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    sd = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), _arcface_forward(sd, x, depths), rtol=1e-9,
                                   atol=1e-9)
