"""`ponder-pt data inspect`: show exactly what the model will be fed, sample by sample."""

from __future__ import annotations

import json
from typing import Iterator, Optional

from .samples import PretrainDataset, build_datasets, datasets_for_config


def open_samples(data: Optional[str], seq_len: Optional[int], *, seed: int = 1234,
                 pause_rate: float = 0.0, pause_id: Optional[int] = None, eod_id: int = 0,
                 vocab_size: int = 65536, num_samples: int = 8, split: str = "train",
                 cache_dir: Optional[str] = None, cfg=None, tokenizer=None) -> PretrainDataset:
    """The dataset of one split: from a run config (the training stream itself) or one prefix."""
    index = ("train", "valid", "test").index(split)
    sizes = [0, 0, 0]
    sizes[index] = num_samples
    if cfg is not None:
        if tokenizer is None:
            raise ValueError("--config needs data.tokenizer (or --tokenizer) to resolve ids")
        ds = datasets_for_config(cfg, tokenizer, tuple(sizes))[index]
    else:
        if data is None or seq_len is None:
            raise ValueError("give --data PREFIX and --seq-len L, or --config of a run")
        only_this_split = ",".join("1" if i == index else "0" for i in range(3))
        ds = build_datasets([(data, 1.0)], seq_len=seq_len, seed=seed, num_samples=tuple(sizes),
                            eod_id=eod_id, vocab_size=vocab_size, split=only_this_split,
                            pause_id=pause_id, pause_rate=pause_rate, cache_dir=cache_dir)[index]
    if ds is None:
        raise ValueError(f"split {split!r} is empty for this configuration")
    return ds


def iter_records(ds: PretrainDataset, start: int, count: int) -> Iterator[dict]:
    for idx in range(start, min(start + count, len(ds))):
        sample = ds[idx]
        yield {"index": idx,
               "tokens": sample["tokens"].tolist(),
               "labels": sample["labels"].tolist(),
               "loss_mask": [int(x) for x in sample["loss_mask"].tolist()]}


def render(record: dict, tokenizer=None, pause_id: Optional[int] = None) -> str:
    """Human view: the input text with pauses shown as ⏸ and the masked-target count."""
    tokens = record["tokens"]
    pauses = sum(1 for t in tokens if t == pause_id)
    masked = len(record["loss_mask"]) - sum(record["loss_mask"])
    head = (f"── sample {record['index']}: {len(tokens)} tokens, {pauses} pauses, "
            f"{masked} masked targets")
    if tokenizer is None:
        return f"{head}\n{tokens}"
    pieces, run = [], []
    for t in tokens:
        if t == pause_id or t >= tokenizer.vocab_size:
            if run:
                pieces.append(tokenizer.decode(run))
                run = []
            pieces.append("⏸" if t == pause_id else f"<{t}>")
        elif t == tokenizer.eod_id:
            if run:
                pieces.append(tokenizer.decode(run))
                run = []
            pieces.append("⟨EOD⟩")
        else:
            run.append(t)
    if run:
        pieces.append(tokenizer.decode(run))
    return f"{head}\n{''.join(pieces)}"


def dumps(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))
