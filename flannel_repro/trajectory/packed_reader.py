"""A packed trajectory read with the same API as the safetensors file's `Trajectory` (file.py), frame by frame.

`load_trajectory` returns one of these for a packed file. Reading W at one step decodes that step's chain of frames
from its key frame (at most 1 + log2(key_every) frames per chunk: 6 at the default 32); the reader keeps the chain
of the last step it read per key and run, so `step_block`, a walk over the steps and reads near each other decode
about one frame per step. A token's path decodes one chunk (`rows_per_chunk` rows) per step. A damaged frame is
`packed.PackedCorrupt` (exit 1), naming key, run and step: no number is returned from it.

    traj = load_trajectory("run.flpack")
    traj.step("W", 250)          # (V, H) bf16
    traj.token_rows("W", 7)      # (steps+1, H) bf16
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flannel_repro.core.errors import FlannelError
from flannel_repro.trajectory.header_fields import HeaderFields
from flannel_repro.trajectory.layout import FORMAT
from flannel_repro.trajectory.packed import PackedFile
from flannel_repro.trajectory.provenance import checked_metadata

_TORCH = {"I64": torch.int64, "I32": torch.int32, "F32": torch.float32, "BF16": torch.bfloat16, "BOOL": torch.bool,
          "U8": torch.uint8}


class PackedTrajectory(HeaderFields):
    """Lazy view of a packed trajectory file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pf = PackedFile(self.path)
        try:
            self.metadata: dict[str, str] = checked_metadata(self._pf.header.get("__metadata__") or {}, FORMAT,
                                                             self.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._pf.keys.items()}  # the header's own (PackedFile)
        except BaseException:
            self._pf.close()
            raise

    def __enter__(self) -> PackedTrajectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pf.close()

    def clear_cache(self) -> None:
        """Drop the decoded frames kept for the next read (the memory of a few steps per key and run)."""
        self._pf.forget()

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
        return self._as_torch(name, self._pf.slice_words(name, run, t).reshape(k.shape[2], k.shape[3]))

    def step_block(self, name: str, start: int, stop: int, run: int = 0) -> torch.Tensor:
        """`name[run, start:stop]`, (stop - start, V, H): consecutive steps, each frame decoded once."""
        k = self._per_step(name)
        run = self._check_run(name, run)
        start, stop, _ = slice(start, stop).indices(k.shape[1])
        out = np.empty((max(0, stop - start), k.shape[2] * k.shape[3]), dtype=np.uint16)
        for i, t in enumerate(range(start, stop)):
            out[i] = self._pf.slice_words(name, run, t)
        return self._as_torch(name, out.reshape(-1, k.shape[2], k.shape[3]))

    def token_rows(
        self, name: str, tokens: int | Sequence[int], run: int = 0, steps: slice = slice(None)
    ) -> torch.Tensor:
        """The rows of `tokens` in the per-step tensor `name` across `steps`: (n_steps, H) for one token,
        (n_steps, k, H) for a list of k. Decodes only the chunks that hold them, about one frame per step."""
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
        out = np.empty((len(picked), len(wanted), h), dtype=np.uint16)
        for c, (a, b) in enumerate(self._pf.chunk_bounds(name)):
            mine = [i for i, t in enumerate(wanted) if a <= t < b]
            if not mine:
                continue
            local = np.array([wanted[i] - a for i in mine])
            for i, t in enumerate(picked):
                out[i, mine] = self._pf.chunk_words(name, run, t, c).reshape(b - a, h)[local]
        return self._as_torch(name, out[:, 0] if isinstance(tokens, int) else out)

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
