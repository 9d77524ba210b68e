"""The config derives its checks and its --help text from the code that owns each choice."""
import dataclasses

import pytest

from segtrain import config, inference, losses, model, schedule
from segtrain.config import ConfigError, TrainConfig, parse_config


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
