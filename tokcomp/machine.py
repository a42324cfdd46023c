"""What a number was measured on: CPU model and the SIMD paths its kernels take, threads, versions, GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# The CPU features that change which floating-point kernels run (and so the last bits of results).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
PACKAGES = ("tokcomp", "torch", "transformers", "lmms-eval", "numpy")


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    entries: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            entries[key.strip()] = value.strip()
    except OSError:
        pass
    return entries


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def kernel_flags() -> list[str]:
    """Which of KERNEL_FLAGS the CPU has."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def versions() -> dict[str, str | None]:
    """Python and the versions of the packages whose code computes the results."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def machine_info(device: torch.device | str = "cpu") -> dict:
    """CPU, its kernel paths (ATen's capability, SIMD flags), cores, torch threads, versions, GPU if any."""
    device = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cpu_flags": kernel_flags(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": device.type,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    info["python"] = platform.python_version()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_description(device: torch.device | str = "cpu") -> str:
    """One line: the GPU or the CPU with its threads, and torch's version."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
