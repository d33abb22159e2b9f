"""Small file helpers: atomic outputs, file hashes, the project root.

Every output of the project is written to a temporary name in its own folder and renamed into place only when it
is complete, so an interrupted stage never leaves a partial file where DVC or a colleague would pick it up. It gets
the mode the umask gives a new file, as `open()` would (a DVC remote on a shared folder, a colleague, can read it),
and a write that fails is one line saying truthfully why: a full disk with its free space, the file size limit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flannel_repro.core.errors import FlannelError

TMP_PREFIX = ".flannel-tmp-"


def temp_path_for(out_path: Path, owner_key: str | None = None) -> Path:
    """A new, empty temporary file beside `out_path` (same filesystem, so the final rename is atomic).

    With `owner_key`, the params key naming the output, the file is `.flannel-tmp-<name>.<pid>.<random>` so that
    the next run can tell a dead run's leftover from a live one's, and a folder that cannot be made names the key.
    """
    out_path = Path(out_path)
    prefix = f"{TMP_PREFIX}{out_path.name}." + (f"{os.getpid()}." if owner_key else "")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=prefix, dir=out_path.parent)
    except OSError as e:
        raise _folder_error(out_path, e, owner_key) from None
    os.close(fd)
    return Path(name)


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failure(e: OSError, folder: Path) -> tuple[str, str]:
    """(why, how to fix it) for a write that failed with `e` in `folder`: a full disk is told with its free space,
    the file size limit (ulimit -f) with the limit, and never the one as the other."""
    if e.errno == errno.EFBIG:
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return (f"{e.strerror}: this process may write files of at most {soft:,} bytes (ulimit -f)",
                    "raise the file size limit")
        return f"{e.strerror}: more than this filesystem allows in one file", "write it to another filesystem"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = ""
        with contextlib.suppress(OSError):
            free = f", {free_bytes(folder):,} bytes free"
        return f"{e.strerror}{free}", "free space there"
    return e.strerror or str(e), "check the folder"


def free_bytes(folder: Path) -> int:
    """Bytes this process may still write in `folder` (or its nearest existing parent)."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is ("a folder", "a FIFO (named pipe)", ...); None for a regular one."""
    kinds = [(stat.S_ISREG, None), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((name for test, name in kinds if test(mode)), "a special file")


def _folder_error(out_path: Path, e: OSError, owner_key: str | None) -> FlannelError:
    if owner_key is None:
        return FlannelError(
            f"{out_path.parent}: cannot write the output folder ({e.strerror}); check its permissions or choose "
            "another path in params.yaml"
        )
    blocker = next((p for p in out_path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return FlannelError(
            f"{out_path.parent}: cannot create the output folder: {blocker} is a file, not a folder; move it or "
            f"fix {owner_key} in params.yaml"
        )
    return FlannelError(
        f"{out_path.parent}: cannot write the output folder ({e.strerror}); check it or fix {owner_key} in params.yaml"
    )


def commit_file(tmp: Path, out_path: Path) -> None:
    """Give `tmp` the mode a new file gets (mkstemp made it 0600 whatever the umask), fsync it and rename it over
    `out_path`."""
    with open(tmp, "rb+") as f:
        os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(out_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_output(out_path: Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `out_path`, on any error it is removed (and a failed write
    is one FlannelError line)."""
    out_path = Path(out_path)
    tmp = temp_path_for(out_path)
    try:
        yield tmp
        commit_file(tmp, out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is not None and Path(e.filename) not in (tmp, out_path):  # reading another file failed
            raise FlannelError(f"{e.filename}: cannot be read ({e.strerror}) to write {out_path}") from None
        why, fix = write_failure(e, out_path.parent)
        raise FlannelError(f"{out_path}: could not be written ({why}); {fix}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(out_path: Path, doc: Any) -> None:
    with atomic_output(Path(out_path)) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def project_root(start: Path | None = None) -> Path:
    """The folder holding params.yaml, seen from `start` (default: the working directory).

    `dvc exp run --queue` runs each experiment in a temporary copy under `<root>/.dvc/tmp/exps/`; for those the
    original project root is returned, so tracking stores and reports are shared with workspace runs.
    """
    here = Path(start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here
