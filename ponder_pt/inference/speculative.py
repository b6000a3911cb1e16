"""Lossless speculative decoding over the pondering passes: the model drafts with its own first
d passes and verifies with the rest, so no second model is needed.

Pass k of a position attends only to pass-k keys/values, and its input e_k depends only on
passes < k of the same position: passes 0..d-1 of every token form a model of their own (the
draft), whose logits are those of pass d-1. A round, for each row:

1. draft: from the pending token y_0 (emitted, not yet run), n+1 one-token steps of passes
   0..d-1 at positions t..t+n; step i gives the draft distribution q_i and, for i < n, the
   drafted token y_{i+1}. Their pass < d keys/values are exact: nothing is recomputed.
2. verify: passes d..K over the n+1 positions in one call (from the e_d the draft left),
   giving the model's own distributions p_0..p_n.
3. accept: greedy keeps y_{i+1} while it is the argmax of p_i; sampling keeps it with
   probability min(1, p_i(y)/q_i(y)) and, at the first rejection, draws from the normalised
   (p_i - q_i)+ (speculative sampling: every emitted token is distributed as fixed-K
   sampling would draw it). All n kept: one more token from p_n.
4. roll back: every cache keeps the columns of y_0..y_j (j drafts kept); the rest are written
   over by the next round. In a batch, rows keep different numbers of columns: the columns a
   row rejected while another kept them are hidden from its attention like padding
   (`StaticKVCache.hide`) and squeezed out when the caches fill up (`compact`).

A round costs (n+1)·d one-token passes and K+1-d passes over n+1 tokens, and emits j+1 tokens
per row, where fixed-K decoding pays K+1 one-token passes per token: when a one-token pass is
bound by reading the weights, n+1 tokens cost about what one does. Greedy output is the
ordinary greedy output token for token; a one-token and an (n+1)-token pass round
differently, which can change a token only where its two best logits are within rounding
of each other.

Adaptive pondering at q < 1 is refused (its exits after the draft passes would need the
halting state carried into the verify call), as are latent thoughts and every-token pauses:
a token's first slot attends to the previous token's thought slots, so nothing can be drafted
ahead without running every slot, which is the full model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .decode import Decoder, adaptive_decoding
from .sampling import accept_draft, pick_token, residual_sample, sampling_probs


def parse_speculative(text: str) -> tuple[int, int]:
    """'d:n' (`--speculative`) -> (draft passes d, draft tokens n); ValueError otherwise."""
    try:
        d, n = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--speculative {text!r}: expected d:n, the passes the draft runs and "
                         "the tokens it drafts per verify step, e.g. 1:3") from None
    return d, n


def speculative_problem(model, draft_passes: int, draft_tokens: int,
                        ponder_steps: Optional[int] = None,
                        halt_q: Optional[float] = None) -> Optional[str]:
    """Why `model` cannot decode speculatively with (d, n), or None."""
    K = model.ponder_cfg.steps if ponder_steps is None else ponder_steps
    if getattr(model, "slots", 1) > 1:
        return ("speculative decoding drafts with a token's first passes; a latent-thoughts or "
                "every-token-pause model's next token attends to this token's later slots, so "
                "its first slot cannot draft ahead: decode it without --speculative")
    if K < 1:
        return ("speculative decoding over pondering passes needs a pondering model "
                "(ponder.steps >= 1): a plain model has no earlier pass to draft with")
    if adaptive_decoding(model, ponder_steps, halt_q):
        return ("speculative decoding of adaptive pondering at q < 1 is not supported: the "
                "verify step would have to resume each token's halting state after the draft "
                "passes. Decode with --halt-q 1 (every pass, fixed K) to draft, or without "
                "--speculative")
    if not 1 <= draft_passes <= K:
        return (f"--speculative {draft_passes}:{draft_tokens}: the draft runs passes 0..d-1 "
                f"of the K+1 = {K + 1}, so d must be in 1..{K}")
    if draft_tokens < 1:
        return (f"--speculative {draft_passes}:{draft_tokens}: draft at least one token per "
                "verify step (n >= 1)")
    return None


@dataclass
class SpeculativeStats:
    """Counts over the verify steps of one or more generations (summed over rows)."""
    verify_steps: int = 0
    """rounds x active rows."""
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    """tokens the rounds emitted (kept drafts and the verifier's own token of each round)."""

    def as_dict(self) -> dict:
        return {"acceptance_rate": self.accepted / self.drafted if self.drafted else None,
                "tokens_per_verify": (self.emitted / self.verify_steps if self.verify_steps
                                      else None),
                "verify_steps": self.verify_steps, "drafted": self.drafted,
                "accepted": self.accepted}


def describe_stats(d: dict) -> str:
    """One line for a person from `SpeculativeStats.as_dict()`: the acceptance rate and
    tokens per verify step."""
    if not d["verify_steps"]:
        return "no verify steps (every generation ended at its first token)"
    return (f"{d['acceptance_rate']:.1%} of {d['drafted']} drafted tokens accepted, "
            f"{d['tokens_per_verify']:.2f} tokens per verify step")


class SpeculativeDecoder(Decoder):
    """The eager `Decoder` (its prefill, caches and positions) with a draft step and a verify
    step over the passes; `commit` rolls the caches back to the kept columns."""

    def __init__(self, model, capacity: int, draft_passes: int, draft_tokens: int,
                 vocab_rows: Optional[int] = None, batch: int = 1,
                 ponder_steps: Optional[int] = None, halt_q: Optional[float] = None):
        problem = speculative_problem(model, draft_passes, draft_tokens, ponder_steps, halt_q)
        if problem:
            raise ValueError(problem)
        K = model.ponder_cfg.steps if ponder_steps is None else ponder_steps
        # spare columns: a round's drafts past the last position kept, and hidden columns
        # until `make_room` squeezes them out
        super().__init__(model, capacity, K, vocab_rows, mode="eager", batch=batch,
                         halt_q=1.0 if model.halting is not None else None,
                         spare=draft_tokens + 1)
        self.d, self.n = draft_passes, draft_tokens
        self._drafts: list = []  # e_d [1, b, h] of each drafted position this round
        self._start = 0  # the round's first column

    @property
    def positions(self) -> torch.Tensor:
        """[b] each row's next position (the tokens it has run, its prompt's included)."""
        return self._next

    @torch.no_grad()
    def draft(self, tokens: Sequence[int]) -> torch.Tensor:
        """Passes 0..d-1 on one token per row at the next draft position: the draft logits
        [b, V] (pass d-1's)."""
        if not self._drafts:
            self._start = self.caches[0].length
        i = len(self._drafts)
        ids = torch.tensor(list(tokens), device=self.device)[:, None]
        positions = (self._next + i)[:, None]
        e = self.model.embed_input(ids, self.K)
        e, logits = self.model.passes(e, positions, self.caches, 0, self.d)
        self._drafts.append(e)
        return self.masked(logits[:, -1])

    @torch.no_grad()
    def verify(self) -> torch.Tensor:
        """Passes d..K over the drafted positions: the model's logits [b, n+1, V]."""
        m = len(self._drafts)
        positions = self._next[:, None] + torch.arange(m, device=self.device)[None, :]
        _, logits = self.model.passes(torch.cat(self._drafts), positions, self.caches,
                                      self.d, self.K + 1)
        return self.masked(logits)

    def commit(self, keep: Sequence[int]) -> None:
        """Row r keeps its first keep[r] drafted positions (the rest are rolled back); the
        caches keep max(keep) columns, hiding from each row the ones it did not keep."""
        most, start = max(keep), self._start
        kept = torch.tensor(list(keep), device=self.device)
        if min(keep) < most:
            hidden = torch.arange(most, device=self.device)[None, :] >= kept[:, None]
            for cache in self.caches:
                cache.hide(start, hidden)
        for cache in self.caches:
            cache.length = start + most
        self._next += kept
        self._drafts = []

    def make_room(self, positions: int, n: int) -> None:
        """Room for a round of n+1 drafted columns reaching `positions` positions (hidden
        columns squeezed out when the caches are full); a ValueError past the positions the
        decoder was made for, as `Decoder.step` raises."""
        self.check_positions(positions)
        if self.caches[0].length + n + 1 > self.caches[0].capacity:
            for cache in self.caches:
                cache.compact()


@torch.no_grad()
def generate_speculative_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                               draft_passes: int, draft_tokens: int, *,
                               vocab_rows: Optional[int] = None, eos_id: Optional[int] = None,
                               greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
                               generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                               ponder_steps: Optional[int] = None,
                               halt_q: Optional[float] = None,
                               stats: Optional[SpeculativeStats] = None,
                               on_round=None) -> list[list[int]]:
    """Fixed-K decoding of left-padded prompts with the draft of passes 0..d-1 (d =
    draft_passes) proposing draft_tokens tokens per verify step. The arguments are
    `generate_cached_batch`'s: greedy output is its output; a sampled row is distributed as
    its sample (drawn from generators[row] only, so a row gets the sample it gets alone, up to
    rounding). `stats` receives the counts; on_round(emitted) is called after each round with
    the tokens each row emitted in it."""
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    b = len(prompts)
    gens = list(generators) if generators is not None else [None] * b
    if not greedy and len(gens) != b:
        raise ValueError(f"{len(gens)} generators for {b} prompts")
    width = max(len(p) for p in prompts)
    dec = SpeculativeDecoder(model, width + max_new_tokens - 1, draft_passes,
                             draft_tokens, vocab_rows, batch=b, ponder_steps=ponder_steps,
                             halt_q=halt_q)
    stats = stats if stats is not None else SpeculativeStats()
    z = dec.prefill(prompts)
    outs: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b

    def emit(row: int, token: int) -> None:
        outs[row].append(token)
        done[row] = (eos_id is not None and token == eos_id) or len(outs[row]) == max_new_tokens

    def pick(logits: torch.Tensor, row: int) -> int:
        return pick_token(logits, greedy, temperature, top_k, gens[row])

    pending = [pick(z[row], row) for row in range(b)]
    for row in range(b):
        emit(row, pending[row])
    while not all(done):
        # row r drafts at most the tokens it still needs, less the verifier's own
        wants = [0 if done[r] else min(dec.n, max_new_tokens - len(outs[r]) - 1)
                 for r in range(b)]
        n = max(wants)
        dec.make_room(max(int(dec.positions[r]) + wants[r] + 1 for r in range(b)
                          if not done[r]), n)
        ys, qs = [list(pending)], []
        for i in range(n + 1):
            zq = dec.draft(ys[i])
            if i == n:
                break
            qs.append(None if greedy else sampling_probs(zq, temperature, top_k))
            top = zq.argmax(-1).tolist() if greedy else None
            ys.append([(top[r] if greedy else
                        int(torch.multinomial(qs[i][r], 1, generator=gens[r])))
                       if i < wants[r] else ys[i][r] for r in range(b)])
        zp = dec.verify()
        best = zp.argmax(-1).tolist() if greedy else None  # [b][n+1]
        keep, emitted = [], []
        for r in range(b):
            if done[r]:
                keep.append(0)  # hidden: an ended row's columns never fill the caches
                emitted.append([])
                continue
            before = len(outs[r])
            kept, nxt = 0, None
            p = None if greedy else sampling_probs(zp[r], temperature, top_k)
            for i in range(wants[r]):
                y = ys[i + 1][r]
                ok = best[r][i] == y if greedy else accept_draft(p[i], qs[i][r], y, gens[r])
                if not ok:
                    nxt = best[r][i] if greedy else residual_sample(p[i], qs[i][r], gens[r])
                    break
                kept += 1
                emit(r, y)
                if done[r]:
                    break
            stats.drafted += wants[r]
            stats.accepted += kept
            stats.verify_steps += 1
            if not done[r]:
                nxt = pick(zp[r, kept], r) if nxt is None else nxt
                emit(r, nxt)
                pending[r] = nxt
            stats.emitted += len(outs[r]) - before
            keep.append(kept + 1)
            emitted.append(outs[r][before:])
        dec.commit(keep)
        if on_round is not None:
            on_round(emitted)
    return outs
