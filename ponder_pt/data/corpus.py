"""The embedded corpus: real English prose gathered at run time, with nothing to download.

Documents are the docstrings of the installed Python standard library (modules, classes and
functions), read with `ast` so no module is imported. The same interpreter always yields the
same corpus, in the same order.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from typing import Iterator

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "turtledemo",
              "ensurepip", "pydoc_data", "unittest/test"}


def _stdlib_files() -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield os.path.join(dirpath, name)


def stdlib_docstrings(min_chars: int = 200) -> Iterator[dict]:
    """Yield {"text", "source"} records, one per docstring of at least `min_chars` characters."""
    root = sysconfig.get_paths()["stdlib"]
    for path in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars:
                name = module if node is tree else f"{module}.{node.name}"
                yield {"text": doc, "source": name}


def write_corpus(out_path: str, max_bytes: int = 4_000_000, min_chars: int = 200) -> dict:
    """Write the embedded corpus as jsonl (up to ~max_bytes of text); returns counts."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    docs = chars = 0
    with open(out_path, "w", encoding="utf-8") as fh:
        for record in stdlib_docstrings(min_chars):
            fh.write(json.dumps(record) + "\n")
            docs += 1
            chars += len(record["text"])
            if chars >= max_bytes:
                break
    return {"path": out_path, "documents": docs, "characters": chars}
