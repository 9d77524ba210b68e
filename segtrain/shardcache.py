"""One copy of remote training shards per node: fetched once, shared by every process and loader worker.

The training batch order does not depend on the number of loader workers (exact resume), so
every worker of a rank reads the rank's whole share of the stream and decodes only its own
batches. Read straight from a remote manifest, that is W downloads of the share per epoch (W
loader workers), plus the shards that several ranks' shares overlap. With a ``NodeCache`` a
shard is downloaded once into a folder on the node's local disk, its sha256 checked against
the manifest on the way in (``integrity.fetch_verified``), and every reader on the node reads
that copy: the split is fetched once per node per epoch, or once per run when it fits.

* Where: ``$TMPDIR/segtrain-shards-<user>-<key>`` (``tempfile.gettempdir()``: node-local on
  clusters that set TMPDIR to local disk), ``key`` from the source's location, so the
  processes of a node find the same folder without talking to each other.
* Bounded: at most ``max_bytes`` of shards; older shards (least recently read) make room for
  newer ones, a shard larger than the bound is streamed as without a cache.
* Removed when the run ends: every iteration of a loader over the cache registers as a user
  (``using``); the last user to leave removes the folder. A user that died without leaving (a
  killed process) is recognised by its process id and does not keep the folder alive.
* Concurrency: a file lock per shard (``fcntl.flock``): the first reader downloads, the others
  wait for it and then read its copy; a lock for the folder guards eviction and the users.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import integrity
from .files import DataError

DEFAULT_GB = 20.0
HELP = ("local disk (GB, under $TMPDIR) for one copy per node of remote training shards, shared by its "
        "processes and loader workers and removed when the run ends; each shard is then fetched once per "
        "node per epoch (once per run if the split fits), not once per loader worker; 0 turns it off")
SUFFIX = ".tar"
_tokens = itertools.count()


@dataclass(frozen=True)
class NodeCache:
    """A node-local folder of verified shard copies; picklable (loader workers get it as a value)."""

    folder: Path
    max_bytes: int

    @classmethod
    def for_source(cls, location: str, max_gb: float) -> Optional["NodeCache"]:
        """The node's cache for the remote data at ``location`` (None when ``max_gb`` is 0)."""
        if max_gb <= 0:
            return None
        key = hashlib.sha256(location.encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"segtrain-shards-{os.getuid()}-{key}"
        return cls(folder, int(max_gb * 1e9))

    # ----------------------------------------------------------------------- reading

    def local(self, url: str, digest: Optional[str], size: Optional[int] = None) -> Optional[str]:
        """The path of this node's copy of ``url``, downloaded (and checked against ``digest``) by
        the first reader; None when the shard does not fit the bound (read it remotely)."""
        if size is not None and size > self.max_bytes:
            return None
        name = (digest or "url-" + hashlib.sha256(url.encode()).hexdigest()) + SUFFIX
        path = self.folder / name
        with _locked(self.folder / f".{name}.lock"):
            if path.is_file():
                os.utime(path)  # recently used: evicted last
                return str(path)
            with _locked(self.folder / ".folder.lock"):
                self._make_room(size or 0, keep=path)
            integrity.fetch_verified(url, path, digest)
            with _locked(self.folder / ".folder.lock"):
                self._make_room(0, keep=path)  # a shard of unknown size may have overshot the bound
        return str(path) if path.is_file() else None

    def _make_room(self, incoming: int, keep: Path) -> None:
        """Remove the least recently read shards until ``incoming`` more bytes fit the bound."""
        shards = sorted((p for p in self.folder.glob(f"*{SUFFIX}") if p != keep), key=_mtime)
        total = sum(_size(p) for p in shards) + (_size(keep) if keep.is_file() else 0)
        for old in shards:
            if total + incoming <= self.max_bytes:
                break
            total -= _size(old)
            old.unlink(missing_ok=True)  # readers that opened it keep reading their open file
        if keep.is_file() and total > self.max_bytes:
            keep.unlink()  # it alone exceeds the bound: the caller reads it remotely

    def nbytes(self) -> int:
        """Bytes of shards held now."""
        return sum(_size(p) for p in self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else 0

    # ----------------------------------------------------------------------- lifetime

    @contextlib.contextmanager
    def using(self) -> Iterator["NodeCache"]:
        """Hold the cache open while inside; the last user on the node to leave removes it."""
        token = self._join()
        try:
            yield self
        finally:
            self._leave(token)

    def _join(self) -> Path:
        token = self.folder / "users" / f"{os.getpid()}-{next(_tokens)}"
        with _locked(self.folder / ".folder.lock"):  # not while the last user removes the folder
            token.parent.mkdir(exist_ok=True)
            token.touch()
        _held.add((self, token))
        return token

    def _leave(self, token: Path) -> None:
        _held.discard((self, token))
        if not self.folder.is_dir():
            return
        with _locked(self.folder / ".folder.lock"):
            token.unlink(missing_ok=True)
            users = self.folder / "users"
            alive = [u for u in (users.iterdir() if users.is_dir() else ()) if _alive(u.name)]
            if not alive:
                shutil.rmtree(self.folder, ignore_errors=True)


_held: set[tuple[NodeCache, Path]] = set()


@atexit.register
def _leave_all() -> None:
    """A process that exits inside ``using`` (an exception mid-epoch, a stop signal) still leaves."""
    for cache, token in list(_held):
        if token.name.startswith(f"{os.getpid()}-"):  # never a forked worker's inherited entries
            cache._leave(token)


def _alive(user: str) -> bool:
    try:
        os.kill(int(user.split("-")[0]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process of that id: alive
        return True
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path``, recreated (with its folder) if the last user of the
    cache removed it meanwhile: a lock held on a removed file would lock nothing."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a")
        except FileNotFoundError:  # the folder went away between the two calls
            continue
        except OSError as e:
            raise DataError(f"{path.parent}: cannot use the node's shard cache ({e.strerror}); "
                            "pass --remote-cache-gb 0, or point TMPDIR at a writable folder") from None
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    with handle:
        yield


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
