"""`ponder-pt data prepare`: corpora -> tokens + EOD -> a Megatron indexed dataset (.bin/.idx).

The output is written by megatron-core's own `IndexedDatasetBuilder`, so megatron-core's
`IndexedDataset`, gpt-neox and Megatron-LM read it unchanged. Documents stream through a
bounded window of worker tasks, so memory does not grow with the corpus. Every input record
that does not become a document is written to PREFIX.rejects.jsonl with its file and line,
and PREFIX.stats.json holds counts that add up: documents_in = documents_written + rejected.
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
from .readers import Document, RawLine, Reject, check_inputs, read_input


class DataError(ValueError):
    """Bad input under --strict, or an input the user must fix."""


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
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0

    def add_reject(self, reject: Reject) -> None:
        self.rejected += 1
        kind = reject.reason.split(":")[0].split(" at byte")[0]
        self.rejected_by_reason[kind] = self.rejected_by_reason.get(kind, 0) + 1


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

    stats = PrepareStats(prefix=out_prefix, tokenizer=tok.path, inputs=list(inputs), workers=workers)
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    reject_path = f"{out_prefix}.rejects.jsonl"
    start = time.perf_counter()
    bar = _progress(progress)
    try:
        with open(reject_path, "w", encoding="utf-8") as reject_file:

            def note_reject(r: Reject) -> None:
                if strict:
                    raise DataError(f"{r} (--strict: fix the input or drop --strict to skip and "
                                    "report bad records)")
                stats.add_reject(r)
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
                bar.update(len(results))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{stats.tokens / elapsed:,.0f} tok/s, "
                                    f"{stats.rejected} rejected", refresh=False)
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        raise
    finally:
        bar.close()
    # rename only when both files are complete: a crash never leaves a half-written prefix
    os.replace(tmp + ".bin", out_prefix + ".bin")
    os.replace(tmp + ".idx", out_prefix + ".idx")
    stats.elapsed_s = time.perf_counter() - start
    stats.tokens_per_s = stats.tokens / max(stats.elapsed_s, 1e-9)
    with open(f"{out_prefix}.stats.json", "w", encoding="utf-8") as fh:
        json.dump(asdict(stats), fh, indent=2)
    return stats


def merge(prefixes: Sequence[str], out_prefix: str) -> int:
    """Concatenate indexed datasets (same dtype) into one prefix; returns documents merged."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    if not prefixes:
        raise DataError("nothing to merge")
    dtype = IndexedDataset(prefixes[0]).index.dtype
    tmp = f"{out_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", out_prefix + ".bin")
    os.replace(tmp + ".idx", out_prefix + ".idx")
    return len(builder.document_indices) - 1
