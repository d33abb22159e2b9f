"""flannel-repro: the Flannel 7 training-dynamics run as reproducible software.

    from flannel_repro import load_trajectory
    traj = load_trajectory("tensors/Flannel/1.20h_flannel_7.safetensors")
    w_250 = traj.step("W", 250)  # (vocab, hidden) bf16, read lazily from the mapped file

Module map. Each `flannel-repro X` command (and dvc.yaml stage X) is `X(params, root)` in `X.py`:
- stages: corpus.py, tokenizer_corpus.py (`flannel-repro tokenizer-corpus`), tokenizer.py, masks.py, train.py
  (`run_train_stage`: tracking, training, reports; `train`: the training itself); model.py is the notebook's
  model, data windows and device.
- recording: output.py (the output's lock, resume point, temporary file, stop at a step boundary, commit or
  abort), stopping.py (SIGINT, SIGTERM and SIGHUP during a train run), recorder.py (the Trainer callback that
  captures each step), ring.py (the writer thread that digests, writes and observes each step off the training
  thread), trajectory.py (the file format, written and read), layout.py (the file's keys, shapes and
  scalars from the params, without torch), content.py (the content record and digest), checkpoint.py (resumable
  checkpoints, their marker and their checks), progress.py.
- tracking: tracking.py (the interfaces), train_log.py (what a train run logs), mlflow_tracker.py (MLflow) and
  mlflow_spool.py (what a store outage kept, `flannel-repro sync`), the only modules that import mlflow;
  provenance.py (versions, device fingerprint, git and DVC tags).
- audit: verify.py (`flannel-repro verify`), stepcheck.py (its per-step comparison), check.py (`flannel-repro
  check`, the integrity check without a rerun), diff.py (`flannel-repro diff`), bits.py (bit-level comparisons).
- infrastructure: cli.py, config.py (params.yaml as frozen dataclasses), errors.py, fsutil.py (atomic outputs,
  hashes), paths_guard.py (each command's files, checked before any work), safetensors_header.py, plots.py.
"""

__all__ = ["Trajectory", "load_trajectory"]
__version__ = "0.2.0"


def __getattr__(name: str):
    # Imported on first use, so a data stage does not load the trajectory code (nor depend on it in dvc.yaml).
    if name in __all__:
        from flannel_repro.trajectory import file as trajectory

        return getattr(trajectory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
