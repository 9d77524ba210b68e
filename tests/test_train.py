"""The training loop: run outputs, exact resume, DDP, schedule, wandb offline, config errors."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from segtrain.checkpoints import read_train_state
from segtrain.config import ConfigError, parse_config
from segtrain.inference import evaluate
from segtrain.model import load_checkpoint
from segtrain import loaders
from segtrain.sources import resolve_data
from segtrain.train import lr_factor, main, train
from conftest import TRAINED_RUN_FLAGS

REPO = Path(__file__).resolve().parents[1]


def base_args(data, run_dir, *extra):
    return ["--data", str(data), "--run-dir", str(run_dir), "--backbone", "resnet18", "--pretrained", "false",
            "--crop-size", "65", "--batch-size", "4", "--iterations", "6", "--workers", "1",
            "--lr-schedule", "step", "--step-size", "2", "--step-gamma", "0.5",
            "--log-every", "1", "--checkpoint-every", "3", "--val-every", "3", "--seed", "7",
            # fp32: the tests compare with fp32 evaluations (tests/test_hardware.py covers auto)
            "--mixed-precision", "no", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def losses(records):
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def run_args(data, run_dir, *extra):
    """The flags of the shared trained run (conftest.TRAINED_RUN_FLAGS), to resume it."""
    return ["--data", str(data), "--run-dir", str(run_dir), *TRAINED_RUN_FLAGS, *extra]


@pytest.fixture
def single_run(trained_run):
    """The session's one trained run (conftest.trained_run: wandb offline, 6 steps)."""
    return trained_run


def test_single_run_writes_config_metrics_checkpoints_and_best(single_run):
    run_dir, result = single_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["backbone"] == "resnet18" and cfg["iterations"] == 6 and cfg["crop_size"] == 65
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert sorted(losses(records)) == [1, 2, 3, 4, 5, 6]
    for r in (r for r in records if "images_per_s" in r):  # one step of 4 images per record
        assert 0 < r["data_wait_s"] < 4 / r["images_per_s"]  # waiting for batches is part of the step's time
    vals = [r for r in records if "val/miou" in r]
    assert [r["step"] for r in vals] == [3, 6] and len(vals[0]["val/iou"]) == 21
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["metrics"]["miou"] == pytest.approx(max(r["val/miou"] for r in vals))
    assert ckpt["config"]["backbone"] == "resnet18"
    model, final = load_checkpoint(run_dir / "final.pt")
    for a, b in zip(model.state_dict().values(), result.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert final["step"] == 6 and final["metrics"]["miou"] == pytest.approx(vals[-1]["val/miou"])
    # best.pt written at the last step is the same checkpoint: final.pt is then that file, not a copy
    assert os.path.samefile(run_dir / "best.pt", run_dir / "final.pt") == (ckpt["step"] == 6)


def test_wandb_offline_run_is_written(single_run):
    run_dir, _ = single_run
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    run_id = (run_dir / "wandb_id").read_text()
    assert offline[0].name.endswith(run_id) and len(run_id) == 16
    assert list(offline[0].glob("run-*.wandb"))
    media = list((offline[0] / "files" / "media").rglob("*"))
    assert any(p.suffix == ".png" for p in media), "val mask overlays were not logged"
    assert any("per_class" in p.name for p in media), "per-class IoU table was not logged"


def crashed_copy(run_dir, dst, step):
    """What a run killed after checkpoint ``step`` leaves: that checkpoint, the log lines up
    to a few steps later, and a line torn in half by the kill."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / f"step_{step:07d}", dst / "checkpoints" / f"step_{step:07d}")
    shutil.copy(run_dir / "config.yaml", dst / "config.yaml")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["step"] <= step + 1]
    (dst / "metrics.jsonl").write_text("\n".join(kept) + "\n" + lines[len(kept)][:25])


def test_resume_reproduces_the_uninterrupted_losses(single_run, packed_shards, tmp_path):
    run_dir, _ = single_run
    resumed = tmp_path / "resumed"
    crashed_copy(run_dir, resumed, 3)
    main(run_args(packed_shards["train"], resumed, "--tracker", "none", "--resume", "latest"))
    want = read_jsonl(run_dir / "metrics.jsonl")
    got = read_jsonl(resumed / "metrics.jsonl")  # every line parses: the torn one is gone
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert losses(got) == losses(want)  # steps 1-3 kept, 4-6 recomputed from the checkpoint
    a, _ = load_checkpoint(run_dir / "final.pt")
    b, _ = load_checkpoint(resumed / "final.pt")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_resume_with_other_data_order_settings_is_refused(single_run, packed_shards, tmp_path, capsys):
    run_dir, _ = single_run
    resumed = tmp_path / "resumed"
    crashed_copy(run_dir, resumed, 3)
    with pytest.raises(SystemExit):
        main(run_args(packed_shards["train"], resumed, "--tracker", "none", "--resume", "latest",
                       "--seed", "8"))
    assert "the checkpoint was trained with seed=7 (now 8)" in capsys.readouterr().err


def test_lr_schedule_follows_optimizer_steps():
    cfg = parse_config(["--lr-schedule", "step", "--step-size", "1000", "--step-gamma", "0.9"])
    assert lr_factor(999, cfg) == 1.0 and lr_factor(1000, cfg) == pytest.approx(0.9)
    assert lr_factor(2500, cfg) == pytest.approx(0.81)
    poly = parse_config(["--lr-schedule", "poly", "--iterations", "100", "--warmup-iters", "10"])
    assert lr_factor(0, poly) == pytest.approx(0.1 * 1.0)
    assert lr_factor(50, poly) == pytest.approx(0.5 ** 0.9)


def recording_drawn(drawn: list, patch=None) -> None:
    """Have train() note the ids of every micro-batch it takes, in ``drawn``: in this process for
    good, or while ``patch`` (a MonkeyPatch) lasts."""
    import segtrain.train

    real = segtrain.train.micro_batches

    def micro_batches(*args):
        for batch in real(*args):
            drawn.append(list(batch[2]))
            yield batch
    (patch or pytest.MonkeyPatch()).setattr(segtrain.train, "micro_batches", micro_batches)


def fingerprint(model) -> str:
    import hashlib

    params = torch.cat([p.detach().double().flatten() for p in model.state_dict().values() if p.is_floating_point()])
    return hashlib.sha256(params.numpy().tobytes()).hexdigest()


def train_rank(out_dir: Path, args: list) -> None:
    """One of 2 processes training with ``args``, rank 1's clock five hours ahead (so its default
    run name, with %H%M%S, differs from rank 0's): writes what this rank agreed on (run name and
    folder, a fingerprint of its weights), the ids of its micro-batches and what its own RNG
    draws next."""
    import time

    rank = int(os.environ["RANK"])
    if rank == 1:
        os.environ["TZ"] = "UTC-5"
        time.tzset()
    os.chdir(out_dir)  # no --run-dir: the default runs/<name>, here
    cfg = parse_config(args)
    drawn = []
    recording_drawn(drawn)
    result = train(cfg)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "own_name": cfg.name, "run_dir": str(result.run_dir.resolve()), "world": int(os.environ["WORLD_SIZE"]),
        "sha256": fingerprint(result.model), "drawn": drawn,
        "next_draw": torch.rand(4).tolist(),  # the global RNG after training: dropout's
    }))


def resumed_rank(out_dir: Path, args: list) -> None:
    """One process of a resume: writes what it printed, the ids of its micro-batches and its weights'
    fingerprint."""
    import contextlib
    import io

    drawn, printed = [], io.StringIO()
    recording_drawn(drawn)
    with contextlib.redirect_stdout(printed):
        result = train(parse_config(args))
    (out_dir / f"resumed{os.environ['RANK']}.json").write_text(json.dumps({
        "printed": printed.getvalue(), "drawn": drawn, "sha256": fingerprint(result.model)}))


def resume_on(processes: int, args: list, debug_launch, capsys, monkeypatch) -> tuple[str, list, list]:
    """Train ``args`` (a resume) on ``processes``: what the main process printed, each process's
    weights' fingerprint, and the ids of the micro-batches they took."""
    if processes > 1:
        run_dir = Path(args[args.index("--run-dir") + 1])
        debug_launch(resumed_rank, run_dir, args, processes=processes)
        done = [json.loads((run_dir / f"resumed{r}.json").read_text()) for r in range(processes)]
        return done[0]["printed"], [d["sha256"] for d in done], [sid for d in done for ids in d["drawn"] for sid in ids]
    drawn, threads = [], torch.get_num_threads()
    with monkeypatch.context() as patch:
        recording_drawn(drawn, patch)
        capsys.readouterr()
        torch.set_num_threads(1)  # as each launched process has: a busy machine's cores are not all free
        try:
            weights = [fingerprint(train(parse_config(args)).model)]
        finally:
            torch.set_num_threads(threads)
    return capsys.readouterr().out, weights, [sid for ids in drawn for sid in ids]


def test_two_process_ddp_matches_single_process_and_shares_one_run(single_run, packed_shards, tmp_path,
                                                                   debug_launch, capsys, monkeypatch):
    """Real 2-process DDP on CPU (gloo): same weights on both ranks, the same lr schedule as
    one process, and validation metrics equal to a one-process evaluation of the weights.
    Rank 1's clock is 5 hours ahead, so its default run name differs: both ranks must use rank
    0's name and folder (one folder, checkpoints with both ranks' RNG states), and still draw
    different dropout masks (per-rank seeds). Its checkpoint at step 3 (mid-epoch) resumed on 1
    process and on 4: the same global batch, one line of what changed, and the epoch goes on
    with the samples the 2 processes had not drawn."""
    small = ("--tracker", "none", "--batch-size", "8", "--crop-size", "33")  # the 4-process resume needs 8
    # One validation, at step 6 (the one compared below); the step-3 checkpoint is what the resumes need.
    args = base_args(packed_shards["train"], "unused", *small, "--val-every", "6")
    args = args[:2] + args[4:]  # no --run-dir: the default runs/<name>, from the clock
    debug_launch(train_rank, tmp_path, args)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert ranks[0]["own_name"] != ranks[1]["own_name"]  # the clocks did differ
    assert ranks[0]["run_dir"] == ranks[1]["run_dir"]
    run_dir = Path(ranks[0]["run_dir"])
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]
    for step in ("step_0000003", "step_0000006"):
        saved = sorted(p.name for p in (run_dir / "checkpoints" / step).glob("random_states_*.pkl"))
        assert saved == ["random_states_0.pkl", "random_states_1.pkl"]
    assert ranks[0]["next_draw"] != ranks[1]["next_draw"]

    records = read_jsonl(run_dir / "metrics.jsonl")
    lrs = {r["step"]: (r["lr/backbone"], r["lr/head"]) for r in records if "lr/head" in r}
    single = {r["step"]: (r["lr/backbone"], r["lr/head"])
              for r in read_jsonl(single_run[0] / "metrics.jsonl") if "lr/head" in r}
    assert lrs == single and lrs[6] == (pytest.approx(0.001 * 0.25), pytest.approx(0.01 * 0.25))

    final_val = [r for r in records if "val/miou" in r][-1]
    model, _ = load_checkpoint(run_dir / "final.pt")
    threads = torch.get_num_threads()
    metrics = evaluate(model, loaders.val_loader(resolve_data(packed_shards["train"], "val"), num_workers=0), "cpu",
                       threads=1)
    assert torch.get_num_threads() == threads
    assert final_val["step"] == 6
    assert final_val["val/miou"] == pytest.approx(metrics["miou"], abs=1e-12)
    assert final_val["val/pixel_acc"] == pytest.approx(metrics["pixel_acc"], abs=1e-12)

    # 48 images in global batches of 8: one epoch of 6 steps, every image once.
    epoch = sorted(sid for r in ranks for ids in r["drawn"] for sid in ids)
    assert len(epoch) == len(set(epoch)) == 48
    before = [sid for r in ranks for ids in r["drawn"][:3] for sid in ids]  # steps 1-3 (4 images per batch)
    saved_accum = {1: 2, 4: 1}
    for processes, changed, layout in ((1, "processes 2 -> 1, accumulation 1 -> 2", "4 images/process x 2"),
                                       (4, "processes 2 -> 4, per-process batch 4 -> 2", "2 images/process x 1")):
        resumed = tmp_path / f"on{processes}"
        crashed_copy(run_dir, resumed, 3)
        resume = base_args(packed_shards["train"], resumed, *small, "--resume", "latest")
        printed, weights, after = resume_on(processes, resume, debug_launch, capsys, monkeypatch)
        assert f"resumed from {resumed / 'checkpoints' / 'step_0000003'} at step 3" in printed
        assert (f"resume on another number of processes: {changed} (global batch 8 as before); the interrupted "
                "epoch goes on with the samples it had not used") in printed
        assert f"{processes} process(es) on cpu, precision fp32, {layout} accumulation = global batch 8" in printed
        assert len(set(weights)) == 1  # the processes trained one model
        # Steps 4-6 took the 24 images steps 1-3 had not: the epoch's 48, each once.
        assert len(after) == 24 and sorted(before + after) == epoch
        got = read_jsonl(resumed / "metrics.jsonl")
        assert [r["step"] for r in got if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
        assert load_checkpoint(resumed / "final.pt")[1]["step"] == 6
        # The run's layouts go on in its checkpoints: a later resume in this epoch continues it too.
        state = read_train_state(resumed / "checkpoints" / "step_0000006")
        assert state["layouts"] == [[0, 2, 4], [3, processes, 8 // processes // saved_accum[processes]]]
        saved = yaml.safe_load((resumed / "config.yaml").read_text())
        assert saved["batch_size"] == 8 and saved["grad_accum"] == saved_accum[processes]
        assert (saved["resolved"]["processes"], saved["resolved"]["per_process_batch"]) == (processes, 8 // processes
                                                                                             // saved["grad_accum"])


@pytest.mark.parametrize("argv, message", [
    (["--bogus", "1"], "unrecognized arguments"),
    (["--batch-size", "eight"], "batch_size: expected int, got 'eight'"),
    (["--arch", "deeplabv4"], "arch: must be one of deeplabv3, deeplabv3plus"),
    (["--iterations", "0"], "iterations: must be >= 1"),
    (["--mixed-precision", "fp8"], "mixed_precision: must be one of auto, no, fp32, bf16, fp16"),
    (["--pretrained", "maybe"], "pretrained: expected true or false"),
    (["--workers", "-1"], "workers: must be >= 0"),
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


@pytest.mark.parametrize("argv, message", [
    (["--loss", "hinge"], "unknown loss 'hinge'"),
    (["--backbone", "resnet_nope"], "unknown timm backbone 'resnet_nope'"),
    (["--backbone-weights", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
    (["--batch-size", "4", "--grad-accum", "4"], "the image-pooling BatchNorm of ASPP needs at least 2"),
    (["--num-classes", "20"], "num_classes: 20, but the labels"),
    (["--resume", "/nonexistent/ckpt"], "is not a checkpoint folder"),
])
def test_bad_model_or_loss_is_one_clear_error(packed_shards, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["--data", str(packed_shards["train"]), "--run-dir", str(tmp_path / "r"), "--tracker", "none",
              "--backbone", "resnet18", "--pretrained", "false", *argv])
    err = capsys.readouterr().err
    assert "segtrain: error:" in err and message in err and "Traceback" not in err


def test_existing_run_is_not_overwritten(single_run, packed_shards, capsys):
    run_dir, _ = single_run
    with pytest.raises(SystemExit):
        main(run_args(packed_shards["train"], run_dir, "--tracker", "none"))
    assert "already holds a run; pass --resume latest" in capsys.readouterr().err


def test_missing_data_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "nope.json"), "--run-dir", str(tmp_path / "r"), "--tracker", "none",
              "--backbone", "resnet18", "--pretrained", "false"])
    err = capsys.readouterr().err
    assert "segtrain: error:" in err and "nope.json" in err and "Traceback" not in err


def test_train_split_is_the_manifest_named_by_data_and_val_must_be_disjoint(packed_shards, tmp_path, capsys):
    """--data voc-trainval.json means trainval (not its voc-train.json sibling), and trainval
    contains val: validating there would score training images, so the run is refused."""
    from segtrain.pack import pack_split

    voc_root = json.loads(packed_shards["train"].read_text())["source_root"]
    pack_split(voc_root, "trainval", packed_shards["dir"], shard_size=10, progress=False)
    with pytest.raises(SystemExit):
        main(["--data", str(packed_shards["dir"] / "voc-trainval.json"), "--run-dir", str(tmp_path / "r"),
              "--backbone", "resnet18", "--pretrained", "false", "--tracker", "none"])
    err = capsys.readouterr().err
    assert "16 validation images are also training images" in err and "voc-trainval.json" in err


def test_unconnected_launch_is_refused(monkeypatch):
    """`accelerate launch --multi_gpu` without GPUs and without ACCELERATE_USE_CPU=1 starts
    processes that never join one group: each would train on everything alone."""

    from segtrain.cli import DisconnectedLaunch, check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DisconnectedLaunch, match="ACCELERATE_USE_CPU=1"):
        check_launch(1)
    check_launch(2)
    monkeypatch.delenv("WORLD_SIZE")
    check_launch(1)


def test_accumulation_aux_head_clipping_and_checkpoint_pruning(packed_shards, tmp_path):
    """fp32: a bf16 run's training and records are tests/test_hardware.py's (bf16 is emulated on
    AVX2 CPUs, ~25x slower) and that bf16 learns as fp32 does is tests/test_autotune.py's."""
    run_dir = tmp_path / "options"
    main(base_args(packed_shards["train"], run_dir, "--tracker", "none", "--grad-accum", "2",
                   "--aux-loss-weight", "0.4", "--grad-clip", "1.0",
                   "--iterations", "3", "--checkpoint-every", "1", "--keep-checkpoints", "2",
                   "--val-every", "3", "--log-every", "1", "--crop-size", "33"))  # 3 saves: enough to prune one
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert sorted(losses(records)) == [1, 2, 3]
    assert all(0 < loss < 100 for loss in losses(records).values())
    # 48 images / (1 process x 2 per micro-batch x 2 micro-batches) = 12 optimizer steps per epoch.
    assert [r["epoch"] for r in records if "train/loss" in r] == pytest.approx([1 / 12, 2 / 12, 3 / 12])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    model, ckpt = load_checkpoint(run_dir / "best.pt")
    assert model.model_config["aux_head"] and ckpt["config"]["grad_accum"] == 2
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 65, 65))
    assert set(out) == {"out", "aux"}


def test_resume_with_another_worker_count_is_exact(packed_shards, tmp_path):
    """A run with 1 loader worker, resumed with 2 (a machine with other cores): the batches do
    not depend on the workers, so the losses are the uninterrupted run's, crossing an epoch."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # 48 images / batch 8 = 6 steps per epoch: resume at 5, go on into the second epoch.
    flags = ["--tracker", "none", "--batch-size", "8", "--iterations", "8", "--checkpoint-every", "5",
             "--val-every", "100", "--crop-size", "33"]  # small crops: the property is the batches' order
    main(base_args(packed_shards["train"], full, *flags, "--workers", "1"))
    crashed_copy(full, resumed, 5)
    main(base_args(packed_shards["train"], resumed, *flags, "--workers", "2", "--resume", "latest"))
    expected = losses(read_jsonl(full / "metrics.jsonl"))
    assert len(expected) == 8 and losses(read_jsonl(resumed / "metrics.jsonl")) == expected


def test_a_step_that_raises_stops_the_loader_workers(packed_shards, tmp_path, monkeypatch):
    """The training and val loaders live for the whole run: a step that raises must not leave their
    workers running (or the stop-signal handlers installed) in a process that goes on."""
    import multiprocessing
    import signal

    from segtrain import train as train_module

    before = signal.getsignal(signal.SIGTERM)
    earlier = {p.pid for p in multiprocessing.active_children()}  # other tests' loaders may still run

    def broken(*args, **kwargs):
        raise RuntimeError("a failing step")
    monkeypatch.setattr(train_module, "lr_factor", lambda step, cfg: broken() if step == 2 else 1.0)
    with pytest.raises(RuntimeError, match="a failing step"):
        train_module.train(parse_config(["--data", str(packed_shards["train"]), "--run-dir", str(tmp_path / "r"),
                                         "--backbone", "resnet18", "--pretrained", "false", "--crop-size", "33",
                                         "--batch-size", "2", "--iterations", "4", "--workers", "2",
                                         "--val-every", "1",  # the val loader's workers have started too
                                         "--tracker", "none", "--mixed-precision", "no"]))
    assert [p for p in multiprocessing.active_children() if p.pid not in earlier] == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_validations_of_a_run_share_one_loader_whose_workers_start_once(packed_shards, tmp_path,
                                                                            monkeypatch):
    """Each process start is a fork of the training process, which on CPython <= 3.11.7 can hang
    for good when another thread starts or ends at that moment (loaders.val_loader): 3
    validations start the val loader's worker once, beside the training loader's."""
    import multiprocessing.process

    started = []
    start = multiprocessing.process.BaseProcess.start

    def counted(process):
        started.append(process)
        return start(process)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", counted)
    main(base_args(packed_shards["train"], tmp_path / "run", "--tracker", "none", "--iterations", "3",
                   "--val-every", "1", "--crop-size", "33"))
    assert len([r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "val/miou" in r]) == 3
    assert len(started) == 2  # one training loader worker (--workers 1), one val loader worker
