"""A packed trajectory read with the same API as the safetensors file's `Trajectory` (file.py), frame by frame.

`load_trajectory` returns one of these for a packed file. Reading W at one step decodes that step's frames back to
its key frame (at most `key_every` frames per chunk); consecutive reads of the same key and run go on from the last
decoded step, so `step_block` and a walk over the steps decode each frame once. A token's path decodes one chunk
(`rows_per_chunk` rows) per step. A damaged frame is `packed.PackedCorrupt` (exit 1), naming key, run and step:
no number is returned from it.

    traj = load_trajectory("run.flpack")
    traj.step("W", 250)          # (V, H) bf16
    traj.token_rows("W", 7)      # (steps+1, H) bf16
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flannel_repro.core.config import Params, params_from_json
from flannel_repro.core.errors import FlannelError
from flannel_repro.trajectory.layout import FORMAT
from flannel_repro.trajectory.packed import PackedCorrupt, PackedFile
from flannel_repro.trajectory.provenance import checked_metadata

_TORCH = {"I64": torch.int64, "F32": torch.float32, "BF16": torch.bfloat16, "BOOL": torch.bool, "U8": torch.uint8}


class PackedTrajectory:
    """Lazy view of a packed trajectory file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pf = PackedFile(self.path)
        try:
            head = self._pf.head()
            try:
                header = json.loads(head[8:])
            except (UnicodeError, json.JSONDecodeError):
                raise PackedCorrupt(self.path, "header", "the packed safetensors header is not JSON") from None
            self.metadata: dict[str, str] = checked_metadata(header.get("__metadata__") or {}, FORMAT, self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._pf.keys.items()}
            if {k for k in header if k != "__metadata__"} != set(self.shapes):
                raise PackedCorrupt(self.path, "index", "does not list the keys of the packed safetensors header")
        except BaseException:
            self._pf.close()
            raise
        self._last: dict[tuple[str, int], tuple[int, np.ndarray]] = {}  # (name, run) -> (step, (V*H,) words)

    def __enter__(self) -> PackedTrajectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._last.clear()
        self._pf.close()

    def keys(self) -> list[str]:
        return sorted(self.shapes)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        """The whole tensor (decodes it)."""
        k = self._pf.keys[name]
        if not k.per_step:
            return self._as_torch(name, np.frombuffer(bytearray(self._pf.key_bytes(name)), dtype=np.uint8))
        runs, steps1, v, h = k.shape
        return torch.stack([self.step_block(name, 0, steps1, run) for run in range(runs)])

    def step(self, name: str, t: int, run: int = 0) -> torch.Tensor:
        """`name[run, t]`, decoding only that step's frames (back to the key frame)."""
        k = self._key(name)
        if not k.per_step:
            return self[name][run, t]
        run, t = self._check_run(name, run), self._check_step(name, t)
        return self._as_torch(name, self._slice(name, run, t).reshape(k.shape[2], k.shape[3]).copy())

    def step_block(self, name: str, start: int, stop: int, run: int = 0) -> torch.Tensor:
        """`name[run, start:stop]`, (stop - start, V, H): consecutive steps, each frame decoded once."""
        k = self._per_step(name)
        run = self._check_run(name, run)
        start, stop, _ = slice(start, stop).indices(k.shape[1])
        out = np.empty((max(0, stop - start), k.shape[2] * k.shape[3]), dtype=np.uint16)
        for i, t in enumerate(range(start, stop)):
            out[i] = self._slice(name, run, t)
        return self._as_torch(name, out.reshape(-1, k.shape[2], k.shape[3]))

    def token_rows(
        self, name: str, tokens: int | Sequence[int], run: int = 0, steps: slice = slice(None)
    ) -> torch.Tensor:
        """The rows of `tokens` in the per-step tensor `name` across `steps`: (n_steps, H) for one token,
        (n_steps, k, H) for a list of k. Decodes only the chunks that hold them, one frame per step."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        k = self._per_step(name)
        run = self._check_run(name, run)
        runs, steps1, v, h = k.shape
        wanted = [tokens] if isinstance(tokens, int) else list(tokens)
        wanted = [t + v if t < 0 else t for t in wanted]
        if any(not 0 <= t < v for t in wanted):
            raise IndexError(f"token out of range: {name} has {v} rows")
        picked = range(steps1)[steps]
        if not picked:
            out = np.empty((0, len(wanted), h), dtype=np.uint16)
        else:
            lo, hi = min(picked), max(picked) + 1
            bounds = self._pf.chunk_bounds(name)
            rows = np.empty((hi - lo, len(wanted), h), dtype=np.uint16)
            for c, (a, b) in enumerate(bounds):
                mine = [i for i, t in enumerate(wanted) if a <= t < b]
                if not mine:
                    continue
                local = np.array([wanted[i] - a for i in mine])
                for t, words in self._pf.chunk_path(name, run, c, lo, hi):
                    rows[t - lo, mine] = words.reshape(b - a, h)[local]
            out = rows[[t - lo for t in picked]]
        return self._as_torch(name, out[:, 0] if isinstance(tokens, int) else out)

    def _slice(self, name: str, run: int, t: int) -> np.ndarray:
        """(V * H,) words of `name[run, t]`, going on from the last step decoded where that is on the way."""
        known = self._last.get((name, run))
        if known is not None and known[0] == t:
            return known[1]
        bounds = self._pf.chunk_bounds(name)
        k = self._pf.keys[name]
        out = np.empty(k.shape[2] * k.shape[3], dtype=np.uint16)
        h = k.shape[3]
        for c, (a, b) in enumerate(bounds):
            prior = None if known is None else (known[0], known[1][a * h : b * h])
            for _, words in self._pf.chunk_path(name, run, c, t, t + 1, known=prior):
                out[a * h : b * h] = words
        self._last[name, run] = (t, out)
        return out

    def _key(self, name: str):
        k = self._pf.keys.get(name)
        if k is None:
            raise KeyError(name)
        return k

    def _per_step(self, name: str):
        k = self._pf.keys.get(name)
        if k is None or not k.per_step:
            per_step = sorted(n for n, v in self._pf.keys.items() if v.per_step)
            raise FlannelError(f"{self.path}: {name!r} is not a per-step tensor of this trajectory; it has "
                               f"{', '.join(per_step) or 'none'}")
        return k

    def _check_run(self, name: str, run: int) -> int:
        runs = self.shapes[name][0]
        if not 0 <= run < runs:
            raise IndexError(f"run {run} is out of range: {self.path} holds {runs} run(s)")
        return run

    def _check_step(self, name: str, t: int) -> int:
        steps1 = self.shapes[name][1]
        if not -steps1 <= t < steps1:
            raise IndexError(f"step {t} is out of range: {self.path} holds steps 0..{steps1 - 1}")
        return t % steps1

    def _as_torch(self, name: str, array: np.ndarray) -> torch.Tensor:
        """Words or bytes decoded from the file as the key's dtype and shape (a (…, V, H) array keeps its shape)."""
        k = self._pf.keys[name]
        t = torch.from_numpy(array)
        if not k.per_step:
            return t.view(_TORCH[k.dtype]).reshape(k.shape)
        return t.view(torch.bfloat16)

    @cached_property
    def params(self) -> Params:
        return params_from_json(self.metadata["params"], f"{self.path} (header params)")

    def meta_json(self, key: str) -> Any:
        return json.loads(self.metadata.get(key, "null"))

    @property
    def n_runs(self) -> int:
        return self.params.train.num_runs

    @property
    def n_steps(self) -> int:
        return self.params.train.steps
