"""The checks a train run makes before it reads or trains anything: outputs, room, memory, and each input."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import free_bytes
from flannel_repro.core.paths_guard import check_files, stage_files
from flannel_repro.data.corpus import read_corpus
from flannel_repro.data.masks import load_masks
from flannel_repro.data.tokenizer import load_tokenizer
from flannel_repro.trajectory.layout import trajectory_layout

# Memory a run keeps per step: the per-step scalars and token motion (nine floats) and what torch and the Trainer
# keep. Measured: resident memory grew 768 KB from step 200 to step 1,800 of the tiny-step case (480 B a step),
# before the five indicator floats (recording/indicators.py), 32 B each as Python floats in lists.
BYTES_PER_STEP = 672


def check_before_training(params: Params, root: Path, write: bool, resume: bool = False) -> None:
    """Everything about the outputs that would otherwise fail after a full run, checked before anything is read:
    the output paths (paths_guard), the trajectory's size against the file size limit and (unless a resume reuses
    its reserved partial file) its folder's free space, and the per-step records against the memory available."""
    cfg = params.train
    if write:
        check_files(stage_files("train", params, root))
        size = trajectory_bytes(params)
        folder, fix = params.paths.under(root).trajectory.parent, "record fewer steps (train.steps) or less (record.*)"
        limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limit != resource.RLIM_INFINITY and size > limit:
            raise FlannelError(f"{folder}: cannot reserve {size:,} bytes for the trajectory (File too large: this "
                               f"process may write files of at most {limit:,} bytes (ulimit -f)); raise the limit or "
                               f"{fix}")
        free = free_bytes(folder)
        if not resume and size > free:
            raise FlannelError(f"{folder}: cannot reserve {size:,} bytes for the trajectory (No space left on device: "
                               f"{free:,} bytes free); free space there or set paths.trajectory to a folder with room, "
                               f"or {fix}")
    need = cfg.num_runs * (cfg.steps + 1) * BYTES_PER_STEP
    available = available_memory()
    if available is not None and need > available:
        raise FlannelError(f"params: train.steps = {cfg.steps:,} x train.num_runs = {cfg.num_runs} keeps about "
                           f"{need / 2**30:.1f} GiB of per-step records in memory, more than the "
                           f"{available / 2**30:.1f} GiB available; record fewer steps")


# The packed form (record.format: packed) is budgeted at half the safetensors form's per-step bytes: measured 3.03x
# smaller on the default run (docs/packed.md), so the estimate leaves room for data that compresses worse. Its
# frames grow as it trains (nothing can be reserved ahead): a disk that fills anyway ends the run in one line, with
# the partial file kept for `train --resume`.
PACKED_BUDGET = 2


def trajectory_bytes(params: Params) -> int:
    """The bytes the trajectory needs on disk: every tensor for safetensors (the header adds little); for the packed
    form, the per-step tensors at PACKED_BUDGET times smaller and the rest as it is."""
    layout = trajectory_layout(params)
    if params.record.format != "packed":
        return sum(s.nbytes for s in layout.values())
    per_step = {n for n, s in layout.items() if f"digest_{n}" in layout}
    return sum(s.nbytes // (PACKED_BUDGET if n in per_step else 1) for n, s in layout.items())


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where the system does not say."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    return None


def check_inputs(params: Params, root: Path) -> None:
    """Each input's own checks, in pipeline order and without encoding anything, so that a problem is blamed on the
    first file that has it: a tokenizer of the wrong size, not the masks made for it."""
    paths, v = params.paths.under(root), params.model.vocab_size
    read_corpus(paths.corpus)
    load_tokenizer(paths.tokenizer, v)
    load_masks(paths.masks, v)
