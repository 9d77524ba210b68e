"""Precision and memory format on a CPU, decided by timing the model on this machine.

No rule over CPU flags predicts whether bf16 pays off: measured DeepLabV3+ training
steps went from 3.8x slower (AVX2 Zen 3: bf16 emulated) through 1.1x slower (Xeon with
AVX-512-BF16, no AMX) to 1.8x faster (Zen 4 with AVX-512-BF16, no AMX) and 1.6-2x faster
(Xeon with AMX) (docs/BENCHMARKS.md#precision-by-cpu-class). So ``--mixed-precision auto``
on a CPU times a few steps of the model being run (its arch, backbone, classes, output
stride; a small crop; the real per-process batch) in each candidate setting, fp32 and bf16,
each with channels_last on and off, threads as they are, and takes the fastest. bf16 is
not a candidate where its kernels are emulated (``hardware.cpu_bf16_native()``).

* Once per machine: the figures are cached in ``<user cache>/segtrain/autotune.json`` under
  a key of CPU model + flags + torch version and kernels + threads + the model's shape and
  the step's size, so a later run (or the training run after the demo's budget) reads them.
  Figures taken while other jobs overloaded the CPUs are measured again once it is quieter.
* Once per run: in a multi-process run the main process measures while the others wait,
  and all use its result (``decide_once``).
* Explicit ``--mixed-precision fp32|bf16`` / ``--channels-last true|false`` override (what is
  left open is still measured); ``SEGTRAIN_NO_AUTOTUNE=1`` falls back to the flag rule of
  ``hardware.choose_precision`` with channels_last on, for reproducible CI timing.
* CUDA keeps ``hardware.choose_precision``'s rule and channels_last on.

Training (``training_runtime``) times training steps; evaluate, predict, report and sam
(``inference_precision``) time forward passes of the loaded model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from segtrain import distributed, hardware, steptime
from segtrain.checkpoints import RunDir
from segtrain.files import DataError, atomic_write_bytes, user_cache_dir

ENV_OFF = "SEGTRAIN_NO_AUTOTUNE"
CHANNELS_LAST_HELP = ("NHWC memory format: auto (measured on CPUs together with the precision, on on GPUs) | "
                      "true | false")
TRAIN_CROP_CAP = 129    # the measurement's crop: the run's crop, at most this (cost; the ratios hold at 257)
INFER_CROP = 257        # inference: one image of about VOC's size
ROUNDS, WARMUP = 2, 2   # timed steps per candidate (interleaved), untimed ones before (the first two
                        # build oneDNN primitives and optimizer state: several times a steady step)
DROP_SLOWER_THAN = 1.5  # after warm-up, a candidate this much slower than the best is not timed further
CACHE_VERSION = 1
RESOLVED_KEY = "resolved"  # config.yaml's record of what auto became (segtrain.config.RESOLVED_KEY)


@dataclass
class Choice:
    """A resolved precision and memory format, why, and the timings behind it."""

    precision: str
    channels_last: bool
    reason: str
    measured: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # candidate -> s per step
    cached: bool = False

    def seconds(self, name: Optional[str] = None) -> float:
        """Mean measured seconds per step of a candidate (default: the chosen one)."""
        times = self.measured[name or candidate_name(self.precision, self.channels_last)]
        return sum(times) / len(times)


@dataclass(frozen=True)
class Runtime:
    """What a run's "auto" settings became on this machine, and why: saved under ``resolved`` in
    config.yaml and in best.pt/final.pt, and sent to the dashboard (``to_dict``: the same keys as
    runs have always saved, so old runs read back). ``compiled`` is known only after the first step
    (``hardware.compile_outcome``): the loop records it with ``dataclasses.replace``."""

    mixed_precision: str = "fp32"
    precision_reason: str = "requested"
    channels_last: Optional[bool] = None
    device: Optional[str] = None             # hardware.device_name: a resume keeps the choice only here
    autotune: Optional[dict] = None          # the measurement: mode, crop, batch, cached, s_per_step
    compiled: Optional[bool] = None          # with --compile: whether a compiled graph ran

    def to_dict(self) -> dict[str, Any]:
        """The saved record (unset fields left out, as before this was a class)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, saved: Optional[dict]) -> "Runtime":
        """A saved record back (keys this version does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (saved or {}).items() if k in names})


def candidate_name(precision: str, channels_last: bool) -> str:
    return precision + ("+cl" if channels_last else "")


def enabled() -> bool:
    return os.environ.get(ENV_OFF, "").strip().lower() in ("", "0", "false", "no")


def cache_path() -> Path:
    return user_cache_dir() / "autotune.json"


def cache_key(shape: steptime.ModelShape, mode: str, crop: int, batch: int) -> str:
    """What the figures depend on: the CPU, torch and its kernels, threads, the model and the step."""
    caps = " ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ)
    return (f"v{CACHE_VERSION} | {hardware.cpu_model()} [{' '.join(hardware.cpu_flags())}] | torch {torch.__version__} "
            f"{hardware.cpu_capability()}{' ' + caps if caps else ''} | {torch.get_num_threads()} threads | "
            f"{mode} {shape.key()} crop {crop} batch {batch}")


def read_cache() -> dict:
    """The cached figures; an unreadable or damaged file counts as empty (it is measured again)."""
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_average() -> float:
    """Runnable jobs (1 min) per CPU: above 1, other jobs were taking turns with the timed steps."""
    return os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else 0.0


def write_cache(key: str, measured: dict[str, list[float]], load: float) -> None:
    cache = read_cache() | {key: {"s_per_step": measured, "load_per_cpu": round(load, 2)}}
    try:
        atomic_write_bytes(cache_path(), (json.dumps(cache, indent=1, sort_keys=True) + "\n").encode())
    except DataError as e:  # a read-only home: measure again next time, run now
        warnings.warn(f"autotune: could not cache the measurement ({e})")


def cached_figures(key: str, names: list[str]) -> Optional[dict[str, list[float]]]:
    """The cached s/step of ``names``; None when missing or damaged, or when they were measured on
    an overloaded machine that is quieter now (measured again, so a bad first measurement does
    not stick)."""
    entry = read_cache().get(key)
    figures = entry.get("s_per_step") if isinstance(entry, dict) else None
    if not isinstance(figures, dict):
        return None
    then = entry.get("load_per_cpu", 0.0)
    if isinstance(then, (int, float)) and then > 1.0 and load_average() < then:
        return None
    try:
        got = {n: [float(t) for t in figures[n]] for n in names}
    except (KeyError, TypeError, ValueError):
        return None
    return got if all(times and min(times) > 0 for times in got.values()) else None


def measure(shape: steptime.ModelShape, mode: str, crop: int, batch: int, candidates: list[tuple[str, bool]],
            model: Optional[torch.nn.Module] = None) -> dict[str, list[float]]:
    """Seconds per step of each candidate, timed round-robin (tests replace this function).

    Training builds a fresh model per candidate; inference times ``model`` itself (forward only)."""
    steps, was_training = {}, model is not None and model.training
    for precision, channels_last in candidates:
        net = model if model is not None else shape.build()
        steps[candidate_name(precision, channels_last)] = steptime.prepare(
            net, shape, crop, batch, precision, channels_last, mode)
    timings = steptime.time_interleaved(steps, ROUNDS, WARMUP, drop_slower_than=DROP_SLOWER_THAN)
    if model is not None:
        model.train(was_training)  # the timing put it in eval mode
    return {name: [round(t, 4) for t in timing.steps] for name, timing in timings.items()}


def precision_candidates(requested: Optional[str], device: torch.device) -> tuple[list[str], str]:
    """The precisions worth timing, and the reason to give when there is only one."""
    if requested is None:  # defer to `accelerate launch --mixed_precision` / its config file
        requested = os.environ.get("ACCELERATE_MIXED_PRECISION") or "auto"
    if requested != "auto" or not enabled():
        precision, reason = hardware.choose_precision(requested, device)
        return [precision], reason
    native, evidence = hardware.cpu_bf16_native()
    if not native:
        return ["fp32"], f"CPU without native bf16 ({evidence}): bf16 would be emulated, not timed"
    return ["fp32", "bf16"], ""


def decide(requested: Optional[str], channels_last: Optional[bool], device: torch.device,
           shape: steptime.ModelShape, crop: int, batch: int, mode: str = "train",
           model: Optional[torch.nn.Module] = None) -> Choice:
    """The precision (``requested``: one of hardware.PRECISIONS or None) and memory format
    (``channels_last``: None = auto) to run ``shape`` in, measured where more than one is open."""
    device = torch.device(device)
    if device.type != "cpu":
        precision, reason = hardware.choose_precision(requested, device)
        return Choice(precision, True if channels_last is None else channels_last, reason)
    precisions, reason = precision_candidates(requested, device)
    layouts = [channels_last] if channels_last is not None else [True, False] if enabled() else [True]
    candidates = [(p, cl) for p in precisions for cl in layouts]
    if len(candidates) == 1:
        return Choice(precisions[0], layouts[0], reason or "requested")
    names = [candidate_name(*c) for c in candidates]
    key = cache_key(shape, mode, crop, batch)
    measured, cached = cached_figures(key, names), True
    if measured is None:
        load = load_average()
        try:
            measured, cached = measure(shape, mode, crop, batch, candidates, model), False
        except Exception as e:  # a model that cannot be built fails later, with its own error
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            precision, why = hardware.choose_precision(requested, device)
            return Choice(precision, layouts[0], f"{why}; could not time the candidates ({first})")
        write_cache(key, measured, load)  # before: the timing itself adds to the load average
    best = min(candidates, key=lambda c: min(measured[candidate_name(*c)]))
    choice = Choice(best[0], best[1], "", measured, cached)
    choice.reason = measured_reason(choice, candidates, reason)
    return choice


def measured_reason(choice: Choice, candidates: list[tuple[str, bool]], given: str) -> str:
    """'measured 0.37 vs 0.68 s/step fp32 + channels_last on AMD EPYC; cached': the chosen setting
    against the fastest of the other precision (else of the other memory format)."""
    fastest = {candidate_name(*c): min(choice.measured[candidate_name(*c)]) for c in candidates}
    others = [c for c in candidates if c[0] != choice.precision] or \
             [c for c in candidates if c[1] != choice.channels_last]
    rival = min(others, key=lambda c: fastest[candidate_name(*c)])
    text = (f"measured {fastest[candidate_name(choice.precision, choice.channels_last)]:.2f} vs "
            f"{fastest[candidate_name(*rival)]:.2f} s/step {setting_text(*rival)} on {hardware.cpu_model()}"
            + ("; cached" if choice.cached else ""))
    return f"{given}; {text}" if given else text


def setting_text(precision: str, channels_last: bool) -> str:
    return precision + (" + channels_last" if channels_last else "")


def choice_line(runtime: Runtime) -> str:
    """'precision: bf16 + channels_last (measured 0.37 vs 0.68 s/step fp32 + channels_last on ...)'."""
    return f"precision: {setting_text(runtime.mixed_precision, bool(runtime.channels_last))} " \
           f"({runtime.precision_reason})"


def decide_once(decide_here: Callable[[], Choice], state: Any = None) -> Choice:
    """``decide_here()`` on the main process only; every process gets its result (others wait,
    so the timing is not slowed down by them, and all ranks run the same setting)."""
    if state is None:  # no run around it: this process alone
        return decide_here()
    return distributed.decided_by_main(decide_here, state)


def runtime_of(choice: Choice, device: torch.device, mode: str, crop: int, batch: int) -> Runtime:
    """What ``auto`` became, as saved in config.yaml, checkpoints and wandb (plan.runtime)."""
    measurement = {"mode": mode, "crop": crop, "batch": batch, "cached": choice.cached,
                   "s_per_step": choice.measured} if choice.measured else None
    return Runtime(choice.precision, choice.reason, choice.channels_last, hardware.device_name(device), measurement)


def training_runtime(cfg: Any, state: Any) -> Runtime:
    """The precision and memory format a training run uses on ``state``'s device (a PartialState),
    decided once for all its processes: ``plan.runtime``."""
    world = state.num_processes
    batch = max(1, cfg.batch_size // (world * cfg.grad_accum))  # plan_run checks the division
    shape = steptime.ModelShape(cfg.arch, cfg.backbone, cfg.num_classes or 21, cfg.output_stride,
                                cfg.separable, cfg.aux_loss_weight > 0)
    crop = min(cfg.crop_size, TRAIN_CROP_CAP)
    choice = decide_once(lambda: kept_on_resume(cfg, state.device) or decide(
        cfg.mixed_precision, cfg.channels_last, state.device, shape, crop, batch), state)
    return runtime_of(choice, state.device, "train", crop, batch)


def kept_on_resume(cfg: Any, device: torch.device) -> Optional[Choice]:
    """A resumed run whose precision and memory format are both auto keeps what its start
    resolved (RUN_DIR/config.yaml): the same numerics as the run it continues, even if a new
    measurement would now answer differently. Only on the same device (a requeued job may land
    on other hardware, where the saved choice can be emulated or unsupported: decided afresh)."""
    if not cfg.resume or cfg.mixed_precision != "auto" or cfg.channels_last is not None:
        return None
    if device.type == "cuda":  # the wheel must have kernels for this GPU, whatever is kept
        hardware.check_cuda_arch(device)
    try:
        saved = yaml.safe_load(RunDir(cfg.resolved_run_dir()).config.read_text())[RESOLVED_KEY]
        if saved.get("device") != hardware.device_name(device):
            return None
        choice = Choice(saved["mixed_precision"], bool(saved["channels_last"]),
                        f"{saved['precision_reason']}; kept from the run's start",
                        dict(saved.get("autotune", {}).get("s_per_step", {})))
    except (OSError, yaml.YAMLError, TypeError, KeyError, AttributeError):
        return None  # no such run yet: plan_run says so
    return choice if choice.precision in hardware.PRECISIONS else None


def inference_precision(requested: Optional[str], device: torch.device, model: torch.nn.Module,
                        say: Callable[[str], Any] = print, state: Any = None) -> tuple[str, str]:
    """``(precision, reason)`` for evaluate/predict/report/sam: forward passes of the loaded
    ``model`` timed in fp32 and bf16 (its memory format as loaded); says the choice once."""
    shape = steptime.ModelShape.of(getattr(model, "model_config", {}))
    # Timed in the memory format it runs in, and left in it: the kernels (and so, in bf16, the
    # last bits of the logits) of an evaluation follow the format, and evaluate gives the run's
    # channels_last model what its validation gave only if the timing does not convert it.
    layout = steptime.is_channels_last(model)
    choice = decide_once(lambda: decide(requested, layout, device, shape, INFER_CROP, 1, "infer", model), state)
    say(f"precision: {choice.precision} ({choice.reason})")
    return choice.precision, choice.reason


def inference_autocast(requested: Optional[str], device: torch.device, model: torch.nn.Module,
                       say: Callable[[str], Any] = print) -> Optional[torch.dtype]:
    """The autocast dtype of ``inference_precision`` (None = fp32)."""
    precision, _ = inference_precision(requested, device, model, say)
    return hardware.autocast_dtype(precision, device)


__all__ = ["Choice", "Runtime", "ENV_OFF", "CHANNELS_LAST_HELP", "decide", "measure", "cache_key", "cache_path",
           "training_runtime", "inference_precision", "inference_autocast", "choice_line", "decide_once"]
