"""The grid of a sweep, in DVC's own `-S` sweep syntax and expanded by DVC's own code (as `dvc exp run -S ...
--queue` expands it):

    -S 'train.train_seed=range(42,46)'        four points (the stop is excluded)
    -S 'train.learning_rate=0.001,0.002'      a choice of two; `choice(0.001,0.002)` is the same
    -S 'train.num_threads=1'                  one value: every point gets it

Several `-S` give the product. A sweep file (`--file sweep.yaml`) is a YAML mapping of `section.key` to a list of
values or to one of the forms above; its keys come first, in the file's order:

    train.train_seed: range(42,52)
    train.learning_rate: [0.001, 0.002]

A point is its `section.key=value` overrides, as `dvc exp run -S` takes them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from flannel_repro.core.config import parse_yaml
from flannel_repro.core.errors import ConfigError


def expand_grid(overrides: list[str], sweep_file: Path | None = None) -> list[tuple[str, ...]]:
    """Every point of the product of the sweep file's keys and the `-S` options, each as its overrides."""
    from dvc.utils.hydra import get_hydra_sweeps

    items = [*(file_overrides(sweep_file) if sweep_file is not None else []), *overrides]
    if not items:
        raise ConfigError("no grid: give -S section.key=VALUES (e.g. -S 'train.train_seed=range(42,46)') or --file")
    keys = [item.partition("=")[0].strip() for item in items]
    for item, key in zip(items, keys, strict=True):
        section, dot, name = key.partition(".")
        if "=" not in item or not dot or not section or not name:
            raise ConfigError(f"-S {item!r}: write it as section.key=values, e.g. -S 'train.train_seed=range(42,46)'")
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"-S {twice[0]}: given twice; give its values once, as a,b,c")
    try:
        sweeps = get_hydra_sweeps({"params.yaml": items})
    except Exception as e:  # DVC's InvalidArgumentError and hydra's parse errors: one line
        raise ConfigError(f"-S {' '.join(items)}: {str(e).splitlines()[0]}") from None
    return [tuple(s["params.yaml"]) for s in sweeps]


def file_overrides(path: Path) -> list[str]:
    """A sweep file's keys as `-S` options."""
    try:
        doc = parse_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: sweep file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{path}: write a mapping of section.key to values, e.g. `train.train_seed: range(42,46)`")
    out = []
    for key, spec in doc.items():
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{path}: {key}: an empty list of values")
            out.append(f"{key}=" + ",".join(_flow(v) for v in spec))
        elif isinstance(spec, str):
            out.append(f"{key}={spec}")
        else:
            out.append(f"{key}={_flow(spec)}")
    return out


def _flow(value: object) -> str:
    """A value as `-S` writes it: YAML flow style, on one line."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
