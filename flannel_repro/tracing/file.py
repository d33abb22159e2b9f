"""The trace file: JSON Lines, one header line, then per traced step a step line and one line per op.

    {"format": "flannel-repro-trace/1", "content_digest": ..., "fingerprint": {...}, "steps": [[0, 1, 631]], ...}
    {"run": 0, "step": 1, "ops": 631}
    {"seq": 0, "op": "aten::view.default:0", "module": "transformer", "phase": "forward", "in": [...], "out": [...]}
    ...

Keys are sorted and nothing in it depends on time, memory addresses or the order of a dict, so two traces of the
same step in the same environment are byte-identical. The header says what was traced: the trajectory's content
digest (the run the trace belongs to), the torch version, the thread count and the device fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import atomic_output
from flannel_repro.tracing.ops import Op

FORMAT = "flannel-repro-trace/1"


@dataclass
class TraceFile:
    header: dict[str, Any]  # format, content_digest, source, torch, threads, fingerprint, steps
    steps: dict[tuple[int, int], list[Op]]  # (run, step) -> ops in order

    @property
    def content_digest(self) -> str | None:
        return self.header.get("content_digest")


def _line(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n"


def write_trace(path: Path, header: dict[str, Any], steps: dict[tuple[int, int], list[Op]]) -> None:
    """Write the traces (atomically: a temporary name renamed into place)."""
    order = sorted(steps)
    head = {**header, "format": FORMAT, "steps": [[r, t, len(steps[(r, t)])] for r, t in order]}
    with atomic_output(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(_line(head))
        for run, step in order:
            f.write(_line({"run": run, "step": step, "ops": len(steps[(run, step)])}))
            for op in steps[(run, step)]:
                f.write(_line(op.to_json()))


def read_trace(path: Path) -> TraceFile:
    """A trace file; a file that is not one is a FlannelError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FlannelError(f"{path}: trace file not found; record one with `flannel-repro trace` or "
                           "record.trace_steps in params.yaml")
    with open(path, encoding="utf-8") as f:
        lines = iter(enumerate(f, start=1))
        try:
            header = _parse(next(lines, (1, "")), path)
            if header.get("format") != FORMAT:
                raise FlannelError(f"{path}: not a flannel-repro trace (format {header.get('format')!r}, expected "
                                   f"{FORMAT!r})")
            steps: dict[tuple[int, int], list[Op]] = {}
            for _ in header["steps"]:
                block = _parse(next(lines, (0, "")), path)
                ops = [Op.from_json(_parse(next(lines, (0, "")), path)) for _ in range(block["ops"])]
                steps[(block["run"], block["step"])] = ops
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise FlannelError(f"{path}: trace file is incomplete or corrupt ({type(e).__name__}: {e}); record it "
                               "again with `flannel-repro trace`") from None
    return TraceFile(header, steps)


def _parse(item: tuple[int, str], path: Path) -> dict[str, Any]:
    number, text = item
    if not text:
        raise FlannelError(f"{path}: trace file ends early (line {number or 'after the last'}); it is truncated: "
                           "record it again with `flannel-repro trace`")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise FlannelError(f"{path}, line {number}: not JSON ({e.msg}); the trace file is corrupt") from None
    if not isinstance(doc, dict):
        raise FlannelError(f"{path}, line {number}: not a JSON object; the trace file is corrupt")
    return doc
