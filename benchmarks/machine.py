"""The machine a benchmark ran on, printed first by every benchmark: timings compare only within one run."""

from __future__ import annotations

import platform

import torch

from memlm.runtime.threads import available_cores


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): the two-stage screen and bfloat16
    models pay only there."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def describe() -> str:
    """One line: CPU, cores, torch's vector capability, native bfloat16, torch and its threads."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"CPU: {cpu_name()}, {available_cores()} cores, torch capability {torch.backends.cpu.get_cpu_capability()}"
            f", native bfloat16 {'yes' if native_bfloat16() else 'no'}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")
