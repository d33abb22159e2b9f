"""Corpus, tokenizer and masks stages: deterministic bytes, exact vocabulary, correct live/dead split."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from flannel_repro.config import CorpusConfig, ModelConfig, Params, PathsConfig, TokenizerConfig
from flannel_repro.corpus import SplitMix64, corpus, generate_text
from flannel_repro.errors import FlannelError
from flannel_repro.masks import encode_corpus, load_masks
from flannel_repro.tokenizer import tokenizer

# Pinned: these bytes must never change on any machine, Python or numpy version.
DEFAULT_CORPUS_SHA256 = "4909662091bd06c27d91558580e4744a7731c124dcdbfd2c08ec979c15812220"
TINY_CORPUS_SHA256 = "cf352190ee42880f9ee7e5199267519cdab88f629a4bafeb16ca545762230d01"


def _params(vocab_size: int, tokenizer_cfg: TokenizerConfig | None = None, **paths: str) -> Params:
    """Params for a data stage with this vocabulary, tokenizer section and paths (relative to the stage's root)."""
    return Params(tokenizer=tokenizer_cfg or TokenizerConfig(), model=ModelConfig(vocab_size=vocab_size),
                  paths=PathsConfig(**paths))


def test_splitmix64_reference_values():
    rng = SplitMix64(0)  # published SplitMix64 outputs for seed 0
    assert [rng.next() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_default_corpus_is_pinned(tmp_path):
    r = corpus(Params(paths=PathsConfig(corpus="corpus.txt")), tmp_path)
    assert r.sha256 == DEFAULT_CORPUS_SHA256
    assert hashlib.sha256((tmp_path / "corpus.txt").read_bytes()).hexdigest() == DEFAULT_CORPUS_SHA256


def test_tiny_corpus_is_pinned_and_english_like():
    text = generate_text(CorpusConfig(n_words=3000, lexicon_size=500))
    assert hashlib.sha256(text.encode()).hexdigest() == TINY_CORPUS_SHA256
    words = text.split()
    assert len(words) == 3000
    assert words[0][0].isupper() and text.rstrip()[-1] in ".?!"
    top = max(set(words), key=words.count)
    assert top.strip(",.?!").lower() == "the"  # Zipf: rank 1 is the most frequent word


def test_corpus_from_user_file(tmp_path):
    src = tmp_path / "mine.txt"
    src.write_text("Some text of my own.\n", encoding="utf-8")
    r = corpus(Params(corpus=CorpusConfig(source=str(src)), paths=PathsConfig(corpus="out/corpus.txt")), tmp_path)
    assert (tmp_path / "out" / "corpus.txt").read_text() == "Some text of my own.\n"
    assert r.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()


def test_corpus_from_non_utf8_file_is_a_clear_error(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    out = tmp_path / "corpus.txt"
    with pytest.raises(FlannelError, match=r"latin1.txt: corpus source is not UTF-8 text \(invalid byte at offset 3\)"):
        corpus(Params(corpus=CorpusConfig(source=str(src)), paths=PathsConfig(corpus=out.name)), tmp_path)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]  # no output, no temporary left behind


def test_tokenizer_has_exact_vocab_and_is_byte_identical(tiny_data, tmp_path):
    c = tiny_data / "data" / "flannel_model_corpus.txt"
    a = tokenizer(_params(300, corpus=str(c), tokenizer="a.json"), tmp_path)
    b = tokenizer(_params(300, corpus=str(c), tokenizer="b.json"), tmp_path)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert Tokenizer.from_file(str(tmp_path / "a.json")).get_vocab_size() == 300


def test_user_tokenizer_of_wrong_size_is_rejected(tiny_data, tmp_path):
    tok = tiny_data / "data" / "flannel_tokenizer_chars.json"
    with pytest.raises(FlannelError, match="tokenizer has 300 tokens but model.vocab_size is 512"):
        corpus_path = str(tiny_data / "data" / "flannel_model_corpus.txt")
        tokenizer(_params(512, TokenizerConfig(source=str(tok)), corpus=corpus_path, tokenizer="t.json"), tmp_path)
    assert not (tmp_path / "t.json").exists()


def test_masks_partition_the_vocabulary(tiny_data):
    p = tiny_data
    m = load_file(str(p / "tensors/Flannel/live_dead_tokens.safetensors"))
    tokens = encode_corpus(p / "data/flannel_model_corpus.txt", p / "data/flannel_tokenizer_chars.json", 300)
    assert m["live_mask"].dtype == torch.bool and m["dead_mask"].shape == (300,)
    assert m["dead_indices"].dtype == torch.int64 and m["live_indices"].dtype == torch.int64
    assert torch.equal(m["live_mask"], ~m["dead_mask"])
    assert torch.equal(m["counts"], torch.bincount(tokens, minlength=300))
    assert not torch.isin(tokens, m["dead_indices"]).any()  # a dead token never occurs in the corpus
    assert set(m["live_indices"].tolist()) == set(tokens.tolist())
    assert 0 < len(m["dead_indices"]) < 300


def test_masks_for_another_vocabulary_are_rejected(tiny_data):
    with pytest.raises(FlannelError, match="masks file is for a vocabulary of 300 tokens but model.vocab_size is 400"):
        load_masks(tiny_data / "tensors/Flannel/live_dead_tokens.safetensors", 400)


def test_piecewise_encoding_equals_whole_encoding(tiny_data, tmp_path):
    """The corpus is encoded in pieces to save memory; the ids must equal one `tokenizer.encode(text)`."""
    tricky = "".join(
        f"Word{i}, and more.\n\n  Indented line?\n \nTrailing space \nnumbers 123\n'quote'\nnaïve café\t\n"
        for i in range(12000)
    )
    corpus_path = tmp_path / "tricky.txt"
    corpus_path.write_text(tricky, encoding="utf-8")
    tok_path = tmp_path / "tok.json"
    tokenizer(_params(400, corpus=str(corpus_path), tokenizer=str(tok_path)), tmp_path)
    whole = Tokenizer.from_file(str(tok_path)).encode(tricky).ids
    assert len(tricky) > 3 * (1 << 18)  # several pieces
    assert encode_corpus(corpus_path, tok_path, 400).tolist() == whole
