"""`ponder-pt data prepare`: corpora -> tokens + EOD -> a Megatron indexed dataset (.bin/.idx).

The output is written by megatron-core's own `IndexedDatasetBuilder`, so megatron-core's
`IndexedDataset`, gpt-neox and Megatron-LM read it unchanged. Documents stream through a
bounded window of worker tasks, so memory does not grow with the corpus. Every input record
that does not become a document is written to PREFIX.rejects.jsonl with its file and line,
and PREFIX.stats.json holds counts that add up: documents_in = documents_written + rejected.
A run that writes no document at all fails (DataError saying why: no records, or which keys the
records had instead of --text-key) and leaves any earlier PREFIX.bin/.idx as they were.

PREFIX.tokenizer-id.json records the tokenizer's identity (vocabulary size and hash, file
hashes, path) and the largest token id written, for `train` to compare with data.tokenizer
(fields: ponder_pt/data/tokenizer_record.py); `merge` carries it over and refuses to merge
prefixes made with different vocabularies.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from ..tokenizer import Tokenizer, load_tokenizer
from .errors import DataError
from .readers import Document, RawLine, Reject, check_inputs, read_input
from .tokenizer_record import merged_record, remove_record, write_record

__all__ = ["DataError", "PrepareStats", "merge", "prepare", "unrecorded"]


@dataclass
class PrepareStats:
    prefix: str
    tokenizer: str
    inputs: list
    workers: int
    documents_in: int = 0
    documents_written: int = 0
    rejected: int = 0
    rejected_by_reason: dict = field(default_factory=dict)
    tokens: int = 0
    max_token_id: int = -1
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    text_key: str = "text"
    keys_seen: dict = field(default_factory=dict)
    """Keys of the records that lacked `text_key`, with counts (most frequent first)."""
    suggested_text_key: Optional[str] = None
    """The key that most often held those records' longest string."""

    def add_reject(self, reject: Reject) -> None:
        self.rejected += 1
        kind = reject.reason.split(":")[0].split(" at byte")[0]
        self.rejected_by_reason[kind] = self.rejected_by_reason.get(kind, 0) + 1

    def text_key_hint(self) -> str:
        """'keys seen: content, id - did you mean --text-key content?' or ''."""
        if not self.keys_seen:
            return ""
        keys = ", ".join(list(self.keys_seen)[:10])
        guess = (f" - did you mean --text-key {self.suggested_text_key}?"
                 if self.suggested_text_key else "")
        return f"keys seen: {keys}{guess}"

    def nothing_written(self) -> DataError:
        """Why no document was written, and what to change."""
        where = ", ".join(self.inputs)
        if self.documents_in == 0:
            return DataError(f"wrote nothing: no records in {where} (empty input?); nothing "
                             f"written to {self.prefix}.bin/.idx")
        missing = self.rejected_by_reason.get(f"missing text key {self.text_key!r}", 0)
        if missing == self.documents_in:
            why = f"no record had the key {self.text_key!r}; {self.text_key_hint()}"
        else:
            why = (f"all {self.documents_in} records were rejected ({self.rejected_by_reason})"
                   + (f"; {missing} had no key {self.text_key!r}, {self.text_key_hint()}"
                      if missing else ""))
        return DataError(f"wrote nothing from {where}: {why} (see {self.prefix}.rejects.jsonl)")


def _note_keys(stats: PrepareStats, guesses: collections.Counter, reject: Reject) -> None:
    if reject.keys:
        for key in reject.keys:
            stats.keys_seen[key] = stats.keys_seen.get(key, 0) + 1
        if reject.longest_text_key:
            guesses[reject.longest_text_key] += 1


_WORKER_TOKENIZER: Optional[Tokenizer] = None
Item = Union[RawLine, Document, Reject]


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core
    _WORKER_TOKENIZER = tokenizer


def _process(items: list[Item], tokenizer: Optional[Tokenizer] = None
             ) -> list[Union[np.ndarray, Reject]]:
    """Parse and tokenize a chunk: token ids (+EOD) per document, or why it was rejected.
    Runs in the worker processes, so parsing scales with --workers too."""
    tok = tokenizer or _WORKER_TOKENIZER
    assert tok is not None
    records = [it.parse() if isinstance(it, RawLine) else it for it in items]
    docs = [r for r in records if isinstance(r, Document)]
    encoded = iter(tok.encode_batch([d.text for d in docs]))
    out: list[Union[np.ndarray, Reject]] = []
    for rec in records:
        if isinstance(rec, Reject):
            out.append(rec)
            continue
        ids = next(encoded)
        if not ids:
            out.append(Reject(rec.source, rec.line, "text tokenizes to nothing", rec.text[:80]))
        else:
            ids.append(tok.eod_id)
            out.append(np.asarray(ids, dtype=np.int32))  # compact to send back to the writer
    return out


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _ordered_map(chunks: Iterator[list[Item]], tokenizer: Tokenizer, workers: int
                 ) -> Iterator[list[Union[np.ndarray, Reject]]]:
    """Process chunks in order; with workers > 1 at most 4 x workers chunks are in flight."""
    if workers <= 1:
        for chunk in chunks:
            yield _process(chunk, tokenizer)
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        window: collections.deque = collections.deque()
        for chunk in chunks:
            window.append(pool.submit(_process, chunk))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _progress(enabled: bool):
    from tqdm import tqdm

    return tqdm(unit="doc", desc="tokenizing", disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)


def prepare(inputs: Sequence[str], tokenizer: str, out_prefix: str, text_key: str = "text",
            workers: int = 1, strict: bool = False, txt_mode: str = "paragraph",
            chunk_docs: int = 256, progress: bool = True, eod_token: Optional[str] = None
            ) -> PrepareStats:
    """Tokenize `inputs` into OUT_PREFIX.bin/.idx; returns the stats also written to disk."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if not inputs:
        raise DataError("no --input given")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    check_inputs(list(inputs))
    tok = load_tokenizer(tokenizer, eod_token=eod_token)
    out_dir = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(out_dir, exist_ok=True)

    stats = PrepareStats(prefix=out_prefix, tokenizer=tok.path, inputs=list(inputs),
                         workers=workers, text_key=text_key)
    guesses: collections.Counter = collections.Counter()
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    reject_path = f"{out_prefix}.rejects.jsonl"
    start = time.perf_counter()
    bar = _progress(progress)
    try:
        with open(reject_path, "w", encoding="utf-8") as reject_file:

            def note_reject(r: Reject) -> None:
                if strict:
                    keys = f"; its keys: {', '.join(r.keys)}" if r.keys else ""
                    raise DataError(f"{r}{keys} (--strict: fix the input or drop --strict to "
                                    "skip and report bad records)")
                stats.add_reject(r)
                _note_keys(stats, guesses, r)
                reject_file.write(json.dumps({"file": r.source, "line": r.line,
                                              "reason": r.reason, "excerpt": r.excerpt}) + "\n")

            def items() -> Iterator[Item]:
                for spec in inputs:
                    yield from read_input(spec, text_key, txt_mode, raw=True)

            for results in _ordered_map(_chunks(items(), chunk_docs), tok, workers):
                for res in results:
                    stats.documents_in += 1
                    if isinstance(res, Reject):
                        note_reject(res)
                        continue
                    builder.add_document(res, [len(res)])
                    stats.documents_written += 1
                    stats.tokens += len(res)
                    stats.max_token_id = max(stats.max_token_id, int(res.max()))
                bar.update(len(results))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{stats.tokens / elapsed:,.0f} tok/s, "
                                    f"{stats.rejected} rejected", refresh=False)
        stats.keys_seen = dict(sorted(stats.keys_seen.items(), key=lambda kv: -kv[1]))
        stats.suggested_text_key = guesses.most_common(1)[0][0] if guesses else None
        if stats.documents_written == 0:
            raise stats.nothing_written()
        builder.finalize(tmp + ".idx")
    except BaseException:
        _discard(builder, tmp)
        raise
    finally:
        bar.close()
    _publish(tmp, out_prefix, (tok.identity(), stats.max_token_id, stats.documents_written,
                               stats.tokens))
    stats.elapsed_s = time.perf_counter() - start
    stats.tokens_per_s = stats.tokens / max(stats.elapsed_s, 1e-9)
    with open(f"{out_prefix}.stats.json", "w", encoding="utf-8") as fh:
        json.dump(asdict(stats), fh, indent=2)
    return stats


def merge(prefixes: Sequence[str], out_prefix: str) -> int:
    """Concatenate indexed datasets (same dtype, same tokenizer) into one prefix; returns the
    documents merged. The tokenizer record is carried over when every input has one (the
    merged prefix gets none otherwise, see `unrecorded`); inputs recorded with different
    vocabularies, or of different token dtypes, are refused before anything is written."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from .verify import open_index

    if not prefixes:
        raise DataError("nothing to merge")
    missing = [p for p in prefixes
               if not (os.path.exists(p + ".bin") and os.path.exists(p + ".idx"))]
    if missing:
        raise DataError(f"cannot merge: no PREFIX.bin/.idx at {', '.join(missing)}")
    record, _ = merged_record(prefixes)
    dtypes = {p: open_index(p).index.dtype for p in prefixes}  # numpy scalar types
    if len({np.dtype(d) for d in dtypes.values()}) > 1:
        shown = ", ".join(f"{p} ({np.dtype(d).name})" for p, d in dtypes.items())
        raise DataError(f"cannot merge prefixes with different token dtypes: {shown}; they were "
                        "tokenized for vocabularies of different sizes")
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtypes[prefixes[0]])
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(tmp + ".idx")
    except BaseException:
        _discard(builder, tmp)
        raise
    _publish(tmp, out_prefix, None if record is None else (
        record["tokenizer"], record["max_token_id"], record["documents"], record["tokens"]))
    return len(builder.document_indices) - 1


def _discard(builder, tmp: str) -> None:
    """A build that failed: its temporary files go."""
    builder.data_file.close()
    for suffix in (".bin", ".idx"):
        if os.path.exists(tmp + suffix):
            os.remove(tmp + suffix)


def _publish(tmp: str, out_prefix: str, record: Optional[tuple]) -> None:
    """Rename a complete build into place, then write its tokenizer record (`write_record`'s
    arguments; None: no record). Renamed only when both files are complete, a crash never
    leaves a half-written prefix, and never a record of earlier data beside new data."""
    remove_record(out_prefix)
    os.replace(tmp + ".bin", out_prefix + ".bin")
    os.replace(tmp + ".idx", out_prefix + ".idx")
    if record is not None:
        write_record(out_prefix, *record)


def unrecorded(prefixes: Sequence[str]) -> list[str]:
    """The prefixes without a tokenizer record (a merge of them gets none)."""
    return merged_record(prefixes)[1]
