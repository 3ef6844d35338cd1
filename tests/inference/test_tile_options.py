"""TileOptions: one typed options object for tiling, checked once (ConfigError naming the
field), handed unchanged from the front-ends to predict_tiled; the CLI's flags take their
defaults from it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import unetkit
from unetkit.cli.main import build_parser
from unetkit.cli.predict import options_from_args
from unetkit.errors import ConfigError
from unetkit.inference import TileOptions
from unetkit.inference.tiling import predict_tiled, sliding_window
from unetkit.workflows.segment import InferenceOptions, inference_options


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tile", 0),
        ("tile", -3),
        ("tile", (64, 0)),
        ("tile", ()),
        ("tile", 12.5),
        ("tile", "256"),
        ("tile", True),
        ("overlap", 1.0),
        ("overlap", -0.1),
        ("overlap", float("nan")),
        ("overlap", "0.5"),
        ("batch_size", 0),
        ("batch_size", 2.0),
        ("batch_size", True),
        ("tta", "flips"),
        ("blend", "gausian"),
        ("sigma_scale", 0.0),
        ("sigma_scale", float("inf")),
        ("pad_mode", "mirror"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"TileOptions\.{field}") as info:
        TileOptions(**{field: value})
    assert "\n" not in str(info.value)


def test_good_values_are_kept_and_tiles_normalised() -> None:
    assert TileOptions(tile=np.int64(96)).tile == 96
    assert TileOptions(tile=[64, 48]).tile == (64, 48)  # a list (TOML, JSON) becomes a tuple
    opts = TileOptions(tile=32, overlap=0.0, batch_size=1, tta="flip_rot90", blend="constant")
    assert (opts.tile_size(3), opts.tta, opts.blend) == ((32, 32, 32), "flip_rot90", "constant")
    assert TileOptions().tile_size(2) is None
    with pytest.raises(ConfigError, match=r"TileOptions\.tile=\(8, 8\): give one size or 3"):
        TileOptions(tile=(8, 8)).tile_size(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.tile = 8  # type: ignore[misc]


def test_predict_tiled_runs_what_the_options_say() -> None:
    """Every field reaches the engine: the same call through TileOptions equals the engine
    called with those keywords, and a different blend/overlap changes the result."""
    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(4, 8)).eval()
    image = torch.rand(1, 40, 36)
    kw = dict(
        tile=16, overlap=0.5, batch_size=3, tta="flip", blend="constant", pad_mode="replicate"
    )
    got = predict_tiled(net, image, TileOptions(**kw))
    want = sliding_window(net, image, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gaussian = predict_tiled(net, image, TileOptions(**{**kw, "blend": "gaussian"}))
    assert not torch.equal(gaussian, want)


def test_cli_tile_flags_default_to_tile_options() -> None:
    for command in (["predict", "ckpt", "img", "--out", "o"], ["evaluate", "ckpt", "--data", "d"]):
        args = build_parser(command[0]).parse_args(command)
        for field in ("tile", "overlap", "tta", "batch_size"):
            assert getattr(args, field) == TileOptions.default(field), (command, field)
    parser = build_parser("predict")
    args = parser.parse_args(["predict", "c", "i", "--out", "o"])
    assert options_from_args(args).tiles == TileOptions()
    args = parser.parse_args(["predict", "c", "i", "--out", "o", "--tile", "64", "--tta"])
    assert options_from_args(args).tiles == TileOptions(tile=64, tta=True)


def test_the_python_api_splits_flat_options() -> None:
    opts = inference_options(tile=128, overlap=0.5, min_size=3, precision="fp32")
    assert opts == InferenceOptions(
        TileOptions(tile=128, overlap=0.5), min_size=3, precision="fp32"
    )
    with pytest.raises(ConfigError, match=r"TileOptions\.overlap"):
        inference_options(overlap=2.0)
