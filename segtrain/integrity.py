"""Are the shards what they claim to be? Reading them safely, and checking them against the manifest.

One owner for:

* ``shard_samples(urls)``: the raw samples of webdataset tar shards, the one reader every
  loader uses. A truncated or corrupt tar (an interrupted copy, a bad download) is a
  one-line DataError naming the shard and the last good sample, never a
  ``tarfile.ReadError`` from deep inside webdataset. A plain tar must also end with
  the tar end-of-archive blocks, with nothing after the point where reading stopped:
  Python's tarfile takes a cut at a member boundary, or a damaged header, for the
  end of the archive and would silently give fewer samples.
* ``fetch_verified(url, dest, sha256)``: a remote shard downloaded to a local file, its
  sha256 checked on the way in (the node's shard cache, ``segtrain.shardcache``).
* ``verify_shards(manifest_path, manifest, mode)``: each shard's size, sha256 and sample
  count against the manifest, before training or evaluation uses them. ``once`` (the
  default) remembers each verified shard by (size, mtime) in a small JSON next to the
  manifest (``.voc-train.verified.json``; under the user's cache folder when the shard
  folder is read-only), so a re-run does not re-hash; ``always`` re-hashes every run;
  ``off`` skips it. ``verify_source`` does it once per machine in a distributed run.
* ``python tools/pack.py --verify shards/voc-train.json`` (``main`` here): hash and count
  every shard of a packed split, exit 0 when all match, 2 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Optional, Sequence

from .files import DataError, PathLike, atomic_write_bytes, user_cache_dir
from .sources import DataSource, read_manifest

VERIFY_MODES = ("off", "once", "always")
DEFAULT_VERIFY = "once"
VERIFY_HELP = ("check shards against the manifest's sha256 and sample counts before use: once (remember "
               "verified shards by size and mtime), always (re-hash every run) or off")

_TAR_END = 2 * 512  # a tar ends with two zero blocks (then zero padding to the record size)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
# What reading a damaged tar raises, from tarfile, the decompressors, the file or pipe, and
# webdataset's own grouping (duplicate member names).
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)


class _TrackedStream:
    """A read-only stream that remembers its last bytes, whether non-zero bytes were
    read after ``mark_end()``, and (optionally) hashes everything read."""

    def __init__(self, raw, hasher=None):
        self.raw, self.hasher = raw, hasher
        self.tail = b""
        self.compressed: Optional[bool] = None
        self.after_end_nonzero = False
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if self.compressed is None and data:
            self.compressed = data.startswith(_COMPRESSED_MAGIC)
        if self.hasher is not None:
            self.hasher.update(data)
        if self._ended and data.strip(b"\0"):
            self.after_end_nonzero = True
        self.tail = (self.tail + data)[-_TAR_END:]
        return data

    def mark_end(self) -> None:
        self._ended = True

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.raw.close()


def _reason(error: BaseException) -> str:
    # webdataset appends " @ <stream>" and the stream/url to the message; keep the cause.
    text = str(error.args[0]) if error.args else type(error).__name__
    return text.split(" @ ")[0].strip() or type(error).__name__


def _damaged(url: str, last: Optional[str], problem: str) -> DataError:
    where = f"after sample {last}" if last is not None else "before its first sample"
    return DataError(f"shard {url}: {problem} ({where}); copy it again or re-pack it with tools/pack.py")


def _stream_samples(url: str, stream: _TrackedStream, expected: Optional[int] = None) -> Iterator[dict]:
    """The samples of one opened shard, with every read failure named (see the module doc)."""
    from webdataset import tariterators

    last, count = None, 0
    files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
    try:
        for sample in tariterators.group_by_keys(files):
            last, count = sample["__key__"], count + 1
            yield sample
        stream.mark_end()
        stream.drain()
    except _READ_ERRORS as e:
        raise _damaged(url, last, f"truncated or corrupt tar: {_reason(e)}") from None
    if not stream.compressed and (stream.after_end_nonzero or stream.tail.strip(b"\0")):
        problem = ("unreadable data after the last readable sample (damaged tar header)"
                   if stream.after_end_nonzero else "truncated tar: no end-of-archive blocks")
        raise _damaged(url, last, problem)
    if expected is not None and count != expected:
        raise DataError(f"shard {url}: holds {count} samples, the manifest says {expected}; "
                        "re-pack it with tools/pack.py")


def shard_samples(urls: Iterable[str], expected: Optional[Mapping[str, int]] = None,
                  digests: Optional[Mapping[str, str]] = None,
                  fetch: Optional[Callable[[str, Optional[str]], Optional[str]]] = None) -> Iterator[dict]:
    """Raw webdataset samples (``__key__``, ``__url__``, one entry per member suffix) of
    ``urls`` in order. With ``expected`` (url -> sample count, from the manifest), a shard
    holding another number of samples is a DataError too. With ``digests`` (url -> sha256,
    for shards streamed from a remote manifest), the bytes are hashed as they are read and a
    shard read to its end with another sha256 is a DataError: verified in the one pass that
    reads it (a reader that stops early, e.g. at the end of its share, checks nothing). With
    ``fetch`` (``shardcache.NodeCache.local``: url, sha256 -> a local copy, checked when it was
    downloaded, or None), a shard is read from its local copy; messages still name the url."""
    from webdataset.gopen import gopen

    for url in urls:
        want = None if digests is None else digests.get(url)
        local = None if fetch is None else fetch(url, want)
        try:
            raw = gopen(local or url)
        except _READ_ERRORS as e:
            raise DataError(f"shard {url}: cannot open ({_reason(e)})") from None
        want = None if local else want  # a local copy was checked as it was downloaded
        stream = _TrackedStream(raw, hashlib.sha256() if want else None)
        try:
            yield from _stream_samples(url, stream, None if expected is None else expected.get(url))
            if want and stream.hasher.hexdigest() != want:
                raise _digest_differs(url, stream.hasher.hexdigest(), want)
        finally:
            try:
                stream.close()
            except _READ_ERRORS:  # a pipe: command that failed; its error was raised above
                pass


def _digest_differs(url: str, got: str, want: str) -> DataError:
    return DataError(f"shard {url}: sha256 {got[:12]}... differs from its manifest ({want[:12]}...): the file "
                     "changed or was damaged in transfer; upload it again or re-pack with tools/pack.py")


def fetch_verified(url: str, dest: Path, digest: Optional[str] = None) -> None:
    """Download ``url`` (a URL or a ``pipe:`` command) to ``dest`` atomically, its sha256 checked
    against ``digest`` on the way in: ``dest`` never holds bytes that differ from the manifest's."""
    from webdataset.gopen import gopen

    hasher = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        try:
            raw = gopen(url)
        except _READ_ERRORS as e:
            raise DataError(f"shard {url}: cannot open ({_reason(e)})") from None
        try:
            with open(tmp, "wb") as out:
                for chunk in iter(lambda: raw.read(1 << 20), b""):
                    hasher.update(chunk)
                    out.write(chunk)
        except _READ_ERRORS as e:
            raise DataError(f"shard {url}: download failed ({_reason(e)})") from None
        finally:
            try:
                raw.close()
            except _READ_ERRORS as e:  # curl or a pipe: command that exited with an error
                raise DataError(f"shard {url}: download failed ({_reason(e)})") from None
        if digest and hasher.hexdigest() != digest:
            raise _digest_differs(url, hasher.hexdigest(), digest)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- verification

def check_mode(mode: str) -> str:
    if mode not in VERIFY_MODES:
        raise DataError(f"verify_shards: must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    return mode


def _cache_paths(manifest_path: Path) -> list[Path]:
    """Where verified shards are remembered: next to the manifest, else the user's cache."""
    resolved = manifest_path.resolve()
    user_cache = user_cache_dir() / "verified"
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:16]
    return [resolved.with_name(f".{resolved.stem}.verified.json"), user_cache / f"{resolved.stem}-{key}.json"]


def _read_cache(manifest_path: Path) -> dict:
    for path in _cache_paths(manifest_path):
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cached, dict):
            return cached
    return {}


def _write_cache(manifest_path: Path, cache: dict) -> None:
    data = (json.dumps(cache, indent=1, sort_keys=True) + "\n").encode()
    for path in _cache_paths(manifest_path):
        try:
            atomic_write_bytes(path, data)
            return
        except DataError:  # read-only shard folder: try the user's cache folder
            continue
    warnings.warn(f"{manifest_path}: could not remember the verified shards (no writable cache folder); "
                  "they will be hashed again next time")


def hash_and_count(path: PathLike) -> tuple[str, int, Optional[str]]:
    """(sha256, samples, read problem or None) of a local shard, in one pass over its bytes."""
    stream = _TrackedStream(open(path, "rb"), hashlib.sha256())
    count, problem = 0, None
    try:
        for count, _ in enumerate(_stream_samples(str(path), stream), 1):
            pass
    except DataError as e:
        problem = str(e)
        stream.drain()
    finally:
        stream.close()
    return stream.hasher.hexdigest(), count, problem


def _shard_problem(path: Path, entry: Mapping, manifest_path: Path) -> tuple[Optional[str], Optional[dict]]:
    """(problem, cache record): what is wrong with one shard, or the record of a verified one."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"shard {path} listed in {manifest_path} does not exist", None
    expected_bytes, expected_sha, expected_samples = entry.get("bytes"), entry.get("sha256"), entry.get("samples")
    if expected_bytes is not None and size != expected_bytes:
        return (f"shard {path}: {size} bytes, but {manifest_path} says {expected_bytes} (truncated or "
                "replaced); copy it again or re-pack with tools/pack.py"), None
    digest, count, read_problem = hash_and_count(path)
    if expected_sha is not None and digest != expected_sha:
        return (f"shard {path}: sha256 {digest[:12]}... differs from {manifest_path} ({str(expected_sha)[:12]}...): "
                "the file changed or is damaged; copy it again or re-pack with tools/pack.py"), None
    if read_problem is not None:
        return read_problem, None
    if expected_samples is not None and count != expected_samples:
        return (f"shard {path}: holds {count} samples, but {manifest_path} says {expected_samples}; "
                "re-pack with tools/pack.py"), None
    return None, {"size": size, "sha256": digest, "samples": count}


def verify_shards(manifest_path: PathLike, manifest: Optional[dict] = None, mode: str = DEFAULT_VERIFY,
                  stop_at_first: bool = True) -> list[str]:
    """Check every shard of a manifest (size, sha256, sample count); see the module doc.

    Raises a DataError naming the first bad shard, or with ``stop_at_first=False``
    returns the problems of all bad shards (an empty list when all match).
    """
    check_mode(mode)
    if mode == "off":
        return []
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path) if manifest is None else manifest
    cached = _read_cache(manifest_path) if mode == "once" else {}
    verified, problems = {}, []
    for entry in manifest["shards"]:
        path = manifest_path.parent / entry["file"]
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        record = cached.get(entry["file"])
        if (stat is not None and isinstance(record, dict) and record.get("mtime_ns") == stat.st_mtime_ns
                and record.get("size") == stat.st_size == entry.get("bytes", stat.st_size)
                and record.get("sha256") == entry.get("sha256") and record.get("samples") == entry.get("samples")):
            verified[entry["file"]] = record
            continue
        problem, record = _shard_problem(path, entry, manifest_path)
        if problem is not None:
            if stop_at_first:
                raise DataError(problem)
            problems.append(problem)
        else:
            verified[entry["file"]] = record | {"mtime_ns": stat.st_mtime_ns}
    if verified != cached:
        _write_cache(manifest_path, verified)
    return problems


def verify_source(source: DataSource, mode: str) -> None:
    """``verify_shards`` for a ``DataSource`` that comes with a local manifest; others have
    nothing to verify against (their counts come from reading the shards), or are remote: their
    shards are checked while they stream in (``shard_samples(digests=...)``), never downloaded twice.

    In a distributed run (call it on every process: it is a collective) only each machine's
    first process (LOCAL_RANK 0) hashes and writes the cache, while the others wait: 8-16
    processes reading the whole dataset at once, over NFS on clusters, would each take as long
    as all of them. A problem found on any machine is raised on every process.
    """
    if source.manifest is None or source.digests is not None or not source.local:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        verify_shards(source.location, source.manifest, mode)
        return
    problem = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # per machine: other machines may hold other copies
        try:
            verify_shards(source.location, source.manifest, mode)
        except DataError as e:
            problem = str(e)
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)  # the others' barrier, and every machine's verdict
    found = next((p for p in problems if p is not None), None)
    if found is not None:
        raise DataError(found)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/pack.py --verify MANIFEST``: hash and count every shard; exit 0 if all match, else 2."""
    ap = argparse.ArgumentParser(prog="tools/pack.py --verify",
                                 description="Check a packed split's shards against its manifest.")
    ap.add_argument("--verify", required=True, metavar="MANIFEST", help="e.g. shards/voc-train.json")
    args, _ = ap.parse_known_args(argv)
    try:
        manifest = read_manifest(args.verify)
        problems = verify_shards(args.verify, manifest, "always", stop_at_first=False)
    except DataError as e:
        problems = [str(e)]
        manifest = None
    for problem in problems:
        print(f"segtrain: error: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"{args.verify}: all {len(manifest['shards'])} shards match (sha256 and sample counts, "
          f"{manifest['num_samples']} samples)")
    return 0
