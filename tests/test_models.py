"""The bodies against the papers (layer shapes, parameter counts, feature layer, initialisation), the fixed Sobel
front-end, and no pretrained weight ever downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deepercluster.config import ModelConfig
from deepercluster.models import build_body
from deepercluster.models.sobel import Sobel


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, nn.Module]:
    torch_home = tmp_path_factory.mktemp("torch-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        built = {arch: build_body(ModelConfig(arch=arch), seed=0) for arch in ("alexnet", "vgg16", "resnet50")}
    assert not any(Path(torch_home).rglob("*")), "a pretrained checkpoint was downloaded"
    return built


def test_alexnet_bn_is_deepclusters(bodies: dict[str, nn.Module]) -> None:
    body = bodies["alexnet"]
    shapes = [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs(body)]
    assert shapes == [(96, 11, 4, 2), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in body.modules()) == 5
    linears = [(m.in_features, m.out_features) for m in body.modules() if isinstance(m, nn.Linear)]
    assert linears == [(256 * 6 * 6, 4096), (4096, 4096)] and body.feature_dim == 4096
    assert n_params(body) == 58_284_096  # 5 conv + 5 BN + fc6 + fc7 (no classifier)


def test_vgg16_bn_is_deeperclusters(bodies: dict[str, nn.Module]) -> None:
    body = bodies["vgg16"]
    assert [c.out_channels for c in convs(body)] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs(body))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in body.modules()) == 13
    linears = [(m.in_features, m.out_features) for m in body.modules() if isinstance(m, nn.Linear)]
    assert linears == [(512 * 7 * 7, 4096), (4096, 4096)]
    assert n_params(body) == 138_365_992 - (4096 * 1000 + 1000)  # torchvision vgg16_bn without fc8
    # DeeperCluster's init: He-normal (fan-out) convolutions, N(0, 0.01) linear layers, zero biases
    conv = convs(body)[1]
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.05)
    assert body.trunk[-1].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert conv.bias.abs().max().item() == 0.0


def test_resnet50_is_clusterfits(bodies: dict[str, nn.Module]) -> None:
    body = bodies["resnet50"]
    assert body.feature_dim == 2048
    assert n_params(body) == 25_557_032 - (2048 * 1000 + 1000)  # torchvision resnet50 without fc


def test_feature_layers_and_small_inputs(bodies: dict[str, nn.Module]) -> None:
    """fc7 before its ReLU for AlexNet/VGG (negative values), pooled last conv for ResNet (non-negative)."""
    sizes = {"alexnet": 64, "vgg16": 32, "resnet50": 32}
    for arch, body in bodies.items():
        body.eval()
        with torch.no_grad():
            out = body(torch.randn(2, 3, sizes[arch], sizes[arch]))
        assert out.shape == (2, body.feature_dim)
        assert (out.min().item() < 0) == (arch != "resnet50"), arch


def test_sobel_removes_colour_and_finds_edges() -> None:
    sobel = Sobel()
    assert list(sobel.parameters()) == []  # fixed: nothing to train
    ramp = torch.arange(8.0).expand(3, 8, 8).unsqueeze(0)  # brightness grows by 1 per column
    out = sobel(ramp)
    assert out.shape == (1, 2, 8, 8)
    assert torch.allclose(out[0, 0, 1:-1, 1:-1], torch.full((6, 6), -8.0), atol=1e-5)  # (1+2+1)(x[j-1] - x[j+1])
    assert torch.allclose(out[0, 1, 1:-1, 1:-1], torch.zeros(6, 6), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 8, 8, generator=g)
    shifted = img + torch.tensor([0.3, -0.1, -0.2]).view(1, 3, 1, 1)  # another colour, the same grey
    assert torch.allclose(sobel(img), sobel(shifted), atol=1e-5)


@pytest.mark.parametrize("arch", ["smallnet", "alexnet", "vgg16", "resnet18", "resnet50"])
def test_sobel_bodies_take_two_channels(arch: str) -> None:
    body = build_body(ModelConfig(arch=arch, sobel=True), seed=0)
    assert body.sobel is not None and convs(body.trunk)[0].in_channels == Sobel.out_channels
    assert all(not name.startswith("sobel") for name, _ in body.named_parameters())


def test_build_is_deterministic_given_a_seed() -> None:
    a, b = (build_body(ModelConfig(arch="resnet18"), seed=3) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_calibrated_batchnorm_makes_eval_mode_the_batch_statistics_forward() -> None:
    """After ``calibrate_batchnorm`` on a set of images, the eval-mode forward (extraction) of those images equals
    the forward that normalises with their own statistics (training's), where the defaults of a fresh network give
    a different function; dropout stays off and no weight changes."""
    from deepercluster.features.calibrate import calibrate_batchnorm

    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16) * 2 + 0.5
    body = build_body(ModelConfig(arch="smallnet", feature_dim=16), seed=0)
    weights = {k: v.clone() for k, v in body.state_dict().items() if "running" not in k and "tracked" not in k}
    with torch.no_grad():
        batch_stats = body.train()(x)
        before = body.eval()(x)
        assert calibrate_batchnorm(body, [x[:32], x[32:]]) == 64
        after = body.eval()(x)
    assert not body.training
    assert not torch.allclose(before, batch_stats, rtol=0.05, atol=1e-3)
    # running variance is the unbiased estimate averaged over two batches: close to, not exactly, the batch's
    assert torch.allclose(after, batch_stats, rtol=0.05, atol=0.05 * float(batch_stats.abs().mean()))
    assert all(torch.equal(v, body.state_dict()[k]) for k, v in weights.items())
    assert calibrate_batchnorm(body, []) == 0 and torch.equal(body.eval()(x), after)
