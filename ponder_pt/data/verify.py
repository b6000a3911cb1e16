"""Check indexed datasets (PREFIX.bin / PREFIX.idx) before anything reads samples from them.

A copy that truncated PREFIX.bin, an .idx from another dataset, or data tokenized for a larger
vocabulary would otherwise fail deep inside a shuffled training run (numpy's "offset must be
non-negative and no greater than buffer length"). `verify_prefix` parses the index with
megatron-core's own reader (`IndexedDataset`), then compares:
  - the .idx header and version (megatron-core's reader asserts them),
  - the .bin size with the byte count the index implies (last pointer + last length x itemsize),
  - the token dtype with the vocabulary (uint16 holds ids < 65536),
  - with `full=True`, every token id against the vocabulary (a scan of the whole .bin).
`ponder-pt train` checks every prefix of data.train/valid/test before any process group starts,
`ponder-pt data inspect` its prefix, and `ponder-pt data verify PREFIX... [--full]` any.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np


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

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"prefix": self.prefix, "ok": self.ok, "problems": self.problems,
                "documents": self.documents, "sequences": self.sequences, "tokens": self.tokens,
                "dtype": self.dtype, "bin_bytes": self.bin_bytes, "max_token": self.max_token}


def _open_index(prefix: str):
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
        ds = _open_index(prefix)
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
    if vocab_size is not None and np.issubdtype(dtype, np.integer):
        top = int(np.iinfo(dtype).max)
        if vocab_size - 1 > top:
            rep.problems.append(f"{bin_path}: tokens are {dtype.name} (ids up to {top}), but the "
                                f"vocabulary has {vocab_size} ids; this data was tokenized for "
                                f"a smaller vocabulary: re-run `ponder-pt data prepare` with "
                                f"data.tokenizer")
    if full and not rep.problems and rep.tokens:
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        top = 0
        first_bad = None
        for start in range(0, len(tokens), chunk_tokens):
            part = tokens[start:start + chunk_tokens]
            top = max(top, int(part.max()))
            if (vocab_size is not None and top >= vocab_size) or int(part.min()) < 0:
                bad = np.nonzero((part >= (vocab_size or np.inf)) | (part < 0))[0]
                first_bad = start + int(bad[0])
                break
        rep.max_token = top
        if first_bad is not None:
            rep.problems.append(f"{bin_path}: token {int(tokens[first_bad])} at position "
                                f"{first_bad:,} is outside the vocabulary [0, {vocab_size}); "
                                f"the data was tokenized with another tokenizer")
        del tokens
    return rep


def verify_prefixes(prefixes: Iterable[str], vocab_size: Optional[int] = None,
                    full: bool = False) -> list[PrefixReport]:
    return [verify_prefix(p, vocab_size, full) for p in dict.fromkeys(prefixes)]


def config_prefixes(cfg) -> list[str]:
    """Every prefix of data.train, data.valid and data.test (weights dropped)."""
    from ..config import parse_blend

    return [p for key in ("train", "valid", "test")
            for p, _ in parse_blend(getattr(cfg.data, key), f"data.{key}")]


def check_data(prefixes: Iterable[str], vocab_size: Optional[int] = None,
               full: bool = False) -> list[PrefixReport]:
    """verify_prefixes, raising DataError listing every problem of every prefix."""
    from .prepare import DataError

    reports = verify_prefixes(prefixes, vocab_size, full)
    found = [p for r in reports for p in r.problems]
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise DataError(f"corrupt or mismatched training data:\n{lines}")
    return reports
