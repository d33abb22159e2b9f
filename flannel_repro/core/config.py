"""Typed, frozen configuration mapped one-to-one from params.yaml.

Each top-level section of params.yaml is one frozen dataclass below; `load_params` builds them with `Cls(**section)`
so an unknown key fails, and each `__post_init__` rejects wrong types and impossible values before any work starts,
naming the key. Stage functions take these objects; nothing else reads params.yaml.

    params = load_params("params.yaml", overrides=["train.steps=10"])
    params.train.learning_rate  # 0.001
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flannel_repro.core.credentials import has_password, redacted, uri_problem
from flannel_repro.core.errors import ConfigError
from flannel_repro.core.fsutil import file_kind

LABEL_MODES = ("notebook", "next_token")
DEVICES = ("auto", "cpu", "cuda", "mps")
RECORD_FORMATS = ("safetensors", "packed")
PACKED_SUFFIX = ".flpack"  # the packed form's file name ending (trajectory/packed.py)
MAX_THREADS = 4096  # torch takes a thread count as a C int; no machine this runs on has more cores


_MAX_DIGITS = 40  # an integer of more digits than this is no count or seed (and past 4,300 Python cannot print it)
_INT64 = 2**63  # every integer in params.yaml is passed on as a 64-bit integer (torch, safetensors, MLflow)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads `1e-3` as a string (YAML 1.1); DVC's `-S key=1e-3` writes exactly that. Read it as a float.

    Bounded as a file of settings should be: an alias (`*name`) is refused, since a few of them nested expand a
    kilobyte into gigabytes (a "billion laughs"); a key given twice is refused, as `dvc repro` refuses it; an
    integer is refused before conversion when it has more digits than any setting needs."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _Refused(f"line {mark.line + 1}: a YAML alias (*{self.peek_event().anchor}); write the value out "
                           "in full (params.yaml takes no anchors or aliases)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise _Refused(f"line {key_node.start_mark.line + 1}: key {_show(key)} is given twice (also at line "
                               f"{seen[key]}); keep one")
            if key is not None:
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> Any:
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > _MAX_DIGITS:
            raise _Refused(f"line {node.start_mark.line + 1}: an integer of {digits:,} digits; no setting takes "
                           f"more than {_MAX_DIGITS}")
        return super().construct_yaml_int(node)


class _Refused(Exception):
    """What the loader refuses, with the line; parse_yaml names the file."""


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _Yaml12Loader.construct_yaml_int)


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except _Refused as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a params file; fix the syntax") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        why = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}; fix the syntax ({why})") from None


class _Section:
    """Shared checks: every field has the declared type; subclasses add range checks in `_check`."""

    _section: typing.ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = hints[f.name]
            ok, coerced = _check_type(value, expected)
            if not ok:
                problem = (f"{self._section}.{f.name} must be {_type_name(expected)}, got {_show(value)} "
                           f"({type(value).__name__})")
                raise InvalidValue(f"params: {problem}; fix it in params.yaml", problem)
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
            for item in coerced if isinstance(coerced, tuple) else (coerced,):
                why = _unusable(item)
                if why is not None:
                    problem = f"{self._section}.{f.name} {why}"
                    raise InvalidValue(f"params: {problem}; fix it in params.yaml", problem)
        self._check()

    def _check(self) -> None:
        pass

    def _fail(self, key: str, why: str) -> None:
        problem = f"{self._section}.{key} = {_show(getattr(self, key))} {why}"
        raise InvalidValue(f"params: {problem} (in params.yaml)", problem)


class InvalidValue(ConfigError):
    """A section refused a value. `problem` names the key and value without saying where they came from, so that a
    value recorded in a trajectory or a tracking run is not blamed on params.yaml."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


def _show(value: Any) -> str:
    """A value for a message, bounded: a long list or string is cut, an integer too long to print is counted."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {value.bit_length() * 0.30103:,.0f} digits"
    text = _SHORT.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def short_repr(items: int, chars: int) -> reprlib.Repr:
    """A repr() whose work is bounded: `items` entries per list or mapping, two levels deep, `chars` per string."""
    r = reprlib.Repr()  # Python 3.11's takes no arguments
    r.maxlevel, r.maxstring, r.maxother = 2, chars, chars
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = items
    return r


_SHORT = short_repr(4, 60)
_SHORT.repr_int = lambda x, level: repr(x) if x.bit_length() <= 128 else _show(x)  # reprlib prints it whole first


def _unusable(value: Any) -> str | None:
    """Why a well-typed value still cannot be passed on: an integer past 64 bits, a string with a NUL byte (no file
    name or URI holds one) or with bytes that are not UTF-8 (a file name the trajectory header could not record)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        return f"= {_show(value)} is out of range (at most 2**63 - 1)"
    if isinstance(value, str):
        if "\0" in value:
            return f"= {_show(value)} holds a NUL byte; remove it"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"= {_show(value)} holds bytes that are not UTF-8; name the file in UTF-8"
    return None


def _check_type(value: Any, expected: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(expected):
            ok, coerced = _check_type(value, arg)
            if ok:
                return True, coerced
        return False, value
    if expected is type(None):
        return value is None, value
    if expected is bool:
        return isinstance(value, bool), value
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if expected is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, float(value)
        return isinstance(value, float), value
    if expected is str:
        return isinstance(value, str), value
    if typing.get_origin(expected) is tuple:  # tuple[X, ...]: a YAML list of X, kept as a tuple (frozen)
        if not isinstance(value, (list, tuple)):
            return False, value
        checked = [_check_type(v, typing.get_args(expected)[0]) for v in value]
        return all(ok for ok, _ in checked), tuple(c for _, c in checked)
    raise TypeError(f"unsupported config type {expected!r}")


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(expected))
    if typing.get_origin(expected) is tuple:
        return f"a list of {_type_name(typing.get_args(expected)[0])}"
    return "null" if expected is type(None) else expected.__name__


@dataclass(frozen=True)
class CorpusConfig(_Section):
    _section = "corpus"
    _path_key = "paths.corpus"
    source: str = "generated"  # "generated" (built-in English-like text) or a path to the user's UTF-8 text file
    seed: int = 42  # seed of the generator's own PRNG
    n_words: int = 764_000  # words to generate; the default yields about 1.37 M tokens with the default tokenizer
    lexicon_size: int = 30_000  # distinct word forms, drawn with Zipf (rank ** -1) frequencies
    # dvc.yaml runs the corpus stage once per entry: [synthetic], or [] when paths.corpus is your own `dvc add`ed file
    build: tuple[str, ...] = ("synthetic",)

    def _check(self) -> None:
        if not self.source:
            self._fail("source", "is empty: use 'generated' or the path of a UTF-8 text file")
        if self.build not in ((), ("synthetic",)):
            self._fail("build", f"must be [synthetic] (dvc repro makes the text) or [] ({self._path_key} is your "
                       "own file)")
        if self.n_words < 1:
            self._fail("n_words", "must be at least 1")
        if self.lexicon_size < 1:
            self._fail("lexicon_size", "must be at least 1")
        if self.seed < 0:
            self._fail("seed", "must be a non-negative integer")


@dataclass(frozen=True)
class TokenizerCorpusConfig(CorpusConfig):
    """The text the tokenizer is trained on: the same generator as the model corpus with its own seed (other word
    forms) and a smaller lexicon, so that most of the vocabulary is whole words the model corpus never uses."""

    _section = "tokenizer_corpus"
    _path_key = "paths.tokenizer_corpus"
    source: str = "generated"  # "generated" (built-in English-like text) or a path to a UTF-8 text file
    seed: int = 7  # seed of the generator's own PRNG; not the model corpus's, so the word forms differ
    n_words: int = 1_000_000  # words to generate
    lexicon_size: int = 9_700  # distinct word forms (Zipf); the default makes about 37% of the vocabulary dead
    # dvc.yaml runs this stage once per entry: [synthetic], or [] when paths.tokenizer_corpus is your own file
    build: tuple[str, ...] = ("synthetic",)


@dataclass(frozen=True)
class TokenizerConfig(_Section):
    _section = "tokenizer"
    source: str = "train"  # "train" (byte-level BPE trained on the tokenizer corpus) or a path to a tokenizer.json
    min_frequency: int = 2  # BPE merges need a pair seen at least this often
    # dvc.yaml runs the tokenizer stage once per entry: [bpe], or [] when paths.tokenizer is your own `dvc add`ed file
    build: tuple[str, ...] = ("bpe",)

    def _check(self) -> None:
        if not self.source:
            self._fail("source", "is empty: use 'train' or the path of a tokenizer JSON file")
        if self.build not in ((), ("bpe",)):
            self._fail("build", "must be [bpe] (dvc repro trains the tokenizer) or [] (paths.tokenizer is your "
                       "own file)")
        if self.min_frequency < 1:
            self._fail("min_frequency", "must be at least 1")


@dataclass(frozen=True)
class ModelConfig(_Section):
    _section = "model"
    vocab_size: int = 10_000  # V: rows of the embedding matrix W and size of the tokenizer
    hidden_dim: int = 64  # H: columns of W (GPT-2 n_embd)
    n_layer: int = 2  # transformer blocks
    n_head: int = 2  # attention heads; must divide hidden_dim
    max_seq_len: int = 128  # tokens per training window (GPT-2 n_positions)

    def _check(self) -> None:
        for key in ("vocab_size", "hidden_dim", "n_layer", "n_head", "max_seq_len"):
            if getattr(self, key) < 1:
                self._fail(key, "must be at least 1")
        if self.hidden_dim % self.n_head:
            problem = f"model.n_head = {self.n_head} does not divide model.hidden_dim = {self.hidden_dim}"
            raise InvalidValue(f"params: {problem}; choose an n_head that divides hidden_dim in params.yaml", problem)


@dataclass(frozen=True)
class TrainConfig(_Section):
    _section = "train"
    num_runs: int = 1  # runs recorded into one file; run r trains with train_seed + r from the same W_initial
    init_seed: int = 42  # seed of W_initial ~ N(0, init_scale) drawn in float32, then cast to bfloat16
    train_seed: int = 42  # torch/numpy seed and Trainer seed (model init of the other weights, data order)
    steps: int = 500  # optimizer steps (Trainer max_steps)
    batch_size: int = 32  # windows per step (per_device_train_batch_size)
    learning_rate: float = 1.0e-3  # AdamW peak learning rate, decayed linearly to 0
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    max_grad_norm: float = 1.0  # Trainer's default gradient clipping (grad_W is recorded before clipping)
    init_scale: float = 0.02  # standard deviation of W_initial
    label_mode: str = "notebook"  # "notebook": the notebook's double shift (predicts token i+2); "next_token"
    device: str = "auto"  # auto picks cuda > mps > cpu
    num_threads: int | None = None  # torch CPU threads; null keeps torch's default. Part of "the same device"
    log_every: int = 50  # progress line every N steps when stderr is not a terminal
    checkpoint_every: int = 100  # resumable checkpoint every N steps (`train --resume`); 0 = off

    def _check(self) -> None:
        for key in ("num_runs", "steps", "batch_size", "log_every"):
            if getattr(self, key) < 1:
                self._fail(key, "must be at least 1")
        for key in ("init_seed", "train_seed"):
            if not 0 <= getattr(self, key) < 2**32:
                self._fail(key, "must be in [0, 2**32)")
        for key in ("learning_rate", "adam_epsilon", "init_scale"):
            if not 0 < getattr(self, key) < math.inf:
                self._fail(key, "must be positive and finite")
        for key in ("weight_decay", "max_grad_norm"):
            if not 0 <= getattr(self, key) < math.inf:
                self._fail(key, "must be zero or positive, and finite")
        if self.train_seed + self.num_runs - 1 >= 2**32:
            self._fail("train_seed", "+ num_runs - 1 must stay below 2**32 (run r trains with train_seed + r)")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                self._fail(key, "must be in [0, 1)")
        if self.label_mode not in LABEL_MODES:
            self._fail("label_mode", f"is not one of {', '.join(LABEL_MODES)}")
        if self.device not in DEVICES:
            self._fail("device", f"is not one of {', '.join(DEVICES)}")
        if self.checkpoint_every < 0:
            self._fail("checkpoint_every", "must be zero (off) or positive")
        if self.num_threads is not None and not 1 <= self.num_threads <= MAX_THREADS:
            self._fail("num_threads", f"must be in [1, {MAX_THREADS}], or null for torch's default")


@dataclass(frozen=True)
class RecordConfig(_Section):
    _section = "record"
    W: bool = True  # embedding matrix after every optimizer step, (runs, steps+1, V, H) bf16
    grads: bool = True  # grad_W after backward, before clipping, (runs, steps+1, V, H) bf16, zero at t=0
    # grad_W's two halves as autograd makes them, grad_W_input (the lookup) and grad_W_output (the output
    # projection), (runs, steps+1, V, H) bf16 each, zero at t=0
    grad_parts: bool = False
    momentum: bool = False  # Adam exp_avg of W, (runs, steps+1, V, H) bf16, zero at t=0
    variance: bool = False  # Adam exp_avg_sq of W, (runs, steps+1, V, H) bf16, zero at t=0
    logits: bool = False  # not supported: logits are (batch, seq, V) per step, far too large to record
    losses: bool = True  # training loss per step, (runs, steps+1), NaN at t=0
    trace_steps: tuple[int, ...] = (1,)  # steps traced op by op into paths.trace (tracing/); [] traces none
    # Which steps' (V, H) tensors are recorded (docs/analysis.md, "Step schedules"): "every", K (every K-th step),
    # "log" (Pythia's: 0, 1, 2, 4, ..., 512, then every 1,000) or a list from 0; the last step is always recorded by
    # the first two. Training runs every step, and the loss, gradient norm, rate and batch are kept for every step.
    steps: str | int | tuple[int, ...] = "every"
    # The trajectory file's form: "safetensors" (the notebook's own, `load_file` reads it) or "packed" (the same
    # numbers in about a third of the bytes, written while training; paths.trajectory then ends in .flpack)
    format: str = "safetensors"

    def schedule(self, n_steps: int) -> tuple[int, ...]:
        """The recorded steps of a run of `n_steps` optimizer steps, increasing, from 0."""
        if self.steps == "every":
            return tuple(range(n_steps + 1))
        if isinstance(self.steps, tuple):
            return self.steps
        if self.steps == "log":
            early = [0, *(2**i for i in range(10))]  # 0, 1, 2, ..., 512
            chosen = [t for t in early if t <= n_steps] + list(range(1000, n_steps + 1, 1000))
        else:
            chosen = list(range(0, n_steps + 1, self.steps))
        return tuple(chosen if chosen[-1] == n_steps else [*chosen, n_steps])

    def n_recorded(self, n_steps: int) -> int:
        """len(schedule(n_steps)), without listing a long run's steps (preflight sizes a run before refusing it)."""
        if self.steps == "every":
            return n_steps + 1
        if isinstance(self.steps, int):  # 0, K, 2K, ..., and the last step when K does not divide it
            return n_steps // self.steps + 1 + (n_steps % self.steps != 0)
        if self.steps == "log":  # 0, the powers of 2 up to 512, the thousands, and the last step if none of those
            early = [0, *(2**i for i in range(10))]
            last_listed = n_steps in early or (n_steps >= 1000 and n_steps % 1000 == 0)
            return sum(t <= n_steps for t in early) + n_steps // 1000 + (not last_listed)
        return len(self.steps)

    def _check(self) -> None:
        self._check_steps()
        if self.format not in RECORD_FORMATS:
            self._fail("format", f"is not one of {', '.join(RECORD_FORMATS)}")
        if self.format == "packed" and self.steps != "every":
            self._fail("format", "needs record.steps: every (the packed form records every step); set it, or keep "
                       "record.format: safetensors (a schedule already keeps the file small: docs/analysis.md)")
        if any(t < 1 for t in self.trace_steps):
            self._fail("trace_steps", "must list optimizer steps from 1 (step 0 is W_initial, no op runs)")
        if self.logits:
            self._fail("logits", "is not supported (logits are batch x seq x vocab per step, far too large to "
                       "record); set it to false")

    def _check_steps(self) -> None:
        how = "give every, K (every K-th step), log (Pythia's) or an increasing list of steps from 0, e.g. [0, 10, 100]"
        s = self.steps
        if isinstance(s, str) and s not in ("every", "log"):
            self._fail("steps", f"is not a schedule; {how}")
        if isinstance(s, int) and s < 1:
            self._fail("steps", f"must be at least 1 (every K-th step); {how}")
        if isinstance(s, tuple) and (not s or s[0] != 0 or any(b <= a for a, b in zip(s, s[1:], strict=False))):
            self._fail("steps", f"must be an increasing list that starts at 0 (step 0 is W_initial); {how}")


@dataclass(frozen=True)
class PathsConfig(_Section):
    _section = "paths"
    corpus: str = "data/flannel_model_corpus.txt"
    tokenizer_corpus: str = "data/flannel_tokenizer_corpus.txt"  # the text the tokenizer is trained on
    tokenizer: str = "data/flannel_tokenizer_chars.json"
    masks: str = "tensors/Flannel/live_dead_tokens.safetensors"
    trajectory: str = "tensors/Flannel/1.20h_flannel_7.safetensors"
    metrics: str = "metrics/train.json"  # final loss, run time, steps/s, trajectory sha256, dead tokens, device
    loss_curve: str = "metrics/train_loss.csv"  # step, loss, grad_norm, learning_rate
    exposure: str = "tensors/Flannel/exposure.safetensors"  # per-step label counts of each token (exposure stage)
    trace: str = "traces/flannel_7_trace.jsonl"  # op traces of record.trace_steps (docs/traces.md)

    def _check(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name):
                self._fail(f.name, "is empty: give a file path relative to the project root")

    def under(self, root: Path) -> ResolvedPaths:
        """Every path joined to the project root `root`, once, for the stages to use."""
        return ResolvedPaths(**{f.name: Path(root) / getattr(self, f.name) for f in dataclasses.fields(self)})


# The files training reads, in pipeline order: paths.<name> each, recorded as `<name>_sha256` in a trajectory.
INPUTS = ("corpus", "tokenizer", "masks")


@dataclass(frozen=True)
class ResolvedPaths:
    """`paths` under the project root (`PathsConfig.under(root)`); the fields and their meaning are the same."""

    corpus: Path
    tokenizer_corpus: Path
    tokenizer: Path
    masks: Path
    trajectory: Path
    metrics: Path
    loss_curve: Path
    exposure: Path
    trace: Path

    def inputs(self) -> dict[str, Path]:
        """{"corpus": path, "tokenizer": path, "masks": path}"""
        return {name: getattr(self, name) for name in INPUTS}


@dataclass(frozen=True)
class TrackingConfig(_Section):
    _section = "tracking"
    enabled: bool = True  # log every train run to MLflow
    uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db
    experiment: str = "flannel"  # MLflow experiment name
    upload_trajectory: bool = False  # also upload the trajectory file as an artifact (DVC versions it already)
    system_metrics: bool = True  # MLflow's system metrics (CPU, memory, disk, network; psutil) every 10 s

    def _check(self) -> None:
        if not self.experiment:
            self._fail("experiment", "is empty: give an MLflow experiment name")
        if self.uri is not None:
            if has_password(self.uri):  # params are recorded in every trajectory header and tracking run
                problem = (f"tracking.uri = {redacted(self.uri)!r} holds a password, which would be recorded in every "
                           "trajectory and tracking run")
                raise InvalidValue(f"params: {problem}; remove it and set MLFLOW_TRACKING_USERNAME and "
                                   "MLFLOW_TRACKING_PASSWORD instead (docs/security.md)", problem)
            why = uri_problem(self.uri)
            if why is not None:
                self._fail("uri", f"{why}; give a tracking URI such as http://127.0.0.1:5000 or sqlite:///mlflow.db")


@dataclass(frozen=True)
class AuditConfig(_Section):
    _section = "audit"
    # dvc.yaml runs the verify stage once per entry: [rerun] reruns the training after `train` and checks it bit for
    # bit (one more training run); [] leaves the audit out of `dvc repro` (e.g. for a seed sweep)
    verify: tuple[str, ...] = ("rerun",)
    report: str = "reports/verify.json"  # the verify stage's full report
    metrics: str = "metrics/audit.json"  # the verdict in a few values, a DVC metric (`dvc metrics show`)

    def _check(self) -> None:
        if self.verify not in ((), ("rerun",)):
            self._fail("verify", "must be [rerun] (dvc repro audits the trajectory) or [] (it does not)")
        for key in ("report", "metrics"):
            if not getattr(self, key):
                self._fail(key, "is empty: give a file path relative to the project root")


@dataclass(frozen=True)
class Params:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer_corpus: TokenizerCorpusConfig = field(default_factory=TokenizerCorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        last, steps = self.record.steps, self.train.steps
        if isinstance(last, tuple) and last[-1] > steps:
            problem = (f"record.steps lists step {last[-1]}, past the last step train.steps = {steps}; drop it or "
                       "raise train.steps")
            raise InvalidValue(f"params: {problem} (in params.yaml)", problem)
        packed, named = self.record.format == "packed", self.paths.trajectory.endswith(PACKED_SUFFIX)
        if packed != named:
            fix = (f"name it with {PACKED_SUFFIX}, e.g. tensors/Flannel/1.20h_flannel_7{PACKED_SUFFIX}" if packed else
                   "set record.format: packed, or name it .safetensors")
            problem = (f"record.format is {self.record.format} but paths.trajectory is {self.paths.trajectory!r}; "
                       f"{fix}")
            raise InvalidValue(f"params: {problem} (in params.yaml)", problem)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def flat(self) -> dict[str, Any]:
        """`{"train.learning_rate": 0.001, ...}`: the form MLflow params and `dvc -S` use."""
        return {f"{s}.{k}": v for s, section in self.to_dict().items() for k, v in section.items()}


_SECTION_TYPES = typing.get_type_hints(Params)


def params_from_dict(doc: Any, source: str = "params.yaml", recorded: bool = False) -> Params:
    """Build `Params` from a parsed document; every problem is a ConfigError naming the key. `recorded`: the document
    is what a trajectory or tracking run recorded (`source`), so a bad value is reported as coming from there."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections ({', '.join(_SECTION_TYPES)})")
    unknown = [str(k) for k in doc if k not in _SECTION_TYPES]
    if unknown:
        raise ConfigError(
            f"{source}: unknown section {unknown[0]!r}; the sections are {', '.join(_SECTION_TYPES)}"
        )
    built = {}
    for name, cls in _SECTION_TYPES.items():
        section = doc.get(name)
        if section is None:  # absent, or a heading with nothing under it: the defaults
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping of keys, got {_show(section)} "
                              f"({type(section).__name__}); write its keys under it, or leave it out for the defaults")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in section:
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key '{name}.{key}'; the keys of {name} are {', '.join(sorted(known))}"
                )
        try:
            built[name] = cls(**{str(k): v for k, v in section.items()})
        except InvalidValue as e:
            if not recorded:
                raise
            raise ConfigError(f"{source}: {e.problem}; these recorded params are invalid (the record is corrupt or "
                              "was edited), params.yaml is not involved") from None
    return Params(**built)


def apply_overrides(doc: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML, like `dvc exp run -S`) to a parsed document."""
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in (doc or {}).items()}
    for item in overrides:
        why = _unusable(item)  # bytes that are not UTF-8 (an argument is decoded with surrogate escapes), a NUL
        if why is not None:
            raise ConfigError(f"override {_show(item)} {why.removeprefix(f'= {_show(item)} ')}")
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"override {_show(item)}: write it as section.key=value, e.g. train.steps=10")
        value = parse_yaml(raw, f"override {_show(item)}")
        if doc.get(section) is None:  # absent, or a heading with nothing under it
            doc[section] = {}
        current = doc[section]
        if not isinstance(current, dict):
            raise ConfigError(f"override {_show(item)}: section {section!r} is not a mapping in params.yaml")
        current[name] = value
    return doc


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    path = Path(path)
    with contextlib.suppress(OSError):  # a missing file is told below
        kind = file_kind(path.stat().st_mode)
        if kind is not None:  # a FIFO would block the read forever
            raise ConfigError(f"{path}: params file is {kind}, not a file; pass --params a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found; run from the project root or pass --params") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save params.yaml as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read params file ({e.strerror})") from None
    doc = parse_yaml(text, str(path))
    if overrides:
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        doc = apply_overrides(doc, overrides)
    try:
        return params_from_dict(doc, str(path))
    except InvalidValue as e:  # a value given with -S is fixed on the command line, not in params.yaml
        key = next((k for k in (o.partition("=")[0].strip() for o in reversed(overrides))
                    if e.problem.startswith(f"{k} ")), None)
        if key is None:
            raise
        # The value is not repeated: the problem shows it, bounded and with any password starred out.
        advice = str(e).partition(e.problem)[2]
        if advice in ("; fix it in params.yaml", " (in params.yaml)"):
            advice = "; fix the value given with -S"
        raise InvalidValue(f"-S {key}: {e.problem}{advice.replace(' in params.yaml', ' with -S')}", e.problem) from None


def params_from_json(text: str, source: str) -> Params:
    """Rebuild the `Params` a trajectory file recorded in its header."""
    try:
        doc = json.loads(text, parse_int=bounded_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise ConfigError(f"{source}: recorded params cannot be read as JSON ({why})") from None
    return params_from_dict(doc, source, recorded=True)


def bounded_int(text: str) -> int:
    """json's parse_int that refuses an integer longer than any value a trajectory records, before converting it."""
    if len(text) > _MAX_DIGITS + 1:
        raise ValueError(f"an integer of {len(text):,} digits")
    return int(text)
