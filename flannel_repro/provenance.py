"""What made an artifact: library versions and the device fingerprint.

The fingerprint is what "the same device" means for bit-for-bit replay: device type and model, CPU model, torch
thread count, ATen CPU capability, CUDA/cuDNN versions and the determinism settings. It goes into the trajectory
header, the tracking run and every verify report.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

PACKAGES = ("flannel-repro", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(device: torch.device) -> dict[str, Any]:
    fp: dict[str, Any] = {
        "device_type": device.type,
        "device_name": cpu_model(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "os": sys.platform,
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch": torch.__version__,
        "transformers": versions()["transformers"],
        "cuda": torch.version.cuda,
        "cudnn": None,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "tf32_matmul": None,
    }
    if device.type == "cuda":
        fp["device_name"] = torch.cuda.get_device_name(device)
        fp["cudnn"] = torch.backends.cudnn.version()
        fp["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        fp["cudnn_deterministic"] = torch.backends.cudnn.deterministic
    elif device.type == "mps":
        fp["device_name"] = "Apple MPS"
    return fp


# Keys whose difference makes a bit-for-bit rerun unlikely, in the order a report lists them.
GUARD_KEYS = (
    "device_type",
    "device_name",
    "cpu_model",
    "aten_cpu_capability",
    "torch_threads",
    "torch",
    "transformers",
    "cuda",
    "cudnn",
)


def fingerprint_mismatches(reference: dict[str, Any], here: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(k, reference.get(k), here.get(k)) for k in GUARD_KEYS if reference.get(k) != here.get(k)]
