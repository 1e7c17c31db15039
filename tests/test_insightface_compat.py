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

