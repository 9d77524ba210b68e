"""segtrain.budget: the demo's steps are timed on the machine, not assumed."""
import sys

import pytest

from segtrain import autotune, budget, hardware, steptime


@pytest.mark.parametrize("budget_s, step_s, expected", [
    (240, 0.5, 150),    # fast CPU: the full recipe
    (240, 1.2, 113),    # slower: as many as fit after the reserve ((240 - 35 * 1.2) / (1.2 * 1.45) = 113.8)
    (240, 5.0, 60),     # too slow even for the minimum: the minimum, said by main()
])
def test_steps_within_fits_the_budget_between_min_and_max(budget_s, step_s, expected):
    assert budget.steps_within(budget_s, step_s, max_steps=150, min_steps=60, loader_factor=1.45,
                               reserve_steps=35) == expected


def test_seconds_per_step_runs_in_the_precision_training_will_choose(monkeypatch):
    """Autotune off (conftest): the flag rule's setting, timed by the step harness."""
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: (False, "AVX2"))
    seconds, setting = budget.seconds_per_step("resnet18", 65, 2, "auto", warmup=1, steps=1)
    assert seconds > 0 and setting == "fp32 + channels_last"
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: (True, "AVX512_BF16"))
    monkeypatch.setattr(hardware, "cpu_amx_supported", lambda: True)
    assert budget.seconds_per_step("resnet18", 65, 2, "auto", warmup=1, steps=1)[1] == "bf16 + channels_last"


def test_seconds_per_step_takes_the_autotune_measurement_that_training_reads(monkeypatch, tmp_path):
    """With the autotune on, the budget's step is the chosen candidate's measured step (nothing
    timed twice), and the measurement lands in the cache that training reads."""
    monkeypatch.delenv(autotune.ENV_OFF)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: (True, "AVX512"))
    monkeypatch.setattr(autotune, "load_average", lambda: 0.0)
    figures = {"fp32+cl": [0.7, 0.68], "fp32": [0.8, 0.8], "bf16+cl": [0.38, 0.36], "bf16": [0.5, 0.5]}
    monkeypatch.setattr(autotune, "measure", lambda shape, mode, crop, batch, candidates, model=None: figures)
    seconds, setting = budget.seconds_per_step("resnet18", 129, 8)
    assert setting == "bf16 + channels_last" and seconds == pytest.approx(0.37)
    key = autotune.cache_key(steptime.ModelShape(backbone="resnet18"), "train", 129, 8)
    assert autotune.cached_figures(key, list(figures)) == figures


def test_command_prints_the_steps_and_why(monkeypatch, capsys):
    """``python -m segtrain.budget`` (the demo reads its stdout), run as __main__ in this process."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["segtrain.budget", "--seconds", "1e6", "--max-steps", "7",
                                      "--crop-size", "65", "--batch-size", "2"])
    monkeypatch.delitem(sys.modules, "segtrain.budget")  # run as a script runs it: a fresh __main__
    try:
        runpy.run_module("segtrain.budget", run_name="__main__")
    except SystemExit as e:  # the command may end with sys.exit(main())
        assert not e.code, e.code
    out, err = capsys.readouterr()
    assert out.strip() == "7" and "the full 7 steps fit" in err
