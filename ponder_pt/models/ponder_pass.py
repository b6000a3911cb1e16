"""One pondering pass outside the transformer blocks, written once for both of its users:
`PonderLM` (model.py), which loops over the K+1 passes, and the pipeline's shared weights
(pipeline.py), which unroll the same passes into a chain of layers for DeepSpeed.

`PonderPass` is a mixin over the modules both hold, under the names their state dicts have
always had (so checkpoints and `ponder_pt.weights` are untouched): `embed` (W_in), `pos_embed`
(GPT-2's learned positions, else None), `final_norm`, `output` (the head; None in the
pipeline's shared weights with tied embeddings, which never held one), `halting` (adaptive
pondering's head, else None); and the settings `cfg` (ModelConfig), `ponder_cfg`
(PonderConfig) and `sequence_parallel`. What it decides, for every method built on it:

* the input: e_0 = W_in[x]·s, s = √d with `ponder.scale_embeds` (·K with
  `ponder.scale_initial_by_steps`), unscaled without pondering; GPT-2's positions added to
  every pass's input, never to the stream e;
* the head: logits z = final_norm(x)·W_outᵀ, vocab-parallel;
* the feedback e_k = e_{k-1} + s·softmax(z)·W_in (top-k with `ponder.top_k`; chunked over
  `model.vocab_chunk` rows from the hidden state, unless top-k), or e_{k-1} + h_k for the
  looped baseline (`ponder.feedback="hidden"`);
* a pass's per-token cross-entropy (vocab-chunked from the hidden state with
  `model.vocab_chunk`) and its halting lambda.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.tensor_parallel import (VocabParallelEmbedding,
                                           copy_to_tensor_model_parallel_region,
                                           vocab_parallel_cross_entropy)

from . import halting as halt
from . import parallel as par
from . import vocab_chunk as vchunk
from .cross_entropy import cross_entropy_bf16
from .layers import LearnedPositions, make_norm
from .linear import ColumnLinear


def init_methods(cfg, seed: int):
    """`inits(name, output=False)`: the seeded init of weight `name` (gpt-neox small_init, or
    wang_init for the output projections of a block), the same draws in every layout."""
    base = cfg.init_method_std or par.small_init_std(cfg.hidden_size)
    out = (cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers) if cfg.init_method_std
           else par.wang_init_std(cfg.hidden_size, cfg.num_layers))

    def inits(name: str, output: bool = False):
        return par.seeded_normal(out if output else base, seed, name)

    return inits


class PonderPass:
    """The pass pieces of a module holding embed / pos_embed / final_norm / output / halting
    (see the module docstring). Tensors are sequence-first: [s, b, h] (this rank's sequence
    shard [s/tp, b, h] under sequence parallelism), logits [s, b, V/tp]."""

    # ------------------------------------------------------------------ building

    def build_input_layers(self, cfg, inits, mp, params_dtype: torch.dtype) -> None:
        """embed (W_in, vocab-parallel) and GPT-2's position table (replicated over TP)."""
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                            init_method=inits("embed"), config=mp)
        self.pos_embed = (LearnedPositions(cfg, inits("pos_embed"), self.sequence_parallel,
                                           params_dtype) if cfg.arch == "gpt2" else None)

    def build_output_layers(self, cfg, ponder, inits, mp, seed: int, params_dtype: torch.dtype,
                            tied_module: bool = True) -> None:
        """final_norm, the output head and the halting head (None when halting is off, so
        state dicts stay as they were). With tied embeddings the head multiplies by W_in:
        `tied_module` keeps a weightless `output` module for it (PonderLM's state dict has
        its `output._extra_state`), False leaves `output` None (the pipeline's never had)."""
        self.final_norm = make_norm(cfg, self.sequence_parallel)
        self.output = None
        if tied_module or not cfg.tie_embeddings:
            self.output = ColumnLinear(
                cfg.hidden_size, cfg.vocab_size, config=mp, init_method=inits("output"),
                bias=False, gather_output=False, skip_weight_param_allocation=cfg.tie_embeddings,
                disable_grad_reduce=self.sequence_parallel)
        self.halting = (halt.HaltingHead(cfg.hidden_size, ponder.halting.mode, seed,
                                         self.sequence_parallel, params_dtype)
                        if ponder.adaptive else None)

    # ------------------------------------------------------------------ settings

    @property
    def embed_scale(self) -> float:
        """s of the feedback: √d with `ponder.scale_embeds`, else 1."""
        return math.sqrt(self.cfg.hidden_size) if self.ponder_cfg.scale_embeds else 1.0

    def initial_scale(self, steps: int) -> float:
        """The factor of e_0 in a `steps`-pass forward (1 without pondering)."""
        if steps <= 0:
            return 1.0
        return self.embed_scale * (steps if self.ponder_cfg.scale_initial_by_steps else 1)

    @property
    def feeds_back_hidden(self) -> bool:
        """True for the looped baseline (`ponder.feedback="hidden"`)."""
        return self.ponder_cfg.feedback == "hidden"

    @property
    def vocab_chunk(self) -> int:
        """Vocabulary rows per chunk of the loss and the full-softmax feedback; 0 = off."""
        return self.cfg.vocab_chunk

    @property
    def chunked_feedback(self) -> bool:
        """Feedback from the hidden state by the chunked soft embedding. Top-k feedback stays
        unchunked: its global threshold needs every logit of a token at once."""
        return (self.vocab_chunk > 0 and not self.feeds_back_hidden
                and self.ponder_cfg.top_k == 0)

    @property
    def feedback_needs_logits(self) -> bool:
        """Whether the feedback is the softmax of materialised logits."""
        return not (self.feeds_back_hidden or self.chunked_feedback)

    def needs_logits(self, last: bool, labels: bool) -> bool:
        """Whether a pass materialises its logits: for the output (no labels), for an
        unchunked cross-entropy, or (passes before the last) for the softmax feedback."""
        return not labels or not self.vocab_chunk or (not last and self.feedback_needs_logits)

    def output_weight(self) -> torch.Tensor:
        """W_out (W_in with tied embeddings), this rank's vocabulary shard."""
        return self.embed.weight if self.cfg.tie_embeddings else self.output.weight

    # ------------------------------------------------------------------ the pass

    def embed_input(self, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """e_0: [b, s] ids (any id < padded vocab) -> [s, b, h], replicated over TP."""
        e = self.embed(input_ids.t().contiguous())
        return e * self.initial_scale(steps) if steps > 0 else e

    def pass_input(self, e: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x entering a pass: e, plus the positions for GPT-2 (position_ids [b, s])."""
        return e if self.pos_embed is None else self.pos_embed(e, position_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden [s(/tp under SP), b, h] -> logits [s, b, V/tp]."""
        if self.sequence_parallel:
            hidden = par.gather_seq(hidden)
        if self.output is None:  # tied, no output module: what ColumnLinear does with W_in
            return torch.matmul(copy_to_tensor_model_parallel_region(hidden),
                                self.embed.weight.t())
        logits, _ = self.output(hidden,
                                weight=self.embed.weight if self.cfg.tie_embeddings else None)
        return logits

    def feed_back(self, e: torch.Tensor, hidden: torch.Tensor,
                  logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The next pass's input embedding e_k from e_{k-1} and pass k's final-norm hidden
        state (and its logits when the caller has them; computed here when needed).

        feedback "embedding" (PonderingLM): e_k = e_{k-1} + s · softmax(z) · W_in,
        vocab-parallel (logits never gathered), chunk by chunk from the hidden state with
        `vocab_chunk` and no top-k. feedback "hidden" (looped baseline): e_k = e_{k-1} + h_k,
        the post-norm vector the head would multiply (not the pre-norm residual stream, whose
        scale grows with depth), unscaled. Under SP, h_k and the result are this rank's
        sequence shard, like e.
        """
        if self.feeds_back_hidden:
            return e + hidden.to(e.dtype)
        if self.chunked_feedback:
            mix = vchunk.soft_embedding(hidden, self.output_weight(), self.embed.weight,
                                        self.vocab_chunk, self.sequence_parallel)
            return e + self.embed_scale * mix
        z = self.head(hidden) if logits is None else logits
        probs = par.vocab_parallel_softmax(z, self.ponder_cfg.top_k)
        return e + self.embed_scale * par.soft_embedding(probs, self.embed.weight,
                                                          self.sequence_parallel)

    def pass_ce(self, hidden: torch.Tensor, logits: Optional[torch.Tensor],
                target: torch.Tensor, keep_logits: bool) -> torch.Tensor:
        """A pass's per-token CE [s, b] against target [s, b]: vocab-chunked from the hidden
        state with `vocab_chunk`, else from its logits (keep_logits: the feedback still
        needs them)."""
        if self.vocab_chunk:
            return vchunk.cross_entropy(hidden, self.output_weight(), target, self.vocab_chunk,
                                        self.sequence_parallel)
        return per_token_loss(logits, target, keep_input=keep_logits)

    def halting_lambda(self, hidden: torch.Tensor,
                       previous: Optional[torch.Tensor]) -> torch.Tensor:
        """lambda_k [s(/tp under SP), b] (float32) of a pass from its final-norm hidden state
        and, for `palbert`, lambda_{k-1}."""
        return self.halting(hidden, previous)


# --------------------------------------------------------------------------- losses


def targets(labels: torch.Tensor, loss_mask: Optional[torch.Tensor]):
    """[b, s] labels / mask -> [s, b] targets (masked ones set to 0) and float mask. Negative
    labels (HF's -100) count as masked."""
    target = labels.t().contiguous()
    mask = (target >= 0).float()
    if loss_mask is not None:
        mask = mask * loss_mask.t().float()
    return target.masked_fill(mask == 0, 0), mask


def per_token_loss(logits: torch.Tensor, target: torch.Tensor,
                   keep_input: bool = False) -> torch.Tensor:
    """Vocab-parallel CE [s, b] of logits [s, b, V/tp] against target [s, b].
    keep_input: the logits are used afterwards (adaptive pondering's feedback)."""
    if par.tp_size() == 1 and logits.dtype == torch.bfloat16:
        # a third of megatron's traffic, 2 B per logit kept instead of 4 (cross_entropy.py)
        return cross_entropy_bf16(logits, target)
    # megatron's CE overwrites its fp32 input in place (the logits are not needed
    # afterwards) and writes its gradient into the saved softmax; F.cross_entropy
    # would allocate two more fp32 [tokens, V] buffers at the backward peak
    z = logits.float()
    return vocab_parallel_cross_entropy(z.clone() if keep_input and z is logits else z, target)


def loss(logits: torch.Tensor, labels: torch.Tensor,
         loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean vocab-parallel CE over loss_mask. logits [s, b, V/tp], labels/mask [b, s]."""
    target, mask = targets(labels, loss_mask)
    per_token = per_token_loss(logits, target)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def chunked_loss(hidden: torch.Tensor, output_weight: torch.Tensor, labels: torch.Tensor,
                 loss_mask: Optional[torch.Tensor], chunk: int,
                 sequence_parallel: bool = False) -> torch.Tensor:
    """`loss` of the logits hidden · output_weightᵀ, vocab-chunked without the [s, b, V/tp]
    logits. hidden [s(/tp under SP), b, h]; labels / loss_mask [b, s]."""
    target, mask = targets(labels, loss_mask)
    per_token = vchunk.cross_entropy(hidden, output_weight, target, chunk, sequence_parallel)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
