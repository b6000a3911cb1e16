"""Training examples of `ponder-pt sft`, exactly as the model is fed them.

For prompt tokens P, M pauses and answer tokens A, the sequence is P + [<pause>]*M + A + [EOS].
As in `ponder-pt data inspect`, `input_ids` are the sequence without its last token and
`labels` are the targets aligned with them (the sequence shifted by one): -100 wherever the
target is a prompt token or a pause, so the loss covers only A and EOS. The first answer
token is therefore predicted at the last pause (at the last prompt token when M = 0).
`pause_positions` are the indices of the pauses in `input_ids`.

An example longer than `max_length` inputs loses prompt tokens from the left (counted in
`Prepared.truncated`); one whose pauses and answer alone do not fit is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

IGNORE = -100


class TooLong(ValueError):
    pass


def build_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], eos_id: int,
                  pause_id: Optional[int], pauses: int, max_length: int) -> dict:
    """{"input_ids", "labels", "pause_positions", "truncated"} of one example."""
    if pauses and pause_id is None:
        raise ValueError("pauses requested but no pause token id")
    prompt = list(prompt_ids)
    tail = ([int(pause_id)] * pauses if pauses else []) + list(answer_ids) + [int(eos_id)]
    drop = max(0, len(prompt) + len(tail) - 1 - max_length)
    if drop >= len(prompt):
        raise TooLong(f"the {pauses} pauses and the {len(answer_ids)}-token answer leave no room "
                      f"for the prompt within --max-length {max_length}")
    prompt = prompt[drop:]
    seq = prompt + tail
    first_target = len(prompt) + pauses  # index in seq of the first answer token
    labels = [t if j + 1 >= first_target else IGNORE for j, t in enumerate(seq[1:])]
    return {"input_ids": seq[:-1], "labels": labels,
            "pause_positions": list(range(len(prompt), len(prompt) + pauses)),
            "truncated": drop}


@dataclass
class Prepared:
    items: list                      # build_example dicts, with "index" into the split
    truncated: int = 0               # examples that lost prompt tokens
    rejected: list = field(default_factory=list)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def prepare_split(rows: list, tokenizer, pause_id: Optional[int], pauses: int,
                  max_length: int) -> Prepared:
    """Tokenize a split's rows (prompt and answer encoded separately, as at inference)."""
    prompts = tokenizer.encode_batch([r["prompt"] for r in rows])
    answers = tokenizer.encode_batch([r["target"] for r in rows])
    out = Prepared([])
    for i, (row, p, a) in enumerate(zip(rows, prompts, answers)):
        if not p or not a:
            out.rejected.append({"file": row.get("file"), "line": row.get("line"),
                                 "reason": "prompt or answer encodes to no tokens"})
            continue
        try:
            ex = build_example(p, a, tokenizer.eod_id, pause_id, pauses, max_length)
        except TooLong as exc:
            out.rejected.append({"file": row.get("file"), "line": row.get("line"),
                                 "reason": str(exc)})
            continue
        out.truncated += bool(ex["truncated"])
        out.items.append({**ex, "index": i})
    return out


def collate(items: list, pad_id: int):
    """Right-padded LongTensors input_ids / labels [b, s] (padding: pad_id / -100)."""
    import torch

    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        ids[r, :n] = torch.tensor(it["input_ids"])
        labels[r, :n] = torch.tensor(it["labels"])
    return {"input_ids": ids, "labels": labels}


def render(item: dict, tokenizer, pause_id: Optional[int]) -> str:
    """Human view of one example: prompt | ⏸ x M | answer (the loss part in brackets)."""
    ids = item["input_ids"]
    first = next((j for j, t in enumerate(item["labels"]) if t != IGNORE), len(ids))
    prompt = [t for t in ids[:first + 1] if t != pause_id]
    answer = [t for t in item["labels"] if t != IGNORE]
    return (f"── example {item.get('index', '?')}: {len(ids)} input tokens, "
            f"{len(item['pause_positions'])} pauses, {len(answer)} loss tokens"
            + (", truncated" if item.get("truncated") else "") + "\n"
            + tokenizer.decode(prompt) + "⏸" * len(item["pause_positions"])
            + " → [" + tokenizer.decode(answer[:-1]) + "⟨EOS⟩]")
