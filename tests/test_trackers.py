"""What the trackers get, read back from their own files: the wandb offline run files
(tests/wandb_reader.py), TensorBoard's event files, tracker.jsonl. No tracker is mocked."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from segtrain import loaders, trackers
from segtrain.sources import resolve_data
from segtrain.config import parse_config
from segtrain.losses import LOSSES
from segtrain.train import train
from wandb_reader import read_run

REPO = Path(__file__).resolve().parents[1]
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
FAILED = "tracker wandb failed"


def args(data, run_dir, *extra):
    return ["--data", str(data), "--run-dir", str(run_dir), "--backbone", "resnet18", "--pretrained", "false",
            "--crop-size", "65", "--batch-size", "4", "--iterations", "4", "--workers", "0",
            "--log-every", "1", "--checkpoint-every", "100", "--val-every", "2", "--seed", "7",
            "--mixed-precision", "no", "--tracker", "wandb", "--num-val-images", "3", *extra]


def no_wandb_credentials(patch, root: Path) -> None:
    """No WANDB_* variables, no netrc, no wandb settings file: wandb must go offline by itself."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        patch.delenv(key)
    patch.setenv("NETRC", str(root / "no-netrc"))
    patch.setenv("WANDB_CONFIG_DIR", str(root / "wandb-config"))
    patch.setenv("WANDB_SILENT", "true")
    from wandb.sdk import wandb_setup
    patch.setattr(wandb_setup, "_singleton", None)  # settings read afresh from this environment


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    no_wandb_credentials(monkeypatch, tmp_path)


def metrics_log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def the_run(run_dir, run_id=None):
    run_id = run_id or (run_dir / "wandb_id").read_text().strip()
    files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, files
    return read_run(files[0])


def all_runs(run_dir):
    """Every offline folder's run, oldest first."""
    runs = []
    for folder in trackers.offline_folders(run_dir):
        path = next(folder.glob("run-*.wandb"))
        runs.append(read_run(path) | {"file_id": path.stem.removeprefix("run-")})
    return runs


def run_id_of(run: dict) -> str:
    """The id a run's records name; for an attempt whose wandb-core was killed before it wrote
    the run record (SIGTERM to every process of the job), the id its file is named by, which is
    what `wandb sync` merges same-id folders by."""
    return run["run"].run_id if run["run"] is not None else run["file_id"]


def history(run, key):
    return {row["step"]: row[key] for row in run["history"] if key in row}


@pytest.fixture(scope="module")
def first(packed_shards, tmp_path_factory):
    """One finished 4-step run (validations at 2 and 4), with group, tags, notes and --log-model."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as patch:
        no_wandb_credentials(patch, root)
        train(parse_config(args(packed_shards["train"], root / "first", "--group", "study", "--tags", "a,b",
                                "--notes", "a test run", "--log-model", "best", "--focal-weight", "0.5",
                                "--name", "first-run")))
    return root / "first"


def test_summary_holds_the_best_and_the_final_validation(first):
    run = the_run(first)
    vals = {r["step"]: r["val/miou"] for r in metrics_log(first) if "val/miou" in r}
    best_step = max(vals, key=lambda s: (vals[s], -s))  # the first of equal bests, as best.pt
    assert run["summary"]["best/val_miou"] == pytest.approx(vals[best_step])
    assert run["summary"]["best/step"] == best_step
    assert run["summary"]["final/val_miou"] == pytest.approx(vals[4]) and run["summary"]["final/step"] == 4
    ckpt = torch.load(first / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["metrics"]["miou"] == pytest.approx(run["summary"]["best/val_miou"])
    assert any(m.glob_name == "*" and m.step_metric == "step" for m in run["metrics"])
    assert sorted(history(run, "val/miou")) == [2, 4]
    # best/val_miou is a history metric too (a sweep's Hyperband reads history), the best so far
    assert history(run, "best/val_miou") == pytest.approx({2: vals[2], 4: max(vals[2], vals[4])})
    assert run["exit"] == 0 and not run["preempting"]


def test_images_seen_is_logged_and_declared(first):
    run = the_run(first)
    assert history(run, "images_seen") == {s: 4 * s for s in (1, 2, 3, 4)}  # step x global batch
    assert any(m.name == "images_seen" for m in run["metrics"])


def test_per_class_iou_and_accuracy_are_scalars_named_by_class(first):
    run = the_run(first)
    last = {r["step"]: r for r in metrics_log(first) if "val/miou" in r}[4]
    for name, iou, acc in zip(VOC_CLASSES, last["val/iou"], last["val/class_acc"]):
        if iou is not None and iou == iou:  # classes absent from val have no IoU (NaN)
            assert history(run, f"val/iou/{name}")[4] == pytest.approx(iou)
            assert history(run, f"val/acc/{name}")[4] == pytest.approx(acc)
    assert len({k for row in run["history"] for k in row if k.startswith("val/iou/")}) >= 5
    assert any("val/per_class" in row for row in run["history"])  # the table is kept


def test_per_image_table_has_every_val_image(first, packed_shards):
    run = the_run(first)
    tables = [row["val/per_image"] for row in run["history"] if "val/per_image" in row]
    assert len(tables) == 2 and all(t["_type"] == "table-file" for t in tables)
    folder = next(f for f in trackers.offline_folders(first))
    table = json.loads((folder / "files" / tables[-1]["path"]).read_text())
    assert table["columns"] == ["id", "iou", "acc"]
    val_ids = sorted(sid for shard in json.loads(packed_shards["val"].read_text())["shards"] for sid in shard["ids"])
    assert [row[0] for row in table["data"]] == val_ids
    assert all(0 <= row[2] <= 1 for row in table["data"]) and len({row[1] for row in table["data"]}) > 1


def test_config_as_users_compare_runs(first):
    run = the_run(first)
    config = {k: v for k, v in run["config"].items() if k != "_wandb"}
    assert config["mixed_precision"] == "fp32" and config["mixed_precision_requested"] == "no"
    assert config["processes"] == 1 and config["per_process_batch"] == 4 and config["grad_accum"] == 1
    assert config["steps_per_epoch"] == 48 // 4
    assert config["dataset"] == "voc" and config["train_split"] == "train"
    assert config["train_images"] == 48 and config["val_images"] == 16
    # --focal-weight 0.5: the mix as a string and every loss's weight as a number a panel can plot
    assert config["loss"] == "ce+0.5*focal" and config["ce_weight"] == 1.0 and config["focal_weight"] == 0.5
    assert config["dice_weight"] == 0.0 and {f"{name}_weight" for name in LOSSES} <= config.keys()
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert {k: saved[k] for k in ("loss", "ce_weight", "focal_weight", "dice_weight")} == \
        {"loss": "ce+0.5*focal", "ce_weight": 1.0, "focal_weight": 0.5, "dice_weight": 0.0}
    assert "focal_gamma" in config and "class_weighting" not in config and "ohem_thresh" not in config
    assert config["data_name"] == "voc-train.json" and len(config["data_sha256"]) == 64  # "same data?" by content
    for key in ("data", "run_dir", "group", "tags", "notes", "resolved", "resume"):
        assert key not in config
    assert not any(isinstance(v, (dict, list)) for v in config.values())  # no nested tables
    assert not any(isinstance(v, str) and v.startswith("/") for v in config.values())  # no local paths
    assert run["run"].run_group == "study" and list(run["run"].tags) == ["a", "b"]
    assert run["run"].notes == "a test run" and run["run"].display_name == "first-run"


def test_best_model_is_logged_during_training(first):
    run = the_run(first)
    models = [a for a in run["artifacts"] if a.type == "model"]
    vals = [r["val/miou"] for r in metrics_log(first) if "val/miou" in r]
    improvements = sum(v > max(vals[:i], default=-1) for i, v in enumerate(vals))
    assert len(models) == improvements >= 1  # a version each time best.pt improved
    assert {a.name for a in models} == {f"model-{run['run'].run_id}"}
    assert all("best" in a.aliases and "latest" in a.aliases for a in models)
    metadata = json.loads(models[-1].metadata)
    ckpt = torch.load(first / "best.pt", map_location="cpu", weights_only=True)
    assert metadata["step"] == ckpt["step"] and metadata["miou"] == pytest.approx(ckpt["metrics"]["miou"])


def test_overlays_are_the_smallest_val_ids_one_key_each(first, packed_shards):
    run = the_run(first)
    keys = {k for row in run["history"] for k in row if k.startswith("val/overlay/")}
    val_ids = sorted(sid for shard in json.loads(packed_shards["val"].read_text())["shards"] for sid in shard["ids"])
    assert keys == {f"val/overlay/{sid}" for sid in val_ids[:3]}


def test_image_scores():
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 2]])
    iou, acc = trackers.image_scores(mask, pred, 21)
    assert acc == pytest.approx(5 / 7)
    assert iou == pytest.approx((3 / 4 + 2 / 4 + 0 / 1) / 3)  # classes 0, 1, 2 present


def test_online_when_wandb_finds_a_key_for_its_self_hosted_host(tmp_path, offline_env, monkeypatch):
    assert trackers.wandb_mode() == "offline"
    from wandb.sdk import wandb_setup
    host = "wandb.example.internal:8080"
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text(f"[default]\nbase_url = http://{host}\n")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password local-{'0' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setattr(wandb_setup, "_singleton", None)
    assert trackers.wandb_mode() is None  # wandb logs in (online)
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password local-{'0' * 40}\n")
    monkeypatch.setattr(wandb_setup, "_singleton", None)
    assert trackers.wandb_mode() == "offline"  # a key for another host does not count
    monkeypatch.setenv("WANDB_MODE", "online")
    assert trackers.wandb_mode() is None


def test_dataset_artifact_holds_the_manifest_and_references_remote_shards(packed_shards, tmp_path, monkeypatch):
    """The real wandb.Artifact, no run: a local manifest is one file entry; a remote one (its
    shards served next to it) adds a reference per shard, which nothing fetches (port 9: closed)."""
    import base64
    import hashlib

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # the staging copies
    local = resolve_data(packed_shards["train"], "train")
    artifact = trackers.dataset_artifact(local)
    entry = artifact.manifest.entries["voc-train.json"]
    assert artifact.name == "data-voc-train" and artifact.type == "dataset" and len(artifact.manifest.entries) == 1
    assert entry.ref is None and entry.digest == base64.b64encode(
        hashlib.md5(packed_shards["train"].read_bytes()).digest()).decode()  # the file itself, copied
    assert artifact.metadata == {"dataset": "voc", "split": "train", "num_samples": 48, "shards": len(local.urls),
                                 "sha256": trackers.manifest_sha256(local.manifest)}
    base = "http://127.0.0.1:9/voc"
    remote = dataclasses.replace(local, location=f"{base}/voc-train.json",
                                 urls=tuple(f"{base}/{Path(url).name}" for url in local.urls))
    entries = trackers.dataset_artifact(remote).manifest.entries
    assert json.loads(Path(entries["voc-train.json"].local_path).read_text()) == local.manifest
    shards = {name: e for name, e in entries.items() if name != "voc-train.json"}
    assert sorted(e.ref for e in shards.values()) == sorted(remote.urls) and len(shards) == len(local.urls)
    assert all(e.local_path is None and e.digest == e.ref for e in shards.values())  # not downloaded
    assert trackers.dataset_artifact(resolve_data(str(local.urls[0]), "train")) is None  # no manifest


def test_loss_options_only_for_the_losses_that_use_them():
    assert trackers.loss_options_used("ce") == set()
    assert trackers.loss_options_used("weighted_ce+0.5*focal") == {"class_weighting", "focal_gamma"}


def test_the_train_loop_asks_no_tracker_by_name():
    source = (REPO / "segtrain" / "train.py").read_text()
    assert "cfg.tracker" not in source and '"wandb"' not in source


# ----------------------------------------------------------------------------- other trackers

def test_tensorboard_events_hold_the_training_and_the_evaluation(packed_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from segtrain.evaluate import main as evaluate_main
    run_dir = tmp_path / "tb"
    train(parse_config(args(packed_shards["train"], run_dir, "--iterations", "2", "--tracker", "tensorboard")))
    evaluate_main(["--checkpoint", str(run_dir / "best.pt"), "--data", str(packed_shards["val"]), "--workers", "0",
                   "--mixed-precision", "no", "--tracker", "tensorboard"])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    logged = metrics_log(run_dir)
    assert scalars["train/loss"] == pytest.approx({r["step"]: r["train/loss"] for r in logged if "train/loss" in r})
    assert scalars["val/miou"] == pytest.approx({2: logged[-1]["val/miou"]})
    assert scalars["images_seen"] == {1: 4, 2: 8}
    assert any(tag.startswith("val/iou/") for tag in scalars)
    result = json.loads((run_dir / "eval_val_whole.json").read_text())
    assert scalars["eval/val/whole/miou"] == pytest.approx({2: result["miou"]})


def test_jsonl_tracker_and_a_failing_tracker(packed_shards, tmp_path):
    run_dir = tmp_path / "j"
    train(parse_config(args(packed_shards["train"], run_dir, "--iterations", "2", "--tracker", "jsonl")))
    events = [json.loads(line) for line in (run_dir / "tracker.jsonl").read_text().splitlines()]
    # step 2: the train record, the validation record, then what only a validation has
    assert [e["event"] for e in events] == ["start", "log", "log", "log", "validation", "checkpoint", "finish"]
    assert events[0]["config"]["ce_weight"] == 1.0 and events[3]["images_seen"] == 8
    assert len(events[4]["per_image"]) == 16 and events[-1]["exit_code"] == 0
    # A tracker that raises at every call (its file is a folder) costs one warning, not the run.
    broken = tmp_path / "broken"
    (broken / "tracker.jsonl").mkdir(parents=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(parse_config(args(packed_shards["train"], broken, "--iterations", "2", "--tracker", "jsonl")))
    assert [str(w.message).split(" (")[0] for w in caught if "tracker" in str(w.message)] == ["tracker jsonl failed"]
    assert (broken / "final.pt").is_file() and result.best_miou > 0


# ----------------------------------------------------------------------------- processes

def gather_rank(out: Path, data: str) -> None:
    """One rank: the validation samples of its share of the split, gathered (to rank 0 only)."""
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    samples = trackers.ValidationSamples(3, (0.5,) * 3, (0.25,) * 3, num_classes=21)
    for images, masks, ids in loaders.val_loader(resolve_data(data, "val"), num_workers=1,
                                                 rank=accelerator.process_index,
                                                 world_size=accelerator.num_processes):
        samples(images.float(), masks, masks, ids)
    got = samples.gather(accelerator)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(
        {"overlays": [e["id"] for e in got.get("examples", [])],
         "per_image": [r[0] for r in got.get("per_image", [])]}))


def test_processes_gather_the_same_samples_to_rank_0(packed_shards, tmp_path, debug_launch):
    """2 gloo processes: only the gather of the validation samples, not a training."""
    processes = 2
    debug_launch(gather_rank, tmp_path, str(packed_shards["train"]), processes=processes)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(processes)]
    samples = trackers.ValidationSamples(3, (0.5,) * 3, (0.25,) * 3, 21)  # one process reading the whole split
    for images, masks, ids in loaders.val_loader(resolve_data(packed_shards["train"], "val"), num_workers=0):
        samples(images.float(), masks, masks, ids)
    assert ranks[0]["overlays"] == sorted(samples.kept)
    assert ranks[0]["per_image"] == sorted(r[0] for r in samples.rows)  # every image once
    assert all(r == {"overlays": [], "per_image": []} for r in ranks[1:])  # gathered to rank 0 only


def launch(data, run_dir, *extra, stop_after=None, kill_core=False, stop_training=True, env=None):
    """``python -m segtrain.train`` in its own process; with ``stop_after``, once metrics.jsonl reaches
    that step, SIGTERM to wandb's helper ``wandb-core`` (``kill_core``) and/or the training, all at
    once as SLURM signals every process of a job. Returns the CompletedProcess."""
    import psutil
    cmd = [sys.executable, "-m", "segtrain.train", *args(data, run_dir, *extra)]
    env = (env or os.environ) | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    if stop_after is not None:
        log = run_dir / "metrics.jsonl"
        while proc.poll() is None and not (log.is_file() and any(
                json.loads(line)["step"] >= stop_after for line in log.read_text().splitlines())):
            time.sleep(0.1)
        core = [p for p in psutil.Process(proc.pid).children(recursive=True) if "wandb-core" in p.name()]
        assert not kill_core or core, "no wandb-core child found"
        for target in (core if kill_core else []) + ([psutil.Process(proc.pid)] if stop_training else []):
            target.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_a_dead_wandb_core_costs_one_warning_and_training_finishes(packed_shards, tmp_path, offline_env):
    run_dir = tmp_path / "r"
    done = launch(packed_shards["train"], run_dir, stop_after=1, kill_core=True, stop_training=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(FAILED) == 1 and "Traceback" not in done.stderr
    assert (run_dir / "final.pt").is_file() and max(r["step"] for r in metrics_log(run_dir)) == 4


@pytest.fixture(scope="module")
def job(packed_shards, tmp_path_factory):
    """A job's whole life: train, SIGTERM to every process (wandb-core included), --resume auto,
    SIGTERM to the training, --resume auto to the end, a resubmit of the finished job, evaluate --wandb."""
    root = tmp_path_factory.mktemp("job")
    run_dir, data = root / "run", packed_shards["train"]
    with pytest.MonkeyPatch.context() as patch:
        no_wandb_credentials(patch, root)
        flags = ("--iterations", "8", "--resume", "auto", "--crop-size", "33")  # what is logged, not the model
        a = launch(data, run_dir, *flags, stop_after=2, kill_core=True)
        stop_a = max(r["step"] for r in metrics_log(run_dir))
        b = launch(data, run_dir, *flags, stop_after=stop_a + 2)
        c = launch(data, run_dir, *flags)
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        d = launch(data, run_dir, *flags)
        after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        from segtrain.evaluate import main as evaluate_main
        evaluate_main(["--checkpoint", str(run_dir / "final.pt"), "--data", str(packed_shards["val"]),
                       "--workers", "0", "--mixed-precision", "no", "--wandb"])
    return {"run_dir": run_dir, "launches": (a, b, c, d), "unchanged": before == after}


def test_one_job_is_one_wandb_run(job):
    run_dir = job["run_dir"]
    a, b, c, d = job["launches"]
    assert [p.returncode for p in (a, b, c, d)] == [75, 75, 0, 0], [p.stderr[-2000:] for p in (a, b, c, d)]
    assert a.stderr.count(FAILED) == 1 and b.stderr.count(FAILED) == 0
    runs = all_runs(run_dir)
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert len(runs) == 4  # a, b, c and the evaluation: the resubmit opened none
    assert {run_id_of(r) for r in runs} == {run_id}
    assert runs[-2]["run"] is not None and runs[-1]["run"] is not None  # the finished training, the evaluation
    # every step once over all folders: what the killed attempt lost was sent by the next one
    seen = [(row["_step"], key) for r in runs for row in r["history"] for key in row if not key.startswith("_")]
    assert len(seen) == len(set(seen))
    assert sorted({step for step, _ in seen}) == list(range(1, 9))
    logged = {r["step"]: r for r in metrics_log(run_dir)}
    val = {row["_step"]: row["val/miou"] for r in runs for row in r["history"] if "val/miou" in row}
    assert val == {s: r["val/miou"] for s, r in logged.items() if "val/miou" in r}  # exactly metrics.jsonl's
    rows = [row for r in runs for row in r["history"]]
    assert all(row["images_seen"] == 4 * row["_step"] for row in rows if "train/loss" in row)
    assert any("val/per_image" in row for row in rows)
    best = max(r["val/miou"] for r in logged.values() if "val/miou" in r)
    assert runs[2]["summary"]["best/val_miou"] == best and runs[2]["summary"]["final/step"] == 8
    # evaluate --wandb adds its results to the training's run: one row in the runs table
    result = json.loads((run_dir / "eval_val_whole.json").read_text())
    assert runs[3]["summary"]["eval/val/whole/miou"] == pytest.approx(result["miou"])
    assert runs[3]["summary"]["eval/val/whole/num_images"] == 16


def test_a_stopped_attempt_is_not_finished(job):
    runs = all_runs(job["run_dir"])
    assert runs[0]["exit"] is None  # its wandb-core was killed: the run never closed ("crashed")
    assert runs[1]["preempting"] and runs[1]["exit"] == 75  # stopped cleanly: preempted, not "finished"
    assert runs[2]["exit"] == 0


def test_a_resubmitted_finished_job_opens_no_run_and_changes_no_file(job):
    assert job["unchanged"]
    assert "nothing to do" in job["launches"][3].stdout


def test_a_sweep_trial_records_the_agents_run_id(packed_shards, tmp_path, offline_env, monkeypatch):
    """As `wandb agent` runs a trial: WANDB_SWEEP_ID and WANDB_RUN_ID set; wandb ignores any other id
    asked for (here a stale RUN_DIR/wandb_id that a --resume auto would ask for)."""
    from segtrain.evaluate import main as evaluate_main
    run_dir = tmp_path / "trial"
    run_dir.mkdir()
    (run_dir / "wandb_id").write_text("stale0000000000")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep0001")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun0000001")
    train(parse_config(args(packed_shards["train"], run_dir, "--iterations", "2", "--resume", "auto",
                            "--lr=0.02", "--dice_weight=0.25")))  # as the agent passes a trial's parameters
    assert (run_dir / "wandb_id").read_text() == "agentrun0000001"
    for key in ("WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(key)
    evaluate_main(["--checkpoint", str(run_dir / "best.pt"), "--data", str(packed_shards["val"]), "--workers", "0",
                   "--mixed-precision", "no", "--wandb"])
    runs = all_runs(run_dir)
    assert [r["run"].run_id for r in runs] == ["agentrun0000001"] * 2
    assert "eval/val/whole/miou" in runs[1]["summary"] and runs[0]["config"]["lr"] == 0.02
    assert runs[0]["config"]["dice_weight"] == 0.25 and runs[0]["config"]["loss"] == "ce+0.25*dice"
