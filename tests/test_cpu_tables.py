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


# Records whose saved `table` (what the script printed then) is not what its renderer makes
# now, and why; every other record must render to exactly what its script printed.
RENDERED_OTHERWISE = {
    # written before the record kept torch's thread count; the table says "not recorded"
    "bench_linear.json": "machine: x86_64, 2 cores, torch threads not recorded,",
    # recorded before --layouts: its rows are shown in the extra-vs-modelled columns
    "bench_multinode.json": "| zero1 | 2 nodes, 1 Gbit/s | 8.049 | +4.614 | 5.071 | 0.91 |",
}


def test_committed_records_render_to_what_their_scripts_printed():
    raw_dir = os.path.join(REPO, "benchmarks", "results", "cpu")
    names = sorted(n for n in os.listdir(raw_dir) if n.endswith(".json"))
    assert names
    for name in names:
        with open(os.path.join(raw_dir, name), encoding="utf-8") as fh:
            doc = json.load(fh)
        rendered = cpu_tables.render_table(doc).strip()
        if name in RENDERED_OTHERWISE:
            assert RENDERED_OTHERWISE[name] in rendered, name
        else:
            assert rendered == doc["table"].strip(), name


def _record(**source):
    """A bench_train_overhead.py record (its renderer imports nothing heavy)."""
    return {"script": "benchmarks/bench_train_overhead.py", "argv": ["--steps", "2"],
            "args": {"layers": 2, "hidden": 64, "seq_len": 128, "checkpointing": "none",
                     "compile": False, "steps": 2},
            "date": "2026-12-05T18:27:28+00:00", "load_average_at_start": [0.5, 0.4, 0.3],
            "machine": {"load_average_1_5_15": [1.25, 1.0, 1.0], "cpus": 2},
            "versions": {"torch": "2.13.0"}, "source": source,
            "measurements": [{"ponder": 0, "plain_s": 0.25, "ponder_pt_s": 0.286}],
            "table": "| pondering K | ... |\n| 0 | 0.250 | 0.286 | 1.14 |\n"}


def test_rewrite_check_and_missing_file(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    raw = tmp_path / "results" / "x.json"
    doc = _record(commit="0123456789abcdef", dirty=True, diff_sha256="feedbeef" * 8,
                  changed_files=["a.py", "b.py"])
    raw.write_text(json.dumps(doc))
    (tmp_path / "results" / "old.txt").write_text("| K | s |\n|---|---|\n| 3 | 4.4 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("# b\n\n<!-- cpu-table results/x.json -->\nold\n<!-- /cpu-table -->\n"
                      "text\n<!-- cpu-table results/old.txt -->\n<!-- /cpu-table -->\n")

    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 1
    assert "results/x.json" in capsys.readouterr().err
    assert cpu_tables.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert ("Raw output: [results/x.json](results/x.json) (2026-12-05, "
            "`benchmarks/bench_train_overhead.py --steps 2`, torch 2.13.0; 1-minute load "
            "average 0.5 at the start, 1.25 at the end; commit 0123456 with uncommitted changes "
            "to 2 file(s), diff sha256 feedbeeffeed).\n\nCPU, 2 cores, fp32; model 2 layers x "
            "64 hidden, seq 128, global batch 8 (2 x micro 4), activation checkpointing none; "
            "torch 2.13.0\n\n| pondering K | plain PyTorch step (s) | ponder-pt step (s) | "
            "ratio |\n|---|---:|---:|---:|\n| 0 | 0.250 | 0.286 | 1.14 |\n<!-- /cpu-table -->\n"
            "text\n") in text
    assert "| 3 | 4.4 |\n<!-- /cpu-table -->" in text
    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 0

    # the saved table string is not what the README shows: editing it changes nothing
    doc["table"] = doc["table"].replace("0.286", "0.200")
    raw.write_text(json.dumps(doc))
    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 0
    # a hand edit of a measurement is what the table then says, and the check catches it
    doc["measurements"][0]["ponder_pt_s"] = 0.3
    raw.write_text(json.dumps(doc))
    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 1
    assert "results/x.json" in capsys.readouterr().err
    assert cpu_tables.main(["--readme", str(readme)]) == 0
    assert "| 0 | 0.250 | 0.300 | 1.20 |" in readme.read_text()
    text = readme.read_text()

    readme.write_text(text.replace("0.300", "0.250"))  # a hand-edited number in the README
    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 1
    readme.write_text(text.replace("results/x.json -->", "results/gone.json -->"))
    assert cpu_tables.main(["--readme", str(readme), "--check"]) == 1
    assert "results/gone.json: no such raw output" in capsys.readouterr().err


def test_source_line_of_clean_and_dirty_records():
    assert cpu_tables.source_line(_record(commit="abcdef0123", dirty=False, changed_files=[])) \
        == "commit abcdef0"
    # a record from before the diff hash only counted the modified files
    assert cpu_tables.source_line(_record(commit="abcdef0123", modified_files=4)) == \
        "commit abcdef0 with 4 modified file(s), diff not recorded"


def test_record_source_hashes_the_diff_of_a_dirty_tree():
    import cpu_record

    src = cpu_record.git_source()
    assert src["commit"] and len(src["commit"]) == 40
    assert src["dirty"] == bool(src["changed_files"])
    assert (src["diff_sha256"] is not None) == src["dirty"]
    if src["dirty"]:
        assert len(src["diff_sha256"]) == 64 and src["modified_files"] == len(src["changed_files"])
