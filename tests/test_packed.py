"""The packed trajectory: `pack` then `unpack` gives the very file the run wrote (its sha256), the reader returns the
same numbers as the safetensors reader, `check`, `verify` and `diff` take either form, and a damaged packed file (a
truncated, flipped, swapped or missing frame, a newer format) is one line naming key, run and step, never a
traceback nor a wrong number."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import copy_tiny_data, run_cli, thread_pair, write_params

from flannel_repro.audit.check import check
from flannel_repro.core.config import load_params
from flannel_repro.core.errors import FlannelError
from flannel_repro.training.loop import train
from flannel_repro.trajectory.file import Trajectory, load_trajectory
from flannel_repro.trajectory.packed import PackedCorrupt, PackedFile, pack, unpack
from flannel_repro.trajectory.packed_reader import PackedTrajectory

TRAJ = "tensors/Flannel/1.20h_flannel_7.safetensors"
STEPS = 13  # key frames at 0, 4, 8 and 12 with key_every=4
ROWS = 64  # the tiny vocabulary (300 rows) in 5 chunks of W, the last one short (grad_W: whole slices)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, whatever its dtype (bf16 and NaN compared bit for bit)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data) -> Path:
    """The tiny run with 2 runs and 13 steps, and `t.flpack`, its packed form in 4-step key-frame spans."""
    root = copy_tiny_data(tiny_data, tmp_path_factory.mktemp("packed"))
    write_params(root, {"train": {"num_runs": 2, "steps": STEPS}})
    train(load_params(root / "params.yaml"), root, progress=False)
    pack(root / TRAJ, root / "t.flpack", key_every=4, rows_per_chunk=ROWS)
    return root


def frames(path: Path, name: str) -> tuple[int, ...]:
    with PackedFile(path) as pf:
        return pf.keys[name].frames


def frame_index(path: Path, name: str, run: int, step: int, chunk: int) -> int:
    with PackedFile(path) as pf:
        k = pf.keys[name]
        return (run * k.shape[1] + step) * len(pf.chunk_bounds(name)) + chunk


def edited(project: Path, name: str, edit) -> Path:
    """A copy of t.flpack with `edit(bytearray)` applied."""
    data = bytearray((project / "t.flpack").read_bytes())
    out = project / name
    out.write_bytes(edit(data))
    return out


# -- lossless ------------------------------------------------------------------------------------------------
def test_unpack_gives_the_very_file_the_run_wrote(project, tmp_path):
    proc = run_cli("pack", str(project / TRAJ), str(tmp_path / "p.flpack"), "--key-every", "5", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "smaller than the" in proc.stdout
    proc = run_cli("unpack", str(tmp_path / "p.flpack"), str(tmp_path / "back.safetensors"), cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert sha256(tmp_path / "back.safetensors") == sha256(project / TRAJ)  # the original file's own bytes
    assert (tmp_path / "p.flpack").stat().st_size < (project / TRAJ).stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.safetensors", "p.flpack"]  # no temporary left


def test_unpack_of_the_fixture_and_the_default_suffixes(project, tmp_path):
    shutil.copy(project / TRAJ, tmp_path / "run.safetensors")
    assert run_cli("pack", "run.safetensors", cwd=tmp_path).returncode == 0
    (tmp_path / "run.safetensors").rename(tmp_path / "original.safetensors")
    assert run_cli("unpack", "run.flpack", cwd=tmp_path).returncode == 0
    assert sha256(tmp_path / "run.safetensors") == sha256(project / TRAJ)
    assert unpack(project / "t.flpack", tmp_path / "u.safetensors") == sha256(project / TRAJ)


def test_the_reader_returns_the_same_numbers_as_the_file(project):
    a, b = Trajectory(project / TRAJ), load_trajectory(project / "t.flpack")
    assert isinstance(b, PackedTrajectory)
    assert a.keys() == b.keys() and a.shapes == b.shapes and a.metadata == b.metadata
    assert a.params == b.params and (a.n_runs, a.n_steps) == (b.n_runs, b.n_steps) == (2, STEPS)
    assert a.recorded_steps == b.recorded_steps == tuple(range(STEPS + 1)) and b.index_of(-1) == STEPS
    for key in a.keys():
        assert raw(a[key]) == raw(b[key]), key
    for name in ("W", "grad_W"):
        for run in (0, 1):
            for t in (STEPS, 5, 0, 4, 3, 12, 7, 8, -1):  # out of order: across key frames, backwards, the last
                assert raw(a.step(name, t, run)) == raw(b.step(name, t, run)), (name, run, t)
            assert raw(a.step_block(name, 2, 11, run)) == raw(b.step_block(name, 2, 11, run))
            for tokens in (7, [0, 63, 64, 299, 150], [299]):
                for steps in (slice(None), slice(3, 10, 2), slice(9, 10)):
                    assert raw(a.token_rows(name, tokens, run, steps)) == raw(b.token_rows(name, tokens, run, steps))
    assert raw(a.step("losses_f32", 3, 1)) == raw(b.step("losses_f32", 3, 1))


def test_a_version_1_file_still_reads_and_unpacks(project, tmp_path):
    """Files packed before version 2 (delta frames against the step before) read and unpack as they did."""
    pack(project / TRAJ, tmp_path / "v1.flpack", key_every=4, rows_per_chunk=ROWS, version=1)
    assert (tmp_path / "v1.flpack").read_bytes()[8:12] == struct.pack("<I", 1)
    assert unpack(tmp_path / "v1.flpack", tmp_path / "back.safetensors") == sha256(project / TRAJ)
    a, b = Trajectory(project / TRAJ), load_trajectory(tmp_path / "v1.flpack")
    for t in (11, 2, 12, 7):
        assert raw(a.step("W", t, 1)) == raw(b.step("W", t, 1)), t
    assert raw(a.token_rows("W", [5, 299], 0)) == raw(b.token_rows("W", [5, 299], 0))
    assert check(tmp_path / "v1.flpack").exit_code == 0


@pytest.mark.parametrize("key_every", [1, 2, 4, 5, 32, 100])
def test_a_chain_is_short_and_holds_the_chain_of_the_next_step(key_every):
    """What the reader's reuse and the writer's memory rest on: every step a step refers to is on the chain of the
    step before it (a walk decodes one new frame per step), the writer's held steps are exactly those still
    referred to, and a chain has at most 1 + log2(key_every) frames."""
    from flannel_repro.trajectory.packed import chain, reference, referenced

    for t in range(3 * key_every + 2):
        assert len(chain(t, key_every)) <= 1 + (key_every - 1).bit_length()
        assert chain(t, key_every)[0] == t - t % key_every and chain(t, key_every)[-1] == t
        r = reference(t + 1, key_every)
        assert r is None or r in chain(t, key_every)
        later = {reference(u, key_every) for u in range(t + 1, t - t % key_every + key_every)} - {None}
        assert referenced(t, key_every) == {u for u in later if u <= t} <= set(chain(t, key_every))
        assert chain(t, key_every, version=1) == list(range(t - t % key_every, t + 1))


def test_both_forms_have_one_content_digest_and_check_intact(project):
    plain, packed = check(project / TRAJ), check(project / "t.flpack")
    assert plain.exit_code == packed.exit_code == 0, packed.lines()
    assert packed.content_digest == plain.content_digest is not None
    assert packed.n_slices == plain.n_slices == 2 * 2 * (STEPS + 1)
    proc = run_cli("check", "t.flpack", cwd=project)
    assert proc.returncode == 0 and "verdict: intact" in proc.stdout, proc.stdout + proc.stderr


def test_check_of_a_packed_changed_file_gives_the_files_verdict(project, tmp_path):
    """A slice changed before packing: the frames are intact, so the verdict is the safetensors check's own."""
    from corrupt import xor_byte

    xor_byte(project / TRAJ, tmp_path / "bad.safetensors", "W", (1, 6), byte=100)
    pack(tmp_path / "bad.safetensors", tmp_path / "bad.flpack")
    plain, packed = check(tmp_path / "bad.safetensors"), check(tmp_path / "bad.flpack")
    assert packed.exit_code == plain.exit_code == 1
    assert packed.problems == plain.problems
    assert (packed.problems[0].key, packed.problems[0].run, packed.problems[0].step) == ("W", 1, 6)


def test_diff_and_verify_take_the_packed_form(tmp_path, tiny_data):
    root = thread_pair(tmp_path, tiny_data, "t")
    pack(root / "t1.safetensors", root / "t1.flpack", key_every=3, rows_per_chunk=ROWS)
    both = run_cli("diff", "t1.safetensors", "t2.safetensors", cwd=root)
    mixed = run_cli("diff", "t1.flpack", "t2.safetensors", cwd=root)
    assert both.returncode == mixed.returncode == 1, mixed.stderr
    assert both.stdout.replace("t1.safetensors", "A") == mixed.stdout.replace("t1.flpack", "A")
    same = run_cli("diff", "t1.flpack", "t1.safetensors", cwd=root)
    assert same.returncode == 0 and "agree bit for bit" in same.stdout, same.stderr
    write_params(root, {"train": {"num_threads": 1}, "paths": {"trajectory": "t1.safetensors"}})
    proc = run_cli("verify", "t1.flpack", "-q", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical" in proc.stdout


# -- random access -------------------------------------------------------------------------------------------
def test_one_step_decodes_its_chain_only(project):
    """A damaged frame at step 9 leaves readable every step whose chain does not hold it: with key frames every 4
    steps, 10 refers to 8 (not 9) and 11 to 10, so only step 9 decodes it."""
    at = frames(project / "t.flpack", "W")[frame_index(project / "t.flpack", "W", 0, 9, 2)]

    def flip(data: bytearray) -> bytearray:
        data[at + 200] ^= 0x01
        return data

    bad = edited(project, "late.flpack", flip)
    good = Trajectory(project / TRAJ)
    with load_trajectory(bad) as traj:
        for t in (7, 3, 8, 10, 11, 12, 13):  # 8 is the key frame of 9's span; 12 starts the next span
            assert raw(traj.step("W", t)) == raw(good.step("W", t)), t
        with pytest.raises(PackedCorrupt, match="W at run 0, step 9: the delta frame \\(chunk 2\\)"):
            traj.step("W", 9)  # decodes 8, 9
        assert raw(traj.token_rows("W", 10)) == raw(good.token_rows("W", 10))  # chunk 0 only
        with pytest.raises(PackedCorrupt, match="step 9"):
            traj.token_rows("W", 2 * ROWS + 5)


# -- bad input -----------------------------------------------------------------------------------------------
def corrupt_cli(project: Path, path: Path, line: str, code: int = 1) -> None:
    """`check` and `unpack` of `path`: one line naming the problem, exit `code`, no traceback."""
    for args in (("check", str(path)), ("unpack", str(path), str(project / "never.safetensors"))):
        proc = run_cli(*args, cwd=project)
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert line in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        if args[0] == "unpack":
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (project / "never.safetensors").exists()
    with pytest.raises(FlannelError) as e:
        with load_trajectory(path) as traj:
            for name in ("W", "grad_W"):
                for run in (0, 1):
                    for t in range(STEPS + 1):
                        traj.step(name, t, run)
    assert e.value.exit_code == code and line in str(e.value)


def test_a_flipped_bit_inside_a_compressed_frame(project):
    at = frames(project / "t.flpack", "grad_W")[frame_index(project / "t.flpack", "grad_W", 1, 5, 0)]

    def flip(data: bytearray) -> bytearray:
        data[at + 120] ^= 0x04  # inside the zstd payload
        return data

    corrupt_cli(project, edited(project, "flip.flpack", flip),
                "grad_W at run 1, step 5: the key frame (chunk 0) no longer matches its digest")


def test_a_truncated_frame(project):
    fr = frames(project / "t.flpack", "W")
    at = fr[frame_index(project / "t.flpack", "W", 1, 6, 1)]
    corrupt_cli(project, edited(project, "cut.flpack", lambda d: d[: at + 150]),
                "W at run 1, step 6: the delta frame (chunk 1) is truncated: the file ends inside it")


def test_two_frames_swapped(project):
    fr = frames(project / "t.flpack", "W")
    i = frame_index(project / "t.flpack", "W", 0, 5, 0)
    a, b, c = fr[i], fr[i + 1], fr[i + 2]
    corrupt_cli(project, edited(project, "swap.flpack", lambda d: d[:a] + d[b:c] + d[a:b] + d[c:]),
                "W at run 0, step 5: the index points at a frame holding W run 0, step 5, chunk 1")


def test_a_key_frame_missing(project):
    fr = frames(project / "t.flpack", "W")
    i = frame_index(project / "t.flpack", "W", 0, 8, 0)
    corrupt_cli(project, edited(project, "gone.flpack", lambda d: d[: fr[i]] + d[fr[i + 1] :]),
                "W at run 0, step 8: the key frame (chunk 0) is missing or out of place: the file holds W run 0, "
                "step 8, chunk 1 where it belongs")


# -- edits made consistent with every digest (a forger's, or a tool's that rewrites the file) -------------------
def resigned_index(data: bytearray, edit) -> bytearray:
    """`data` with its index JSON changed by `edit(index)` and every digest over it recomputed."""
    import json

    import zstandard

    from flannel_repro.trajectory.packed import _FIXED, _FRAME, _SIGNED, _TAG, INDEX

    fixed = list(_FIXED.unpack(bytes(data[: _FIXED.size])))
    at = fixed[5]
    rec = _FRAME.unpack(bytes(data[at : at + _FRAME.size]))
    payload = bytes(data[at + _FRAME.size : at + _FRAME.size + rec[8]])
    index = json.loads(zstandard.ZstdDecompressor().decompress(payload))
    edit(index)
    text = json.dumps(index, separators=(",", ":")).encode()
    payload = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(text)
    head = _FRAME.pack(_TAG, INDEX, 0, 0, 0, 0, 0, 0, len(payload), len(text), b"")[:_SIGNED]
    record = head + hashlib.sha256(head + payload).digest() + payload
    fixed[6], fixed[7] = len(record), hashlib.sha256(payload).digest()
    return bytearray(_FIXED.pack(*fixed)) + data[_FIXED.size : at] + record


@pytest.mark.parametrize("at, value", [(12, 5), (12, 8), (8, 1)])  # key_every 4 -> 5 or 8; version 2 -> 1
def test_a_changed_fixed_header_is_corrupt_before_any_number(project, at, value):
    """The fixed header has no digest of its own, and version 2's chains skip steps, so a changed key_every or
    version could lead a reader along another chain to other numbers; the index, under its digest, says them again."""
    def edit(data: bytearray) -> bytearray:
        data[at : at + 4] = struct.pack("<I", value)
        return data

    bad = edited(project, "fixed.flpack", edit)
    with pytest.raises(PackedCorrupt, match="the fixed header was changed"):
        load_trajectory(bad)
    corrupt_cli(project, bad, "the fixed header was changed")


def test_an_index_that_disagrees_with_the_header_is_corrupt_and_an_equal_one_reads_right(project):
    """A re-signed index is measured against the packed safetensors header, whose values are the ones used."""
    def swap(index):
        w = next(k for k in index["keys"] if k["name"] == "W")
        w["shape"] = [w["shape"][0], w["shape"][1], w["shape"][3], w["shape"][2]]

    def floats(index):
        w = next(k for k in index["keys"] if k["name"] == "W")
        w["shape"] = [float(x) for x in w["shape"]]

    bad = edited(project, "swapped.flpack", lambda d: resigned_index(d, swap))
    corrupt_cli(project, bad, "W: the index describes it as BF16 [2, 14, 16, 300]")
    same = edited(project, "floats.flpack", lambda d: resigned_index(d, floats))
    good = Trajectory(project / TRAJ)
    with load_trajectory(same) as traj:
        assert traj.shapes["W"] == good.shapes["W"] and all(type(x) is int for x in traj.shapes["W"])
        assert raw(traj.step("W", 9, 1)) == raw(good.step("W", 9, 1))


def test_a_frame_inserted_before_the_index_is_corrupt(project):
    from flannel_repro.trajectory.packed import _FIXED

    def insert(data: bytearray) -> bytearray:
        first = frames(project / "t.flpack", "W")[0]
        extra = data[first : frames(project / "t.flpack", "W")[1]]  # a whole, valid frame record, once more
        index_at = _FIXED.unpack(bytes(data[: _FIXED.size]))[5]
        data = data[:index_at] + extra + data[index_at:]
        data[24:32] = struct.pack("<Q", index_at + len(extra))  # the fixed header points past the inserted bytes
        return resigned_index(data, lambda index: None)

    bad = edited(project, "inserted.flpack", insert)
    for args in (("check", str(bad)), ("unpack", str(bad), str(project / "never.safetensors"))):
        proc = run_cli(*args, cwd=project)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        assert "that are no frame the index lists" in proc.stdout + proc.stderr
    assert not (project / "never.safetensors").exists()
    good = Trajectory(project / TRAJ)
    with load_trajectory(bad) as traj:  # the reader never reads the inserted bytes: its numbers stay right
        assert raw(traj.step("W", 7)) == raw(good.step("W", 7))


def test_a_frame_claiming_a_huge_decoded_size_is_refused_before_decoding(project):
    """A re-signed frame record claiming 1 GiB: refused by its length, with nothing decoded."""
    from flannel_repro.trajectory.packed import _FRAME, _SIGNED

    at = frames(project / "t.flpack", "W")[frame_index(project / "t.flpack", "W", 0, 1, 0)]

    def claim(data: bytearray) -> bytearray:
        rec = list(_FRAME.unpack(bytes(data[at : at + _FRAME.size])))
        rec[9] = 1 << 30
        body = bytes(data[at + _FRAME.size : at + _FRAME.size + rec[3] + rec[8]])
        head = _FRAME.pack(*rec[:-1], b"")[:_SIGNED]
        data[at : at + _FRAME.size] = head + hashlib.sha256(head + body).digest()
        return data

    bad = edited(project, "huge.flpack", claim)
    with load_trajectory(bad) as traj, pytest.raises(PackedCorrupt, match="W at run 0, step 1: chunk 0 holds"):
        traj.step("W", 1)


def test_a_key_frame_overwritten_in_place(project):
    fr = frames(project / "t.flpack", "W")
    i = frame_index(project / "t.flpack", "W", 1, 4, 0)

    def zero(data: bytearray) -> bytearray:
        data[fr[i] : fr[i + 1]] = bytes(fr[i + 1] - fr[i])
        return data

    corrupt_cli(project, edited(project, "zeroed.flpack", zero),
                "W at run 1, step 4: no frame at byte")


def test_a_newer_format_version_is_unreadable(project):
    def newer(data: bytearray) -> bytearray:
        data[8:12] = struct.pack("<I", 3)
        return data

    corrupt_cli(project, edited(project, "v3.flpack", newer),
                "packed trajectory format version 3, but this flannel-repro reads versions 1 to 2", code=2)


def test_packing_a_broken_or_packed_file_is_refused_and_writes_nothing(project, tmp_path):
    data = (project / TRAJ).read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    for src, line in ((tmp_path / "short.safetensors", "truncated"), (project / "t.flpack", "is already packed")):
        proc = run_cli("pack", str(src), str(tmp_path / "out.flpack"), cwd=project)
        assert proc.returncode == 2 and line in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.safetensors"]


def test_a_file_with_a_step_schedule_is_refused_by_pack_in_one_line(tmp_path, tiny_data):
    """The packed reader indexes steps by position: a record.steps file is kept as safetensors, not packed wrongly."""
    root = copy_tiny_data(tiny_data, tmp_path / "p")
    write_params(root, {"train": {"steps": 4}, "record": {"steps": 2}})
    train(load_params(root / "params.yaml"), root, progress=False)
    proc = run_cli("pack", str(root / TRAJ), str(root / "t.flpack"), cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"flannel-repro pack: error: {root / TRAJ}: recorded with a record.steps schedule, which the packed form "
        "does not carry yet; keep the safetensors file (a scheduled file is already small: docs/analysis.md)"]
    assert not (root / "t.flpack").exists()
