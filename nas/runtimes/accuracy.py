"""Accuracy of a network as a runtime runs it: what an int8 network keeps after quantization."""

from __future__ import annotations

import torch
from torch import nn

from nas.data import ImageDataset, batches
from nas.runtimes import get_runtime
from nas.runtimes.base import calibration_sample

CALIBRATION_IMAGES = 512  # training images that calibrate the quantization (min-max)
BATCH = 100  # the converted network's fixed batch; a last, shorter batch is padded


def calibration_count(available: int) -> int:
    """Images that calibrate: whole batches of BATCH, at most CALIBRATION_IMAGES (one batch,
    repeated to fill it, when there are fewer)."""
    return max(min(CALIBRATION_IMAGES, available) // BATCH * BATCH, min(available, BATCH))


def runtime_accuracy(model: nn.Module, test: ImageDataset, calibration: ImageDataset, *,
                     runtime: str, precision: str, mean, std, threads: int = 1) -> float:
    """Top-1 accuracy on `test` of `model` converted for `runtime` in `precision`, calibrated
    (int8) on a seeded draw of up to CALIBRATION_IMAGES of the `calibration` images
    (training images)."""
    def normalised(split: ImageDataset, size: int):
        return batches(split, batch_size=size, shuffle=False, augment=False, mean=mean, std=std,
                       channels_last=False)

    calib = None
    if precision != "fp32":
        calib = calibration_sample(calibration, calibration_count(len(calibration)),
                                   mean=mean, std=std)
    example = torch.zeros(BATCH, *test.images.shape[1:])
    compiled = get_runtime(runtime).compile(model.eval(), example, threads=threads,
                                            precision=precision, calibration=calib)
    correct = 0
    for x, y in normalised(test, BATCH):
        n = len(x)
        if n < BATCH:
            x = torch.cat([x, x.new_zeros(BATCH - n, *x.shape[1:])])
        correct += (compiled.predict(x)[:n].argmax(1) == y).sum().item()
    return correct / max(len(test), 1)
