"""Exposure: which tokens each recorded step's loss saw as labels, and how often, rebuilt from the trajectory's
`batch_indices` and the corpus.

Step t of run r trained on the windows `batch_indices[r, t - 1]` (-1 fills a short last batch). A window i is the
corpus tokens [i, i + L]; the loss scores the labels after GPT-2's own shift, so it uses, per window:

    label_mode notebook     tokens[i + 2 : i + L + 1]   (the notebook's labels are already shifted once)
    label_mode next_token   tokens[i + 1 : i + L]

`exposure_of(traj, tokens)` counts them into an `Exposure`: `counts` (runs, steps+1, V) int32 (zero at t = 0),
`first_step` (runs, V) (the first step whose loss saw the token, -1 if none) and `total` (runs, V). Before counting
it checks that every batch index is a window of the corpus and every token id in the vocabulary; afterwards, given
the masks, that no dead token was ever a label. The stage also checks the corpus is the one the run recorded (its
sha256).

`flannel-repro exposure` (the DVC stage after train) writes the same to paths.exposure as a compact file (per
(run, step) row, the tokens seen and their counts), which `load_exposure` reads back:

    ex = load_exposure("tensors/Flannel/exposure.safetensors")
    late = (ex.first_step[0] > 100).nonzero()       # tokens first seen after step 100
    once = (ex.total[0] == 1).nonzero()             # tokens seen once
    by = ex.seen_by(traj.recorded_steps)            # (runs, recorded steps, V): seen up to each recorded step
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.core.safetensors_header import save_tensors
from flannel_repro.data.masks import Masks, encode_corpus, load_masks
from flannel_repro.trajectory.file import Trajectory, load_trajectory

FORMAT = "flannel-exposure/1"
LABEL_START = {"notebook": 2, "next_token": 1}  # the first scored label's offset into its window


@dataclass(frozen=True)
class Exposure:
    counts: torch.Tensor  # (runs, steps+1, V) int32: times token v was a label of step t's loss; 0 at t = 0
    label_mode: str

    @property
    def total(self) -> torch.Tensor:
        """(runs, V) int64: times each token was a label, over the whole run."""
        return self.counts.sum(dim=1, dtype=torch.int64)

    @property
    def first_step(self) -> torch.Tensor:
        """(runs, V) int64: the first step whose loss saw each token as a label; -1 for a token never seen."""
        seen = self.counts > 0
        first = seen.to(torch.int8).argmax(dim=1)
        return torch.where(seen.any(dim=1), first, torch.full_like(first, -1))

    def seen_by(self, steps: Sequence[int]) -> torch.Tensor:
        """(runs, len(steps), V) int64: times each token was a label in steps 1..t, for each t of `steps`: with a
        record.steps schedule, `ex.seen_by(traj.recorded_steps)[r, i]` is what W's row i had been trained on (the
        counts themselves cover every step, as batch_indices does)."""
        return self.counts.cumsum(dim=1, dtype=torch.int64)[:, list(steps)]


def label_windows(tokens: torch.Tensor, starts: torch.Tensor, max_seq_len: int, label_mode: str) -> torch.Tensor:
    """(n, L - 1) int64: the labels the loss scores for the windows at `starts` (n,)."""
    offsets = LABEL_START[label_mode] + torch.arange(max_seq_len - 1)
    return tokens[starts[:, None] + offsets]


def exposure_of(traj: Trajectory, tokens: torch.Tensor, masks: Masks | None = None) -> Exposure:
    """The exposure of every recorded step of `traj`, from its batch indices and the corpus `tokens` (int64, the
    corpus encoded as training encodes it); FlannelError where they do not fit each other (or the masks)."""
    params = traj.params
    runs, steps, v = params.train.num_runs, params.train.steps, params.model.vocab_size
    length, mode = params.model.max_seq_len, params.train.label_mode
    batches = traj["batch_indices"]  # (runs, steps, batch) int64, -1 after a short batch's last window
    _check_batches(traj.path, batches, len(tokens) - length)
    if len(tokens) and not 0 <= int(tokens.min()) <= int(tokens.max()) < v:
        raise FlannelError(f"{traj.path}: the corpus has token ids outside the run's vocabulary of {v}; encode it "
                           "with the run's tokenizer")
    counts = torch.zeros(runs, steps + 1, v, dtype=torch.int64)
    for run in range(runs):
        for t in range(1, steps + 1):
            starts = batches[run, t - 1]
            labels = label_windows(tokens, starts[starts >= 0], length, mode).flatten()
            counts[run, t] = torch.bincount(labels, minlength=v)
    # Every scored label counted once: (L - 1) per window of each step's batch.
    assert torch.equal(counts[:, 1:].sum(dim=2), (batches >= 0).sum(dim=2) * (length - 1))
    if masks is not None and counts[:, :, masks.dead_mask].any():
        dead = int(counts[:, :, masks.dead_mask].sum(dim=(0, 1)).nonzero()[0])
        raise FlannelError(f"{traj.path}: dead token {dead} is a label of a recorded batch, so the masks were not made "
                           "from this corpus; remake them with `flannel-repro masks`")
    return Exposure(counts.to(torch.int32), mode)


def _check_batches(path: Path, batches: torch.Tensor, n_windows: int) -> None:
    """Every index a window of the corpus; -1 only after a batch's last window."""
    filled = batches < 0
    bad = (batches < -1) | (batches >= n_windows)
    bad |= torch.cummax(filled.to(torch.int8), dim=2).values.bool() & ~filled  # a window after a -1
    if bad.any():
        run, step, slot = (int(i) for i in bad.nonzero()[0])
        raise FlannelError(f"{path}: batch_indices[{run}, {step}, {slot}] = {int(batches[run, step, slot])} is not a "
                           f"window of this corpus ({n_windows} windows); give the corpus the run trained on")


def load_exposure(path: str | Path) -> Exposure:
    """The exposure file `flannel-repro exposure` wrote, as an `Exposure`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise FlannelError(f"{path}: not an exposure file ({FORMAT}); make it with `flannel-repro exposure`")
            t = {k: f.get_tensor(k) for k in ("row_offsets", "tokens", "counts")}
    except (SafetensorError, OSError, KeyError, ValueError) as e:  # not safetensors, or not all of its keys
        raise FlannelError(f"{path}: cannot read the exposure file ({e}); make it with `flannel-repro exposure`") \
            from None
    runs, steps1, v = (int(meta[k]) for k in ("runs", "steps1", "vocab_size"))
    rows = torch.repeat_interleave(torch.arange(runs * steps1), t["row_offsets"].diff())
    counts = torch.zeros(runs * steps1 * v, dtype=torch.int32)
    counts[rows * v + t["tokens"].long()] = t["counts"]
    return Exposure(counts.view(runs, steps1, v), meta["label_mode"])


def compact(ex: Exposure) -> dict[str, torch.Tensor]:
    """The file's tensors: per (run, step) row in order, the tokens seen (ascending) and their counts."""
    flat = ex.counts.flatten(0, 1)  # (runs * (steps+1), V)
    rows, tokens = flat.nonzero(as_tuple=True)
    per_row = torch.bincount(rows, minlength=flat.shape[0])
    return {
        "row_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), per_row.cumsum(0)]),
        "tokens": tokens.to(torch.int32),
        "counts": flat[rows, tokens],
        "first_step": ex.first_step,
        "total": ex.total,
    }


@dataclass(frozen=True)
class ExposureResult:
    path: Path
    n_steps: int  # recorded steps counted, over all runs
    n_seen: list[int]  # per run: tokens seen at least once
    n_once: list[int]  # per run: tokens seen exactly once


def exposure(params: Params, root: Path) -> ExposureResult:
    """The exposure stage: paths.trajectory's batches against paths.corpus (encoded with paths.tokenizer), checked
    against paths.masks, written to paths.exposure."""
    paths = params.paths.under(root)
    with load_trajectory(paths.trajectory) as traj:
        recorded = traj.meta_json("inputs") or {}
        here = sha256_file(paths.corpus)
        if recorded.get("corpus_sha256") not in (None, here):
            raise FlannelError(f"{paths.corpus}: not the corpus {paths.trajectory} was trained on (its sha256 "
                               f"differs from the one the trajectory recorded); give the run's corpus")
        v = traj.params.model.vocab_size
        tokens = encode_corpus(paths.corpus, paths.tokenizer, v)
        ex = exposure_of(traj, tokens, load_masks(paths.masks, v))
        meta = {"format": FORMAT, "label_mode": ex.label_mode, "runs": str(ex.counts.shape[0]),
                "steps1": str(ex.counts.shape[1]), "vocab_size": str(v), "corpus_sha256": here,
                "trajectory_content_digest": traj.metadata.get("content_digest") or ""}
    save_tensors(paths.exposure, compact(ex), meta)
    total = ex.total
    return ExposureResult(paths.exposure, ex.counts.shape[0] * (ex.counts.shape[1] - 1),
                          (total > 0).sum(dim=1).tolist(), (total == 1).sum(dim=1).tolist())
