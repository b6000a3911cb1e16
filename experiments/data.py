"""The study's data stage, built with the project's own tools.

corpus (the embedded stdlib docstrings, `ponder_pt.data.corpus.write_corpus`, or given files)
-> documents split into train / held-out (every n-th document held out, exact duplicates of a
training document dropped from the held-out side) -> BPE tokenizer trained on the training
documents only (`ponder_pt.tokenizer.train_tokenizer`) -> both sides as Megatron indexed
datasets (`ponder_pt.data.prepare.prepare`, the python API of `ponder-pt data prepare`)
-> from the held-out token stream (documents with their EOD, in corpus order):

* `windows.npy` [N, L+1]: consecutive non-overlapping windows, the validation set of every
  run (identical for every model and seed; the training seed never touches it);
* `task.npy` [n, P+T]: the held-out next-token task, taken from the part of the stream after
  the windows: a prompt of P tokens and the T tokens that follow it (no EOD among the targets).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np


def _split_documents(inputs: list[str], train_path: str, heldout_path: str, every: int) -> dict:
    from ponder_pt.data.readers import Document, read_input

    docs: list[str] = []
    for spec in inputs:
        for rec in read_input(spec):
            if isinstance(rec, Document):
                docs.append(rec.text)
    train_docs, held = [], []
    for i, text in enumerate(docs):
        (held if every > 0 and i % every == every - 1 else train_docs).append(text)
    seen = set(train_docs)
    heldout_docs = [t for t in held if t not in seen]
    for path, texts in ((train_path, train_docs), (heldout_path, heldout_docs)):
        with open(path, "w", encoding="utf-8") as fh:
            for text in texts:
                fh.write(json.dumps({"text": text}) + "\n")
    return {"documents": len(docs), "train_documents": len(train_docs),
            "heldout_documents": len(heldout_docs),
            "heldout_dropped_duplicates": len(held) - len(heldout_docs)}


def _token_stream(prefix: str) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


def build(sc: dict, work: str, seq_len: int, tp: int = 1, log: Callable = print) -> dict:
    """Run the data stage into work/data (skipped when data.json exists); returns data.json."""
    d = os.path.join(work, "data")
    meta_path = os.path.join(d, "data.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        log(f"data: reusing {d} ({meta['train_tokens']:,} training tokens)")
        return meta
    from ponder_pt.data.corpus import write_corpus
    from ponder_pt.data.prepare import prepare
    from ponder_pt.tokenizer import load_tokenizer, train_tokenizer

    os.makedirs(d, exist_ok=True)
    c, ev = sc["corpus"], sc["eval"]
    inputs = list(c.get("inputs") or [])
    meta: dict = {}
    if not inputs:
        corpus = os.path.join(d, "corpus.jsonl")
        meta["corpus"] = write_corpus(corpus, max_bytes=int(c["max_bytes"]),
                                      min_chars=int(c["min_chars"]))
        meta["corpus"]["kind"] = "embedded: Python standard-library docstrings"
        inputs = [corpus]
    else:
        meta["corpus"] = {"kind": "given files", "inputs": inputs}
    train_jsonl, held_jsonl = os.path.join(d, "train.jsonl"), os.path.join(d, "heldout.jsonl")
    meta["split"] = _split_documents(inputs, train_jsonl, held_jsonl, int(c["heldout_every"]))
    log(f"data: {meta['split']}")

    tok_dir = os.path.join(d, "tokenizer")
    t = sc["tokenizer"]
    train_tokenizer([train_jsonl], int(t["vocab_size"]), tok_dir, kind=t.get("type", "bpe"),
                    show_progress=False)
    tok = load_tokenizer(tok_dir)
    workers = max(1, min(2, os.cpu_count() or 1))
    for name, src in (("train", train_jsonl), ("heldout", held_jsonl)):
        stats = prepare([src], tok_dir, os.path.join(d, name), workers=workers, progress=False)
        meta[f"{name}_tokens"] = int(stats.tokens)
        log(f"data: {name}: {stats.documents_written} documents, {stats.tokens:,} tokens")

    stream = _token_stream(os.path.join(d, "heldout"))
    n_win = int(ev["windows"])
    avail = len(stream) // (seq_len + 1)
    if avail < n_win:
        log(f"data: warning: held-out data holds only {avail} windows of {seq_len + 1} tokens "
            f"(eval.windows={n_win}); using {avail}")
        n_win = avail
    windows = stream[: n_win * (seq_len + 1)].reshape(n_win, seq_len + 1)
    rest = stream[n_win * (seq_len + 1):]
    P, T = int(ev["prompt_len"]), int(ev["target_len"])
    chunks = rest[: len(rest) // (P + T) * (P + T)].reshape(-1, P + T)
    chunks = chunks[~(chunks[:, P:] == tok.eod_id).any(axis=1)]
    task = chunks[: int(ev["task_examples"])]
    if len(task) < int(ev["task_examples"]):
        log(f"data: warning: only {len(task)} pause-task examples (eval.task_examples="
            f"{ev['task_examples']})")
    np.save(os.path.join(d, "windows.npy"), windows)
    np.save(os.path.join(d, "task.npy"), task)
    lay = tok.layout(128, tp, need_pause=True)  # every run gets the same rows
    meta.update(
        tokenizer=tok_dir, train_prefix=os.path.join(d, "train"),
        heldout_prefix=os.path.join(d, "heldout"), windows=os.path.join(d, "windows.npy"),
        task=os.path.join(d, "task.npy"), vocab_rows=tok.vocab_size,
        padded_vocab_size=lay.padded_vocab_size, pause_id=lay.pause_id, eod_id=tok.eod_id,
        seq_len=seq_len, n_windows=int(n_win), n_task=int(len(task)), prompt_len=P,
        target_len=T, heldout_stream_tokens=int(len(stream)))
    with open(meta_path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    log(f"data: {n_win} validation windows of {seq_len + 1} tokens, {len(task)} task examples "
        f"(prompt {P}, targets {T}); vocabulary {tok.vocab_size} -> {lay.padded_vocab_size} "
        f"rows, <pause> = {lay.pause_id}")
    return meta
