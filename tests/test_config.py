from __future__ import annotations

import dataclasses

import pytest

from unetkit import config as cfg
from unetkit.errors import ConfigError
from unetkit.models.unet import UNetConfig


def test_json_round_trip_restores_tuples() -> None:
    c = UNetConfig(channels=(8, 16, 32), padding="valid")
    back = cfg.from_json(UNetConfig, cfg.to_json(c))
    assert back == c and isinstance(back.channels, tuple)


def test_unknown_key_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"'paddin'.*did you mean 'padding'"):
        cfg.from_dict(UNetConfig, {"paddin": "same"})
    with pytest.raises(ConfigError, match="did you mean 'norm'"):
        cfg.replace(UNetConfig(), nrom="group")


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        UNetConfig().dims = 3  # type: ignore[misc]


def test_bad_choice_lists_options() -> None:
    with pytest.raises(ConfigError, match="choose one of: same, valid"):
        cfg.check_choice("padding", "vaild", ("same", "valid"))
