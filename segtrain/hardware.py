"""What this machine can do fast, and the settings that follow from it.

One owner for every hardware-dependent default, so that a default follows the machine
it runs on, never the machine it was measured on:

* ``choose_precision(requested, device)``: ``auto`` is bf16 on CUDA GPUs that compute it
  natively (compute capability >= 8.0: A100, A10, L4, H100, ...), fp16 with Accelerate's
  loss scaling on older ones (T4, V100). On a CPU, ``auto`` is decided
  by timing the model (segtrain/autotune.py), because no flag predicts it: with native
  bf16 (AVX-512-BF16) bf16 measured 1.8x faster than fp32 on an AMD EPYC Zen 4 and 1.1x
  slower on a Xeon without AMX. The CPU rule here is what runs without a measurement
  (``SEGTRAIN_NO_AUTOTUNE=1``, or when timing fails): bf16 only with native kernels and
  AMX, fp32 otherwise. On an AVX2-only CPU bf16 is emulated: 3.8x slower than fp32 on an
  AMD EPYC Zen 3, 25x slower with AVX2 kernels imitated on a Sapphire Rapids
  (docs/BENCHMARKS.md#model-step); autotune never times it there.
* ``compile_model(model)``: ``torch.compile`` with a one-line fallback to eager;
  ``compile_outcome(model)`` says, after the first call, whether a compiled graph ran.
* ``check_cuda_arch(device)``: a GPU the installed torch wheel has no kernels for is a
  one-line ConfigError, not a "no kernel image" traceback at the first convolution.
* ``describe()``: the lines bench/ scripts print above their tables.

Imitating an older CPU: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` make oneDNN
and ATen use AVX2 kernels only (checked by timing: bf16 becomes ~25x slower than fp32).
With torch 2.14 ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` answers False under
``ONEDNN_MAX_CPU_ISA=AVX2`` but True under ``ATEN_CPU_CAPABILITY=avx2`` alone, and a
private probe may change; ``cpu_bf16_native()`` reads both variables itself, so the
decision matches the kernels that will actually run.
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import torch

from segtrain.files import ConfigError

# Accepted values of --mixed-precision; "no" is Accelerate's spelling of fp32.
PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")
PRECISION_HELP = ("auto (bf16 on CUDA with bf16, fp16 on older CUDA GPUs; on CPUs the faster of fp32 and "
                  "bf16 timed on this machine, bf16 only where native; SEGTRAIN_NO_AUTOTUNE=1: bf16 only with "
                  "AMX) | bf16 | fp16 | no (fp32)")
CPU_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 instructions.
_ONEDNN_BF16_ISAS = re.compile(r"BF16|FP16|AMX|AVX10|^ALL$|^DEFAULT$")

Device = Union[torch.device, str]


# ----------------------------------------------------------------------------- probes

def cuda_capability(device: Device) -> tuple[int, int]:
    """(major, minor) compute capability, e.g. (7, 5) for a T4, (9, 0) for an H100."""
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


def cuda_arch_list() -> list[str]:
    """The GPU code the torch wheel carries: 'sm_80' (binary kernels), 'compute_90' (PTX)."""
    return torch.cuda.get_arch_list()


def cuda_gpu_name(device: Device) -> str:
    return torch.cuda.get_device_name(torch.device(device))


def mkldnn_bf16_supported() -> bool:
    """oneDNN's own check of the CPU flags (AVX-512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def cpu_amx_supported() -> bool:
    """Whether the CPU has AMX tiles (Intel Sapphire Rapids and later): where bf16 matrix
    units make bf16 convolutions ~2x faster than fp32. With AVX-512-BF16 alone it depends on
    the CPU (1.1x slower on a Xeon, 1.8x faster on a Zen 4: docs/BENCHMARKS.md), so without
    a measurement only AMX counts as fast bf16."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def cpu_capability() -> str:
    """The ATen kernel level in use: 'AVX512', 'AVX2', 'DEFAULT', ... (honours ATEN_CPU_CAPABILITY)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether bf16 runs on native kernels on this CPU, and what says so."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if capped and not _ONEDNN_BF16_ISAS.search(capped):
        return False, f"ONEDNN_MAX_CPU_ISA={capped}"
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().upper()
    if aten and not aten.startswith("AVX512"):
        return False, f"ATEN_CPU_CAPABILITY={aten.lower()}"
    if not mkldnn_bf16_supported():
        return False, cpu_capability()
    return True, cpu_capability()


# ----------------------------------------------------------------------------- decisions

_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)([a-z]?)$")


def _runs_on(arch: str, major: int, minor: int) -> bool:
    """Whether code built for ``arch`` runs on a GPU of compute capability major.minor: binary
    sm_XY kernels on the same major with minor >= Y ('a'/'f' variants on exactly XY), PTX
    compute_XY on any capability >= X.Y (the driver compiles it)."""
    match = _ARCH.match(arch)
    if match is None:
        return False
    kind, code_major, code_minor, suffix = match[1], int(match[2]), int(match[3]), match[4]
    if kind == "compute":
        return (major, minor) >= (code_major, code_minor)
    if suffix:
        return (major, minor) == (code_major, code_minor)
    return major == code_major and minor >= code_minor


def check_cuda_arch(device: Device) -> None:
    """ConfigError naming the GPU and the wheel when the installed torch has no kernels for it
    (e.g. a V100, sm_70, under a CUDA 13 wheel, which starts at sm_75)."""
    archs = cuda_arch_list()
    major, minor = cuda_capability(device)
    if archs and not any(_runs_on(arch, major, minor) for arch in archs):
        raise ConfigError(f"{cuda_gpu_name(device)} (compute capability {major}.{minor}, sm_{major}{minor}) is not "
                          f"supported by the installed torch {torch.__version__} (CUDA {torch.version.cuda} wheel, "
                          f"built for {' '.join(archs)}); install a torch wheel built for sm_{major}{minor}")


def accelerate_precision(precision: str) -> str:
    """The ``Accelerator(mixed_precision=...)`` value of a resolved precision."""
    return "no" if precision == "fp32" else precision


def autocast_dtype(precision: str, device: Device) -> Optional[torch.dtype]:
    """The autocast dtype for inference under a resolved precision (None = plain fp32)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and torch.device(device).type == "cuda":
        return torch.float16
    return None


def choose_precision(requested: Optional[str], device: Device) -> tuple[str, str]:
    """``(precision, reason)``: the precision to run in ('fp32', 'bf16' or 'fp16') and why.

    ``requested`` is one of PRECISIONS, or None for the precision ``accelerate launch`` was
    given (ACCELERATE_MIXED_PRECISION), auto when it was given none. An explicit choice is
    honoured, with a warning where it is slow (bf16 on a CPU without native bf16) and
    replaced by fp32 where it does nothing (fp16 on a CPU: Accelerate ignores it).
    """
    if requested is None:  # defer to `accelerate launch --mixed_precision` / its config file
        requested = os.environ.get("ACCELERATE_MIXED_PRECISION") or "auto"
    if requested not in PRECISIONS:
        raise ValueError(f"mixed_precision: must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    kind = torch.device(device).type
    if kind == "cuda":  # whatever the precision: without kernels for this GPU nothing runs
        check_cuda_arch(device)
    if requested in ("no", "fp32"):
        return "fp32", "requested"
    if kind == "cuda":
        if requested != "auto":
            return requested, "requested"
        # Not torch.cuda.is_bf16_supported(): in torch 2.14 it also counts emulated bf16 (True on a T4).
        major, minor = cuda_capability(device)
        if major >= 8:
            return "bf16", f"CUDA GPU with native bf16: compute capability {major}.{minor}"
        return "fp16", f"CUDA GPU without native bf16 (compute capability {major}.{minor}); fp16 with loss scaling"
    if kind != "cpu":
        return ("fp32", f"{kind} device: auto picks fp32") if requested == "auto" else (requested, "requested")
    native, evidence = cpu_bf16_native()
    if requested == "fp16":
        warnings.warn("mixed_precision fp16 does nothing on a CPU (Accelerate runs fp32); running fp32")
        return "fp32", "fp16 requested, but fp16 has no effect on CPU"
    if requested == "bf16":
        if not native:
            warnings.warn(f"mixed_precision bf16 on a CPU without native bf16 ({evidence}): bf16 is emulated "
                          "there and several times slower than fp32; --mixed-precision auto picks fp32")
            return "bf16", f"requested (emulated: CPU without native bf16: {evidence})"
        return "bf16", "requested"
    if native and cpu_amx_supported():
        return "bf16", f"CPU with native bf16: {evidence} + AMX"
    if native:
        return "fp32", (f"CPU with native bf16 ({evidence}) but no AMX, not timed: fp32 (bf16 is faster on some "
                        "such CPUs, slower on others)")
    return "fp32", f"CPU without native bf16: {evidence}"


def compile_model(model: torch.nn.Module, say=print, dynamic: Optional[bool] = None, backend: str = "inductor") -> bool:
    """``model.compile()`` in place (the module keeps its type and state_dict keys).

    Returns whether compiling was set up; torch.compile is lazy, so whether a compiled graph
    actually runs is known only after the first call: ask ``compile_outcome(model)`` then.
    When torch.compile is unavailable or fails here, says so in one line and leaves the model
    eager; errors at the first compiled call also fall back to eager (dynamo's
    ``suppress_errors``), which ``compile_outcome`` reports. ``dynamic=True`` compiles for any
    input size (evaluation, whose image sizes vary) instead of recompiling per size.
    """
    try:
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True
        before = dynamo_counts()
        model.compile(dynamic=dynamic, backend=backend)
        model._segtrain_dynamo_before = before  # a plain attribute: not in the state_dict
        return True
    except Exception as e:  # any failure: running eager is always correct
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        say(f"compile: torch.compile failed ({type(e).__name__}: {first}); running the model eagerly")
        return False


def dynamo_counts() -> dict[str, int]:
    """Process-wide dynamo counters: frames tried / compiled, graphs compiled, graph breaks."""
    from torch._dynamo.utils import counters
    return {"frames": counters["frames"]["total"], "frames_ok": counters["frames"]["ok"],
            "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def compile_outcome(model: torch.nn.Module) -> tuple[bool, str]:
    """After the first call of a ``compile_model``-ed module: (whether a compiled graph ran, a line).

    From dynamo's counters since compile_model: a backend that failed (no compiler, an
    unsupported op) under ``suppress_errors`` leaves frames tried but none compiled, and the
    model ran eagerly although ``compile_model`` returned True.
    """
    before = getattr(model, "_segtrain_dynamo_before", None)
    if before is None:
        return False, "compile: the model was not compiled; it runs eagerly"
    now = dynamo_counts()
    delta = {k: now[k] - before[k] for k in now}
    failed = delta["frames"] - delta["frames_ok"]
    if delta["graphs"] <= 0 or delta["frames_ok"] <= 0:
        return False, (f"compile: nothing was compiled ({failed} frame(s) failed, see the warnings above); "
                       "the model runs eagerly")
    return True, (f"compile: {delta['graphs']} graph(s) compiled, {failed} frame(s) fell back to eager, "
                  f"{delta['graph_breaks']} graph break(s)")


@contextlib.contextmanager
def evaluation_kernels() -> Iterator[None]:
    """For validation inside training: compiled modules run eagerly and cuDNN does not autotune.

    Validation images vary in size: a module compiled for the fixed training crop would
    recompile per size (or hit dynamo's recompile limit), and cudnn.benchmark would time
    every convolution algorithm again for each new size; both cost more than they save on
    a pass over the validation set that is a small share of a run. It is the same model and
    function (results equal up to kernel rounding).
    """
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def take_peak_memory_mb(device: Device) -> Optional[float]:
    """Peak CUDA memory allocated (MB) since the last call, then reset; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def precision_line(precision: str, reason: str) -> str:
    """'precision: fp32 (CPU without native bf16: AVX2)', printed once at start."""
    return f"precision: {precision} ({reason})"


# ----------------------------------------------------------------------------- description

def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU flags that decide kernel speed (Linux /proc/cpuinfo; empty elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS_SHOWN if f in have]
    return []


def device_name(device: Device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()}"


def describe() -> str:
    """Where a figure was measured: CPU model and flags, torch's kernels, threads, GPU."""
    native, evidence = cpu_bf16_native()
    lines = [f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); flags: {' '.join(cpu_flags()) or 'unknown'}",
             f"torch {torch.__version__}: CPU capability {cpu_capability()}, {torch.get_num_threads()} threads, "
             f"native CPU bf16: {'yes' if native else 'no'} ({evidence})"]
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    if caps:
        lines.append("imitating another CPU: " + " ".join(f"{k}={v}" for k, v in caps.items()))
    if hasattr(os, "getloadavg"):  # other jobs on the cores slow every figure down
        lines.append(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}")
    if torch.cuda.is_available():
        lines.append("GPU: " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    else:
        lines.append("GPU: none")
    return "\n".join(lines)


__all__ = ["PRECISIONS", "PRECISION_HELP", "choose_precision",
           "cpu_bf16_native", "accelerate_precision", "autocast_dtype", "compile_model", "compile_outcome",
           "check_cuda_arch", "evaluation_kernels", "take_peak_memory_mb",
           "precision_line", "describe", "device_name"]
