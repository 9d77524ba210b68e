"""segtrain.autotune: --mixed-precision auto on a CPU times the candidates, with the timing faked.

conftest.py turns the autotune off for every test (SEGTRAIN_NO_AUTOTUNE=1, a temporary cache
folder); the fixture ``tune`` here turns it back on with ``autotune.measure`` replaced by a
table of figures, so no assertion depends on how fast this machine is today.
"""
import json
import types

import pytest
import torch
import yaml

from segtrain import autotune, hardware, steptime
from segtrain.config import parse_config
from segtrain.train import train

SHAPE = steptime.ModelShape(backbone="resnet18")
CPU = torch.device("cpu")
ZEN4 = {"fp32+cl": [0.70, 0.68], "fp32": [0.75, 0.74], "bf16+cl": [0.38, 0.37], "bf16": [0.41, 0.40]}
XEON = {"fp32+cl": [2.11, 2.12], "fp32": [2.30, 2.31], "bf16+cl": [2.37, 2.40], "bf16": [2.60, 2.61]}


@pytest.fixture
def tune(monkeypatch, tmp_path):
    """``tune(figures, native=True)``: autotune on, bf16 native or emulated, ``measure`` answering
    ``figures`` (s/step per candidate); returns the list of calls (candidates, mode) it got."""
    monkeypatch.delenv(autotune.ENV_OFF, raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # an empty cache per test
    calls = []

    def setup(figures, native=True):
        monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: (native, "AVX512" if native else "AVX2"))
        monkeypatch.setattr(hardware, "cpu_amx_supported", lambda: False)
        monkeypatch.setattr(autotune, "load_average", lambda: 0.0)  # a quiet machine, unless a test says

        def fake_measure(shape, mode, crop, batch, candidates, model=None):
            calls.append((sorted(autotune.candidate_name(*c) for c in candidates), mode))
            return {autotune.candidate_name(*c): figures[autotune.candidate_name(*c)] for c in candidates}
        monkeypatch.setattr(autotune, "measure", fake_measure)
        return calls
    return setup


def test_bf16_faster_picks_bf16_and_says_the_figures(tune):
    calls = tune(ZEN4)
    choice = autotune.decide("auto", None, CPU, SHAPE, 129, 8)
    assert (choice.precision, choice.channels_last, choice.cached) == ("bf16", True, False)
    assert calls == [(["bf16", "bf16+cl", "fp32", "fp32+cl"], "train")]
    line = autotune.choice_line(autotune.runtime_of(choice, CPU, "train", 129, 8))
    assert line == (f"precision: bf16 + channels_last (measured 0.37 vs 0.68 s/step fp32 + channels_last on "
                    f"{hardware.cpu_model()})")


def test_fp32_faster_picks_fp32(tune):
    tune(XEON)
    choice = autotune.decide("auto", None, CPU, SHAPE, 129, 4)
    assert (choice.precision, choice.channels_last) == ("fp32", True)
    assert "measured 2.11 vs 2.37 s/step bf16 + channels_last" in choice.reason


def test_emulated_bf16_is_never_timed(tune):
    calls = tune(ZEN4, native=False)
    choice = autotune.decide("auto", None, CPU, SHAPE, 129, 8)
    assert calls == [(["fp32", "fp32+cl"], "train")]
    assert choice.precision == "fp32" and "bf16 would be emulated, not timed" in choice.reason


def test_cache_hit_skips_timing_and_says_cached(tune, monkeypatch):
    calls = tune(ZEN4)
    autotune.decide("auto", None, CPU, SHAPE, 129, 8)
    assert autotune.cache_path().is_file()
    again = autotune.decide("auto", None, CPU, SHAPE, 129, 8)
    assert len(calls) == 1 and again.cached and again.reason.endswith("; cached")
    assert (again.precision, again.measured) == ("bf16", ZEN4)
    # Another batch is another measurement (the key holds the step's size).
    autotune.decide("auto", None, CPU, SHAPE, 129, 4)
    assert len(calls) == 2


@pytest.mark.parametrize("change", ["torch", "cpu"])
def test_cache_key_changes_with_torch_version_or_cpu_model(tune, monkeypatch, change):
    calls = tune(ZEN4)
    before = autotune.cache_key(SHAPE, "train", 129, 8)
    autotune.decide("auto", None, CPU, SHAPE, 129, 8)
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    else:
        monkeypatch.setattr(hardware, "cpu_model", lambda: "Some Other CPU")
    assert autotune.cache_key(SHAPE, "train", 129, 8) != before
    autotune.decide("auto", None, CPU, SHAPE, 129, 8)
    assert len(calls) == 2  # measured again on the "new" machine


def test_corrupt_cache_file_is_measured_again(tune):
    calls = tune(ZEN4)
    autotune.cache_path().parent.mkdir(parents=True, exist_ok=True)
    autotune.cache_path().write_text("{not json")
    assert autotune.decide("auto", None, CPU, SHAPE, 129, 8).precision == "bf16"
    key = autotune.cache_key(SHAPE, "train", 129, 8)
    assert json.loads(autotune.cache_path().read_text())[key]["s_per_step"] == ZEN4  # rewritten whole
    autotune.cache_path().write_text(json.dumps({key: {"s_per_step": {"fp32": "fast"}}}))  # damaged entry
    assert not autotune.decide("auto", None, CPU, SHAPE, 129, 8).cached
    assert len(calls) == 2


def test_explicit_flags_bypass_the_measurement(tune):
    calls = tune(ZEN4)
    assert autotune.decide("fp32", False, CPU, SHAPE, 129, 8) == autotune.Choice("fp32", False, "requested")
    assert autotune.decide("no", True, CPU, SHAPE, 129, 8).precision == "fp32"
    assert calls == []
    # Only what is left open is timed: the memory format under an explicit precision.
    choice = autotune.decide("bf16", None, CPU, SHAPE, 129, 8)
    assert calls == [(["bf16", "bf16+cl"], "train")] and (choice.precision, choice.channels_last) == ("bf16", True)


def test_no_autotune_env_falls_back_to_the_flag_rule(tune, monkeypatch):
    calls = tune(ZEN4)
    monkeypatch.setenv(autotune.ENV_OFF, "1")
    choice = autotune.decide("auto", None, CPU, SHAPE, 129, 8)
    assert calls == [] and (choice.precision, choice.channels_last) == ("fp32", True)
    assert "no AMX" in choice.reason


def test_cuda_keeps_its_rule_without_timing(tune, monkeypatch):
    calls = tune(ZEN4)
    monkeypatch.setattr(hardware, "cuda_capability", lambda device: (8, 0))
    monkeypatch.setattr(hardware, "cuda_arch_list", lambda: ["sm_80"])
    choice = autotune.decide("auto", None, torch.device("cuda"), SHAPE, 129, 8)
    assert calls == [] and (choice.precision, choice.channels_last) == ("bf16", True)


def test_a_model_that_cannot_be_timed_falls_back_to_the_rule(tune, monkeypatch):
    tune(ZEN4)

    def broken(*args, **kwargs):
        raise RuntimeError("Expected more than 1 value per channel\ndetails")
    monkeypatch.setattr(autotune, "measure", broken)
    choice = autotune.decide("auto", None, CPU, SHAPE, 129, 1)
    assert choice.precision == "fp32" and "could not time the candidates (Expected more than 1" in choice.reason


def test_only_the_main_process_decides_and_all_get_its_choice(monkeypatch):
    import accelerate.utils
    sent = []

    def fake_broadcast(box, from_process=0):
        if box[0] is None:  # a non-main rank receives what the main rank sent
            box[0] = sent[-1]
        else:
            sent.append(box[0])
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", fake_broadcast)
    decided = []

    def decide_here():
        decided.append(1)
        return autotune.Choice("bf16", True, "measured")
    main = autotune.decide_once(decide_here, types.SimpleNamespace(num_processes=2, is_main_process=True))
    other = autotune.decide_once(decide_here, types.SimpleNamespace(num_processes=2, is_main_process=False))
    assert decided == [1] and main == other == autotune.Choice("bf16", True, "measured")


@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_times_forward_passes_of_the_loaded_model(tune, channels_last):
    """In the memory format the model was loaded in (evaluate puts a channels_last run's model in
    channels_last: its validation's kernels, so in bf16 its validation's figures)."""
    cl = "+cl" if channels_last else ""
    calls = tune({"fp32" + cl: [0.09], "bf16" + cl: [0.05]})
    model = SHAPE.build().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    lines = []
    assert autotune.inference_autocast("auto", CPU, model, lines.append) == torch.bfloat16
    assert calls == [(["bf16" + cl, "fp32" + cl], "infer")]
    setting = "fp32 + channels_last" if channels_last else "fp32"
    assert lines == [f"precision: bf16 (measured 0.05 vs 0.09 s/step {setting} on {hardware.cpu_model()})"]


def test_measure_times_every_candidate_with_the_step_harness():
    """The real timing function (no figures asserted): one entry per candidate, positive seconds."""
    shape = steptime.ModelShape(backbone="resnet18", num_classes=3)
    model = shape.build().to(memory_format=torch.channels_last).train()
    figures = autotune.measure(shape, "infer", 33, 1, [("fp32", True), ("bf16", True)], model=model)
    assert set(figures) == {"fp32+cl", "bf16+cl"}
    assert steptime.is_channels_last(model) and model.training  # the caller's model, as it was
    assert not steptime.is_channels_last(model.to(memory_format=torch.contiguous_format))
    # each timed ROUNDS times, or once (its last warm-up step) when dropped as a clear loser
    assert all(len(t) in (1, autotune.ROUNDS) and min(t) > 0 for t in figures.values())
    assert max(len(t) for t in figures.values()) == autotune.ROUNDS  # the fastest is always timed


def test_training_saves_the_measured_choice_and_uses_it(tune, packed_shards, tmp_path, capsys):
    calls = tune(ZEN4 | {"fp32+cl": [0.30], "bf16+cl": [0.50]})  # fp32 + channels_last fastest here
    run_dir = tmp_path / "run"
    train(parse_config(["--data", str(packed_shards["train"]), "--run-dir", str(run_dir),
                        "--backbone", "resnet18", "--pretrained", "false", "--crop-size", "65",
                        "--batch-size", "2", "--iterations", "1", "--workers", "0", "--tracker", "none"]))
    assert calls == [(["bf16", "bf16+cl", "fp32", "fp32+cl"], "train")]
    assert "precision: fp32 + channels_last (measured 0.30 vs 0.40 s/step bf16 on" in capsys.readouterr().out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["channels_last"] is True and saved["resolved"]["channels_last"] is True
    assert saved["resolved"]["mixed_precision"] == "fp32"
    assert saved["resolved"]["autotune"]["s_per_step"]["fp32+cl"] == [0.30]
    assert saved["resolved"]["autotune"]["batch"] == 2 and saved["resolved"]["autotune"]["crop"] == 65
    ckpt = torch.load(run_dir / "final.pt", map_location="cpu", weights_only=True)
    assert ckpt["resolved"]["autotune"]["s_per_step"] == saved["resolved"]["autotune"]["s_per_step"]


def test_channels_last_accepts_auto_true_false():
    assert parse_config([]).channels_last is None
    assert parse_config(["--channels-last", "auto"]).channels_last is None
    assert parse_config(["--channels-last", "false"]).channels_last is False
    assert parse_config(["--channels-last", "true"]).channels_last is True


def test_bf16_learns_as_fp32_does(packed_shards, tmp_path):
    """The same few steps in bf16 autocast and in fp32 give the same losses within bf16's
    rounding, and both go down: choosing bf16 for speed does not change what is learned."""
    curves = {}
    for precision in ("no", "bf16"):
        run_dir = tmp_path / precision
        train(parse_config(["--data", str(packed_shards["train"]), "--run-dir", str(run_dir),
                            "--backbone", "resnet18", "--pretrained", "false", "--crop-size", "65",
                            "--batch-size", "2", "--iterations", "6", "--workers", "0", "--tracker", "none",
                            "--lr", "0.01", "--log-every", "1", "--val-every", "100", "--seed", "3",
                            "--mixed-precision", precision, "--channels-last", "true"]))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[precision] = [r["train/loss"] for r in records if "train/loss" in r]
    fp32, bf16 = curves["no"], curves["bf16"]
    assert len(fp32) == len(bf16) == 6
    assert bf16[0] == pytest.approx(fp32[0], rel=0.01)  # the same weights and batch: rounding only
    # bf16 keeps 8 bits of mantissa (~0.4% per op); over steps of batch 2 the rounding grows to a few %
    assert bf16 == pytest.approx(fp32, rel=0.1)
    assert sum(bf16) == pytest.approx(sum(fp32), rel=0.05)
    assert min(fp32[-3:]) < fp32[0] and min(bf16[-3:]) < bf16[0]


def test_figures_from_an_overloaded_machine_are_measured_again_when_quieter(tune, monkeypatch):
    calls = tune(ZEN4)
    monkeypatch.setattr(autotune, "load_average", lambda: 3.0)  # 3 runnable jobs per CPU
    autotune.decide("auto", None, CPU, SHAPE, 129, 8)
    assert autotune.decide("auto", None, CPU, SHAPE, 129, 8).cached  # still as loaded: kept
    monkeypatch.setattr(autotune, "load_average", lambda: 0.5)
    assert not autotune.decide("auto", None, CPU, SHAPE, 129, 8).cached  # quieter: measured again
    assert autotune.decide("auto", None, CPU, SHAPE, 129, 8).cached  # and then kept
    assert len(calls) == 2


def autotune_rank(out_dir) -> None:
    """One of 2 processes resolving a run's precision, with a timing that differs by rank: rank 0's
    fake timing says bf16 is faster, rank 1's says fp32, so ranks that measured for themselves
    would disagree. Writes this rank's choice and whether it measured."""
    import os

    from accelerate import PartialState

    rank = int(os.environ["RANK"])
    measured = []
    os.environ.pop(autotune.ENV_OFF, None)
    os.environ["XDG_CACHE_HOME"] = str(out_dir / f"cache{rank}")  # no shared cache to agree through
    hardware.cpu_bf16_native = lambda: (True, "AVX512")

    def fake_measure(shape, mode, crop, batch, candidates, model=None):
        measured.append(1)
        fast = "bf16" if rank == 0 else "fp32"
        return {autotune.candidate_name(p, cl): [0.3 if p == fast else 0.6] for p, cl in candidates}

    autotune.measure = fake_measure
    state = PartialState(cpu=True)
    runtime = autotune.training_runtime(parse_config(["--backbone", "resnet18", "--batch-size", "4"]), state)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"runtime": runtime.to_dict(), "measured": len(measured),
                                                          "world": state.num_processes}))
    state.wait_for_everyone()


def test_two_processes_use_the_main_process_measurement(tmp_path, debug_launch):
    """Decided once per run: rank 0 measures, rank 1 waits and gets the same choice."""
    debug_launch(autotune_rank, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["measured"] for r in ranks] == [1, 0]
    assert ranks[0]["runtime"] == ranks[1]["runtime"] and ranks[1]["runtime"]["mixed_precision"] == "bf16"
    assert ranks[0]["runtime"]["autotune"]["batch"] == 2  # the per-process batch: 4 over 2 processes


def test_interleaved_timing_stops_timing_a_clear_loser_after_warm_up():
    import time
    calls = {"fast": 0, "slow": 0}

    def step(name, seconds):
        def run():
            calls[name] += 1
            time.sleep(seconds)
        return run
    timings = steptime.time_interleaved({"fast": step("fast", 0.002), "slow": step("slow", 0.05)}, rounds=3,
                                        warmup=2, drop_slower_than=1.5)
    assert calls == {"fast": 5, "slow": 2}  # the loser: its 2 warm-up steps only
    assert timings["slow"].steps == [timings["slow"].warmup[-1]] and len(timings["fast"].steps) == 3
    assert timings["slow"].fastest > timings["fast"].fastest


def test_a_resumed_run_keeps_the_setting_it_started_with(tune, packed_shards, tmp_path, capsys):
    calls = tune(ZEN4)
    run_dir = tmp_path / "run"
    flags = ["--data", str(packed_shards["train"]), "--run-dir", str(run_dir), "--backbone", "resnet18",
             "--pretrained", "false", "--crop-size", "65", "--batch-size", "2", "--workers", "0",
             "--tracker", "none", "--checkpoint-every", "1", "--val-every", "100"]
    train(parse_config(flags + ["--iterations", "1"]))
    tune(XEON)  # the machine now measures fp32 faster: the resumed run must not switch
    autotune.cache_path().unlink()
    train(parse_config(flags + ["--iterations", "2", "--resume", "latest"]))
    assert len(calls) == 1  # not measured again
    out = capsys.readouterr().out
    assert "precision: bf16 + channels_last (measured 0.37 vs 0.68 s/step fp32 + channels_last on" in out
    assert "; kept from the run's start)" in out


def test_a_resume_on_other_hardware_decides_afresh(tmp_path, monkeypatch):
    """A requeued job may land on another machine: the saved choice is kept only on the device
    that made it (a bf16 choice from a Zen 4 would be emulated on an AVX2 CPU)."""
    saved = {"mixed_precision": "bf16", "channels_last": True, "precision_reason": "measured",
             "device": "CPU AMD EPYC Zen 4"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({autotune.RESOLVED_KEY: saved}))
    cfg = types.SimpleNamespace(resume="latest", mixed_precision="auto", channels_last=None,
                                resolved_run_dir=lambda: tmp_path)
    monkeypatch.setattr(hardware, "device_name", lambda device: "CPU AMD EPYC Zen 4")
    kept = autotune.kept_on_resume(cfg, torch.device("cpu"))
    assert kept is not None and (kept.precision, kept.channels_last) == ("bf16", True)
    monkeypatch.setattr(hardware, "device_name", lambda device: "CPU AMD EPYC Zen 3")
    assert autotune.kept_on_resume(cfg, torch.device("cpu")) is None
