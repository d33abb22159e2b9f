"""Stage 1: the model corpus, and the text generator it shares with the tokenizer corpus (tokenizer_corpus.py).

The notebook's corpus file does not ship with it, so by default this stage writes English-like text of its own: a
lexicon of pronounceable word forms with Zipf (1 / rank) frequencies, shorter forms more frequent, put into
sentences with commas, end punctuation and paragraphs. Every random draw comes from a self-contained SplitMix64
generator on Python integers and every weight is an integer, so the file is byte-identical on every machine, Python
and numpy version (its sha256 is pinned in the tests).

With `corpus.source` set to a path, the stage checks that the file is UTF-8 text and copies it into place instead.

    corpus(load_params("params.yaml"), root=Path("."))  # -> paths.corpus
"""

from __future__ import annotations

import bisect
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from flannel_repro.core.config import CorpusConfig, Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import atomic_output

_MASK64 = (1 << 64) - 1
# Frequent English function words take the top ranks; the rest of the lexicon is made of syllables.
_FUNCTION_WORDS = (
    "the of and a to in is that it was for on as with he be at by this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said"
).split()
_ONSETS = "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr pl pr sh sl sp st str th tr wh".split()
_VOWELS = "a e i o u a e i o ea ee ai ou oo io".split()
_CODAS = [""] * 6 + "n r s t l m nd st ng ck rd nt".split()


class SplitMix64:
    """SplitMix64 (Steele, Lea & Flood 2014): 64-bit state, integer-only, identical on every platform."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) by rejection, so there is no modulo bias."""
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self.next()
            if x < limit:
                return x % n


@dataclass(frozen=True)
class CorpusResult:
    path: Path
    n_bytes: int
    sha256: str
    source: str


def make_lexicon(rng: SplitMix64, size: int) -> list[str]:
    """`size` distinct word forms, most frequent (shortest) first."""
    words: list[str] = list(dict.fromkeys(_FUNCTION_WORDS))[:size]
    seen = set(words)
    made: list[str] = []
    while len(words) + len(made) < size:
        n_syllables = 1 + rng.below(4)
        w = "".join(
            _ONSETS[rng.below(len(_ONSETS))] + _VOWELS[rng.below(len(_VOWELS))] + _CODAS[rng.below(len(_CODAS))]
            for _ in range(n_syllables)
        )
        if w not in seen:
            seen.add(w)
            made.append(w)
    made.sort(key=len)  # stable: the law of abbreviation, frequent words are short
    return words + made


def generate_text(cfg: CorpusConfig) -> str:
    rng = SplitMix64(cfg.seed)
    lexicon = make_lexicon(rng, cfg.lexicon_size)
    # Zipf weights 1/(rank + 1) as integers, cumulated for inverse-CDF sampling.
    cumulative: list[int] = []
    total = 0
    for rank in range(len(lexicon)):
        total += (1 << 40) // (rank + 1)
        cumulative.append(total)

    paragraphs: list[str] = []
    sentences: list[str] = []
    words_left = cfg.n_words
    while words_left > 0:
        length = min(words_left, 4 + rng.below(17))  # 4..20 words
        words = [lexicon[bisect.bisect_right(cumulative, rng.below(total))] for _ in range(length)]
        words[0] = words[0].capitalize()
        for i in range(1, length - 1):
            if rng.below(10) == 0:
                words[i] += ","
        end = rng.below(20)
        sentences.append(" ".join(words) + ("?" if end == 0 else "!" if end == 1 else "."))
        words_left -= length
        if rng.below(6) == 0 or words_left <= 0:
            paragraphs.append(" ".join(sentences))
            sentences = []
    return "\n\n".join(paragraphs) + "\n"


def read_text(path: Path, what: str, key: str) -> str:
    """Read a UTF-8 text file, or fail with one line naming the file and the params key that points at it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FlannelError(f"{path}: {what} not found; create it (dvc repro) or fix {key} in params.yaml") from None
    except UnicodeDecodeError as e:
        raise FlannelError(
            f"{path}: {what} is not UTF-8 text (invalid byte at offset {e.start}); convert it, e.g. "
            f"iconv -t UTF-8, or fix {key} in params.yaml"
        ) from None
    except IsADirectoryError:
        raise FlannelError(f"{path}: {what} is a directory, not a file; fix {key} in params.yaml") from None
    except OSError as e:
        raise FlannelError(f"{path}: cannot read {what} ({e.strerror}); fix {key} in params.yaml") from None


def read_corpus(path: Path, key: str = "paths.corpus") -> str:
    """The text at `key` (the model corpus, or `paths.tokenizer_corpus`). An empty one (or only whitespace) is
    refused: it has no tokens to learn from or to mark live."""
    what = key.removeprefix("paths.").replace("_", " ")
    text = read_text(path, what, key)
    if not text.strip():
        raise FlannelError(f"{path}: {what} is empty; give {key} a UTF-8 text file with content, or remake it with "
                           f"`flannel-repro {what.replace(' ', '-')}`")
    return text


def corpus(params: Params, root: Path = Path(".")) -> CorpusResult:
    """Write the model corpus to `paths.corpus` under `root`, the folder of params.yaml (atomically), and return
    its size and sha256. A relative `corpus.source` path is relative to `root` too."""
    return write_text(params.corpus, params.paths.under(root).corpus, root)


def write_text(cfg: CorpusConfig, out_path: Path, root: Path) -> CorpusResult:
    """Generate the text `cfg` describes (a CorpusConfig, or a TokenizerCorpusConfig: the same fields under another
    section) or copy its `source` file, into `out_path`, atomically."""
    if cfg.source == "generated":
        data = generate_text(cfg).encode("utf-8")
        with atomic_output(out_path) as tmp:
            tmp.write_bytes(data)
    else:
        src = Path(root) / cfg.source
        what = f"{cfg._section.replace('_', ' ')} source"
        text = read_text(src, what, f"{cfg._section}.source")
        if not text.strip():
            raise FlannelError(f"{src}: {what} is empty; give a UTF-8 text file with content")
        if src.resolve() != out_path.resolve():
            with atomic_output(out_path) as tmp:
                shutil.copyfile(src, tmp)
        data = src.read_bytes()
    return CorpusResult(out_path, len(data), hashlib.sha256(data).hexdigest(), cfg.source)
