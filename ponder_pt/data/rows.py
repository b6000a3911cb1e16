"""Rows of user task files (jsonl, tsv, csv) with their line numbers, for `finetune` and `sft`.

A line that cannot be read as a row (bad JSON, not an object, more fields than the header) goes
to `rejected` as {"file", "line", "reason"}, so callers report it instead of dropping it.
TSV files are read as GLUE writes them: quoting disabled (MRPC and QQP sentences contain quote
characters) and an optional UTF-8 BOM (MRPC's header)."""

from __future__ import annotations

import csv
import json


def read_rows(path: str, rejected: list) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a jsonl/tsv/csv file; unreadable lines go to `rejected`."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        if path.endswith((".jsonl", ".json")):
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    rejected.append({"file": path, "line": line_no, "reason": f"bad JSON: {exc}"})
                    continue
                if not isinstance(row, dict):
                    rejected.append({"file": path, "line": line_no, "reason": "not an object"})
                    continue
                rows.append((line_no, row))
            return rows
        tsv = path.endswith(".tsv")
        reader = csv.DictReader(fh, delimiter="\t" if tsv else ",",
                                quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        for row in reader:
            extra = row.pop(None, None)
            if extra:
                rejected.append({"file": path, "line": reader.line_num,
                                 "reason": f"{len(extra)} more field(s) than the header's "
                                           f"{len(reader.fieldnames or [])}"})
                continue
            rows.append((reader.line_num, row))
    return rows
