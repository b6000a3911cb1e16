"""Vocabulary-chunked soft embedding and cross-entropy (`model.vocab_chunk`).

Both consumers of the logits z = h·W_outᵀ during training -- the pondering feedback
softmax(z)·W_in and the final cross-entropy -- only need, per token, a few running
reductions over the vocabulary. So they are computed here over chunks of `chunk` vocabulary
rows with an online softmax (running max, running sum, and for the soft embedding a running
weighted sum of W_in rows, rescaled whenever the max grows, as flash attention does), and the
[tokens, V] logits are never materialised whole.

Why: under activation checkpointing almost everything autograd keeps for backward is
vocabulary-sized (the fp32 logits / probabilities of every pass). The autograd Functions
below save only h, the weights and per-token statistics (logsumexp, the soft embedding or
the target), and recompute each chunk's logits in backward: one extra [tokens, V/tp, h]
matmul per pass, exact gradients.

Tensor parallelism stays vocab-parallel: each rank chunks its own vocabulary shard, then the
per-rank statistics are combined with all-reduces (max, then the sum of rescaled sums; the
target logit of the cross-entropy comes from the rank whose shard holds it, as in megatron's
vocab_parallel_cross_entropy). Logits are never gathered. The hidden state enters the vocab
region like it enters the output layer in `PonderLM.transformer`: gathered over the sequence
under sequence parallelism (backward: reduce-scatter), otherwise through megatron's
copy-to-region (backward: all-reduce of the partial dh of each vocabulary shard).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)

from . import parallel as par


def row_chunks(rows: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) ranges of `chunk` vocabulary rows covering `rows` (a shard), in which the
    functions below visit it; the last one may be partial. A chunk at least as large as the
    shard is one chunk (`model.vocab_chunk` is clamped, not rejected)."""
    chunk = max(1, min(chunk, rows))
    return [(i, min(i + chunk, rows)) for i in range(0, rows, chunk)]


def _logits(h: torch.Tensor, w: torch.Tensor, a: int, b: int) -> torch.Tensor:
    # the matmul in the parameters' dtype, the softmax arithmetic in fp32 (as the unchunked
    # path: ColumnParallelLinear, then .float() in the softmax / megatron's CE)
    return torch.matmul(h, w[a:b].t()).float()


def _online_step(z, m, s):
    """Fold one chunk of logits into the running max m and sum s ([N, 1] each).
    Returns the new max, the factor rescaling what was accumulated under the old max, and
    exp(z - new max)."""
    m_new = torch.maximum(m, z.amax(dim=-1, keepdim=True))
    alpha = torch.exp(m - m_new)  # exp(-inf) = 0 before the first chunk
    p = z.sub_(m_new).exp_()  # in place: z is a fresh chunk of logits, not needed again
    return m_new, alpha, p, s * alpha + p.sum(dim=-1, keepdim=True)


def _global_max(m: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global max over TP ranks and the factor exp(m_local - m_global) for local sums."""
    if group is None:
        return m, torch.ones_like(m)
    gm = m.clone()
    dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
    return gm, torch.exp(m - gm)


class _SoftEmbedding(torch.autograd.Function):
    """This rank's share Σ_{v in shard} p_v W_in[v] of m = softmax(h W_outᵀ) · W_in, with p
    normalised over the whole vocabulary; the caller sums the shares over TP.

    backward (g = dL/dm, the same on every TP rank): dz_v = p_v (g·W_in[v] − g·m),
    dW_in[v] = p_v g, dh = Σ_v dz_v W_out[v], dW_out[v] = dz_v h, chunk by chunk from the
    saved logsumexp; g·m is the all-reduced sum of g · (each rank's share)."""

    @staticmethod
    def forward(ctx, h, w_out, w_in, chunk, group):
        n = h.shape[0]
        m = h.new_full((n, 1), float("-inf"), dtype=torch.float32)
        s = h.new_zeros((n, 1), dtype=torch.float32)
        acc = h.new_zeros((n, w_in.shape[1]), dtype=torch.float32)
        for a, b in row_chunks(w_out.shape[0], chunk):
            m, alpha, p, s = _online_step(_logits(h, w_out, a, b), m, s)
            acc = acc * alpha + torch.matmul(p.to(w_in.dtype), w_in[a:b]).float()
        gmax, rescale = _global_max(m, group)
        s, acc = s * rescale, acc * rescale
        if group is not None:
            dist.all_reduce(s, group=group)
        share = acc / s
        ctx.chunk, ctx.group = chunk, group
        ctx.save_for_backward(h, w_out, w_in, gmax + torch.log(s), share)
        # a copy: megatron's reduce_from_tensor_model_parallel_region all-reduces its input
        # in place, which would turn the saved share into the full sum
        return share.to(w_in.dtype, copy=True)

    @staticmethod
    def backward(ctx, g):
        h, w_out, w_in, lse, share = ctx.saved_tensors
        g = g.contiguous()
        gm = (g.float() * share).sum(dim=-1, keepdim=True)
        if ctx.group is not None:
            dist.all_reduce(gm, group=ctx.group)
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        dw_out, dw_in = torch.zeros_like(w_out), torch.zeros_like(w_in)
        for a, b in row_chunks(w_out.shape[0], ctx.chunk):
            p = _logits(h, w_out, a, b).sub_(lse).exp_()
            dz = torch.matmul(g, w_in[a:b].t()).float().sub_(gm).mul_(p)
            dh += torch.matmul(dz.to(w_out.dtype), w_out[a:b]).float()
            torch.matmul(dz.t().to(h.dtype), h, out=dw_out[a:b])
            torch.matmul(p.t().to(g.dtype), g, out=dw_in[a:b])
        return dh.to(h.dtype), dw_out, dw_in, None, None


class _CrossEntropy(torch.autograd.Function):
    """Per-token CE lse(z) − z_target of z = h W_outᵀ over the vocabulary sharded over TP
    (this rank holds rows [start, start + V/tp)). backward: dz = (softmax(z) − onehot) · g."""

    @staticmethod
    def forward(ctx, h, w, target, chunk, start, group):
        n = h.shape[0]
        m = h.new_full((n, 1), float("-inf"), dtype=torch.float32)
        s = h.new_zeros((n, 1), dtype=torch.float32)
        picked = h.new_zeros((n, 1), dtype=torch.float32)
        local = (target - start).unsqueeze(-1)  # target row in this shard, if it is here
        for a, b in row_chunks(w.shape[0], chunk):
            z = _logits(h, w, a, b)
            here = (local >= a) & (local < b)
            picked += torch.where(here, z.gather(-1, (local - a).clamp(0, b - a - 1)), 0.0)
            m, _, _, s = _online_step(z, m, s)
        gmax, rescale = _global_max(m, group)
        sums = torch.cat([s * rescale, picked], dim=-1)
        if group is not None:  # the sum of exps and the target logit in one all-reduce
            dist.all_reduce(sums, group=group)
        lse = gmax + torch.log(sums[:, :1])
        ctx.chunk = chunk
        ctx.save_for_backward(h, w, local, lse)
        return (lse - sums[:, 1:]).squeeze(-1)

    @staticmethod
    def backward(ctx, g):
        h, w, local, lse = ctx.saved_tensors
        g = g.float().unsqueeze(-1)
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        dw = torch.zeros_like(w)
        for a, b in row_chunks(w.shape[0], ctx.chunk):
            dz = _logits(h, w, a, b).sub_(lse).exp_()  # softmax(z) of this chunk
            here = (local >= a) & (local < b)
            dz.scatter_add_(-1, (local - a).clamp(0, b - a - 1), -here.float()).mul_(g)
            dh += torch.matmul(dz.to(w.dtype), w[a:b]).float()
            torch.matmul(dz.t().to(h.dtype), h, out=dw[a:b])
        return dh.to(h.dtype), dw, None, None, None, None


def _enter_vocab_region(h: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """Final-norm hidden [s(/tp), b, d] -> [s*b, d], full sequence on every TP rank."""
    h = par.gather_seq(h) if sequence_parallel else copy_to_tensor_model_parallel_region(h)
    return h.reshape(-1, h.shape[-1])


def _group() -> Optional[dist.ProcessGroup]:
    return par.tp_group() if par.tp_size() > 1 else None


def soft_embedding(h: torch.Tensor, w_out: torch.Tensor, w_in: torch.Tensor, chunk: int,
                   sequence_parallel: bool = False) -> torch.Tensor:
    """softmax(h W_outᵀ) · W_in over the full vocabulary, chunked, from the final-norm hidden
    state h [s, b, d] (this rank's sequence shard [s/tp, b, d] under SP). W_out / W_in are
    this rank's vocabulary shards (the same tensor with tied embeddings). Returns [s, b, d]
    replicated, or the sequence shard under SP: the layout of `parallel.soft_embedding`."""
    seq, b = (h.shape[0] * par.tp_size() if sequence_parallel else h.shape[0]), h.shape[1]
    flat = _enter_vocab_region(h, sequence_parallel)
    share = _SoftEmbedding.apply(flat, w_out, w_in, int(chunk), _group()).view(seq, b, -1)
    if sequence_parallel:
        return par.reduce_scatter_seq(share)
    return reduce_from_tensor_model_parallel_region(share)


def cross_entropy(h: torch.Tensor, w_out: torch.Tensor, target: torch.Tensor, chunk: int,
                  sequence_parallel: bool = False) -> torch.Tensor:
    """Per-token cross-entropy [s, b] (full sequence, the same on every TP rank) of the
    logits h W_outᵀ against target [s, b] (ids < padded vocab), chunked; h as in
    `soft_embedding`. The chunked twin of megatron's vocab_parallel_cross_entropy."""
    flat = _enter_vocab_region(h, sequence_parallel)
    start = par.tp_rank() * w_out.shape[0]
    loss = _CrossEntropy.apply(flat, w_out, target.reshape(-1), int(chunk), start, _group())
    return loss.view(target.shape)
