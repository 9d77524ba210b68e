"""segtrain.sources and segtrain.loaders: one --data for manifests, shard patterns and VOC
folders; exact batch counts per rank, deterministic augmentation, exactly-once validation."""
import itertools
import json
import multiprocessing
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from segtrain import loaders, voc
from segtrain.datasets import VOCSegmentation
from segtrain.files import DataError
from segtrain.sources import resolve_data

REPO = Path(__file__).resolve().parents[1]


def pattern(packed_shards, split: str, first: int, last: int) -> str:
    return str(packed_shards["dir"] / f"voc-{split}-{{{first:06d}..{last:06d}}}.tar")


# The loaders take a resolved DataSource; these resolve the test's data first.
def train_loader(data, *args, split: str = "train", **kwargs):
    return loaders.train_loader(resolve_data(data, split), *args, **kwargs)


def val_loader(data, split: str = "val", **kwargs):
    return loaders.val_loader(resolve_data(data, split), **kwargs)


def iter_samples(data, split: str, ids=None):
    return loaders.iter_samples(resolve_data(data, split), ids)


def image_classes(data, split: str) -> dict:
    return loaders.image_classes(resolve_data(data, split))


def batches_of(loader) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return [(images, masks, list(ids)) for images, masks, ids in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))


# --------------------------------------------------------------------------- resolving --data

def test_resolve_every_kind_of_source(synthetic_voc, packed_shards):
    manifest = resolve_data(packed_shards["train"], "train")
    assert manifest.kind == "shards" and manifest.num_samples == 48 and len(manifest.urls) == 5
    # The train manifest stands for its sibling when asked for val: one --data for both.
    assert resolve_data(packed_shards["train"], "val").location == str(packed_shards["val"])
    assert resolve_data(packed_shards["dir"], "val").num_samples == 16  # folder of manifests
    shard_pattern = resolve_data(pattern(packed_shards, "train", 0, 2), "train")
    assert shard_pattern.kind == "shards" and len(shard_pattern.urls) == 3 and shard_pattern.num_samples is None
    for folder in (synthetic_voc, synthetic_voc.parent, synthetic_voc.parent.parent):  # VOC2012, VOCdevkit, its parent
        source = resolve_data(folder, "train")
        assert source.kind == "folder" and source.voc_root == synthetic_voc and source.num_samples == 48


def test_resolve_errors_name_the_problem(tmp_path, packed_shards):
    cases = {
        str(tmp_path / "nothing"): "no such file",
        str(tmp_path): "neither VOCdevkit",
        str(tmp_path / "missing.json"): "manifest not found",
        pattern(packed_shards, "train", 0, 7): "voc-train-000005.tar does not exist",
    }
    (tmp_path / "bad.json").write_text("{not json")
    cases[str(tmp_path / "bad.json")] = "not a JSON manifest"
    (tmp_path / "other.json").write_text(json.dumps({"format": "something/2"}))
    cases[str(tmp_path / "other.json")] = "not a segtrain shard manifest"
    for data, message in cases.items():
        with pytest.raises(DataError, match=message):
            resolve_data(data, "train")
    with pytest.raises(DataError, match="not 'trainval'.*voc-trainval.json does not exist"):
        resolve_data(packed_shards["train"], "trainval")


def test_manifest_pointing_at_a_missing_shard(tmp_path, packed_shards):
    m = json.loads(packed_shards["val"].read_text())
    m["shards"][1]["file"] = "gone.tar"
    (tmp_path / "voc-val.json").write_text(json.dumps(m))
    shutil.copy(packed_shards["dir"] / m["shards"][0]["file"], tmp_path)
    with pytest.raises(DataError, match="gone.tar does not exist"):
        resolve_data(tmp_path / "voc-val.json", "val")


# --------------------------------------------------------------------------- training

def test_train_batches_exact_and_deterministic(packed_shards):
    # 48 samples, 5 uneven shards, batch 4, as rank 1 of 2 -> 48 // 8 = 6 steps.
    kwargs = dict(batch_size=4, crop_size=33, num_workers=2, seed=7, rank=1, world_size=2)
    loader, steps = train_loader(packed_shards["train"], epoch=0, **kwargs)
    first = batches_of(loader)
    assert steps == 6 and len(first) == 6
    for images, masks, ids in first:  # uint8: the training loop normalises on the device
        assert images.shape == (4, 3, 33, 33) and images.dtype == torch.uint8
        assert masks.shape == (4, 33, 33) and masks.dtype == torch.uint8 and len(ids) == 4
        assert set(torch.unique(masks).tolist()) <= set(range(21)) | {255}
    assert same_batches(first, batches_of(loader))  # iterating again replays the epoch
    again, _ = train_loader(packed_shards["train"], epoch=0, **kwargs)
    assert same_batches(first, batches_of(again))  # a rebuilt loader too: resume is exact
    next_epoch, _ = train_loader(packed_shards["train"], epoch=1, **kwargs)
    assert not same_batches(first, batches_of(next_epoch))
    other_rank, _ = train_loader(packed_shards["train"], epoch=0, **{**kwargs, "rank": 0})
    assert [b[2] for b in batches_of(other_rank)] != [b[2] for b in first]


def test_shard_readers_read_and_decode_exactly_the_epoch(packed_shards, monkeypatch):
    # Each worker decodes exactly its own batches (2 + 1 here, with 2 workers), so no sample is
    # decoded only to be thrown away when the epoch ends; each reads (never decodes) the rank's
    # range up to its last sample, and nothing before it but the start of its first shard.
    read, decoded = multiprocessing.Value("i", 0), multiprocessing.Value("i", 0)  # shared with forked workers
    raw_samples, decode = loaders._raw_shard_samples, loaders.decode_sample

    def counting_raw_samples(urls, *args, **kwargs):
        for sample in raw_samples(urls, *args, **kwargs):
            with read.get_lock():
                read.value += 1
            yield sample

    def counting_decode(*args):
        with decoded.get_lock():
            decoded.value += 1
        return decode(*args)

    monkeypatch.setattr(loaders, "_raw_shard_samples", counting_raw_samples)
    monkeypatch.setattr(loaders, "decode_sample", counting_decode)
    for workers in (0, 2):
        read.value = decoded.value = 0
        loader, steps = train_loader(packed_shards["train"], 8, 33, num_workers=workers, rank=0, world_size=2)
        ids = [sid for _, _, batch_ids in loader for sid in batch_ids]
        assert steps == 3 and len(ids) == len(set(ids)) == 24
        assert decoded.value == 24 and read.value <= max(workers, 1) * 24, (workers, read.value)
        if workers == 0:
            assert read.value == 24  # rank 0's one reader starts at the stream's start
    loader, _ = train_loader(packed_shards["train"], 8, 33, num_workers=0, rank=1, world_size=2)
    read.value = 0
    assert len(list(loader)) == 3 and read.value < 24 + 10  # rank 1: at most one shard read to reach its range


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("data", ["shards", "folder"])
def test_train_batches_do_not_depend_on_the_worker_count(data, packed_shards, synthetic_voc):
    """The batch sequence is fixed before workers exist: 0, 1, 2 or 3 workers give the same batches,
    and one endless loader started mid-epoch gives what the per-epoch loaders give from there."""
    source = packed_shards["train"] if data == "shards" else synthetic_voc
    kwargs = dict(batch_size=2, crop_size=33, seed=5, rank=1, world_size=2)
    serial = batches_of(train_loader(source, num_workers=0, **kwargs)[0])
    assert len(serial) == 12
    for workers in (1, 2, 3):
        assert same_batches(serial, batches_of(train_loader(source, num_workers=workers, **kwargs)[0])), workers
    epochs = serial[5:10] + batches_of(train_loader(source, num_workers=0, epoch=1, **kwargs)[0])[:10]
    endless, _ = train_loader(source, num_workers=2, epoch=0, skip=5, take=10, endless=True, **kwargs)
    assert same_batches(epochs, batches_of(itertools.islice(endless, 15)))


def test_folder_training_is_deterministic_and_independent_of_workers(synthetic_voc):
    kwargs = dict(batch_size=4, crop_size=33, seed=3, epoch=2)
    loader, steps = train_loader(synthetic_voc, num_workers=0, **kwargs)
    serial = batches_of(loader)
    assert steps == 12 and len(serial) == 12
    assert same_batches(serial, batches_of(train_loader(synthetic_voc, num_workers=2, **kwargs)[0]))
    ids = [sid for _, _, batch_ids in serial for sid in batch_ids]
    assert sorted(ids) == sorted(voc.read_split(synthetic_voc, "train"))  # one epoch = each id once
    assert not same_batches(serial, batches_of(train_loader(synthetic_voc, num_workers=0, seed=3, epoch=3,
                                                            batch_size=4, crop_size=33)[0]))


def test_training_leaves_the_callers_rng_alone(synthetic_voc):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batches_of(train_loader(synthetic_voc, 4, 33, num_workers=0)[0])
    assert torch.equal(torch.rand(3), expected)


def epoch_ids(data, batch_size: int, world_size: int, epoch: int = 0, workers: int = 2,
              seed: int = 5) -> list[str]:
    """Every id that all ranks of one epoch draw (each rank built in this process)."""
    ids = []
    for rank in range(world_size):
        loader, steps = train_loader(data, batch_size, 17, num_workers=workers, seed=seed, epoch=epoch,
                                     rank=rank, world_size=world_size)
        batches = batches_of(loader)
        assert len(batches) == steps and all(len(b[2]) == batch_size for b in batches)
        ids += [sid for _, _, batch_ids in batches for sid in batch_ids]
    return ids


def test_an_epoch_draws_every_sample_once_when_the_global_batch_divides_it(synthetic_voc, packed_shards):
    split = sorted(voc.read_split(synthetic_voc, "train"))  # 48 ids in shards of 10, 10, 10, 10, 8
    epochs = [epoch_ids(packed_shards["train"], 4, world_size=1, epoch=e) for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == split  # 12 batches of 4 from 2 readers
    assert set(Counter(epochs[0] + epochs[1]).values()) == {2}
    # Two ranks share the epoch's stream; a rank's samples do not depend on its workers.
    two_ranks = epoch_ids(packed_shards["train"], 4, world_size=2)
    assert sorted(two_ranks) == split
    rank0 = [sid for _, _, ids in train_loader(packed_shards["train"], 4, 17, num_workers=0, seed=5,
                                               rank=0, world_size=2)[0] for sid in ids]
    assert sorted(rank0) == sorted(two_ranks[:24])


def test_an_epoch_leaves_out_only_the_remainder_and_not_always_the_same(synthetic_voc, packed_shards):
    split = set(voc.read_split(synthetic_voc, "train"))
    missing = []
    for epoch in range(3):  # 2 ranks x batch 5: 4 steps of 10 per epoch, 48 mod 10 = 8 left out
        ids = epoch_ids(packed_shards["train"], 5, world_size=2, epoch=epoch)
        assert len(ids) == len(set(ids)) == 40 and set(ids) <= split
        missing.append(split - set(ids))
    assert len({frozenset(m) for m in missing}) > 1, missing


def drawn(data, world: int, batch: int, skip: int, count: int, layouts=(), workers: int = 0) -> list:
    """The batches each rank of ``world`` x ``batch`` draws in epoch 0, from batch ``skip``, ``count`` of
    them (an epoch of 48 samples in global batches of 8: ``take`` is 6 steps' worth)."""
    take = 48 // (world * batch)
    return [b for rank in range(world) for b in itertools.islice(batches_of(train_loader(
        data, batch, 33, num_workers=workers, seed=5, rank=rank, world_size=world, skip=skip, take=take,
        layouts=layouts)[0]), count)]


@pytest.mark.parametrize("data", ["shards", "folder"])
def test_an_epoch_resumed_on_other_process_counts_draws_every_sample_once(data, synthetic_voc, packed_shards):
    """Global batch 8: steps 0-2 on 2 processes x 4, step 3 on 4 x 2, steps 4-5 on 1 x 4 with 2
    micro-batches (resumes on other process counts; segtrain.plan): the epoch's 48 samples, each once.
    A resume inside a layout's part of the epoch, on the same count, draws exactly the same batches."""
    data = packed_shards["train"] if data == "shards" else synthetic_voc
    split = sorted(voc.read_split(synthetic_voc, "train"))
    two, four, one = loaders.Layout(2, 4), loaders.Layout(4, 2), loaders.Layout(1, 4)
    layouts = ((0, two), (24, four), (32, one))  # (global sample of the epoch each began at, layout)
    parts = [drawn(data, 2, 4, 0, 3), drawn(data, 4, 2, 3, 1, layouts[:2]), drawn(data, 1, 4, 8, 4, layouts)]
    ids = [sid for part in parts for _, _, batch_ids in part for sid in batch_ids]
    assert len(ids) == 48 and sorted(ids) == split
    on_four = drawn(data, 4, 2, 3, 3, layouts[:2], workers=2)  # rank r: batches 3, 4, 5
    again = drawn(data, 4, 2, 4, 2, layouts[:2])  # resumed at batch 4 on 4 processes again
    assert same_batches(again, [b for r in range(4) for b in on_four[3 * r + 1:3 * r + 3]])


def test_fewer_shards_than_readers_still_fills_every_batch_with_distinct_samples(packed_shards):
    data = pattern(packed_shards, "train", 0, 0)  # one shard of 10 for 2 ranks x 2 workers
    ids = epoch_ids(data, 4, world_size=2)  # 10 // 8 = 1 step per rank
    assert len(ids) == len(set(ids)) == 8
    # Fewer samples than one global batch: the stream takes a second pass over the shard.
    assert sorted(Counter(epoch_ids(data, 3, world_size=4)).values()) == [1] * 8 + [2] * 2


def test_rank_arguments_are_checked(packed_shards):
    with pytest.raises(ValueError, match="rank"):
        train_loader(packed_shards["train"], 4, 33, rank=2, world_size=2)


def test_manifest_shard_counts_must_add_up_and_match_the_shards(tmp_path, packed_shards):
    m = json.loads(packed_shards["train"].read_text())
    for shard in m["shards"]:
        shutil.copy(packed_shards["dir"] / shard["file"], tmp_path)
    m["shards"][0]["samples"] += 1
    (tmp_path / "voc-train.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="shard sample counts add up to 49, but num_samples is 48"):
        resolve_data(tmp_path / "voc-train.json", "train")
    m["num_samples"] += 1  # consistent, but shard 0 holds 10, not 11: the reader notices
    (tmp_path / "voc-train.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="voc-train-000000.tar: holds 10 samples, the manifest says 11"):
        epoch_ids(tmp_path / "voc-train.json", 7, world_size=1, workers=0)


@pytest.mark.parametrize("key", ["../evil", "a b"])
def test_sample_keys_that_are_not_plain_ids_are_refused(tmp_path, synthetic_voc, key):
    sid = voc.read_split(synthetic_voc, "val")[0]
    jpeg, png = VOCSegmentation(synthetic_voc, "val").load_raw(0)
    bad_shard = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(bad_shard)) as sink:
        sink.write({"__key__": sid, "jpg": jpeg, "png": png})
        sink.write({"__key__": key, "jpg": jpeg, "png": png})
    message = f"shard .*bad-000000.tar: sample key '{re.escape(key)}' is not a plain id"
    with pytest.raises(DataError, match=message):
        list(iter_samples(str(bad_shard), "val"))
    with pytest.raises(DataError, match=message):
        batches_of(val_loader(str(bad_shard), num_workers=0))
    with pytest.raises(DataError, match=message):
        batches_of(train_loader(str(bad_shard), 2, 17, num_workers=0)[0])


def test_corrupt_jpeg_names_sample_and_shard(tmp_path, synthetic_voc):
    sid = voc.read_split(synthetic_voc, "val")[0]
    good_png = (synthetic_voc / "SegmentationClass" / f"{sid}.png").read_bytes()
    bad_shard = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(bad_shard)) as sink:
        sink.write({"__key__": sid, "jpg": b"\xff\xd8 definitely not a jpeg", "png": good_png})
    with pytest.raises(DataError, match=f"{sid} in shard .*bad-000000.tar"):
        batches_of(val_loader(str(bad_shard), num_workers=0))
    with pytest.raises(DataError, match=f"{sid} in shard .*bad-000000.tar"):
        batches_of(train_loader(str(bad_shard), 1, 33, num_workers=0)[0])


# --------------------------------------------------------------------------- evaluation

def test_folder_and_shards_give_the_same_val_samples(synthetic_voc, packed_shards):
    from_shards = {ids[0]: (images, masks) for images, masks, ids in val_loader(packed_shards["val"])}
    from_folder = {ids[0]: (images, masks) for images, masks, ids in val_loader(synthetic_voc, num_workers=0)}
    assert sorted(from_shards) == sorted(from_folder) == sorted(voc.read_split(synthetic_voc, "val"))
    for sid, (images, masks) in from_folder.items():
        assert torch.equal(images, from_shards[sid][0]) and torch.equal(masks, from_shards[sid][1])


@pytest.mark.parametrize("data", ["val", "one-shard", "folder"])
def test_val_ranks_partition_the_split(data, synthetic_voc, packed_shards):
    source = {"val": packed_shards["val"], "one-shard": pattern(packed_shards, "val", 1, 1),
              "folder": synthetic_voc}[data]
    expected = [sid for sid, _, _ in iter_samples(source, "val")]
    per_rank = [[sid for _, _, ids in val_loader(source, batch_size=3, rank=r, world_size=2) for sid in ids]
                for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)  # every id exactly once
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1  # by sample: one shard is shared too


def test_val_split_by_sample_balances_voc_val_over_8_ranks(monkeypatch):
    """VOC val as packed: 1449 images in 6 shards (5 x 256 + 169), over 8 ranks. Each rank reads
    its range through the real reader (shards simulated): every image exactly once, counts within
    one, only the overlapping shards opened, nothing decoded before a rank's range."""
    sizes = (256,) * 5 + (169,)
    urls = tuple(f"val-{i:06d}.tar" for i in range(6))
    opened: list[list[str]] = []

    def fake_shard(urls_, expected=None, digests=None, fetch=None):
        for url in urls_:
            opened[-1].append(url)
            index = int(url[4:10])
            yield from ({"__key__": f"{index}-{n}"} for n in range(sizes[index]))

    monkeypatch.setattr(loaders, "_raw_shard_samples", fake_shard)
    monkeypatch.setattr(loaders, "_decode_val", lambda sample, transform, spec: sample["__key__"])
    per_rank = []
    for rank in range(8):
        opened.append([])
        start, end = loaders.val_share(sizes, rank, 8)
        per_rank.append(list(loaders._ValRange(urls, sizes, start, end, None, None)))
        bounds = [sum(sizes[:i]) for i in range(7)]
        assert opened[-1] == [urls[i] for i in range(6) if bounds[i] < end and bounds[i + 1] > start]
    seen = [key for keys in per_rank for key in keys]
    assert len(seen) == len(set(seen)) == 1449
    assert {len(keys) for keys in per_rank} == {181, 182}  # 1449 / 8 = 181.1


def test_val_batches_pad_images_with_zero_and_masks_with_255(packed_shards):
    images, masks, ids = next(iter(val_loader(packed_shards["val"], batch_size=4, num_workers=0)))
    samples = {sid: label for sid, _, label in iter_samples(packed_shards["val"], "val", ids)}
    for i, sid in enumerate(ids):
        h, w = samples[sid].shape
        assert np.array_equal(masks[i, :h, :w].numpy(), samples[sid])
        assert (masks[i, h:] == 255).all() and (masks[i, :, w:] == 255).all()
        assert (images[i, :, h:] == 0).all() and (images[i, :, :, w:] == 0).all()


def test_center_crop_protocol(packed_shards):
    images, masks, _ = next(iter(val_loader(packed_shards["val"], protocol="center-crop", crop_size=49)))
    assert images.shape == (1, 3, 49, 49) and masks.shape == (1, 49, 49)


# --------------------------------------------------------------------------- raw access

def test_iter_samples_and_image_classes_agree_across_sources(synthetic_voc, packed_shards):
    ids = voc.read_split(synthetic_voc, "train")
    wanted = [ids[30], ids[2]]
    got = list(iter_samples(packed_shards["train"], "train", wanted))
    assert [sid for sid, _, _ in got] == [ids[2], ids[30]]  # dataset order
    for sid, image, label in got:
        ref_image, ref_label = VOCSegmentation(synthetic_voc, "train")[ids.index(sid)]
        assert np.array_equal(np.asarray(image), np.asarray(ref_image)) and np.array_equal(label, ref_label)
    with pytest.raises(DataError, match="1 id.* not in split 'train': nope"):
        list(iter_samples(synthetic_voc, "train", [ids[0], "nope"]))
    by_manifest = image_classes(packed_shards["train"], "train")
    assert by_manifest == image_classes(synthetic_voc, "train") == image_classes(pattern(packed_shards, "train", 0, 4), "train")
    assert sorted(by_manifest) == sorted(ids)


# --------------------------------------------------------------------------- real 2-process DDP

def loaders_rank(out: Path, train: dict, val: dict, batch_size: int = 2, crop: int = 33,
                 workers: int = 2) -> None:
    """One of 2 processes: runs every training and validation loader (rank and world size from
    torch.distributed, as in real training) and writes what it saw to ``OUT/rank{R}.json``:
    per training loader its batches per epoch, their sizes, ids and warnings; per validation
    loader every id this rank evaluated."""
    import warnings

    from accelerate import Accelerator

    # As in training: Accelerator() joins torch.distributed (gloo on CPU), and the loaders
    # take rank and world size from there.
    state = Accelerator()
    result = {"rank": state.process_index, "world_size": state.num_processes, "train": {}, "val": {}}
    for name, data in train.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader, steps = train_loader(str(data), batch_size, crop, num_workers=workers)
            batches = [{"ids": ids, "images": list(images.shape), "masks": list(masks.shape)}
                       for images, masks, ids in loader]
        result["train"][name] = {"steps": steps, "batches": batches,
                                 "warnings": [str(w.message) for w in caught if w.category is UserWarning]}
        state.wait_for_everyone()
    for name, data in val.items():
        ids = []
        for images, masks, batch_ids in val_loader(str(data), batch_size=batch_size, num_workers=workers):
            assert images.shape[0] == masks.shape[0] == len(batch_ids)
            ids += batch_ids
        result["val"][name] = ids
        state.wait_for_everyone()
    (out / f"rank{state.process_index}.json").write_text(json.dumps(result))


def test_two_process_ddp_batches_equal_and_cover_the_epoch_and_validation_exactly_once(
        synthetic_voc, packed_shards, tmp_path, debug_launch):
    train = {"uneven": packed_shards["train"],                     # 5 shards (10,10,10,10,8)
             "few": pattern(packed_shards, "train", 0, 2),          # 3 shards < 2 ranks x 2 workers
             "folder": synthetic_voc}
    val = {"val": packed_shards["val"],                             # 2 shards (10, 6)
           "one": pattern(packed_shards, "val", 0, 0),              # one shard for 2 ranks
           "folder": synthetic_voc}
    debug_launch(loaders_rank, tmp_path, train, val)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2

    expected_steps = {"uneven": 48 // 4, "few": 30 // 4, "folder": 48 // 4}
    for name, steps in expected_steps.items():
        runs = [r["train"][name] for r in ranks]
        assert [run["steps"] for run in runs] == [steps, steps], name
        assert [len(run["batches"]) for run in runs] == [steps, steps], name
        for run in runs:
            assert all(b["images"] == [2, 3, 33, 33] and b["masks"] == [2, 33, 33] for b in run["batches"])
        # The ranks' epoch: no sample twice, only the remainder (30 mod 4 = 2 for "few") left out.
        drawn = [sid for run in runs for b in run["batches"] for sid in b["ids"]]
        split = {sid for sid, _, _ in iter_samples(train[name], "train")}
        assert len(drawn) == len(set(drawn)) == steps * 4 and set(drawn) <= split, name
        assert len(split) - len(drawn) == len(split) % 4, name
        assert not any(run["warnings"] for run in runs), name

    for name, data in val.items():
        seen = ranks[0]["val"][name] + ranks[1]["val"][name]
        expected = [sid for sid, _, _ in iter_samples(data, "val")]
        assert len(seen) == len(set(seen)) and sorted(seen) == sorted(expected), name
    assert len(ranks[0]["val"]["one"]) == len(ranks[1]["val"]["one"]) == 5  # one shard, split by sample


def test_training_checks_the_last_shard_of_its_share_too(packed_shards):
    """A worker that has its last sample reads the range on to its end: the shard that ends the
    epoch's share is counted and (remote shards) hash-checked like the others."""
    from segtrain.transforms import train_transforms

    source = resolve_data(packed_shards["train"], "train")
    sizes = loaders.shard_sizes(source)
    last = list(itertools.islice(loaders._shard_cycle(len(sizes), 0, 0), len(sizes)))[-1]
    stream = loaders._TrainShardStream(source.urls, sizes, train_transforms(33, normalize=False), 1, sum(sizes),
                                       seed=0, epoch=0, rank=0, spec=source.spec,
                                       digests={source.urls[last]: "0" * 64})
    with pytest.raises(DataError, match=re.escape(source.urls[last]) + ": sha256"):
        list(stream)


def test_a_process_that_leaves_a_loader_running_still_exits(packed_shards):
    """Loader workers ignore SIGTERM (a cluster's stop signal is the training process's), and
    multiprocessing ends daemonic children at exit with SIGTERM: a loader left running (a run that
    raised mid-epoch, a notebook) must not make the process wait on its workers forever."""
    import subprocess
    import sys

    script = ("import sys\nfrom segtrain.loaders import train_loader\nfrom segtrain.sources import resolve_data\n"
              "loader, _ = train_loader(resolve_data(sys.argv[1], 'train'), batch_size=2, crop_size=33, num_workers=2, endless=True)\n"
              "batches = iter(loader)\nnext(batches)\nprint('left running', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(packed_shards["train"])], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "left running" in proc.stdout, proc.stderr[-2000:]
