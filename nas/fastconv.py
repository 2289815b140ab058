"""Convolutions on 1x1 feature maps as matrix products, for training at 32x32.

Trained on CIFAR's 32x32 images through the deployed strides, the last stages of a MnasNet-style
network run on 1x1 maps, and every squeeze-excite block runs its two convolutions on a pooled
1x1 map. There only the centre tap of a 'same'-padded kernel meets data, so the convolution is a
matrix product (a per-channel product when depthwise) of the same parameters. oneDNN's kernels
spent far longer on those shapes, backward above all: a 5x5 depthwise convolution of 960
channels on a batch of 64 1x1 maps took 16-24 ms forward and backward against 0.8 ms as a
product, and it was 10% of a mnasnet_a1 training step (proxy_throughput has the whole-step
figure). The swap is for training only; latency is measured on the network as built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OnePixelConv2d(nn.Conv2d):
    """nn.Conv2d with the same parameters that computes a 1x1 input map as a matrix product."""

    @staticmethod
    def eligible(conv: nn.Conv2d) -> bool:
        """'Same' zero padding of an odd kernel, and dense or depthwise: the centre tap is all."""
        kh, kw = conv.kernel_size
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        return (kh % 2 == 1 and kw % 2 == 1 and conv.padding == (kh // 2, kw // 2)
                and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
                and (conv.groups == 1 or depthwise))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> OnePixelConv2d:
        """The same layer, sharing (not copying) the weight and bias."""
        fast = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                   device="meta")
        fast.weight = conv.weight
        fast.bias = conv.bias
        return fast.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1):
            return super().forward(x)
        kh, kw = self.kernel_size
        centre = self.weight[:, :, kh // 2, kw // 2]  # (out, in / groups)
        flat = x.reshape(x.shape[0], -1)
        if self.groups == 1:
            y = F.linear(flat, centre, self.bias)
        else:  # depthwise: one weight per channel
            y = flat * centre.reshape(1, -1)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(x.shape[0], -1, 1, 1)


def fast_one_pixel_convs(model: nn.Module) -> nn.Module:
    """Swap every eligible nn.Conv2d for a OnePixelConv2d in place; the state_dict is unchanged."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and OnePixelConv2d.eligible(child):
                setattr(parent, name, OnePixelConv2d.from_conv(child))
    return model
