"""Data sources: what one ``--data`` argument names, resolved once, and the shard manifest.

``data`` may be

* a shard manifest ``.../voc-train.json`` written by ``tools/pack.py`` (asking it for
  another split uses the sibling manifest, e.g. ``voc-val.json``, so one ``--data``
  serves training and evaluation), or a folder holding one ``*-{split}.json``;
* a remote manifest: ``https://host/data/voc-train.json``, or a ``pipe:`` command that
  prints one (``pipe:aws s3 cp s3://bucket/data/voc-train.json -``, ``pipe:gcloud storage
  cat gs://bucket/data/voc-train.json``). Its shards are read from next to it: the same
  URL, or the same command, with the shard's file name in place of the manifest's. The
  sample counts come from the manifest (no shard is read to count them), and each shard's
  sha256 is checked on the bytes as they stream in (``integrity.shard_samples``);
* a shard pattern: anything webdataset opens (``shards/voc-train-{000000..000005}.tar``,
  a URL, ``pipe:curl ...``); its sample count is counted once by reading the shards
  (``loaders.shard_sizes``);
* a VOC folder: ``VOCdevkit/VOC2012`` itself, or a folder holding ``VOCdevkit/VOC2012``
  or ``VOC2012``.

``resolve_data(data, split)`` turns it into a ``DataSource`` value: ``plan_run`` resolves the
training and validation data once and every consumer (the loaders, the dashboard config,
evaluate, report, sam, visualize) takes the value, never the string. What the labels mean
(classes, colours, the label lookup table) is the manifest's dataset spec
(``segtrain.datasets``); a VOC folder and a bare shard pattern carry no spec: they are read
as VOC. ``is_local`` is the one test of "is this on this machine's filesystem?".

The manifest (``read_manifest``/``parse_manifest``/``check_manifest``) is the packer's record of
a split: its shards (file, samples, bytes, sha256, ids), class names and counts.
"""
from __future__ import annotations

import functools
import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import voc
from .datasets import VOC, DatasetSpec, spec_from_manifest
from .files import DataError, PathLike


@dataclass(frozen=True)
class DataSource:
    """What a ``--data`` argument resolved to, for one split."""

    kind: str                        # "shards" or "folder"
    split: str
    location: str                    # for messages: manifest, pattern or folder
    urls: tuple[str, ...] = ()       # shard paths/URLs (kind == "shards")
    voc_root: Optional[Path] = None  # the VOC2012 folder (kind == "folder")
    manifest: Optional[dict] = None
    num_samples: Optional[int] = None  # None: a bare shard pattern, counted on demand
    shard_sizes: Optional[tuple[int, ...]] = None  # samples per shard, from the manifest
    spec: DatasetSpec = VOC          # what the labels mean (the manifest's; VOC without one)
    digests: Optional[tuple[str, ...]] = None  # remote manifests: sha256 per shard, checked while streaming

    def checks(self) -> Optional[dict[str, str]]:
        """url -> sha256 for ``integrity.shard_samples`` (remote manifests; local shards are verified up front)."""
        return dict(zip(self.urls, self.digests)) if self.digests is not None else None

    @property
    def local(self) -> bool:
        """Whether the data is on this machine's filesystem (``is_local`` of its location)."""
        return is_local(self.location)


def is_local(location: str) -> bool:
    """Whether data at ``location`` is on this machine's filesystem (not a URL or a ``pipe:`` command)."""
    return not location.startswith("pipe:") and "://" not in location


def _looks_like_shards(data: str) -> bool:
    return (data.startswith("pipe:") or "://" in data or "::" in data
            or bool(re.search(r"\{.*\}", data)) or data.endswith((".tar", ".tar.gz", ".tgz")))


def _find_voc_root(folder: Path) -> Optional[Path]:
    for root in (folder, folder / "VOCdevkit" / "VOC2012", folder / "VOC2012"):
        if (root / "JPEGImages").is_dir():
            return root
    return None


def _manifest_source(path: Path, split: Optional[str]) -> DataSource:
    manifest = read_manifest(path)
    split = split or manifest["split"]
    if manifest["split"] != split:
        # One --data for both splits: voc-train.json stands for its sibling voc-val.json.
        suffix = f"-{manifest['split']}.json"
        sibling = path.with_name(path.name[: -len(suffix)] + f"-{split}.json") \
            if path.name.endswith(suffix) else None
        if sibling is None or not sibling.is_file():
            raise DataError(f"{path}: manifest is for split {manifest['split']!r}, not {split!r}"
                            + (f", and {sibling} does not exist" if sibling else ""))
        return _manifest_source(sibling, split)
    urls = tuple(str(path.parent / shard["file"]) for shard in manifest["shards"])
    _check_local_shards(urls, str(path))
    return DataSource("shards", split, str(path), urls=urls, manifest=manifest,
                      num_samples=int(manifest["num_samples"]),
                      shard_sizes=tuple(shard["samples"] for shard in manifest["shards"]),
                      spec=spec_from_manifest(manifest, str(path)))


def _manifest_word(data: str) -> Optional[str]:
    """The manifest URL in a remote ``--data`` (the URL itself, or the ``pipe:`` command's
    ``.json`` argument); None when ``data`` names no remote manifest."""
    if data.startswith("pipe:"):
        words = [w for w in shlex.split(data[len("pipe:"):]) if w.endswith(".json")]
        return words[-1] if words else None
    return data if "://" in data and data.split("?")[0].endswith(".json") else None


def _next_to(data: str, name: str) -> str:
    """The file ``name`` next to the remote manifest of ``data`` (same URL folder, same command)."""
    word = _manifest_word(data)
    replaced = word.rsplit("/", 1)[0] + "/" + name if "/" in word else name
    if data.startswith("pipe:"):  # rebuild the command with the one argument replaced
        words = shlex.split(data[len("pipe:"):])
        index = len(words) - 1 - words[::-1].index(word)
        return "pipe:" + shlex.join(words[:index] + [replaced] + words[index + 1:])
    return replaced


@functools.lru_cache(maxsize=32)
def _fetch_manifest(data: str) -> dict:
    """A remote manifest, read once per process (webdataset's gopen: curl for http(s), the shell for pipe:)."""
    from webdataset.gopen import gopen

    try:
        with gopen(data) as stream:
            text = stream.read()
    except (OSError, ValueError) as e:
        raise DataError(f"{data}: cannot read the manifest ({str(e).splitlines()[0] if str(e) else e!r})") from None
    return parse_manifest(text, data)


def _remote_manifest_source(data: str, split: Optional[str]) -> DataSource:
    manifest = _fetch_manifest(data)
    split = split or manifest["split"]
    if manifest["split"] != split:  # as for a local manifest: its sibling for the other split
        name = _manifest_word(data).rsplit("/", 1)[-1]
        suffix = f"-{manifest['split']}.json"
        if not name.endswith(suffix):
            raise DataError(f"{data}: manifest is for split {manifest['split']!r}, not {split!r}")
        return _remote_manifest_source(_next_to(data, name[: -len(suffix)] + f"-{split}.json"), split)
    urls = tuple(_next_to(data, shard["file"]) for shard in manifest["shards"])
    digests = tuple(shard.get("sha256") for shard in manifest["shards"])
    return DataSource("shards", split, data, urls=urls, manifest=manifest, num_samples=int(manifest["num_samples"]),
                      shard_sizes=tuple(shard["samples"] for shard in manifest["shards"]),
                      spec=spec_from_manifest(manifest, data), digests=digests if all(digests) else None)


def _check_local_shards(urls: Iterable[str], where: str) -> None:
    for url in urls:
        if is_local(url) and not Path(url).is_file():
            raise DataError(f"{where}: shard {url} does not exist")


def resolve_data(data: str | Path, split: Optional[str] = None, default: str = "train") -> DataSource:
    """Turn a ``--data`` argument (manifest, shard pattern or VOC folder) into the source of ``split``.

    ``split`` None: the split a manifest ``data`` names (``--data voc-train_aug.json`` means
    train_aug, never silently its ``voc-train.json`` sibling), ``default`` for other data.
    """
    text = str(data)
    path = Path(text)
    if _manifest_word(text) is not None:
        return _remote_manifest_source(text, split)
    if text.endswith(".json"):
        return _manifest_source(path, split)
    split = split or default
    if path.is_dir():
        root = _find_voc_root(path)
        if root is not None:
            num = len(voc.read_split(root, split))
            return DataSource("folder", split, str(root), voc_root=root, num_samples=num)
        manifests = sorted(path.glob(f"*-{split}.json"))
        if len(manifests) == 1:
            return _manifest_source(manifests[0], split)
        if len(manifests) > 1:
            raise DataError(f"{path}: several shard manifests for split {split!r} "
                            f"({', '.join(m.name for m in manifests)}); pass one of them")
        raise DataError(f"{path}: folder holds neither VOCdevkit/VOC2012 (with JPEGImages) "
                        f"nor a shard manifest NAME-{split}.json")
    if _looks_like_shards(text):
        from webdataset.shardlists import expand_urls

        urls = tuple(expand_urls(text))
        _check_local_shards(urls, text)
        return DataSource("shards", split, text, urls=urls)
    raise DataError(f"{text}: not a shard manifest (.json), a shard pattern (.tar, "
                    "{a..b}, URL, pipe:) or a VOCdevkit folder"
                    + (" (no such file or folder)" if not path.exists() else ""))


def class_names(source: DataSource) -> Optional[list[str]]:
    """The data's class names (its dataset spec's: the manifest's, VOC's for a VOC folder); None for
    bare shards, which do not say (they are read as VOC, but may hold anything)."""
    return list(source.spec.classes) if source.manifest is not None or source.kind == "folder" else None


# --------------------------------------------------------------------------- manifests

MANIFEST_FORMAT = "segtrain-shards/1"
REQUIRED_KEYS = ("format", "split", "num_samples", "shards", "class_names", "class_pixel_counts",
                 "class_image_counts", "ignore_pixel_count", "labelled_pixel_count")


def read_manifest(path: PathLike) -> dict:
    """Read and check a manifest written by the packer; errors name the file and the problem."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found (tools/pack.py writes shards/voc-SPLIT.json)") from None
    return parse_manifest(text, str(path))


def parse_manifest(text: bytes | str, where: str) -> dict:
    """A manifest's JSON text (read from a file, a URL or a command), checked; errors name ``where``."""
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not a JSON manifest ({e})") from None
    check_manifest(manifest, where)
    return manifest


def check_manifest(manifest: dict, where: str = "manifest") -> None:
    """Raise DataError, naming ``where``, unless the manifest is complete and consistent."""
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{where}: not a segtrain shard manifest (format {manifest.get('format')!r}, "
                        f"expected {MANIFEST_FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{where}: manifest lacks {', '.join(missing)}")
    if not manifest["shards"]:
        raise DataError(f"{where}: manifest lists no shards")
    # The loaders cut each epoch out of the shards by these counts: they must be right.
    sizes = [shard.get("samples") if isinstance(shard, dict) else None for shard in manifest["shards"]]
    if not all(isinstance(size, int) and size >= 0 for size in sizes):
        raise DataError(f"{where}: every shard in the manifest needs a sample count (\"samples\")")
    if sum(sizes) != manifest["num_samples"]:
        raise DataError(f"{where}: shard sample counts add up to {sum(sizes)}, "
                        f"but num_samples is {manifest['num_samples']}")
    num_classes = len(manifest["class_names"])
    for key in ("class_pixel_counts", "class_image_counts"):
        counts = manifest[key]
        if not isinstance(counts, list) or len(counts) != num_classes:
            raise DataError(f"{where}: {key} must list {num_classes} counts, one per class name")
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise DataError(f"{where}: {key} must hold non-negative integers")
    if sum(manifest["class_pixel_counts"]) != manifest["labelled_pixel_count"]:
        raise DataError(f"{where}: class_pixel_counts sum to {sum(manifest['class_pixel_counts'])}, "
                        f"but labelled_pixel_count is {manifest['labelled_pixel_count']}")
    if max(manifest["class_image_counts"], default=0) > manifest["num_samples"]:
        raise DataError(f"{where}: a class_image_counts entry exceeds num_samples ({manifest['num_samples']})")
