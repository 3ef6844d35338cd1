"""`unetkit train`'s recipe: ``--recipe``, then a ``--config`` TOML file, then the flags.

Each ``--config`` value is checked by the parser of the flag of the same name, so a file
and a command line refuse the same values with the same words.
"""

from __future__ import annotations

import argparse
import ast
import tomllib
from pathlib import Path
from typing import Any

from unetkit.errors import ConfigError
from unetkit.workflows.segment_recipe import SegmentationRecipe, make_recipe

__all__ = ["VALUE_FLAGS", "check_config_values", "parse_model_options", "recipe_from_args"]

# flags that set the recipe field of the same name
VALUE_FLAGS = (
    "data",
    "val_data",
    "channels",
    "pixel_size",
    "num_classes",
    "mask_mode",
    "target",
    "model",
    "preset",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "loss",
    "crop",
    "precision",
    "seed",
    "samples_per_epoch",
    "steps_per_epoch",
    "max_steps",
    "early_stopping",
    "val_fraction",
    "grad_accum",
    "num_workers",
    "scheduler",
    "normalize",
    "w0",
    "sigma",
    "task",
    "output",
    "target_scale",
    "synthetic_regression",
    "spatial_dims",
)


def check_config_values(values: dict[str, Any], checks: dict[str, Any], path: Path) -> None:
    """ConfigError naming the file and key for a --config value its flag would refuse."""
    for key, value in values.items():
        check = checks.get(key)
        if check is None or value is None:
            continue
        try:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
            check(repr(value))
        except (argparse.ArgumentTypeError, ValueError) as e:  # plain int/float parsers
            raise ConfigError(f"--config {path}: {key} = {value!r}: {e}") from None


def parse_model_options(items: list[str]) -> dict[str, Any]:
    """``--model-option KEY=VALUE`` items as model config overrides (Python literals)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--model-option {item!r}: expected KEY=VALUE, e.g. channels=(16,32)")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            # a bare word such as norm=group is a string; anything that looks like a number,
            # tuple or list but does not parse is a typo, not a string
            if not value.strip() or value.strip()[0] in "([{'\"0123456789+-.":
                raise ConfigError(
                    f"--model-option {item!r}: {value!r} is not a valid value; write numbers, "
                    f"tuples like (16,32,64), True/False, or a bare word"
                ) from None
            out[key.strip()] = value
    return out


def recipe_from_args(args: argparse.Namespace) -> SegmentationRecipe:
    """The recipe `unetkit train` runs: ``--recipe``, then ``--config`` (TOML), then flags."""
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            values.update(tomllib.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config {path}: invalid TOML ({e})") from None
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
        check_config_values(values, getattr(args, "config_checks", {}), path)
    for name in VALUE_FLAGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if not isinstance(values.get("model_options", {}), dict):
        raise ConfigError(
            f"--config {args.config}: model_options = {values['model_options']!r}: expected a "
            "table of model config overrides, e.g. [model_options] channels = [16, 32]"
        )
    if args.model_option:
        values["model_options"] = {
            **values.get("model_options", {}),
            **parse_model_options(args.model_option),
        }
    if args.no_elastic:
        values["elastic"] = False
    if args.no_affine:
        values["affine"] = False
    if args.norm_percentiles is not None:
        values["norm_percentiles"] = tuple(args.norm_percentiles)
    preset = "demo" if args.demo else args.recipe
    return make_recipe(preset, **values)
