"""Check indexed datasets (PREFIX.bin / PREFIX.idx) before anything reads samples from them.

A copy that truncated PREFIX.bin, an .idx from another dataset, or data tokenized for a larger
vocabulary would otherwise fail deep inside a shuffled training run (numpy's "offset must be
non-negative and no greater than buffer length"). `verify_prefix` parses the index with
megatron-core's own reader (`IndexedDataset`), then compares:
  - the .idx header and version (megatron-core's reader asserts them),
  - the .bin size with the byte count the index implies (last pointer + last length x itemsize),
  - the token dtype with the vocabulary (uint16 holds ids < 65536),
  - that it holds any tokens at all (an empty prefix fails here, not in numpy's mmap),
  - with `full=True`, every token id against the vocabulary (a scan of the whole .bin).
`ponder-pt train` checks every prefix of data.train/valid/test before any process group starts,
`ponder-pt data inspect` its prefix, and `ponder-pt data verify PREFIX... [--full]` any.

`train` also checks that the data's ids mean data.tokenizer's tokens (`check_data` with
`tokenizer=`): the tokenizer recorded at `data prepare` (PREFIX.tokenizer-id.json, see
tokenizer_record.py) must have the same vocabulary hash, and the largest id in the data (from
that record, else a scan of unrecorded .bin files, 256 MiB of them in all, the rest named in one
note) must be below both the tokenizer's vocabulary and the model's rows: ids in the padding
rows are a mismatch the padding would only hide.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import numpy as np

from ..launch_env import tells_the_user
from .errors import DataError
from .tokenizer_record import describe, read_record, record_path

SCAN_LIMIT_BYTES = 256 << 20  # train scans an unrecorded .bin up to this size for its largest id
UNRECORDED = "prepared by another tool or an older ponder-pt"


@dataclass
class PrefixReport:
    prefix: str
    problems: list = field(default_factory=list)
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    dtype: str = ""
    bin_bytes: int = 0
    max_token: Optional[int] = None  # with full=True
    notes: list = field(default_factory=list)  # said once, not problems

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"prefix": self.prefix, "ok": self.ok, "problems": self.problems,
                "documents": self.documents, "sequences": self.sequences, "tokens": self.tokens,
                "dtype": self.dtype, "bin_bytes": self.bin_bytes, "max_token": self.max_token}


def open_index(prefix: str):
    """megatron-core's IndexedDataset over PREFIX (no mmap of the .bin: nothing is read from it)."""
    import logging

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    class _Quiet(IndexedDataset):
        def __del__(self):  # megatron's __del__ fails on an index it could not read
            if hasattr(self, "index"):
                super().__del__()

    logging.getLogger("megatron.core.datasets.indexed_dataset").setLevel(logging.WARNING)
    return _Quiet(prefix, mmap=False)


def verify_prefix(prefix: str, vocab_size: Optional[int] = None, full: bool = False,
                  chunk_tokens: int = 1 << 24) -> PrefixReport:
    """Every problem of one prefix (an empty list when it is sound)."""
    rep = PrefixReport(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (idx_path, bin_path) if not os.path.exists(p)]
    if missing:
        rep.problems.append(f"{', '.join(missing)}: no such file (expected PREFIX.bin and "
                            f"PREFIX.idx from `ponder-pt data prepare`)")
        return rep
    rep.bin_bytes = os.path.getsize(bin_path)
    idx_bytes = os.path.getsize(idx_path)
    try:
        ds = open_index(prefix)
    except AssertionError as exc:  # megatron-core's header / version / count assertions
        text = str(exc) or "inconsistent sequence and document counts"
        rep.problems.append(f"{idx_path}: not a readable megatron-core index ({text}); "
                            f"re-run `ponder-pt data prepare` or copy the file again")
        return rep
    except (ValueError, OSError, KeyError, IndexError) as exc:
        rep.problems.append(f"{idx_path}: not a readable megatron-core index ({idx_bytes} "
                            f"bytes; {type(exc).__name__}: {exc}); it is probably truncated or "
                            f"from another tool: re-run `ponder-pt data prepare` or copy it again")
        return rep
    index = ds.index
    dtype = np.dtype(index.dtype)
    rep.dtype = dtype.name
    lengths, pointers = index.sequence_lengths, index.sequence_pointers
    rep.sequences = int(len(lengths))
    rep.documents = int(max(len(index.document_indices) - 1, 0))
    rep.tokens = int(lengths.sum(dtype=np.int64))
    expected = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if len(lengths) else 0
    if expected != rep.bin_bytes:
        what = "truncated" if rep.bin_bytes < expected else "longer than its index says"
        rep.problems.append(f"{bin_path}: {rep.bin_bytes:,} bytes, expected {expected:,} "
                            f"({rep.tokens:,} {dtype.name} tokens in {rep.sequences:,} "
                            f"sequences per {idx_path}); the .bin is {what}: copy it again or "
                            f"re-run `ponder-pt data prepare`")
    elif len(lengths) and not np.array_equal(
            pointers[1:], pointers[:-1] + lengths[:-1].astype(np.int64) * dtype.itemsize):
        rep.problems.append(f"{idx_path}: sequence pointers are not contiguous; the index does "
                            f"not describe {bin_path}")
    if not rep.problems and rep.tokens == 0:
        rep.problems.append(f"{prefix}: empty ({rep.documents} documents, no tokens in "
                            f"{idx_path}): nothing to read; re-run `ponder-pt data prepare` "
                            "(it says why an input gives no documents) or take this prefix "
                            "out of the config")
    if vocab_size is not None and np.issubdtype(dtype, np.integer):
        top = int(np.iinfo(dtype).max)
        if vocab_size - 1 > top:
            rep.problems.append(f"{bin_path}: tokens are {dtype.name} (ids up to {top}), but the "
                                f"vocabulary has {vocab_size} ids; this data was tokenized for "
                                f"a smaller vocabulary: re-run `ponder-pt data prepare` with "
                                f"data.tokenizer")
    if full and not rep.problems and rep.tokens:
        rep.max_token, first_bad, bad_id = scan_tokens(bin_path, dtype, vocab_size, chunk_tokens)
        if first_bad is not None:
            rep.problems.append(f"{bin_path}: token {bad_id} at position "
                                f"{first_bad:,} is outside the vocabulary [0, {vocab_size}); "
                                f"the data was tokenized with another tokenizer")
    return rep


def scan_tokens(bin_path: str, dtype, vocab_size: Optional[int] = None,
                chunk_tokens: int = 1 << 24) -> tuple[int, Optional[int], Optional[int]]:
    """(largest id, position and id of the first one outside [0, vocab_size) or None, None).
    Stops at the first bad id, so the largest id is then the largest up to there."""
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    top = 0
    try:
        for start in range(0, len(tokens), chunk_tokens):
            part = tokens[start:start + chunk_tokens]
            top = max(top, int(part.max()))
            if (vocab_size is not None and top >= vocab_size) or int(part.min()) < 0:
                bad = np.nonzero((part >= (vocab_size or np.inf)) | (part < 0))[0]
                return top, start + int(bad[0]), int(part[bad[0]])
        return top, None, None
    finally:
        del tokens


def verify_prefixes(prefixes: Iterable[str], vocab_size: Optional[int] = None,
                    full: bool = False) -> list[PrefixReport]:
    return [verify_prefix(p, vocab_size, full) for p in dict.fromkeys(prefixes)]


def config_prefixes(cfg, with_keys: bool = False) -> list:
    """Every prefix of data.train, data.valid and data.test (weights dropped); with_keys:
    (key, prefix) pairs, so messages can name the key a prefix came from."""
    from ..config import parse_blend

    return [(f"data.{key}", p) if with_keys else p for key in ("train", "valid", "test")
            for p, _ in parse_blend(getattr(cfg.data, key), f"data.{key}")]


Prefixes = Iterable[Union[str, tuple[str, str]]]


def _keyed(prefixes: Prefixes) -> dict:
    """{prefix: key or ''}, each prefix once (the first key it came with)."""
    out: dict = {}
    for item in prefixes:
        key, prefix = item if isinstance(item, tuple) else ("", item)
        out.setdefault(prefix, key)
    return out


def _agreement(rep: PrefixReport, where: str, tokenizer, model_vocab: Optional[int],
               budget: list) -> bool:
    """Whether PREFIX's ids mean `tokenizer`'s tokens and fit the model's rows: problems and
    notes go into `rep`. An unrecorded .bin is scanned while it fits `budget` ([bytes], shared
    by all prefixes of a check, so a blend of many shards is not read whole at every start);
    returns False when its ids could not be checked."""
    prefix = rep.prefix
    ident = tokenizer.identity() if tokenizer is not None else None
    try:
        rec = read_record(prefix)
    except DataError as exc:
        rep.problems.append(f"{where}: {exc}")
        return True
    top, how = None, ""
    if rec is not None:
        if (int(rec["tokens"]), int(rec["documents"])) != (rep.tokens, rep.documents):
            rep.problems.append(
                f"{where}: {record_path(prefix)} describes {rec['documents']:,} documents of "
                f"{rec['tokens']:,} tokens, but {prefix}.idx holds {rep.documents:,} of "
                f"{rep.tokens:,}: the record is left from other data; re-run `ponder-pt data "
                f"prepare --out {prefix}`, or delete the record to have the data scanned")
            return True
        top, how = int(rec["max_token_id"]), f" (recorded in {record_path(prefix)})"
        recorded = rec["tokenizer"]
        if ident is not None and recorded["vocab_sha256"] != ident["vocab_sha256"]:
            beyond = (f"\n      its token ids go up to {top}, outside data.tokenizer's "
                      f"vocabulary [0, {ident['vocab_size']})" if top >= ident["vocab_size"]
                      else "")
            rep.problems.append(
                f"{where} was prepared with another tokenizer than data.tokenizer:\n"
                f"      prepared with:  {describe(recorded)}, recorded in {record_path(prefix)}\n"
                f"      data.tokenizer: {describe(ident)}{beyond}\n"
                f"    re-run `ponder-pt data prepare --tokenizer {ident['path']} --out {prefix} "
                f"...` on its corpus, or set data.tokenizer={recorded['path']}")
            return True
        if ident is not None and recorded.get("files_sha256") != ident["files_sha256"]:
            rep.notes.append(f"{where}: data.tokenizer {ident['path']} is another file than the "
                             f"one recorded ({recorded['path']}) with the same vocabulary: "
                             "the ids agree")
    elif rep.max_token is not None:
        top, how = rep.max_token, " (scanned)"
    elif rep.bin_bytes <= budget[0]:
        budget[0] -= rep.bin_bytes
        top, _, _ = scan_tokens(prefix + ".bin", np.dtype(rep.dtype))
        how = f" (scanned; no {record_path(prefix)}: {UNRECORDED})"
    else:
        return False
    if ident is not None and top >= ident["vocab_size"]:
        rep.problems.append(
            f"{where}: token ids go up to {top}{how}, outside data.tokenizer's vocabulary "
            f"[0, {ident['vocab_size']}) ({ident['path']}): the data was tokenized with "
            f"another tokenizer\n    re-run `ponder-pt data prepare --tokenizer {ident['path']} "
            f"--out {prefix} ...` on its corpus, or set data.tokenizer to the tokenizer that "
            "prepared it")
    elif model_vocab is not None and top >= model_vocab:
        rep.problems.append(
            f"{where}: token ids go up to {top}{how}, but the model has {model_vocab} vocabulary "
            f"rows (model.vocab_size={model_vocab})\n    leave model.vocab_size unset to take "
            "data.tokenizer's padded vocabulary, or set it above the largest id")
    return True


def _unchecked_note(prefixes: list, sizes: int, tokenizer, limit: int) -> str:
    """One note for every prefix whose ids were not checked (no record, too large to scan)."""
    what = f"data.tokenizer {tokenizer.path}" if tokenizer is not None else "the vocabulary"
    tok = f" --tokenizer {tokenizer.path}" if tokenizer is not None else ""
    shown = " ".join(prefixes[:4]) + (" ..." if len(prefixes) > 4 else "")
    return (f"{len(prefixes)} prefix(es) without a tokenizer record ({UNRECORDED}), "
            f"{sizes / 2**30:,.1f} GiB of tokens: ids not checked against {what} (train "
            f"scans at most {limit >> 20} MiB); check once with "
            f"`ponder-pt data verify --full{tok} {shown}`")


def check_data(prefixes: Prefixes, vocab_size: Optional[int] = None, full: bool = False, *,
               tokenizer=None, model_vocab: Optional[int] = None,
               scan_limit: int = SCAN_LIMIT_BYTES) -> list[PrefixReport]:
    """verify_prefixes, raising DataError listing every problem of every prefix. `prefixes`
    are prefixes or (config key, prefix) pairs (messages then name the key). With `tokenizer`
    (a loaded Tokenizer; its vocabulary is then the default `vocab_size`) and/or `model_vocab`
    (the model's embedding rows), also whether the data's ids mean the tokenizer's tokens and
    fit the model (see the module docstring); notes go to stderr once (not on ranks > 0)."""
    keyed = _keyed(prefixes)
    if vocab_size is None and tokenizer is not None:
        vocab_size = tokenizer.vocab_size
    reports, unchecked, budget = [], [], [scan_limit]
    for prefix, key in keyed.items():
        rep = verify_prefix(prefix, vocab_size, full)
        where = f"{key} {prefix}" if key else prefix
        if key:
            rep.problems = [f"{key}: {p}" for p in rep.problems]
        if rep.ok and (tokenizer is not None or model_vocab is not None):
            if not _agreement(rep, where, tokenizer, model_vocab, budget):
                unchecked.append(rep)
        reports.append(rep)
    notes = [n for r in reports for n in r.notes]
    if unchecked:
        notes.append(_unchecked_note([r.prefix for r in unchecked],
                                     sum(r.bin_bytes for r in unchecked), tokenizer, scan_limit))
    if notes and tells_the_user():
        print("\n".join(f"note: {n}" for n in notes), file=sys.stderr, flush=True)
    found = [p for r in reports for p in r.problems]
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise DataError(f"corrupt or mismatched training data:\n{lines}")
    return reports


def dry_run_lines(cfg, default_vocab: int, default_name: str = "GPT-NeoX-20B padded"
                  ) -> list[str]:
    """The data section of `train --dry-run`: one warning per data.train / data.tokenizer
    that is unset or absent (and per absent valid/test prefix), the vocabulary the estimates
    used, and, where both exist, train's check of the data against the tokenizer as warnings."""
    from ..config import fill_vocab
    from ..tokenizer import load_tokenizer

    d, vocab = cfg.data, cfg.model.vocab_size
    lines = ["# data"]
    try:
        pairs = config_prefixes(cfg, with_keys=True)
    except ValueError as exc:  # a malformed blend: the run itself says so too
        pairs = []
        lines.append(f"warning: {exc}")
    if not d.train:
        lines.append("warning: data.train is not set: a run needs the PREFIX written by "
                     "`ponder-pt data prepare` (--set data.train=[PREFIX])")
    present = []
    for key, prefix in pairs:
        absent = [prefix + ext for ext in (".bin", ".idx") if not os.path.exists(prefix + ext)]
        if absent:
            lines.append(f"warning: {key}: {' and '.join(absent)} not found (write them with "
                         f"`ponder-pt data prepare --out {prefix}`)")
        else:
            present.append((key, prefix))
    tok = None
    if not d.tokenizer:
        lines.append("warning: data.tokenizer is not set: a run needs the tokenizer the data "
                     "was prepared with (--set data.tokenizer=DIR_OR_FILE)")
    elif not os.path.exists(d.tokenizer):
        lines.append(f"warning: data.tokenizer: {d.tokenizer} not found")
    else:
        tok = load_tokenizer(d.tokenizer)
    if tok is None:
        why = "no data.tokenizer" if not d.tokenizer else f"data.tokenizer {d.tokenizer} not found"
        source = f"assumed ({default_name})" if vocab == default_vocab else "(model.vocab_size)"
        lines.append(f"vocabulary: {vocab} {source}, {why}")
    else:
        multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tp
        padded = fill_vocab(cfg, tok).padded_vocab_size  # resolved already: nothing changes
        lines.append(f"vocabulary: {vocab} = data.tokenizer's {tok.vocab_size} tokens padded to a "
                     f"multiple of {multiple} ({tok.path})" if vocab == padded else
                     f"vocabulary: {vocab} (model.vocab_size; data.tokenizer {tok.path} has "
                     f"{tok.vocab_size} tokens, {padded} padded)")
    unchecked, budget = [], [SCAN_LIMIT_BYTES]
    for prefix, key in _keyed(present).items():  # what the run would refuse, as warnings
        rep = verify_prefix(prefix, tok.vocab_size if tok is not None else None)
        lines += [f"warning: {key}: {p}" for p in rep.problems]
        if rep.ok:
            if not _agreement(rep, f"{key} {prefix}", tok, vocab, budget):
                unchecked.append(rep)
            lines += [f"warning: {p}" for p in rep.problems]
        lines += [f"note: {n}" for n in rep.notes]
    if unchecked:
        lines.append("note: " + _unchecked_note([r.prefix for r in unchecked],
                                                sum(r.bin_bytes for r in unchecked), tok,
                                                SCAN_LIMIT_BYTES))
    return lines
