"""The builder: exact parity with torchvision, the papers' costs, and block-level wiring."""

import re

import pytest
import torch
import torchvision
from torch import nn

from nas.arch import (
    ArchError,
    Architecture,
    BlockSpec,
    Settings,
    Stem,
    adapt_to_input,
    load_architecture,
    make_divisible,
)
from nas.blocks import Block, layer_configs
from nas.cost import count_macs, count_params
from nas.model import build_model

TORCHVISION = {
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
    "mnasnet_b1": torchvision.models.mnasnet1_0,
}


def _randomise_bn_stats(model: nn.Module, seed: int) -> None:
    """Fresh BN stats are 0/1, which would hide a wrong eps or a misrouted BN."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_matches_torchvision_exactly(name):
    torch.manual_seed(0)
    ref = TORCHVISION[name]().eval()
    _randomise_bn_stats(ref, seed=1)
    ours = build_model(load_architecture(name)).eval()
    assert count_params(ours) == count_params(ref)
    _assert_computes_as(ours, ref, size=96)
    assert count_macs(ours, 224) == count_macs(ref, 224)


def _assert_computes_as(ours: nn.Module, ref: nn.Module, *, size: int) -> None:
    """Same weight shapes in the same order, and with ref's weights the same outputs."""
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert [t.shape for t in our_sd.values()] == [t.shape for t in ref_sd.values()]
    ours.load_state_dict(dict(zip(our_sd.keys(), ref_sd.values(), strict=True)))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, params_m, macs_m", [
    ("mobilenet_v1", 4.2, 569),  # Howard et al. 2017, Table 8
    ("mnasnet_a1", 3.9, 312),  # Tan et al. 2019, Table 1
])
def test_paper_costs(name, params_m, macs_m):
    model = build_model(load_architecture(name))
    assert count_params(model) / 1e6 == pytest.approx(params_m, rel=0.03)
    assert count_macs(model, 224) / 1e6 == pytest.approx(macs_m, rel=0.03)


NAMES = ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
         "mnasnet_a1", "mnasnet_b1"]


@pytest.mark.parametrize("name", NAMES)
def test_trains_at_cifar_size(name):
    arch = adapt_to_input(load_architecture(name), 32)
    model = build_model(arch, num_classes=10)
    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def _depthwise_convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]


@pytest.mark.parametrize("name", NAMES)
def test_depthwise_groups_equal_their_channels(name):
    model = build_model(load_architecture(name))
    dws = _depthwise_convs(model)
    assert dws
    for conv in dws:
        assert conv.groups == conv.in_channels == conv.out_channels
        assert conv.padding == (conv.kernel_size[0] // 2,) * 2


def test_stride_sits_on_the_depthwise_conv_only():
    for name in NAMES:
        model = build_model(load_architecture(name))
        for block in (m for m in model.modules() if isinstance(m, Block)):
            convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
            strided = [c for c in convs if c.stride != (1, 1)]
            assert len(strided) <= 1
            if strided:
                assert strided[0].groups > 1 or strided[0].kernel_size != (1, 1)


def test_feature_map_shapes_follow_strides():
    arch = load_architecture("mnasnet_a1")
    model = build_model(arch).eval()
    x = torch.zeros(1, 3, 224, 224)
    sizes = []
    with torch.no_grad():
        for layer in model.features:
            x = layer(x)
            sizes.append(x.shape[-1])
    # stem 112, then per repeat: sep(112) 24x2(56) 40x3(28) 80x4(14) 112x2(14) 160x3(7) 320(7), head
    assert sizes == [112, 112, 56, 56, 28, 28, 28, 14, 14, 14, 14, 14, 14, 7, 7, 7, 7, 7]


def _zero_last_bn(block: Block) -> None:
    bn = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)


@pytest.mark.parametrize("op", ["conv", "sepconv", "mbconv"])
def test_identity_residual_only_where_shapes_allow(op):
    expansion = 6 if op == "mbconv" else 1
    arch = Architecture(blocks=(BlockSpec(op, 3, 16, stride=1, repeats=2, expansion=expansion),
                                BlockSpec(op, 3, 16, stride=1, repeats=1, expansion=expansion,
                                          skip="none"),
                                BlockSpec(op, 3, 24, stride=2, expansion=expansion)),
                        stem=Stem(filters=16))
    model = build_model(arch).eval()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert [b.residual for b in blocks] == [True, True, False, False]
    x = torch.randn(1, 16, 8, 8)
    for block in blocks[:2]:
        _zero_last_bn(block)  # block branch now outputs 0 (for conv: relu(0) = 0)
        with torch.no_grad():
            torch.testing.assert_close(block(x), x)


def test_se_acts_on_the_expanded_width_and_squeeze_follows_settings():
    spec = BlockSpec("mbconv", 3, 40, stride=1, expansion=6, se_ratio=0.25)
    arch_exp = Architecture(blocks=(spec,), settings=Settings(se_from="expanded", se_divisor=8))
    arch_in = Architecture(blocks=(spec,), settings=Settings(se_from="input", se_divisor=1))
    for arch, squeeze in [(arch_exp, make_divisible(32 * 6 * 0.25, 8)), (arch_in, 8)]:
        block = build_model(arch).features[1]
        se = block.layers[2]
        assert isinstance(se, torchvision.ops.SqueezeExcitation)
        assert se.fc1.in_channels == 32 * 6 and se.fc1.out_channels == squeeze
        assert se.fc2.out_channels == 32 * 6


def test_hardsigmoid_gate_is_really_hard():
    arch = load_architecture("mobilenet_v3_small")
    gates = {type(m.scale_activation) for m in build_model(arch).modules()
             if isinstance(m, torchvision.ops.SqueezeExcitation)}
    assert gates == {nn.Hardsigmoid}


def test_layer_configs_unroll_repeats_without_mutating_specs():
    arch = load_architecture("mobilenet_v2")
    before = arch.to_dict()
    cfgs = layer_configs(arch)
    assert len(cfgs) == sum(b.repeats for b in arch.blocks) == 17
    assert [c.stride for c in cfgs].count(2) == 4
    assert arch.to_dict() == before


def test_num_classes_and_in_channels():
    model = build_model(load_architecture("mobilenet_v3_small"), num_classes=7, in_channels=1)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 7)
    with pytest.raises(ValueError, match="num_classes"):
        build_model(load_architecture("mobilenet_v2"), num_classes=0)


WIDTH_FAMILIES = {
    "mobilenet_v2": lambda m: torchvision.models.mobilenet_v2(width_mult=m),
    "mobilenet_v3_large": lambda m: torchvision.models.mobilenet_v3_large(width_mult=m),
    "mobilenet_v3_small": lambda m: torchvision.models.mobilenet_v3_small(width_mult=m),
    "mnasnet_b1": lambda m: torchvision.models.MNASNet(alpha=m),
}


@pytest.mark.parametrize("mult", [0.35, 0.5, 0.75, 1.3])
@pytest.mark.parametrize("name", sorted(WIDTH_FAMILIES))
def test_width_multipliers_match_torchvision_exactly(name, mult):
    # torchvision's own width semantics and rounding, family by family: V2 never narrows its
    # head, V3 scales its expanded widths and hidden FC, MNASNet keeps its 1280 head
    torch.manual_seed(0)
    ref = WIDTH_FAMILIES[name](mult).eval()
    _randomise_bn_stats(ref, seed=1)
    arch = load_architecture(f"{name}@{mult}")
    assert arch.name == f"{name}@{mult:g}"
    _assert_computes_as(build_model(arch).eval(), ref, size=64)
    # the scaled network is plain data: its file round-trips
    assert Architecture.from_yaml(arch.to_yaml()) == arch


def test_width_one_is_the_network_itself_and_files_scale_too(tmp_path):
    assert load_architecture("mnasnet_a1@1").blocks == load_architecture("mnasnet_a1").blocks
    path = tmp_path / "mine.yaml"
    path.write_text(load_architecture("mnasnet_a1").to_yaml())
    half = load_architecture(f"{path}@0.5")
    assert [b.filters for b in half.blocks] == [8, 16, 24, 40, 56, 80, 160]
    assert half.head.filters == 1280 and half.stem.filters == 16


@pytest.mark.parametrize("spec, fragment", [
    ("mobilenet_v2@abc", "width multiplier 'abc' must be a number from 0.05 to 4"),
    ("mobilenet_v2@0", "width multiplier '0' must be"),
    ("mobilenet_v2@nan", "width multiplier 'nan' must be"),
    ("mobilenet_v2@9", "width multiplier '9' must be"),
    ("mobilenet_v9@0.5", "mobilenet_v9: no such file and not a reference network"),
    ("mobilenet_v2@0.5@2", "one width multiplier at most"),
])
def test_bad_width_multipliers_are_one_line(spec, fragment):
    with pytest.raises(ArchError, match=re.escape(fragment)):
        load_architecture(spec)
