"""A train run's inputs, read and checked against each other before any training starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.data.masks import Masks, encode_corpus, load_masks


@dataclass
class Inputs:
    tokens: torch.Tensor
    masks: Masks
    input_digests: dict[str, str]


def load_inputs(params: Params, root: Path) -> Inputs:
    """Read and check every input before any training starts."""
    paths, v = params.paths.under(root), params.model.vocab_size
    corpus_path, tok_path, masks_path = paths.corpus, paths.tokenizer, paths.masks
    tokens = encode_corpus(corpus_path, tok_path, v)
    need = params.model.max_seq_len + 1
    if len(tokens) < need:
        raise FlannelError(
            f"{corpus_path}: corpus has {len(tokens)} tokens, fewer than model.max_seq_len + 1 = {need}; use a "
            "longer corpus or a smaller max_seq_len"
        )
    masks = load_masks(masks_path, v)
    digests = {f"{name}_sha256": sha256_file(path) for name, path in paths.inputs().items()}
    made_from = _masks_made_from(masks_path)
    for key, what, path in (("corpus_sha256", "corpus", corpus_path), ("tokenizer_sha256", "tokenizer", tok_path)):
        if made_from.get(key) is not None and made_from[key] != digests[key]:
            raise FlannelError(
                f"{masks_path}: masks file was made from another {what} than {path}; remake it with "
                "`flannel-repro masks`"
            )
    return Inputs(tokens, masks, digests)


def _masks_made_from(path: Path) -> dict[str, str]:
    """The corpus and tokenizer digests a masks file records in its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
