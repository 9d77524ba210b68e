"""Hardware-dependent defaults: precision, memory format and torch.compile, with the probes faked."""
import json

import pytest
import torch
import yaml

from segtrain import hardware
from segtrain.config import parse_config, save_config
from segtrain.files import ConfigError
from segtrain.train import train


@pytest.fixture
def machine(monkeypatch):
    """``machine(cuda_bf16=..., cpu_native=..., capability=...)`` fakes the hardware probes."""
    for var in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)

    def fake(cuda_bf16: bool = True, cpu_native: bool = True, capability: str = "AVX512", amx: bool = True) -> None:
        monkeypatch.setattr(hardware, "cpu_amx_supported", lambda: amx)
        monkeypatch.setattr(hardware, "cuda_capability", lambda device: (8, 0) if cuda_bf16 else (7, 5))
        monkeypatch.setattr(hardware, "cuda_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
        monkeypatch.setattr(hardware, "mkldnn_bf16_supported", lambda: cpu_native)
        monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
    return fake


@pytest.mark.parametrize("cuda_bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_bf16_where_supported_else_fp16(machine, cuda_bf16, expected):
    machine(cuda_bf16=cuda_bf16)
    precision, reason = hardware.choose_precision("auto", "cuda")
    assert precision == expected
    assert ("without native bf16" in reason) == (not cuda_bf16)
    assert hardware.accelerate_precision(precision) == expected  # Accelerate adds loss scaling for fp16
    assert hardware.autocast_dtype(precision, "cuda") == {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]


# The CUDA 13 wheel of torch 2.14.1 as installed here: no sm_70 (V100) kernels.
CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


@pytest.mark.parametrize("gpu, capability, expected", [
    ("Tesla T4", (7, 5), "fp16"), ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16"), ("NVIDIA L4", (8, 9), "bf16"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16")])
def test_auto_on_cuda_follows_the_compute_capability_not_emulated_bf16(monkeypatch, gpu, capability, expected):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(hardware, "cuda_capability", lambda device: capability)
    monkeypatch.setattr(hardware, "cuda_arch_list", lambda: CUDA13_ARCHS)
    monkeypatch.setattr(hardware, "cuda_gpu_name", lambda device: gpu)
    # What torch 2.14 answers on a T4: True, counting emulation. It must not decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    precision, reason = hardware.choose_precision("auto", "cuda:0")
    assert precision == expected and f"{capability[0]}.{capability[1]}" in reason
    assert hardware.choose_precision("fp16", "cuda:0") == ("fp16", "requested")  # explicit choices are kept


@pytest.mark.parametrize("capability, archs, supported", [
    ((7, 0), CUDA13_ARCHS, False),                  # V100 on the CUDA 13 wheel
    ((8, 9), CUDA13_ARCHS, True),                   # L4: sm_86 kernels run on sm_89
    ((7, 0), ["sm_80", "compute_70"], True),        # PTX the driver compiles
    ((9, 0), ["sm_80", "sm_90a"], True),            # arch-specific variant, exact match
    ((10, 3), ["sm_90a", "sm_80"], False)])
def test_a_gpu_the_wheel_has_no_kernels_for_is_one_line_naming_gpu_and_wheel(monkeypatch, capability, archs,
                                                                             supported):
    monkeypatch.setattr(hardware, "cuda_capability", lambda device: capability)
    monkeypatch.setattr(hardware, "cuda_arch_list", lambda: archs)
    monkeypatch.setattr(hardware, "cuda_gpu_name", lambda device: "Tesla V100-SXM2-16GB")
    if supported:
        assert hardware.choose_precision("auto", "cuda")[0] in ("bf16", "fp16")
        return
    for requested in ("no", "bf16"):  # not only auto: no precision runs without kernels
        with pytest.raises(ConfigError):
            hardware.choose_precision(requested, "cuda")
    with pytest.raises(ConfigError) as err:
        hardware.choose_precision("auto", "cuda")
    message = str(err.value)
    assert "\n" not in message and "Tesla V100-SXM2-16GB" in message
    assert f"sm_{capability[0]}{capability[1]}" in message and torch.__version__ in message
    assert " ".join(archs) in message


def test_auto_on_cpu_is_bf16_only_with_native_kernels(machine):
    machine(cpu_native=True, capability="AVX512")
    assert hardware.choose_precision("auto", "cpu") == ("bf16", "CPU with native bf16: AVX512 + AMX")
    machine(cpu_native=True, capability="AVX512", amx=False)  # AVX-512-BF16 alone: untimed, fp32
    precision, reason = hardware.choose_precision("auto", "cpu")
    assert precision == "fp32" and "no AMX" in reason
    machine(cpu_native=False, capability="AVX2")
    precision, reason = hardware.choose_precision("auto", "cpu")
    assert (precision, reason) == ("fp32", "CPU without native bf16: AVX2")
    assert hardware.precision_line(precision, reason) == "precision: fp32 (CPU without native bf16: AVX2)"
    assert hardware.accelerate_precision("fp32") == "no"
    assert hardware.autocast_dtype("fp32", "cpu") is None


@pytest.mark.parametrize("env", [{"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ATEN_CPU_CAPABILITY": "avx2"}])
def test_kernel_caps_in_the_environment_count_as_no_native_bf16(machine, monkeypatch, env):
    """An imitated AVX2 CPU (on a CPU whose flags have bf16) must get fp32, as a real one."""
    machine(cpu_native=True)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    precision, reason = hardware.choose_precision("auto", "cpu")
    assert precision == "fp32" and next(iter(env)) in reason
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # a cap that keeps bf16
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert hardware.choose_precision("auto", "cpu")[0] == "bf16"


def test_explicit_choices_are_honoured_with_warnings_where_slow_or_ignored(machine):
    machine(cuda_bf16=False, cpu_native=False, capability="AVX2")
    with pytest.warns(UserWarning, match="emulated .*several times slower than fp32"):
        precision, reason = hardware.choose_precision("bf16", "cpu")
    assert precision == "bf16" and "emulated" in reason and "AVX2" in reason
    with pytest.warns(UserWarning, match="fp16 does nothing on a CPU"):
        assert hardware.choose_precision("fp16", "cpu")[0] == "fp32"
    assert hardware.choose_precision("no", "cpu") == ("fp32", "requested")
    assert hardware.choose_precision("fp32", "cuda") == ("fp32", "requested")
    assert hardware.choose_precision("bf16", "cuda") == ("bf16", "requested")
    machine(cpu_native=True)
    assert hardware.choose_precision("no", "cpu")[0] == "fp32"  # explicit fp32 beats native bf16
    with pytest.raises(ValueError, match="must be one of auto, no, fp32, bf16, fp16"):
        hardware.choose_precision("fp8", "cpu")


def test_none_defers_to_the_accelerate_launch_config(machine, monkeypatch):
    machine(cpu_native=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert hardware.choose_precision(None, "cpu")[0] == "fp32"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert hardware.choose_precision(None, "cpu")[0] == "bf16"


def test_config_accepts_auto_values_and_reads_back_its_own_yaml(tmp_path):
    cfg = parse_config([])
    assert cfg.mixed_precision == "auto" and cfg.channels_last is None and cfg.compile is False  # None: auto
    (tmp_path / "c.yaml").write_text("mixed_precision: none\ncompile: true\n")
    cfg = parse_config(["--config", str(tmp_path / "c.yaml")])
    assert cfg.mixed_precision is None and cfg.compile is True
    save_config(cfg, tmp_path / "saved.yaml", resolved={"mixed_precision": "fp32"})
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["resolved"] == {"mixed_precision": "fp32"}
    assert parse_config(["--config", str(tmp_path / "saved.yaml")]) == cfg  # 'resolved' is not an input


def test_compile_falls_back_to_eager_in_one_line(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nlong details")
    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Conv2d(3, 2, 1)
    lines = []
    assert hardware.compile_model(model, lines.append) is False
    assert lines == ["compile: torch.compile failed (RuntimeError: no C++ compiler found); "
                     "running the model eagerly"]
    assert model(torch.zeros(1, 3, 4, 4)).shape == (1, 2, 4, 4)


def test_compile_compiles_in_place_keeping_the_module(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(fn) or fn)
    model = torch.nn.Conv2d(3, 2, 1)
    assert hardware.compile_model(model, print) is True
    assert seen and isinstance(model, torch.nn.Conv2d) and list(model.state_dict()) == ["weight", "bias"]


def test_describe_names_cpu_flags_capability_and_threads():
    text = hardware.describe()
    assert "CPU:" in text and "CPU capability" in text and f"{torch.get_num_threads()} threads" in text
    assert "GPU:" in text


@pytest.mark.parametrize("native, expected", [(False, "fp32"), (True, "bf16")])
def test_training_saves_the_chosen_precision_in_config_and_checkpoints(packed_shards, tmp_path, machine,
                                                                        monkeypatch, capsys, native, expected):
    machine(cpu_native=native, capability="AVX512" if native else "AVX2")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no working C++ compiler")
    monkeypatch.setattr(torch, "compile", no_compiler)  # --compile true must fall back, not fail
    run_dir = tmp_path / "run"
    train(parse_config(["--data", str(packed_shards["train"]), "--run-dir", str(run_dir),
                        "--backbone", "resnet18", "--pretrained", "false", "--crop-size", "65",
                        "--batch-size", "2", "--iterations", "1", "--workers", "0", "--tracker", "none",
                        "--compile", "true"]))
    reason = "CPU with native bf16: AVX512 + AMX" if native else "CPU without native bf16: AVX2"
    out = capsys.readouterr().out
    assert f"precision: {expected} + channels_last ({reason})" in out  # conftest: SEGTRAIN_NO_AUTOTUNE=1
    assert "compile: torch.compile failed (RuntimeError: no working C++ compiler); running the model eagerly" in out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["mixed_precision"] == "auto"
    assert saved["resolved"]["mixed_precision"] == expected and saved["resolved"]["precision_reason"] == reason
    for name in ("best.pt", "final.pt"):
        ckpt = torch.load(run_dir / name, map_location="cpu", weights_only=True)
        assert ckpt["resolved"]["mixed_precision"] == expected
        assert ckpt["resolved"]["precision_reason"] == reason
        assert ckpt["resolved"]["compiled"] is False
    assert json.dumps(saved["resolved"])  # plain data
