"""The loaders: batches from a resolved ``DataSource`` (``segtrain.sources``).

Every loader takes the ``DataSource`` value (``sources.resolve_data(data, split)``, which
``plan_run`` does once per run), never the ``--data`` string. Shards are read through
``integrity.shard_samples`` (a damaged tar or a sha256 that differs is a one-line DataError);
the labels are mapped through the source's dataset spec (``datasets.decode_label``).

Training (``train_loader``) gives every rank exactly ``steps_per_epoch`` batches of
exactly ``batch_size`` samples, whatever the shard count, and is a pure function of
``(data, seed, epoch, rank, world_size)``: not of the number of loader workers, so a run
resumed on a machine with other cores continues exactly; a resumed run rebuilds the
loader at its epoch and batch (``skip``). An epoch is one sample stream: the shards in a
seeded permutation, concatenated (pass after pass of fresh permutations if the data holds
fewer samples than the epoch needs). The epoch takes the stream's first ``steps x
batch_size x world_size`` samples, cut into contiguous ranges, one per rank, so every
sample is drawn at most once per epoch and only the remainder (``num_samples mod`` the
global batch) is left out, a different one each epoch. A rank's range is cut into windows
of ~256 samples, each dealt into batches by a seeded permutation (seed, epoch, rank,
window): batch ``b`` is fixed before any worker exists. DataLoader worker ``w`` of ``W``
makes batches ``w, w + W, ...``: it reads the rank's range once (opening only the shards it
overlaps, skipping earlier samples undecoded) and decodes only its own batches' samples.
Augmentation draws from a per-sample seed (seed, epoch, rank, position), never from the
global RNG: reproducible, and the caller's RNG is left alone. ``endless=True`` gives epoch
after epoch from one loader, whose workers start once per run, not once per epoch. Do
not hand these loaders to ``accelerator.prepare`` (they are already split per rank).

Evaluation (``val_loader``) gives every sample to exactly one rank, once, split by
sample: each rank takes a contiguous range of the split's samples (``val_share``; folder
ids ``rank::world_size``), the ranks' counts within one of each other, whatever the shard
count. Nothing is resampled, the last batch may be partial and a rank gets nothing when
there are fewer samples than ranks, so run the forward passes on the unwrapped model
(DDP's forward syncs buffers and would hang) and sum the per-rank confusion matrices
once, after the loop.

Batches are ``(images (N, 3, H, W), masks (N, H, W), ids list[str])``. Training batches
stay uint8, images and masks alike: a quarter of the bytes to copy between processes
and to the accelerator; the training loop calls ``transforms.normalize(images)`` and
``masks.long()`` on the device. Evaluation batches are ready to use: normalised
float32 images, int64 masks.
"""
from __future__ import annotations

import atexit
import functools
import itertools
import multiprocessing
import re
import signal
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import PIL.Image
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info
from torchvision.transforms.v2 import functional as F

from . import integrity
from .datasets import IGNORE_INDEX, DatasetSpec, VOCSegmentation, decode_label, load_pair
from .files import DataError, read_bytes
from .shardcache import NodeCache
from .sources import DataSource
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PairTransform, normalize, train_transforms, val_transforms

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]

# Samples of the stream shuffled together (a window): large enough to mix the samples of
# several shards; a worker holds at most its own batches' share of one window undecoded
# (~100 kB a sample for VOC). A batch is drawn from one window.
RAW_SHUFFLE_BUFFER = 256


@functools.lru_cache(maxsize=None)
def _count_shard_samples(urls: tuple[str, ...]) -> tuple[int, ...]:
    """Samples per shard for shards that come without a manifest (read once per process)."""
    return tuple(sum(1 for _ in _raw_shard_samples([url])) for url in urls)


def shard_sizes(source: DataSource) -> tuple[int, ...]:
    """Samples per shard: the manifest's, else counted by reading the shards once per process."""
    return source.shard_sizes if source.shard_sizes is not None else _count_shard_samples(source.urls)


def batches_per_epoch(source: DataSource, batch_size: int, world_size: int) -> int:
    """Batches of ``batch_size`` that ``train_loader`` gives each of ``world_size`` ranks per epoch."""
    num_samples = sum(shard_sizes(source)) if source.kind == "shards" else source.num_samples
    if num_samples == 0:
        raise DataError(f"{source.location}: no {source.split} samples to train on")
    return _steps(num_samples, Layout(world_size, batch_size))


@dataclass(frozen=True)
class Layout:
    """How the samples of an epoch are dealt: to ``world_size`` processes, ``batch_size`` each per
    batch. A resume on another number of processes changes it and keeps the global batch
    (segtrain.plan); ``train_loader(layouts=...)`` then continues the epoch it interrupted."""

    world_size: int
    batch_size: int

    @property
    def samples(self) -> int:
        """Global samples per batch index (all ranks together)."""
        return self.world_size * self.batch_size


def _steps(num_samples: int, layout: Layout) -> int:
    return max(1, num_samples // layout.samples)


def _resolve_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if rank is None or world_size is None or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _loader_worker_init(worker_id: int) -> None:
    """Loader workers ignore the stop signals: those are the training process's to handle
    (segtrain/preempt.py), and a cluster that signals every process of a job must not kill a
    worker first. A worker still ends with its loader, or when its parent process dies or
    exits (``_end_loader_workers``), and at once when the parent is killed (``kill -9``, the OOM
    killer): otherwise it lives on for seconds and prints the tracebacks of its broken pipes."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@atexit.register  # after multiprocessing's own exit handler was registered: so it runs before it
def _end_loader_workers() -> None:
    """At exit, multiprocessing ends its daemonic children (DataLoader workers) with SIGTERM and
    waits for them; workers that ignore SIGTERM would keep a process that left a loader running
    (a run that raised mid-epoch, a notebook) waiting forever. End them first, with SIGKILL."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def _mix(*words: int) -> int:
    """A well-mixed 32-bit seed from a few integers (seed, epoch, rank, ...)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0])


# --------------------------------------------------------------------------- decoding

def decode_sample(jpeg: bytes, png: bytes, name: str, spec: DatasetSpec) -> tuple[torch.Tensor, np.ndarray]:
    """Image (JPEG or PNG) + label PNG bytes -> (uint8 (3, H, W) tensor, uint8 (H, W) class
    indices mapped through ``spec``'s label table), checked.

    PIL decodes the JPEG: torchvision.io.decode_jpeg is ~20% faster on VOC-sized
    images (bench/loader_bench.py) but deprecated since torchvision 0.29, and the
    decode is a small share of a training sample's cost.
    """
    image, label = load_pair(jpeg, png, name, spec)
    return F.pil_to_tensor(image), label


# Sample keys come from tar member names and become output file names (predictions,
# SAM masks): only plain ids, never a path.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def _shard_pair(sample: dict) -> tuple[str, bytes, bytes, str]:
    """(id, image, label png, name for messages) from a webdataset sample dict.

    A JPEG image and its label are ``jpg`` + ``png``; a PNG image and its label are
    ``png`` + ``label.png`` (see ``segtrain.pack``)."""
    sid, url = sample["__key__"], sample.get("__url__", "?")
    if not _PLAIN_ID.fullmatch(sid):
        raise DataError(f"shard {url}: sample key {sid!r} is not a plain id "
                        "(letters, digits, '_', '-', '.', not starting with '.')")
    name = f"sample {sid} in shard {url}"
    if "label.png" in sample and "png" in sample:
        return sid, sample["png"], sample["label.png"], name
    if "jpg" not in sample or "png" not in sample:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"{name}: needs {sid}.jpg and {sid}.png (or {sid}.png and {sid}.label.png) "
                        f"members, has {have}")
    return sid, sample["jpg"], sample["png"], name


def _raw_shard_samples(urls: Iterable[str], expected: Optional[dict[str, int]] = None,
                       digests: Optional[dict[str, str]] = None, fetch: Optional[_Fetch] = None) -> Iterator[dict]:
    # The one shard reader: a truncated or corrupt tar is a DataError naming the shard.
    return integrity.shard_samples(urls, expected, digests, fetch)


class _Fetch:
    """url, sha256 -> this node's copy of a remote shard (``NodeCache.local``, with the size the
    manifest gives, so room is made before the download); a value loader workers receive."""

    def __init__(self, cache: NodeCache, source: DataSource) -> None:
        self.cache = cache
        shards = source.manifest["shards"] if source.manifest else ()
        self.bytes = {url: shard.get("bytes") for url, shard in zip(source.urls, shards)}

    def __call__(self, url: str, digest: Optional[str]) -> Optional[str]:
        return self.cache.local(url, digest, self.bytes.get(url))


class _UsingCache:
    """A loader whose iterations hold the node's shard cache open (``NodeCache.using``): the
    last process on the node to finish its pass over the data removes the cache."""

    def __init__(self, loader: DataLoader, cache: NodeCache) -> None:
        self.loader, self.cache = loader, cache

    def __iter__(self) -> Iterator[Batch]:
        with self.cache.using():
            batches = iter(self.loader)
            try:
                yield from batches
            finally:
                # The workers end before this process leaves the cache: after an error the traceback
                # keeps the iterator (and its workers) alive, and a worker still fetching would make
                # the folder again after the last user removed it.
                shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-worker iterator
                if shutdown is not None:
                    shutdown()

    def __len__(self) -> int:
        return len(self.loader)


def _seeded(transform: PairTransform, image, mask, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``transform`` with its own RNG stream, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        # Seed only the CPU generator: torch.manual_seed also queues seeds for every
        # accelerator backend, recording a stack trace each time (~1 ms per call).
        torch.default_generator.manual_seed(seed)
        return transform(image, mask)


def _stack(samples: list[tuple[torch.Tensor, torch.Tensor, str]]) -> Batch:
    # default_collate stacks straight into shared memory inside a DataLoader worker,
    # saving the copy that sending a batch to the main process would otherwise cost.
    images, masks, ids = default_collate(samples)
    return images, masks, ids


def pad_collate(samples: list[tuple[torch.Tensor, torch.Tensor, str]],
                mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Batch:
    """Normalise (with the model's ``mean``/``std``) and batch uint8 samples of different sizes.

    Pads bottom/right: images with 0 (after normalisation, i.e. the mean colour),
    masks with 255 so padding never counts.
    """
    height = max(image.shape[1] for image, _, _ in samples)
    width = max(image.shape[2] for image, _, _ in samples)
    images = torch.zeros(len(samples), 3, height, width)
    masks = torch.full((len(samples), height, width), IGNORE_INDEX, dtype=torch.long)
    for i, (image, mask, _) in enumerate(samples):
        images[i, :, : image.shape[1], : image.shape[2]] = normalize(image, mean, std)
        masks[i, : mask.shape[0], : mask.shape[1]] = mask
    return images, masks, [sid for _, _, sid in samples]


# --------------------------------------------------------------------------- training

def _window(batch_size: int) -> int:
    """Samples per shuffle window: whole batches, at least RAW_SHUFFLE_BUFFER."""
    return batch_size * max(1, -(-RAW_SHUFFLE_BUFFER // batch_size))


def _deal(count: int, batch_size: int, window: int, batches: Iterable[int],
          seed_of: Callable[[int], int]) -> dict[int, list[int]]:
    """Which of ``count`` samples (indices, in stream order) make each of ``batches``: window ``k``
    (``window`` samples, whole batches) is dealt by a permutation seeded ``seed_of(k)``."""
    per_window, orders, members = window // batch_size, {}, {}
    for b in batches:
        k = b // per_window
        if k not in orders:
            orders[k] = np.random.default_rng(seed_of(k)).permutation(min(window, count - k * window)) + k * window
        members[b] = orders[k][(b - k * per_window) * batch_size:][:batch_size].tolist()
    return members


def _layout_shares(num_samples: int, seed: int, epoch: int, layouts: Sequence[tuple[int, Layout]],
                   taken: int) -> tuple[list[Sequence[int]], int, tuple[int, ...]]:
    """The ranks' shares of ``epoch`` under the last of ``layouts`` ((global sample of the epoch it
    began at, Layout), the first at 0) when the epoch has ``taken`` global samples: per rank the
    stream positions in dealing order; the batch index of a share's first sample; the seeds' salt.

    The first layout deals the epoch as always (rank r: the r-th contiguous range of the stream).
    Each later one takes what the layouts before it had not drawn, in stream order, cut into one
    contiguous part per rank and dealt by its own seeded windows: no sample of the epoch is drawn
    twice or left out, whatever the process counts were."""
    layout = layouts[0][1]
    size = _steps(num_samples, layout) * layout.batch_size
    shares: list[Sequence[int]] = [range(r * size, (r + 1) * size) for r in range(layout.world_size)]
    first, salt = 0, ()
    for i, (start, following) in enumerate(layouts[1:], 1):
        if start % layout.samples or start % following.samples or taken % following.samples:
            raise ValueError(f"layouts {layout} and {following} do not share the batch boundary {start}")
        rest: set[int] = set()
        for rank, share in enumerate(shares):
            members = _deal(len(share), layout.batch_size, _window(layout.batch_size),
                            range(start // layout.samples - first, taken // layout.samples - first),
                            lambda k: _mix(seed, epoch, rank, k, *salt))
            rest.update(share[j] for j in itertools.chain(*members.values()))
        remaining, part = sorted(rest), len(rest) // following.world_size
        shares = [remaining[r * part:(r + 1) * part] for r in range(following.world_size)]
        layout, first, salt = following, start // following.samples, (following.world_size, i)
    return shares, first, salt


def _shard_cycle(num_shards: int, seed: int, epoch: int) -> Iterator[int]:
    """The epoch's endless shard order: pass after pass, each a seeded permutation of all shards."""
    for rnd in itertools.count():
        yield from np.random.default_rng([seed, epoch, rnd]).permutation(num_shards).tolist()


def _stream_range(urls: tuple[str, ...], sizes: tuple[int, ...], order: Iterable[int],
                  start: int, end: int, digests: Optional[dict[str, str]] = None,
                  fetch: Optional[_Fetch] = None) -> Iterator[dict]:
    """Raw samples ``[start, end)`` of the stream that concatenates the shards in ``order``.

    Opens only the shards that overlap the range; the samples before ``start`` in the
    first one are read (a tar stream cannot seek) but never decoded. A shard needed to its
    last sample is read to its end, so that its count and its ``digests`` entry (remote shards)
    are checked.
    """
    offset = 0
    for index in order:
        if offset >= end:
            return
        size = sizes[index]
        if offset + size > start:
            skip, stop = max(start - offset, 0), min(end - offset, size)
            count = 0
            # Read to its end, a shard is also counted (more or fewer samples than `sizes` say is an
            # error) and, for remote shards, its streamed bytes checked against their sha256 `digests`.
            full = stop == size
            reader = _raw_shard_samples([urls[index]], {urls[index]: size} if full else None, digests, fetch=fetch)
            raw = reader if full else itertools.islice(reader, stop)
            for count, sample in enumerate(raw, 1):
                if count > skip:
                    yield sample
            if count < stop:  # a short shard would leave this rank with fewer batches: DDP hangs
                raise DataError(f"shard {urls[index]}: ends after {count} samples, expected {size}")
        offset += size


class _EpochBatches(IterableDataset):
    """One rank's training batches, epoch after epoch, from batch ``skip`` of ``epoch`` on, the
    first ``take`` batches of each epoch (all ``steps`` by default); one epoch unless ``endless``,
    which goes on until ``last_epoch`` (if given: a worker never reads ahead into an epoch the run
    will not train, which for remote shards would fetch them all once more).

    Batch ``b`` of an epoch is a function of (seed, epoch, rank, b) alone (``_batches``);
    DataLoader worker ``w`` of ``W`` makes the batches ``w, w + W, ...`` of the sequence (the
    DataLoader takes its workers' batches in turn), so the sequence does not depend on the
    number of workers, and one loader (its workers started once) serves the whole run.
    """

    def __init__(self, batch_size: int, steps: int, seed: int, epoch: int, rank: int, skip: int = 0,
                 take: Optional[int] = None, endless: bool = False, last_epoch: Optional[int] = None,
                 layouts: Sequence[tuple[int, Layout]] = ()):
        super().__init__()
        self.batch_size, self.steps, self.seed, self.epoch, self.rank = batch_size, steps, seed, epoch, rank
        self.skip, self.take, self.endless = skip, steps if take is None else take, endless
        self.last_epoch, self.layouts = last_epoch, tuple(layouts)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        done = 0  # batches of the sequence before this epoch's first
        epochs = (itertools.count(self.epoch) if self.last_epoch is None else range(self.epoch, self.last_epoch + 1))
        for epoch in epochs if self.endless else (self.epoch,):
            wanted = range(self.skip if epoch == self.epoch else 0, self.take)
            mine = [b for n, b in enumerate(wanted, done) if n % num_workers == worker]
            done += len(wanted)
            if mine:
                yield from self._batches(epoch, mine)

    def _batches(self, epoch: int, batches: list[int]) -> Iterator[Batch]:
        raise NotImplementedError


class _TrainShardStream(_EpochBatches):
    """Training batches from shards. The rank's share of the epoch's stream (see the module doc)
    is cut into windows of ``window`` samples (a multiple of the batch); a seeded permutation of
    each window (seed, epoch, rank, window) deals its samples into batches. A worker reads the
    rank's share once, in order, keeps undecoded only the samples of its own batches, and
    decodes a batch when it has all of them: the reading is repeated per worker (raw tar
    reads, cheap next to decoding and augmenting; remote shards come from the node's copy,
    ``fetch``), the decoding never."""

    def __init__(self, urls: tuple[str, ...], sizes: tuple[int, ...], transform: PairTransform,
                 batch_size: int, steps: int, seed: int, epoch: int, rank: int, spec: DatasetSpec,
                 digests: Optional[dict[str, str]] = None, fetch: Optional[_Fetch] = None, world_size: int = 1,
                 **span):
        super().__init__(batch_size, steps, seed, epoch, rank, **span)
        self.urls, self.sizes, self.transform, self.spec, self.digests = urls, sizes, transform, spec, digests
        self.fetch, self.layout = fetch, Layout(world_size, batch_size)
        self.window = _window(batch_size)

    def _batches(self, epoch: int, batches: list[int]) -> Iterator[Batch]:
        positions, first, salt = self._share(epoch)
        local = [b - first for b in batches]  # batch indices within the share
        members = _deal(len(positions), self.batch_size, self.window, local,
                        lambda k: _mix(self.seed, epoch, self.rank, k, *salt))
        per_window = self.window // self.batch_size
        lo = local[0] // per_window * self.window  # whole windows, as the dealing cuts them
        hi = min((local[-1] // per_window + 1) * self.window, len(positions))
        wanted = {positions[i] for i in itertools.chain(*members.values())}
        start = position = positions[lo]
        raw = iter(_stream_range(self.urls, self.sizes, _shard_cycle(len(self.urls), self.seed, epoch),
                                 start, positions[hi - 1] + 1, self.digests, self.fetch))
        kept = {}
        for j in local:
            while position <= max(positions[i] for i in members[j]):  # read on (undecoded) to its last sample
                sample = next(raw)
                if position in wanted:
                    kept[position] = sample
                position += 1
            yield _stack([self._augment(kept.pop(positions[i]), _mix(self.seed, epoch, self.rank, i, *salt))
                          for i in members[j]])
        for _ in raw:  # read the range to its end: a shard ending there is counted and its sha256 checked
            pass

    def _share(self, epoch: int) -> tuple[Sequence[int], int, tuple[int, ...]]:
        """This rank's samples of ``epoch`` (positions in the epoch's stream, in dealing order), the
        batch index of its first sample, and the words that salt its seeds: normally the rank's
        contiguous range of the stream; in an epoch that other process layouts began
        (``layouts``), what they had not drawn (``_layout_shares``)."""
        if epoch != self.epoch or len(self.layouts) < 2:
            share = self.steps * self.batch_size
            return range(self.rank * share, (self.rank + 1) * share), 0, ()
        if self.layouts[-1][1] != self.layout:
            raise ValueError(f"the last of layouts {self.layouts} must be this loader's {self.layout}")
        shares, first, salt = _layout_shares(sum(self.sizes), self.seed, epoch, self.layouts,
                                             self.take * self.layout.samples)
        return shares[self.rank], first, salt

    def _augment(self, sample: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        sid, jpeg, png, name = _shard_pair(sample)
        image, mask = _seeded(self.transform, *decode_sample(jpeg, png, name, self.spec), seed)
        return image, mask, sid


class _TrainFolderBatches(_EpochBatches):
    """Training batches from a VOC folder: seeded permutations of all ids (the same on every
    rank) dealt ``rank::world_size``; sample ``i`` of the rank's epoch is augmented from its own
    seed. More than one pass only when the data holds fewer than world_size x batch_size."""

    def __init__(self, dataset: VOCSegmentation, transform: PairTransform, world_size: int,
                 batch_size: int, steps: int, seed: int, epoch: int, rank: int, spec: DatasetSpec, **span):
        super().__init__(batch_size, steps, seed, epoch, rank, **span)
        self.dataset, self.transform, self.world_size, self.spec = dataset, transform, world_size, spec

    def _batches(self, epoch: int, batches: list[int]) -> Iterator[Batch]:
        needed = self.steps * self.batch_size * self.world_size
        passes = -(-needed // len(self.dataset))
        order = np.concatenate([np.random.default_rng([self.seed, epoch, p]).permutation(len(self.dataset))
                                for p in range(passes)])
        samples = _FolderSamples(self.dataset, order[self.rank:needed:self.world_size].tolist(), self.transform,
                                 self.spec, seed=_mix(self.seed, epoch, self.rank))
        for b in batches:
            yield _stack([samples[i] for i in range(b * self.batch_size, (b + 1) * self.batch_size)])


class _FolderSamples(Dataset):
    """Map-style view of chosen VOC folder samples, decoded and transformed.

    With ``seed`` set, sample ``i`` is augmented from its own seed (seed, i): the
    result does not depend on which DataLoader worker loads it.
    """

    def __init__(self, dataset: VOCSegmentation, indices: list[int], transform: PairTransform,
                 spec: DatasetSpec, seed: Optional[int] = None):
        self.dataset, self.indices, self.transform, self.seed = dataset, indices, transform, seed
        self.spec = spec

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        index = self.indices[i]
        sid = self.dataset.ids[index]
        image, mask = decode_sample(*self.dataset.load_raw(index), f"{sid} in {self.dataset.root}", self.spec)
        if self.seed is None:
            image, mask = self.transform(image, mask)
        else:
            image, mask = _seeded(self.transform, image, mask, _mix(self.seed, i))
        return image, mask, sid


# Loader arguments the batch sequence does not depend on: a resume may change them (another
# machine's cores, another device); every other train_loader argument is its data order.
ORDER_FREE = ("num_workers", "pin_memory", "node_cache_gb")


def train_loader(source: DataSource, batch_size: int, crop_size: int, *, num_workers: int = 2, seed: int = 0,
                 epoch: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None,
                 color_jitter: bool = False,
                 scale: tuple[float, float] = (0.5, 2.0), pin_memory: bool = False, skip: int = 0,
                 take: Optional[int] = None, endless: bool = False, last_epoch: Optional[int] = None,
                 node_cache_gb: float = 0.0,
                 layouts: Sequence[tuple[int, Layout]] = ()) -> tuple[Iterable[Batch], int]:
    """Augmented uint8 training batches of ``source`` for this rank and epoch, and the number of steps.

    ``batch_size`` is per process. Every rank yields exactly ``steps_per_epoch =
    max(1, num_samples // (world_size * batch_size))`` batches of exactly
    ``batch_size`` samples, the same whatever ``num_workers``. Iterating the loader again
    replays the same batches. ``skip`` starts at that batch of ``epoch``; ``take`` uses only the
    first ``take`` batches of each epoch; ``endless`` goes on epoch after epoch in one loader
    (its workers started once), up to ``last_epoch`` if given: ``train()`` resumes with ``epoch``
    and ``skip``. ``pin_memory`` (for CUDA) makes ``.to(device, non_blocking=True)``
    asynchronous. Normalise the images (``transforms.normalize``) and cast the masks to int64 on
    the device that uses them. ``node_cache_gb`` > 0 reads remote shards through one copy per node
    (``shardcache``): each is fetched once per node per epoch, not once per loader worker, and the
    batches stay the same.

    ``layouts``: when resumes on other numbers of processes (the same global batch) changed the
    layout within ``epoch``, each ``(global sample of the epoch it began at, Layout)``, the first at 0
    and this loader's own last: the rest of that epoch is the samples the earlier layouts had not
    drawn (none twice, none left out), dealt to this one; later epochs are this layout's own. A
    folder's epoch order is already one for every layout (rank ``r`` takes samples
    ``r::world_size`` of one permutation of the ids), so it continues as it is.
    """
    rank, world_size = _resolve_rank(rank, world_size)
    steps = batches_per_epoch(source, batch_size, world_size)
    transform = train_transforms(crop_size, scale=scale, color_jitter=color_jitter, normalize=False)
    span = dict(skip=skip, take=take, endless=endless, last_epoch=last_epoch, layouts=layouts)
    if source.kind == "folder":
        dataset = VOCSegmentation(source.voc_root, source.split)
        batches = _TrainFolderBatches(dataset, transform, world_size, batch_size, steps, seed, epoch, rank,
                                      source.spec, **span)
    else:
        cache = None if source.local else NodeCache.for_source(source.location, node_cache_gb)
        batches = _TrainShardStream(source.urls, shard_sizes(source), transform, batch_size, steps, seed, epoch,
                                    rank, source.spec, source.checks(), cache and _Fetch(cache, source),
                                    world_size=world_size, **span)
    # batch_size=None: the workers batch (into shared memory) and the DataLoader passes their
    # batches through. A worker beyond `steps` would have no batch to make. The workers' base
    # seed would come from the global RNG without a generator (nothing here draws from it).
    generator = torch.Generator().manual_seed(_mix(seed, epoch, rank, 1))
    loader = DataLoader(batches, batch_size=None, num_workers=min(num_workers, steps), generator=generator,
                        pin_memory=pin_memory, worker_init_fn=_loader_worker_init)
    fetch = getattr(batches, "fetch", None)
    return (loader if fetch is None else _UsingCache(loader, fetch.cache)), steps


# --------------------------------------------------------------------------- evaluation

def _decode_val(sample: dict, transform: PairTransform, spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor, str]:
    sid, jpeg, png, name = _shard_pair(sample)
    image, mask = transform(*decode_sample(jpeg, png, name, spec))
    return image, mask, sid


def val_loader(source: DataSource, *, batch_size: int = 1, num_workers: int = 1,
               protocol: str = "whole", crop_size: int = 513, rank: Optional[int] = None,
               world_size: Optional[int] = None, mean: tuple[float, ...] = IMAGENET_MEAN,
               std: tuple[float, ...] = IMAGENET_STD, pin_memory: bool = False,
               persistent_workers: bool = False) -> Iterable[Batch]:
    """Every sample of ``source`` exactly once across ranks, normalised (the model's ``mean`` and
    ``std``: ``model.mean``, ``model.std``), un-augmented. Iterating it again gives the same batches.

    ``persistent_workers``: the workers start at the first pass and serve every later one (a
    training's validations). Each start forks this process, and on CPython up to 3.11.7 a fork at
    the moment another thread starts or ends can hang the child for good (python/cpython#112275:
    the interpreter's thread-list lock is inherited taken; seen as 1 hang in ~12 two-process
    runs of 44 validations, each forking its own worker). One fork per run, not one per validation.

    Batches of differently sized images are padded (image 0, mask 255). A rank that
    gets no sample (more ranks than samples) yields nothing.
    """
    rank, world_size = _resolve_rank(rank, world_size)
    # Workers send single uint8 samples; pad_collate normalises and pads in this process.
    transform = val_transforms(protocol, crop_size, normalize=False)
    collate = functools.partial(pad_collate, mean=tuple(mean), std=tuple(std))
    if pin_memory:  # batches are made here, after the DataLoader: pin them here (CUDA, async copies)
        collate = functools.partial(_pinned, collate)

    if source.kind == "folder":
        dataset = VOCSegmentation(source.voc_root, source.split)
        samples = _FolderSamples(dataset, list(range(rank, len(dataset), world_size)), transform, source.spec)
        loader = DataLoader(samples, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=list, worker_init_fn=_loader_worker_init,
                            persistent_workers=persistent_workers and num_workers > 0)
        return wds.DataPipeline(loader, wds.map(collate))

    # By sample, not by shard: VOC val (1449 images) is 6 shards, Cityscapes val 2, so 8 ranks
    # splitting shards would leave 2 (6) of them idle, waiting in the metrics' all-reduce.
    sizes = shard_sizes(source)
    start, end = val_share(sizes, rank, world_size)
    if start == end:
        return []
    samples = _ValRange(source.urls, sizes, start, end, transform, source.spec, source.checks())
    workers = min(num_workers, end - start)
    return (wds.WebLoader(samples, batch_size=None, num_workers=workers, worker_init_fn=_loader_worker_init,
                          persistent_workers=persistent_workers and workers > 0)
            .batched(batch_size, collation_fn=collate, partial=True))


def _pinned(collate, samples) -> Batch:
    images, masks, ids = collate(samples)
    return images.pin_memory(), masks.pin_memory(), ids


def val_share(sizes: Sequence[int], rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s samples ``[start, end)`` of the split (shards in manifest order, ``sizes``
    samples each): contiguous, so a rank opens only the shards its range overlaps, and the
    ranks' counts differ by at most one."""
    total = sum(sizes)
    return rank * total // world_size, (rank + 1) * total // world_size


class _ValRange(IterableDataset):
    """Samples ``[start, end)`` of the split, decoded; each DataLoader worker takes a contiguous
    part. A range that starts inside a shard reads (never decodes) the samples before it."""

    def __init__(self, urls: tuple[str, ...], sizes: tuple[int, ...], start: int, end: int,
                 transform: PairTransform, spec: DatasetSpec, digests: Optional[dict[str, str]] = None):
        super().__init__()
        self.urls, self.sizes, self.start, self.end, self.transform, self.spec = urls, sizes, start, end, transform, spec
        self.digests = digests

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        count = self.end - self.start
        lo, hi = self.start + worker * count // num_workers, self.start + (worker + 1) * count // num_workers
        for sample in _stream_range(self.urls, self.sizes, range(len(self.urls)), lo, hi, self.digests):
            yield _decode_val(sample, self.transform, self.spec)


# --------------------------------------------------------------------------- raw access

def _raw_pairs(source: DataSource, wanted: Optional[set[str]] = None) -> Iterator[tuple[str, bytes, bytes, str]]:
    """(id, jpeg, png, name) in dataset order; ``wanted`` skips reading other folder files."""
    if source.kind == "folder":
        dataset = VOCSegmentation(source.voc_root, source.split)
        for index, sid in enumerate(dataset.ids):
            if wanted is None or sid in wanted:
                yield (sid, *dataset.load_raw(index), f"{sid} in {source.voc_root}")
    else:
        for sample in _raw_shard_samples(source.urls, digests=source.checks()):
            yield _shard_pair(sample)


def iter_samples(source: DataSource,
                 ids: Optional[Collection[str]] = None) -> Iterator[tuple[str, PIL.Image.Image, np.ndarray]]:
    """Decoded ``(id, RGB PIL image, (H, W) uint8 label)`` pairs in dataset order.

    With ``ids``, only those (stopping once all are found); ids that are not in the
    split raise a DataError listing them.
    """
    wanted = None if ids is None else set(ids)
    for sid, jpeg, png, name in _raw_pairs(source, wanted):
        if wanted is not None:
            if sid not in wanted:
                continue
            wanted.discard(sid)
        image, label = load_pair(jpeg, png, name, source.spec)
        yield sid, image, label
        if wanted is not None and not wanted:
            return
    if wanted:
        missing = sorted(wanted)
        raise DataError(f"{source.location}: {len(missing)} id(s) not in split {source.split!r}: "
                        + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))


def image_classes(source: DataSource) -> dict[str, list[int]]:
    """Classes present in each image's label, by id: background 0 included, 255 not.

    Read from the manifest when it has them, else computed by decoding every label.
    """
    if source.manifest is not None and "image_classes" in source.manifest:
        return {sid: list(map(int, classes)) for sid, classes in source.manifest["image_classes"].items()}
    classes = {}
    if source.kind == "folder":
        dataset = VOCSegmentation(source.voc_root, source.split)
        for index, sid in enumerate(dataset.ids):
            label_path = dataset.paths(index)[1]
            label = decode_label(read_bytes(label_path, "label (PNG)"), str(label_path), source.spec)
            classes[sid] = _present(label)
    else:
        for sid, _, png, name in _raw_pairs(source):
            classes[sid] = _present(decode_label(png, f"{name} (label)", source.spec))
    return classes


def _present(label: np.ndarray) -> list[int]:
    counts = np.bincount(label.ravel(), minlength=256)
    return [c for c in np.flatnonzero(counts).tolist() if c != IGNORE_INDEX]
