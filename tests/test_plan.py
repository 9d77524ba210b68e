"""The run plan: derived values and up-front checks of a training run, without starting one."""
import inspect
import os

import pytest
import torch

from segtrain import loaders
from segtrain.config import ConfigError, parse_config
from segtrain.autotune import Runtime
from segtrain.plan import plan_run


@pytest.fixture
def cfg_for(packed_shards, tmp_path):
    def make(*flags, data=None):
        return parse_config(["--data", str(data or packed_shards["train"]), "--run-dir", str(tmp_path / "run"),
                             "--crop-size", "65", "--seed", "3", *flags])
    return make


def test_batch_workers_and_steps_per_epoch(cfg_for, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's; this process may use 6 of them
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # this machine's processes, of 16 in all
    plan = plan_run(cfg_for("--batch-size", "16", "--workers", "4"), world_size=8)
    assert plan.workers == 3  # 6 usable CPUs / 2 processes on this machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert plan_run(cfg_for("--batch-size", "16", "--workers", "4"), world_size=8).workers == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    plan = plan_run(cfg_for("--batch-size", "8", "--grad-accum", "2", "--workers", "4"), world_size=2)
    assert plan.per_process_batch == 2 and plan.world_size == 2
    # 48 train images / (2 processes x 2 images) = 12 batches per rank = 6 steps of 2 micro-batches.
    assert plan.steps_per_epoch == 6
    assert plan_run(cfg_for("--batch-size", "8", "--workers", "0")).workers == 0
    assert not torch.distributed.is_initialized()  # planning 2 processes started none


def test_loader_arguments_are_the_loaders_own_and_make_the_data_order(cfg_for):
    plan = plan_run(cfg_for("--batch-size", "4", "--grad-accum", "2", "--workers", "1", "--color-jitter", "true"))
    train_params = set(inspect.signature(loaders.train_loader).parameters)
    assert set(plan.train_loader) == train_params - {"epoch", "rank", "skip", "take", "endless", "last_epoch",
                                                           "layouts"}
    assert set(plan.val_loader) <= set(inspect.signature(loaders.val_loader).parameters) - {"rank"}
    # The workers and pinning are not the data order: a resume on other hardware goes on.
    order_free = {"num_workers", "pin_memory", "node_cache_gb"}
    # The data as the user named it, not the resolved source (a checkpoint records plain values).
    order = {k: v for k, v in plan.train_loader.items() if k not in order_free | {"source"}}
    assert plan.data_order == {**order, "data": plan.cfg.data, "split": "train", "grad_accum": 2}
    assert plan.train_source is plan.train_loader["source"] and plan.val_source is plan.val_loader["source"]
    assert plan.train_loader["pin_memory"] is False and plan_run(cfg_for("--batch-size", "4"), device_type="cuda"
                                                                  ).train_loader["pin_memory"] is True
    assert plan.data_order["color_jitter"] is True and plan.data_order["scale"] == (0.5, 2.0)
    loader, batches = loaders.train_loader(**plan.train_loader, epoch=0, rank=0)
    assert batches // 2 == plan.steps_per_epoch == 12  # 48 / 2 per micro-batch / 2 micro-batches
    images, masks, _ = next(iter(loader))
    assert images.shape == (2, 3, 65, 65) and masks.shape == (2, 65, 65)
    other = plan_run(cfg_for("--batch-size", "4", "--grad-accum", "2", "--workers", "1", "--seed", "4"))
    assert {k for k in plan.data_order if plan.data_order[k] != other.data_order[k]} == {"seed", "color_jitter"}


@pytest.mark.parametrize("flags, world, device, message", [
    (["--batch-size", "6"], 4, "cuda", "global batch 6 must be divisible by processes x grad_accum = 4 x 1"),
    (["--batch-size", "4", "--grad-accum", "4"], 1, "cpu", "the image-pooling BatchNorm of ASPP needs at least 2"),
    (["--batch-size", "4", "--sync-bn", "true"], 2, "cpu", "SyncBatchNorm runs only on GPUs"),
    (["--batch-size", "64", "--grad-accum", "2"], 1, "cpu", "an epoch has only 1 batches of 32 per process"),
    (["--num-classes", "20"], 1, "cpu", "num_classes: 20, but the labels"),
    (["--resume", "/nonexistent/ckpt"], 1, "cpu", "is not a checkpoint folder"),
    (["--resume", "latest"], 1, "cpu", "no checkpoint in"),
])
def test_config_errors(cfg_for, flags, world, device, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_run(cfg_for(*flags), world_size=world, device_type=device)


def test_batch_one_per_process_is_allowed_with_sync_bn_on_gpus(cfg_for):
    plan = plan_run(cfg_for("--batch-size", "2", "--sync-bn", "true"), world_size=2, device_type="cuda")
    assert plan.per_process_batch == 1 and plan.notes == ()


def test_notes_for_small_unsynced_gpu_batches_and_validation_precision(cfg_for):
    fp16 = Runtime("fp16", "CUDA device without bf16")
    plan = plan_run(cfg_for("--batch-size", "8"), world_size=2, device_type="cuda", runtime=fp16)
    assert len(plan.notes) == 1 and "4 images per process and --sync-bn off" in plan.notes[0]
    assert plan.eval_autocast_dtype == torch.float16 and plan.runtime.mixed_precision == "fp16"
    # fp16 autocast exists only on GPUs: a CPU validates in fp32 (hardware.choose_precision warns).
    assert plan_run(cfg_for("--batch-size", "8"), runtime=fp16).eval_autocast_dtype is None
    bf16 = Runtime("bf16", "requested")
    assert plan_run(cfg_for(), runtime=bf16).eval_autocast_dtype == torch.bfloat16
    assert plan_run(cfg_for()).eval_autocast_dtype is None  # default: fp32


def test_existing_run_dir_needs_resume(cfg_for, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run; pass --resume latest"):
        plan_run(cfg_for())
    (tmp_path / "run" / "checkpoints" / "step_0000003").mkdir(parents=True)
    assert plan_run(cfg_for("--resume", "latest")).resume_from == tmp_path / "run" / "checkpoints" / "step_0000003"


def test_resume_on_another_process_count_keeps_the_global_batch(cfg_for, tmp_path):
    """Planned from the checkpoint's TrainState record, before anything is loaded: the per-process
    batch (its memory) kept where it can be, else lowered; one line when the batch cannot split."""
    step = tmp_path / "run" / "checkpoints" / "step_0000003"
    step.mkdir(parents=True)
    order = plan_run(cfg_for("--batch-size", "8"), world_size=2).data_order  # 2 processes x 4
    torch.save({"step": 3, "best_miou": 0.1, "data_order": order}, step / "custom_checkpoint_0.pkl")
    resume = ("--resume", "latest", "--batch-size", "8")
    fewer = plan_run(cfg_for(*resume), world_size=1)
    assert (fewer.per_process_batch, fewer.cfg.grad_accum, fewer.steps_per_epoch) == (4, 2, 6)
    assert fewer.resize.line().startswith("resume on another number of processes: processes 2 -> 1, "
                                          "accumulation 1 -> 2 (global batch 8 as before)")
    more = plan_run(cfg_for(*resume), world_size=4)
    assert (more.per_process_batch, more.cfg.grad_accum, more.steps_per_epoch) == (2, 1, 6)
    assert "processes 2 -> 4, per-process batch 4 -> 2 (global batch 8 as before)" in more.resize.line()
    assert more.resolved["processes"] == 4 and more.resolved["per_process_batch"] == 2
    # Epoch 0 was begun by 2 x 4 and goes on from step 3 (global sample 24) on 4 x 2; epoch 1 is 4 x 2's.
    assert more.layouts == ((0, 2, 4), (3, 4, 2))
    assert more.epoch_layouts(0) == ((0, loaders.Layout(2, 4)), (24, loaders.Layout(4, 2)))
    assert more.epoch_layouts(1) == ((0, loaders.Layout(4, 2)),)
    same = plan_run(cfg_for(*resume), world_size=2)
    assert same.resize is None and same.layouts == ((0, 2, 4),) and same.epoch_layouts(0) == ((0, loaders.Layout(2, 4)),)
    with pytest.raises(ConfigError, match=r"resume: the checkpoint's global batch 8 does not split into 3 processes x "
                                          r"at least 2 images; resume on 1, 2, 4 process\(es\)"):
        plan_run(cfg_for(*resume), world_size=3)
    with pytest.raises(ConfigError, match=r"global batch of 8 \(2 x 4 x 1\), this run asks for 16; resume with "
                                          r"--batch-size 8"):
        plan_run(cfg_for("--resume", "latest", "--batch-size", "16"), world_size=4)


def test_train_split_comes_from_the_manifest_and_val_must_be_disjoint(cfg_for, packed_shards):
    val = str(packed_shards["val"])
    plan = plan_run(cfg_for("--val-data", str(packed_shards["train"]), "--val-split", "train", data=val))
    assert plan.cfg.train_split == "val" and plan.train_source.split == "val"
    with pytest.raises(ConfigError, match="16 validation images are also training images"):
        plan_run(cfg_for(data=val))  # val manifest for both


def test_shard_patterns_without_a_split_need_val_data(cfg_for, packed_shards):
    pattern = str(packed_shards["dir"] / "voc-train-{000000..000004}.tar")
    with pytest.raises(ConfigError, match="shard patterns carry no split"):
        plan_run(cfg_for(data=pattern))
    plan = plan_run(cfg_for("--val-data", str(packed_shards["val"]), data=pattern))
    assert plan.steps_per_epoch == 48 // 8 and plan.class_pixel_counts is None


def test_when_the_loop_logs_validates_and_checkpoints(cfg_for):
    plan = plan_run(cfg_for("--batch-size", "8", "--iterations", "14", "--log-every", "5",
                            "--checkpoint-every", "4"))
    assert plan.steps_per_epoch == 6
    steps = range(1, 15)
    assert [s for s in steps if plan.validates_at(s)] == [6, 12, 14]  # every epoch, and at the end
    assert [s for s in steps if plan.logs_at(s)] == [5, 10, 14]
    assert [s for s in steps if plan.checkpoints_at(s)] == [4, 8, 12, 14]
    every3 = plan_run(cfg_for("--batch-size", "8", "--iterations", "7", "--val-every", "3"))
    assert [s for s in range(1, 8) if every3.validates_at(s)] == [3, 6, 7]
    assert plan.loss_options == {"class_weighting": "enet", "focal_gamma": 2.0, "ohem_thresh": 0.7,
                                 "ohem_min_kept": 100000}
    assert len(plan.class_pixel_counts) == 21


def test_resume_compares_the_loader_arguments_and_names_a_foreign_record(cfg_for):
    from segtrain.checkpoints import TrainState

    plan = plan_run(cfg_for("--batch-size", "4"))
    state = TrainState(plan.data_order)
    state.load_state_dict({"step": 3, "best_miou": 0.1, "data_order": dict(plan.data_order, crop_size=97)})
    with pytest.raises(ConfigError, match=r"trained with crop_size=97 \(now 65\)"):
        state.check_resume()
    state.load_state_dict({"step": 3, "best_miou": 0.1, "data_order": {"processes": 1, "seed": 3}})
    with pytest.raises(ConfigError, match=r"settings this version does not have \(processes\)"):
        state.check_resume()
    state.load_state_dict({"step": 3, "best_miou": 0.1, "data_order": plan.data_order})
    state.check_resume()


def test_runtime_reads_back_what_runs_saved_and_compiled_is_recorded_without_mutation(cfg_for):
    saved = {"mixed_precision": "bf16", "precision_reason": "measured 0.3 vs 0.5 s/step fp32", "channels_last": True,
             "device": "cpu: AMD EPYC", "autotune": {"mode": "train", "crop": 129, "batch": 2, "cached": False,
                                                    "s_per_step": {"bf16+cl": [0.3]}}, "compiled": False}
    assert Runtime.from_dict(saved).to_dict() == saved  # config.yaml "resolved" and checkpoints keep their keys
    assert Runtime.from_dict({**saved, "from_a_later_version": 1}) == Runtime.from_dict(saved)
    assert Runtime().to_dict() == {"mixed_precision": "fp32", "precision_reason": "requested"}
    plan = plan_run(cfg_for())
    compiled = plan.with_runtime(compiled=True)
    assert compiled.runtime.compiled is True and plan.runtime.compiled is None  # the plan stays frozen
    assert compiled.runtime.mixed_precision == plan.runtime.mixed_precision
