"""`flannel-repro diff A B`: a file against itself is identical; one thread against two gives a divergence curve;
runs that differ in more than seeds, threads or device are refused with the difference named."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import run_cli, thread_pair, write_params

from flannel_repro.audit.diff import diff, write_csv, write_plot
from flannel_repro.core.config import load_params
from flannel_repro.core.errors import FlannelError
from flannel_repro.data.masks import load_masks
from flannel_repro.training.loop import train
from flannel_repro.trajectory.file import load_trajectory

MASKS = "tensors/Flannel/live_dead_tokens.safetensors"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_data) -> Path:
    """t1.safetensors and t2.safetensors: the tiny run with 1 and with 2 threads."""
    return thread_pair(tmp_path_factory.mktemp("diff"), tiny_data, "t")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_file_against_itself_is_identical(project):
    proc = run_cli("diff", "t1.safetensors", "t1.safetensors", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "identical: t1.safetensors and t1.safetensors agree bit for bit at all 7 steps" in proc.stdout
    rows = read_csv(project / "reports/diff.csv")
    assert [int(r["step"]) for r in rows] == list(range(7))
    for r in rows:
        assert r["differs"] == "" and int(r["n_differ"]) == 0
        assert float(r["max_abs_diff"]) == float(r["mean_dist"]) == 0.0
        assert float(r["mean_dist_live"]) == float(r["mean_dist_dead"]) == 0.0
    assert (project / "reports/diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_thread_against_two_gives_a_divergence_curve(project, tmp_path):
    a, b = load_trajectory(project / "t1.safetensors"), load_trajectory(project / "t2.safetensors")
    result = diff(a.path, b.path, project)
    assert result.exit_code == 1 and result.split
    run, step, tensor = result.first
    # The first divergent step, found independently from the tensors themselves.
    first_w = next(t for t in range(7) if not torch.equal(a.step("W", t), b.step("W", t)))
    assert run == 0 and 1 <= step <= first_w
    rows = result.rows
    assert all(r.n_differ == 0 for r in rows[:first_w]) and rows[first_w].n_differ > 0

    live = load_masks(project / MASKS, 300).live_mask
    for r in rows:
        wa, wb = a.step("W", r.step).float(), b.step("W", r.step).float()
        dist = (wa - wb).norm(dim=1)
        assert r.n_differ == int((wa != wb).sum())
        assert r.max_abs_diff == pytest.approx(float((wa - wb).abs().max()))
        assert r.mean_dist == pytest.approx(float(dist.mean()))
        assert r.mean_dist_live == pytest.approx(float(dist[live].mean()))
        assert r.mean_dist_dead == pytest.approx(float(dist[~live].mean()))

    write_csv(result, tmp_path / "curve.csv")
    write_plot(result, tmp_path / "curve.png")
    csv_rows = read_csv(tmp_path / "curve.csv")
    assert [int(r["n_differ"]) for r in csv_rows] == [r.n_differ for r in rows]
    assert csv_rows[step]["differs"].split(";")[0] == tensor
    assert sum(float(r["mean_dist"]) > 0 for r in csv_rows) >= 1
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert f"first divergence: run 0, step {step}, tensor {tensor}" in result.lines()[0]


def test_without_masks_the_split_is_left_out_and_said(project, tmp_path):
    result = diff(project / "t1.safetensors", project / "t2.safetensors", tmp_path)  # no masks under tmp_path
    assert not result.split
    assert result.notes == [f"{tmp_path / MASKS} not found: distances are not split into live and dead tokens"]
    write_csv(result, tmp_path / "curve.csv")
    assert {r["mean_dist_live"] for r in read_csv(tmp_path / "curve.csv")} == {""}


def test_other_params_are_refused_naming_the_key(project):
    write_params(project, {"train": {"learning_rate": 0.002}, "paths": {"trajectory": "lr.safetensors"}})
    params = load_params(project / "params.yaml")
    write_params(project)
    train(params, project, progress=False)
    with pytest.raises(FlannelError, match=r"lr\.safetensors: recorded with train\.learning_rate = 0\.002 but "
                                           r".*t1\.safetensors with 0\.001"):
        diff(project / "t1.safetensors", project / "lr.safetensors", project)
    proc = run_cli("diff", "t1.safetensors", "lr.safetensors", cwd=project)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("flannel-repro diff: error: lr.safetensors: recorded with train.learning_rate")
