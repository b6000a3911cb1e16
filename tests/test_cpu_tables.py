"""benchmarks/cpu_tables.py: the CPU tables in benchmarks/README.md are what their raw files
say, every raw file is shown, and a hand-edited or missing one is caught."""

from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import cpu_tables  # noqa: E402


def test_committed_tables_match_their_raw_files(capsys):
    assert cpu_tables.main(["--check"]) == 0, capsys.readouterr().err


def test_every_raw_file_is_shown():
    with open(cpu_tables.README, encoding="utf-8") as fh:
        shown = set(cpu_tables.marked(fh.read()))
    raw_dir = os.path.join(REPO, "benchmarks", "results", "cpu")
    saved = {f"results/cpu/{n}" for n in os.listdir(raw_dir)}
    assert saved and saved <= shown, sorted(saved - shown)


def test_rewrite_check_and_missing_file(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    doc = {"script": "benchmarks/bench_x.py", "argv": ["--steps", "2"], "date":
           "2026-12-05T18:27:28+00:00", "load_average_at_start": [0.5, 0.4, 0.3],
           "machine": {"load_average_1_5_15": [1.25, 1.0, 1.0]}, "versions": {"torch": "2.13.0"},
           "table": "shape: tiny\n\n| K | step s |\n|---|---:|\n| 0 | 0.286 |\n"}
    (tmp_path / "results" / "x.json").write_text(json.dumps(doc))
    (tmp_path / "results" / "old.txt").write_text("| K | s |\n|---|---|\n| 3 | 4.4 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("# b\n\n<!-- cpu-table results/x.json -->\nold\n<!-- /cpu-table -->\n"
                      "text\n<!-- cpu-table results/old.txt -->\n<!-- /cpu-table -->\n")

    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 1
    assert "results/x.json" in capsys.readouterr().err
    assert cpu_tables.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert ("Raw output: [results/x.json](results/x.json) (2026-12-05, "
            "`benchmarks/bench_x.py --steps 2`, torch 2.13.0; 1-minute load average 0.5 at the "
            "start, 1.25 at the end).\n\nshape: tiny\n\n| K | step s |\n|---|---:|\n"
            "| 0 | 0.286 |\n<!-- /cpu-table -->\ntext\n") in text
    assert "| 3 | 4.4 |\n<!-- /cpu-table -->" in text
    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 0

    readme.write_text(text.replace("0.286", "0.250"))  # a hand-edited number
    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 1
    readme.write_text(text.replace("results/x.json -->", "results/gone.json -->"))
    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 1
    assert "results/gone.json: no such raw output" in capsys.readouterr().err
