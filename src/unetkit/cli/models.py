"""`unetkit models`: list architectures, parameter counts and valid sizes."""

from __future__ import annotations

import argparse

from unetkit import registry
from unetkit.cli import flags as F
from unetkit.errors import InputSizeError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list architectures, parameter counts and valid sizes",
        description="List registered models with their presets and parameter counts (of the "
        "default configuration; name a model for every preset's) and, for --input-size, the "
        "output size (or the nearest valid input sizes).",
    )
    p.add_argument("name", nargs="?", help="show only this model")
    p.add_argument(
        "--input-size",
        type=F.positive_int,
        nargs="+",
        metavar="N",
        help="spatial input size to check, e.g. 572 572",
    )
    p.add_argument(
        "--in-channels", type=F.positive_int, default=None, help="override input channels"
    )
    p.add_argument(
        "--out-channels", type=F.positive_int, default=None, help="override output channels"
    )
    p.set_defaults(run=run)


def rows(
    name: str | None = None, input_size: list[int] | None = None, **overrides: int
) -> list[dict[str, str]]:
    """The table `unetkit models` prints: for one model, a row per preset; for all of them,
    a row per model (its default configuration, the presets named), so that the listing
    builds one model per family and answers in well under 2 s."""
    out = []
    for n in [name] if name else registry.list_models():
        entry = registry.get_entry(n)
        for preset in [None, *sorted(entry.presets)] if name else [None]:
            info = registry.model_info(n, preset=preset, **overrides)
            model = info["model"]
            row = {"model": n}
            if name:
                row["preset"] = preset or "(default)"
            else:
                row["presets"] = ", ".join(sorted(entry.presets)) or "-"
            row["dims"] = str(info["config"].get("dims", ""))
            row["params"] = f"{info['parameters']:,}"
            row["padding"] = "valid" if getattr(model, "is_valid_padding", False) else "same"
            if input_size:
                size = (
                    tuple(input_size)[: model.dims]
                    if len(input_size) >= model.dims
                    else tuple(input_size) + (input_size[-1],) * (model.dims - len(input_size))
                )
                try:
                    row["output"] = "×".join(map(str, model.output_size_for(size)))
                except InputSizeError:
                    near = model.nearest_valid_input(size)
                    row["output"] = f"invalid; nearest input {'×'.join(map(str, near))}"
            out.append(row)
    return out


def format_table(table: list[dict[str, str]]) -> str:
    cols = list(table[0])
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in table)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines.append("  ".join("-" * widths[c] for c in cols))
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in cols) for r in table]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    overrides = {
        k: v
        for k, v in (("in_channels", args.in_channels), ("out_channels", args.out_channels))
        if v is not None
    }
    print(format_table(rows(args.name, args.input_size, **overrides)))
    if not args.name:
        for n in registry.list_models():
            print(f"\n{n}: {registry.get_entry(n).description}", end="")
        print()
    return 0
