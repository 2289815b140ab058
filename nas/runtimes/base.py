"""What every inference runtime offers the latency protocol and the exporter.

A runtime turns a PyTorch network into the artifact that would ship (an ``.onnx`` file, an
ExecuTorch ``.pte`` program, an AOTInductor ``.pt2`` package) and loads it back as a predictor
that runs one batch. nas.latency times the predictor; nas.export writes the artifact.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import importlib.util
import io
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "int8")

Predictor = Callable[[torch.Tensor], torch.Tensor]  # one batch in, logits out (on the CPU)


class RuntimeUnavailable(ValueError):
    """The runtime's package is not installed: one line naming the extra that installs it."""


class UnsupportedSetting(ValueError):
    """The runtime cannot measure in this setting (precision, device): one line saying so."""


class ConversionError(ValueError):
    """The runtime's converter refused this network; carries the converter's own reason."""


@dataclass(frozen=True)
class Compiled:
    """A network converted for a runtime, loaded and ready to run."""

    runtime: str
    precision: str
    artifact: bytes | None  # the deployable file's bytes; None for eager PyTorch
    predict: Predictor
    convert_s: float  # seconds spent converting (and quantizing) the network


class Runtime(abc.ABC):
    """One way to run a network. Subclasses convert and load; this class checks and times."""

    name: str = ""
    packages: tuple[str, ...] = ()  # import names that must be present
    extra: str = ""  # pip extra that installs them: pip install -e ".[<extra>]"
    suffix: str = ""  # file name suffix of the artifact
    precisions: tuple[str, ...] = ("fp32",)
    devices: tuple[str, ...] = ("cpu",)

    def available(self) -> bool:
        return all(importlib.util.find_spec(p) is not None for p in self.packages)

    def check(self, *, precision: str = "fp32", device: str = "cpu") -> None:
        """Raise a one-line error if this runtime cannot measure in that setting here."""
        if not self.available():
            install = (f'pip install -e ".[{self.extra}]"' if self.extra else
                       "pip install -e . (nas depends on it)")
            raise RuntimeUnavailable(f"runtime {self.name!r} is not installed here; {install}")
        if precision not in PRECISIONS:
            raise UnsupportedSetting(f"precision {precision!r} is not allowed; expected one of "
                                     f"{list(PRECISIONS)}")
        if precision not in self.precisions:
            others = [r.name for r in _registry().values() if precision in r.precisions]
            raise UnsupportedSetting(f"runtime {self.name!r} has no {precision} path; "
                                     f"{precision} is measured in {' or '.join(others)}")
        dev = torch.device(device).type
        if dev not in self.devices:
            raise UnsupportedSetting(f"runtime {self.name!r} does not run on {dev} here; "
                                     f"its devices: {list(self.devices)}")

    @abc.abstractmethod
    def version(self) -> str:
        """The runtime's own version, part of every latency's context."""

    @abc.abstractmethod
    def convert(self, model: nn.Module, example: torch.Tensor, *, precision: str,
                calibration: torch.Tensor | None) -> bytes:
        """The deployable artifact of `model` (eval mode) for inputs shaped like `example`."""

    @abc.abstractmethod
    def load(self, artifact: bytes, *, threads: int, device: str) -> Predictor:
        """A predictor over `artifact` that computes on `threads` CPU threads."""

    def compile(self, model: nn.Module, example: torch.Tensor, *, threads: int = 1,
                precision: str = "fp32", calibration: torch.Tensor | None = None,
                device: str = "cpu") -> Compiled:
        """Convert, then load: what a deployment would do with this network."""
        self.check(precision=precision, device=device)
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            artifact = self.convert(model, example, precision=precision,
                                    calibration=calibration)
        except (RuntimeUnavailable, UnsupportedSetting, KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # the converter's own reason fails this candidate, not the run
            raise ConversionError(f"{self.name} could not convert the network: "
                                  f"{first_line(e)}") from e
        finally:
            model.train(was_training)
        convert_s = time.perf_counter() - start
        try:
            predict = self.load(artifact, threads=threads, device=device)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # the runtime refused what its converter wrote
            raise ConversionError(f"{self.name} could not load the converted network: "
                                  f"{first_line(e)}") from e
        return Compiled(self.name, precision, artifact, predict, convert_s)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def calibration_batches(calibration: torch.Tensor | None, example: torch.Tensor,
                        batches: int = 8) -> list[torch.Tensor]:
    """Batches shaped like `example` for post-training quantization.

    The given images (normalised, any count) split into batches of the example's size; None
    gives standard-normal images, as normalised inputs are (the scales then fit random data:
    enough to time the int8 kernels, not to keep accuracy)."""
    n = example.shape[0]
    if calibration is None:
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(example.shape, generator=gen) for _ in range(batches)]
    if calibration.shape[1:] != example.shape[1:]:
        calibration = nn.functional.interpolate(calibration.float(), size=example.shape[2:],
                                                mode="bilinear", align_corners=False)
    if len(calibration) < n:  # fewer images than one batch: repeat them to fill it
        calibration = calibration.repeat(-(-n // len(calibration)), 1, 1, 1)[:n]
    return [calibration[i:i + n].contiguous() for i in range(0, len(calibration) - n + 1, n)]


LATENCY_CALIBRATION_IMAGES = 8  # images that quantize an int8 network for its latency


def calibration_sample(images: Any, count: int, *, mean, std) -> torch.Tensor:
    """`count` training images (an ImageDataset) drawn with a fixed seed, normalised, NCHW:
    files are stored class by class, so the first images would all be of one class."""
    from nas.data import batches

    gen = torch.Generator().manual_seed(0)
    x, _ = next(batches(images, batch_size=min(count, len(images)), shuffle=True,
                        augment=False, generator=gen, mean=mean, std=std, channels_last=False))
    return x.contiguous()


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Converters' progress and native libraries' chatter kept out of a tool's output: the named
    Python loggers raised to ERROR, Python's stdout and stderr (the ONNX exporter prints its
    steps) and file descriptor 2 (where C++ code logs) sent to scratch for the duration.
    When an error escapes, what was said is written out after all (the reason is often only
    in the native log). Not for concurrent use: nothing converts two networks at once."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers)]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    sys.stderr.flush()
    stderr_fd = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            said = io.StringIO()
            failed = False
            try:
                with (contextlib.redirect_stdout(io.StringIO()),  # pybind11 sends C++ logs
                      contextlib.redirect_stderr(said)):  # to sys.stderr
                    yield
            except BaseException:
                failed = True
                raise
            finally:
                _flush_c_stdio()  # what C code buffered goes to the scratch, not to the user
                os.dup2(stderr_fd, 2)
                if failed:  # the error's own explanation is often only in the log: show it
                    scratch.seek(0)
                    text = scratch.read().decode(errors="replace") + said.getvalue()
                    if text.strip():
                        sys.stderr.write(text[-4000:])
    finally:
        os.close(stderr_fd)
        for lg, level in saved:
            lg.setLevel(level)


def _flush_c_stdio() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def _registry() -> dict[str, Runtime]:
    from nas.runtimes import RUNTIMES

    return RUNTIMES
