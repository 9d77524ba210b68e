"""Learning-rate schedules (``--lr-schedule``): the multiplier of the base lr at each optimizer step.

A function of the optimizer step alone, set by the loop itself, so the schedule is identical on
1 or N processes (a scheduler passed through ``accelerator.prepare`` would step once per process).
A new schedule is one function here and one SCHEDULES entry (plus a config field per parameter).
"""
from __future__ import annotations

from typing import Callable, Protocol


class ScheduleSettings(Protocol):
    """The settings a schedule reads (a ``TrainConfig`` has them; config.py borrows SCHEDULES from
    here, so this module does not import it)."""

    lr_schedule: str
    iterations: int
    warmup_iters: int
    step_size: int
    step_gamma: float
    poly_power: float


def step_decay(step: int, cfg: ScheduleSettings) -> float:
    """x step_gamma every step_size steps (StepLR)"""
    return cfg.step_gamma ** (step // cfg.step_size)


def poly(step: int, cfg: ScheduleSettings) -> float:
    """(1 - step / iterations) ** poly_power (DeepLab's)"""
    return (1 - min(step, cfg.iterations) / cfg.iterations) ** cfg.poly_power


def constant(step: int, cfg: ScheduleSettings) -> float:
    """the base lr throughout"""
    return 1.0


SCHEDULES: dict[str, Callable[[int, ScheduleSettings], float]] = {"step": step_decay, "poly": poly, "constant": constant}


def lr_factor(step: int, cfg: ScheduleSettings) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): the schedule, then linear warmup."""
    factor = SCHEDULES[cfg.lr_schedule](step, cfg)
    if step < cfg.warmup_iters:
        factor *= (step + 1) / cfg.warmup_iters
    return factor
