"""Corpus, tokenizer corpus, tokenizer and masks stages: deterministic bytes, exact vocabulary, correct live/dead
split, and the notebook's regime with the defaults."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from flannel_repro.core.config import (
    CorpusConfig,
    ModelConfig,
    Params,
    PathsConfig,
    TokenizerConfig,
    TokenizerCorpusConfig,
)
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import sha256_file
from flannel_repro.core.safetensors_header import save_tensors
from flannel_repro.data.corpus import SplitMix64, corpus, generate_text
from flannel_repro.data.masks import encode_corpus, load_masks, masks
from flannel_repro.data.tokenizer import tokenizer
from flannel_repro.data.tokenizer_corpus import tokenizer_corpus
from tests.conftest import run_cli

# Pinned: the generated texts must never change on any machine, Python or numpy version; the tokenizer and masks
# not with the pinned tokenizers, safetensors and torch versions either.
DEFAULT_CORPUS_SHA256 = "269d6218b033f78704309b08181d6fd2c06c9e08deebe31ff4347bf8c8028b45"
DEFAULT_TOKENIZER_CORPUS_SHA256 = "f0259bab8a9058d339c359f17d4c409e1d0e14e6aca451e1b577a3e2cbdfb995"
DEFAULT_TOKENIZER_SHA256 = "3852eb934667268e56a2fc9e0632b082e3e95c718d16799ca769a9ed1b2e7cb5"
DEFAULT_MASKS_SHA256 = "e43d0fe1b71f383844318d60a39e7af84bfbc3b1b3493402678c1a0d4e73037b"
TINY_CORPUS_SHA256 = "cf352190ee42880f9ee7e5199267519cdab88f629a4bafeb16ca545762230d01"


def _params(vocab_size: int, tokenizer_cfg: TokenizerConfig | None = None, **paths: str) -> Params:
    """Params for a data stage with this vocabulary, tokenizer section and paths (relative to the stage's root)."""
    return Params(tokenizer=tokenizer_cfg or TokenizerConfig(), model=ModelConfig(vocab_size=vocab_size),
                  paths=PathsConfig(**paths))


def test_splitmix64_reference_values():
    rng = SplitMix64(0)  # published SplitMix64 outputs for seed 0
    assert [rng.next() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    """The four data files of the default params (about 20 s on one core), with what each stage returned."""
    root, params = tmp_path_factory.mktemp("default_data"), Params()
    made = {"corpus": corpus(params, root), "tokenizer_corpus": tokenizer_corpus(params, root),
            "tokenizer": tokenizer(params, root)}
    made["masks"] = masks(params, root)
    return root, params, made


def test_default_data_is_pinned(default_data):
    root, params, made = default_data
    p = params.paths
    assert made["corpus"].sha256 == sha256_file(root / p.corpus) == DEFAULT_CORPUS_SHA256
    assert made["tokenizer_corpus"].sha256 == sha256_file(root / p.tokenizer_corpus) == DEFAULT_TOKENIZER_CORPUS_SHA256
    assert made["tokenizer"].sha256 == sha256_file(root / p.tokenizer) == DEFAULT_TOKENIZER_SHA256
    assert sha256_file(root / p.masks) == DEFAULT_MASKS_SHA256


def test_default_data_is_in_the_notebooks_regime(default_data):
    """The notebook: 10,000 tokens, a corpus of 1,371,328 tokens, 3,699 dead tokens (37.0%)."""
    root, params, made = default_data
    m = made["masks"]
    assert Tokenizer.from_file(str(root / params.paths.tokenizer)).get_vocab_size() == 10_000
    assert abs(m.n_tokens / 1_371_328 - 1) < 0.01
    assert m.n_live + m.n_dead == 10_000 and abs(m.n_dead / 10_000 - 0.37) <= 0.02
    assert m.n_dead_merges > 10 * m.n_dead_bytes  # mostly word pieces and words, not unused bytes
    # The tokenizer was trained on other text: its corpus and the model corpus are different files.
    assert made["tokenizer_corpus"].sha256 != made["corpus"].sha256


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
    a = tokenizer(_params(300, tokenizer_corpus=str(c), tokenizer="a.json"), tmp_path)
    b = tokenizer(_params(300, tokenizer_corpus=str(c), tokenizer="b.json"), tmp_path)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert Tokenizer.from_file(str(tmp_path / "a.json")).get_vocab_size() == 300


def test_user_tokenizer_of_wrong_size_is_rejected(tiny_data, tmp_path):
    tok = tiny_data / "data" / "flannel_tokenizer_chars.json"
    with pytest.raises(FlannelError, match="tokenizer has 300 tokens but model.vocab_size is 512"):
        corpus_path = str(tiny_data / "data" / "flannel_tokenizer_corpus.txt")
        tokenizer(_params(512, TokenizerConfig(source=str(tok)), tokenizer_corpus=corpus_path, tokenizer="t.json"),
                  tmp_path)
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
    tokenizer(_params(400, tokenizer_corpus=str(corpus_path), tokenizer=str(tok_path)), tmp_path)
    whole = Tokenizer.from_file(str(tok_path)).encode(tricky).ids
    assert len(tricky) > 3 * (1 << 18)  # several pieces
    assert encode_corpus(corpus_path, tok_path, 400).tolist() == whole


def test_dead_tokens_are_split_into_single_bytes_and_merges(tmp_path):
    """A tokenizer trained on other text than the corpus: dead merges as well as dead bytes, counted in the masks
    file's header, and the counts agree with the tokens' own strings."""
    params = Params(corpus=CorpusConfig(n_words=3000, lexicon_size=500),
                    tokenizer_corpus=TokenizerCorpusConfig(n_words=3000, lexicon_size=120),
                    model=ModelConfig(vocab_size=400))
    corpus(params, tmp_path)
    tokenizer_corpus(params, tmp_path)
    tokenizer(params, tmp_path)
    r = masks(params, tmp_path)

    p = params.paths
    tok = Tokenizer.from_file(str(tmp_path / p.tokenizer))
    dead = load_file(str(tmp_path / p.masks))["dead_indices"].tolist()
    n_bytes = sum(len(tok.id_to_token(i)) == 1 for i in dead)  # byte-level: one character per byte
    assert (r.n_dead, r.n_dead_bytes, r.n_dead_merges) == (len(dead), n_bytes, len(dead) - n_bytes)
    assert r.n_dead_bytes > 0 and r.n_dead_merges > 0
    with safe_open(str(tmp_path / p.masks), framework="pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("n_live", "n_dead", "n_dead_bytes", "n_dead_merges")} == {
        "n_live": str(r.n_live), "n_dead": str(r.n_dead), "n_dead_bytes": str(n_bytes),
        "n_dead_merges": str(len(dead) - n_bytes)}
    loaded = load_masks(tmp_path / p.masks, 400)
    assert (loaded.n_dead_bytes, loaded.n_dead_merges) == (r.n_dead_bytes, r.n_dead_merges)


def test_masks_with_a_forged_dead_count_are_rejected(tiny_data, tmp_path):
    src = tiny_data / "tensors/Flannel/live_dead_tokens.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_tensors(tmp_path / "m.safetensors", tensors, {**meta, "n_dead_bytes": "999"})
    with pytest.raises(FlannelError, match=r"m.safetensors: masks file records n_dead_bytes = '999', not a count "
                                           r"from 0 to \d+; remake it with `flannel-repro masks`"):
        load_masks(tmp_path / "m.safetensors", 300)


def test_cli_masks_reports_the_composition_of_the_dead_set(tiny_project):
    proc = run_cli("masks", cwd=tiny_project, check=True)
    with safe_open(str(tiny_project / "tensors/Flannel/live_dead_tokens.safetensors"), framework="pt") as f:
        m = f.metadata()
    share = int(m["n_dead"]) / 300
    assert proc.stdout == (
        f"masks: tensors/Flannel/live_dead_tokens.safetensors ({int(m['n_tokens']):,} corpus tokens; "
        f"live {m['n_live']} | dead {m['n_dead']} ({share:.1%}): {m['n_dead_bytes']} single bytes, "
        f"{m['n_dead_merges']} merges)\n"
    )


def test_every_data_stage_is_byte_identical_in_a_new_process(tiny_project):
    """Each stage run twice, each time in its own process, writes the same bytes (safetensors' own writer would
    not: it orders the masks metadata differently in every process)."""
    outputs = {"corpus": "data/flannel_model_corpus.txt", "tokenizer-corpus": "data/flannel_tokenizer_corpus.txt",
               "tokenizer": "data/flannel_tokenizer_chars.json",
               "masks": "tensors/Flannel/live_dead_tokens.safetensors"}
    for stage, out in outputs.items():
        digests = []
        for _ in range(2):
            (tiny_project / out).unlink()
            run_cli(stage, cwd=tiny_project, check=True)
            digests.append(sha256_file(tiny_project / out))
        assert digests[0] == digests[1], f"{stage}: {out} differs between two runs"
    m = load_file(str(tiny_project / outputs["masks"]))  # still a plain safetensors file
    assert torch.equal(m["live_mask"], ~m["dead_mask"])


def test_tokenizer_ids_beyond_its_vocabulary_are_a_clear_error(tiny_project):
    """A hand-edited tokenizer file that gives a token of the corpus id 400 in a 300-token vocabulary: no masks of
    the wrong length."""
    tok_path = tiny_project / "data/flannel_tokenizer_chars.json"
    out = tiny_project / "tensors/Flannel/live_dead_tokens.safetensors"
    before = out.read_bytes()
    doc = json.loads(tok_path.read_text())
    vocab = doc["model"]["vocab"]
    last_live = int(load_file(str(out))["live_indices"].max())
    vocab[next(t for t, i in vocab.items() if i == last_live)] = 400
    tok_path.write_text(json.dumps(doc))
    proc = run_cli("masks", cwd=tiny_project)
    assert proc.returncode == 2
    assert proc.stderr.endswith("flannel_tokenizer_chars.json: tokenizer gives token id 400 but has 300 tokens "
                                "(ids from 0 to 299); fix or replace the tokenizer file\n")
    assert out.read_bytes() == before  # the old masks file is untouched
