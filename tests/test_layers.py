"""tools/check_layers.py: the tree follows its layers, and the checker catches an upward import
(at top level and inside a function), another module's private name, an import cycle, and a
test using a private name of ponder_pt."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_layers.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))

from check_layers import check  # noqa: E402


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          timeout=60)


def test_the_tree_follows_its_layers():
    proc = _run()
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _tree(root, files: dict) -> str:
    """A small repository: ponder_pt/config and ponder_pt/engine packages, plus `files`."""
    base = {"ponder_pt/__init__.py": '__version__ = "0"\n',
            "ponder_pt/config/__init__.py": "", "ponder_pt/config/a.py": "_hidden = 1\nx = 2\n",
            "ponder_pt/engine/__init__.py": "", "ponder_pt/engine/b.py": "y = 3\n"}
    for rel, text in {**base, **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(root)


def test_a_clean_small_tree_passes(tmp_path):
    root = _tree(tmp_path, {"ponder_pt/engine/c.py": """\
        from ponder_pt import __version__
        from ..config.a import x
        from . import b
        """})
    assert check(root) == []


@pytest.mark.parametrize("body, where, why", [
    ("from ponder_pt.engine.b import y\n", "ponder_pt/config/up.py:1: from ponder_pt.engine.b",
     "ponder_pt.config.up (layer 'config') imports ponder_pt.engine.b (layer 'engine', higher)"),
    ("import os\n\n\ndef f():\n    from ..engine import b\n    return b\n",
     "ponder_pt/config/up.py:5: from ..engine import b (inside a function)",
     "imports ponder_pt.engine.b (layer 'engine', higher)"),
])
def test_an_upward_import_fails(tmp_path, body, where, why):
    root = _tree(tmp_path, {"ponder_pt/config/up.py": body})
    found = check(root)
    assert len(found) == 1 and found[0].startswith(where) and why in found[0], found
    proc = _run("--root", root)
    assert proc.returncode == 1 and where in proc.stdout and "1 problem(s)" in proc.stdout


def test_a_private_name_fails(tmp_path):
    root = _tree(tmp_path, {"ponder_pt/engine/c.py": """\
        from ..config import a
        from ..config.a import _hidden


        def f():
            return a._hidden
        """})
    found = check(root)
    assert found == [
        "ponder_pt/engine/c.py:2: from ..config.a import _hidden: imports the private name "
        "_hidden of ponder_pt.config.a",
        "ponder_pt/engine/c.py:6: a._hidden: uses the private name _hidden of "
        "ponder_pt.config.a"], found


def test_an_import_cycle_fails(tmp_path):
    root = _tree(tmp_path, {"experiments/__init__.py": "",
                            "experiments/x.py": "from .y import run\n",
                            "experiments/y.py": "def run():\n    from . import x\n"})
    found = check(root)
    assert len(found) == 1, found
    assert found[0].startswith("import cycle among experiments.x, experiments.y: "
                               "experiments.x -> experiments.y -> experiments.x")
    assert "experiments/y.py:2: from . import x (inside a function)" in found[0]


def test_a_test_using_a_private_name_of_ponder_pt_fails(tmp_path):
    """tests/ may share its own private helpers, not ponder_pt's private names."""
    root = _tree(tmp_path, {"tests/_helpers.py": "_thing = 1\n", "tests/test_x.py": """\
        from _helpers import _thing
        from ponder_pt.config import a
        from ponder_pt.config.a import x


        def test_it():
            from ponder_pt.config.a import _hidden
            return a._hidden, a.x, _thing
        """})
    assert check(root) == [
        "tests/test_x.py:7: from ponder_pt.config.a import _hidden (inside a function): "
        "imports the private name _hidden of ponder_pt.config.a",
        "tests/test_x.py:8: a._hidden: uses the private name _hidden of ponder_pt.config.a"]
