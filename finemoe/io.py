"""Atomic file writes: a crash or a kill never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from finemoe.errors import FinemoeError


def os_error_text(e: OSError) -> str:
    """The system's reason for an OSError, after the file it concerns if it names one."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def ensure_dir(path: str | os.PathLike, what: str = "folder", probe: bool = False) -> Path:
    """Create `path` and its parents, or say in one line why it cannot be written (before any
    expensive work, not after it). `probe`: also create and remove a file there, for the places
    where permission bits do not tell (a read-only or virtual file system, a full disk's quota)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FinemoeError(f"{what} {path} is a file; choose another location")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FinemoeError(
            f"cannot create {what} {path} ({os_error_text(e)}); choose another location"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FinemoeError(f"{what} {path} is not writable; choose another location or fix its permissions")
    if probe:
        try:
            tempfile.TemporaryFile(dir=path).close()
        except OSError as e:
            raise FinemoeError(
                f"cannot write in {what} {path} ({e.strerror or e}); choose another location"
            ) from None
    return path


def finite_or_none(x: Any) -> Any:
    """JSON and SQLite have no NaN or infinity: a non-finite float (a diverged loss) becomes None;
    anything else is returned as it is."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's content, or one line saying why it cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FinemoeError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise FinemoeError(f"cannot read {what} {path} ({e.strerror or e})") from None


def check_folder_path(path: str | os.PathLike, what: str = "folder") -> Path:
    """A folder that can be made later: not a file, under an existing writable folder. Creates nothing,
    so bad input found after this check leaves no empty folder behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FinemoeError(f"{what} {path} is a file; choose another location")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise FinemoeError(
            f"cannot create {what} {path} ({base} is not a writable folder); choose another location"
        )
    return path


def check_writable_file(path: str | os.PathLike, what: str = "output") -> Path:
    """An output file path that can be written: not a folder, its folder creatable. Checked before work."""
    path = Path(path)
    if path.is_dir():
        raise FinemoeError(f"{what} {path} is a folder; give a file path")
    check_folder_path(path.parent, f"{what} folder")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    Any failure (a full disk, a folder where the file should go) names `path`, never the temp file,
    and leaves `path` as it was."""
    path = check_writable_file(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise FinemoeError(f"cannot write {path} ({e.strerror or e}); choose another location") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
            os.chmod(
                tmp, 0o666 & ~umask()
            )  # mkstemp (and some writers) make 0600; give the mode open() would
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise FinemoeError(f"cannot write {path} ({e.strerror or e}); it is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
