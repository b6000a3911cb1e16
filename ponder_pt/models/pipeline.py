"""The model as one linear chain of layers for `deepspeed.pipe.PipelineModule`.

DeepSpeed's pipeline is a straight line of stages, so the K+1 pondering passes cannot loop back
to stage 0. They are unrolled instead:

    embed | block_0 .. block_{L-1} | feedback | block_0 .. block_{L-1} | feedback | ... | head
          '------- pass 1 --------'           '------- pass 2 --------'

and the chain of (K+1)·L blocks is cut into P stages by layer count. Every occurrence of
block i is a `TiedLayerSpec("block<i>")`: a stage that runs block i in several passes holds one
copy, stages that run it in different passes each hold a copy whose gradients DeepSpeed
all-reduces between them. W_in ("embed": the input embedding, every feedback's p·W_in, a tied
output head) and the final norm + output head ("head": every feedback and the last layer) are
tied the same way. Weights are the same seeded draws as `PonderLM`'s, so a pipeline run starts
from exactly the single-process model.

Activations between layers are (x, e): the residual stream and the current pass's input
embedding e_{k-1}, which the feedback needs (e_k = e_{k-1} + s·p·W_in, or e_k = e_{k-1} + h_k
with h_k = final_norm(x) for the looped baseline, `ponder.feedback="hidden"`). Positions are
0..s-1 (packed samples; pauses take positions like any token). GPT-2's learned position
table lives with the shared weights: the embedding and every feedback start the next pass
from x = e + wpe (e itself never holds positions, as in `PonderLM`).

Adaptive pondering (`ponder.halting`, dense exits): the first layer takes (tokens, labels,
loss_mask) and the activations carry two more tensors, the targets [s, b] and a halting state
[s, b, 2K+1] holding each pass's lambda (slots 0..K-1) and per-token cross-entropy (slots
K..2K): every feedback computes its pass's CE and lambda (the halting head lives with the
shared weights), the head the last CE, and `pipeline_loss` the halting objective from the
state. Frozen exits (`train_exits: frozen`) need each layer's keys/values of every pass and
are refused with PP.

With `model.vocab_chunk` > 0 the feedback uses the chunked soft embedding (unless top-k), and
the head hands the loss (h, W_out, chunk) instead of logits -- DeepSpeed gives the loss
function only the last layer's outputs and the labels, so W_out rides along -- and
`pipeline_loss` computes the vocab-chunked cross-entropy: no [tokens, V] tensor is kept.
"""

from __future__ import annotations

import functools
import math

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.schema import ModelConfig, PonderConfig
from . import halting as halt
from . import parallel as par
from .layers import Block, LearnedPositions, Rotary, make_norm
from .linear import ColumnLinear
from . import vocab_chunk as vchunk
from .model import PonderLM, chunked_loss


def _inits(cfg: ModelConfig, seed: int):
    base = cfg.init_method_std or par.small_init_std(cfg.hidden_size)
    out = (cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers) if cfg.init_method_std
           else par.wang_init_std(cfg.hidden_size, cfg.num_layers))

    def inits(name: str, output: bool = False):
        return par.seeded_normal(out if output else base, seed, name)

    return inits


class SharedParams(nn.Module):
    """W_in, the final norm, the output head and GPT-2's position table: everything outside
    the blocks. Used by the first layer (embedding), every feedback (head + p·W_in) and the
    last layer (head)."""

    def __init__(self, cfg: ModelConfig, ponder: PonderConfig, seed: int, dtype: torch.dtype):
        super().__init__()
        mp, inits = par.megatron_config(dtype), _inits(cfg, seed)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                            init_method=inits("embed"), config=mp)
        self.pos_embed = (LearnedPositions(cfg, inits("pos_embed"), False, dtype)
                          if cfg.arch == "gpt2" else None)
        self.final_norm = make_norm(cfg, False).to(dtype)
        self.tied = cfg.tie_embeddings
        if not self.tied:
            self.output = ColumnLinear(cfg.hidden_size, cfg.vocab_size, config=mp,
                                               init_method=inits("output"), bias=False,
                                               gather_output=False)
        steps = ponder.steps
        hcfg = ponder.halting
        # the same seeded head as PonderLM's; None when halting is off
        self.halting = (halt.HaltingHead(cfg.hidden_size, hcfg.mode, seed, False, dtype)
                        if ponder.adaptive else None)
        self.halting_cfg, self.steps = hcfg, steps
        self.top_k = ponder.top_k
        self.feedback = ponder.feedback
        self.vocab_chunk = cfg.vocab_chunk
        self.chunked_feedback = cfg.vocab_chunk > 0 and ponder.top_k == 0
        self.scale = math.sqrt(cfg.hidden_size) if (steps > 0 and ponder.scale_embeds) else 1.0
        self.initial_scale = self.scale * (steps if steps > 0 and ponder.scale_initial_by_steps
                                           else 1)

    def _touch(self, x: torch.Tensor) -> torch.Tensor:
        """Give the parameters this layer does not use a zero gradient instead of None:
        DeepSpeed all-reduces the gradient of every tied weight on every stage holding it."""
        return x + 0.0 * sum(p.sum() for p in self.parameters()).to(x.dtype)

    def pass_input(self, e: torch.Tensor) -> torch.Tensor:
        """x entering a pass: e, plus the positions 0..s-1 for GPT-2."""
        if self.pos_embed is None:
            return e
        s, b = e.shape[:2]
        return self.pos_embed(e, torch.arange(s, device=e.device).unsqueeze(0).expand(b, s))

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.tied else self.output.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(x))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden -> logits [s, b, V/tp]."""
        if self.tied:
            return torch.matmul(h, self.embed.weight.t())
        out, _ = self.output(h)
        return out


def _embed_fn(shared: SharedParams, inputs):
    """tokens [b, s] -> (x, e), both the scaled e_0 [s, b, h]. Adaptive pondering: (tokens,
    labels, loss_mask) -> (x, e, targets [s, b], halting state [s, b, 2K+1] of zeros)."""
    halting = isinstance(inputs, (tuple, list))
    tokens = inputs[0] if halting else inputs
    e = shared.embed(tokens.t().contiguous()) * shared.initial_scale
    e = shared._touch(e)
    if not halting:
        return shared.pass_input(e), e
    target, _ = PonderLM.targets(inputs[1], inputs[2])
    state = shared._touch(e.new_zeros(*target.shape, 2 * shared.steps + 1, dtype=torch.float32))
    return shared.pass_input(e), e, target, state


def _put(state: torch.Tensor, slot: int, value: torch.Tensor) -> torch.Tensor:
    """`state` with `value` [s, b] in its (still zero) slot; autograd-friendly."""
    onehot = torch.zeros(state.shape[-1], dtype=state.dtype, device=state.device)
    onehot[slot] = 1.0
    return state + value.to(state.dtype).unsqueeze(-1) * onehot


def _pass_ce(shared: SharedParams, h: torch.Tensor, logits, target: torch.Tensor):
    """Per-token CE [s, b] of one pass (vocab-chunked from h with vocab_chunk)."""
    if shared.vocab_chunk:
        return vchunk.cross_entropy(h, shared.head_weight(), target, shared.vocab_chunk)
    return PonderLM.per_token_loss(logits, target, keep_input=True)


def _halting_feedback_fn(shared: SharedParams, xe, k: int):
    """`_feedback_fn` of pass k under adaptive pondering: also the pass's CE and lambda_k into
    the halting state (palbert reads lambda_{k-1} back from it)."""
    x, e, target, state = xe
    h = shared.final_norm(x)
    looped = shared.feedback == "hidden"
    # logits for the CE (unless vocab-chunked) or for an unchunked softmax feedback
    wanted = not shared.vocab_chunk or not (looped or shared.chunked_feedback)
    logits = shared.head(h) if wanted else None
    previous = state[..., k - 1] if k > 0 else None
    state = _put(state, k, shared.halting(h, previous))
    state = _put(state, shared.steps + k, _pass_ce(shared, h, logits, target))
    if looped:
        e = shared._touch(e + h)
        return shared.pass_input(e), e, target, state
    if shared.chunked_feedback:
        mix = vchunk.soft_embedding(h, shared.head_weight(), shared.embed.weight,
                                    shared.vocab_chunk)
    else:
        mix = par.soft_embedding(par.vocab_parallel_softmax(logits, shared.top_k),
                                 shared.embed.weight)
    e = e + shared.scale * mix
    return shared.pass_input(e), e, target, state


def _halting_head_fn(shared: SharedParams, xe):
    """The last pass's CE into the halting state; (state, halting config) for the loss."""
    x, e, target, state = xe
    h = shared.final_norm(x)
    logits = None if shared.vocab_chunk else shared.head(h)
    state = _put(state, 2 * shared.steps, _pass_ce(shared, h, logits, target))
    return shared._touch(state + 0.0 * e.sum()), shared.halting_cfg


def _feedback_fn(shared: SharedParams, xe):
    """End of a pondering pass: e_k = e_{k-1} + s · softmax(head(x)) · W_in; the next pass
    starts from x = e_k. Vocab-parallel: logits are never gathered. Looped baseline
    (feedback "hidden"): e_k = e_{k-1} + final_norm(x), the vector the head would multiply."""
    x, e = xe
    if shared.feedback == "hidden":
        e = shared._touch(e + shared.final_norm(x))  # embed / head unused: zero grads
        return shared.pass_input(e), e
    if shared.chunked_feedback:
        mix = vchunk.soft_embedding(shared.final_norm(x), shared.head_weight(),
                                    shared.embed.weight, shared.vocab_chunk)
    else:
        mix = par.soft_embedding(par.vocab_parallel_softmax(shared.logits(x), shared.top_k),
                                 shared.embed.weight)
    e = e + shared.scale * mix
    return shared.pass_input(e), e


def _head_fn(shared: SharedParams, xe):
    """Logits [s, b, V/tp]; with vocab_chunk (h, W_out, chunk) for `pipeline_loss`."""
    x, e = xe
    # e must receive a (zero) gradient too: DeepSpeed sends back a gradient for every
    # activation it received, and a None would leave the previous stage waiting
    if shared.vocab_chunk:
        h = shared._touch(shared.final_norm(x) + 0.0 * e.sum())
        return h, shared.head_weight(), shared.vocab_chunk
    return shared._touch(shared.logits(x) + 0.0 * e.sum())


class BlockLayer(nn.Module):
    """One transformer block acting on (x, e); e rides along untouched."""

    def __init__(self, cfg: ModelConfig, index: int, seed: int, dtype: torch.dtype):
        super().__init__()
        self.block = Block(cfg, par.megatron_config(dtype), _inits(cfg, seed), False, index)
        for module in self.block.modules():
            if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
                module.to(dtype)
        self.rotary = Rotary(cfg.head_dim, cfg.rotary_pct, cfg.rotary_base)
        self.full_checkpoint = cfg.activation_checkpointing == "full"
        self.block.attn.selective = cfg.activation_checkpointing == "selective"

    def forward(self, xe):
        x, e, *rest = xe  # rest: adaptive pondering's targets and halting state, untouched
        s, b = x.shape[:2]
        pos = torch.arange(s, device=x.device).unsqueeze(0).expand(b, s)
        cos, sin = self.rotary(pos, x.dtype)
        if self.full_checkpoint and self.training and torch.is_grad_enabled():
            x = checkpoint(self.block, x, cos, sin, use_reentrant=False)
        else:
            x = self.block(x, cos, sin)
        return (x, e, *rest)


def _block_weight_names(cfg: ModelConfig, dtype: torch.dtype) -> list[str]:
    probe = BlockLayer(cfg, 0, 0, dtype)
    return [name for name, _ in probe.named_parameters()]


def pipeline_layers(cfg: ModelConfig, ponder: PonderConfig, seed: int,
                    dtype: torch.dtype = torch.float32) -> list:
    """Layer specs for `PipelineModule(layers=..., loss_fn=pipeline_loss)`."""
    from deepspeed.pipe import TiedLayerSpec

    shared_attrs = [name for name, _ in SharedParams(cfg, ponder, seed, dtype).named_parameters()]
    block_attrs = [name for name, _ in BlockLayer(cfg, 0, seed, dtype).named_parameters()]

    def shared(fn):
        return TiedLayerSpec("shared", SharedParams, cfg, ponder, seed, dtype, forward_fn=fn,
                             tied_weight_attr=shared_attrs)

    layers = [shared(_embed_fn)]
    for k in range(ponder.steps + 1):
        layers += [TiedLayerSpec(f"block{i}", BlockLayer, cfg, i, seed, dtype,
                                 tied_weight_attr=block_attrs) for i in range(cfg.num_layers)]
        if ponder.adaptive:
            layers.append(shared(functools.partial(_halting_feedback_fn, k=k)
                                 if k < ponder.steps else _halting_head_fn))
        else:
            layers.append(shared(_feedback_fn if k < ponder.steps else _head_fn))
    return layers


def pipeline_loss(outputs, targets) -> torch.Tensor:
    labels, loss_mask = targets
    if isinstance(outputs, tuple) and len(outputs) == 2:  # adaptive pondering: (state, cfg)
        state, hcfg = outputs
        K = (state.shape[-1] - 1) // 2
        _, mask = PonderLM.targets(labels, loss_mask)
        p = halt.exit_distribution([state[..., k] for k in range(K)])
        prior = halt.geometric_prior(hcfg.prior, K, device=state.device)
        return halt.halting_loss(state[..., K:].permute(2, 0, 1), p, mask, hcfg.beta, prior)
    if isinstance(outputs, tuple):  # vocab-chunked head: (h, W_out, chunk)
        return chunked_loss(*outputs[:2], labels, loss_mask, outputs[2])
    return PonderLM.loss(outputs, labels, loss_mask)
