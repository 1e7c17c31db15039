"""arcface_torch's MobileFaceNet (``mbf``, ``mbf_large``) against a reference written out here
as its backbones/mobilefacenet.py builds it (ConvBlock, LinearBlock, DepthWise, Residual, GDC,
get_mbf's blocks and scale): its state dict loads strictly into ours and gives the same
embeddings in float64, in eval and in training mode; its model.pt loads by name."""

import pytest
import torch
from torch import nn

import config
from models import build_model, count_parameters, load_backbone
from training.arcface_torch_config import to_overrides


class RefConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding,
                      bias=False),
            nn.BatchNorm2d(num_features=out_c), nn.PReLU(num_parameters=out_c))

    def forward(self, x):
        return self.layers(x)


class RefLinearBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(num_features=out_c))

    def forward(self, x):
        return self.layers(x)


class RefDepthWise(nn.Module):
    def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2),
                 padding=(1, 1), groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            RefConvBlock(in_c, out_c=groups),
            RefConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding,
                         stride=stride),
            RefLinearBlock(groups, out_c))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class RefResidual(nn.Module):
    def __init__(self, c, num_block, groups):
        super().__init__()
        self.layers = nn.Sequential(*[RefDepthWise(c, c, True, (3, 3), (1, 1), (1, 1), groups)
                                      for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class RefGDC(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        self.layers = nn.Sequential(
            RefLinearBlock(512, 512, groups=512, kernel=(7, 7)), nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class RefMobileFaceNet(nn.Module):
    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        s = scale
        self.layers = nn.ModuleList()
        self.layers.append(RefConvBlock(3, 64 * s, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            self.layers.append(RefConvBlock(64 * s, 64 * s, kernel=(3, 3), padding=(1, 1),
                                            groups=64))
        else:
            self.layers.append(RefResidual(64 * s, blocks[0], groups=128))
        self.layers.extend([
            RefDepthWise(64 * s, 64 * s, groups=128), RefResidual(64 * s, blocks[1], groups=128),
            RefDepthWise(64 * s, 128 * s, groups=256),
            RefResidual(128 * s, blocks[2], groups=256),
            RefDepthWise(128 * s, 128 * s, groups=512),
            RefResidual(128 * s, blocks[3], groups=256)])
        self.conv_sep = RefConvBlock(128 * s, 512)
        self.features = RefGDC(num_features)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


GET_MODEL = {"mbf": dict(blocks=(1, 4, 6, 2), scale=2),  # get_mbf
             "mbf_large": dict(blocks=(2, 8, 12, 4), scale=4)}  # get_mbf_large


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise(model: nn.Module) -> None:
    """BN affine terms and PReLU slopes away from their initial values, and BN statistics
    those of a batch (so the activations stay of unit size and the images, not the biases,
    make the embeddings), so that each one counts."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.PReLU):
                mod.weight.uniform_(0.0, 0.5)
        for mod in norms:
            mod.weight.uniform_(0.75, 1.25)
            mod.bias.normal_(0.0, 0.1)
            mod.reset_running_stats()
            mod.momentum = None  # a cumulative average: after one batch, its statistics
        model.train()(torch.randn(4, 3, 112, 112))
    for mod in norms:
        mod.momentum = 0.1


@pytest.mark.parametrize("name", sorted(GET_MODEL))
def test_its_state_dict_keys_and_shapes_are_ours(name):
    with torch.device("meta"):
        ref, ours = RefMobileFaceNet(64, **GET_MODEL[name]), build_model(name, 64)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert count_parameters(ours) == count_parameters(ref)


@pytest.mark.parametrize("train_mode", [False, True])
def test_its_weights_give_the_same_embeddings_in_float64(train_mode):
    torch.manual_seed(0)
    ref = RefMobileFaceNet(16, **GET_MODEL["mbf"])
    _randomise(ref)
    ref.double()
    ours = build_model("mbf", 16).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    images = torch.randn(3, 3, 112, 112, dtype=torch.float64)
    ref.train(train_mode)
    ours.train(train_mode)
    with torch.no_grad():
        expected, got = ref(images), ours(images)
    assert got.dtype == torch.float64
    assert (expected[0] - expected[1]).abs().max() > 0.1  # the images, not the biases, count
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if train_mode:  # the batch statistics moved the running ones alike
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12)


def test_its_model_pt_loads_by_its_name(tmp_path):
    torch.manual_seed(1)
    ref = RefMobileFaceNet(24, **GET_MODEL["mbf"])
    _randomise(ref)
    torch.save(ref.state_dict(), tmp_path / "model.pt")
    model = load_backbone(tmp_path / "model.pt", network="mbf")  # E read from the weights
    assert model.features.layers[3].num_features == 24 and not model.training
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(images), ref.eval()(images))


def test_its_configs_name_it():
    assert to_overrides({"network": "mbf"}, "cfg.py")["network"] == "mbf"
    assert {"mbf", "mbf_large"} <= set(config.NETWORK_NAMES)
