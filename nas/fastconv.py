"""Convolutions that are matrix products, computed as such, for training at 32x32.

Trained on CIFAR's 32x32 images through the deployed strides, the last stages of a MnasNet-style
network run on 1x1 maps, and every squeeze-excite block on a pooled 1x1 map: a one-pixel output
is a matrix product (a per-channel weighted sum when depthwise) of the same parameters, which
oneDNN computed many times slower, backward above all. Pointwise convolutions on channels-last
maps are products too (as `F.linear`). Depthwise weight gradients that oneDNN would send to its
generic grouped kernel (5x5 kernels, 3x3 on maps smaller than the kernel) are computed another
way where that measured faster. The forward pass and the input gradient stay with oneDNN.

The swap is for training only; latency is measured on the network as built. Measurements:
docs/proxy.md ("nas.fastconv") and benchmarks/results/fastconv_steps_cascadelake.txt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MatmulConv2d(nn.Conv2d):
    """nn.Conv2d with the same parameters that computes one-pixel outputs and channels-last
    pointwise convolutions as matrix products, the weight gradient of depthwise convolutions that
    oneDNN would send to its generic kernel by `DepthwiseConv`, and the rest as the convolution."""

    own_depthwise_grad = True  # False: every depthwise weight gradient by oneDNN (benchmarks)

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
            by = self._own_weight_grad(x)
            if by is not None:
                return DepthwiseConv.apply(x, self.weight, self.bias, self.stride, self.padding, by)
            if (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                    and self.groups == 1 and not x.is_contiguous()  # NCHW stays a convolution
                    and x.is_contiguous(memory_format=torch.channels_last)):
                return self._pointwise(x)
        return super().forward(x)

    def _own_weight_grad(self, x: torch.Tensor) -> Callable | None:
        """How a depthwise conv training on the CPU in float32 gets its weight gradient faster
        than from oneDNN, if it can."""
        if (self.own_depthwise_grad and self.groups > 1 and x.device.type == "cpu"
                and x.dtype == self.weight.dtype == torch.float32 and x.shape[0] > 0
                and self.weight.requires_grad and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu")):
            return depthwise_weight_grad(self.kernel_size, self.stride, self.padding,
                                         x.shape[-2:], self.groups)
        return None

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


def onednn_depthwise_weight_grad(kernel: tuple[int, int], stride: tuple[int, int],
                                 padding: tuple[int, int], size: Sequence[int]) -> bool:
    """Whether oneDNN computes this depthwise weight gradient with its depthwise kernel (the
    conditions of its jit_uni_dw_conv_bwd_weights), rather than the generic grouped one."""
    (kh, kw), (sh, sw), (ph, pw), (h, w) = kernel, stride, padding, size
    bottom = max(0, (h + 2 * ph - kh) // sh * sh + kh - h - ph)  # padding the last window
    right = max(0, (w + 2 * pw - kw) // sw * sw + kw - w - pw)  # reaches
    return (kw <= 3 and sw <= kw and max(ph, bottom) <= kh // 2 and max(pw, right) <= kw // 2
            and h >= kh + (-ph) % sh and all(p <= 1 or p % sh == 0 for p in (ph, bottom)))


MAX_PIXEL_PAIRS = 64  # (input, output) pixel pairs up to which the pair product is used
MIN_CONV_CHANNELS = 64  # below, or on maps of more than MAX_CONV_PIXELS, the gradient as a
MAX_CONV_PIXELS = 64  # convolution was no faster than oneDNN's


def depthwise_weight_grad(kernel: tuple[int, int], stride: tuple[int, int],
                          padding: tuple[int, int], size: Sequence[int],
                          channels: int) -> Callable | None:
    """How to get this depthwise weight gradient faster than oneDNN's generic kernel, or None.

    Whole backward against oneDNN's, over the depthwise layers of 30 sampled architectures
    (batch 64, 2 threads, Cascade Lake): 0.13-1.08x the time by pairs; as a convolution,
    0.56-0.93x from 64 channels on maps up to 8x8, but 0.96-1.00x on 16x16 maps and 0.94-1.79x
    below 64 channels, so not used there."""
    if onednn_depthwise_weight_grad(kernel, stride, padding, size):
        return None
    out = [(n + 2 * p - k) // s + 1 for k, s, p, n in zip(kernel, stride, padding, size,
                                                          strict=True)]
    if size[0] * size[1] * out[0] * out[1] <= MAX_PIXEL_PAIRS:
        return _weight_grad_by_pairs
    if channels >= MIN_CONV_CHANNELS and size[0] * size[1] <= MAX_CONV_PIXELS:
        return _weight_grad_by_conv
    return None


class DepthwiseConv(torch.autograd.Function):
    """A depthwise convolution by oneDNN, forward and input gradient; its weight gradient by
    `weight_grad` (`depthwise_weight_grad` picks it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, weight_grad):
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding
        ctx.weight_grad = weight_grad
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, (1, 1), False, (0, 0), weight.shape[0],
                (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            grad_w = ctx.weight_grad(x, grad, weight.shape[-2:], stride, padding)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


@functools.cache
def _pair_taps(size: tuple[int, int], out: tuple[int, int], kernel: tuple[int, int],
               stride: tuple[int, int], padding: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Which (input pixel, output pixel) pairs meet through a tap, and which tap."""
    with torch.inference_mode(False):  # cached: must serve any later backward, even a graph's
        q, o = torch.arange(size[0] * size[1])[:, None], torch.arange(out[0] * out[1])[None]
        dy = q // size[1] - stride[0] * (o // out[1]) + padding[0]
        dx = q % size[1] - stride[1] * (o % out[1]) + padding[1]
        meet = ((dy >= 0) & (dy < kernel[0]) & (dx >= 0) & (dx < kernel[1])).flatten()
        return meet.nonzero().flatten(), (dy * kernel[1] + dx).flatten()[meet]


def _weight_grad_by_pairs(x, grad, kernel, stride, padding) -> torch.Tensor:
    """Each tap's gradient sums x(input pixel) * grad(output pixel) over the pairs it joins."""
    n, c = x.shape[:2]
    pairs, taps = _pair_taps(tuple(x.shape[-2:]), tuple(grad.shape[-2:]), tuple(kernel),
                             tuple(stride), tuple(padding))
    xs = x.permute(0, 2, 3, 1).reshape(n, -1, 1, c)
    gs = grad.permute(0, 2, 3, 1).reshape(n, 1, -1, c)
    products = (xs * gs).sum(0).reshape(-1, c)  # (input pixels x output pixels, channels)
    w = x.new_zeros(kernel[0] * kernel[1], c).index_add_(0, taps, products[pairs])
    return w.t().reshape(c, 1, *kernel)


def _weight_grad_by_conv(x, grad, kernel, stride, padding) -> torch.Tensor:
    """Each (image, channel) input convolved with its output gradient as the kernel (dilated by
    the stride), summed over images: a depthwise forward convolution, which oneDNN does well."""
    n, c, h, w = x.shape
    images = x.permute(2, 3, 0, 1).reshape(1, h, w, n * c).permute(0, 3, 1, 2)
    kernels = grad.reshape(n * c, 1, *grad.shape[-2:])
    taps = F.conv2d(images, kernels, None, 1, padding, stride, n * c)
    return taps[:, :, :kernel[0], :kernel[1]].reshape(n, c, *kernel).sum(0).unsqueeze(1)


def matmul_convs(model: nn.Module) -> nn.Module:
    """Swap every eligible nn.Conv2d for a MatmulConv2d in place; the state_dict is unchanged."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and MatmulConv2d.eligible(child):
                setattr(parent, name, MatmulConv2d.from_conv(child))
    return model
