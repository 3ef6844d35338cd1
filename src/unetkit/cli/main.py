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

# sub-command modules, each with add_parser() (one or more sub-commands) and run()
COMMANDS = [
    "train",
    "predict",
    "evaluate",
    "models",
    "diffusion-train",
    "generate",
    "inpaint",
    "convert",
    "export",
    "lora",  # lora-train, lora-merge, lora-convert, lora-verify
    "serve",
]


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
    if isinstance(error, MemoryError):
        return "out of memory; use a smaller --tile/--batch-size or smaller inputs"
    return (
        one_line(f"unexpected {type(error).__name__}: {error}", limit=300)
        + " (rerun with -v for the traceback)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="unetkit",
        description="The U-Net family end to end: train, predict, evaluate, inspect models.",
    )
    parser.add_argument("--version", action="version", version=f"unetkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"unetkit.cli.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # glibc would return >32 MiB activations to the OS and page-fault them back on every
    # pass (15-35% of CPU time); opt out with UNETKIT_ALLOCATOR=system
    tune_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
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
