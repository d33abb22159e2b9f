"""Every command's files, checked before any work: an output never replaces an input or another output.

A command names the files it reads and the files it writes, each by the name a user knows it by (`paths.metrics`,
`--report`, `trajectory A`). `check_files` resolves them all, so that a path through a symbolic link, `./x` against
`/abs/x` or a bind mount reaching the same file count as the same file, and refuses in one line, naming both, an
output that would replace an input or another output (`replaces`: symbolic links and hard links at an output's own
path). It also refuses an input that is not a regular file (a folder, a FIFO, a symbolic-link loop) and an output
whose folder cannot be written, so none of these is found after a long run.

    check_files(stage_files("train", params, root, Path("params.yaml")))
"""

from __future__ import annotations

import dataclasses
import errno
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flannel_repro.core.config import Params
from flannel_repro.core.errors import FlannelError
from flannel_repro.core.fsutil import TMP_PREFIX, file_kind

# What each params-driven stage reads and writes, as paths keys. Every other file params.yaml names is kept.
STAGE_FILES = {
    "corpus": ((), ("corpus",)),
    "tokenizer-corpus": ((), ("tokenizer_corpus",)),
    "tokenizer": (("tokenizer_corpus",), ("tokenizer",)),
    "masks": (("corpus", "tokenizer"), ("masks",)),
    "train": (("corpus", "tokenizer", "masks"), ("trajectory", "metrics", "loss_curve")),
}
# (written, kept) keys that may name one file: the tokenizer may be trained on the model corpus itself (README).
_SHARED = {("corpus", "tokenizer_corpus")}
# The `source` value of each section with one that names no file: the section's stage makes the file itself.
_NOT_FILES = {"corpus": "generated", "tokenizer_corpus": "generated", "tokenizer": "train"}


@dataclass
class Files:
    """The files of one command, each under the name the user gave it."""

    reads: dict[str, Path]  # opened by the command: regular files where they exist
    writes: dict[str, Path]  # replaced by the command (a temporary file renamed into place)
    keeps: dict[str, Path] = field(default_factory=dict)  # other files the project names: never replaced
    in_place: set[str] = field(default_factory=set)  # writes updated where they are (a database): writable files


def stage_files(stage: str, params: Params, root: Path, params_file: Path | None = None) -> Files:
    """The files of a params-driven stage: it writes its own paths keys (train also the SQLite tracking store, in
    place) and keeps the params file, every other paths key and the user's source files."""
    paths = params.paths.under(root)
    reads_keys, write_keys = STAGE_FILES[stage]
    files = Files(reads={}, writes={})
    store = tracking_store(params, root) if stage == "train" else None
    if store is not None:  # first, so that a paths key written over it is the one named
        files.writes["the tracking store"] = store
        files.in_place.add("the tracking store")
    files.writes |= {f"paths.{k}": getattr(paths, k) for k in write_keys}
    if params_file is not None:
        files.reads["--params"] = Path(params_file)
    for f in dataclasses.fields(paths):
        if f.name not in write_keys and not any((w, f.name) in _SHARED for w in write_keys):
            (files.reads if f.name in reads_keys else files.keeps)[f"paths.{f.name}"] = getattr(paths, f.name)
    for section, unset in _NOT_FILES.items():
        source, own = getattr(params, section).source, stage.replace("-", "_") == section
        # A stage whose source already is its output copies nothing (README: Use your own corpus or tokenizer).
        if source != unset and not (own and same_file(Path(root) / source, getattr(paths, section))):
            (files.reads if own else files.keeps)[f"{section}.source"] = Path(root) / source
    return files


def project_files(params: Params, root: Path, params_file: Path) -> dict[str, Path]:
    """The params file, every file its paths name, and its SQLite tracking store: what an audit command keeps."""
    paths = params.paths.under(root)
    files = {"--params": Path(params_file), **{f"paths.{f.name}": getattr(paths, f.name)
                                               for f in dataclasses.fields(paths)}}
    store = tracking_store(params, root)
    if store is not None:
        files["the tracking store"] = store
    return files


def tracking_store(params: Params, root: Path) -> Path | None:
    """The SQLite file MLflow logs to, when tracking is on and the store is one."""
    if not params.tracking.enabled:
        return None
    from flannel_repro.core.store_uri import sqlite_path, tracking_uri

    db = sqlite_path(tracking_uri(params.tracking, root))
    return Path(db) if db is not None and db != ":memory:" else None


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same real path, or the same inode reached another way (a bind mount, a
    case-insensitive filesystem)."""
    return _same_entry(os.path.realpath(a), os.path.realpath(b))


def replaces(output: Path, other: str, in_place: bool = False) -> bool:
    """Whether writing `output` replaces `other`, a resolved path (`_resolved`). An output is a new file renamed into
    place, so what it replaces is the directory entry at its path, reached through its real folder: a symbolic link
    at the path itself is replaced, not followed (as the commit does), and a second hard link elsewhere is another
    entry, left as it was (DVC's cache links identical files so). An `in_place` output (a database) is written
    through every link."""
    return _same_entry(os.path.realpath(output) if in_place else _entry(output), other, any_link=in_place)


def _entry(path: Path) -> str:
    """The directory entry at `path`: its real folder, and its own name unresolved."""
    path = _absolute(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _absolute(path: Path) -> str:
    """`path` made absolute as the kernel reads it: `..` is not folded away first (os.path.abspath does), since
    after a symbolic link it leads to the parent of the link's target (`tensors/up/..` is `data` when `up` links to
    `data/sub`)."""
    return os.path.join(os.getcwd(), path)


def _same_entry(a: str, b: str, any_link: bool = False) -> bool:
    """Whether resolved paths `a` and `b` are one directory entry (with `any_link`: one inode)."""
    if a == b:
        return True
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):
        return False
    if any_link or sa.st_nlink == 1:  # one entry only: both paths reach it
        return True
    folders = {(st.st_dev, st.st_ino) for st in (os.stat(os.path.dirname(a)), os.stat(os.path.dirname(b)))}
    return len(folders) == 1 and os.path.basename(a).casefold() == os.path.basename(b).casefold()


def check_names(files: dict[str, Path]) -> None:
    """Refuse a file name that is not UTF-8 (legal on Linux): a trajectory records its inputs' names in a JSON
    header, safetensors and tokenizers open files by UTF-8 names, and MLflow logs them; one such name is refused by
    every command alike, before any work, rather than half-handled by some."""
    for key, path in files.items():
        text = os.fspath(path)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise FlannelError(f"{key} ({shown}): the path is not UTF-8 text; rename it (or the folder) to a UTF-8 "
                               "name") from None
        if "\0" in text:
            raise FlannelError(f"{key} ({text!r}): the path holds a NUL byte; remove it")


def check_files(files: Files) -> None:
    """Refuse, before any work, a write that would replace a read, a kept file or another write; an input that is
    not a regular file; and an output that cannot be written."""
    check_names({**files.reads, **files.writes, **files.keeps})
    for key, path in files.reads.items():
        _check_input(key, Path(path))
    # What each file is: a read or kept file where its path leads, an output the entry it replaces.
    seen = {key: (path, os.path.realpath(path)) for key, path in {**files.reads, **files.keeps}.items()}
    for key, path in files.writes.items():
        in_place = key in files.in_place
        for other, (other_path, resolved) in seen.items():
            if replaces(path, resolved, in_place):
                raise FlannelError(
                    f"{key} ({path}) is the same file as {other} ({other_path}), and writing {key} would replace "
                    f"it; give {key} a path of its own{_where(key)}"
                )
        seen[key] = (path, os.path.realpath(path) if in_place else _entry(path))
        _check_output(key, Path(path), in_place)


def _where(key: str) -> str:
    if key == "the tracking store":
        return " (tracking.uri in params.yaml, or MLFLOW_TRACKING_URI)"
    return " in params.yaml" if key.startswith("paths.") or key.endswith(".source") else ""


def _check_input(key: str, path: Path) -> None:
    """An input that exists must be a regular file; a missing one is left to the command, which knows the fix."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if path.is_symlink():
            raise FlannelError(f"{path}: {key} is a symbolic link to {os.readlink(path)}, which does not exist; "
                               f"restore the file it points to or fix {key}{_where(key)}") from None
        return
    except OSError as e:
        raise FlannelError(_unreachable(key, path, e)) from None
    kind = file_kind(st.st_mode)
    if kind is not None:  # a FIFO would block its reader forever
        raise FlannelError(f"{path}: {key} is {kind}, not a file; give {key} a regular file{_where(key)}")


def _check_output(key: str, path: Path, in_place: bool) -> None:
    """The output must be a regular file, or not exist yet, in a folder this process can write; an in-place one
    must be writable itself."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # not there yet; a file in the way of its folder is said below
        st = None
    except OSError as e:
        raise FlannelError(_unreachable(key, path, e)) from None
    kind = file_kind(st.st_mode) if st is not None else None
    if kind == "a folder":
        raise FlannelError(f"{path}: is a folder; {key} must name a file, fix it{_where(key)}")
    if kind is not None:  # renaming over /dev/null would replace the device
        raise FlannelError(f"{path}: {key} is {kind}, not a file; give {key} a file path{_where(key)}")
    if in_place and st is not None:
        try:
            os.close(os.open(path, os.O_RDWR))
        except OSError as e:
            raise FlannelError(f"{path}: {key} cannot be written ({e.strerror}); make it writable (chmod u+w, "
                               "chattr -i), or set tracking.uri or tracking.enabled: false in params.yaml") from None
    folder = _nearest_existing_folder(key, path)
    if not folder.is_dir():
        raise FlannelError(f"{path.parent}: cannot create the output folder: {folder} is a file, not a folder; "
                           f"move it or fix {key}{_where(key)}")
    try:  # a real probe: permissions, a read-only or immutable folder, /proc ...
        fd, probe = tempfile.mkstemp(prefix=f"{TMP_PREFIX}probe.", dir=folder)
    except OSError as e:
        raise FlannelError(f"{path.parent}: cannot write the output folder ({e.strerror}); check it or fix "
                           f"{key}{_where(key)}") from None
    os.close(fd)
    os.unlink(probe)


def _nearest_existing_folder(key: str, path: Path) -> Path:
    """The folder of `path`, or the nearest parent that exists (the rest is made when the output is written)."""
    for parent in Path(_absolute(path)).parents:
        if parent.exists():
            return parent
        if parent.is_symlink():
            raise FlannelError(f"{path.parent}: cannot create the output folder: {parent} is a symbolic link to "
                               f"{os.readlink(parent)}, which does not exist; fix the link or {key}{_where(key)}")
    return Path("/")


def _unreachable(key: str, path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return f"{path}: {key} is a loop of symbolic links, not a file; fix the links or {key}{_where(key)}"
    return f"{path}: {key} cannot be reached ({e.strerror}); check the path or fix {key}{_where(key)}"
