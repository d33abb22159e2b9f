"""Stage 1b: the tokenizer corpus, the text the tokenizer is trained on.

The notebook's tokenizer (`..._chars.json`) was evidently trained on other text than its model corpus, which left
37% of its vocabulary dead. This stage makes such a text with the model corpus's generator (corpus.py) from the
`tokenizer_corpus` section: its own seed, so other word forms, and a smaller lexicon, so that BPE spends most of
its vocabulary on whole words the model corpus never uses. Byte-identical on every machine, like the corpus.

With `tokenizer_corpus.source` set to a path (for instance the model corpus itself), the stage checks that the file
is UTF-8 text and copies it into place instead.

    tokenizer_corpus(load_params("params.yaml"), root=Path("."))  # -> paths.tokenizer_corpus
"""

from __future__ import annotations

from pathlib import Path

from flannel_repro.core.config import Params
from flannel_repro.data.corpus import CorpusResult, write_text


def tokenizer_corpus(params: Params, root: Path = Path(".")) -> CorpusResult:
    """Write the tokenizer corpus to `paths.tokenizer_corpus` under `root`, the folder of params.yaml (atomically),
    and return its size and sha256. A relative `tokenizer_corpus.source` path is relative to `root` too."""
    return write_text(params.tokenizer_corpus, params.paths.under(root).tokenizer_corpus, root)
