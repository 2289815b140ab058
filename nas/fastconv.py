"""Convolutions that are matrix products, computed as such, for training at 32x32.

Trained on CIFAR's 32x32 images through the deployed strides, the last stages of a MnasNet-style
network run on 1x1 maps, the stride-2 layer that enters them maps 2x2 to 1x1, and every
squeeze-excite block runs its two convolutions on a pooled 1x1 map. A one-pixel output sees only
the few input pixels under its kernel window, each through one known tap, so the convolution is
a matrix product (a per-channel weighted sum when depthwise) of the same parameters. oneDNN's
kernels spent far longer on those shapes, backward above all (1 thread, batch 64, forward and
backward): a 5x5 depthwise convolution of 960 channels on 1x1 maps took 16-24 ms against 0.8 ms
as a product, 10% of a mnasnet_a1 training step; the 5x5 stride-2 depthwise one of 672 channels
from 2x2 to 1x1 took 10.6 ms against 1.2 ms. The same idea on outputs larger than one pixel
(gathered tap matrices, unfold, shift-and-add) was slower than oneDNN at 4x4 and no faster at
2x2, so those stay convolutions.

Pointwise (1x1, stride 1) convolutions on a channels-last map are also a matrix product, of the
(N*H*W, C) view of the map; as `F.linear` they made whole training steps 1.07-1.14x faster at 1
thread and 1.01-1.12x at 2 (mnasnet_a1, mobilenet_v2, mnasnet_b1; Cascade Lake).

The swap is for training only; latency is measured on the network as built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MatmulConv2d(nn.Conv2d):
    """nn.Conv2d with the same parameters that computes one-pixel outputs and channels-last
    pointwise convolutions as matrix products, and everything else as the convolution."""

    @staticmethod
    def eligible(conv: nn.Conv2d) -> bool:
        """Numeric zero padding, no dilation, and dense or depthwise: one tap per input pixel."""
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        return (isinstance(conv.padding, tuple) and conv.dilation == (1, 1)
                and conv.padding_mode == "zeros" and (conv.groups == 1 or depthwise))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> MatmulConv2d:
        """The same layer, sharing (not copying) the weight and bias."""
        fast = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                   device="meta")
        fast.weight = conv.weight
        fast.bias = conv.bias
        return fast.train(conv.training)

    def window(self, height: int, width: int) -> tuple[int, int] | None:
        """Rows and columns of input the single output pixel sees, or None if it is not single."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if (height + 2 * ph - kh) // sh != 0 or (width + 2 * pw - kw) // sw != 0:
            return None  # more than one output pixel (or an invalid size: let the conv say so)
        rows, cols = min(height, kh - ph), min(width, kw - pw)  # input pixel (i, j) meets tap
        return (rows, cols) if rows > 0 and cols > 0 else None  # (i + ph, j + pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # batched; an unbatched (C, H, W) input takes the convolution
            seen = self.window(*x.shape[-2:])
            if seen is not None:
                return self._one_pixel(x, *seen)
            if (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                    and self.groups == 1 and not x.is_contiguous()  # NCHW stays a convolution
                    and x.is_contiguous(memory_format=torch.channels_last)):
                return self._pointwise(x)
        return super().forward(x)

    def _pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """A 1x1 convolution of an NHWC map is a linear layer over its pixels."""
        n, c, h, w = x.shape
        y = F.linear(x.permute(0, 2, 3, 1).reshape(-1, c), self.weight.reshape(-1, c), self.bias)
        return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)  # channels-last, like the input

    def _one_pixel(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """The output pixel is a product of the window's pixels and the taps they meet."""
        ph, pw = self.padding
        taps = self.weight[:, :, ph:ph + rows, pw:pw + cols]  # (out, in / groups, rows, cols)
        pixels = x[:, :, :rows, :cols].permute(0, 2, 3, 1)  # NHWC: a view when channels-last
        n = x.shape[0]
        if self.groups == 1:
            y = F.linear(pixels.reshape(n, -1), taps.permute(0, 2, 3, 1).reshape(len(taps), -1),
                         self.bias)
        else:  # depthwise: a weighted sum over the window, one weight per channel and pixel
            y = (pixels.reshape(n, rows * cols, -1)
                 * taps.permute(2, 3, 1, 0).reshape(rows * cols, -1)).sum(1)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(n, -1, 1, 1)


def matmul_convs(model: nn.Module) -> nn.Module:
    """Swap every eligible nn.Conv2d for a MatmulConv2d in place; the state_dict is unchanged."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and MatmulConv2d.eligible(child):
                setattr(parent, name, MatmulConv2d.from_conv(child))
    return model
