"""Arithmetic and threads for the receiver's networks, chosen by what the hardware runs fast.

- ``--precision auto`` picks bf16 autocast only where the hardware has bf16 arithmetic: a CPU
  with AVX512-BF16 or AMX (``/proc/cpuinfo`` flags), a CUDA GPU that supports it (else fp16 on
  CUDA). Elsewhere fp32: on a CPU without them, bf16 convolutions are emulated and many times
  slower (measured on an AMD EPYC with AVX2 only, docs/RESULTS.md). Weights stay fp32;
  autocast runs convolutions and matrix products in the low precision and keeps normalisation
  in fp32, which is what holds quality (PSNR against fp32 in ``bench/bench_receiver.py``).
- On the CPU, convolution weights go to channels-last memory format, which oneDNN runs about
  20% faster than NCHW for these small convolutions.
- The default number of torch threads is the cores this process may run on minus the load
  average at start-up: on a busy machine, threads that wait for a core stall every
  convolution (2 threads on a loaded 2-core machine were 4.4x slower than 1).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from mvld.common.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "choose_threads",
    "cpu_flags",
    "inference_context",
    "prepare_module",
    "resolve_precision",
]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of the first CPU in ``cpuinfo``; empty where it cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve_precision(
    precision: str, device: torch.device, flags: Callable[[], set[str]] = cpu_flags
) -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``; ``auto`` follows the hardware."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and flags() & set(CPU_BF16_FLAGS):
            return torch.bfloat16
        return torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "--precision fp16 is for CUDA GPUs; on the CPU use bf16 (fast only "
            "with AVX512-BF16 or AMX) or fp32"
        )
    return _DTYPES[precision]


def inference_context(
    device: torch.device, dtype: torch.dtype
) -> contextlib.AbstractContextManager[object]:
    """Autocast to ``dtype`` on ``device``, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def prepare_module(module: ModuleT) -> ModuleT:
    """An inference copy of ``module``: eval mode, channels-last convolutions on the CPU.

    A copy, so the caller's model (its tensors' layout) is left as it was.
    """
    parameter = next(module.parameters())
    prepared = copy.deepcopy(module).eval()
    if parameter.device.type == "cpu" and any(p.ndim == 4 for p in prepared.parameters()):
        # torch's stubs omit Module.to's memory_format keyword, which it documents and takes
        prepared.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return prepared


def choose_threads(
    requested: int | None, *, cores: int | None = None, load: float | None = None
) -> int:
    """Torch threads: ``requested``, else the usable cores minus the 1-minute load average.

    ``cores``/``load`` default to this process's CPU affinity and ``os.getloadavg()``.
    """
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads must be > 0, got {requested}")
        return requested
    if cores is None:
        cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    return max(1, min(cores, math.floor(cores - load + 0.5)))
