"""Static cost of a network: parameters and multiply-adds (counted by torch, not by hand)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Trainable and frozen parameters alike, as papers report them."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int = 224, in_channels: int = 3) -> int:
    """Multiply-adds of one image's forward pass (torch counts FLOPs = 2 x MACs)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_channels, input_size, input_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2
