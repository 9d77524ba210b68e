"""The device path on a CPU: SyncBN conversion, torch.compile's real outcome, peak-memory bookkeeping."""

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from conftest import randomize_batchnorm
from segtrain import hardware
from segtrain.config import parse_config
from segtrain.model import build_model
from segtrain.plan import plan_run
from segtrain.train import build_training, train


def test_sync_bn_keeps_timm_batchnorm_act_activation(packed_shards, tmp_path):
    """efficientnet_b0 uses timm's BatchNormAct2d (BN + SiLU in one module); torch's converter
    turned it into a bare SyncBatchNorm and dropped the SiLU (eval output difference ~1e4)."""
    cfg = parse_config(["--data", str(packed_shards["train"]), "--run-dir", str(tmp_path / "run"),
                        "--backbone", "efficientnet_b0", "--pretrained", "false", "--sync-bn", "true",
                        "--batch-size", "4", "--crop-size", "65", "--workers", "0", "--tracker", "none"])
    # sync_bn converts only for more than one process, and plans it only for GPUs; the model stays on the CPU.
    plan = plan_run(cfg, world_size=2, device_type="cuda")
    AcceleratorState._reset_state()
    model, _, _ = build_training(plan, Accelerator(cpu=True))
    synced = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert synced
    assert not [m for m in model.modules() if type(m) is torch.nn.BatchNorm2d or type(m).__name__ == "BatchNormAct2d"]
    assert any(type(m).__name__ == "SyncBatchNormAct" and not isinstance(m.act, torch.nn.Identity) for m in synced)

    plain = build_model(plan.cfg.arch, plan.cfg.backbone, plan.cfg.num_classes, plan.cfg.output_stride, False, None,
                        plan.cfg.separable)
    randomize_batchnorm(plain)
    model.load_state_dict(plain.state_dict())  # same keys: the conversion changes no state
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # eval: SyncBatchNorm uses its running statistics, no process group needed
        torch.testing.assert_close(model.eval()(x)["out"], plain.eval()(x)["out"])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches per code object (nn.Module._call_impl is shared): a failure in one test
    would mark that code as skipped for the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def test_compile_outcome_is_eager_when_the_backend_fails_at_the_first_call():
    model = tiny_model()
    # compile_model itself succeeds: torch.compile is lazy, the backend runs at the first call.
    assert hardware.compile_model(model, print, backend=failing_backend) is True
    out = model(torch.randn(1, 3, 8, 8))  # suppress_errors: falls back to eager, no exception
    assert out.shape == (1, 2, 8, 8)
    compiled, line = hardware.compile_outcome(model)
    assert compiled is False and "nothing was compiled" in line and "eagerly" in line


def test_compile_outcome_counts_the_graphs_that_ran():
    model = tiny_model()
    assert hardware.compile_model(model, print, backend="eager") is True  # dynamo capture, no C++ compiler
    compiled, line = hardware.compile_outcome(model)
    assert compiled is False  # not called yet: nothing ran
    model(torch.randn(1, 3, 8, 8))
    compiled, line = hardware.compile_outcome(model)
    assert compiled is True and line.startswith("compile: 1 graph(s) compiled")
    assert hardware.compile_outcome(tiny_model())[0] is False  # never compiled


def test_evaluation_kernels_run_compiled_modules_eagerly_and_restore_cudnn_benchmark():
    model = tiny_model()
    hardware.compile_model(model, print, backend="eager")
    before = hardware.dynamo_counts()
    torch.backends.cudnn.benchmark = True
    try:
        with hardware.evaluation_kernels():
            assert torch.backends.cudnn.benchmark is False
            for size in (8, 9, 11):  # validation sizes vary: no compile, no recompile
                model(torch.randn(1, 3, size, size))
        assert hardware.dynamo_counts() == before
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = False


def test_train_records_compiled_false_when_no_compiled_step_ran(packed_shards, tmp_path, monkeypatch, capsys):
    real = hardware.compile_model
    monkeypatch.setattr(hardware, "compile_model",
                        lambda model, say=print, **kw: real(model, say, backend=failing_backend))
    run_dir = tmp_path / "run"
    train(parse_config(["--data", str(packed_shards["train"]), "--run-dir", str(run_dir),
                        "--backbone", "resnet18", "--pretrained", "false", "--crop-size", "33",
                        "--batch-size", "2", "--iterations", "2", "--workers", "0", "--tracker", "none",
                        "--mixed-precision", "no", "--val-every", "2", "--compile", "true"]))
    assert "compile: nothing was compiled" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]["compiled"] is False
    ckpt = torch.load(run_dir / "final.pt", map_location="cpu", weights_only=True)
    assert ckpt["resolved"]["compiled"] is False


def test_peak_memory_is_none_off_cuda():
    assert hardware.take_peak_memory_mb("cpu") is None


def test_training_peak_memory_leaves_validation_out(monkeypatch):
    """A fake CUDA peak counter: the log window reports its training steps' peak, not the
    validation's in between, which validate() takes (and resets) for val/max_memory_mb."""
    from segtrain.train import LogWindow
    counter = {"peak": 0.0}

    def take(device):  # torch.cuda.max_memory_allocated, then reset_peak_memory_stats
        value, counter["peak"] = counter["peak"], 0.0
        return value
    monkeypatch.setattr(hardware, "take_peak_memory_mb", take)
    window = LogWindow(torch.device("cpu"))
    counter["peak"] = 100.0                  # training steps
    window.set_peak_aside()                  # the loop, before validate()
    counter["peak"] = 900.0                  # validation
    assert hardware.take_peak_memory_mb("cuda") == 900.0  # validate(): val/max_memory_mb
    counter["peak"] = 50.0                   # training again
    assert window.peak_memory() == {"max_memory_mb": 100.0}
    window.take(type("A", (), {"reduce": staticmethod(lambda t, op: t)})(), 4)  # next window starts afresh
    counter["peak"] = 70.0
    assert window.peak_memory() == {"max_memory_mb": 70.0}
