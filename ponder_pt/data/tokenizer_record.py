"""PREFIX.tokenizer-id.json: which tokenizer wrote PREFIX.bin, and the largest id in it.

`ponder-pt data prepare` writes it beside PREFIX.idx (after the .bin/.idx are complete) and
`ponder-pt data merge` writes the merged one; `ponder-pt train` compares it with data.tokenizer
before any process group starts (ponder_pt/data/verify.py). The name is not `tokenizer.json`
on purpose: that is HF's tokenizer file, and this one holds no tokenizer. Its fields:

    {"format": 1,
     "tokenizer": {"path", "kind", "vocab_size", "vocab_sha256", "files_sha256", "eod_id"},
     "max_token_id": 799, "documents": 263, "tokens": 59740}

`tokenizer` is `Tokenizer.identity()`: `vocab_sha256` hashes the token strings in id order, so
a re-saved or copied tokenizer with the same vocabulary matches while any other does not;
`files_sha256` tells copies apart. `max_token_id` is the largest id in the .bin, seen by the
writer, so nobody scans 300B tokens to learn it; `documents` and `tokens` let a reader tell
whether the record still describes the .idx beside it. Data prepared by other tools (e.g.
Megatron's preprocess_data.py) has no record; `train` then scans the .bin when it is small.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from .errors import DataError

SUFFIX = ".tokenizer-id.json"
FORMAT = 1


def record_path(prefix: str) -> str:
    return prefix + SUFFIX


def write_record(prefix: str, tokenizer: dict, max_token_id: int, documents: int,
                 tokens: int) -> str:
    path = record_path(prefix)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"format": FORMAT, "tokenizer": tokenizer, "max_token_id": int(max_token_id),
                   "documents": int(documents), "tokens": int(tokens)}, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def remove_record(prefix: str) -> None:
    """Before PREFIX is rewritten: a record must never describe other data than its .bin."""
    if os.path.exists(record_path(prefix)):
        os.remove(record_path(prefix))


def read_record(prefix: str) -> Optional[dict]:
    """The record of PREFIX, or None when there is none; DataError when it cannot be read."""
    path = record_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            rec = json.load(fh)
        tok = rec["tokenizer"]
        # the fields readers use, with usable types
        int(rec["max_token_id"]), int(rec["tokens"]), int(rec["documents"])
        str(tok["vocab_sha256"]), int(tok["vocab_size"]), str(tok["path"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable tokenizer record ({type(exc).__name__}: {exc}); "
                        f"re-run `ponder-pt data prepare` for {prefix}, or delete the file to "
                        "have the data scanned instead") from None
    return rec


def describe(tok: dict) -> str:
    """One tokenizer, as messages name it: path, size and the vocabulary hash."""
    return (f"{tok['path']} ({tok['vocab_size']} tokens, vocabulary sha256 "
            f"{str(tok['vocab_sha256'])[:12]})")


def merged_record(prefixes: Sequence[str]) -> tuple[Optional[dict], list[str]]:
    """The record of the concatenation of `prefixes` and the prefixes without one (then the
    merged prefix gets no record). DataError when two were made with different vocabularies."""
    records = [(p, read_record(p)) for p in prefixes]
    unrecorded = [p for p, rec in records if rec is None]
    recorded = [(p, rec) for p, rec in records if rec is not None]
    for p, rec in recorded[1:]:
        first_prefix, first = recorded[0]
        if rec["tokenizer"]["vocab_sha256"] != first["tokenizer"]["vocab_sha256"]:
            raise DataError(
                f"cannot merge prefixes made with different tokenizers: {first_prefix} was "
                f"prepared with {describe(first['tokenizer'])}, {p} with "
                f"{describe(rec['tokenizer'])}; re-run `ponder-pt data prepare` on one of them "
                "with the other's tokenizer")
    if unrecorded or not recorded:
        return None, unrecorded
    merged = dict(recorded[0][1])
    merged["max_token_id"] = max(int(rec["max_token_id"]) for _, rec in recorded)
    merged["documents"] = sum(int(rec["documents"]) for _, rec in recorded)
    merged["tokens"] = sum(int(rec["tokens"]) for _, rec in recorded)
    return merged, []
