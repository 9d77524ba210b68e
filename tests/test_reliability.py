"""Faults give one line naming the file, shard or sample, and leave nothing behind: damaged
shards (with and without a manifest), shard integrity against the manifest, a full disk
while packing and saving checkpoints, checkpoints for other classes, and small input slips."""
import errno
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from segtrain import integrity, pack, voc
from segtrain.cli import one_line
from segtrain.evaluate import main as evaluate_main
from segtrain.files import DataError, atomic_write_bytes
from segtrain.checkpoints import CheckpointError, save_checkpoint
from segtrain.loaders import iter_samples, train_loader, val_loader
from segtrain.model import build_model, load_checkpoint
from segtrain.sources import resolve_data

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers

def copy_split(packed_shards, split: str, dest: Path) -> Path:
    """The packed ``split`` (manifest and shards) copied into ``dest``; returns the manifest path."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(packed_shards[split].read_text())
    for shard in manifest["shards"]:
        shutil.copy(packed_shards["dir"] / shard["file"], dest)
    shutil.copy(packed_shards[split], dest)
    return dest / packed_shards[split].name


def member_offsets(path: Path) -> list[int]:
    """Byte offsets of the tar headers in ``path`` (stdlib tarfile, random access)."""
    import tarfile

    with tarfile.open(path) as tar:
        return [member.offset for member in tar.getmembers()]


def damage(path: Path, how: str) -> None:
    """Cut a tar in the middle of a member, cut it at a member boundary, or break a header."""
    data = bytearray(path.read_bytes())
    offsets = member_offsets(path)
    if how == "cut mid-member":
        data = data[: len(data) // 2 + 700]
    elif how == "cut at a member boundary":
        data = data[: offsets[len(offsets) // 2]]
    elif how == "corrupt header":
        header = offsets[len(offsets) // 2]
        data[header: header + 100] = b"\x07" * 100  # name and checksum no longer match
    path.write_bytes(bytes(data))


DAMAGE = ("cut mid-member", "cut at a member boundary", "corrupt header")


def all_batches(loader) -> int:
    return sum(len(ids) for *_, ids in loader)


def user_error(run, capsys) -> str:
    """Run an entry point that must fail with a user error; return its one stderr line."""
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress bar
    assert last.startswith("segtrain: error: ") and err.count("segtrain: error:") == 1, err
    assert "Traceback" not in err, err
    return last


# --------------------------------------------------------------------------- damaged shards

@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_bare_shard_is_a_named_error_in_training_and_evaluation(packed_shards, tmp_path, how, workers):
    manifest = copy_split(packed_shards, "train", tmp_path)
    shard = tmp_path / "voc-train-000001.tar"
    damage(shard, how)
    pattern = str(tmp_path / "voc-train-{000000..000004}.tar")
    for read in (lambda: all_batches(val_loader(resolve_data(pattern, "train"), num_workers=workers)),
                 lambda: all_batches(train_loader(resolve_data(pattern, "train"), 4, 33, num_workers=workers)[0])):
        with pytest.raises(DataError) as info:
            read()
        line = one_line(info.value)
        assert line.startswith(f"shard {shard}: ") and ("truncated" in line or "damaged" in line), line
    assert manifest.is_file()


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_shard_with_manifest_and_no_verification_is_named_by_the_readers(packed_shards, tmp_path, how):
    """Verification off: the loaders themselves still name the shard (never a tarfile traceback)."""
    manifest = copy_split(packed_shards, "val", tmp_path)
    damage(tmp_path / "voc-val-000000.tar", how)
    for read in (lambda: all_batches(val_loader(resolve_data(manifest, "val"), num_workers=1)),
                 lambda: all_batches(train_loader(resolve_data(manifest, "val"), 4, 33, num_workers=1)[0])):
        with pytest.raises(DataError, match=r"shard .*voc-val-000000\.tar: ") as info:
            read()
        assert "ReadError" not in one_line(info.value)


def test_truncated_shard_through_the_evaluate_command(packed_shards, tmp_path, capsys):
    manifest = copy_split(packed_shards, "val", tmp_path / "shards")
    damage(tmp_path / "shards" / "voc-val-000000.tar", "cut mid-member")  # the first shard read
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, build_model(backbone="resnet18", pretrained=False))
    args = ["--checkpoint", str(ckpt), "--data", str(manifest), "--workers", "1"]
    err = user_error(lambda: evaluate_main(args), capsys)  # verified first: the size gives it away
    assert "voc-val-000000.tar" in err and "bytes, but" in err and "re-pack" in err
    err = user_error(lambda: evaluate_main(args + ["--verify-shards", "off"]), capsys)
    assert "voc-val-000000.tar: truncated or corrupt tar" in err


def test_evaluation_notices_a_shard_holding_fewer_samples_than_the_manifest_says(packed_shards, tmp_path):
    manifest = copy_split(packed_shards, "val", tmp_path)
    m = json.loads(manifest.read_text())
    m["shards"][1]["samples"] += 1
    m["num_samples"] += 1
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"voc-val-000001\.tar: holds 6 samples, the manifest says 7"):
        all_batches(val_loader(resolve_data(manifest, "val"), num_workers=0))


# --------------------------------------------------------------------------- integrity

def test_wrong_sha256_or_count_names_the_shard_and_says_to_repack(packed_shards, tmp_path):
    manifest = copy_split(packed_shards, "val", tmp_path)
    integrity.verify_shards(manifest, mode="always")  # the packed split is fine
    m = json.loads(manifest.read_text())
    m["shards"][0]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"voc-val-000000\.tar: sha256 .* differs from .*voc-val\.json.*re-pack"):
        integrity.verify_shards(manifest, mode="once")
    m = json.loads(packed_shards["val"].read_text())
    m["shards"][1]["samples"] += 1
    m["num_samples"] += 1
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"voc-val-000001\.tar: holds 6 samples, but .* says 7; re-pack"):
        integrity.verify_shards(manifest, mode="always")
    integrity.verify_shards(manifest, mode="off")  # off checks nothing


def test_a_wrong_sha256_stops_training_before_the_run_directory_exists(packed_shards, tmp_path, capsys):
    from segtrain.train import main as train_main

    manifest = copy_split(packed_shards, "train", tmp_path / "shards")
    copy_split(packed_shards, "val", tmp_path / "shards")
    m = json.loads(manifest.read_text())
    m["shards"][2]["sha256"] = "f" * 64
    manifest.write_text(json.dumps(m))
    run_dir = tmp_path / "run"
    # (Small settings, so that without verification the run ends quickly, and this test fails.)
    err = user_error(lambda: train_main(["--data", str(manifest), "--run-dir", str(run_dir), "--tracker", "none",
                                         "--backbone", "resnet18", "--pretrained", "false", "--iterations", "1",
                                         "--crop-size", "33", "--batch-size", "2", "--workers", "0"]), capsys)
    assert "voc-train-000002.tar: sha256" in err and "re-pack" in err
    assert not run_dir.exists()


def test_verification_is_cached_by_size_and_mtime(packed_shards, tmp_path, monkeypatch):
    manifest = copy_split(packed_shards, "val", tmp_path)
    hashed = []
    real = integrity.hash_and_count
    monkeypatch.setattr(integrity, "hash_and_count", lambda path: hashed.append(Path(path).name) or real(path))
    integrity.verify_shards(manifest, mode="once")
    assert hashed == ["voc-val-000000.tar", "voc-val-000001.tar"]
    assert (tmp_path / ".voc-val.verified.json").is_file()
    integrity.verify_shards(manifest, mode="once")
    assert len(hashed) == 2  # a re-run does not re-hash
    shard = tmp_path / "voc-val-000001.tar"
    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime: hashed again
    integrity.verify_shards(manifest, mode="once")
    assert hashed[2:] == ["voc-val-000001.tar"]
    integrity.verify_shards(manifest, mode="always")
    assert len(hashed) == 5
    # The same bytes with a changed manifest hash are not vouched for by the cache.
    m = json.loads(manifest.read_text())
    m["shards"][0]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match="sha256"):
        integrity.verify_shards(manifest, mode="once")


def test_verification_cache_goes_to_the_user_cache_when_the_shard_folder_is_read_only(
        packed_shards, tmp_path, monkeypatch):
    manifest = copy_split(packed_shards, "val", tmp_path / "shards")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_write = integrity.atomic_write_bytes

    def read_only_shard_folder(path, data):
        if Path(path).parent == manifest.parent:
            raise DataError(f"{path}: cannot write (Read-only file system)")
        real_write(path, data)

    monkeypatch.setattr(integrity, "atomic_write_bytes", read_only_shard_folder)
    integrity.verify_shards(manifest, mode="once")
    cached = list((tmp_path / "cache" / "segtrain" / "verified").glob("voc-val-*.json"))
    assert len(cached) == 1 and set(json.loads(cached[0].read_text())) == {"voc-val-000000.tar", "voc-val-000001.tar"}
    monkeypatch.setattr(integrity, "hash_and_count", lambda path: pytest.fail("re-hashed a cached shard"))
    integrity.verify_shards(manifest, mode="once")


def test_verify_shards_is_a_config_field_with_the_verifiers_values():
    from segtrain.config import ConfigError, parse_config

    assert parse_config(["--verify-shards", "always"]).verify_shards == "always"
    assert parse_config([]).verify_shards == integrity.DEFAULT_VERIFY == "once"
    with pytest.raises(ConfigError, match="verify_shards: must be one of off, once, always"):
        parse_config(["--verify-shards", "sometimes"])


def test_pack_verify_command(packed_shards, tmp_path, capsys):
    """``python tools/pack.py --verify``, run in this process (tests/test_pack.py runs the script)."""
    manifest = copy_split(packed_shards, "val", tmp_path)

    def verify():
        code = pack.main(["--verify", str(manifest)])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([], code, out, err)

    ok = verify()
    assert ok.returncode == 0 and "all 2 shards match" in ok.stdout, ok.stderr
    damage(tmp_path / "voc-val-000001.tar", "corrupt header")
    m = json.loads(manifest.read_text())
    m["shards"][0]["samples"] += 1
    m["num_samples"] += 1
    manifest.write_text(json.dumps(m))
    bad = verify()
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(lines) == 2 and all(line.startswith("segtrain: error: shard ") for line in lines)
    assert "voc-val-000000.tar: holds 10 samples" in lines[0] and "voc-val-000001.tar: sha256" in lines[1]


# --------------------------------------------------------------------------- full disk

class DiskFullAfter:
    """A file opened for writing that takes ``room`` bytes, then fails with ENOSPC."""

    def __init__(self, path, room: int):
        self.file, self.room = open(path, "wb"), room

    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_full_disk_while_packing_leaves_no_partial_shard_and_no_manifest(synthetic_voc, tmp_path, monkeypatch):
    real_open = open
    monkeypatch.setattr(pack, "open", lambda path, mode="r", *a, **k: DiskFullAfter(path, 30_000)
                        if "w" in mode else real_open(path, mode, *a, **k), raising=False)
    out = tmp_path / "shards"
    with pytest.raises(DataError, match=r"voc-val-00000\d\.tar: disk full \(No space left on device\)") as info:
        pack.pack_split(synthetic_voc, "val", out, shard_size=4, progress=False)
    assert "\n" not in str(info.value)
    assert not list(out.glob(".*.tmp")) and not (out / "voc-val.json").exists()


def test_full_disk_through_the_pack_command_is_one_line(synthetic_voc, tmp_path, monkeypatch, capsys):
    """Same through the command's main() (tools/pack.py is ``sys.exit(main())``; tests/test_pack.py
    runs that script), whose disk fills up."""
    real_open = open
    monkeypatch.setattr(pack, "open", lambda path, mode="r", *a, **k: DiskFullAfter(path, 30_000)
                        if "w" in mode else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(SystemExit) as info:
        pack.main(["--voc-root", str(synthetic_voc), "--split", "val", "--out", str(tmp_path), "--shard-size", "4"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and "disk full" in err, err
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "voc-val.json").exists()


def test_full_disk_during_an_atomic_write_removes_the_temp_file(tmp_path, monkeypatch):
    import segtrain.files as files

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    model = build_model(backbone="resnet18", pretrained=False)
    with pytest.raises(DataError, match=r"best\.pt: disk full \(No space left on device\); free space"):
        save_checkpoint(tmp_path / "best.pt", model)
    with pytest.raises(DataError, match=r"config\.yaml: disk full"):
        atomic_write_bytes(tmp_path / "config.yaml", b"a: 1\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", ["safetensors", "oserror"])
def test_full_disk_while_saving_training_state_removes_the_temp_folder(tmp_path, monkeypatch, failure):
    import accelerate.checkpointing
    from accelerate import Accelerator
    from safetensors import SafetensorError

    from segtrain.checkpoints import RunDir, save_training_state

    def save_then_fill_the_disk(obj, f, **kwargs):
        Path(f).write_bytes(b"\0" * 1000)  # a partial file, as a full disk leaves it
        if failure == "safetensors":
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        raise OSError(errno.ENOSPC, "No space left on device")

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters()))
    monkeypatch.setattr(accelerate.checkpointing, "save", save_then_fill_the_disk)
    with pytest.raises(DataError, match=r"checkpoints/step_0000003: disk full") as info:
        save_training_state(accelerator, RunDir(tmp_path), 3, keep=2)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "checkpoints").iterdir()) == []


# --------------------------------------------------------------------------- checkpoint vs data

@pytest.fixture(scope="module")
def five_class_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("five") / "five.pt"
    save_checkpoint(path, build_model(backbone="resnet18", pretrained=False, num_classes=5))
    return path


def test_evaluate_refuses_a_checkpoint_for_another_class_count(five_class_checkpoint, packed_shards, synthetic_voc,
                                                                capsys):
    for data in (packed_shards["val"], synthetic_voc):
        err = user_error(lambda: evaluate_main(["--checkpoint", str(five_class_checkpoint), "--data", str(data)]),
                         capsys)
        assert "checkpoint has 5 classes, data has 21" in err and "--init-from" in err and "background" in err
    # A shard pattern does not say its classes: the first label the model has no class for does.
    pattern = str(packed_shards["dir"] / "voc-val-{000000..000001}.tar")
    err = user_error(lambda: evaluate_main(["--checkpoint", str(five_class_checkpoint), "--data", pattern,
                                            "--workers", "0"]), capsys)
    assert "labels outside 0..4" in err and "--init-from" in err


def test_class_names_are_compared_when_the_checkpoint_carries_them(tmp_path):
    from segtrain.checkpoints import check_fits_data

    ckpt = {"model_config": {"num_classes": 3}}
    check_fits_data(ckpt, "c.pt", ["a", "b", "c"], "data.json")
    check_fits_data(ckpt, "c.pt", None, "shards/x.tar")  # data that does not say: nothing to compare
    for carried in ({"class_names": ["a", "x", "c"]}, {"dataset": {"class_names": ["a", "x", "c"]}},
                    {"dataset": {"classes": ["a", "x", "c"]}}):
        with pytest.raises(CheckpointError, match="checkpoint class 1 is 'x', but data.json calls it 'b'"):
            check_fits_data(ckpt | carried, "c.pt", ["a", "b", "c"], "data.json")
    with pytest.raises(CheckpointError, match="checkpoint has 3 classes, data has 2"):
        check_fits_data(ckpt, "c.pt", ["a", "b"], "data.json")


def test_report_and_sam_refuse_a_checkpoint_for_another_class_count(five_class_checkpoint, packed_shards,
                                                                    tmp_path, capsys):
    from segtrain import report, sam

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(five_class_checkpoint, run / "best.pt")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": str(packed_shards["train"]), "name": "five"}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "val/miou": 0.1}) + "\n")
    with pytest.raises(SystemExit):
        report.main([str(run), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert "checkpoint has 5 classes, data has 21" in err and "Traceback" not in err
    assert not list((tmp_path / "report").glob("*.png"))  # refused before any figure
    with pytest.raises(SystemExit) as exit_info:
        sam.main(["--sam-checkpoint", str(tmp_path / "sam.pth"), "--model-type", "vit_b",
                  "--data", str(packed_shards["val"]), "--semantic", str(five_class_checkpoint),
                  "--ids", voc.read_split(Path(json.loads(packed_shards["val"].read_text())["source_root"]),
                                          "val")[0], "--out", str(tmp_path / "sam")])
    assert exit_info.value.code == 2 and "checkpoint has 5 classes, data has 21" in capsys.readouterr().err


def test_random_bytes_are_not_a_pytorch_checkpoint(tmp_path, capsys):
    from segtrain.predict import main as predict_main

    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(junk)
    assert "not a PyTorch checkpoint" in str(info.value) and "weights_only" not in str(info.value)
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8 not read")
    with pytest.raises(SystemExit):
        predict_main(["--checkpoint", str(junk), "--input", str(image), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "junk.pt" in err and "not a PyTorch checkpoint" in err and "weights_only" not in err


# --------------------------------------------------------------------------- small items

def test_a_png_named_jpg_is_packed_under_its_real_type(synthetic_voc, tmp_path):
    """The shard names what it holds: a PNG saved as .jpg is stored as ID.png + ID.label.png,
    and the loaders read it like any other sample."""
    import PIL.Image
    import tarfile

    root = tmp_path / "VOC2012"
    shutil.copytree(synthetic_voc, root)
    sid = voc.read_split(root, "val")[1]
    jpg = root / "JPEGImages" / f"{sid}.jpg"
    PIL.Image.open(jpg).save(jpg, format="PNG")
    assert pack.image_key(jpg.read_bytes()) == "png"
    assert pack.image_key((synthetic_voc / "JPEGImages" / f"{sid}.jpg").read_bytes()) == "jpg"
    manifest = pack.pack_split(root, "val", tmp_path / "shards", shard_size=64, progress=False)
    with tarfile.open(tmp_path / "shards" / manifest["shards"][0]["file"]) as tar:
        names = set(tar.getnames())
    assert {f"{sid}.png", f"{sid}.label.png"} <= names and f"{sid}.jpg" not in names
    other = voc.read_split(root, "val")[0]
    assert {f"{other}.jpg", f"{other}.png"} <= names
    loaded = {s: (img, lbl) for s, img, lbl in iter_samples(resolve_data(tmp_path / "shards" / "voc-val.json", "val"),
                                                                   ids=[sid])}
    assert loaded[sid][0].size == PIL.Image.open(jpg).size


def test_a_missing_data_folder_creates_no_run_directory(tmp_path, capsys):
    from segtrain.train import main as train_main

    run_dir = tmp_path / "runs" / "r"
    err = user_error(lambda: train_main(["--data", str(tmp_path / "no-such-folder"), "--run-dir", str(run_dir),
                                         "--tracker", "none", "--backbone", "resnet18", "--pretrained", "false"]),
                     capsys)
    assert "no-such-folder" in err and not run_dir.exists()


def test_resume_with_more_iterations_updates_config_yaml(packed_shards, tmp_path, capsys):
    from segtrain.train import main as train_main

    run_dir = tmp_path / "run"
    args = ["--data", str(packed_shards["train"]), "--run-dir", str(run_dir), "--tracker", "none",
            "--backbone", "resnet18", "--pretrained", "false", "--crop-size", "33", "--batch-size", "2",
            "--workers", "0", "--val-every", "100", "--checkpoint-every", "1", "--log-every", "1"]
    train_main(args + ["--iterations", "1"])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["iterations"] == 1
    capsys.readouterr()
    train_main(args + ["--iterations", "2", "--resume", "latest"])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["iterations"] == 2
    assert "config.yaml: iterations 1 -> 2" in capsys.readouterr().out


def test_write_failures_from_native_writers_are_classified():
    from safetensors import SafetensorError

    from segtrain.files import write_failure

    full = [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
            SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "x" })'),
            RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                         "PytorchStreamWriter failed writing file data/0: file write failed: No space left")]
    for error in full:
        assert str(write_failure("runs/x/best.pt", error)).startswith("runs/x/best.pt: disk full"), error
    read_only = write_failure("runs/x/best.pt", PermissionError(errno.EACCES, "Permission denied"))
    assert str(read_only) == "runs/x/best.pt: cannot write (Permission denied)"
    assert write_failure("x", KeyError("model")) is None and write_failure("x", RuntimeError("CUDA oom")) is None


def verify_rank(out: Path, good: Path, bad: Path) -> None:
    """One of 2 processes of one machine: verifies a good and a damaged copy of the shards with
    ``integrity.verify_source`` (mode always) and writes what this rank hashed, whether it wrote
    the cache, and the error it got."""
    from accelerate import PartialState

    state = PartialState(cpu=True)
    hashed, writes = [], []
    hash_and_count, write_cache = integrity.hash_and_count, integrity._write_cache
    integrity.hash_and_count = lambda path: (hashed.append(str(path)), hash_and_count(path))[1]
    integrity._write_cache = lambda *args: (writes.append(str(args[0])), write_cache(*args))[1]
    integrity.verify_source(resolve_data(good, "train"), "always")
    try:
        integrity.verify_source(resolve_data(bad, "train"), "always")
        error = None
    except DataError as e:
        error = str(e)
    (out / f"rank{state.process_index}.json").write_text(json.dumps({"hashed": hashed, "writes": writes,
                                                                     "error": error}))
    state.wait_for_everyone()


def test_shards_are_hashed_once_per_machine_and_a_problem_stops_every_process(packed_shards, tmp_path,
                                                                              debug_launch):
    """Two processes of one machine: only LOCAL_RANK 0 hashes (and writes the cache), the other
    waits; a damaged shard found by the first is the error of both."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    shutil.copytree(packed_shards["dir"], good)
    shutil.copytree(packed_shards["dir"], bad)
    shard = sorted(bad.glob("voc-train-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's bytes: same size, other sha256
    shard.write_bytes(bytes(data))
    debug_launch(verify_rank, tmp_path, good / "voc-train.json", bad / "voc-train.json")
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    shards_of_good = len(json.loads((good / "voc-train.json").read_text())["shards"])
    assert len(first["hashed"]) >= shards_of_good and first["writes"]
    assert second["hashed"] == [] and second["writes"] == []
    assert first["error"] is not None and first["error"] == second["error"] and shard.name in first["error"]
