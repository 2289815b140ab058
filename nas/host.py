"""What this process runs on, and the process-wide settings every tool shares: the CPU's name
(what latency is keyed by), the CPUs this process may use, glibc's allocator pinned for steady
timings and trainings, and telling an out-of-memory failure from a bug."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import re
from pathlib import Path

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's maximum on 64-bit
_TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


# widest first; avx512_vnni tells Cascade Lake from Skylake-SP, which share family 6 model 85
_VECTOR_ISAS = ("amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "avx", "sse4_2")


@functools.lru_cache(maxsize=4)
def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU as /proc/cpuinfo describes it, precise enough to tell two hosts' timings apart.

    Cloud VMs often name every generation alike ("AMD EPYC"), so the family/model numbers and
    the widest vector extension are added: a Zen 3 and a Zen 4 VM both called "AMD EPYC" ran
    these networks 1.4-1.5x apart, and must not share latency-cache entries or a study.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the first processor's block is enough
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        flags = set(fields.get("flags", "").split())
        isa = next((f for f in _VECTOR_ISAS if f in flags), "")
        name += (f" (family {fields['cpu family']} model {fields['model']}"
                 f"{', ' + isa if isa else ''})")
    return name


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the host's count)."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def pin_malloc_thresholds() -> bool:
    """Stop glibc from mmapping and unmapping activation buffers in every run (docs/latency.md)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1 and ok


def is_out_of_memory(e: BaseException) -> bool:
    """torch's CPU allocator failure (a RuntimeError with a C++ report) or CUDA's OOM error."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def failed_allocation(e: BaseException, what: str = "tensor") -> str:
    """'a 16.0 GiB weight could not be allocated', from torch's multi-line report."""
    size = re.search(r"allocate (\d+(?:\.\d+)?) ?(bytes|[KMGT]iB)", str(e))
    if size is None:
        return f"a {what} could not be allocated"
    scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[size.group(2)]
    return f"a {float(size.group(1)) * scale / 2**30:.1f} GiB {what} could not be allocated"
