"""`unetkit` entry point: argument parsing and sub-command dispatch only.

Each sub-command lives in its own module with ``add_parser(subparsers)`` and ``run(args)``;
library errors become one clear line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback

from unetkit._version import __version__
from unetkit.errors import UnetkitError
from unetkit.perf import tune_allocator

# sub-command -> (the module that defines it, its one-line help). A module is imported only
# when its command runs, so `unetkit --help` imports no torch; tests/cli/test_main.py checks
# that these help lines are the modules' own.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "unetkit.cli.train",
        "train a segmentation model (built-in synthetic cells without --data)",
    ),
    "predict": (
        "unetkit.cli.predict",
        "segment images: masks, instances, overlays, per-object tables",
    ),
    "evaluate": ("unetkit.cli.evaluate", "metrics of a checkpoint on a labelled folder"),
    "models": ("unetkit.cli.models", "list architectures, parameter counts and valid sizes"),
    "diffusion-train": (
        "unetkit.cli.diffusion_train",
        "train a text-conditioned diffusion U-Net (built-in MNIST digits without --data)",
    ),
    "generate": ("unetkit.cli.generate", "generate images from a text prompt"),
    "inpaint": ("unetkit.cli.inpaint", "fill a masked region of an image"),
    "convert": (
        "unetkit.cli.convert",
        "convert diffusion U-Net weights: diffusers <-> LDM <-> unetkit",
    ),
    "export": (
        "unetkit.cli.export",
        "export a checkpoint to ONNX (dynamic batch/size), a torch.export program or a "
        "bioimage.io model package",
    ),
    "lora-train": (
        "unetkit.cli.lora",
        "fine-tune LoRA adapters on a trained model (diffusion or segmentation)",
    ),
    "lora-merge": ("unetkit.cli.lora", "merge LoRA adapters into a base checkpoint"),
    "lora-convert": (
        "unetkit.cli.lora",
        "convert a LoRA file between unetkit, diffusers/PEFT and Kohya layouts",
    ),
    "lora-verify": (
        "unetkit.cli.lora",
        "check that a LoRA file fits a base model and changes its output",
    ),
    "serve": ("unetkit.cli.serve", "start the local web page"),
}


def one_line(message: str, limit: int | None = None) -> str:
    """``message`` on one line (newlines become '; '), shortened to ``limit`` characters."""
    text = re.sub(r"\s*\n\s*", "; ", str(message).strip())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``unetkit <cmd>: error: ...`` and exit 2, no usage."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def describe(error: BaseException) -> str:
    """One line for an exception that escaped the library (OSError names its file)."""
    if isinstance(error, UnetkitError):
        return one_line(str(error))
    if isinstance(error, OSError) and error.filename is not None:
        return one_line(f"{error.filename}: {error.strerror or error}")
    if isinstance(error, MemoryError) or "can't allocate memory" in str(error):
        wanted = re.search(r"allocate (\d+) bytes", str(error))
        size = f" (asked for {int(wanted[1]) / 2**30:.1f} GiB)" if wanted else ""
        return (
            f"out of memory{size}; use smaller model channels, --tile, --batch-size or "
            f"inputs (rerun with -v for the traceback)"
        )
    return (
        one_line(f"unexpected {type(error).__name__}: {error}", limit=300)
        + " (rerun with -v for the traceback)"
    )


def build_parser(command: str | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The ``unetkit`` parser: ``command``'s module adds its real sub-parser(s); every other
    command gets a placeholder with its help line (enough for ``unetkit --help``).

    Args:
        command: the sub-command about to run (None: none yet).
        full: import every command module (tests, documentation).
    """
    parser = Parser(
        prog="unetkit",
        description="The U-Net family end to end: train, predict, evaluate, inspect models.",
    )
    parser.add_argument("--version", action="version", version=f"unetkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = {m for name, (m, _) in COMMANDS.items() if full or name == command}
    for name, (module, help_line) in COMMANDS.items():
        if module in wanted:
            wanted.discard(module)  # one module may add several commands, once
            importlib.import_module(module).add_parser(sub)
        elif name not in sub.choices:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def _command(argv: list[str]) -> str | None:
    """The sub-command of ``argv``: its first word that is not an option (the global
    options take no values), if it names one."""
    word = next((w for w in argv if not w.startswith("-")), None)
    return word if word in COMMANDS else None


def _printable_file_names() -> None:
    """A file name that is not valid UTF-8 (bytes on POSIX, read as surrogates) is printed
    with backslash escapes instead of failing with UnicodeEncodeError after the work is
    done; stderr already does this, stdout is strict under a UTF-8 locale."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    # glibc would return >32 MiB activations to the OS and page-fault them back on every
    # pass (15-35% of CPU time); opt out with UNETKIT_ALLOCATOR=system
    tune_allocator()
    _printable_file_names()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse's top level would say "unetkit: error:", not naming the command
        prog = f"unetkit {args.command}" if args.command else "unetkit"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extra)}\n")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"unetkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure is one line; the traceback only with -v
        if args.verbose:
            traceback.print_exc()
        print(f"unetkit {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
