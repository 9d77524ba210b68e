"""Files segtrain reads and writes, and the errors that name them.

One owner for: the user-facing error types, atomic writes (a crash or a full disk
never leaves a half file, nor the temp file that would have become it), reading a
file with an error that names it. Nothing here knows what a dataset is (the shard
manifest is ``segtrain.sources``'), nor a run directory (``segtrain.checkpoints``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """Bad input data; the message names the file (or sample id) and the problem."""


class ConfigError(ValueError):
    """A bad config key or value; the message says which and what is allowed."""


def user_cache_dir() -> Path:
    """segtrain's folder in the user's cache: $XDG_CACHE_HOME/segtrain, else ~/.cache/segtrain."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segtrain"


# ----------------------------------------------------------------------------- writing

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads when the write happened in native code: safetensors (Rust) and
# torch.save (C++) do not raise OSError.
_DISK_FULL_TEXT = ("No space left", "StorageFull", "code: 28", "Disk quota", "QuotaExceeded")


def write_failure(path: PathLike, error: BaseException) -> Optional[DataError]:
    """The one-line DataError for a write of ``path`` that failed with ``error`` (full disk,
    quota, read-only folder, ...), or None when ``error`` is not a failed write."""
    text = str(error)
    if isinstance(error, OSError):
        full = error.errno in _DISK_FULL_ERRNOS
        detail = os.strerror(error.errno) if full else (error.strerror or text)
    elif type(error).__name__ == "SafetensorError" or (
            isinstance(error, RuntimeError) and ("write failed" in text or "writing file" in text)):
        full = any(s in text for s in _DISK_FULL_TEXT)
        detail = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)[:200]
    else:
        return None
    if full:
        return DataError(f"{path}: disk full ({detail}); free space there and run again")
    return DataError(f"{path}: cannot write ({detail})")


@contextlib.contextmanager
def naming_write_errors(path: PathLike) -> Iterator[None]:
    """Re-raise a failed write inside (see ``write_failure``) as a one-line DataError naming ``path``."""
    try:
        yield
    except Exception as e:
        failure = write_failure(path, e)
        if failure is None:
            raise
        raise failure from None


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder, then rename: never a half file.

    If the write fails (full disk, kill signal turned into an exception), the temp
    file is removed, so a failure never keeps the disk full; a failed write is a
    DataError naming ``path`` (``write_failure``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_link(source: PathLike, path: PathLike) -> bool:
    """Make ``path`` a second name of the file ``source`` (a hard link made under a temporary
    name, then renamed over ``path``: never a half file, and an old ``path`` stays whole until
    then). False, and nothing changed, where the filesystem has no hard links (or the two are on
    different filesystems): the caller writes the file instead."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        return False
    try:
        os.replace(tmp, path)
    finally:  # also where ``path`` already was ``source``: rename() then leaves both names
        tmp.unlink(missing_ok=True)
    return True


def save_image(image, path: PathLike, quality: int = 92) -> None:
    """Write a PIL image atomically, JPEG or PNG by the file's suffix."""
    path = Path(path)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG", quality=quality)
    atomic_write_bytes(path, buffer.getvalue())


def read_bytes(path: PathLike, what: str) -> bytes:
    """A file's bytes; a missing file is a DataError naming it and what it should have been."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing {what}") from None


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
