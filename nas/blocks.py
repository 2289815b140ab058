"""Building blocks: one resolved config per layer group, one module type that runs it.

`layer_configs(arch)` unrolls an `Architecture` into one `LayerConfig` per repeat with every
width resolved (the spec is never mutated: per-repeat values come from `dataclasses.replace`
semantics). `Block` builds conv, sepconv and mbconv from such a config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation, SqueezeExcitation

from nas.arch import Architecture, BlockSpec, Settings, make_divisible

ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hswish": nn.Hardswish,
}
GATES: dict[str, Callable[..., nn.Module]] = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


@dataclass(frozen=True)
class LayerConfig:
    """One repeat of a block with all widths resolved (cf. torchvision's InvertedResidualConfig)."""

    op: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    mid_channels: int  # width the depthwise / k x k conv works on (= expanded width for mbconv)
    se_channels: int  # squeeze width, 0 = no SE
    act: str
    pw_act: bool
    residual: bool
    spec: str  # the block string it came from, for summaries


def layer_configs(arch: Architecture) -> list[LayerConfig]:
    """Unroll repeats: only the first repeat strides and changes width."""
    configs, channels = [], arch.stem.filters
    for spec in arch.blocks:
        for r in range(spec.repeats):
            stride = spec.stride if r == 0 else 1
            configs.append(_resolve(spec, channels, stride, arch.settings))
            channels = spec.filters
    return configs


def _resolve(spec: BlockSpec, cin: int, stride: int, s: Settings) -> LayerConfig:
    cout = spec.filters
    if spec.op == "mbconv":
        mid = cin if spec.expansion == 1 else make_divisible(cin * spec.expansion, s.divisor)
    elif spec.op == "sepconv":
        mid = cin  # SE sits between the depthwise and the pointwise conv
    else:
        mid = cout  # SE sits after the regular conv
    base = mid if s.se_from == "expanded" else cin
    # at least one se_divisor, as torchvision's _make_divisible (MobileNetV3 at small widths)
    se = make_divisible(base * spec.se_ratio, s.se_divisor) if spec.se_ratio else 0
    residual = spec.skip == "identity" and stride == 1 and cin == cout
    return LayerConfig(spec.op, cin, cout, spec.kernel, stride, mid, se, spec.act, spec.pw_act,
                       residual, spec.to_str())


def conv_bn(cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1,
            act: str | None, settings: Settings) -> Conv2dNormActivation:
    """Conv (no bias) -> BN -> optional activation, 'same' padding for odd kernels."""
    norm = partial(nn.BatchNorm2d, eps=settings.bn_eps, momentum=settings.bn_momentum)
    return Conv2dNormActivation(
        cin, cout, kernel, stride=stride, groups=groups, norm_layer=norm,
        activation_layer=ACTIVATIONS[act] if act else None, inplace=True if act else None,
    )


def squeeze_excite(channels: int, squeeze: int, settings: Settings) -> SqueezeExcitation:
    """SE on `channels` features; gate and squeeze width are network settings."""
    return SqueezeExcitation(channels, squeeze, activation=ACTIVATIONS[settings.se_act],
                             scale_activation=GATES[settings.se_gate])


class Block(nn.Module):
    """conv | sepconv | mbconv, with an identity residual when `cfg.residual`."""

    def __init__(self, cfg: LayerConfig, settings: Settings) -> None:
        super().__init__()
        self.residual = cfg.residual
        self.layers = nn.Sequential(*_layers(cfg, settings))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


def _layers(cfg: LayerConfig, s: Settings) -> list[nn.Module]:
    se = [squeeze_excite(cfg.mid_channels, cfg.se_channels, s)] if cfg.se_channels else []
    if cfg.op == "conv":
        return [conv_bn(cfg.in_channels, cfg.out_channels, cfg.kernel, stride=cfg.stride,
                        act=cfg.act, settings=s), *se]
    if cfg.op == "sepconv":
        return [
            conv_bn(cfg.in_channels, cfg.in_channels, cfg.kernel, stride=cfg.stride,
                    groups=cfg.in_channels, act=cfg.act, settings=s),
            *se,
            conv_bn(cfg.in_channels, cfg.out_channels, 1, act=cfg.act if cfg.pw_act else None,
                    settings=s),
        ]
    mid = cfg.mid_channels
    expand = [] if mid == cfg.in_channels else [
        conv_bn(cfg.in_channels, mid, 1, act=cfg.act, settings=s)]
    return [
        *expand,
        conv_bn(mid, mid, cfg.kernel, stride=cfg.stride, groups=mid, act=cfg.act, settings=s),
        *se,
        conv_bn(mid, cfg.out_channels, 1, act=None, settings=s),  # linear bottleneck
    ]
