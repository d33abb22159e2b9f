"""`flannel-repro`: one subcommand per stage. It only parses arguments and calls the stage functions.

    flannel-repro corpus | tokenizer-corpus | tokenizer | masks | train   [--params params.yaml] [-S section.key=value]

Paths in params.yaml are relative to the folder holding params.yaml. A problem with the input is one line on
stderr and exit status 2; no traceback. Exit 0 and 1 are a verdict of check, verify and diff and nothing else; a
result that cannot be written (stdout closed or full, a --report file) is exit 4 (docs/security.md). Before any
work, each command checks its files (paths_guard.py): no output may be one of its inputs or another output. SIGTERM
and SIGHUP stop every command as Ctrl-C does: one line, exit 128 + the signal number (train stops at a step
boundary: see stopping.py).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import importlib
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from flannel_repro.core.errors import (
    ConfigError,
    FlannelError,
    Interrupted,
    OutputFailed,
    TrackingIncomplete,
    signal_name,
)
from flannel_repro.core.runtime import configure

if TYPE_CHECKING:  # the config and everything else is imported in main(), where Ctrl-C is one line
    from flannel_repro.core.config import Params


# Where each command's code lives (the dvc.yaml stage of the same name runs it), imported at start-up while a
# Ctrl-C still ends the process in one line.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "corpus": ("flannel_repro.data.corpus",),
    "tokenizer-corpus": ("flannel_repro.data.tokenizer_corpus",),
    "tokenizer": ("flannel_repro.data.tokenizer",),
    "masks": ("flannel_repro.data.masks",),
    "train": ("flannel_repro.training.stage",),
    "exposure": ("flannel_repro.analysis.exposure",),
    "sync": ("flannel_repro.tracking.mlflow_store",),
    "verify": ("flannel_repro.audit.verify",),
    "check": ("flannel_repro.audit.check",),
    "diff": ("flannel_repro.audit.diff",),
    "trace": ("flannel_repro.audit.trace",),
    "trace-diff": ("flannel_repro.audit.trace",),
    "adopt": ("flannel_repro.audit.notebook",),
    "sweep": ("flannel_repro.sweep.driver",),
    "pack": ("flannel_repro.trajectory.packed",),
    "unpack": ("flannel_repro.trajectory.packed",),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a params value for this run, e.g. -S train.steps=10 (repeatable)",
    )


def _load(args: argparse.Namespace, stage: str | None = None) -> tuple[Params, Path]:
    """The params and project root; for a `stage` command, after checking the files it reads and writes."""
    from flannel_repro.core.config import load_params
    from flannel_repro.core.paths_guard import check_files, stage_files

    params = load_params(args.params, args.overrides)
    root = Path(args.params).resolve().parent
    if stage is not None:
        check_files(stage_files(stage, params, root, Path(args.params)))
    return params, root


def _emit(lines: list[str] | str, stream_name: str = "stdout") -> None:
    """Write a command's result and flush it: a stdout that is closed (`>&-`) or full (`> /dev/full`) is an
    OutputFailed line (exit 4), never a verdict's 0 or 1 nor a traceback."""
    stream = getattr(sys, stream_name)
    text = lines if isinstance(lines, str) else "\n".join(lines)
    if stream is None:
        raise OutputFailed(f"{stream_name} is closed, so the result was not written; run it with {stream_name} open")
    try:
        stream.write(text + "\n")
        stream.flush()
    except OSError as e:
        raise OutputFailed(f"the result could not be written to {stream_name} ({e.strerror or e})") from None


def _write_report(path: Path, doc: dict) -> None:
    from flannel_repro.core.fsutil import write_json

    try:
        write_json(path, doc)
    except FlannelError as e:  # after the verdict: not the verdict's code
        raise OutputFailed(str(e)) from None


def _refuse_dvc_added(root: Path, out: str, build_key: str) -> None:
    """Stop a stage from writing over the user's own `dvc add`ed file (DVC itself does not stop it)."""
    tracked = root / f"{out}.dvc"
    if tracked.is_file():
        raise FlannelError(
            f"{out}: is your own file, tracked by {out}.dvc, and this stage would overwrite it; to use it, set "
            f"{build_key}: [] in params.yaml (README: Use your own corpus or tokenizer); to build one instead, point "
            f"the paths key at another file"
        )


def cmd_corpus(args: argparse.Namespace) -> int:
    from flannel_repro.data.corpus import corpus

    params, root = _load(args, "corpus")
    _refuse_dvc_added(root, params.paths.corpus, "corpus.build")
    r = corpus(params, root)
    print(f"corpus: {params.paths.corpus} ({r.n_bytes:,} bytes, sha256 {r.sha256[:12]}, source {r.source})")
    return 0


def cmd_tokenizer_corpus(args: argparse.Namespace) -> int:
    from flannel_repro.data.tokenizer_corpus import tokenizer_corpus

    params, root = _load(args, "tokenizer-corpus")
    _refuse_dvc_added(root, params.paths.tokenizer_corpus, "tokenizer_corpus.build")
    r = tokenizer_corpus(params, root)
    print(f"tokenizer corpus: {params.paths.tokenizer_corpus} ({r.n_bytes:,} bytes, sha256 {r.sha256[:12]}, "
          f"source {r.source})")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from flannel_repro.data.tokenizer import tokenizer

    params, root = _load(args, "tokenizer")
    _refuse_dvc_added(root, params.paths.tokenizer, "tokenizer.build")
    r = tokenizer(params, root)
    print(f"tokenizer: {params.paths.tokenizer} ({r.vocab_size:,} tokens, sha256 {r.sha256[:12]}, source {r.source})")
    return 0


def cmd_masks(args: argparse.Namespace) -> int:
    from flannel_repro.data.masks import masks

    params, root = _load(args, "masks")
    r = masks(params, root)
    share = r.n_dead / (r.n_live + r.n_dead)
    print(f"masks: {params.paths.masks} ({r.n_tokens:,} corpus tokens; live {r.n_live:,} | dead {r.n_dead:,} "
          f"({share:.1%}): {r.n_dead_bytes:,} single bytes, {r.n_dead_merges:,} merges)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flannel_repro.training.stage import run_train_stage

    params, root = _load(args, "train")
    # Opens the tracking run first (an unreachable server fails here), then trains, writes the reports, logs them.
    try:
        result, run_id = run_train_stage(params, root, progress=not args.quiet, resume=args.resume)
    except TrackingIncomplete as e:  # the outputs are written: say so, then what tracking lacks
        _print_trained(params, root, e.result, e.run_id, store_reached=False)
        raise
    _print_trained(params, root, result, run_id)
    return 0


def cmd_exposure(args: argparse.Namespace) -> int:
    from flannel_repro.analysis.exposure import exposure

    params, root = _load(args, "exposure")
    r = exposure(params, root)
    seen = ", ".join(f"{a:,} ({b:,} once)" for a, b in zip(r.n_seen, r.n_once, strict=True))
    print(f"exposure: {params.paths.exposure} ({r.n_steps:,} steps; tokens seen per run: {seen})")
    return 0


def _print_trained(params: Params, root: Path, result, run_id: str | None, store_reached: bool = True) -> None:
    print(
        f"trajectory: {params.paths.trajectory} (sha256 {result.sha256}); final loss {result.final_loss:.4f}; "
        f"{result.steps_per_s:.2f} steps/s on {result.device}"
    )
    if run_id is not None:
        from flannel_repro.core.credentials import redacted
        from flannel_repro.core.store_uri import tracking_uri
        from flannel_repro.tracking.mlflow_store import training_runs_url

        uri = tracking_uri(params.tracking, root)
        if store_reached:  # the page needs the run's experiment id, read back from the store
            try:
                page = training_runs_url(uri, run_id)
            except FlannelError as e:
                print(f"mlflow: the training runs page could not be looked up ({e})")
            else:
                local = not uri.startswith(("http:", "https:"))
                ui = f" (`mlflow ui --host 127.0.0.1 --backend-store-uri {redacted(uri)}`)" if local else ""
                print(f"mlflow: training runs at {page}{ui}")
        print(f"mlflow: run {run_id} in experiment {params.tracking.experiment!r} at {redacted(uri)}")


def cmd_sync(args: argparse.Namespace) -> int:
    from flannel_repro.tracking.mlflow_store import sync

    for line in sync(Path(args.params).resolve().parent):
        print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from flannel_repro.audit.notebook import notebook_reference
    from flannel_repro.audit.reference import load_reference
    from flannel_repro.audit.verify import AuditLogged, log_audit, verify
    from flannel_repro.core.config import load_params
    from flannel_repro.core.paths_guard import Files, check_files, check_names, project_files
    from flannel_repro.trajectory.notebook import is_notebook_file

    params_path = Path(args.params)
    check_names({"--params": params_path, **({"the reference": Path(args.reference)} if args.reference else {})})
    root = params_path.resolve().parent
    current = load_params(params_path) if params_path.is_file() or args.reference is None else None
    if args.reference and args.run_id is None and is_notebook_file(Path(args.reference)):
        ref = notebook_reference(Path(args.reference), current, root)  # a file the notebook wrote (audit/notebook.py)
    else:
        ref = load_reference(Path(args.reference) if args.reference else None, args.run_id, current, root)
    # The reference and the inputs its rerun reads; the project's own files are kept too.
    reads = {"the reference": Path(args.reference)} if args.reference else {}
    if ref.params is not None:  # None: a corrupt reference, given its verdict without a rerun
        reads |= {f"the reference's paths.{k}": p for k, p in ref.params.paths.under(root).inputs().items()}
    keeps = project_files(current, root, params_path) if current is not None else {}
    writes = {opt: Path(path) for opt, path in (("--report", args.report), ("--metrics", args.metrics)) if path}
    check_files(Files(reads, writes, keeps))
    report = verify(
        ref, root, current=current, full=args.full, strict=args.strict, repeat=args.repeat, threads=args.threads,
        progress=not args.quiet,
    )
    # The verdict is written and shown first: a tracking store that fails afterwards cannot cost it.
    if args.report:
        _write_report(Path(args.report), report.to_json())
    if args.metrics:
        _write_report(Path(args.metrics), report.metrics())
    if args.json:
        _emit(report.lines(), "stderr")
        _emit(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        _emit(report.lines())
    try:
        logged = log_audit(report, current, root)
    except Exception as e:  # noqa: BLE001 -- the verdict is given: whatever the store does cannot change its code
        why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        logged = AuditLogged(f"the verdict could not be logged to tracking: {why}")
    if args.report and logged.audit_run_id is not None:  # the report names the run it was logged beside
        _write_report(Path(args.report), report.to_json(audited_run_id=logged.audited_run_id,
                                                        audit_run_id=logged.audit_run_id))
    with contextlib.suppress(OutputFailed):  # the verdict is out; a note that cannot be shown does not change it
        _emit(f"note: {logged.note}", "stderr" if args.json else "stdout")
    return report.exit_code


def cmd_check(args: argparse.Namespace) -> int:
    from flannel_repro.audit.check import check
    from flannel_repro.core.paths_guard import Files, check_files, same_file
    from flannel_repro.trajectory.notebook import is_notebook_file

    path = Path(args.file) if args.file else None
    project = None  # the project's own trajectory and metrics, when the file checked is that trajectory
    if path is None:
        params, root = _load(args)
        path, project = params.paths.under(root).trajectory, params.paths.under(root)
    elif Path(args.params).is_file():  # a file named: compared with the project's metrics if it is its trajectory
        with contextlib.suppress(ConfigError):  # params.yaml only names what to compare with; the check goes on
            params, root = _load(args)
            if same_file(path, params.paths.under(root).trajectory):
                project = params.paths.under(root)
    if args.threads < 1:
        raise FlannelError(f"--threads {args.threads}: give at least 1")
    report_path = {"--report": Path(args.report)} if args.report else {}
    check_files(Files({"the trajectory": path}, report_path, {"--params": Path(args.params)}))
    if is_notebook_file(path):  # a file the notebook wrote: checked as far as it can be without digests
        from flannel_repro.audit.notebook import check_notebook

        if args.expect:
            raise FlannelError(f"--expect: {path} was written by the notebook, which records no content digest to "
                               "compare; `flannel-repro adopt` it first")
        report = check_notebook(path)
        project = None
    else:
        report = check(path, threads=args.threads)
    if args.expect:
        report.expected = (args.expect.strip().lower(), "--expect")
    elif project is not None:
        report.expected = _recorded_digest(project.metrics, params.paths.metrics)
    if args.report:
        _write_report(Path(args.report), report.to_json())
    _emit(json.dumps(report.to_json(), indent=2, sort_keys=True) if args.json else report.lines())
    return report.exit_code


def _recorded_digest(metrics: Path, name: str) -> tuple[str, str] | None:
    """The content digest the run's metrics/train.json records, to compare the checked file with, if it has one."""
    try:
        digest = json.loads(metrics.read_text(encoding="utf-8")).get("content_digest")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # no metrics beside the file (a received file, a run not finished): nothing to compare with
    return (digest, name) if isinstance(digest, str) and digest else None


def cmd_diff(args: argparse.Namespace) -> int:
    from flannel_repro.audit.diff import diff, open_trajectory, write_csv, write_plot
    from flannel_repro.core.config import load_params
    from flannel_repro.core.paths_guard import Files, check_files, check_names

    root = Path(args.params).resolve().parent
    current = load_params(args.params) if Path(args.params).is_file() else None  # a notebook file's data paths
    a, b = Path(args.a), Path(args.b)
    check_names({"trajectory A": a, "trajectory B": b, "--params": Path(args.params)})
    with open_trajectory(a, current) as traj:
        reads = {"trajectory A": a, "trajectory B": b, "A's paths.masks": root / traj.params.paths.masks}
    check_files(Files(reads, {"--csv": Path(args.csv), "--plot": Path(args.plot)}, {"--params": Path(args.params)}))
    result = diff(a, b, root, current)
    try:
        write_csv(result, Path(args.csv))
        write_plot(result, Path(args.plot))
    except FlannelError as e:  # after the verdict: not the verdict's code
        raise OutputFailed(str(e)) from None
    _emit([*result.lines(), f"curve: {args.csv}, plot: {args.plot}"])
    return result.exit_code


def cmd_adopt(args: argparse.Namespace) -> int:
    from flannel_repro.audit.notebook import adopt
    from flannel_repro.core.config import load_params
    from flannel_repro.core.paths_guard import Files, check_files, check_names, project_files
    from flannel_repro.trajectory.notebook import is_notebook_file

    params_path, source = Path(args.params), Path(args.file)
    check_names({"--params": params_path, "the notebook file": source, **({"OUT": Path(args.out)} if args.out else {})})
    root = params_path.resolve().parent
    current = load_params(params_path) if params_path.is_file() else None
    if not is_notebook_file(source):
        raise FlannelError(f"{source}: not a file the Flannel 7 notebook wrote (it has header metadata, or lacks "
                           "W_initial and the notebook's scalars); adopt takes the notebook's own safetensors file")
    out = Path(args.out) if args.out else source.with_name(f"{source.stem}.adopted.safetensors")
    reads = {"the notebook file": source}
    if current is not None:
        reads |= {f"paths.{k}": p for k, p in current.paths.under(root).inputs().items()}
    keeps = project_files(current, root, params_path) if current is not None else {}
    check_files(Files(reads, {"OUT": out}, keeps))
    result = adopt(source, out, root, current)
    _emit([*(f"note: {note}" for note in result.notes),
           f"adopted: {result.path} (sha256 {result.sha256}; content digest {result.content_digest}); "
           f"check it with `flannel-repro check {result.path}`, rerun it with `flannel-repro verify {result.path}`"])
    return 0


def _count(text: str, most: int = 1_000_000) -> int:
    """An argparse type: a whole number from 1 to `most`, refused (exit 2, one line) before anything uses it."""
    try:
        value = int(text) if len(text) <= 20 else None
    except ValueError:
        value = None
    if value is None or not 1 <= value <= most:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number from 1 to {most:,}")
    return value


def _threads(text: str) -> int:
    from flannel_repro.core.config import MAX_THREADS

    return _count(text, MAX_THREADS)


def cmd_trace(args: argparse.Namespace) -> int:
    from flannel_repro.audit.reference import load_reference
    from flannel_repro.audit.trace import trace_step
    from flannel_repro.core.config import load_params
    from flannel_repro.core.paths_guard import Files, check_files, check_names, project_files
    from flannel_repro.tracing.file import write_trace

    params_path = Path(args.params)
    check_names({"--params": params_path, **({"the reference": Path(args.reference)} if args.reference else {}),
                 **({"--out": Path(args.out)} if args.out else {})})
    root = params_path.resolve().parent
    current = load_params(params_path) if params_path.is_file() or args.reference is None else None
    ref = load_reference(Path(args.reference) if args.reference else None, args.run_id, current, root)
    out = Path(args.out or f"{Path(ref.source).stem if args.reference else 'trace'}.step{args.step}.jsonl")
    reads = {"the reference": Path(args.reference)} if args.reference else {}
    if ref.params is not None:
        reads |= {f"the reference's paths.{k}": p for k, p in ref.params.paths.under(root).inputs().items()}
    keeps = project_files(current, root, params_path) if current is not None else {}
    check_files(Files(reads, {"--out": out}, keeps))
    result = trace_step(ref, root, args.step, run=args.run, repeat=args.repeat, threads=args.threads)
    write_trace(out, result.header, result.traces[0])
    lines = [*result.lines(), f"trace: {out}"]
    if args.json:
        _emit(lines, "stderr")
        _emit(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        _emit(lines)
    return result.exit_code


def cmd_trace_diff(args: argparse.Namespace) -> int:
    from flannel_repro.audit.trace import diff_traces
    from flannel_repro.core.paths_guard import check_names
    from flannel_repro.tracing.file import read_trace

    check_names({"trace A": Path(args.a), "trace B": Path(args.b)})
    result = diff_traces(read_trace(Path(args.a)), read_trace(Path(args.b)), (args.a, args.b), step=args.step,
                         run=args.run)
    if args.json:
        _emit(result.lines(), "stderr")
        _emit(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        _emit(result.lines())
    return result.exit_code


def _trace_parsers(sub: argparse._SubParsersAction) -> None:
    help_text = ("trace one step of a recorded run op by op in this environment, rerunning to it (exit 0; with "
                 "--repeat, 1 when the step does not repeat itself)")
    p = sub.add_parser("trace", help=help_text, description=help_text)
    p.add_argument("reference", nargs="?", help="reference trajectory file (default: paths.trajectory of params.yaml)")
    p.add_argument("--run-id", help="trace a step of this MLflow run (its logged params and digests)")
    p.add_argument("--step", type=int, required=True, metavar="N", help="the optimizer step to trace (1 = the first)")
    p.add_argument("--run", type=int, default=0, metavar="R", help="which run of the file (default 0)")
    p.add_argument("--out", metavar="PATH", help="trace file to write (default: <reference>.step<N>.jsonl here)")
    p.add_argument("--repeat", type=_count, default=1, metavar="K",
                   help="trace the step K times and name the first op that does not repeat itself")
    p.add_argument("--threads", type=_threads, metavar="N", help="rerun with N threads instead of the reference's")
    p.add_argument("--params", default="params.yaml",
                   help="params file marking the project root (default: params.yaml)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (the report to stderr)")
    p.set_defaults(func=cmd_trace)
    help_text = ("compare two op traces (from anywhere) and name the op that broke determinism (exit 0 identical, "
                 "1 different, 2 bad input)")
    p = sub.add_parser("trace-diff", help=help_text, description=help_text)
    p.add_argument("a", help="trace file A (`flannel-repro trace`, or paths.trace of a run)")
    p.add_argument("b", help="trace file B, of the same recorded run")
    p.add_argument("--step", type=int, metavar="N", help="compare only step N (default: every step both traced)")
    p.add_argument("--run", type=int, metavar="R", help="compare only run R")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON on stdout")
    p.set_defaults(func=cmd_trace_diff)


def cmd_sweep(args: argparse.Namespace) -> int:
    from flannel_repro.sweep.driver import SweepConfig, sweep

    if not 0 <= args.retries <= 100:
        raise FlannelError(f"--retries {args.retries}: give a number from 0 to 100")
    cfg = SweepConfig(
        root=Path(args.params).resolve().parent, overrides=tuple(args.overrides),
        sweep_file=Path(args.file) if args.file else None, address=args.address, jobs=args.jobs,
        git_remote=args.git_remote, dvc_remote=args.dvc_remote, scratch=Path(args.scratch) if args.scratch else None,
        retries=args.retries, summary=Path(args.summary) if args.summary else None, audit=args.audit,
    )
    report = sweep(cfg)
    _emit(report.lines())
    return report.exit_code


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    help_text = ("train every point of a grid on Ray (in this process, or a cluster with --address), each one a DVC "
                 "experiment and an MLflow run (exit 0 all done, 2 a point failed or bad input)")
    p = sub.add_parser("sweep", help=help_text, description=help_text)
    p.add_argument("--params", default="params.yaml", help="params file of the project (default: params.yaml)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUES",
                   help="a grid axis in `dvc exp run -S` syntax: a,b,c or range(start,stop[,step]) (repeatable: the "
                   "product)")
    p.add_argument("--file", metavar="SWEEP.yaml", help="grid axes from a YAML file: section.key: [values]")
    p.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else Ray in this process)")
    p.add_argument("--jobs", type=_count, metavar="N", help="at most N points at once (default: as the CPUs allow)")
    p.add_argument("--git-remote", metavar="REMOTE",
                   help="git remote (name or URL) every node clones and pushes to (default: this project's folder)")
    p.add_argument("--dvc-remote", metavar="NAME",
                   help="DVC remote for the inputs and outputs (default: this project's DVC cache, shared)")
    p.add_argument("--scratch", metavar="DIR", help="each node's folder for the points' workspaces (default: "
                   "$TMPDIR/flannel-sweep-<uid>)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="retries of a point whose worker died (default 3)")
    p.add_argument("--summary", metavar="PATH", help="the JSON summary (default: reports/sweep.json)")
    p.add_argument("--audit", type=_count, default=0, metavar="K",
                   help="verify K of the recorded points, each on another node than the one that trained it, and say "
                   "which pairs of node fingerprints reproduce each other bit for bit")
    p.set_defaults(func=cmd_sweep)


def cmd_pack(args: argparse.Namespace) -> int:
    from flannel_repro.core.paths_guard import Files, check_files
    from flannel_repro.trajectory.packed import KEY_EVERY, PACKED_SUFFIX, pack

    src = Path(args.file)
    out = Path(args.out) if args.out else src.with_suffix(PACKED_SUFFIX)
    check_files(Files({"the trajectory": src}, {"the packed file": out}))
    r = pack(src, out, key_every=args.key_every or KEY_EVERY, threads=args.threads)
    _emit(f"packed: {out} ({r.packed_bytes:,} bytes, {r.ratio:.2f}x smaller than the {r.source_bytes:,}-byte "
          f"safetensors file of sha256 {r.source_sha256[:12]}; `flannel-repro unpack` gives it back)")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from flannel_repro.core.paths_guard import Files, check_files
    from flannel_repro.trajectory.packed import unpack

    src = Path(args.file)
    out = Path(args.out) if args.out else src.with_suffix(".safetensors")
    check_files(Files({"the packed file": src}, {"the trajectory": out}))
    sha = unpack(src, out)
    _emit(f"unpacked: {out} ({out.stat().st_size:,} bytes, sha256 {sha}; every slice matches the digest the run "
          "recorded of it)")
    return 0


def _pack_parsers(sub: argparse._SubParsersAction) -> None:
    help_text = "pack a trajectory losslessly into about a third of its bytes (docs/packed.md)"
    p = sub.add_parser("pack", help=help_text, description=help_text)
    p.add_argument("file", help="trajectory file (safetensors) written by `flannel-repro train`")
    p.add_argument("out", nargs="?", help="packed file (default: FILE with the suffix .flpack)")
    p.add_argument("--key-every", type=_count, metavar="K",
                   help="a key frame every K steps: one step decodes at most 1 + log2(K) frames per chunk "
                        "(default 32)")
    p.add_argument("--threads", type=_threads, default=2, metavar="N", help="compression threads (default 2)")
    p.set_defaults(func=cmd_pack)
    help_text = "unpack a packed trajectory into the very safetensors file that was packed (same sha256)"
    p = sub.add_parser("unpack", help=help_text, description=help_text)
    p.add_argument("file", help="packed trajectory (.flpack)")
    p.add_argument("out", nargs="?", help="safetensors file (default: FILE with the suffix .safetensors)")
    p.set_defaults(func=cmd_unpack)


def _audit_parsers(sub: argparse._SubParsersAction) -> None:
    help_text = ("rerun the reference's training and check it bit for bit (exit 0 identical, 1 diverged or reference "
                 "corrupt, 2 bad input)")
    p = sub.add_parser("verify", help=help_text, description=help_text)
    p.add_argument("reference", nargs="?", help="reference trajectory file (default: paths.trajectory of params.yaml)")
    p.add_argument("--run-id", help="audit this MLflow run: its logged digests are the reference, or with a file "
                   "the file is (and must match them); the verdict is logged beside the run")
    p.add_argument("--params", default="params.yaml",
                   help="params file marking the project root (default: params.yaml)")
    p.add_argument("--full", action="store_true", help="continue past the first divergent step and report them all")
    p.add_argument("--strict", action="store_true", help="refuse to run (exit 2) if the device or inputs differ")
    p.add_argument("--repeat", type=_count, default=1, metavar="N", help="rerun N times, each checked (default 1)")
    p.add_argument("--threads", type=_threads, metavar="N", help="rerun with N threads instead of the reference's")
    p.add_argument("--json", action="store_true",
                   help="print the verdict as JSON on stdout (the report goes to stderr)")
    p.add_argument("--report", metavar="PATH", help="also write the JSON verdict to PATH (e.g. reports/verify.json)")
    p.add_argument("--metrics", metavar="PATH", help="also write the verdict in a few values, for DVC's tables, to "
                   "PATH (e.g. metrics/audit.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_verify)
    help_text = ("check a trajectory's integrity without a rerun: every slice against its digest, the header "
                 "against the data, the scalars against the params (exit 0 intact, 1 corrupt, 2 unreadable)")
    p = sub.add_parser("check", help=help_text, description=help_text)
    p.add_argument("file", nargs="?", help="trajectory file (default: paths.trajectory of params.yaml)")
    p.add_argument("--params", default="params.yaml", help="params file naming the default file (default: params.yaml)")
    p.add_argument("--threads", type=_threads, default=2, metavar="N", help="hashing threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.add_argument("--report", metavar="PATH", help="also write the JSON verdict to PATH")
    p.add_argument("--expect", metavar="DIGEST", help="the content digest the file must have (exit 1 if intact but "
                   "another); by default the project's trajectory is compared with its metrics/train.json")
    p.set_defaults(func=cmd_check, overrides=[])
    help_text = "compare two trajectories step by step (exit 0 identical, 1 different, 2 bad input)"
    p = sub.add_parser("diff", help=help_text, description=help_text)
    p.add_argument("a", help="trajectory file A (its params name the masks file for the live/dead split)")
    p.add_argument("b", help="trajectory file B, same shape and params except seeds, threads and device")
    p.add_argument("--params", default="params.yaml",
                   help="params file marking the project root (default: params.yaml)")
    p.add_argument("--csv", default="reports/diff.csv", help="per-step curve (default: reports/diff.csv)")
    p.add_argument("--plot", default="reports/diff.png", help="PNG plot of the curve (default: reports/diff.png)")
    p.set_defaults(func=cmd_diff)
    help_text = ("write a trajectory the Flannel 7 notebook wrote as a flannel-repro trajectory (its numbers byte for "
                 "byte, with inferred params, checked inputs, digests and a content record); exit 1 if it "
                 "contradicts itself, 2 bad input")
    p = sub.add_parser("adopt", help=help_text, description=help_text)
    p.add_argument("file", help="the notebook's safetensors file (e.g. 1.20h_flannel_7.safetensors)")
    p.add_argument("out", nargs="?", help="output trajectory (default: FILE's name with .adopted.safetensors)")
    p.add_argument("--params", default="params.yaml",
                   help="params file naming the data paths the notebook ran on (default: params.yaml)")
    p.set_defaults(func=cmd_adopt)


def build_parser() -> argparse.ArgumentParser:
    from flannel_repro import __version__

    parser = argparse.ArgumentParser(
        prog="flannel-repro",
        description="Reproduce the Flannel 7 training trajectory bit for bit, and audit it.",
    )
    parser.add_argument("--version", action="version", version=f"flannel-repro {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "corpus": (cmd_corpus, "write the model corpus (generated, or the user's own text file)"),
        "tokenizer-corpus": (cmd_tokenizer_corpus, "write the text the tokenizer is trained on (generated, or the "
                             "user's own text file)"),
        "tokenizer": (cmd_tokenizer, "train the byte-level BPE tokenizer on the tokenizer corpus, or check the "
                      "user's tokenizer file"),
        "masks": (cmd_masks, "write the live/dead token masks"),
        "train": (cmd_train, "train and record the trajectory (W, grad_W, losses) to safetensors"),
        "exposure": (cmd_exposure, "count the labels each recorded step's loss saw, per token, from the trajectory's "
                     "batches and the corpus"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        if name == "train":
            p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
            p.add_argument(
                "--resume", action="store_true",
                help="continue the interrupted run of this output from its last checkpoint (train.checkpoint_every)",
            )
        p.set_defaults(func=func)
    help_text = "send to the tracking store what train runs kept while it did not answer (exit 2 if it still does not)"
    p = sub.add_parser("sync", help=help_text, description=help_text)
    p.add_argument("--params", default="params.yaml",
                   help="params file marking the project root (default: params.yaml)")
    p.set_defaults(func=cmd_sync)
    _audit_parsers(sub)
    _trace_parsers(sub)
    _sweep_parser(sub)
    _pack_parsers(sub)
    return parser


def _stop_on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signum)  # "stopped by SIGTERM"; train says more (stopping.py)


@contextlib.contextmanager
def _starting(name: list[str]) -> Iterator[None]:
    """Start-up: until the command's modules are imported nothing is written, so Ctrl-C (or SIGTERM, SIGHUP) ends
    the process at once, in one line. (Raised as KeyboardInterrupt inside torch's import, it can abort the process
    from C++.) A signal the caller ignores, or handles itself, is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        os.write(2, f"{' '.join(name)}: interrupted; no output was written\n".encode())
        os._exit(128 + signum)

    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                signal.SIGHUP: signal.SIG_DFL}
    ours = [s for s, default in defaults.items() if signal.getsignal(s) is default]
    for s in ours:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s in ours:
            signal.signal(s, defaults[s])


def _say(line: str) -> None:
    """One line on stderr, if there is a stderr to write to."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # closed (`2>&-`: None) or full
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _flush_stdout() -> None:
    """What a command printed reaches stdout before its status is returned: a full stdout is exit 4, not a 0."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError as e:
        raise OutputFailed(f"the output could not be written to stdout ({e.strerror or e})") from None


def _hold_standard_fds() -> None:
    """A closed fd 0, 1 or 2 (`>&-`) gets /dev/null: else the next file opened takes its number, and whatever C code
    writes to stdout (MKL_VERBOSE, say) would land in that file. sys.stdout stays None, so a result is refused."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def main(argv: list[str] | None = None) -> int:
    _hold_standard_fds()
    runtime = configure()  # before any step allocates: large freed blocks are kept for the next step
    name = ["flannel-repro"]
    argv = sys.argv[1:] if argv is None else argv
    with _starting(name):
        args = build_parser().parse_args(argv)
        name.append(args.command)
        for module in (*COMMAND_MODULES[args.command], "flannel_repro.core.config", "flannel_repro.core.paths_guard"):
            importlib.import_module(module)
    if runtime.note and args.command in ("train", "verify"):
        _say(f"flannel-repro {args.command}: note: {runtime.note}")
    for s in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: every output is atomic, so nothing half-written stays
        if signal.getsignal(s) is signal.SIG_DFL:  # one the caller ignores (`nohup`: SIGHUP) stays ignored
            signal.signal(s, _stop_on_signal)
    try:
        code = args.func(args)
        _flush_stdout()
        return code
    except TrackingIncomplete as e:
        _say(f"flannel-repro {args.command}: {e}")
        return e.exit_code
    except FlannelError as e:
        _say(f"flannel-repro {args.command}: error: {e}")
        return e.exit_code
    except KeyboardInterrupt as e:
        text = str(e) or "interrupted; no output was written"
        # The resume command as this one was typed (same --params and -S options).
        resume = shlex.join(["flannel-repro", *[a for a in argv if a != "--resume"], "--resume"])
        _say(f"flannel-repro {args.command}: {text.replace('`flannel-repro train --resume`', f'`{resume}`')}")
        return getattr(e, "exit_code", 128 + signal.SIGINT)


def entry() -> None:
    """The `flannel-repro` program: main(), the exit handlers registered on the way, and the end of the process.

    Every output is complete and closed when main() returns, so the interpreter's own teardown (about a second of
    freeing torch and the rest, after Python has put the signals back to their defaults) is skipped: a stop signal
    in it would kill the process with no word and a signal's status. A stop signal during the exit handlers ends
    the process at once with main()'s status, in one line."""
    code = main()

    def finished(signum: int, frame: object) -> None:
        os.write(2, f"flannel-repro: {signal_name(signum)} while exiting; the command had finished "
                    f"(exit {code})\n".encode())
        os._exit(code)

    def flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):  # a closed pipe (`| head`) or stream
                stream.flush()
        with contextlib.suppress(OSError, AttributeError):  # what C code wrote through stdio (MKL_VERBOSE, say)
            ctypes.CDLL(None).fflush(None)

    # stopping.STOP_SIGNALS, not imported: the data stages do not load stopping.py (dvc.yaml lists what they load)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, finished)
    flush()
    atexit._run_exitfuncs()
    flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
