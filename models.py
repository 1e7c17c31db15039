"""Face-recognition backbones: IR-ResNet (ArcFace's "improved residual" nets), IR-SE,
MobileFaceNet, arcface_torch's face ViTs (vit_t ... vit_h) and its MobileFaceNets (mbf,
mbf_large), all mapping a normalised
(N, 3, 112, 112) RGB batch to (N, E) embeddings.

The IR-ResNet module and parameter names follow InsightFace's arcface_torch ``iresnet``
(``conv1``, ``layer1.0.bn1``, ..., ``fc``, ``features``), so its released backbone state dicts
load into ``ir18`` .. ``ir200`` directly (its names ``r18`` .. ``r200`` are accepted too), and
so do its ViTs' (``patch_embed``, ``blocks.0.attn.qkv``, ..., ``feature``) and its mbf's
(``layers.0.layers.0``, ..., ``conv_sep``, ``features.layers``). Usage::

    python models.py --network ir50            # parameters and forward GFLOPs at 112x112
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from utils import (
    CONFIG_FILE,
    FACE_CROP_SIZE,
    PIXEL_CENTRE,
    CheckpointError,
    add_debug_flag,
    load_backbone_state,
    positive_int,
    run_cli,
)

IMAGE_SIZE = FACE_CROP_SIZE  # aligned face crops, the models' input side
BN_EPS = 1e-5
SE_REDUCTION = 16  # squeeze-excitation bottleneck ratio (SENet's default)
IR_WIDTHS = (64, 128, 256, 512)  # channels of the four IR-ResNet stages
IR_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "ir18": (2, 2, 2, 2),
    "ir34": (3, 4, 6, 3),
    "ir50": (3, 4, 14, 3),
    "ir100": (3, 13, 30, 3),
    "ir200": (6, 26, 60, 6),
}
SE_DEPTHS = {"ir_se50": IR_DEPTHS["ir50"], "ir_se100": IR_DEPTHS["ir100"]}
# The CPU demo's light IR net (issue 6): stride-2 stem, one block per stage; its first stage
# keeps the resolution so the last map is 7x7 like the full nets (about 1.1M params at E=128).
NARROW_WIDTHS = (16, 32, 64, 128)
NARROW_STRIDES = (1, 2, 2, 2)
# arcface_torch's face ViTs (see VisionTransformer)
VIT_PATCH = 9
VIT_HEADS = 8
VIT_MLP_RATIO = 4
VIT_INIT_STD = 0.02  # truncated-normal std of its linear layers and position embedding
VIT_HEAD_BN_EPS = 2e-5
# arcface_torch calls random_masking() without passing its mask_ratio, so every ViT with a
# mask_ratio above 0 drops this fraction of tokens in training whatever its name says
VIT_MASKED_FRACTION = 0.1
# name: (width, depth, drop-path rate of the last block, mask_ratio, gradient checkpointing)
VIT_SPECS: dict[str, tuple[int, int, float, float, bool]] = {
    "vit_t": (256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0, False),
    "vit_s": (512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0, False),
    "vit_b": (512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05, True),
    "vit_h": (1024, 48, 0.1, 0.0, True),
}
# arcface_torch's MobileFaceNet (ArcfaceMobileFaceNet)
# name: (blocks of its four residual stages, width scale), as its get_mbf / get_mbf_large
MBF_SPECS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "mbf": ((1, 4, 6, 2), 2), "mbf_large": ((2, 8, 12, 4), 4)}
MBF_BASE_WIDTHS = (64, 128)  # its two channel counts before the scale
MBF_FIRST_GROUPS = 64  # groups of its second conv when its first stage has one block
# the inner width of each stage's depthwise convs (its "groups"), whatever the scale
MBF_DOWN_WIDTHS = (128, 256, 512)  # of the three stride-2 blocks
MBF_STAGE_WIDTHS = (128, 128, 256, 256)  # of the four residual stages
# arcface_torch's get_model names for the IR-ResNets we build with its module names (its
# mbf and mbf_large, another MobileFaceNet layout than ours, are ArcfaceMobileFaceNet)
ARCFACE_ALIASES = {"r18": "ir18", "r34": "ir34", "r50": "ir50", "r100": "ir100",
                   "r200": "ir200"}
# config.NETWORK_NAMES spells these out so that reading a config needs no torch;
# tests/test_config.py keeps the two equal
MODEL_NAMES: tuple[str, ...] = (*IR_DEPTHS, *SE_DEPTHS, "mobilefacenet", "ir_narrow",
                                *VIT_SPECS, *ARCFACE_ALIASES, *MBF_SPECS)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """The backbones' input, the one normalisation training and evaluation share: uint8
    NxHxWx3 (a ``raw_uint8`` loader's batch, crops to embed) to float32 Nx3xHxW
    ``(x - 127.5) / 127.5`` on the tensor's own device (move it to the GPU first: 4x less to
    transfer). The result is in channels_last memory format (what a channels_last model
    wants); call ``.contiguous()`` for the classic layout."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise TypeError(f"normalize_batch expects uint8 NxHxWx3 images, got {images.dtype} "
                        f"{tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).to(torch.float32).mul_(1.0 / PIXEL_CENTRE).sub_(1.0)


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _out_size(size: int, stride: int) -> int:
    """Spatial size after a 3x3, padding-1 convolution with ``stride``."""
    return (size - 1) // stride + 1


class SEModule(nn.Module):
    """Squeeze-excitation: rescale channels by a gate computed from their global means."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class IBasicBlock(nn.Module):
    """IR block: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN (+ optional SE), plus a shortcut
    that is the identity, or a strided 1x1 conv + BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, use_se: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.se = SEModule(cout) if use_se else nn.Identity()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.prelu(self.bn2(out)))
        out = self.se(self.bn3(out))
        return out + self.downsample(x)


class IResNet(nn.Module):
    """IR-ResNet: stem conv3x3-BN-PReLU, four stages of IBasicBlocks, then the output layer
    BN2d, dropout, flatten, Linear(C*h*w, E), BN1d (its scale frozen at 1, as InsightFace);
    the Linear and BN1d run in float32 under autocast, as there."""

    def __init__(self, depths: Sequence[int], widths: Sequence[int] = IR_WIDTHS,
                 strides: Sequence[int] = (2, 2, 2, 2), stem_stride: int = 1,
                 embedding_size: int = 512, dropout: float = 0.0, use_se: bool = False,
                 image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        if not len(depths) == len(widths) == len(strides):
            raise ValueError("depths, widths and strides need one entry per stage")
        self.conv1 = _conv3x3(3, widths[0], stem_stride)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        size = _out_size(image_size, stem_stride)
        cin = widths[0]
        for i, (depth, cout, stride) in enumerate(zip(depths, widths, strides, strict=True)):
            blocks = [IBasicBlock(cin, cout, stride, use_se)]
            blocks += [IBasicBlock(cout, cout, 1, use_se) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            size = _out_size(size, stride)
            cin = cout
        self.num_stages = len(depths)
        self.bn2 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * size * size, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        _init_weights(self)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.dropout(self.bn2(x)), 1)
        # as arcface_torch: the output layer in float32 even under fp16/bf16 autocast (a
        # half-precision embedding keeps about 3 significant digits)
        with _autocast_off(x.device):
            return self.features(self.fc(_at_least_float32(x)))


# ----------------------------------------------------------------------------- MobileFaceNet

class ConvBlock(nn.Sequential):
    """Conv-BN, followed by PReLU unless ``linear``."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 linear: bool = False, padding: int | None = None) -> None:
        padding = kernel // 2 if padding is None else padding
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups,
                      bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS)]
        if not linear:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """MobileNetV2 inverted bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 project;
    a residual connection when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            ConvBlock(cin, hidden),
            ConvBlock(hidden, hidden, 3, stride, groups=hidden),
            ConvBlock(hidden, cout, linear=True))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


# (expansion, output channels, repeats, stride of the first repeat), from the MobileFaceNet
# paper (Chen et al. 2018, table 1).
MOBILEFACENET_STAGES = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2),
                        (2, 128, 2, 1))
MOBILEFACENET_WIDTH = 512  # channels of the last 1x1 conv and of the global depthwise conv


class MobileFaceNet(nn.Module):
    """MobileFaceNet: conv3x3/2, depthwise conv3x3, inverted bottlenecks, conv1x1 to 512,
    a global depthwise 7x7 conv (GDConv), then dropout, Linear(512, E), BN1d (the last two
    in float32 under autocast, as the other networks' output layers)."""

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0,
                 image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBlock(3, 64, 3, 2), ConvBlock(64, 64, 3, 1, groups=64)]
        size = _out_size(image_size, 2)
        cin = 64
        for expansion, cout, repeats, stride in MOBILEFACENET_STAGES:
            for r in range(repeats):
                layers.append(Bottleneck(cin, cout, stride if r == 0 else 1, expansion))
                cin = cout
            size = _out_size(size, stride)
        layers.append(ConvBlock(cin, MOBILEFACENET_WIDTH))
        layers.append(ConvBlock(MOBILEFACENET_WIDTH, MOBILEFACENET_WIDTH, size,
                                groups=MOBILEFACENET_WIDTH, linear=True, padding=0))
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(MOBILEFACENET_WIDTH, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The GDConv's kernel covers the whole last map, so its output is (N, 512, 1, 1).
        x = self.dropout(torch.flatten(self.body(x), 1))
        with _autocast_off(x.device):
            return self.features(self.fc(_at_least_float32(x)))


# arcface_torch's MobileFaceNet (backbones/mobilefacenet.py, after cavaface): another layout
# than the paper's above, built under its module names so its model.pt loads strictly.


class Layers(nn.Module):
    """A ``layers`` Sequential, the wrapper arcface_torch's MobileFaceNet puts around each
    block (its state-dict keys run through it), plus the input when ``residual``."""

    def __init__(self, *modules: nn.Module, residual: bool = False) -> None:
        super().__init__()
        self.layers = nn.Sequential(*modules)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


def _mbf_conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
              linear: bool = False, padding: int | None = None) -> Layers:
    """Its ConvBlock (conv-BN-PReLU) or, ``linear``, its LinearBlock (conv-BN)."""
    return Layers(*ConvBlock(cin, cout, kernel, stride, groups, linear, padding))


def _mbf_depthwise(cin: int, cout: int, hidden: int, stride: int = 1,
                   residual: bool = False) -> Layers:
    """Its DepthWise: 1x1 to ``hidden``, depthwise 3x3 (``stride``), linear 1x1 to ``cout``."""
    return Layers(_mbf_conv(cin, hidden), _mbf_conv(hidden, hidden, 3, stride, groups=hidden),
                  _mbf_conv(hidden, cout, linear=True), residual=residual)


def _mbf_stage(channels: int, blocks: int, hidden: int) -> Layers:
    """Its Residual: ``blocks`` residual DepthWise blocks."""
    return Layers(*(_mbf_depthwise(channels, channels, hidden, residual=True)
                    for _ in range(blocks)))


class ArcfaceMobileFaceNet(nn.Module):
    """arcface_torch's ``mbf`` / ``mbf_large``: conv3x3/2, a depthwise conv (or a residual
    stage), then three times a stride-2 DepthWise block and a residual stage, a 1x1 conv to
    512, and the GDC head: a linear global depthwise conv, flatten, (dropout, 0 there),
    Linear(512, E), BN1d. As there, the 1x1 conv and the head run in float32 under fp16
    autocast."""

    def __init__(self, blocks: Sequence[int], scale: int, embedding_size: int = 512,
                 dropout: float = 0.0, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        narrow, wide = (width * scale for width in MBF_BASE_WIDTHS)
        first = _mbf_conv(narrow, narrow, 3, groups=MBF_FIRST_GROUPS) if blocks[0] == 1 \
            else _mbf_stage(narrow, blocks[0], MBF_STAGE_WIDTHS[0])
        self.layers = nn.ModuleList([_mbf_conv(3, narrow, 3, 2), first])
        cin = narrow
        for cout, down, stage, hidden in zip((narrow, wide, wide), MBF_DOWN_WIDTHS, blocks[1:],
                                             MBF_STAGE_WIDTHS[1:], strict=True):
            self.layers.extend([_mbf_depthwise(cin, cout, down, 2),
                                _mbf_stage(cout, stage, hidden)])
            cin = cout
        self.conv_sep = _mbf_conv(cin, MOBILEFACENET_WIDTH)
        size = image_size
        for _ in range(len(MBF_DOWN_WIDTHS) + 1):  # the stem and the three stride-2 blocks
            size = _out_size(size, 2)
        # its Flatten holds no weights: the dropout joins it without moving a key
        self.features = Layers(
            _mbf_conv(MOBILEFACENET_WIDTH, MOBILEFACENET_WIDTH, size,
                      groups=MOBILEFACENET_WIDTH, linear=True, padding=0),
            nn.Sequential(nn.Flatten(), nn.Dropout(dropout)),
            nn.Linear(MOBILEFACENET_WIDTH, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=BN_EPS))
        _init_weights(self)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):  # as it initialises its linear layer
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        with _autocast_off(x.device):
            return self.features(self.conv_sep(_at_least_float32(x)))


def _init_weights(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


# ----------------------------------------------------------------------------- ViT

# arcface_torch's face ViTs (backbones/vit.py): 112x112 cut into 9x9 patches (144 tokens, no
# class token), 8 heads, MLP ratio 4 with ReLU6, no qkv bias, pre-LayerNorm blocks; all
# 144 tokens are flattened into the features head. Module names follow its file, so its
# model.pt loads strictly.


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random ``rate`` of the
    samples and scale the survivors by 1 / (1 - rate)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ViTAttention(nn.Module):
    """Multi-head self-attention whose scores and softmax run in float32 even under autocast
    (fp16 scores over 144 tokens overflow, as arcface_torch guards against)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.heads, dim // self.heads)
        q, k, v = _at_least_float32(qkv.permute(2, 0, 3, 1, 4)).unbind(0)
        with _autocast_off(x.device):
            weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
            out = (weights @ v).transpose(1, 2).reshape(n, tokens, dim)
        # back to qkv's type: what autocast would cast proj's input to anyway, and the
        # weights' type without autocast
        return self.proj_drop(self.proj(out.to(qkv.dtype)))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # the meta device (model_flops) has no autocast to turn off
    return contextlib.nullcontext() if device.type == "meta" else \
        torch.autocast(device.type, enabled=False)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), each branch under
    stochastic depth."""

    def __init__(self, dim: int, drop_path: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, VIT_HEADS, dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ViTMlp(dim, VIT_MLP_RATIO * dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, image_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, VIT_PATCH, stride=VIT_PATCH)
        self.num_patches = (image_size // VIT_PATCH) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)


class VisionTransformer(nn.Module):
    """arcface_torch's face ViT: patch embedding + position embedding, ``depth`` blocks,
    LayerNorm, then the features head over all tokens flattened: Linear(T*D, D) - BN1d -
    Linear(D, E) - BN1d (float32 under autocast). In training a random fraction of tokens
    skips the blocks and is put back as a learned mask token after the last norm.
    ``dropout`` (0 in arcface_torch) applies after the position embedding and in each
    block's branches."""

    def __init__(self, dim: int, depth: int, drop_path: float = 0.0, mask_ratio: float = 0.0,
                 checkpointing: bool = False, embedding_size: int = 512,
                 dropout: float = 0.0, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim, image_size)
        tokens = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.pos_drop = nn.Dropout(dropout)
        self.masked_fraction = VIT_MASKED_FRACTION if mask_ratio > 0 else 0.0
        self.checkpointing = checkpointing
        # deeper blocks drop more; float32 on the CPU, as arcface_torch spaces them (and
        # readable when the model is built on the meta device)
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(ViTBlock(dim, r, dropout) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * tokens, dim, bias=False), nn.BatchNorm1d(dim, eps=VIT_HEAD_BN_EPS),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=VIT_HEAD_BN_EPS))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        _init_vit(self)

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random (1 - masked_fraction) of each sample's tokens: (kept, order) where
        ``order`` puts [kept, masked] back in place."""
        n, tokens, dim = x.shape
        keep = int(tokens * (1 - self.masked_fraction))
        shuffle = torch.argsort(torch.rand(n, tokens, device=x.device), dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, dim))
        return kept, torch.argsort(shuffle, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        n, tokens, dim = x.shape
        masking = self.training and self.masked_fraction > 0
        if masking:
            x, order = self._mask(x)
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)  # activations recomputed
            else:
                x = block(x)
        x = self.norm(_at_least_float32(x))
        if masking:
            filler = self.mask_token.expand(n, tokens - x.shape[1], dim).to(x.dtype)
            x = torch.gather(torch.cat([x, filler], 1), 1, order[:, :, None].expand(-1, -1, dim))
        with _autocast_off(x.device):  # float32 even under autocast, as arcface_torch's head
            return self.feature(x.reshape(n, tokens * dim))


def _init_vit(model: VisionTransformer) -> None:
    nn.init.normal_(model.mask_token, std=VIT_INIT_STD)
    nn.init.trunc_normal_(model.pos_embed, std=VIT_INIT_STD)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=VIT_INIT_STD)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.LayerNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


# ----------------------------------------------------------------------------- public API

def build_model(name: str, embedding_size: int = 512, dropout: float = 0.0,
                image_size: int = IMAGE_SIZE) -> nn.Module:
    """The backbone called ``name`` (one of MODEL_NAMES): (N, 3, 112, 112) normalised RGB to
    (N, embedding_size) embeddings, not L2-normalised; its output layer is sized for
    ``image_size`` square inputs (models.py --image-size counts other sizes)."""
    sized = dict(embedding_size=embedding_size, dropout=dropout, image_size=image_size)
    name = ARCFACE_ALIASES.get(name, name)
    if name in IR_DEPTHS:
        return IResNet(IR_DEPTHS[name], **sized)
    if name in SE_DEPTHS:
        return IResNet(SE_DEPTHS[name], use_se=True, **sized)
    if name == "ir_narrow":
        return IResNet((1, 1, 1, 1), NARROW_WIDTHS, NARROW_STRIDES, stem_stride=2, **sized)
    if name == "mobilefacenet":
        return MobileFaceNet(**sized)
    if name in MBF_SPECS:
        return ArcfaceMobileFaceNet(*MBF_SPECS[name], **sized)
    if name in VIT_SPECS:
        dim, depth, drop_path, mask_ratio, checkpointing = VIT_SPECS[name]
        return VisionTransformer(dim, depth, drop_path, mask_ratio, checkpointing, **sized)
    raise ValueError(f"unknown network {name!r}; choose from {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or frozen (as InsightFace counts them)."""
    return sum(p.numel() for p in model.parameters())


def model_flops(model: nn.Module, image_size: int = IMAGE_SIZE) -> int:
    """Forward FLOPs of one image, counting a multiply-accumulate as 2 FLOPs (so GMACs are
    half of this), over convolutions and matrix products only (torch's FlopCounterMode).

    Runs on a copy whose tensors live on the meta device (shapes only), so it costs no
    compute or memory and leaves ``model`` untouched."""
    # Pre-seeding deepcopy's memo with meta stand-ins keeps it from copying the weights
    # (which may be large and on a GPU).
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    meta = copy.deepcopy(model, memo).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, 3, image_size, image_size, device="meta"))
    return int(counter.get_total_flops())


class CheckpointMismatchError(CheckpointError, ValueError):
    """Weights that do not fit the network named for them (or no network named): the message
    names the file. A ValueError, as load_backbone raised before."""


def _read_run_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointMismatchError(f"{path}: cannot read the run's config ({e})") from None
    return values if isinstance(values, dict) else {}


def load_backbone(path: str | Path, network: str | None = None,
                  embedding_size: int | None = None, map_location: Any = "cpu") -> nn.Module:
    """A backbone in eval mode with the weights of ``path`` (``backbone.pt``, a bare state
    dict, or a training checkpoint holding ``backbone``; ``module.`` prefixes stripped).

    ``network`` / ``embedding_size`` left as None are read from ``config.json`` beside the
    file (train.py writes it); the embedding size otherwise from the weights themselves."""
    path = Path(path)
    # the file first: a missing or damaged checkpoint is the problem to report, not the
    # network that cannot be read from beside it
    state = load_backbone_state(path)
    run_config = _read_run_config(path.parent)
    network = network or run_config.get("network")
    if network is None:
        raise CheckpointMismatchError(
            f"{path}: cannot tell which network it holds: pass network=... (--network) or "
            f"keep the run's {CONFIG_FILE} beside it")
    if embedding_size is None:
        embedding_size = run_config.get("embedding_size")
    if embedding_size is None:
        # the IR nets' and MobileFaceNet's last linear layer, the ViTs' or the mbf's
        fc = next((state[k] for k in ("fc.weight", "feature.2.weight",
                                      "features.layers.2.weight") if k in state), None)
        if not isinstance(fc, torch.Tensor) or fc.ndim != 2:
            raise CheckpointMismatchError(
                f"{path}: no embedding size given and no fc.weight to read it from")
        embedding_size = int(fc.shape[0])
    try:
        model = build_model(network, int(embedding_size))
    except ValueError as e:  # an unknown name from --network or config.json
        raise CheckpointMismatchError(f"{path}: {e}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointMismatchError(f"{path}: weights do not match network {network!r} "
                                      f"with embedding size {embedding_size}: "
                                      f"{_state_mismatch(model.state_dict(), state)}") from None
    model.network_name = network  # the name it was built by (a gallery records it)
    return model.to(map_location).eval()


def _state_mismatch(expected: dict[str, Any], found: dict[str, Any]) -> str:
    """How a state dict differs from a network's, in one line: counts and a first example."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and isinstance(found[k], torch.Tensor)
                and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k!r}: "
                     f"{'x'.join(map(str, found[k].shape))} in the file, "
                     f"{'x'.join(map(str, expected[k].shape))} in the network)")
    return "; ".join(parts) or "torch refused the weights"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Parameters and forward FLOPs of a backbone.")
    add_debug_flag(parser)
    parser.add_argument("--network", choices=MODEL_NAMES, default="ir50")
    parser.add_argument("--embedding-size", type=positive_int, default=512)
    parser.add_argument("--image-size", type=positive_int, default=IMAGE_SIZE,
                        help="input side; the output layer is built for it")
    args = parser.parse_args(argv)
    with torch.device("meta"):  # only shapes are needed: build without allocating weights
        model = build_model(args.network, args.embedding_size, image_size=args.image_size)
    flops = model_flops(model, args.image_size)
    print(f"{args.network}: {count_parameters(model) / 1e6:.2f}M parameters, "
          f"{flops / 1e9:.2f} GFLOPs ({flops / 2e9:.2f} GMACs) per "
          f"{args.image_size}x{args.image_size} image, E={args.embedding_size}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
