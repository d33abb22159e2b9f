"""Stage 3: live/dead token masks.

Encodes the corpus with the tokenizer, exactly as training does, and writes which tokens occur ("live") and
which never do ("dead") with the keys the notebook reads:

    live_mask, dead_mask   bool[V]
    live_indices, dead_indices   int64[n_live], int64[n_dead]
    counts   int64[V]   occurrences of each token in the encoded corpus

The header metadata records the vocabulary size and the sha256 of the corpus and tokenizer it was made from, so a
masks file made for another vocabulary or corpus is caught when it is read, and what the dead set is made of:
`n_live`, `n_dead`, and `n_dead_bytes` / `n_dead_merges`, the dead tokens that are single bytes (byte tokens the
text never uses) and those that are multi-byte merges (word pieces and words the text never forms). The file's
bytes depend on its content alone, so a rerun on the same inputs gives the same sha256.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.core.safetensors_header import read_header, save_tensors
from flannel_repro.data.corpus import read_corpus
from flannel_repro.data.tokenizer import load_tokenizer

MASK_KEYS = ("live_mask", "dead_mask", "live_indices", "dead_indices", "counts")


@dataclass(frozen=True)
class Masks:
    live_mask: torch.Tensor  # bool[V]
    dead_mask: torch.Tensor  # bool[V]
    counts: torch.Tensor  # int64[V]
    n_dead_bytes: int | None = None  # dead tokens that are single bytes (None: a masks file that does not say)

    @property
    def n_live(self) -> int:
        return int(self.live_mask.sum())

    @property
    def n_dead(self) -> int:
        return int(self.dead_mask.sum())

    @property
    def n_dead_merges(self) -> int | None:
        return None if self.n_dead_bytes is None else self.n_dead - self.n_dead_bytes


@dataclass(frozen=True)
class MasksResult:
    path: Path
    n_tokens: int
    n_live: int
    n_dead: int
    n_dead_bytes: int
    n_dead_merges: int


def encode_corpus(corpus_path: Path, tokenizer_path: Path, vocab_size: int) -> torch.Tensor:
    """The corpus as token ids, int64[n_tokens]: the ids of `tokenizer.encode(text)`, as the notebook computes them.

    Encoding 4.7 MB in one piece holds about 780 MB in the tokenizer; for tokenizers whose output provably does not
    depend on where the text is cut (byte-level BPE with no normalizer, post-processor or added tokens, like the
    ones this project trains) the text is encoded in pieces cut at pre-token boundaries, with identical ids.
    """
    tok = load_tokenizer(Path(tokenizer_path), vocab_size)
    text = read_corpus(Path(corpus_path))
    if not _cut_invariant(tok):
        tokens = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    else:
        ids = array("q")
        for piece in _pieces(text):
            ids.extend(tok.encode(piece).ids)
        tokens = torch.frombuffer(ids, dtype=torch.long).clone() if ids else torch.zeros(0, dtype=torch.long)
    if len(tokens) and int(tokens.max()) >= vocab_size:  # ids must index the vocabulary the file declares
        raise FlannelError(
            f"{tokenizer_path}: tokenizer gives token id {int(tokens.max())} but has {vocab_size} tokens (ids from 0 "
            f"to {vocab_size - 1}); fix or replace the tokenizer file"
        )
    return tokens


def _cut_invariant(tok: Tokenizer) -> bool:
    doc = json.loads(tok.to_str())
    pre = doc.get("pre_tokenizer") or {}
    return (
        doc.get("normalizer") is None
        and doc.get("post_processor") is None
        and not doc.get("added_tokens")
        and (doc.get("model") or {}).get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("add_prefix_space") is False
        and pre.get("use_regex", True) is True
    )


def _pieces(text: str, size: int = 1 << 18) -> Iterator[str]:
    """Cut before a newline that follows a printable ASCII character: the GPT-2 pre-tokenizer regex always ends a
    pre-token there (no pattern matches a non-space character followed by a newline), and nothing looks behind."""
    start = 0
    while start < len(text):
        cut = text.find("\n", start + size)
        while cut != -1 and not ("!" <= text[cut - 1] <= "~"):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            yield text[start:]
            return
        yield text[start:cut]
        start = cut


def single_byte_tokens(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """bool[V]: which tokens stand for a single byte. In a byte-level tokenizer (like the ones this project trains)
    every byte is one character of its alphabet, so these are the tokens of one character, the 256 byte tokens;
    in any other tokenizer, the tokens whose text is one byte of UTF-8."""
    doc = json.loads(tok.to_str())
    byte_level = "ByteLevel" in ((doc.get("pre_tokenizer") or {}).get("type"), (doc.get("decoder") or {}).get("type"))
    single = torch.zeros(vocab_size, dtype=torch.bool)
    for token, i in tok.get_vocab().items():
        if i < vocab_size:
            single[i] = len(token) == 1 if byte_level else len(token.encode("utf-8")) == 1
    return single


def masks_from_tokens(tokens: torch.Tensor, vocab_size: int, single_bytes: torch.Tensor | None = None) -> Masks:
    counts = torch.bincount(tokens, minlength=vocab_size)
    live = counts > 0
    n_dead_bytes = None if single_bytes is None else int((single_bytes & ~live).sum())
    return Masks(live_mask=live, dead_mask=~live, counts=counts, n_dead_bytes=n_dead_bytes)


def masks(params: Params, root: Path = Path(".")) -> MasksResult:
    """Write the masks of `paths.corpus` encoded with `paths.tokenizer` to `paths.masks`, all under `root`, and
    return the counts (the dead tokens split into single bytes and merges)."""
    paths, vocab_size = params.paths.under(root), params.model.vocab_size
    corpus_path, tokenizer_path, out_path = paths.corpus, paths.tokenizer, paths.masks
    tokens = encode_corpus(corpus_path, tokenizer_path, vocab_size)  # every id checked to index the vocabulary
    single = single_byte_tokens(load_tokenizer(Path(tokenizer_path), vocab_size), vocab_size)
    m = masks_from_tokens(tokens, vocab_size, single)
    tensors = {
        "live_mask": m.live_mask,
        "dead_mask": m.dead_mask,
        "live_indices": torch.nonzero(m.live_mask).flatten(),
        "dead_indices": torch.nonzero(m.dead_mask).flatten(),
        "counts": m.counts,
    }
    metadata = {
        "vocab_size": str(vocab_size),
        "n_tokens": str(len(tokens)),
        "corpus_sha256": sha256_file(corpus_path),
        "tokenizer_sha256": sha256_file(tokenizer_path),
        "n_live": str(m.n_live),
        "n_dead": str(m.n_dead),
        "n_dead_bytes": str(m.n_dead_bytes),
        "n_dead_merges": str(m.n_dead_merges),
    }
    save_tensors(Path(out_path), tensors, metadata)
    return MasksResult(Path(out_path), len(tokens), m.n_live, m.n_dead, m.n_dead_bytes, m.n_dead_merges)


def load_masks(path: Path, vocab_size: int) -> Masks:
    """Read a masks file, checking its keys and that it was made for `vocab_size` tokens."""
    path = Path(path)
    if not path.is_file():
        raise FlannelError(f"{path}: masks file not found; run `flannel-repro masks` or fix paths.masks")
    header = read_header(path, "masks file")  # sizes and offsets checked against the file before safetensors maps it
    with safe_open(str(path), framework="pt") as f:
        missing = [k for k in MASK_KEYS if k not in f.keys()]
        if missing:
            raise FlannelError(f"{path}: masks file lacks {', '.join(missing)}; remake it with `flannel-repro masks`")
        live, dead, counts = f.get_tensor("live_mask"), f.get_tensor("dead_mask"), f.get_tensor("counts")
    if live.shape != (vocab_size,) or dead.shape != (vocab_size,) or counts.shape != (vocab_size,):
        raise FlannelError(
            f"{path}: masks file is for a vocabulary of {live.shape[0] if live.dim() else '?'} tokens but "
            f"model.vocab_size is {vocab_size}; remake it with `flannel-repro masks`"
        )
    n_dead_bytes = _recorded_count(path, header.get("__metadata__"), "n_dead_bytes", int(dead.bool().sum()))
    return Masks(live_mask=live.bool(), dead_mask=dead.bool(), counts=counts, n_dead_bytes=n_dead_bytes)


def _recorded_count(path: Path, metadata: object, key: str, most: int) -> int | None:
    """An integer the masks stage recorded in the header, checked to lie in [0, most]; None if absent."""
    value = metadata.get(key) if isinstance(metadata, dict) else None
    if value is None:
        return None
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and int(value) <= most):
        raise FlannelError(
            f"{path}: masks file records {key} = {value!r}, not a count from 0 to {most}; remake it with "
            "`flannel-repro masks`"
        )
    return int(value)
