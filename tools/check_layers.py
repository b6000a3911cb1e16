#!/usr/bin/env python3
"""Check the import structure of ponder_pt, experiments/, benchmarks/ and tests/ (stdlib only, < 1 s).

    python3 tools/check_layers.py [--root DIR]

Fails (exit 1), naming file:line, the import and why, when
* a module of ponder_pt imports from a higher layer of LAYERS, at top level or inside a
  function (a same-layer import is fine);
* a module imports, or reads through an imported module, a name starting with `_` (dunder
  names excepted) from another module: a private name is its module's own business;
* modules import each other in a circle (every import counts, also those inside functions);
* a test module (tests/, recursively) imports, or reads through an imported module, a private
  name of ponder_pt, experiments/ or benchmarks/: tests use what users can. The tests' own
  helpers (tests/_model_helpers.py, ...) are test modules, theirs to share.

LAYERS lists ponder_pt's packages and modules from the bottom up; a module belongs to the
entry with the longest matching dotted prefix. experiments/ and benchmarks/ sit above all of
ponder_pt. Each layer may import only from its own layer and the ones below.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Iterator, Optional

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("ponder_pt", "ponder_pt.weights", "ponder_pt.sdpa_backends",
              "ponder_pt.tokenizer")),
    ("config", ("ponder_pt.config",)),
    ("data", ("ponder_pt.data",)),
    ("models", ("ponder_pt.models",)),
    ("engine", ("ponder_pt.engine",)),
    ("export", ("ponder_pt.export",)),
    ("inference", ("ponder_pt.inference",)),
    ("fine-tuning", ("ponder_pt.early_exit", "ponder_pt.sft")),
    ("entry points", ("ponder_pt.train", "ponder_pt.demo")),
    ("cli", ("ponder_pt.cli", "ponder_pt.__main__")),
    ("studies", ("experiments", "benchmarks")),
)
TREES = ("ponder_pt", "experiments", "benchmarks")
TESTS = "tests"  # checked for our private names only: not a layer, not a package


def layer_of(module: str) -> Optional[tuple[int, str]]:
    """(index, name) of the layer holding `module`, by the longest matching prefix."""
    best = None
    for index, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[2]:
                    best = (index, name, len(prefix))
    return best[:2] if best else None


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class Tree:
    """The Python modules under `root`'s TREES, by dotted name."""

    def __init__(self, root: str):
        self.root = root
        self.files: dict[str, str] = {}
        for top in TREES:
            base = os.path.join(root, top)
            for dirpath, dirs, files in os.walk(base):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
                for f in sorted(files):
                    if f.endswith(".py"):
                        path = os.path.join(dirpath, f)
                        rel = os.path.relpath(path, root)[:-3].split(os.sep)
                        if rel[-1] == "__init__":
                            rel = rel[:-1]
                        self.files[".".join(rel)] = path

    def is_package(self, module: str) -> bool:
        return self.files.get(module, "").endswith("__init__.py")

    def resolve(self, module: str) -> Optional[str]:
        """`module` if it is one of ours, else its longest prefix that is; None if foreign."""
        parts = module.split(".")
        while parts:
            name = ".".join(parts)
            if name in self.files:
                return name
            parts.pop()
        return None


class Import:
    def __init__(self, source: str, line: int, text: str, target: str, in_function: bool,
                 names: tuple[str, ...] = ()):
        self.source, self.line, self.text = source, line, text
        self.target, self.in_function, self.names = target, in_function, names


def _in_function(node: ast.AST, parents: dict) -> bool:
    node = parents.get(node)
    while node is not None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
        node = parents.get(node)
    return False


def _absolute(tree: Tree, module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not tree.is_package(module):
        base = base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(tree: Tree, module: str, syntax: ast.Module
               ) -> Iterator[tuple[Import, Optional[ast.AST]]]:
    """Every import of one of our modules, with the import node."""
    parents = {child: node for node in ast.walk(syntax) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(syntax):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = tree.resolve(alias.name)
                if target:
                    text = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
                    yield Import(module, node.lineno, text, target,
                                 _in_function(node, parents)), node
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(tree, module, node)
            if not tree.resolve(base):
                continue
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            text = f"from {'.' * node.level}{node.module or ''} import {names}"
            inner = _in_function(node, parents)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import submodule` depends on the submodule, else on `base` itself
                target = sub if sub in tree.files else tree.resolve(base)
                yield Import(module, node.lineno, text, target, inner,
                             () if sub in tree.files else (alias.name,)), node


def _module_aliases(tree: Tree, module: str, syntax: ast.Module) -> dict[str, str]:
    """Local names bound to one of our modules (`import a.b as m`, `from a import b`)."""
    out = {}
    for node in ast.walk(syntax):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in tree.files:
                    out[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(tree, module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in tree.files:
                    out[alias.asname or alias.name] = sub
    return out


def check(root: str) -> list[str]:
    tree = Tree(root)
    problems: list[str] = []
    edges: dict[str, dict[str, Import]] = {}
    for module, path in tree.files.items():
        rel = os.path.relpath(path, root)
        with open(path, encoding="utf-8") as fh:
            syntax = ast.parse(fh.read(), filename=path)
        own = layer_of(module)
        for imp, _ in imports_of(tree, module, syntax):
            where = f"{rel}:{imp.line}: {imp.text}" + (" (inside a function)"
                                                         if imp.in_function else "")
            if imp.target != module:
                edges.setdefault(module, {}).setdefault(imp.target, imp)
            theirs = layer_of(imp.target)
            if own and theirs and theirs[0] > own[0]:
                problems.append(f"{where}: {module} (layer '{own[1]}') imports {imp.target} "
                                f"(layer '{theirs[1]}', higher)")
        problems.extend(_private_uses(tree, module, syntax, rel))
    problems.extend(_cycles(tree, edges, root))
    problems.extend(check_tests(root, tree))
    return problems


def _private_uses(tree: Tree, module: str, syntax: ast.Module, rel: str,
                  only: Optional[tuple] = None) -> list[str]:
    """Problems for the private names `module` imports from, or reads through an imported
    module of, our other modules (those under `only` when given)."""
    problems = []
    ours = (lambda target: only is None
            or any(target == top or target.startswith(top + ".") for top in only))
    for imp, node in imports_of(tree, module, syntax):
        if imp.target == module or not ours(imp.target):
            continue
        where = f"{rel}:{imp.line}: {imp.text}" + (" (inside a function)"
                                                     if imp.in_function else "")
        for name in imp.names:
            if is_private(name):
                problems.append(f"{where}: imports the private name {name} of {imp.target}")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if [p for p in alias.name.split(".") if is_private(p)]:
                    problems.append(f"{where}: imports the private module {alias.name}")
    aliases = _module_aliases(tree, module, syntax)
    for node in ast.walk(syntax):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and is_private(node.attr)
                and ours(aliases[node.value.id])):
            problems.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}: uses the "
                            f"private name {node.attr} of {aliases[node.value.id]}")
    return problems


def check_tests(root: str, tree: Optional[Tree] = None) -> list[str]:
    """tests/: no test module uses a private name of ponder_pt, experiments/ or benchmarks/."""
    tree = tree or Tree(root)
    problems: list[str] = []
    for dirpath, dirs, files in os.walk(os.path.join(root, TESTS)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root)
            with open(path, encoding="utf-8") as fh:
                syntax = ast.parse(fh.read(), filename=path)
            module = ".".join(rel[:-3].split(os.sep))  # not one of ours: absolute imports only
            problems.extend(_private_uses(tree, module, syntax, rel, only=TREES))
    return problems


def _cycles(tree: Tree, edges: dict[str, dict[str, Import]], root: str) -> list[str]:
    """One message per strongly connected group of modules (Tarjan), naming one circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(tree.files) + 100))
    for v in sorted(tree.files):
        if v not in index:
            visit(v)
    out = []
    for group in sorted(groups):
        members = set(group)
        circle = _circle(group[0], members, edges)
        steps = []
        for a, b in zip(circle, circle[1:]):
            imp = edges[a][b]
            rel = os.path.relpath(tree.files[a], root)
            steps.append(f"    {rel}:{imp.line}: {imp.text}"
                         + (" (inside a function)" if imp.in_function else ""))
        out.append(f"import cycle among {', '.join(group)}: "
                   + " -> ".join(circle) + "\n" + "\n".join(steps))
    return out


def _circle(start: str, members: set[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected group."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, {})):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return [start, start]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the repository root (default: this tool's checkout)")
    args = ap.parse_args(argv)
    problems = check(args.root)
    for p in problems:
        print(p)
    if problems:
        print(f"check_layers: {len(problems)} problem(s); the layers, bottom up: "
              + " < ".join(name for name, _ in LAYERS))
        return 1
    print("check_layers: imports follow the layers, no private names, no cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
