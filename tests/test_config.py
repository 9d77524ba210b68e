"""The config derives its checks and its --help text from the code that owns each choice."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from segtrain import config, inference, losses, model, schedule
from segtrain.config import ConfigError, TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("field, owner, new_value", [
    ("arch", model.HEADS, "fpn"),
    ("val_protocol", inference.PROTOCOLS, "sliding-window"),
    ("lr_schedule", schedule.SCHEDULES, "cosine"),
    ("class_weighting", losses.WEIGHTINGS, "sqrt_inverse"),
])
def test_a_choice_added_by_its_owner_is_accepted_without_touching_the_config(monkeypatch, field, owner, new_value):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError, match=f"{field}: must be one of {', '.join(owner)}"):
        parse_config([flag, new_value])
    monkeypatch.setitem(owner, new_value, f"the new {new_value} choice")
    assert getattr(parse_config([flag, new_value]), field) == new_value


def test_output_strides_are_the_ones_the_model_has_aspp_rates_for():
    assert config.FIELDS["output_stride"].metadata["choices"] is model.OUTPUT_STRIDES
    assert set(model.OUTPUT_STRIDES) == set(model.ASPP_RATES)
    with pytest.raises(ConfigError, match="output_stride: must be one of 8, 16"):
        parse_config(["--output-stride", "32"])


def test_loss_options_take_default_help_and_checks_from_the_loss():
    for name, option in losses.LOSS_OPTIONS.items():
        field = config.FIELDS[name]  # a loss option without its config field fails here
        assert field.default == option.default and field.metadata["help"] == option.help
    assert TrainConfig().focal_gamma == losses.FocalLoss(21).gamma
    with pytest.raises(ConfigError, match="focal_gamma: must be >= 0"):
        parse_config(["--focal-gamma", "-1"])


def test_loss_spec_is_checked_when_the_config_is_parsed():
    assert parse_config(["--loss", "weighted_ce+0.5*lovasz"]).loss == "weighted_ce+0.5*lovasz"
    with pytest.raises(ConfigError, match="loss: unknown loss 'hinge'"):
        parse_config(["--loss", "ce+hinge"])


def test_minimums_are_checked_per_field():
    with pytest.raises(ConfigError, match="grad_accum: must be >= 1, got 0"):
        parse_config(["--grad-accum", "0"])
    with pytest.raises(ConfigError, match="lr: must be >= 0"):
        parse_config(["--lr", "-0.1"])


def test_help_shows_each_field_with_its_owners_descriptions(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--focal-gamma" in text and losses.LOSS_OPTIONS["focal_gamma"].help in text
    assert f"ms-flip ({inference.PROTOCOLS['ms-flip']})" in text
    assert "deeplabv3plus (DeepLabV3+: ASPP on the deepest features" in text
    assert "poly ((1 - step / iterations) ** poly_power (DeepLab's))" in text
    assert "optimizer steps between validations; 0 = every epoch (default: 0)" in text
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f"{f.name} has no help text"


def test_collective_timeout_setting_reaches_the_process_group_arguments():
    from datetime import timedelta

    from segtrain import distributed

    assert parse_config([]).dist_timeout_min == distributed.DIST_TIMEOUT_MIN == 60
    assert parse_config(["--dist-timeout-min", "90"]).dist_timeout_min == 90
    with pytest.raises(ConfigError, match="dist_timeout_min: must be >= 1"):
        parse_config(["--dist-timeout-min", "0"])
    assert distributed.process_group_timeout(90) == timedelta(minutes=90)
    assert distributed.process_group_kwargs(90).to_kwargs() == {"timeout": timedelta(minutes=90)}


def test_each_loss_has_a_weight_flag_whose_help_its_owner_gives(capsys):
    weights = {name for name in config.FIELDS if name in losses.LOSS_WEIGHTS}
    assert weights == {f"{name}_weight" for name in losses.LOSSES}  # one per loss, none listed in config.py
    assert config.FIELDS["dice_weight"].metadata["help"] == losses.WEIGHT_HELP.format(name="dice")
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    assert "--dice-weight" in capsys.readouterr().out


def test_loss_weights_set_terms_and_the_config_holds_every_weight_as_a_number():
    cfg = parse_config(["--dice-weight", "0.5"])
    assert cfg.loss == "ce+0.5*dice" and (cfg.ce_weight, cfg.dice_weight, cfg.lovasz_weight) == (1.0, 0.5, 0.0)
    assert "-ce_0.5_dice-" in cfg.name  # the default run name names the resolved mix
    cfg = parse_config(["--loss", "ce+0.5*dice", "--dice_weight=0.25"])  # as a wandb agent passes it
    assert cfg.loss == "ce+0.25*dice" and cfg.dice_weight == 0.25  # the weight wins
    assert parse_config(["--loss", "ce+dice", "--ce-weight", "0"]).loss == "dice"
    for argv, error in ((["--ce-weight", "0"], "loss: no term left: ce_weight=0 remove(s) every term of 'ce'"),
                        (["--dice-weight", "-1"], "dice_weight: must be >= 0, got -1.0"),
                        (["--dice-weight", "inf"], "loss: dice_weight must be a finite number >= 0, got inf")):
        with pytest.raises(ConfigError) as caught:
            parse_config(argv)
        assert str(caught.value).startswith(error) and "\n" not in str(caught.value)


def test_a_saved_config_reads_back_and_a_later_loss_names_the_whole_mix(tmp_path):
    cfg = parse_config(["--loss", "ce+0.5*focal", "--lovasz-weight", "2", "--name", "r"])
    config.save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["loss"] == "ce+0.5*focal+2*lovasz"
    assert {k: saved[k] for k in losses.LOSS_WEIGHTS} == {"ce_weight": 1.0, "weighted_ce_weight": 0.0,
        "focal_weight": 0.5, "dice_weight": 0.0, "lovasz_weight": 2.0, "ohem_weight": 0.0}
    again = ["--config", str(tmp_path / "config.yaml")]
    assert parse_config(again) == cfg
    assert parse_config(again + ["--loss", "dice"]).loss == "dice"  # the file's weights no longer apply
    assert parse_config(again + ["--focal-weight", "0"]).loss == "ce+2*lovasz"


@pytest.mark.parametrize("sweep", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_a_sweep_passes_only_real_flags_and_varies_a_loss_weight_as_a_number(sweep):
    spec = yaml.safe_load(sweep.read_text())
    assert (REPO / spec["program"]).is_file() and spec["metric"]["name"] == "best/val_miou"
    params = spec["parameters"]
    for end in ("min", "max"):  # the agent's `${args}`: --key=value for each parameter
        values = {k: p.get("value", p.get("values", [None])[0]) if "min" not in p else p[end]
                  for k, p in params.items()}
        cfg = parse_config([f"--{k}={v}" for k, v in values.items()])
        assert all(getattr(cfg, k) == type(getattr(cfg, k))(v) for k, v in values.items())
    swept = [k for k in params if k in losses.LOSS_WEIGHTS and "distribution" in params[k]]
    assert swept, "the sweep varies no loss weight as a number"
    assert "loss" not in params  # wandb would show a swept loss as given, not the resolved mix
