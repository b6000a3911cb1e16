"""Incremental decoding of a `PonderLM` with K+1 preallocated KV caches (a batch of
left-padded prompts, or one), and on a GPU the one-token step replayed from a CUDA graph.

A new token costs (K+1) passes x layers of one-token work: a few hundred small kernels, each
far cheaper to run than to launch from Python (an H200 measured ~1.5 ms per layer call for
K = 3 at the Pythia-160M shape with growing caches). So the step is captured once as a CUDA
graph (all K+1 passes, the logits and the masking of padded vocabulary rows) and replayed per
token: one launch instead of hundreds. The caches are `StaticKVCache`s sized for prompt + new
tokens, so the step's shapes never change; the tokens, their positions and the cache column
live in device buffers the graph reads.

The graph is checked before it is trusted: the first two replays (the first right after the
capture, the second one column on, so a position baked in by mistake would show) are each
compared with the same step run eagerly before their logits are returned; a mismatch, or any
error while capturing, falls back to eager decoding with a warning naming the reason
(`Decoder.graph_status`), and the step returns the eager logits. Writing the same token's
keys/values at the same column twice is harmless, which is what makes the warm-ups and the
checks free of side effects.

Batches: prompts are left-padded to one length; each row's positions count its own tokens
only, and no query attends to padding, so every row decodes as it would alone.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from ..sdpa_backends import varying_shapes


CHECKED_REPLAYS = 2  # replays compared with the eager step before their logits are returned


def replay_mismatch(got: torch.Tensor, want: torch.Tensor) -> Optional[float]:
    """None when replayed logits `got` equal the eager step's `want`: the same entries finite
    (masked vocabulary rows are -inf in both) and the rest within 1e-3 of the largest
    magnitude (at least 1); else the largest difference (inf where finiteness differs)."""
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        return float("inf")
    tol = 1e-3 * max(1.0, float(want[finite].abs().max()) if bool(finite.any()) else 1.0)
    diff = float((got - want).nan_to_num(posinf=0, neginf=0).abs().max())
    return diff if diff > tol else None


class Decoder:
    """prefill(prompts) -> last logits [b, V] (float32, rows >= vocab_rows at -inf), then
    step(tokens) -> the next logits (valid until the following step); `capacity` positions in
    all: the longest prompt plus the new tokens (GPT-2: at most its learned positions; going
    past either is a ValueError). `prefill_one` / `step_one` are the batch-1 forms ([V]).

    spare: cache columns beyond the positions (`speculative.SpeculativeDecoder`'s drafts).

    mode: "eager" (each step runs the model on the filled columns), "static" (the fixed-shape
    step on device buffers that a graph captures, run eagerly: any device; for checking and
    debugging the graph's arithmetic apart from the capture), "graph" (that step replayed from
    a CUDA graph; CUDA only), or None: "graph" for CUDA parameters, else "eager".
    """

    MODES = ("eager", "static", "graph")

    def __init__(self, model, capacity: int, ponder_steps: Optional[int] = None,
                 vocab_rows: Optional[int] = None, mode: Optional[str] = None, batch: int = 1,
                 halt_q: Optional[float] = None, spare: int = 0):
        self.model, self.K, self.vocab_rows, self.batch = model, ponder_steps, vocab_rows, batch
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        mode = ("graph" if on_cuda else "eager") if mode is None else mode
        if mode not in self.MODES:
            raise ValueError(f"decoding mode must be one of {self.MODES}, got {mode!r}")
        if mode == "graph" and not on_cuda:
            raise ValueError("CUDA-graph decoding needs the model on a CUDA device")
        # adaptive pondering: which passes run depends on the tokens, so no single graph
        self.halt_q = halt_q
        self.adaptive = adaptive_decoding(model, ponder_steps, halt_q)
        self.passes: list = []  # passes each row's latest logits took (adaptive pondering)
        if self.adaptive and mode == "graph":
            mode = "eager"
            warnings.warn("adaptive pondering decodes eagerly: the passes skipped per token "
                          "depend on the token, which one CUDA graph cannot replay",
                          RuntimeWarning, stacklevel=2)
        # latent thoughts and every-token pauses: M+1 columns per token
        self.slots = getattr(model, "slots", 1)
        if self.slots > 1 and mode != "eager":
            if mode == "graph":
                warnings.warn("latent thoughts and every-token pauses decode eagerly: a "
                              "token's M+1 slots fill M+1 columns, not the one-column step a "
                              "CUDA graph replays", RuntimeWarning, stacklevel=2)
            mode = "eager"
        self.mode = mode
        # GPT-2 cannot go past its position table, whatever the caller asks
        self.capped = model.pos_embed is not None and capacity > model.cfg.max_seq_len
        self.capacity = model.cfg.max_seq_len if self.capped else capacity
        self.caches = model.new_caches(ponder_steps, capacity=self.capacity, batch=batch,
                                       spare=spare)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.replays = 0
        self.graph_status = ("not captured yet" if mode == "graph" else
                             "off: adaptive pondering decodes eagerly" if self.adaptive else
                             "off: M+1 slots per token decode eagerly" if self.slots > 1
                             else "off")
        self._next = torch.zeros(batch, dtype=torch.long, device=self.device)  # next positions
        if mode != "eager":  # what the fixed-shape step reads
            self._tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            self._pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            self._col = torch.zeros(1, dtype=torch.long, device=self.device)

    @property
    def length(self) -> int:
        """Positions filled (the longest prompt plus the tokens stepped so far)."""
        return self.caches[0].length // self.slots

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] as float32 with the rows >= vocab_rows at -inf (never emitted)."""
        z = logits.float()
        if self.vocab_rows is not None:
            z[..., self.vocab_rows:] = float("-inf")
        return z

    def _last(self, logits: torch.Tensor) -> torch.Tensor:
        return self.masked(logits[:, -1])

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if not self.adaptive:  # (a halting model asked for q = 1: every pass)
            return self._last(self.model(ids, position_ids=position_ids, caches=self.caches,
                                         gather_logits=True, ponder_steps=self.K, halt_q=1.0))
        logits, exits = self.model(ids, position_ids=position_ids, caches=self.caches,
                                   gather_logits=True, halt_q=self.halt_q, return_exits=True)
        self.passes = (exits[:, -1] + 1).tolist()
        return self._last(logits)

    def _room(self, n: int) -> None:
        self.check_positions(self.length + n)

    def check_positions(self, end: int) -> None:
        """A ValueError naming the limit when positions 0..end-1 do not fit."""
        if end > self.capacity:
            what = ("GPT-2's learned positions (model.max_seq_len)" if self.capped
                    else "the KV caches")
            raise ValueError(f"position {end - 1} is beyond {what}: {self.capacity} positions")

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Left-pad the prompts (one per row, none empty) and run them: logits [b, V]."""
        if len(prompts) != self.batch or not all(len(p) for p in prompts):
            raise ValueError(f"need {self.batch} non-empty prompts, got "
                             f"{[len(p) for p in prompts]} tokens")
        width = max(len(p) for p in prompts)
        self._room(width)
        ids = torch.zeros(self.batch, width, dtype=torch.long)
        valid = torch.zeros(self.batch, width, dtype=torch.bool)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(list(p))
            valid[row, width - len(p):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        if not bool(valid.all()):
            for cache in self.caches:
                cache.set_valid(valid.repeat_interleave(self.slots, dim=1))
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        self._next = valid.sum(1)
        with varying_shapes(self.device):  # every prompt width is a new attention shape
            return self._forward(ids, positions)

    def prefill_one(self, prompt: Sequence[int]) -> torch.Tensor:
        return self.prefill([prompt])[0]

    def step_one(self, token: int) -> torch.Tensor:
        return self.step([token])[0]

    @torch.no_grad()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """One new token per row: the next logits [b, V]."""
        self._room(1)
        col = self.length
        if self.mode == "eager":  # the keys grow by a column: a new shape every token
            with varying_shapes(self.device):
                out = self._forward(torch.tensor(list(tokens), device=self.device)[:, None],
                                    self._next[:, None])
            self._next += 1
            return out
        self._tokens.copy_(torch.tensor(list(tokens))[:, None])
        self._pos.copy_(self._next[:, None])
        self._col.fill_(col)
        if self.caches[0].columns is None:  # the prefill ran on the filled columns
            self._set_columns(self._col)
        if self.mode == "static":
            return self._stepped(col, self._static_step(col))
        if self.graph is None:
            try:
                self._capture(col)
            except Exception as err:  # noqa: BLE001 - any capture failure means eager decoding
                return self._fall_back(col, tokens, f"capture failed: {type(err).__name__}: "
                                                    f"{err}")
        self.graph.replay()
        self.replays += 1
        if self.replays <= CHECKED_REPLAYS:
            got = self._out.clone()
            want = self._static_step(col)
            diff = replay_mismatch(got, want)
            if diff is not None:
                self._stepped(col, want)
                return self._fall_back(None, tokens, f"replay {self.replays} differs from "
                                                     f"eager by {diff:.3g}", logits=want)
            self.graph_status = (f"on (replays 1..{self.replays} checked against eager)"
                                 if self.replays == CHECKED_REPLAYS else
                                 f"checking (replay {self.replays} equals eager)")
        return self._stepped(col, self._out)

    # ------------------------------------------------------------------ fixed shapes, graph

    def _stepped(self, col: int, out: torch.Tensor) -> torch.Tensor:
        self._set_length(col + 1)
        self._next += 1
        return out

    def _set_columns(self, columns: Optional[torch.Tensor]) -> None:
        for c in self.caches:
            c.columns = columns

    def _set_length(self, n: int) -> None:
        for c in self.caches:
            c.length = n

    def _static_step(self, col: int) -> torch.Tensor:
        """The fixed-shape step on the device buffers (what the graph captures); the model's
        own length bookkeeping is undone so one step counts once however often it runs."""
        out = self._forward(self._tokens, self._pos)
        self._set_length(col)
        return out

    def _capture(self, col: int) -> None:
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-ups: lazy inits and allocator state outside
            for _ in range(2):
                self._static_step(col)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self._static_step(col)
        self.graph = graph

    def _fall_back(self, col: Optional[int], tokens, reason: str,
                   logits: Optional[torch.Tensor] = None):
        """Eager from here on; with `logits` the step is already done (col None), else it is
        run again eagerly at column `col`."""
        warnings.warn(f"CUDA-graph decoding off, decoding eagerly: {reason}", RuntimeWarning,
                      stacklevel=3)
        self.graph, self.mode, self.graph_status = None, "eager", f"fell back: {reason}"
        self._set_columns(None)
        if logits is not None:
            return logits
        self._set_length(col)
        return self.step(tokens)


def adaptive_decoding(model, ponder_steps: Optional[int], halt_q: Optional[float]) -> bool:
    """Whether decoding `model` exits tokens early (a halting head, its own K, q < 1)."""
    if getattr(model, "halting", None) is None:
        return False
    h = model.ponder_cfg.halting
    q = h.q if halt_q is None else halt_q
    return q < 1.0 and ponder_steps in (None, model.ponder_cfg.steps)


def weight_read_ratio(model, ponder_steps: int, context: int = 0) -> float:
    """The least K-step decoding can cost per token relative to (K+1) x plain decoding of the
    same weights, when a one-token step is bound by reading memory (batch 1 on a GPU): every
    pass reads the blocks, final norm and output head (and `context` cached positions of
    keys/values), and each of the K pondering passes also reads the whole input embedding for
    p . W_in (none for the looped baseline's hidden-state feedback). E.g. Pythia-160M at K = 3:
    1.23, Pythia-1B: 1.08; a measured ratio is judged against this floor."""
    def nbytes(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    cfg, w = model.cfg, model.embed.weight
    per_pass = (nbytes(model.layers.parameters()) + nbytes(model.final_norm.parameters())
                + nbytes([model.output_weight()])
                + 2 * cfg.num_layers * cfg.kv_heads * cfg.head_dim * context * w.element_size())
    feedback = 0 if model.feeds_back_hidden else nbytes([w])
    K = ponder_steps
    return 1.0 + K * feedback / ((K + 1) * per_pass)
