"""Compare two trajectory files step by step: where they part, and how far apart W drifts afterwards.

Meant for runs that should differ only in what is being studied: the seeds, the thread count or the device (one
thread against two, CPU against CUDA, seed 42 against 43). Everything else that shapes the numbers (model, optimizer,
schedule, steps, what is recorded, the input files) must match, or the comparison is refused with the difference
named. Files are read one (V, H) slice at a time, and steps whose digests agree are not read at all. With a
record.steps schedule there is one row per recorded step, and the losses of every step are compared too (a loss that
differs at a step between two recorded ones is the first divergence). Two files with different schedules are refused:
a row compares W at one training step in both, and a comparison over the common steps only would report a verdict
on fewer steps than either file holds without saying which.

    result = diff(Path("a.safetensors"), Path("b.safetensors"), root=Path("."))
    result.first            # (run, step, tensor) of the first difference, or None
    write_csv(result, Path("reports/diff.csv")); write_plot(result, Path("reports/diff.png"))
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from flannel_repro.audit.bits import CHECK_ORDER, f32_bits
from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import atomic_output, sha256_file
from flannel_repro.core.plots import figure, save_png
from flannel_repro.data.masks import load_masks
from flannel_repro.trajectory.file import Trajectory, load_trajectory
from flannel_repro.trajectory.layout import recorded_tensors
from flannel_repro.trajectory.notebook import NotebookTrajectory, is_notebook_file, open_notebook

# Params that may differ between A and B: the point of a diff. Sections listed whole are locations and logging.
ALLOWED = {"train.init_seed", "train.train_seed", "train.num_threads", "train.device", "train.log_every"}
ALLOWED_SECTIONS = {"paths", "tracking", "audit"}
CSV_COLUMNS = ("run", "step", "differs", "n_differ", "max_abs_diff", "mean_dist", "mean_dist_live",
               "mean_dist_dead", "loss_a", "loss_b")


@dataclass(frozen=True)
class DiffRow:
    run: int
    step: int
    differs: tuple[str, ...]  # tensors (and "loss") whose bits differ at this step, in CHECK_ORDER
    n_differ: int  # elements of W whose bits differ
    max_abs_diff: float  # max |W_A - W_B|
    mean_dist: float  # mean over tokens of ||W_A[v] - W_B[v]||_2
    mean_dist_live: float | None  # the same over live tokens only (None without masks)
    mean_dist_dead: float | None
    loss_a: float
    loss_b: float


@dataclass(frozen=True)
class DiffResult:
    a: Path
    b: Path
    rows: list[DiffRow]  # one per (run, recorded step), t = 0 included
    numel: int  # elements of one W slice
    split: bool  # live/dead split available
    notes: list[str]
    first_loss: tuple[int, int] | None = None  # (run, step) of the first differing loss, at any step

    @property
    def first(self) -> tuple[int, int, str] | None:
        row = next((r for r in self.rows if r.differs), None)
        found = (row.run, row.step, row.differs[0]) if row else None
        if self.first_loss is not None and (found is None or self.first_loss < found[:2]):
            return (*self.first_loss, "loss")  # a step the schedule did not record
        return found

    @property
    def exit_code(self) -> int:
        return 0 if self.first is None else 1

    def lines(self) -> list[str]:
        out = [f"note: {n}" for n in self.notes]
        if self.first is None:
            out.append(f"identical: {self.a} and {self.b} agree bit for bit at all {len(self.rows)} steps")
            return out
        run, step, tensor = self.first
        last = self.rows[-1]
        n_div = sum(bool(r.differs) for r in self.rows)
        out.append(f"first divergence: run {run}, step {step}, tensor {tensor}; {n_div} of {len(self.rows)} "
                   "steps differ")
        split = f" (live {last.mean_dist_live:.4g}, dead {last.mean_dist_dead:.4g})" if self.split else ""
        out.append(f"at the last step: {last.n_differ} of {self.numel} W elements differ, max |diff| "
                   f"{last.max_abs_diff:.4g}, mean token distance {last.mean_dist:.4g}{split}")
        return out


def open_trajectory(path: Path, current: Params | None = None) -> Trajectory | NotebookTrajectory:
    """A flannel-repro trajectory, or a file the notebook wrote with its params inferred (`current`: params.yaml,
    for the data paths the notebook file does not hold)."""
    return open_notebook(path, current) if is_notebook_file(path) else load_trajectory(path)


def diff(a_path: Path, b_path: Path, root: Path, current: Params | None = None) -> DiffResult:
    """Compare trajectory files A and B; live/dead masks come from A's paths.masks under `root`. Either may be a
    file the notebook wrote (`current` then gives its data paths)."""
    a, b = open_trajectory(a_path, current), open_trajectory(b_path, current)
    _check_comparable(a, b)
    notes = [f"{t.path} was written by the notebook: its inputs are not recorded, so diff cannot check that both "
             "runs read the same data" for t in (a, b) if isinstance(t, NotebookTrajectory)]
    live = _live_mask(a, root, notes)
    names = [n for n in CHECK_ORDER[1:] if n in recorded_tensors(a.params.record)]
    if "W" not in names:
        raise FlannelError(f"{a.path}: records no W (record.W is false); diff needs W")
    digests = {n: (a[f"digest_{n}"], b[f"digest_{n}"]) for n in names}  # (runs, recorded steps, 32) uint8 each
    # The f32 loss where both record it; the notebook records only the bf16 one. Kept for every step.
    key = next((k for k in ("losses_f32", "losses") if k in a and k in b), None)
    losses = (a[key].float(), b[key].float()) if key is not None else None
    first_loss = None
    if losses is not None:
        apart = (losses[0].view(torch.int32) != losses[1].view(torch.int32)) & ~(losses[0].isnan() & losses[1].isnan())
        first_loss = next(((r, t) for r, t in apart.nonzero().tolist()), None)  # row-major: run, then step
    rows = []
    for run in range(a.n_runs):
        for i, step in enumerate(_recorded_steps(a)):
            differs = []
            la = lb = math.nan
            if losses is not None:
                la, lb = float(losses[0][run, step]), float(losses[1][run, step])
                if f32_bits(la) != f32_bits(lb):
                    differs.append("loss")
            differs += [n for n in names if not torch.equal(digests[n][0][run, i], digests[n][1][run, i])]
            rows.append(_row(a, b, run, step, tuple(differs), live, la, lb))
    numel = math.prod(a.shapes["W"][2:])
    return DiffResult(Path(a_path), Path(b_path), rows, numel, live is not None, notes, first_loss)


def _recorded_steps(t: Trajectory | NotebookTrajectory) -> tuple[int, ...]:
    return getattr(t, "recorded_steps", None) or tuple(range(t.n_steps + 1))  # a notebook file holds every step


def _row(a: Trajectory, b: Trajectory, run: int, step: int, differs: tuple[str, ...], live, la, lb) -> DiffRow:
    if "W" not in differs:  # equal digests: equal bits, nothing to read
        zero = 0.0 if live is not None else None
        return DiffRow(run, step, differs, 0, 0.0, 0.0, zero, zero, la, lb)
    wa, wb = a.step("W", step, run), b.step("W", step, run)  # (V, H) bf16
    n = int((wa.view(torch.int16) != wb.view(torch.int16)).sum())
    delta = wa.float() - wb.float()
    dist = delta.norm(dim=1)  # (V,) per-token distance
    split = (None, None)
    if live is not None:
        split = tuple(float(dist[m].mean()) if m.any() else 0.0 for m in (live, ~live))
    return DiffRow(run, step, differs, n, float(delta.abs().max()), float(dist.mean()), *split, la, lb)


def _check_comparable(a: Trajectory, b: Trajectory) -> None:
    pa, pb = a.params.flat(), b.params.flat()
    if pa["record.steps"] != pb["record.steps"]:
        raise FlannelError(
            f"{b.path}: recorded the steps of record.steps = {pb['record.steps']!r} but {a.path} those of "
            f"{pa['record.steps']!r}; diff compares the same recorded steps of both: rerun one with the other's "
            "record.steps"
        )
    for key in sorted(pa):
        if key in ALLOWED or key.split(".")[0] in ALLOWED_SECTIONS or pa[key] == pb.get(key):
            continue
        raise FlannelError(
            f"{b.path}: recorded with {key} = {pb.get(key)!r} but {a.path} with {pa[key]!r}; diff compares runs "
            f"that differ only in {', '.join(sorted(ALLOWED))}"
        )
    # A notebook file lacks the keys it does not record (the params above already say what each side records).
    notebook = isinstance(a, NotebookTrajectory) or isinstance(b, NotebookTrajectory)
    for key in sorted(set(a.shapes) & set(b.shapes) if notebook else set(a.shapes) | set(b.shapes)):
        if a.shapes.get(key) != b.shapes.get(key):
            raise FlannelError(f"{b.path}: {key} has shape {b.shapes.get(key)} but {a.shapes.get(key)} in {a.path}")
    ia, ib = a.meta_json("inputs") or {}, b.meta_json("inputs") or {}
    for key in sorted(ia):
        if key in ib and ia[key] != ib[key]:
            what = key.removesuffix("_sha256")
            raise FlannelError(f"{b.path}: trained on another {what} file than {a.path} "
                               f"(sha256 {ib[key][:12]} vs {ia[key][:12]}); diff compares runs on the same data")


def _live_mask(a: Trajectory, root: Path, notes: list[str]) -> torch.Tensor | None:
    """A's live-token mask, bool[V], when its masks file is here and is the one A was trained with."""
    path = root / a.params.paths.masks
    if not path.is_file():
        notes.append(f"{path} not found: distances are not split into live and dead tokens")
        return None
    recorded = (a.meta_json("inputs") or {}).get("masks_sha256")
    if recorded is not None and sha256_file(path) != recorded:
        notes.append(f"{path} is not the masks file {a.path} was trained with: no live/dead split")
        return None
    return load_masks(path, a.params.model.vocab_size).live_mask


def write_csv(result: DiffResult, out_path: Path) -> None:
    def cell(x):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(x)

    with atomic_output(out_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for r in result.rows:
                w.writerow([r.run, r.step, ";".join(r.differs), r.n_differ, cell(r.max_abs_diff), cell(r.mean_dist),
                            cell(r.mean_dist_live), cell(r.mean_dist_dead), cell(r.loss_a), cell(r.loss_b)])


def write_plot(result: DiffResult, out_path: Path) -> None:
    """Mean token distance of W (all, live, dead) and the fraction of differing W elements, against the step."""
    fig, (top, bottom) = figure(nrows=2, figsize=(8, 6), sharex=True)
    runs = sorted({r.run for r in result.rows})
    for run in runs:
        rows = [r for r in result.rows if r.run == run]
        steps = [r.step for r in rows]
        tag = f"run {run} " if len(runs) > 1 else ""
        top.plot(steps, [r.mean_dist for r in rows], label=f"{tag}all tokens")
        if result.split:
            top.plot(steps, [r.mean_dist_live for r in rows], label=f"{tag}live", linestyle="--")
            top.plot(steps, [r.mean_dist_dead for r in rows], label=f"{tag}dead", linestyle=":")
        bottom.plot(steps, [r.n_differ / result.numel for r in rows], label=f"{tag}W")
    top.set_ylabel("mean ||W_A[v] - W_B[v]||")
    top.set_title(f"{result.a.name} vs {result.b.name}")
    top.legend()
    bottom.set_ylabel("fraction of W elements differing")
    bottom.set_xlabel("step")
    save_png(fig, out_path)
