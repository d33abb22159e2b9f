"""What made an artifact: library versions, the device fingerprint, and the code (git) and DVC experiment.

The fingerprint is what "the same device" means for bit-for-bit replay: device type and model, CPU model, torch
thread count, ATen CPU capability, CUDA/cuDNN versions, the determinism settings, and the environment variables that
make oneDNN, MKL, OpenMP or ATen pick other kernels (`kernel_env`: DNNL_MAX_CPU_ISA=AVX2 alone changes the bits).
It goes into the trajectory header, the tracking run and every verify report.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flannel_repro.core.config import bounded_int
from flannel_repro.core.errors import FlannelError

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy")


def versions() -> dict[str, str]:
    """Python's, flannel-repro's and each of PACKAGES' version. flannel-repro's is the running code's own
    (`__version__`), not the installed metadata's, which an editable install keeps from its install when the
    checkout changes: a partial run is then not resumed by other code than the code that recorded it."""
    from flannel_repro import __version__

    out = {"python": platform.python_version(), "flannel-repro": __version__}
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


# Environment variables read by the CPU math libraries torch calls: they choose the kernels (an ISA limit, a CPU type,
# a reproducibility mode, a reduction order), and so the bits. The thread counts are `torch_threads`; verbose and
# logging switches change no number.
KERNEL_ENV_PREFIXES = ("DNNL_", "ONEDNN_", "MKLDNN_", "MKL_", "KMP_", "OMP_", "GOMP_", "OPENBLAS_", "BLIS_", "ATEN_")
KERNEL_ENV_NAMES = ("NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
_NO_BITS = ("VERBOSE", "LOG", "NUM_THREADS", "THREAD_LIMIT", "DISPLAY_ENV", "WARNINGS", "CACHE")


def kernel_env(env: Mapping[str, str]) -> dict[str, str]:
    """The kernel-selecting variables set in `env`, sorted: {} on a machine that sets none."""
    return {k: v for k, v in sorted(env.items())
            if (k.startswith(KERNEL_ENV_PREFIXES) or k in KERNEL_ENV_NAMES) and not any(w in k for w in _NO_BITS)}


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
        "kernel_env": kernel_env(os.environ),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
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
    "kernel_env",
    "mkldnn_enabled",
    "float32_matmul_precision",
)
# Keys a fingerprint recorded before they were known lacks: not compared (that record cannot tell).
_ADDED_LATER = {"kernel_env", "mkldnn_enabled", "float32_matmul_precision"}


def fingerprint_mismatches(reference: dict[str, Any], here: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(k, reference.get(k), here.get(k)) for k in GUARD_KEYS
            if reference.get(k) != here.get(k) and not (k in _ADDED_LATER and k not in reference)]


def git_tags(root: Path) -> dict[str, str]:
    """Commit and branch of the code that ran, as MLflow's own source tags (shown in the UI), and its dirty flag;
    `git.error` says why there is no commit."""
    try:
        import git
    except ImportError as e:  # gitpython refuses to import when no git executable is installed
        return {"git.error": f"commit unknown ({e})"}
    try:
        repo = git.Repo(root, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return {"git.error": "not a git repository"}
    with repo:
        try:
            commit = repo.head.commit.hexsha
        except ValueError:
            return {"git.error": "no commits yet"}
        try:
            branch = repo.active_branch.name
        except TypeError:
            branch = "(detached HEAD)"
        dirty = repo.is_dirty()
    return {
        "mlflow.source.git.commit": commit,
        "mlflow.source.git.branch": branch,
        "git.dirty": str(dirty).lower(),
    }


def dvc_tags(env: Mapping[str, str]) -> dict[str, str]:
    """`dvc exp run` (queued or not) sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV in the stage's environment."""
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
    return {tag: env[var] for var, tag in names.items() if env.get(var)}


def fingerprint_tags(fp: Mapping[str, Any]) -> dict[str, str]:
    """`fingerprint.<key>` per key, once (the UI filters on `tags.fingerprint.device_type`; digests.json holds the
    whole fingerprint as JSON)."""
    return {f"fingerprint.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in fp.items()}


# Header metadata (and digest-manifest fields) holding JSON objects; for some, objects of strings.
PROVENANCE = {"params": object, "fingerprint": object, "versions": str, "inputs": str}


def checked_metadata(metadata: Mapping[str, str], fmt: str, path: Path) -> dict[str, str]:
    """A trajectory header's metadata, refused unless it is of format `fmt` with provenance of the right JSON types."""
    if metadata.get("format") != fmt:
        raise FlannelError(f"{path}: not a flannel-repro trajectory (metadata format is {metadata.get('format')!r}); "
                           "give a file written by `flannel-repro train`")
    provenance = {}
    for key in PROVENANCE:
        try:
            provenance[key] = json.loads(metadata.get(key, "null"), parse_int=bounded_int)
        except (ValueError, RecursionError) as e:  # not JSON, an integer too long to convert, nested too deeply
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:100]
            raise FlannelError(f"{path}: the trajectory's recorded {key} is not JSON ({why}); the file is corrupt or "
                               "was edited: re-record it with `flannel-repro train`") from None
    check_provenance(provenance, str(path))
    return dict(metadata)


def check_provenance(doc: Mapping[str, Any], source: str) -> None:
    """Refuse recorded provenance of the wrong JSON type (a fingerprint that is a list, a sha256 that is a number)
    before anything reads it."""
    for key, values in PROVENANCE.items():
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(v, values) for v in value.values()):
            kinds = {list: "a JSON list", str: "a JSON string", bool: "a boolean", int: "a number", float: "a number"}
            kind = "an object with a value that is not a string" if isinstance(value, dict) else kinds[type(value)]
            raise FlannelError(f"{source}: the recorded {key} is {kind}, not a JSON object"
                               f"{' of strings' if values is str else ''}; the record is corrupt or was edited: "
                               "re-record it with `flannel-repro train`")
