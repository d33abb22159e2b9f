"""Tiny, purpose-built fixtures: a project folder with a few thousand words of corpus and of the tokenizer's own text,
a 300-token tokenizer and a 2-layer, 16-wide GPT-2, so a full train takes about a second. Everything is made by the
project's own stages."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flannel_repro.core.config import load_params
from flannel_repro.data.corpus import corpus
from flannel_repro.data.masks import masks
from flannel_repro.data.tokenizer import tokenizer
from flannel_repro.data.tokenizer_corpus import tokenizer_corpus

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "corpus": {"n_words": 3000, "lexicon_size": 500},
    "tokenizer_corpus": {"n_words": 3000, "lexicon_size": 300},
    "model": {"vocab_size": 300, "hidden_dim": 16, "n_layer": 2, "n_head": 2, "max_seq_len": 16},
    "train": {"steps": 6, "batch_size": 4, "num_threads": 1, "log_every": 2},
    "tracking": {"enabled": False},
}


def write_params(folder: Path, overrides: dict | None = None) -> Path:
    """params.yaml = the repository's defaults with the tiny sections (and `overrides`) merged in."""
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    for source in (TINY, overrides or {}):
        for section, values in source.items():
            doc.setdefault(section, {}).update(values)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Corpus, tokenizer corpus, tokenizer and masks for the tiny config, made once per session."""
    root = tmp_path_factory.mktemp("tiny_data")
    params = load_params(write_params(root))
    corpus(params, root)
    tokenizer_corpus(params, root)
    tokenizer(params, root)
    masks(params, root)
    return root


def copy_tiny_data(tiny_data: Path, root: Path) -> Path:
    """`root` with a copy of the tiny data (data/ and tensors/: corpus, tokenizer and masks)."""
    for sub in ("data", "tensors"):
        shutil.copytree(tiny_data / sub, root / sub)
    return root


@pytest.fixture
def tiny_project(tmp_path, tiny_data) -> Path:
    """A fresh folder with the tiny params.yaml and a copy of the tiny data."""
    copy_tiny_data(tiny_data, tmp_path)
    write_params(tmp_path)
    return tmp_path


def thread_pair(root: Path, tiny_data: Path, stem: str) -> Path:
    """`root` with the tiny data and the tiny run recorded twice: `<stem>1.safetensors` with 1 thread and
    `<stem>2.safetensors` with 2 (they differ within a few steps); params.yaml is left at the tiny defaults."""
    from flannel_repro.training.loop import train

    copy_tiny_data(tiny_data, root)
    for threads in (1, 2):
        write_params(root, {"train": {"num_threads": threads}, "paths": {"trajectory": f"{stem}{threads}.safetensors"}})
        train(load_params(root / "params.yaml"), root, progress=False)
    write_params(root)
    return root


def run_cli(*args: str, cwd: Path, env: dict | None = None, check: bool = False, timeout: float = 600):
    """Run `python -m flannel_repro ARGS` as a user would, in `cwd`."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "flannel_repro", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"flannel-repro {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path, backend: str | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 over `backend` (default: a new SQLite file in `folder`), killed on exit;
    yields its URL. MLflow's own usage telemetry is off, so nothing leaves the machine."""
    uri = f"http://127.0.0.1:{free_port()}"
    backend = backend or f"sqlite:///{folder / 'server.db'}"
    log_path = folder / "server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1],
             "--workers", "1", "--backend-store-uri", backend, "--artifacts-destination", str(folder / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text()[-2000:]
                    raise AssertionError(f"mlflow server exited with {proc.returncode}:\n{tail}")
                try:
                    with urllib.request.urlopen(uri + "/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"mlflow server did not answer /health within 120 s:\n"
                                             f"{log_path.read_text()[-2000:]}") from None
                    time.sleep(0.25)
            yield uri
        finally:
            # The server and its uvicorn worker share the new session; its store is thrown away: no graceful stop.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
