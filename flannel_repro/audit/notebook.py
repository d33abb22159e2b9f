"""Audit a file the Flannel 7 notebook wrote itself: `check`, `verify` and `adopt` it.

Such a file (trajectory/notebook.py) has no header metadata, no digests and no content record, so less can be
proven than for a flannel-repro file:
- `check_notebook`: the schema, the scalars against each other and the shapes, and the steps whose value the
  notebook fixes (W at step 0 is W_initial, grad_W at step 0 is zeros, the loss at step 0 is NaN); W_initial is also
  drawn again from init_seed and init_scale. A byte changed anywhere else cannot be found without a rerun.
- `notebook_reference`: what `verify` audits. The rerun's params are the file's scalars, the notebook's fixed values
  and params.yaml's data paths; the inputs are checked as far as the file allows (vocabulary size, n_live and
  n_dead against the masks). Each step's slices are compared with the file's own bytes (stepcheck.py), which stand
  in for the digests the notebook never wrote.
- `adopt`: a flannel-repro trajectory holding every key the notebook wrote, byte for byte, with the inferred params,
  the inputs it was checked against, this machine's fingerprint marked "adopted, not recorded", per-step digests and
  a content record. The keys the notebook does not record are NaN (-1 for batch indices) and named in the header.

    report = check_notebook(Path("tensors/Flannel/1.20h_flannel_7.safetensors"))
    result = adopt(Path("notebook.safetensors"), Path("adopted.safetensors"), root=Path("."), current=params)
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flannel_repro.audit.check import CheckReport, FileBytes, Problem
from flannel_repro.audit.reference import Reference
from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.core.safetensors_header import RawHeader, read_raw_header
from flannel_repro.trajectory import content
from flannel_repro.trajectory.file import MANIFEST_FORMAT, TORCH_DTYPES, TensorSpec, TrajectoryWriter
from flannel_repro.trajectory.layout import DIGEST_BYTES, FORMAT, trajectory_layout
from flannel_repro.trajectory.notebook import (
    KIND,
    NOT_RECORDED,
    NotebookTrajectory,
    consistency_problems,
    notebook_params,
    read_scalars,
    schema_problems,
)

UNPROVEN = ("the file holds no digests and no content record: a byte changed in W, grad_W or losses at steps 1 and "
            "later, or in a scalar that still agrees with the others, looks like what the notebook wrote; only a "
            "rerun finds it (`flannel-repro verify FILE`)")
ADOPTED = "adopted, not recorded"


class NotAdopted(FlannelError):
    """The notebook file contradicts itself: a verdict (corrupt), not bad input."""

    exit_code = 1


# -- check ---------------------------------------------------------------------------------------------------------
@dataclass
class NotebookCheckReport(CheckReport):
    """A check of a notebook file: what it found, and what only a rerun could."""

    def lines(self) -> list[str]:
        out = [f"file: {self.path} (written by {KIND}'s save cell: no header metadata, no digests; "
               f"{self.bytes_hashed / 1e6:,.1f} MB read in {self.seconds:.2f} s)"]
        out += [f"note: {n}" for n in self.notes]
        out.append(f"not proven: {UNPROVEN}")
        if self.intact:
            out.append("verdict: intact as far as it can be checked (exit 0): schema, shapes and dtypes, the scalars "
                       "against each other and the shapes, W = W_initial, grad_W = 0 and loss = NaN at step 0")
            return out
        out += [f"corrupt: {p.line()}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            out.append(f"corrupt: ... ({len(self.problems) - 20} more)")
        out.append(f"verdict: corrupt (exit 1): {self.problems[0].line()}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "kind": "notebook", "not_proven": UNPROVEN}


def check_notebook(path: Path) -> NotebookCheckReport:
    """Check a notebook file as far as it can be checked without digests (exit 0 intact so far, 1 corrupt)."""
    start = time.perf_counter()
    raw = read_raw_header(Path(path))
    problems, scalars = _header_problems(raw)
    notes: list[str] = []
    read = 0
    if not problems:
        with _Mapped(raw) as m:
            problems += _step_problems(m, notes)
            read = raw.size - raw.data_start
        notes.append(_initial_note(raw, scalars))
    return NotebookCheckReport(Path(path), problems, None, 0, read, time.perf_counter() - start, notes)


def _header_problems(raw: RawHeader) -> tuple[list[Problem], dict[str, Any]]:
    problems = [Problem(k, why) for k, why in schema_problems(raw)]
    scalars = read_scalars(raw) if not problems else {}
    problems += [Problem(k, why) for k, why in consistency_problems(raw, scalars)] if not problems else []
    return problems, scalars


class _Mapped:
    """The file's data by offset, read with pread (check.FileBytes): a file truncated or rewritten while it is read is
    one line, not a SIGBUS."""

    def __init__(self, raw: RawHeader) -> None:
        self.raw = raw
        self.view = FileBytes(raw.path, raw.size)

    def span(self, key: str) -> tuple[int, int]:
        lo, hi = self.raw.header[key]["data_offsets"]
        return self.raw.data_start + lo, self.raw.data_start + hi

    def data(self, key: str) -> memoryview:
        lo, hi = self.span(key)
        return self.view[lo:hi]

    def slice_span(self, name: str, run: int, step: int) -> tuple[int, int]:
        runs, steps1, v, h = self.raw.header[name]["shape"]
        n = v * h * 2  # bf16
        lo = self.span(name)[0] + (run * steps1 + step) * n
        return lo, lo + n

    def confirm_unchanged(self) -> None:
        self.view.confirm_unchanged()

    def close(self) -> None:
        self.view.close()

    def __enter__(self) -> _Mapped:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _step_problems(m: _Mapped, notes: list[str]) -> list[Problem]:
    """What the notebook fixes at every step: W at step 0 is W_initial and is written at every later step (never
    left at the zeros it was allocated with), grad_W at step 0 is zeros, the loss at step 0 is NaN."""
    out: list[Problem] = []
    entries = m.raw.entries()
    w0 = m.data("W_initial")
    zero = memoryview(bytes(len(w0)))
    for name in ("W", "grad_W"):
        if name not in entries:
            continue
        runs, steps1 = entries[name]["shape"][:2]
        unwritten = []
        for run in range(runs):
            for t in range(steps1):
                lo, hi = m.slice_span(name, run, t)
                s = m.view[lo:hi]
                if t == 0:
                    if s != (w0 if name == "W" else zero):
                        what = "W_initial, as the notebook records it" if name == "W" else "zeros, as the notebook " \
                                                                                        "writes it"
                        out.append(Problem(name, f"the slice is not {what}", run, 0))
                elif s == zero:
                    unwritten.append((run, t))
        if unwritten and name == "W":
            out += [Problem(name, "the slice is all zeros, the notebook's pre-allocated value: the step was never "
                                  "recorded, or the file was changed", r, t) for r, t in unwritten]
        elif unwritten:
            notes.append(f"grad_W is all zeros at {len(unwritten)} step(s) after step 0 ({_steps(unwritten)}): no "
                         "gradient was recorded there, or the file was changed")
    if "losses" in entries:
        runs, steps1 = entries["losses"]["shape"]
        lo = m.span("losses")[0]
        # bf16 bits: NaN is exponent all ones, mantissa not 0
        words = memoryview(m.view[lo : lo + runs * steps1 * 2]).cast("H")
        nan = [(r, t) for r in range(runs) for t in range(steps1) if words[r * steps1 + t] & 0x7FFF > 0x7F80]
        words.release()
        out += [Problem("losses", "is not NaN at step 0, where the notebook records no loss", r, 0)
                for r in range(runs) if (r, 0) not in nan]
        later = [(r, t) for r, t in nan if t > 0]
        if later:
            notes.append(f"the loss is NaN at {len(later)} step(s) after step 0 ({_steps(later)}): training gave NaN "
                         "there, or the file was changed")
    return sorted(out, key=lambda p: (p.run or 0, p.step or 0))


def _steps(items: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"{r}:{t}" for r, t in items[:10])
    return shown + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")


def _initial_note(raw: RawHeader, scalars: dict[str, Any]) -> str:
    """W_initial drawn again as the notebook's cell 7 draws it; a difference is not proof (another machine's torch
    may draw otherwise), so it is a note, and verify's rerun decides."""
    import torch

    from flannel_repro.core.config import ModelConfig, TrainConfig
    from flannel_repro.training.model import initial_embedding
    from flannel_repro.trajectory.notebook import f32_decimal

    params, _ = notebook_params(scalars, None)
    drawn = initial_embedding(ModelConfig(vocab_size=params.model.vocab_size, hidden_dim=params.model.hidden_dim,
                                          n_head=1), TrainConfig(init_seed=params.train.init_seed,
                                                                 init_scale=params.train.init_scale))
    with _Mapped(raw) as m:
        same = bytes(drawn.contiguous().view(torch.uint8).reshape(-1).numpy()) == bytes(m.data("W_initial"))
    seed, scale = scalars["init_seed"], f32_decimal(scalars["init_scale"])
    if same:
        return (f"W_initial is exactly what torch {torch.__version__} draws here from init_seed {seed} at init_scale "
                f"{scale} (as the notebook's cell 7 does), and W at step 0 equals it")
    return (f"W_initial is not what torch {torch.__version__} draws here from init_seed {seed} at init_scale {scale}: "
            "W_initial, init_seed or init_scale changed after the notebook wrote them, or the notebook's torch draws "
            "otherwise; `flannel-repro verify FILE` tells")


# -- verify --------------------------------------------------------------------------------------------------------
class NotebookInspection:
    """What verify's step check reads of a reference file (check.Inspection's reading side), for a notebook file: its
    "stored digests" are the sha256 of its own slices, hashed once before the rerun."""

    def __init__(self, raw: RawHeader, digests: dict[str, list[list[bytes]]]) -> None:
        self.raw = raw
        self.path = raw.path
        self.metadata: dict[str, str] = {}
        self.changed: set[str] = set()  # no content record: no key can be shown to have changed
        self.record_changed = False
        self._digests = digests
        self._m = _Mapped(raw)
        self.view = self._m.view

    def span(self, key: str) -> tuple[int, int]:
        return self._m.span(key)

    def slice_digest(self, name: str, run: int, step: int) -> bytes:
        lo, hi = self._m.slice_span(name, run, step)
        return hashlib.sha256(self.view[lo:hi]).digest()

    def stored_digest(self, name: str, run: int, step: int) -> bytes:
        return self._digests[name][run][step]

    def confirm_unchanged(self) -> None:
        """FlannelError (exit 2) if the file was written to since it was opened."""
        self._m.confirm_unchanged()

    def close(self) -> None:
        self._m.close()


def notebook_reference(path: Path, current: Params | None, root: Path) -> Reference:
    """A notebook file as verify's reference: checked first (`check_notebook`), its params inferred, its inputs
    under `root` checked as far as it allows, every slice hashed."""
    path = Path(path)
    report = check_notebook(path)
    raw = read_raw_header(path)
    header_bad, scalars = _header_problems(raw)
    if header_bad:
        return Reference(str(path), None, None, problems=report.problems)
    params, sources = notebook_params(scalars, current)
    notes = [f"{path} was written by {KIND}'s own save cell: it records no params file, device, thread count, input "
             "digests or per-step digests; each step is compared with the file's own bytes, so a byte changed in the "
             "file and a divergence of the rerun look the same", *report.notes, *_source_notes(sources, current),
             *_input_notes(params, scalars, root)]
    traj = NotebookTrajectory(path, params)
    names = [n for n in ("W", "grad_W") if n in raw.entries()]
    digests = {n: [[bytes(d.tolist()) for d in run] for run in traj.digests(n)] for n in names}
    text = content.render(content.entries(_file_layout(raw), _reader(raw, traj)))
    doc = {"format": MANIFEST_FORMAT, "params": params.to_dict(), "fingerprint": {}, "versions": {}, "inputs": {},
           "digests": {n: [[d.hex() for d in run] for run in v] for n, v in digests.items()},
           "content": text, "content_digest": None}  # the record covers the notebook's keys only: no file's digest
    unrecorded = frozenset(k for k in trajectory_layout(params) if k in NOT_RECORDED)
    checks = (["the file's schema, its scalars against each other and the shapes, and step 0 (W = W_initial, "
               "grad_W = 0, loss NaN), without a rerun",
               f"{', '.join(names)} at every step against the rerun, slice by slice against the file's own bytes",
               "losses (bf16), W_initial and the scalars against the rerun"],
              [f"{', '.join(sorted(unrecorded - {'recorded_momentum', 'recorded_variance'}))} (the notebook does not "
               "record them)", "whether a difference is a byte changed in the file or a divergence of the rerun (the "
               "file has no digests)"])
    return Reference(str(path), doc, params, trajectory=traj, inspection=NotebookInspection(raw, digests),
                     problems=report.problems, unrecorded=unrecorded, checks=checks, notes=notes,
                     device_recorded=False)


def _file_layout(raw: RawHeader) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The file's keys with the digest_<name> keys a flannel-repro file would hold, for its content record."""
    layout = {k: (v["dtype"], tuple(v["shape"])) for k, v in raw.entries().items()}
    for name in ("W", "grad_W"):
        if name in layout:
            layout[f"digest_{name}"] = ("U8", (*layout[name][1][:2], DIGEST_BYTES))
    return layout


def _reader(raw: RawHeader, traj: NotebookTrajectory):
    """Raw bytes of a key, for the content record; digest_<name> from the slices' hashes."""
    from flannel_repro.trajectory.file import as_bytes

    def read(key: str) -> bytes:
        if key.startswith(content.DIGEST_PREFIX):
            return bytes(as_bytes(traj.digests(key[len(content.DIGEST_PREFIX):])))
        lo, hi = raw.entries()[key]["data_offsets"]
        with open(raw.path, "rb") as f:
            f.seek(raw.data_start + lo)
            return f.read(hi - lo)

    return read


def _source_notes(sources: dict[str, str], current: Params | None) -> list[str]:
    fixed = ", ".join(k for k, s in sources.items() if s == "notebook")
    where = "params.yaml" if current is not None else "the defaults (no params.yaml)"
    return [f"the rerun's params: the file's scalars; the notebook's fixed values for {fixed}; {where} for the "
            "data paths and everything else that does not change a number"]


def _input_notes(params: Params, scalars: dict[str, Any], root: Path) -> list[str]:
    """The inputs the rerun reads, which the file does not record: named, with what can be checked of them."""
    paths = params.paths.under(root)
    missing = [f"paths.{k} ({p})" for k, p in paths.inputs().items() if not p.is_file()]
    if missing:
        raise FlannelError(f"{', '.join(missing)}: not found; give the files the notebook was run on (set "
                           "paths.corpus, paths.tokenizer and paths.masks in params.yaml)")
    used = ", ".join(f"{k} {getattr(params.paths, k)} (sha256 {sha256_file(p)[:12]})"
                     for k, p in paths.inputs().items())
    notes = [f"inputs (not recorded in the file, so a divergence may come from them): {used}"]
    notes += _checked_inputs(params, scalars, root)
    return notes


def _checked_inputs(params: Params, scalars: dict[str, Any], root: Path) -> list[str]:
    """The tokenizer's size against vocab_size (FlannelError: nothing could be rerun), the masks' counts against
    n_live and n_dead (a note: the rerun then differs at step 0, in n_live and n_dead)."""
    from tokenizers import Tokenizer

    from flannel_repro.data.masks import load_masks

    paths, v = params.paths.under(root), params.model.vocab_size
    try:
        size = Tokenizer.from_file(str(paths.tokenizer)).get_vocab_size()
    except Exception as e:  # the tokenizers library raises its own Exception type for a bad file
        raise FlannelError(f"{paths.tokenizer}: not a tokenizer file ({e}); set paths.tokenizer to the notebook's "
                           "tokenizer") from None
    if size != v:
        raise FlannelError(f"{paths.tokenizer}: tokenizer has {size} tokens but the notebook file's vocab_size is {v}: "
                           "not the tokenizer the notebook ran with; set paths.tokenizer to it")
    masks = load_masks(paths.masks, v)
    if (masks.n_live, masks.n_dead) != (scalars["n_live"], scalars["n_dead"]):
        return [f"warning: {params.paths.masks} gives n_live {masks.n_live}, n_dead {masks.n_dead}; the file says "
                f"{scalars['n_live']}, {scalars['n_dead']}: these are not the masks the notebook ran with"]
    return [f"vocabulary size {v} matches the tokenizer; n_live {masks.n_live} and n_dead {masks.n_dead} match "
            f"{params.paths.masks}"]


# -- adopt ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdoptResult:
    path: Path
    content_digest: str
    sha256: str
    params: Params
    inputs: dict[str, str]
    notes: list[str]


def adopt(path: Path, out: Path, root: Path, current: Params | None) -> AdoptResult:
    """Write the flannel-repro trajectory of notebook file `path` to `out`; NotAdopted (exit 1) if it contradicts
    itself, FlannelError (exit 2) if the inputs under `root` are not the ones it ran on."""
    import torch

    from flannel_repro.training.model import pick_device
    from flannel_repro.trajectory.provenance import fingerprint, versions

    path, out = Path(path), Path(out)
    report = check_notebook(path)
    if report.problems:
        raise NotAdopted(f"{path}: not adopted: {report.problems[0].line()}; the file's numbers contradict themselves "
                         f"(`flannel-repro check {path}` lists every problem)")
    raw = read_raw_header(path)
    scalars = read_scalars(raw)
    params, _ = notebook_params(scalars, current)
    checked = _checked_inputs(params, scalars, root)
    if checked[0].startswith("warning: "):
        raise FlannelError(f"{path}: not adopted: {checked[0].removeprefix('warning: ')}; set paths.masks (and the "
                           "corpus and tokenizer) to the notebook's files")
    inputs = {f"{k}_sha256": sha256_file(p) for k, p in params.paths.under(root).inputs().items()}
    fp = {**fingerprint(pick_device(params.train.device)), "recorded": f"{ADOPTED}: this machine at adoption; the "
          "notebook file records no device"}
    layout = trajectory_layout(params)
    adopted = {"source": str(path), "source_sha256": sha256_file(path), "written_by": KIND,
               "not_recorded": sorted(k for k in layout if k in NOT_RECORDED), "inputs": "checked, not recorded: "
               "vocabulary size and n_live/n_dead match; the notebook file records no input digests"}
    metadata = {"format": FORMAT, "params": params.to_json(), "versions": json.dumps(versions(), sort_keys=True),
                "fingerprint": json.dumps(fp, sort_keys=True), "inputs": json.dumps(inputs, sort_keys=True),
                "adopted": json.dumps(adopted, sort_keys=True)}
    specs = {name: TensorSpec(TORCH_DTYPES[s.dtype], s.shape) for name, s in layout.items()}
    writer = TrajectoryWriter(out, specs, metadata)
    try:
        with _Mapped(raw) as m:
            for name, spec in specs.items():
                if name in raw.entries() and name not in ("W", "grad_W"):  # whole tensors, as written
                    writer.write(name, (), _tensor(m.data(name), spec))
                elif name in ("W", "grad_W"):
                    for run in range(spec.shape[0]):
                        for t in range(spec.shape[1]):
                            lo, hi = m.slice_span(name, run, t)
                            writer.write(name, (run, t), _tensor(m.view[lo:hi], TensorSpec(spec.dtype,
                                                                                            spec.shape[2:])))
                            digest = hashlib.sha256(m.view[lo:hi]).digest()
                            writer.write(f"digest_{name}", (run, t), torch.frombuffer(bytearray(digest),
                                                                                      dtype=torch.uint8))
                elif name in ("recorded_momentum", "recorded_variance"):
                    writer.write(name, (), torch.tensor(False))
                elif name == "batch_indices":
                    writer.write(name, (), torch.full(spec.shape, -1, dtype=torch.int64))
                elif not name.startswith(content.DIGEST_PREFIX):  # losses_f32, grad_norm, lr_schedule
                    writer.write(name, (), torch.full(spec.shape, float("nan"), dtype=spec.dtype))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    notes = [*checked, f"not recorded by the notebook, so NaN (batch_indices: -1) in {out}: "
             f"{', '.join(k for k in adopted['not_recorded'] if not k.startswith('recorded_'))}"]
    return AdoptResult(out, writer.content_digest, sha256_file(out), params, inputs, notes)


def _tensor(data: bytes, spec: TensorSpec):
    """The file's bytes as a tensor of `spec`, bit for bit (NaN payloads included)."""
    import torch

    return torch.frombuffer(bytearray(data), dtype=spec.dtype).reshape(spec.shape)

