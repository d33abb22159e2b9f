"""The process settings of runtime.py: `flannel-repro` keeps large freed blocks for reuse, and where that is not
available it says so in one line and runs anyway. (That the numbers do not change is test_fidelity's job: it runs
the command line, settings applied, against the notebook's own code.)"""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from flannel_repro.cli import main
from flannel_repro.core import runtime

BLOCK_MB = 128  # far above glibc's largest mmap threshold (32 MB)

# Allocate, touch and free a large tensor round after round, as training steps do, and count the page faults of
# the rounds after a short warm-up. (The warm-up matters: torch asks for 64-byte aligned blocks, and a freed block
# with a small allocation behind it is a few bytes too small for the next aligned request, so glibc may take a
# second block from the system once; from then on the two are reused in turn.)
WARM_UP, MEASURED = 4, 8
REUSE = f"""
import resource, sys, torch
{{setup}}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({WARM_UP}):
    x = torch.ones({BLOCK_MB} << 18)
    del x
before = faults()
for _ in range({MEASURED}):
    x = torch.ones({BLOCK_MB} << 18)
    del x
print(faults() - before)
"""


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def _refaults(setup: str) -> int:
    proc = subprocess.run([sys.executable, "-c", REUSE.format(setup=setup)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not _glibc(), reason="the setting is glibc's")
def test_command_line_reuses_a_freed_large_block_without_page_faults(tmp_path):
    pages = MEASURED * (BLOCK_MB << 8)  # 4 KiB pages
    # Without the setting, every block is mapped afresh: one fault per page.
    assert _refaults("") > 0.9 * pages
    # Any command applies it first, even one that stops at bad input.
    missing = tmp_path / "missing.yaml"
    setup = f"from flannel_repro.cli import main; assert main(['train', '--params', {str(missing)!r}]) == 2"
    assert _refaults(setup) < 0.01 * pages


def test_without_glibc_training_runs_with_one_note_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runtime.os, "confstr", lambda name: None)  # as on musl
    rt = runtime.configure()
    assert rt.allocator == "system default"
    assert rt.note == ("the C library here is not glibc, so large freed buffers go back to the system at every step "
                       "(slower; the numbers are the same)")

    assert main(["train", "--params", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"flannel-repro train: note: {rt.note}"
    assert len(err) == 2 and err[1].startswith("flannel-repro train: error: ")
    # Commands that do not train say nothing about it.
    assert main(["masks", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert "note" not in capsys.readouterr().err
