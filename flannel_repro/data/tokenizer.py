"""Stage 2: the tokenizer.

Trains a byte-level BPE tokenizer with the `tokenizers` library to exactly `model.vocab_size` tokens (the embedding
matrix has one row per token), or checks an existing tokenizer file the user names. It trains on the tokenizer
corpus (`paths.tokenizer_corpus`), not on the model corpus: as with the notebook's own files, a tokenizer made from
other text leaves a large share of its vocabulary unused ("dead") in the model corpus. Training is byte-identical
across reruns (pinned in the tests).

    tokenizer(load_params("params.yaml"), root=Path("."))  # paths.tokenizer_corpus -> paths.tokenizer
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import atomic_output, sha256_file
from flannel_repro.data.corpus import read_corpus

BYTE_ALPHABET = 256


@dataclass(frozen=True)
class TokenizerResult:
    path: Path
    vocab_size: int
    sha256: str
    source: str


def load_tokenizer(path: Path, vocab_size: int, key: str = "paths.tokenizer") -> Tokenizer:
    """Load a tokenizer file and check it has exactly `vocab_size` tokens."""
    path = Path(path)
    if not path.is_file():
        raise FlannelError(f"{path}: tokenizer file not found; run `flannel-repro tokenizer` or fix {key}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any malformed file
        raise FlannelError(f"{path}: not a valid tokenizers JSON file ({str(e).splitlines()[0]}); fix {key}") from None
    actual = tok.get_vocab_size()
    if actual != vocab_size:
        raise FlannelError(
            f"{path}: tokenizer has {actual} tokens but model.vocab_size is {vocab_size}; set model.vocab_size "
            f"to {actual} in params.yaml or use a tokenizer with {vocab_size} tokens"
        )
    top = max(tok.get_vocab().values(), default=-1)
    if top >= vocab_size:  # W has one row per id: a token numbered past the end has none, even if the corpus lacks it
        raise FlannelError(f"{path}: tokenizer gives token id {top} but has {actual} tokens (ids from 0 to "
                           f"{actual - 1}); fix or replace the tokenizer file")
    return tok


def train_bpe(text: str, vocab_size: int, min_frequency: int) -> Tokenizer:
    if vocab_size <= BYTE_ALPHABET:
        raise FlannelError(
            f"params: model.vocab_size = {vocab_size} is too small to train a byte-level BPE tokenizer (it needs "
            f"more than the {BYTE_ALPHABET} byte tokens); raise it or name a tokenizer file in tokenizer.source"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def tokenizer(params: Params, root: Path = Path(".")) -> TokenizerResult:
    """Write the tokenizer trained on `paths.tokenizer_corpus` to `paths.tokenizer`, both under `root`, the folder
    of params.yaml, and return its size and sha256. A relative `tokenizer.source` path is relative to `root` too."""
    cfg, vocab_size = params.tokenizer, params.model.vocab_size
    paths = params.paths.under(root)
    corpus_path, out_path = paths.tokenizer_corpus, paths.tokenizer
    if cfg.source == "train":
        text = read_corpus(Path(corpus_path), "paths.tokenizer_corpus")
        tok = train_bpe(text, vocab_size, cfg.min_frequency)
        if tok.get_vocab_size() != vocab_size:
            raise FlannelError(
                f"{corpus_path}: the tokenizer corpus only supports {tok.get_vocab_size()} BPE tokens with "
                f"tokenizer.min_frequency = {cfg.min_frequency}, not model.vocab_size = {vocab_size}; use a larger "
                "tokenizer corpus (tokenizer_corpus.n_words), a lower min_frequency or a smaller vocab_size"
            )
        data = tok.to_str(pretty=True).encode("utf-8")
        with atomic_output(out_path) as tmp:
            tmp.write_bytes(data)
        return TokenizerResult(Path(out_path), vocab_size, hashlib.sha256(data).hexdigest(), "train")
    src = Path(root) / cfg.source
    load_tokenizer(src, vocab_size, key="tokenizer.source")
    if src.resolve() != Path(out_path).resolve():
        with atomic_output(out_path) as tmp:
            shutil.copyfile(src, tmp)
    return TokenizerResult(Path(out_path), vocab_size, sha256_file(src), str(src))
