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

With `model.vocab_chunk` > 0 the feedback uses the chunked soft embedding (unless top-k), and
the head hands the loss (h, W_out, chunk) instead of logits -- DeepSpeed gives the loss
function only the last layer's outputs and the labels, so W_out rides along -- and
`pipeline_loss` computes the vocab-chunked cross-entropy: no [tokens, V] tensor is kept.
"""

from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.schema import ModelConfig, PonderConfig
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
        x = self.final_norm(x)
        if self.tied:
            return torch.matmul(x, self.embed.weight.t())
        out, _ = self.output(x)
        return out


def _embed_fn(shared: SharedParams, tokens: torch.Tensor):
    """tokens [b, s] -> (x, e), both the scaled e_0 [s, b, h]."""
    e = shared.embed(tokens.t().contiguous()) * shared.initial_scale
    e = shared._touch(e)
    return shared.pass_input(e), e


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
        x, e = xe
        s, b = x.shape[:2]
        pos = torch.arange(s, device=x.device).unsqueeze(0).expand(b, s)
        cos, sin = self.rotary(pos, x.dtype)
        if self.full_checkpoint and self.training and torch.is_grad_enabled():
            x = checkpoint(self.block, x, cos, sin, use_reentrant=False)
        else:
            x = self.block(x, cos, sin)
        return x, e


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
        layers.append(shared(_feedback_fn if k < ponder.steps else _head_fn))
    return layers


def pipeline_loss(outputs, targets) -> torch.Tensor:
    labels, loss_mask = targets
    if isinstance(outputs, tuple):  # vocab-chunked head: (h, W_out, chunk)
        return chunked_loss(*outputs[:2], labels, loss_mask, outputs[2])
    return PonderLM.loss(outputs, labels, loss_mask)
