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

What each layer computes -- the scaled embedding, the feedback (embedding or hidden, top-k,
vocab-chunked), the head, a pass's CE and lambda -- is `PonderPass`'s (`ponder_pass.py`), the
very methods `PonderLM` runs; this module only lays them out along the chain.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.schema import ModelConfig, PonderConfig
from . import halting as halt
from . import parallel as par
from . import ponder_pass as pp
from .layers import Block, Rotary
from .ponder_pass import PonderPass


class SharedParams(PonderPass, nn.Module):
    """W_in, the final norm, the output head, GPT-2's position table and the halting head:
    everything outside the blocks, built like `PonderLM`'s (the same names and seeded draws;
    no `output` module with tied embeddings). Used by the first layer (embedding), every
    feedback (head + feedback) and the last layer (head), through `PonderPass`: the very
    pass pieces `PonderLM` runs. Never sequence-parallel."""

    def __init__(self, cfg: ModelConfig, ponder: PonderConfig, seed: int, dtype: torch.dtype):
        super().__init__()
        self.cfg, self.ponder_cfg, self.sequence_parallel = cfg, ponder, False
        mp, inits = par.megatron_config(dtype), pp.init_methods(cfg, seed)
        self.build_input_layers(cfg, inits, mp, dtype)
        self.build_output_layers(cfg, ponder, inits, mp, seed, dtype, tied_module=False)
        self.final_norm.to(dtype)

    @property
    def steps(self) -> int:
        return self.ponder_cfg.steps

    def touch(self, x: torch.Tensor) -> torch.Tensor:
        """Give the parameters this layer does not use a zero gradient instead of None:
        DeepSpeed all-reduces the gradient of every tied weight on every stage holding it."""
        return x + 0.0 * sum(p.sum() for p in self.parameters()).to(x.dtype)

    def next_pass(self, e: torch.Tensor) -> torch.Tensor:
        """x entering a pass: e, plus the positions 0..s-1 for GPT-2."""
        s, b = e.shape[:2]
        return self.pass_input(e, positions(s, b, e.device))


def positions(s: int, b: int, device) -> torch.Tensor:
    """[b, s] position ids 0..s-1: packed samples, pauses take positions like any token."""
    return torch.arange(s, device=device).unsqueeze(0).expand(b, s)


def embed_layer(shared: SharedParams, inputs):
    """tokens [b, s] -> (x, e): e = e_0 [s, b, h], x = e entering pass 0. Adaptive
    pondering: (tokens, labels, loss_mask) -> (x, e, targets [s, b], halting state
    [s, b, 2K+1] of zeros)."""
    halting = isinstance(inputs, (tuple, list))
    tokens = inputs[0] if halting else inputs
    e = shared.touch(shared.embed_input(tokens, shared.steps))
    if not halting:
        return shared.next_pass(e), e
    target, _ = pp.targets(inputs[1], inputs[2])
    state = shared.touch(e.new_zeros(*target.shape, 2 * shared.steps + 1, dtype=torch.float32))
    return shared.next_pass(e), e, target, state


def _put(state: torch.Tensor, slot: int, value: torch.Tensor) -> torch.Tensor:
    """`state` with `value` [s, b] in its (still zero) slot; autograd-friendly."""
    onehot = torch.zeros(state.shape[-1], dtype=state.dtype, device=state.device)
    onehot[slot] = 1.0
    return state + value.to(state.dtype).unsqueeze(-1) * onehot


def feedback_layer(shared: SharedParams, xe):
    """End of a pondering pass: e_k = `PonderPass.feed_back`(e_{k-1}, final_norm(x)); the
    next pass starts from x = e_k (+ positions)."""
    x, e = xe
    e = shared.feed_back(e, shared.final_norm(x))
    if shared.feeds_back_hidden:  # embed / head unused: zero grads
        e = shared.touch(e)
    return shared.next_pass(e), e


def halting_feedback_layer(shared: SharedParams, xe, k: int):
    """`feedback_layer` of pass k under adaptive pondering: also the pass's lambda and CE
    into the halting state (palbert reads lambda_{k-1} back from it)."""
    x, e, target, state = xe
    h = shared.final_norm(x)
    logits = shared.head(h) if shared.needs_logits(last=False, labels=True) else None
    previous = state[..., k - 1] if k > 0 else None
    state = _put(state, k, shared.halting_lambda(h, previous))
    state = _put(state, shared.steps + k, shared.pass_ce(h, logits, target, keep_logits=True))
    e = shared.feed_back(e, h, logits)
    if shared.feeds_back_hidden:
        e = shared.touch(e)
    return shared.next_pass(e), e, target, state


def halting_head_layer(shared: SharedParams, xe):
    """The last pass's CE into the halting state; (state, halting config) for the loss."""
    x, e, target, state = xe
    h = shared.final_norm(x)
    logits = shared.head(h) if shared.needs_logits(last=True, labels=True) else None
    state = _put(state, 2 * shared.steps, shared.pass_ce(h, logits, target, keep_logits=True))
    return shared.touch(state + 0.0 * e.sum()), shared.ponder_cfg.halting


def head_layer(shared: SharedParams, xe):
    """Logits [s, b, V/tp]; with vocab_chunk (h, W_out, chunk) for `pipeline_loss`."""
    x, e = xe
    # e must receive a (zero) gradient too: DeepSpeed sends back a gradient for every
    # activation it received, and a None would leave the previous stage waiting
    if shared.vocab_chunk:
        h = shared.touch(shared.final_norm(x) + 0.0 * e.sum())
        return h, shared.output_weight(), shared.vocab_chunk
    return shared.touch(shared.head(shared.final_norm(x)) + 0.0 * e.sum())


class BlockLayer(nn.Module):
    """One transformer block acting on (x, e); e rides along untouched."""

    def __init__(self, cfg: ModelConfig, index: int, seed: int, dtype: torch.dtype):
        super().__init__()
        self.block = Block(cfg, par.megatron_config(dtype), pp.init_methods(cfg, seed), False,
                           index)
        for module in self.block.modules():
            if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
                module.to(dtype)
        self.rotary = Rotary(cfg.head_dim, cfg.rotary_pct, cfg.rotary_base)
        self.full_checkpoint = cfg.activation_checkpointing == "full"
        self.block.attn.selective = cfg.activation_checkpointing == "selective"

    def forward(self, xe):
        x, e, *rest = xe  # rest: adaptive pondering's targets and halting state, untouched
        cos, sin = self.rotary(positions(*x.shape[:2], x.device), x.dtype)
        if self.full_checkpoint and self.training and torch.is_grad_enabled():
            x = checkpoint(self.block, x, cos, sin, use_reentrant=False)
        else:
            x = self.block(x, cos, sin)
        return (x, e, *rest)


def pipeline_layers(cfg: ModelConfig, ponder: PonderConfig, seed: int,
                    dtype: torch.dtype = torch.float32) -> list:
    """Layer specs for `PipelineModule(layers=..., loss_fn=pipeline_loss)`."""
    from deepspeed.pipe import TiedLayerSpec

    shared_attrs = [name for name, _ in SharedParams(cfg, ponder, seed, dtype).named_parameters()]
    block_attrs = [name for name, _ in BlockLayer(cfg, 0, seed, dtype).named_parameters()]

    def shared(fn):
        return TiedLayerSpec("shared", SharedParams, cfg, ponder, seed, dtype, forward_fn=fn,
                             tied_weight_attr=shared_attrs)

    layers = [shared(embed_layer)]
    for k in range(ponder.steps + 1):
        layers += [TiedLayerSpec(f"block{i}", BlockLayer, cfg, i, seed, dtype,
                                 tied_weight_attr=block_attrs) for i in range(cfg.num_layers)]
        if ponder.adaptive:
            layers.append(shared(functools.partial(halting_feedback_layer, k=k)
                                 if k < ponder.steps else halting_head_layer))
        else:
            layers.append(shared(feedback_layer if k < ponder.steps else head_layer))
    return layers


def pipeline_loss(outputs, targets) -> torch.Tensor:
    """The loss of the last layer's outputs: the halting objective from the state (adaptive
    pondering), the vocab-chunked CE of (h, W_out, chunk), or the CE of the logits."""
    labels, loss_mask = targets
    if isinstance(outputs, tuple) and len(outputs) == 2:  # adaptive pondering: (state, cfg)
        state, hcfg = outputs
        K = (state.shape[-1] - 1) // 2
        _, mask = pp.targets(labels, loss_mask)
        by_pass = state.permute(2, 0, 1)  # [2K+1, s, b]: lambda_0..K-1, then CE_0..K
        return halt.objective(by_pass[K:], by_pass[:K], mask, hcfg)[0]
    if isinstance(outputs, tuple):  # vocab-chunked head: (h, W_out, chunk)
        return pp.chunked_loss(*outputs[:2], labels, loss_mask, outputs[2])
    return pp.loss(outputs, labels, loss_mask)
