"""The one builder: any `Architecture` -> a MnasNet-style PyTorch network."""

from __future__ import annotations

import torch
from torch import nn

from nas.arch import ArchError, Architecture
from nas.blocks import ACTIVATIONS, Block, conv_bn, layer_configs
from nas.host import failed_allocation, is_out_of_memory


class Network(nn.Module):
    """stem -> blocks -> head conv -> global pool -> [hidden FC] -> dropout -> classifier."""

    def __init__(self, arch: Architecture, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.arch = arch
        s = arch.settings
        layers: list[nn.Module] = [conv_bn(in_channels, arch.stem.filters, arch.stem.kernel,
                                           stride=arch.stem.stride, act=arch.stem.act, settings=s)]
        configs = layer_configs(arch)
        layers += [Block(cfg, s) for cfg in configs]
        width = configs[-1].out_channels
        if arch.head.filters:
            layers.append(conv_bn(width, arch.head.filters, 1, act=arch.head.act, settings=s))
            width = arch.head.filters
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(*_classifier(arch, width, num_classes))
        self.num_features = width
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x).flatten(1)
        return self.classifier(x)


def _classifier(arch: Architecture, width: int, num_classes: int) -> list[nn.Module]:
    head = arch.head
    hidden: list[nn.Module] = []
    if head.hidden:
        hidden = [nn.Linear(width, head.hidden), ACTIVATIONS[head.hidden_act](inplace=True)]
        width = head.hidden
    return [*hidden, nn.Dropout(head.dropout), nn.Linear(width, num_classes)]


def _init_weights(model: nn.Module) -> None:
    """torchvision's MobileNetV2/V3 initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def build_model(arch: Architecture, num_classes: int = 1000, in_channels: int = 3) -> Network:
    """Build the network an architecture describes (untrained)."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    try:
        return Network(arch, num_classes=num_classes, in_channels=in_channels)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise TooLargeError(f"too large to build in this machine's memory "
                            f"({failed_allocation(e, 'weight')})") from None


class TooLargeError(ArchError):
    """The network's weights do not fit in memory: the architecture's fault, not a bug."""
