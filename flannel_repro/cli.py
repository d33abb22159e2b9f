"""`flannel-repro`: one subcommand per stage. It only parses arguments and calls the stage functions.

    flannel-repro corpus | tokenizer | masks | train   [--params params.yaml] [-S section.key=value ...]

Paths in params.yaml are relative to the folder holding params.yaml. A problem with the input is one line on
stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Callable

from .config import Params, load_params
from .errors import FlannelError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a params value for this run, e.g. -S train.steps=10 (repeatable)",
    )


def _load(args: argparse.Namespace) -> tuple[Params, Path]:
    params = load_params(args.params, args.overrides)
    return params, Path(args.params).resolve().parent


def cmd_corpus(args: argparse.Namespace) -> int:
    from .corpus import corpus

    params, root = _load(args)
    r = corpus(params.corpus, root / params.paths.corpus)
    print(f"corpus: {params.paths.corpus} ({r.n_bytes:,} bytes, sha256 {r.sha256[:12]}, source {r.source})")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import tokenizer

    params, root = _load(args)
    r = tokenizer(params.tokenizer, params.model.vocab_size, root / params.paths.corpus, root / params.paths.tokenizer)
    print(f"tokenizer: {params.paths.tokenizer} ({r.vocab_size:,} tokens, sha256 {r.sha256[:12]}, source {r.source})")
    return 0


def cmd_masks(args: argparse.Namespace) -> int:
    from .masks import masks

    params, root = _load(args)
    p = params.paths
    r = masks(root / p.corpus, root / p.tokenizer, params.model.vocab_size, root / p.masks)
    print(f"masks: {p.masks} ({r.n_tokens:,} corpus tokens; live {r.n_live:,} | dead {r.n_dead:,})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train, write_reports

    params, root = _load(args)
    result = train(params, root, progress=not args.quiet)
    write_reports(params, result, root)
    print(
        f"trajectory: {params.paths.trajectory} (sha256 {result.sha256}); final loss {result.final_loss:.4f}; "
        f"{result.steps_per_s:.2f} steps/s on {result.device}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flannel-repro",
        description="Reproduce the Flannel 7 training trajectory bit for bit, and audit it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
        "corpus": (cmd_corpus, "write the model corpus (generated, or the user's own text file)"),
        "tokenizer": (cmd_tokenizer, "train the byte-level BPE tokenizer, or check the user's tokenizer file"),
        "masks": (cmd_masks, "write the live/dead token masks"),
        "train": (cmd_train, "train and record the trajectory (W, grad_W, losses) to safetensors"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        if name == "train":
            p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FlannelError as e:
        print(f"flannel-repro {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"flannel-repro {args.command}: interrupted; no output was written", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
