"""The CLI entry point: commands load lazily, their table matches the modules, every choice
comes from a library constant."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from unetkit.cli import main as cli
from unetkit.diffusion.samplers import SCHEDULER_NAMES
from unetkit.diffusion.schedules import BETA_SCHEDULES, PREDICTION_TYPES
from unetkit.runtime import DEFAULT_PRECISION, PRECISIONS
from unetkit.training.optim import OPTIMIZERS, SCHEDULERS


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.fixture(scope="module")
def full() -> argparse._SubParsersAction:
    return _subparsers(cli.build_parser(full=True))


def _option(sub: argparse._SubParsersAction, command: str, flag: str) -> argparse.Action:
    parser = sub.choices[command]
    return next(a for a in parser._actions if flag in a.option_strings)


def test_the_command_table_is_what_the_modules_register(full) -> None:
    helps = {a.dest: a.help for a in full._choices_actions}
    assert list(helps) == list(cli.COMMANDS)
    for name, (_, help_line) in cli.COMMANDS.items():
        assert helps[name] == help_line, name


def test_help_imports_no_command_module_and_no_torch() -> None:
    code = (
        "import sys\nfrom unetkit.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('unetkit.cli.')]\n"
        "print('LOADED', sorted(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "LOADED ['unetkit.cli.main']" in out.stdout
    for name in cli.COMMANDS:
        assert name in out.stdout  # every command is listed with its help line


def test_a_command_loads_only_its_module() -> None:
    parser = cli.build_parser("models")
    args = parser.parse_args(["models", "unet"])
    assert args.command == "models" and callable(args.run)
    with pytest.raises(SystemExit):  # another command's placeholder cannot run
        parser.parse_args(["predict", "--tile", "8"])


def test_import_unetkit_is_lazy_and_the_api_loads_on_use() -> None:
    code = "import sys, unetkit\nassert 'torch' not in sys.modules\nprint(unetkit.create_model)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "function create_model" in out.stdout
    import unetkit

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        unetkit.nope  # noqa: B018


@pytest.mark.parametrize(
    ("command", "flag", "choices"),
    [
        ("train", "--precision", PRECISIONS),
        ("train", "--optimizer", OPTIMIZERS),
        ("train", "--scheduler", SCHEDULERS),
        ("predict", "--precision", PRECISIONS),
        ("generate", "--precision", PRECISIONS),
        ("generate", "--sampler", SCHEDULER_NAMES),
        ("diffusion-train", "--precision", PRECISIONS),
        ("diffusion-train", "--sampler", SCHEDULER_NAMES),
        ("diffusion-train", "--prediction-type", PREDICTION_TYPES),
        ("diffusion-train", "--beta-schedule", BETA_SCHEDULES),
        ("lora-train", "--precision", PRECISIONS),
    ],
)
def test_choices_are_the_library_constants(full, command, flag, choices) -> None:
    action = _option(full, command, flag)
    assert tuple(action.choices) == tuple(choices)
    usage = full.choices[command].format_usage()
    assert "{" + ",".join(map(str, choices)) + "}" in usage  # help lists every choice


def test_cli_and_library_precision_defaults_agree(full) -> None:
    from unetkit.training.fit_config import FitConfig
    from unetkit.workflows.diffuse import DiffusionPipeline
    from unetkit.workflows.segment import InferenceOptions

    assert _option(full, "predict", "--precision").default == DEFAULT_PRECISION
    assert _option(full, "generate", "--precision").default == DEFAULT_PRECISION
    assert InferenceOptions().precision == DEFAULT_PRECISION
    assert FitConfig(epochs=1, batch_size=1, lr=1.0).precision == DEFAULT_PRECISION
    default = DiffusionPipeline.__init__.__kwdefaults__["precision"]
    assert default == DEFAULT_PRECISION
