"""nas.fastconv: matrix-product convolutions and depthwise weight gradients computed outside
oneDNN give the same function, gradients and parameters as nn.Conv2d, on the paths they claim."""

from unittest import mock

import pytest
import torch
from torch import nn

import nas.fastconv as fastconv
from nas.arch import load_architecture
from nas.fastconv import DepthwiseConv, MatmulConv2d, matmul_convs, onednn_depthwise_weight_grad
from nas.model import build_model
from nas.proxy import ProxyBudget, proxy_arch, training_model


def _pair(cin, cout, kernel, stride, groups, bias, padding=None):
    padding = kernel // 2 if padding is None else padding
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=bias)
    fast = MatmulConv2d.from_conv(nn.Conv2d(cin, cout, kernel, stride, padding,
                                              groups=groups, bias=bias))
    fast.load_state_dict(conv.state_dict())
    return conv, fast


def _same_as_conv(conv, fast, x, own=None, input_grad=True):
    xa, xb = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    ya = conv(xa)
    # the product must really be taken where it applies: a one-pixel output, or a pointwise
    # conv of a channels-last map (judged from the conv's own output, not from fastconv)
    pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and not x.is_contiguous()
    product = ya.shape[-2:] == (1, 1) or pointwise
    # and a depthwise conv takes its own weight gradient where oneDNN's depthwise kernel does
    # not apply (kernels over 3 wide, inputs smaller than the kernel plus the stride's offset),
    # if the map has at most 64 (input, output) pixel pairs, or at most 64 pixels and the conv
    # 64 channels or more
    if own is None:  # square geometries; the others say what they expect
        (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
        pairs = x.shape[-2] * x.shape[-1] * ya.shape[-2] * ya.shape[-1]
        own = (conv.groups > 1 and not product and (k > 3 or min(x.shape[-2:]) < k + (-p) % s)
               and (pairs <= 64 or conv.groups >= 64 and x.shape[-2] * x.shape[-1] <= 64))
    with mock.patch.object(nn.Conv2d, "_conv_forward", autospec=True,
                           side_effect=nn.Conv2d._conv_forward) as convolved, \
            mock.patch.object(DepthwiseConv, "apply", side_effect=DepthwiseConv.apply) as dw:
        yb = fast(xb)
    assert convolved.called != (product or own)
    assert dw.called == own
    torch.testing.assert_close(yb, ya)
    for layout in (torch.channels_last, torch.contiguous_format):  # the convolution's layout
        assert yb.is_contiguous(memory_format=layout) == ya.is_contiguous(memory_format=layout)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    if input_grad:
        torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad)  # unseen taps get 0
    if conv.bias is not None:
        torch.testing.assert_close(fast.bias.grad, conv.bias.grad)


@pytest.mark.parametrize("cin, cout, kernel, stride, groups, bias", [
    (8, 16, 3, 1, 1, False), (8, 16, 5, 2, 1, True), (16, 4, 1, 1, 1, True),  # dense
    (8, 16, 3, 2, 1, False), (12, 12, 3, 2, 12, False),  # 2x2 -> 1x1 through a 2x2 window
    (12, 12, 3, 1, 12, False), (12, 12, 5, 2, 12, True)])  # depthwise
@pytest.mark.parametrize("size", [1, 2, 3])  # one output pixel takes the product, more the conv
def test_same_outputs_and_gradients_as_the_convolution(cin, cout, kernel, stride, groups, bias,
                                                       size):
    conv, fast = _pair(cin, cout, kernel, stride, groups, bias)
    x = torch.randn(4, cin, size, size).to(memory_format=torch.channels_last)
    _same_as_conv(conv, fast, x)


@pytest.mark.parametrize("size, kernel, stride, padding, groups, window", [
    (1, 3, 1, 1, 1, (1, 1)),  # centre tap only
    (2, 5, 2, 2, 1, (2, 2)),  # the stride-2 entry into the 1x1 stages: 4 pixels, 4 taps
    (2, 5, 2, 2, 6, (2, 2)),
    (3, 3, 1, 0, 6, (3, 3)),  # 'valid' padding: every tap meets a pixel
    (4, 3, 4, 1, 1, (2, 2)),  # a stride past the input: only the window's pixels count
    (3, 3, 2, 1, 1, None)])  # 2x2 output: left to the convolution
def test_the_window_one_output_pixel_sees(size, kernel, stride, padding, groups, window):
    conv, fast = _pair(6, 6, kernel, stride, groups, True, padding)
    assert fast.window(size, size) == window
    x = torch.randn(3, 6, size, size).to(memory_format=torch.channels_last)
    _same_as_conv(conv, fast, x)


def test_a_pointwise_conv_keeps_the_input_layout():
    conv, fast = _pair(8, 16, 1, 1, 1, True)
    x = torch.randn(2, 8, 5, 5)  # NCHW in: the convolution, NCHW out
    torch.testing.assert_close(fast(x), conv(x))
    assert fast(x).is_contiguous()
    _same_as_conv(conv, fast, x.to(memory_format=torch.channels_last))  # the linear path


def test_unbatched_and_one_channel_inputs_behave_as_the_convolution():
    conv, fast = _pair(1, 4, 1, 1, 1, True)
    x = torch.randn(2, 1, 3, 3)  # NCHW and channels-last at once: stays NCHW, like the conv
    torch.testing.assert_close(fast(x), conv(x))
    assert fast(x).is_contiguous()
    conv, fast = _pair(6, 6, 3, 1, 6, True)
    x = torch.randn(6, 1, 1)  # unbatched
    torch.testing.assert_close(fast(x), conv(x))


def test_only_dense_or_depthwise_undilated_zero_padded_convolutions_are_swapped():
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)  # neither dense nor depthwise
    dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
    reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
    same = nn.Conv2d(8, 8, 3, padding="same")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=0),
                          grouped, dilated, reflect, same)
    matmul_convs(model)
    assert [type(m) for m in model] == [MatmulConv2d] * 2 + [nn.Conv2d] * 4


def test_the_training_model_is_the_built_network():
    arch = proxy_arch(load_architecture("mnasnet_a1"), ProxyBudget(), 32)  # SE; ends at 1x1
    torch.manual_seed(0)
    built = build_model(arch, num_classes=10).eval()
    torch.manual_seed(0)
    fast = training_model(arch, 10).eval()
    swapped = [m for m in fast.modules() if isinstance(m, MatmulConv2d)]
    assert len(swapped) > 20  # every SE pair, the 1x1-map stages and the head conv
    assert built.state_dict().keys() == fast.state_dict().keys()  # checkpoints load in both
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.to(memory_format=torch.channels_last)), built(x),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel, stride, padding, size, fast", [  # checked with ONEDNN_VERBOSE
    (3, 1, 1, 2, False), (3, 1, 1, 3, True), (3, 1, 1, 16, True), (3, 2, 1, 3, False),
    (3, 2, 1, 4, True), (3, 2, 0, 3, True), (3, 3, 1, 6, True), (2, 2, 0, 4, True),
    (5, 1, 2, 8, False), (5, 2, 2, 8, False), (3, 1, 1, 1, False),
    # oneDNN limits the kernel's width and stride, and the input's height
    ((5, 3), 1, (0, 1), 5, True), ((3, 5), 1, (1, 2), 6, False), (1, (2, 1), 0, 4, True),
    (3, 1, (0, 1), (5, 2), True), (3, (1, 2), 1, (2, 6), False), (3, (2, 1), 1, (3, 5), False),
    ((5, 3), (2, 1), (2, 1), (8, 6), True),  # a top padding over 1 must be a stride multiple
    ((5, 3), (3, 1), (2, 1), (9, 6), False)])
def test_which_depthwise_weight_gradients_onednn_does_with_its_depthwise_kernel(
        kernel, stride, padding, size, fast):
    two = [v if isinstance(v, tuple) else (v, v) for v in (kernel, stride, padding, size)]
    assert onednn_depthwise_weight_grad(*two) == fast


@pytest.mark.parametrize("channels, kernel, stride, size, bias, strategy", [
    (16, 3, 1, (2, 2), False, "_weight_grad_by_pairs"),  # 16 pixel pairs
    (16, 5, 1, (2, 2), True, "_weight_grad_by_pairs"),
    (16, 5, 2, (4, 4), False, "_weight_grad_by_pairs"),  # 16 x 4 pairs
    (16, 3, 2, (3, 3), False, "_weight_grad_by_pairs"),  # 9 x 4 pairs; oneDNN needs 4 rows
    (64, 3, 1, (2, 5), True, "_weight_grad_by_conv"),  # a 2-row input: 100 pairs
    (64, 5, 1, (4, 4), False, "_weight_grad_by_conv"),
    (64, 5, 2, (8, 7), True, "_weight_grad_by_conv"),  # the stride dilates the gradient kernel
    (48, 5, 1, (4, 4), False, None),  # few channels: oneDNN's generic kernel was faster
    (64, 5, 2, (16, 16), True, None)])  # and on 16x16 maps no slower
@pytest.mark.parametrize("channels_last", [True, False])
def test_depthwise_weight_gradients_oneDNN_would_compute_slowly(channels, kernel, stride, size,
                                                                bias, strategy, channels_last):
    conv, fast = _pair(channels, channels, kernel, stride, channels, bias)
    x = torch.randn(5, channels, *size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert _strategies_used(conv, fast, x) == {s: int(s == strategy) for s in STRATEGIES}


STRATEGIES = ("_weight_grad_by_pairs", "_weight_grad_by_conv")


def _strategies_used(conv, fast, x, **expect) -> dict[str, int]:
    """_same_as_conv, counting the calls of each of our weight-gradient strategies."""
    with mock.patch(f"nas.fastconv.{STRATEGIES[0]}",
                    side_effect=getattr(fastconv, STRATEGIES[0])) as pairs, \
            mock.patch(f"nas.fastconv.{STRATEGIES[1]}",
                       side_effect=getattr(fastconv, STRATEGIES[1])) as by_conv:
        _same_as_conv(conv, fast, x, **expect)
    return {STRATEGIES[0]: pairs.call_count, STRATEGIES[1]: by_conv.call_count}


def test_depthwise_without_a_weight_gradient_is_the_convolution():
    conv, fast = _pair(8, 8, 5, 1, 8, True)
    x = torch.randn(2, 8, 4, 4)
    with mock.patch.object(DepthwiseConv, "apply") as dw:
        with torch.no_grad():
            torch.testing.assert_close(fast(x), conv(x))
        fast.weight.requires_grad_(False)
        fast(x.requires_grad_())  # only the input's gradient: oneDNN's own backward
        fast.weight.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast(x)
    assert not dw.called


@pytest.mark.parametrize("kernel, stride, padding, size, strategy", [
    ((3, 5), (2, 1), (1, 2), (2, 3), "_weight_grad_by_pairs"),  # 6 x 3 pairs
    ((3, 5), (2, 1), (1, 2), (7, 6), "_weight_grad_by_conv"),  # 42 x 24 pairs
    ((5, 3), (1, 2), (2, 1), (3, 9), "_weight_grad_by_conv")])  # 3 rows < 5: not oneDNN's
def test_non_square_depthwise_weight_gradients(kernel, stride, padding, size, strategy):
    conv, fast = _pair(64, 64, kernel, stride, 64, True, padding)
    x = torch.randn(3, 64, *size).to(memory_format=torch.channels_last)
    assert _strategies_used(conv, fast, x, own=True) == {s: int(s == strategy) for s in STRATEGIES}


def test_a_weight_gradient_without_an_input_gradient():
    conv, fast = _pair(16, 16, 5, 1, 16, True)
    _same_as_conv(conv, fast, torch.randn(4, 16, 2, 2), own=True, input_grad=False)


@pytest.mark.parametrize("case", ["float64", "empty batch"])
def test_other_dtypes_and_empty_batches_are_the_convolution(case):
    conv, fast = _pair(64, 64, 5, 1, 64, True)
    x = torch.randn(0 if case == "empty batch" else 2, 64, 8, 8)
    if case == "float64":
        conv, fast, x = conv.double(), fast.double(), x.double()
    _same_as_conv(conv, fast, x, own=False)


def test_a_wrong_channel_count_is_refused_like_the_convolution():
    conv, fast = _pair(64, 64, 5, 1, 64, False)
    x = torch.randn(2, 32, 8, 8)
    with pytest.raises(RuntimeError) as expected:
        conv(x)
    with pytest.raises(RuntimeError) as got:
        fast(x)
    assert str(got.value) == str(expected.value)


def test_the_cached_pair_taps_serve_any_later_backward():
    fastconv._pair_taps.cache_clear()
    with torch.inference_mode():  # first seen here: the cache must not keep inference tensors
        taps = fastconv._pair_taps((2, 2), (2, 2), (3, 3), (1, 1), (1, 1))
    assert not any(t.is_inference() for t in taps)
