"""The language model: embeddings, blocks, final norm, output head, and the pondering loop.

One class serves GPT-NeoX (Pythia), LLaMA and GPT-2, chosen by `ModelConfig.arch`. The same
code runs at TP=1 and TP>1 (megatron-core's parallel_state must be initialised; at TP=1 outside a
launcher call `ponder_pt.models.init_single_process()` first).

Pondering (DESIGN.md): e_0 = W_in[x]*s (s = sqrt(d) if scale_embeds else 1; *K if
scale_initial_by_steps); for k = 1..K run the transformer on e_{k-1}, p = softmax(logits) (or
renormalised top-k), e_k = e_{k-1} + s * p.W_in; the loss uses the logits of one more pass on
e_K. K = 0 is the plain model (no embedding scaling at all, identical to HF).

GPT-2 (learned absolute positions, no rotary): the stream e_k holds token embeddings only and
every pass adds the position table to its input, transformer(e_{k-1}) = blocks(e_{k-1} + wpe);
so positions enter each pass exactly once, as rotary does in the other two archs. This is what
a pondering loop over HF's GPT2Model computes (it adds `wpe` to whatever `inputs_embeds` a pass
hands it), hence what the exported PonderGPT2ForCausalLM runs. The `sqrt(d)` scaling applies to
the token embeddings (e_0 and p.W_in), never to the positions; `inputs_embeds` given to
`forward` are e_0 without positions, as for HF's GPT2Model.

`ponder.feedback="hidden"` is the "looped" baseline of PonderingLM's ablation: the same K+1
passes and the same e_0, but e_k = e_{k-1} + h_k with h_k the final-norm hidden state of pass
k (the vector the output head would multiply), unscaled; no softmax, no p.W_in, and the head
runs on the last pass only.

Adaptive pondering (`ponder.halting.mode`, DESIGN.md; `halting.py`): a halting head after
every pass gives each token's exit probabilities; training adds the per-pass losses, and
inference exits tokens early under the frozen keys/values rule (`_adaptive`). Off, the model
has no halting module and runs exactly as without it.

Latent thoughts (`thoughts.count` M > 0, DESIGN.md; `thoughts.py`): after every token M
thought slots, each fed the final-norm hidden state of the slot before; one KV cache holds
M+1 slots per token. A call without caches runs training's Jacobi iterations (n drawn per
step from `thoughts.train_iters` in training with labels, `thoughts.jacobi_iters` otherwise);
a cached call computes the thoughts exactly, slot after slot (`thoughts.prefill: exact`), or
by Jacobi before one appending pass (`prefill: jacobi`). Token embeddings are scaled by
sqrt(2.5 d) with `thoughts.scale_embeds`.

Every-token pauses (`pause.mode: every_token`, PonderLM-2's pause baseline) use the same
layout with M <pause> slots after every token; their inputs are known, so one pass computes
them, cached or not.

`model.vocab_chunk` > 0 computes the full-softmax feedback and the training loss from the
final-norm hidden state over chunks of vocabulary rows (`vocab_chunk.py`), so no [tokens, V]
tensor is kept for backward; top-k feedback (`ponder.top_k` > 0) and calls without labels
(logits for inference) keep the unchunked path.

Everything of a pass outside the blocks -- the scaled input embedding, the pass input, the
head, the feedback, the per-pass cross-entropy, the halting lambda -- is `PonderPass`'s
(`ponder_pass.py`), written once for this model and the pipeline's stages (`pipeline.py`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.schema import ModelConfig, PauseConfig, PonderConfig, ThoughtsConfig
from .. import halting_math as hm
from . import halting as halt
from . import parallel as par
from . import ponder_pass as pp
from . import thoughts as th
from .layers import Block, KVCache, RMSNorm, Rotary, StaticKVCache
from .ponder_pass import PonderPass

ARCHS = ("gpt_neox", "llama", "gpt2")


class PonderLM(PonderPass, nn.Module):
    """GPT-NeoX / LLaMA / GPT-2 decoder with optional continuous-space pondering.

    Args:
        cfg: model shape (`cfg.vocab_size` must be the padded vocabulary, divisible by TP).
        ponder: pondering settings; None or steps=0 = plain model.
        sequence_parallel: Megatron-style SP (needs TP > 1 to have an effect; sequence length
            divisible by TP).
        sp_grad_sync: how the partial grads of SP-replicated params (norms, row biases) are
            summed over TP. "hooks" (default): a gradient hook all-reduces them during
            backward, so p.grad is complete whatever consumes it next (DeepSpeed ZeRO-2
            included). "manual": Megatron's way, one flattened all-reduce when the training
            loop calls `allreduce_sequence_parallel_grads(model)` after backward.
        seed: init seed; weights are identical for any TP degree.
        params_dtype: parameter dtype (init always draws in fp32 first).
        thoughts: latent thoughts; None or count=0 = none. `seed` also seeds the draw of
            each training step's Jacobi iterations (`begin_step`).
        pause: with mode every_token, `per_token` <pause> slots (id `token_id`) after every
            token; other modes change nothing here (their pauses are in the data).
    """

    def __init__(self, cfg: ModelConfig, ponder: Optional[PonderConfig] = None, *,
                 sequence_parallel: bool = False, sp_grad_sync: str = "hooks", seed: int = 1234,
                 params_dtype: torch.dtype = torch.float32,
                 thoughts: Optional[ThoughtsConfig] = None,
                 pause: Optional[PauseConfig] = None):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {ARCHS}, got {cfg.arch!r}")
        if not cfg.vocab_size:
            raise ValueError("model.vocab_size (padded) must be set before building the model")
        self.cfg = cfg
        self.ponder_cfg = ponder or PonderConfig(steps=0)
        self.thoughts_cfg = thoughts or ThoughtsConfig(count=0)
        if self.thoughts_cfg.count and self.ponder_cfg.steps:
            raise ValueError("latent thoughts (thoughts.count) and pondering (ponder.steps) "
                             "do not compose; set one of them to 0")
        self.seed, self.thought_step = seed, 0
        self.pause_slots = pause.every_token if pause is not None else 0
        self.pause_id = pause.token_id if self.pause_slots else None
        if self.pause_slots and (self.pause_id is None or self.ponder_cfg.steps
                                 or self.thoughts_cfg.count):
            raise ValueError("every-token pauses need pause.token_id and no pondering or "
                             "latent thoughts")
        self.sequence_parallel = bool(sequence_parallel) and par.tp_size() > 1
        mp = par.megatron_config(params_dtype)
        inits = pp.init_methods(cfg, seed)
        # GPT-2: learned positions (replicated over TP), added at the start of every pass
        self.build_input_layers(cfg, inits, mp, params_dtype)
        self.layers = nn.ModuleList(
            Block(cfg, mp, inits, self.sequence_parallel, i) for i in range(cfg.num_layers))
        # adaptive pondering's halting head: no module at all when off
        self.build_output_layers(cfg, self.ponder_cfg, inits, mp, seed, params_dtype)
        self.rotary = Rotary(cfg.head_dim, cfg.rotary_pct, cfg.rotary_base)
        self.halting_stats: Optional[dict] = None  # of the last forward with labels
        self.draft_stats: Optional[torch.Tensor] = None  # the last training forward's draft CE
        self.set_activation_checkpointing(cfg.activation_checkpointing)
        for module in self.modules():  # megatron layers are already in params_dtype
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.to(params_dtype)
        for p in self.parameters():  # replicated params default to "not SP"
            if not hasattr(p, "sequence_parallel"):
                p.sequence_parallel = False
        if sp_grad_sync not in ("hooks", "manual"):
            raise ValueError(f"sp_grad_sync must be hooks or manual, got {sp_grad_sync!r}")
        self.sp_grad_sync = sp_grad_sync
        if self.sequence_parallel and sp_grad_sync == "hooks":
            par.register_sequence_parallel_grad_hooks(self)

    def set_activation_checkpointing(self, mode: str) -> None:
        """none | full (recompute each block) | selective (recompute only rotary + attention
        core). Applies inside every pass, pondering passes included; active in train mode."""
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"unknown activation_checkpointing {mode!r}")
        self.checkpointing = mode
        for block in self.layers:
            block.attn.selective = mode == "selective"

    def compile_blocks(self) -> None:
        """torch.compile every transformer block in place (`nn.Module.compile`: parameter and
        state_dict names stay as they are, no `_orig_mod.`). The K+1 pondering passes and
        full checkpointing (`checkpoint` calls the block) run the compiled block; selective
        checkpointing is traced inside it. Blocks share one graph per mode (train / eval).
        For training at TP = PP = 1 (validation enforces it): at TP = 2 the results match but
        Dynamo breaks the graph at every column-parallel linear (megatron's autograd.Function
        issues an async all-reduce), and the pipeline builds its own blocks."""
        import warnings

        # megatron-core calls warnings.warn (a DeprecationWarning, hidden by default) on every
        # linear without a tp_group; each call would be a graph break splitting a block into
        # ~8 graphs. Dynamo drops warnings.warn calls in traced code instead (a process-wide
        # Dynamo setting; eager code still warns).
        torch._dynamo.config.ignore_logging_functions.add(warnings.warn)
        for block in self.layers:
            block.compile()

    @property
    def slots(self) -> int:
        """KV-cache columns per token: M+1 with latent thoughts or M every-token pauses,
        else 1."""
        return self.thoughts_cfg.count + self.pause_slots + 1

    def begin_step(self, step: int) -> Optional[int]:
        """The training loop's optimizer step about to run: latent thoughts draw its Jacobi
        iterations n from it (the same on every rank and after a resume); returns n (None
        without latent thoughts)."""
        self.thought_step = int(step)
        tc = self.thoughts_cfg
        return th.draw_iters(tc.train_iters, self.seed, step) if tc.count else None

    # ------------------------------------------------------------------ one pass

    def transformer(self, embeds: torch.Tensor, position_ids: torch.Tensor,
                    cache: Optional[KVCache] = None, rope: Optional[tuple] = None,
                    frozen: Optional[halt.FrozenPass] = None) -> torch.Tensor:
        """The blocks of one pass on e [s, b, h] (this rank's sequence shard under SP) ->
        the final-norm hidden state, laid out like e: the full hidden on every TP rank, this
        rank's shard under SP (`head` makes logits of it). With `cache`, the pass continues
        after the cached positions and appends to the cache. rope: `self.rotary(position_ids,
        dtype)` when the caller already has it (the K+1 passes of one forward share it).
        frozen: adaptive pondering's frozen keys/values."""
        cos, sin = self.rotary(position_ids, embeds.dtype) if rope is None else rope
        x = self.pass_input(embeds, position_ids)
        full = (self.checkpointing == "full" and self.training and torch.is_grad_enabled()
                and cache is None)
        for block in self.layers:
            if full and frozen is not None:
                x = checkpoint(block, x, cos, sin, None, frozen, use_reentrant=False)
            elif full:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            elif frozen is not None:
                x = block(x, cos, sin, cache, frozen)
            else:
                x = block(x, cos, sin, cache)
        return self.final_norm(x)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, *,
                inputs_embeds: Optional[torch.Tensor] = None,
                ponder_steps: Optional[int] = None,
                gather_logits: bool = False,
                caches: Optional[list] = None,
                halt_q: Optional[float] = None,
                return_exits: bool = False,
                exit_at: Optional[torch.Tensor] = None,
                thought_iters: Optional[int] = None):
        """Run K pondering passes and the final pass.

        input_ids [b, s], or inputs_embeds [b, s, h] taken as e_0 as is (no scaling).
        labels [b, s] are the targets already aligned with the inputs (no shift here); with
        labels the return value is the mean cross-entropy over loss_mask (all ones if None),
        computed vocab-chunked from the hidden state when `model.vocab_chunk` > 0.
        Without labels returns logits [b, s, V/tp] (vocab shard; full vocab with
        gather_logits=True, no autograd through the gather).
        ponder_steps overrides `ponder.steps` for this call.
        caches: K+1 KV caches from `new_caches()` (one per pass) for incremental decoding:
        the call continues after the cached positions (position_ids default accordingly), so
        a prefill followed by one-token calls reproduces the full forward's logits.

        Adaptive pondering (`ponder.halting.mode` not off, K = the model's steps): in training
        mode with labels the loss is the halting objective (`_adaptive`); otherwise tokens
        exit by Q-exit at halt_q (default `ponder.halting.q`) under the frozen keys/values
        rule, and the logits (or, with labels, the CE) are those of each token's exit pass.
        halt_q >= 1 runs exactly the fixed-K forward. return_exits=True returns
        (logits or loss, exit pass [b, s]). exit_at [b, s] (long, 0..K) imposes the exit passes
        instead of Q-exit (evaluation only: e.g. random exits at a given mean number of passes,
        the baseline a halting head must beat).

        Latent thoughts (`thoughts.count` > 0): one cache (M+1 columns per token); without
        caches the Jacobi forward of training, with caches the exact slot-by-slot computation
        (`thoughts.prefill: jacobi`: Jacobi, then one appending pass). thought_iters
        overrides the Jacobi iterations n (with caches: Jacobi with this n instead of exact).
        """
        if self.slots > 1:
            return self._slotted(input_ids, position_ids, labels, loss_mask, inputs_embeds,
                                  gather_logits, caches, thought_iters)
        K = self.ponder_cfg.steps if ponder_steps is None else ponder_steps
        if inputs_embeds is not None:
            e = inputs_embeds.transpose(0, 1).contiguous()
            b, s = inputs_embeds.shape[:2]
        else:
            e = self.embed_input(input_ids, K)
            b, s = input_ids.shape
        past = 0
        if caches is not None:
            if len(caches) != K + 1 or self.sequence_parallel:
                raise ValueError(f"need {K + 1} caches (one per pass) and no sequence "
                                 f"parallelism for incremental decoding")
            past = caches[0].length
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=e.device).unsqueeze(0).expand(b, s)
        if self.sequence_parallel:
            e = par.split_seq(e)
        per_pass = caches if caches is not None else [None] * (K + 1)
        rope = self.rotary(position_ids, e.dtype)
        q = self.ponder_cfg.halting.q if halt_q is None else float(halt_q)
        if exit_at is not None and (self.halting is None or K != self.ponder_cfg.steps
                                    or (self.training and labels is not None)):
            raise ValueError("exit_at needs an adaptive model at its own K, outside training")
        if (self.halting is not None and K == self.ponder_cfg.steps
                and (q < 1.0 or exit_at is not None or (self.training and labels is not None))):
            out, exits = self._adaptive(e, position_ids, rope, per_pass, labels, loss_mask, q,
                                        caches is not None,
                                        None if exit_at is None else exit_at.t())
            if labels is None:
                out = out.transpose(0, 1)
                out = par.gather_vocab(out) if gather_logits else out
            return (out, exits.t()) if return_exits else out
        out = self._fixed(e, position_ids, rope, per_pass, labels, loss_mask, K, gather_logits)
        if return_exits:
            return out, torch.full((b, s), K, dtype=torch.long, device=e.device)
        return out

    def _fixed(self, e, position_ids, rope, per_pass, labels, loss_mask, K, gather_logits):
        """Fixed-K pondering: K passes feeding back, the loss or logits of the last one. In
        training with `ponder.draft_loss` > 0, the loss adds that weight times the CE of pass
        d-1's logits (d = `ponder.draft_passes`): the draft of speculative decoding."""
        draft = (self.ponder_cfg.draft_passes - 1 if self.ponder_cfg.draft_loss > 0
                 and self.training and labels is not None and K == self.ponder_cfg.steps
                 else None)
        draft_ce = None
        for k in range(K):
            hidden = self.transformer(e, position_ids, per_pass[k], rope=rope)
            logits = None
            if k == draft:
                logits = self.head(hidden) if self.feedback_needs_logits else None
                draft_ce = self.loss_of(hidden, logits, labels, loss_mask, keep_logits=True)
                self.draft_stats = draft_ce.detach()
            e = self.feed_back(e, hidden, logits)
        hidden = self.transformer(e, position_ids, per_pass[K], rope=rope)
        for cache in per_pass:
            if cache is not None:
                cache.advance(position_ids.shape[1])
        out = self._output(hidden, labels, loss_mask, gather_logits)
        return out if draft_ce is None else out + self.ponder_cfg.draft_loss * draft_ce

    def loss_of(self, hidden, logits, labels, loss_mask, keep_logits: bool) -> torch.Tensor:
        """The masked mean CE of one pass (its logits, or vocab-chunked from its hidden)."""
        target, mask = self.targets(labels, loss_mask)
        per_token = self.pass_ce(hidden, logits, target, keep_logits)
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)

    def passes(self, e: torch.Tensor, position_ids: torch.Tensor, caches: list, first: int,
               stop: int) -> tuple:
        """Passes first..stop-1 of fixed-K pondering (K = len(caches) - 1) on e_first
        [s, b, h], each reading and appending to (and advancing) its own cache: returns
        (e_stop, or None when stop = K+1; the logits [b, s, V] of pass stop-1, gathered).
        Pass k of a position sees only pass-k keys/values, so passes 0..d-1 of every token
        are a model of their own: speculative decoding drafts with them and verifies the
        drafted tokens with passes d..K (`ponder_pt.inference.speculative`)."""
        K = len(caches) - 1
        rope = self.rotary(position_ids, e.dtype)
        logits = None
        for k in range(first, stop):
            hidden = self.transformer(e, position_ids, caches[k], rope=rope)
            caches[k].advance(position_ids.shape[1])
            wanted = k == stop - 1 or (k < K and self.feedback_needs_logits)
            logits = self.head(hidden) if wanted else None
            e = self.feed_back(e, hidden, logits) if k < K else None
        return e, par.gather_vocab(logits.transpose(0, 1))

    def _output(self, hidden, labels, loss_mask, gather_logits):
        """The loss (labels given) or the logits [b, s, V(/tp)] of final-norm hidden states."""
        if labels is not None and self.vocab_chunk:
            return self.chunked_loss(hidden, labels, loss_mask)
        logits = self.head(hidden)
        if labels is None:
            logits = logits.transpose(0, 1)
            return par.gather_vocab(logits) if gather_logits else logits
        return self.loss(logits, labels, loss_mask)

    def _slotted(self, input_ids, position_ids, labels, loss_mask, inputs_embeds,
                  gather_logits, caches, iters):
        """Latent thoughts (`thoughts.py`) or every-token pauses: the loss or logits of each
        token's last slot."""
        tc = self.thoughts_cfg
        if inputs_embeds is not None:
            e = inputs_embeds.transpose(0, 1).contiguous()
        else:
            e = self.embed(input_ids.t().contiguous())
            e = e * math.sqrt(2.5 * self.cfg.hidden_size) if tc.count and tc.scale_embeds else e
        s, b = e.shape[:2]
        past = 0
        if caches is not None:
            if len(caches) != 1 or self.sequence_parallel:
                raise ValueError("latent thoughts and every-token pauses decode with one "
                                 "cache (M+1 columns per token) and no sequence parallelism")
            past = caches[0].length // self.slots
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=e.device).unsqueeze(0).expand(b, s)
        pause = None
        if self.pause_slots:  # over the whole sequence, so that under SP the split's backward
            # brings every shard's gradient of the <pause> row to every rank, as for e
            pause = self.embed(torch.full((1, b), self.pause_id, dtype=torch.long,
                                          device=e.device)).expand_as(e)
        if self.sequence_parallel:
            e = par.split_seq(e)
            pause = None if pause is None else par.split_seq(pause)

        def rotary(positions):
            return self.rotary(positions, e.dtype)

        if self.pause_slots:  # every slot's input is known: one pass, exact, cached or not
            cache = None if caches is None else caches[0]
            x = th.interleave(e, [pause] * self.pause_slots)
            hidden = self.transformer(x, th.slot_positions(position_ids, self.slots), cache)
            if cache is not None:
                cache.advance(x.shape[0])
            hidden = th.per_position(hidden, self.slots)[:, -1]
        elif caches is None:
            if iters is None:
                iters = (th.draw_iters(tc.train_iters, self.seed, self.thought_step)
                         if self.training and labels is not None else tc.jacobi_iters)
            hidden = th.jacobi(self.transformer, e, position_ids, tc.count, iters, rotary)
        else:
            cache = caches[0]

            def cached_pass(x, positions, rope=None):
                return self.transformer(x, positions, cache, rope=rope)

            if iters is None and tc.prefill == "jacobi" and s > 1:
                iters = tc.jacobi_iters
            if iters is None:
                hidden = th.sequential(cached_pass, e, position_ids, tc.count, rotary, cache)
            else:
                hidden = th.cached_jacobi(cached_pass, e, position_ids, tc.count, iters, rotary,
                                          cache)
        return self._output(hidden, labels, loss_mask, gather_logits)

    def _adaptive(self, e, position_ids, rope, per_pass, labels, loss_mask, q: float,
                  cached: bool, exit_at: Optional[torch.Tensor] = None):
        """Adaptive pondering over passes 0..K (DESIGN.md). Returns (out, exits [s, b]):
        out = the training objective (training mode with labels: sum_k p_k CE_k + beta KL,
        every pass dense, or under the frozen rule with `train_exits: frozen`), the masked CE
        of each token's exit pass (eval mode with labels), or the exit passes' logits
        [s, b, V/tp] (no labels).

        Exits are decided right after each pass by `halting_math.q_exit_step` from the
        running survival prod(1 - lambda_j) (detached), identically in a whole-sequence call
        and in incremental decoding; `halting_stats` counts these very exits. Once every
        token of a cached call has exited, the remaining passes are skipped: their caches
        take the previous pass's keys/values of this chunk, which are the frozen ones.
        """
        hcfg, K = self.ponder_cfg.halting, self.ponder_cfg.steps
        objective = labels is not None and self.training
        frozen = (None if objective and hcfg.train_exits == "dense"
                  else halt.FrozenPass.first(self.cfg.num_layers))
        if labels is not None:
            target, mask = self.targets(labels, loss_mask)
        n = position_ids.shape[1]
        lambdas, ces, outs = [], [], []
        previous, survive = None, None
        # exit pass per token [s, b]; K = not exited (yet): only passes < K set an exit
        exits = torch.full((n, position_ids.shape[0]), K, dtype=torch.long, device=e.device)
        for k in range(K + 1):
            if cached and k > 0 and bool((exits < K).all()):
                for j in range(k, K + 1):  # the frozen rows are the previous pass's
                    per_pass[j].copy_new_from(per_pass[j - 1], n)
                break
            hidden = self.transformer(e, position_ids, per_pass[k], rope=rope, frozen=frozen)
            logits = (self.head(hidden) if self.needs_logits(last=k == K, labels=labels is not None)
                      else None)
            if labels is not None:
                ces.append(self.pass_ce(hidden, logits, target, keep_logits=k < K))
            else:
                outs.append(logits)
            if k == K:
                break
            lam = self.halting_lambda(hidden, previous)
            previous = lam
            lam = par.gather_seq_replicated(lam) if self.sequence_parallel else lam
            lambdas.append(lam)
            survive, now = hm.q_exit_step(survive, lam.detach(), q)
            if exit_at is not None:  # imposed exits [s, b]
                now = exit_at <= k
            exiting = now & (exits == K)
            exits = torch.where(exiting, k, exits)
            if frozen is not None:
                frozen = frozen.next(exiting.t())
            e = self.feed_back(e, hidden, logits)
        for cache in per_pass:
            if cache is not None:
                cache.advance(n)
        if labels is not None:
            lambdas = torch.stack(lambdas)
        if objective:
            loss, p = halt.objective(torch.stack(ces), lambdas, mask, hcfg)
            self.halting_stats = halt.stats(p, mask, exits)
            return loss, exits
        if labels is not None:
            p = hm.exit_distribution(lambdas, dim=0)
            self.halting_stats = halt.stats(p, mask, exits)
            picked = torch.stack(ces).gather(0, exits.unsqueeze(0)).squeeze(0)
            return (picked * mask).sum() / mask.sum().clamp(min=1.0), exits
        return self._pick_pass(outs, exits), exits

    @staticmethod
    def _pick_pass(outs: list, exits: torch.Tensor) -> torch.Tensor:
        """Each token's logits [s, b, V/tp] from its exit pass (`outs` ends at the last pass
        run: no token exits at a skipped one)."""
        picked = outs[0].clone()
        for k, z in enumerate(outs[1:], start=1):
            picked = torch.where((exits == k).unsqueeze(-1), z, picked)
        return picked

    def new_caches(self, ponder_steps: Optional[int] = None, capacity: int = 0,
                   batch: int = 1, spare: int = 0) -> list:
        """Empty KV caches for incremental decoding, one per pass (K+1): growing ones
        (`KVCache`), or with `capacity` > 0 preallocated ones of that many positions for
        `batch` rows (`StaticKVCache`, in the parameters' dtype and device), plus `spare`
        columns (speculative decoding's drafts beyond the last position kept). Latent
        thoughts and every-token pauses: one cache, M+1 columns per position."""
        K = self.ponder_cfg.steps if ponder_steps is None else ponder_steps
        if self.slots > 1:
            K = 0
        n = self.cfg.num_layers
        if capacity <= 0:
            return [KVCache(n) for _ in range(K + 1)]
        if self.pos_embed is not None and capacity > self.cfg.max_seq_len:
            raise ValueError(f"{capacity} positions asked; GPT-2 has {self.cfg.max_seq_len} "
                             f"learned positions (model.max_seq_len)")
        w = self.embed.weight
        kv = self.cfg.kv_heads // par.tp_size()
        return [StaticKVCache(n, batch, kv, self.cfg.head_dim, capacity * self.slots + spare,
                              w.dtype, w.device) for _ in range(K + 1)]

    # the losses are ponder_pass's, which the pipeline's stages use too
    loss = staticmethod(pp.loss)
    per_token_loss = staticmethod(pp.per_token_loss)
    targets = staticmethod(pp.targets)

    def chunked_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                     loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`loss` computed from the final-norm hidden state [s(/tp under SP), b, h] over
        chunks of `vocab_chunk` vocabulary rows, without the [s, b, V/tp] logits."""
        return pp.chunked_loss(hidden, self.output_weight(), labels, loss_mask,
                               self.vocab_chunk, self.sequence_parallel)

    def num_parameters(self) -> int:
        """Local (this rank's) parameter count."""
        return sum(p.numel() for p in self.parameters())

