"""The training loop: run outputs, exact resume, DDP, schedule, wandb offline, config errors."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from segtrain.config import ConfigError, parse_config
from segtrain.evaluate import evaluate
from segtrain.model import load_checkpoint
from segtrain import shards
from segtrain.train import lr_factor, main, train

REPO = Path(__file__).resolve().parents[1]


def base_args(data, run_dir, *extra):
    return ["--data", str(data), "--run-dir", str(run_dir), "--backbone", "resnet18", "--pretrained", "false",
            "--crop-size", "65", "--batch-size", "4", "--iterations", "6", "--workers", "1",
            "--lr-schedule", "step", "--step-size", "2", "--step-gamma", "0.5",
            "--log-every", "1", "--checkpoint-every", "3", "--val-every", "3", "--seed", "7", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def losses(records):
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def single_run(packed_shards, tmp_path_factory):
    """A short single-process run with wandb in offline mode (no key, no network)."""
    run_dir = tmp_path_factory.mktemp("runs") / "single"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    mp = pytest.MonkeyPatch()
    mp.setattr(os, "environ", env | {"NETRC": str(run_dir.parent / "no-netrc")})
    try:
        result = train(parse_config(base_args(packed_shards["train"], run_dir, "--tracker", "wandb")))
    finally:
        mp.undo()
    return run_dir, result


def test_single_run_writes_config_metrics_checkpoints_and_best(single_run):
    run_dir, result = single_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["backbone"] == "resnet18" and cfg["iterations"] == 6 and cfg["crop_size"] == 65
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert sorted(losses(records)) == [1, 2, 3, 4, 5, 6]
    vals = [r for r in records if "val/miou" in r]
    assert [r["step"] for r in vals] == [3, 6] and len(vals[0]["val/iou"]) == 21
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["metrics"]["miou"] == pytest.approx(max(r["val/miou"] for r in vals))
    assert ckpt["config"]["backbone"] == "resnet18"
    model, _ = load_checkpoint(run_dir / "final.pt")
    for a, b in zip(model.state_dict().values(), result.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wandb_offline_run_is_written(single_run):
    run_dir, _ = single_run
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("run-*.wandb"))
    media = list((offline[0] / "files" / "media").rglob("*"))
    assert any(p.suffix == ".png" for p in media), "val mask overlays were not logged"
    assert any("per_class_iou" in p.name for p in media), "per-class IoU table was not logged"


def test_resume_reproduces_the_uninterrupted_losses(single_run, packed_shards, tmp_path):
    run_dir, _ = single_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step_0000003", resumed / "checkpoints" / "step_0000003")
    main(base_args(packed_shards["train"], resumed, "--tracker", "none", "--resume", "latest"))
    want = losses(read_jsonl(run_dir / "metrics.jsonl"))
    got = losses(read_jsonl(resumed / "metrics.jsonl"))
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]


def test_lr_schedule_follows_optimizer_steps():
    cfg = parse_config(["--lr-schedule", "step", "--step-size", "1000", "--step-gamma", "0.9"])
    assert lr_factor(999, cfg) == 1.0 and lr_factor(1000, cfg) == pytest.approx(0.9)
    assert lr_factor(2500, cfg) == pytest.approx(0.81)
    poly = parse_config(["--lr-schedule", "poly", "--iterations", "100", "--warmup-iters", "10"])
    assert lr_factor(0, poly) == pytest.approx(0.1 * 1.0)
    assert lr_factor(50, poly) == pytest.approx(0.5 ** 0.9)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(single_run, packed_shards, tmp_path):
    """Real 2-process DDP on CPU (gloo): same weights on both ranks, the same lr schedule as
    one process, and validation metrics equal to a one-process evaluation of the weights."""
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(REPO / "tests" / "ddp_train_worker.py"), str(tmp_path),
           *base_args(packed_shards["train"], run_dir, "--tracker", "none")]
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["sha256"] == ranks[1]["sha256"]

    records = read_jsonl(run_dir / "metrics.jsonl")
    lrs = {r["step"]: (r["lr/backbone"], r["lr/head"]) for r in records if "lr/head" in r}
    single = {r["step"]: (r["lr/backbone"], r["lr/head"])
              for r in read_jsonl(single_run[0] / "metrics.jsonl") if "lr/head" in r}
    assert lrs == single and lrs[6] == (pytest.approx(0.001 * 0.25), pytest.approx(0.01 * 0.25))

    final_val = [r for r in records if "val/miou" in r][-1]
    model, _ = load_checkpoint(run_dir / "final.pt")
    torch.set_num_threads(1)
    metrics = evaluate(model, shards.val_loader(packed_shards["train"], num_workers=0), "cpu")
    assert final_val["step"] == 6
    assert final_val["val/miou"] == pytest.approx(metrics["miou"], abs=1e-12)
    assert final_val["val/pixel_acc"] == pytest.approx(metrics["pixel_acc"], abs=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1"], "unrecognized arguments"),
    (["--batch-size", "eight"], "batch_size: expected int, got 'eight'"),
    (["--arch", "deeplabv4"], "arch: must be one of deeplabv3, deeplabv3plus"),
    (["--iterations", "0"], "iterations: must be >= 1"),
    (["--mixed-precision", "fp8"], "mixed_precision: must be one of no, bf16, fp16"),
    (["--pretrained", "maybe"], "pretrained: expected true or false"),
])
def test_bad_config_values_are_rejected_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_yaml_config_and_unknown_yaml_key(tmp_path):
    good = tmp_path / "run.yaml"
    good.write_text("lr: 0.02\nloss: ce+dice\nbatch-size: 16\n")
    cfg = parse_config(["--config", str(good), "--lr", "0.03"])
    assert (cfg.lr, cfg.loss, cfg.batch_size) == (0.03, "ce+dice", 16)  # flags override YAML
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        parse_config(["--config", str(bad)])


def test_missing_data_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "nope.json"), "--run-dir", str(tmp_path / "r"), "--tracker", "none",
              "--backbone", "resnet18", "--pretrained", "false"])
    err = capsys.readouterr().err
    assert "segtrain: error:" in err and "nope.json" in err and "Traceback" not in err
