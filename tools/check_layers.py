#!/usr/bin/env python3
"""Check unetkit's architecture rules on the source tree (stdlib only: ast).

Three storeys plus front-ends, imports only point down (see shared/DESIGN.md):

    core        errors, config, registry, runtime, _atomic, _version, perf, nn, models,
                data, formats (and the small guards outputs, runlock, finite)
    engines     training, inference, diffusion, segmentation, regression, text
    workflows   workflows
    front-ends  cli, napari, web (and the package's public API, ``unetkit/__init__.py``)

Printed, and a violation (exit status 1):
  1. import circles: between packages, and between modules (a cycle of modules importing
     each other, function-level imports included: such an import only hides the circle);
  2. upward imports: a module importing from a higher storey;
  3. function-level imports of unetkit modules: more than ``--max-local`` of them, or one
     without a reason (a comment ``# why: ...`` on the line or the line above: an optional
     heavy dependency, or start-up time);
  4. size budgets: a module over 400 lines, a function over 60 lines of code (its body
     without the docstring, blank lines and comment lines). Split it by concept; a module
     or function that truly cannot be split is listed in ``SIZE_EXCEPTIONS`` with a reason.

Usage:
    python tools/check_layers.py [--root src/unetkit] [--max-local 10] [--quiet]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

STOREYS = {
    "core": (
        "errors", "config", "registry", "runtime", "_atomic", "_version", "perf", "nn",
        "models", "data", "formats", "outputs", "runlock", "finite",
    ),
    "engines": ("training", "inference", "diffusion", "segmentation", "regression", "text"),
    "workflows": ("workflows",),
    "front-ends": ("cli", "napari", "web", "__init__", "__main__"),
}  # fmt: skip
LEVEL = {name: i for i, names in enumerate(STOREYS.values()) for name in names}
STOREY_OF = {name: storey for storey, names in STOREYS.items() for name in names}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# packages allowed to import each other: the registry and the models that register into it
ALLOWED_CYCLES = {frozenset({"models", "registry"})}
# over a size budget on purpose: "module" or "module:function" -> why it stays whole
SIZE_EXCEPTIONS: dict[str, str] = {}


@dataclass
class Import:
    """One import of a unetkit module."""

    source: str  # importing module, dotted
    target: str  # imported module, dotted
    line: int
    local: bool  # inside a function body
    typing_only: bool  # under ``if TYPE_CHECKING:``
    reason: str | None  # the ``# why:`` comment, if any


@dataclass
class Tree:
    """The modules of a package tree and their imports."""

    root: Path
    package: str
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    # over a size budget: ("module" or "module:function", the line that says so)
    sizes: list[tuple[str, str]] = field(default_factory=list)


def over_budget(tree: Tree) -> tuple[list[str], list[str]]:
    """(sizes over their budget that ``SIZE_EXCEPTIONS`` does not list: the violations,
    those it lists, with their reasons)."""
    bad = [line for key, line in tree.sizes if key not in SIZE_EXCEPTIONS]
    excepted = [f"{line}  # {SIZE_EXCEPTIONS[key]}" for key, line in tree.sizes
                if key in SIZE_EXCEPTIONS]  # fmt: skip
    return bad, excepted


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _resolve(tree: Tree, name: str) -> str | None:
    """The longest module of the tree that ``name`` names (``a.b.c`` -> ``a.b``)."""
    while name:
        if name in tree.modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_package(tree: Tree, module: str) -> bool:
    return tree.modules[module].name == "__init__.py"


class _Visitor(ast.NodeVisitor):
    """Collect the unetkit imports of one module with their context."""

    def __init__(self, tree: Tree, module: str, lines: list[str]) -> None:
        self.tree, self.module, self.lines = tree, module, lines
        self.depth = 0  # function nesting
        self.typing = 0  # TYPE_CHECKING nesting

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._check_size(node)
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        typing = test in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        self.typing += typing
        for child in node.body:
            self.visit(child)
        self.typing -= typing
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            pkg = self.module if _is_package(self.tree, self.module) else self.module
            pkg = pkg.rsplit(".", node.level - (1 if _is_package(self.tree, self.module) else 0))[0]
            base = f"{pkg}.{base}" if base else pkg
        for alias in node.names:  # ``from unetkit import config`` imports a module
            self._add(f"{base}.{alias.name}", node, fallback=base)

    def _add(self, name: str, node: ast.stmt, fallback: str | None = None) -> None:
        top = self.tree.package
        if name != top and not name.startswith(top + "."):
            return
        target = _resolve(self.tree, name) or (fallback and _resolve(self.tree, fallback))
        if target is None or target == self.module:
            return
        above = self.lines[node.lineno - 2] if node.lineno >= 2 else ""
        here = self.lines[node.lineno - 1]
        reason = next((t.split("# why:", 1)[1].strip() for t in (here, above) if "# why:" in t),
                      None)  # fmt: skip
        imp = Import(self.module, target, node.lineno, self.depth > 0, self.typing > 0, reason)
        if imp not in self.tree.imports:  # ``from m import a, b`` is one import of m
            self.tree.imports.append(imp)

    def _check_size(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring is not code
        if not body:
            return
        code = 0
        for text in self.lines[body[0].lineno - 1 : node.end_lineno]:
            stripped = text.strip()
            code += bool(stripped) and not stripped.startswith("#")
        if code > MAX_FUNCTION_LINES:
            line = (
                f"{self.module}:{node.lineno} {node.name}(): {code} lines of code "
                f"(budget {MAX_FUNCTION_LINES})"
            )
            self.tree.sizes.append((f"{self.module}:{node.name}", line))


def scan(root: Path) -> Tree:
    """Parse every module under ``root`` (a package directory)."""
    tree = Tree(root, root.name)
    for path in sorted(root.rglob("*.py")):
        tree.modules[module_name(path, root, root.name)] = path
    for module, path in tree.modules.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            line = f"{module}: {len(lines)} lines (budget {MAX_MODULE_LINES})"
            tree.sizes.append((module, line))
        _Visitor(tree, module, lines).visit(ast.parse(text, filename=str(path)))
    return tree


def package_of(tree: Tree, module: str) -> str:
    """``unetkit.nn.lora`` -> ``nn``; ``unetkit.errors`` -> ``errors``; the root -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(edges: dict[str, set[str]]) -> Iterator[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1 and frozenset(component) not in ALLOWED_CYCLES:
                    yield sorted(component)


def circles(tree: Tree) -> list[str]:
    """Import circles between packages and between modules (typing-only imports aside)."""
    modules: dict[str, set[str]] = {}
    packages: dict[str, set[str]] = {}
    for imp in tree.imports:
        if imp.typing_only:
            continue
        # a submodule importing its own package's __init__ (or the reverse) is no circle
        if imp.target.startswith(imp.source + ".") or imp.source.startswith(imp.target + "."):
            continue
        modules.setdefault(imp.source, set()).add(imp.target)
        a, b = package_of(tree, imp.source), package_of(tree, imp.target)
        if a != b and "__init__" not in (a, b):
            packages.setdefault(a, set()).add(b)
    found = [f"package circle: {' <-> '.join(c)}" for c in _cycles(packages)]
    found += [f"module circle: {' <-> '.join(c)}" for c in _cycles(modules)]
    return found


def upward(tree: Tree) -> tuple[list[str], list[str]]:
    """(imports from a higher storey, packages missing from the storey map)."""
    bad, unknown = [], set()
    for imp in tree.imports:
        a, b = package_of(tree, imp.source), package_of(tree, imp.target)
        for p in (a, b):
            if p not in LEVEL:
                unknown.add(p)
        if a in LEVEL and b in LEVEL and LEVEL[b] > LEVEL[a]:
            bad.append(
                f"{tree.modules[imp.source]}:{imp.line}: {imp.source} ({STOREY_OF[a]}) imports "
                f"{imp.target} ({STOREY_OF[b]})"
            )
    return bad, sorted(unknown)


def local_imports(tree: Tree, limit: int) -> tuple[list[str], list[str]]:
    """(every function-level import of a unetkit module, the violations among them)."""
    statements = {(i.source, i.line): i for i in tree.imports if i.local}
    found = list(statements.values())  # one per import statement
    listed = [
        f"{tree.modules[i.source]}:{i.line}: {i.target}  # why: {i.reason or 'MISSING'}"
        for i in found
    ]
    bad = [line for line, i in zip(listed, found, strict=True) if not i.reason]
    if len(found) > limit:
        bad.append(f"{len(found)} function-level imports of unetkit modules (at most {limit})")
    return listed, bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_root = Path(__file__).resolve().parents[1] / "src" / "unetkit"
    parser.add_argument("--root", type=Path, default=default_root, help="the package folder")
    parser.add_argument("--max-local", type=int, default=10, help="function-level imports")
    parser.add_argument("--quiet", action="store_true", help="print violations only")
    args = parser.parse_args(argv)
    tree = scan(args.root)
    found_circles = circles(tree)
    found_upward, unknown = upward(tree)
    listed, bad_local = local_imports(tree, args.max_local)
    too_big, excepted = over_budget(tree)
    sections = [
        ("import circles", found_circles, True),
        ("upward imports", found_upward, True),
        ("function-level imports without a reason / over the limit", bad_local, True),
        (
            f"over the size budgets ({MAX_MODULE_LINES} lines a module, "
            f"{MAX_FUNCTION_LINES} lines of code a function)",
            too_big,
            True,
        ),
        ("packages missing from the storey map (warning)", unknown, False),
    ]
    if not args.quiet:
        sections += [
            (f"function-level imports of unetkit modules ({len(listed)})", listed, False),
            ("over a size budget, listed in SIZE_EXCEPTIONS", excepted, False),
        ]
    failed = False
    for title, items, gate in sections:
        if items or not args.quiet:
            print(f"{title}: {len(items)}")
            for item in items:
                print(f"  {item}")
        failed |= gate and bool(items)
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
