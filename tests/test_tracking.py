"""What the wandb dashboard gets, read back from the offline run files (tests/wandb_reader.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segtrain import loaders, tracking
from segtrain.sources import resolve_data
from segtrain.config import parse_config
from segtrain.train import train
from wandb_reader import read_run

REPO = Path(__file__).resolve().parents[1]
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def args(data, run_dir, *extra):
    return ["--data", str(data), "--run-dir", str(run_dir), "--backbone", "resnet18", "--pretrained", "false",
            "--crop-size", "65", "--batch-size", "4", "--iterations", "6", "--workers", "0",
            "--log-every", "1", "--checkpoint-every", "3", "--val-every", "2", "--seed", "7",
            "--mixed-precision", "no", "--tracker", "wandb", "--num-val-images", "3", *extra]


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No WANDB_* variables, no netrc, no wandb settings file: wandb must go offline by itself."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    from wandb.sdk import wandb_setup
    monkeypatch.setattr(wandb_setup, "_singleton", None)  # settings read afresh from this environment


def metrics_log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def the_run(run_dir, run_id=None):
    run_id = run_id or (run_dir / "wandb_id").read_text().strip()
    files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, files
    return read_run(files[0])


def history(run, key):
    return {row["step"]: row[key] for row in run["history"] if key in row}


@pytest.fixture(scope="module")
def trained(packed_shards, tmp_path_factory):
    """A crashed-and-resumed run: the first launch ran to step 6 (checkpoints 3 and 6); what a kill
    after step 5 leaves (checkpoint 3, the log to step 5, its wandb folder) is resumed with a
    warmup (a smaller lr), so the resumed steps differ from the abandoned ones."""
    root = tmp_path_factory.mktemp("tracking")
    mp = pytest.MonkeyPatch()
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        mp.delenv(key)
    mp.setenv("NETRC", str(root / "no-netrc"))
    mp.setenv("WANDB_CONFIG_DIR", str(root / "wandb-config"))
    mp.setenv("WANDB_SILENT", "true")
    try:
        first = root / "first"
        train(parse_config(args(packed_shards["train"], first, "--group", "study", "--tags", "a,b",
                                "--notes", "a test run", "--log-model", "best", "--loss", "focal",
                                "--name", "first-run")))
        crashed = root / "crashed"
        crashed.mkdir()
        for name in ("config.yaml", "wandb_id"):
            shutil.copy(first / name, crashed / name)
        shutil.copytree(first / "checkpoints" / "step_0000003", crashed / "checkpoints" / "step_0000003")
        shutil.copytree(first / "wandb", crashed / "wandb")
        (crashed / "metrics.jsonl").write_text("".join(
            json.dumps(r) + "\n" for r in metrics_log(first) if r["step"] <= 5))
        train(parse_config(args(packed_shards["train"], crashed, "--group", "study", "--loss", "focal",
                                "--resume", "latest", "--warmup-iters", "50")))
    finally:
        mp.undo()
    return first, crashed


def test_summary_holds_the_best_and_the_final_validation(trained):
    first, _ = trained
    run = the_run(first)
    vals = {r["step"]: r["val/miou"] for r in metrics_log(first) if "val/miou" in r}
    best_step = max(vals, key=lambda s: (vals[s], -s))  # the first of equal bests, as best.pt
    assert run["summary"]["best/val_miou"] == pytest.approx(vals[best_step])
    assert run["summary"]["best/step"] == best_step
    assert run["summary"]["final/val_miou"] == pytest.approx(vals[6]) and run["summary"]["final/step"] == 6
    ckpt = torch.load(first / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["metrics"]["miou"] == pytest.approx(run["summary"]["best/val_miou"])
    assert any(m.glob_name == "*" and m.step_metric == "step" for m in run["metrics"])
    assert sorted(history(run, "val/miou")) == [2, 4, 6]


def test_per_class_iou_and_accuracy_are_scalars_named_by_class(trained):
    first, _ = trained
    run = the_run(first)
    last = {r["step"]: r for r in metrics_log(first) if "val/miou" in r}[6]
    for name, iou, acc in zip(VOC_CLASSES, last["val/iou"], last["val/class_acc"]):
        if iou is not None and iou == iou:  # classes absent from val have no IoU (NaN)
            assert history(run, f"val/iou/{name}")[6] == pytest.approx(iou)
            assert history(run, f"val/acc/{name}")[6] == pytest.approx(acc)
    assert len({k for row in run["history"] for k in row if k.startswith("val/iou/")}) >= 10
    assert any("val/per_class" in row for row in run["history"])  # the table is kept


def test_config_as_users_filter_it(trained):
    first, _ = trained
    run = the_run(first)
    config = run["config"]
    assert config["mixed_precision"] == "fp32" and config["mixed_precision_requested"] == "no"
    assert config["processes"] == 1 and config["per_process_batch"] == 4 and config["grad_accum"] == 1
    assert config["steps_per_epoch"] == 48 // 4
    assert config["dataset"] == "voc" and config["train_split"] == "train"
    assert config["train_images"] == 48 and config["val_images"] == 16
    assert "focal_gamma" in config and "class_weighting" not in config and "ohem_thresh" not in config
    assert config["group"] == "study" and run["run"].run_group == "study"
    assert list(run["run"].tags) == ["a", "b"] and run["run"].notes == "a test run"
    assert run["run"].display_name == "first-run"


def test_best_model_artifact_carries_its_metrics(trained):
    first, _ = trained
    run = the_run(first)
    models = [a for a in run["artifacts"] if a.type == "model"]
    assert [a.name for a in models] == [f"model-{run['run'].run_id}-best"]
    metadata = json.loads(models[0].metadata)
    ckpt = torch.load(first / "best.pt", map_location="cpu", weights_only=True)
    assert metadata["step"] == ckpt["step"] and metadata["miou"] == pytest.approx(ckpt["metrics"]["miou"])


def test_overlays_are_the_smallest_val_ids_one_key_each(trained, packed_shards):
    first, _ = trained
    run = the_run(first)
    keys = {k for row in run["history"] for k in row if k.startswith("val/overlay/")}
    val_ids = sorted(sid for shard in json.loads(packed_shards["val"].read_text())["shards"] for sid in shard["ids"])
    assert keys == {f"val/overlay/{sid}" for sid in val_ids[:3]}


def test_resume_is_a_new_run_with_one_consistent_history(trained, capsys):
    first, crashed = trained
    first_id = (first / "wandb_id").read_text().strip()
    resumed_id = (crashed / "wandb_id").read_text().strip()
    assert resumed_id != first_id
    run = the_run(crashed, resumed_id)
    assert run["config"]["resumed_from"] == {"run_id": first_id, "step": 3}
    assert run["run"].run_group == "study" and "resumed" in run["run"].tags
    steps = [row["step"] for row in run["history"]]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # each step once, in order
    got, logged = history(run, "train/loss"), {r["step"]: r["train/loss"] for r in metrics_log(crashed)
                                               if "train/loss" in r}
    original = {r["step"]: r["train/loss"] for r in metrics_log(first) if "train/loss" in r}
    assert got == pytest.approx(logged)
    assert all(got[s] == pytest.approx(original[s]) for s in (1, 2, 3))  # replayed from the log
    assert all(got[s] != pytest.approx(original[s]) for s in (5, 6))    # the resumed training's own
    vals = {r["step"]: r["val/miou"] for r in metrics_log(crashed) if "val/miou" in r}
    assert run["summary"]["best/val_miou"] == pytest.approx(max(vals.values()))
    assert run["summary"]["final/val_miou"] == pytest.approx(vals[6])
    folders = tracking.offline_folders(crashed)
    assert [f.name.rsplit("-", 1)[1] for f in folders] == [first_id, resumed_id]


def test_sync_message_names_every_offline_folder_in_order(packed_shards, tmp_path, offline_env, capsys):
    run_dir = tmp_path / "r"
    train(parse_config(args(packed_shards["train"], run_dir, "--iterations", "2", "--val-every", "2")))
    train(parse_config(args(packed_shards["train"], run_dir, "--iterations", "3", "--val-every", "2",
                            "--resume", "latest")))
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "wandb sync" in ln][-1]
    assert line.split("wandb sync ", 1)[1].split() == [str(p) for p in tracking.offline_folders(run_dir)]
    assert len(tracking.offline_folders(run_dir)) == 2


def test_resume_from_a_checkpoint_before_the_first_log_line(packed_shards, tmp_path, offline_env):
    """A stop signal (or --checkpoint-every below --log-every) can checkpoint before metrics.jsonl
    exists: the resumed run has nothing to replay, and goes on."""
    run_dir = tmp_path / "early"
    flags = ["--log-every", "100", "--checkpoint-every", "1", "--val-every", "100"]
    train(parse_config(args(packed_shards["train"], run_dir, "--iterations", "1", *flags)))
    (run_dir / "metrics.jsonl").unlink()  # as after a stop at step 1, before any line was written
    train(parse_config(args(packed_shards["train"], run_dir, "--iterations", "2", *flags, "--resume", "auto")))
    assert (run_dir / "final.pt").exists() and len(tracking.offline_folders(run_dir)) == 2


def test_online_when_wandb_finds_a_key_for_its_self_hosted_host(tmp_path, offline_env, monkeypatch):
    assert tracking.wandb_mode() == "offline"
    from wandb.sdk import wandb_setup
    host = "wandb.example.internal:8080"
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text(f"[default]\nbase_url = http://{host}\n")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password local-{'0' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setattr(wandb_setup, "_singleton", None)
    assert tracking.wandb_mode() is None  # wandb logs in (online)
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password local-{'0' * 40}\n")
    monkeypatch.setattr(wandb_setup, "_singleton", None)
    assert tracking.wandb_mode() == "offline"  # a key for another host does not count
    monkeypatch.setenv("WANDB_MODE", "online")
    assert tracking.wandb_mode() is None


def test_loss_options_only_for_the_losses_that_use_them():
    assert tracking.loss_options_used("ce") == set()
    assert tracking.loss_options_used("weighted_ce+0.5*focal") == {"class_weighting", "focal_gamma"}


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_share_one_wandb_id_and_pick_the_same_overlays(packed_shards, tmp_path, processes):
    """N-process gloo: only the id decision/broadcast and the overlay gather, not a training."""
    from conftest import _free_port
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "tests" / "tracking_worker.py"),
           str(tmp_path), str(packed_shards["train"])]
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(processes)]
    written = (tmp_path / "run" / "wandb_id").read_text()
    assert {r["id"] for r in ranks} == {written}
    # the same overlay ids as one process reading the whole split
    picker = tracking.OverlayPicker(3, (0.5,) * 3, (0.25,) * 3)
    for images, masks, ids in loaders.val_loader(resolve_data(packed_shards["train"], "val"), num_workers=0):
        picker(images.float(), masks, masks, ids)
    assert ranks[0]["overlays"] == sorted(picker.kept)


def test_evaluate_reads_the_split_its_manifest_names(trained, packed_shards, tmp_path, capsys):
    from segtrain.evaluate import main as evaluate_main
    first, _ = trained
    out = tmp_path / "eval.json"
    evaluate_main(["--checkpoint", str(first / "best.pt"), "--data", str(packed_shards["train"]),
                   "--workers", "0", "--mixed-precision", "no", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["split"] == "train" and result["num_images"] == 48
    assert "evaluating the train split" in capsys.readouterr().out


def test_evaluate_adds_its_results_to_the_training_run(trained, packed_shards, tmp_path, offline_env):
    from segtrain.evaluate import main as evaluate_main
    first, _ = trained
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("best.pt", "config.yaml", "wandb_id"):
        shutil.copy(first / name, run_dir / name)
    evaluate_main(["--checkpoint", str(run_dir / "best.pt"), "--data", str(packed_shards["val"]), "--workers", "0",
                   "--mixed-precision", "no", "--protocol", "ms-flip", "--wandb"])
    result = json.loads((run_dir / "eval_val_ms-flip.json").read_text())
    run = the_run(run_dir)  # the training's id: one row in the runs table
    assert run["summary"]["eval/val/ms-flip/miou"] == pytest.approx(result["miou"])
    assert run["summary"]["eval/val/ms-flip/num_images"] == 16
