"""Transformer blocks built from megatron-core TP layers (GPT-NeoX, LLaMA and GPT-2 flavours).

Activations are [seq, batch, hidden] (megatron's layout); under sequence parallelism the
residual stream holds this rank's sequence shard and the TP regions see the full sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import parallel as par
from .linear import ColumnLinear, RowLinear


class RMSNorm(nn.Module):
    """LLaMA RMSNorm, computed in fp32 like HF."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def capturing() -> bool:
    """Inside a CUDA graph capture, where a host sync (`int(tensor)`) is an error."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def make_norm(cfg, sequence_parallel: bool) -> nn.Module:
    norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if cfg.arch == "llama" else \
        nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    # Replicated params that only see a sequence shard: grads need a TP all-reduce.
    par.mark_sequence_parallel(norm.parameters(), sequence_parallel)
    return norm


class LearnedPositions(nn.Module):
    """GPT-2's learned absolute position embeddings (`wpe`): a [max_seq_len, hidden] table,
    vocabulary-independent and replicated on every TP rank, added to a pass's input.

    Used at the start of every transformer pass (the K pondering passes and the final one),
    like HF's GPT2Model adds `wpe` to the `inputs_embeds` it is given; the pondering stream
    e_k itself never holds positions. Under sequence parallelism each rank adds the rows of its
    own sequence shard, so the table's gradient is partial and marked `sequence_parallel`.
    """

    def __init__(self, cfg, init, sequence_parallel: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.hidden_size,
                                               dtype=torch.float32))
        init(self.weight)
        self.weight.data = self.weight.data.to(dtype)
        self.sequence_parallel = sequence_parallel and par.tp_size() > 1
        self.dropout = cfg.dropout
        par.mark_sequence_parallel([self.weight], self.sequence_parallel)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x [s(/tp under SP), b, h] + wpe[position_ids] (position_ids [b, s], full sequence),
        then GPT-2's embedding dropout."""
        if self.sequence_parallel:
            n = x.shape[0]
            position_ids = position_ids[:, par.tp_rank() * n:(par.tp_rank() + 1) * n]
        if (not self.training and position_ids.numel() and not capturing()
                and int(position_ids.max()) >= self.weight.shape[0]):  # no sync in training
            raise ValueError(f"position {int(position_ids.max())} is beyond GPT-2's "
                             f"{self.weight.shape[0]} learned positions (model.max_seq_len)")
        x = x + F.embedding(position_ids, self.weight).transpose(0, 1).to(x.dtype)
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class Rotary(nn.Module):
    """Rotary embedding on the first `dim` channels of each head (rotate_half convention)."""

    def __init__(self, head_dim: int, rotary_pct: float, base: float):
        super().__init__()
        self.dim = int(head_dim * rotary_pct)
        self.base = float(base)  # no float buffer: it would not survive module.bfloat16()

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [b, s] -> (cos, sin), each [b, 1, s, dim]."""
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float, device=position_ids.device)
        inv_freq = 1.0 / (self.base ** (exponent / self.dim))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x [b, heads, s, head_dim]; rotates x[..., :rot] and passes the rest through."""
    rot = cos.shape[-1]
    if rot == 0:
        return x
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def core_attention(q, k, v, cos, sin, dropout_p: float):
    """Rotary + causal SDPA. q [b, hq, s, d], k/v [b, hkv, s, d] -> [b, hq, s, d]."""
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                          enable_gqa=gqa)


def column(cfg_mp, inp, out, init, bias, sequence_parallel, stride=1):
    # Under SP the input arrives already all-gathered by `gather_seq`, whose backward
    # reduce-scatters; the layer must then not all-reduce its input grad itself.
    return ColumnLinear(inp, out, config=cfg_mp, init_method=init, bias=bias,
                                gather_output=False, stride=stride,
                                disable_grad_reduce=sequence_parallel and par.tp_size() > 1)


def row(cfg_mp, inp, out, init, bias, sequence_parallel):
    layer = RowLinear(inp, out, config=cfg_mp, init_method=init, bias=bias,
                              input_is_parallel=True, skip_bias_add=False)
    if layer.bias is not None:
        par.mark_sequence_parallel([layer.bias], sequence_parallel)
    return layer


def row_forward(layer, x, sequence_parallel: bool):
    """Row-parallel output: summed over TP (replicated), or reduce-scattered to this rank's
    sequence shard under sequence parallelism."""
    if sequence_parallel:
        return par.row_parallel_sp(layer, x)
    out, _ = layer(x)
    return out


class Attention(nn.Module):
    """Fused QKV laid out per KV group as [q x (heads/kv_heads), k, v] x head_dim.

    With kv_heads == heads this is GPT-NeoX's per-head [q, k, v] interleave, so a contiguous
    TP split hands each rank whole heads (or whole GQA groups).
    """

    def __init__(self, cfg, mp, inits, sequence_parallel, prefix):
        super().__init__()
        tp = par.tp_size()
        if cfg.num_heads % tp or cfg.kv_heads % tp:
            raise ValueError(f"heads ({cfg.num_heads}) and kv heads ({cfg.kv_heads}) must be "
                             f"divisible by TP={tp}")
        self.head_dim = cfg.head_dim
        self.groups = cfg.num_heads // cfg.kv_heads
        self.kv_local = cfg.kv_heads // tp
        self.dropout = cfg.dropout
        self.selective = False  # set by PonderLM.set_activation_checkpointing
        bias = cfg.arch != "llama"
        qkv_out = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = column(mp, cfg.hidden_size, qkv_out, inits(prefix + "qkv"), bias,
                          sequence_parallel)
        self.sequence_parallel = sequence_parallel
        self.dense = row(mp, cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                         inits(prefix + "dense", output=True), bias, sequence_parallel)

    def forward(self, x, cos, sin, cache=None, frozen=None):
        """frozen: (layer index, `halting.FrozenPass`) in adaptive pondering: exited tokens'
        keys/values replaced by their exit pass's, before the cache and the attention see them."""
        s, b, _ = x.shape
        qkv, _ = self.qkv(x)
        qkv = qkv.view(s, b, self.kv_local, self.groups + 2, self.head_dim)
        # one split, not slice + two selects: its backward writes the QKV gradient once
        # (a cat) instead of zero-filling it three times and adding the parts
        q, k, v = qkv.split([self.groups, 1, 1], dim=3)
        q = q.reshape(s, b, self.kv_local * self.groups, self.head_dim)
        k, v = k.squeeze(3), v.squeeze(3)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        if frozen is not None:
            k, v = frozen[1].apply(frozen[0], k, v)
        p = self.dropout if self.training else 0.0
        if cache is not None:
            out = self._cached_attention(q, k, v, cos, sin, cache)
        elif self.selective and self.training and torch.is_grad_enabled():
            out = checkpoint(core_attention, q, k, v, cos, sin, p, use_reentrant=False)
        else:
            out = core_attention(q, k, v, cos, sin, p)
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
        return row_forward(self.dense, out, self.sequence_parallel)

    def _cached_attention(self, q, k, v, cos, sin, cache):
        """Incremental attention: this chunk's (rotated) keys/values go into `cache` (a
        (layer_index, KVCache or StaticKVCache) pair), then attend causally over past + chunk."""
        index, kv = cache
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return kv.attend(index, q, k, v)


class MLP(nn.Module):
    """GELU MLP (GPT-NeoX exact, GPT-2 tanh approximation) or SwiGLU (LLaMA; gate and up
    fused with stride 2 for TP)."""

    def __init__(self, cfg, mp, inits, sequence_parallel, prefix):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        self.gelu = "tanh" if cfg.arch == "gpt2" else "none"  # GPT-2's gelu_new
        bias = not self.swiglu
        width = 2 * cfg.ffn_size if self.swiglu else cfg.ffn_size
        self.fc1 = column(mp, cfg.hidden_size, width, inits(prefix + "fc1"), bias,
                          sequence_parallel, stride=2 if self.swiglu else 1)
        self.sequence_parallel = sequence_parallel
        self.fc2 = row(mp, cfg.ffn_size, cfg.hidden_size, inits(prefix + "fc2", output=True), bias,
                       sequence_parallel)

    def forward(self, x):
        h, _ = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu)
        return row_forward(self.fc2, h, self.sequence_parallel)


def _cached_sdpa(q, keys, values, mask):
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def _causal_mask(n: int, t: int, device) -> torch.Tensor | None:
    """[n, t] mask of n new queries over t keys (the last n are theirs); None for one query."""
    return None if n == 1 else torch.ones(n, t, dtype=torch.bool, device=device).tril(t - n)


class KVCache:
    """Keys/values of one pass for every layer: (k, v) each [b, kv_heads/tp, t, head_dim],
    rotary already applied, grown by concatenation (no size to give in advance). Pondering
    generation keeps one per pass (K+1); `StaticKVCache` is the preallocated kind."""

    def __init__(self, num_layers: int):
        self.layers: list = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def attend(self, index: int, q, k, v):
        """Append k/v [b, kv, n, d] to layer `index`, attend q [b, h, n, d] over everything."""
        k, v = self.append(index, k, v)
        return _cached_sdpa(q, k, v, _causal_mask(q.shape[2], k.shape[2], q.device))

    def advance(self, n: int) -> None:
        """The length follows the stored tensors; nothing to do."""

    def snapshot(self) -> list:
        """What `restore` needs to undo the appends made after it (latent thoughts' trial
        passes): the per-layer tensors, which appending replaces and never modifies."""
        return list(self.layers)

    def restore(self, saved: list) -> None:
        self.layers = saved

    def position_valid(self, n: int, slots: int) -> None:
        """No padding mask in a growing cache (see `StaticKVCache.position_valid`)."""
        return None

    def copy_new_from(self, other: "KVCache", n: int) -> None:
        """Append, in every layer, the last n columns `other` got this step: a skipped pass
        takes the previous pass's keys/values (adaptive pondering's frozen rows)."""
        for index, (k, v) in enumerate(other.layers):
            self.append(index, k[:, :, -n:], v[:, :, -n:])

    def append(self, index: int, k, v) -> tuple:
        """Layer `index`'s keys/values grown by k/v [b, kv, n, d]; returns them whole."""
        past = self.layers[index]
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        self.layers[index] = (k, v)
        return k, v


class StaticKVCache:
    """Preallocated keys/values of one pass: per layer [b, kv_heads, capacity, head_dim].

    Eager use writes each chunk at column `length` and attends over the filled columns;
    `advance(n)` (called by the model after the pass) moves `length`. No allocation per token,
    unlike `KVCache`'s concatenation. With `columns` set (a device tensor of the columns to
    write, updated in place by the caller), shapes no longer depend on the length: the chunk is
    written with `index_copy_` there and attention covers the whole buffer under a mask of the
    filled columns. That is the form a CUDA graph can capture once and replay for every token
    (`ponder_pt.inference.decode`).

    Rows of a batch share the columns; left-padded prompts mark their padding with
    `set_valid`, and no query ever attends to a padding column (a padding query sees only
    itself, so its output is finite and unused)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity, self.length = capacity, 0
        self.columns: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # [b, capacity] bool; None = every column
        self._cols = torch.arange(capacity, device=device)
        self._mask = None

    def set_valid(self, valid: torch.Tensor) -> None:
        """valid [b, n] (False = padding) for the next n columns; later ones are all valid."""
        full = torch.ones(valid.shape[0], self.capacity, dtype=torch.bool, device=valid.device)
        full[:, self.length:self.length + valid.shape[1]] = valid
        self.valid = full

    def _eager_mask(self, n: int, end: int, device):
        if self.valid is None:
            return _causal_mask(n, end, device)
        query = torch.arange(end - n, end, device=device)[:, None]
        keys = self._cols[None, :end]
        seen = (keys <= query) & (self.valid[:, None, :end] | (keys == query))
        return seen[:, None]  # [b, 1, n, end]

    def attend(self, index: int, q, k, v):
        n = q.shape[2]
        if self.columns is not None:
            self.keys[index].index_copy_(2, self.columns, k)
            self.values[index].index_copy_(2, self.columns, v)
            if index == 0:  # one mask per pass: column j is visible to new query i iff j <= col_i
                mask = self._cols[None, :] <= self.columns[:, None]
                self._mask = mask if self.valid is None else mask & self.valid[:, None, None, :]
            return _cached_sdpa(q, self.keys[index], self.values[index], self._mask)
        end = self.length + n
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} needed")
        self.keys[index][:, :, self.length:end] = k
        self.values[index][:, :, self.length:end] = v
        if index == 0:
            self._mask = self._eager_mask(n, end, q.device)
        return _cached_sdpa(q, self.keys[index][:, :, :end], self.values[index][:, :, :end],
                            self._mask)

    def advance(self, n: int) -> None:
        self.length += n

    def snapshot(self) -> tuple:
        """What `restore` needs to undo passes made after it: the length (columns written
        beyond it are free again) and the padding mask."""
        return self.length, self.valid

    def restore(self, saved: tuple) -> None:
        self.length, self.valid = saved

    def position_valid(self, n: int, slots: int) -> torch.Tensor | None:
        """The padding mask [b, n] of the next n positions of `slots` columns each (latent
        thoughts), read from the first column of each; None without padding."""
        if self.valid is None:
            return None
        return self.valid[:, self.length:self.length + n * slots:slots]

    def hide(self, start: int, hidden: torch.Tensor) -> None:
        """Mark columns start..start+n-1 where hidden [b, n] is True as never to be attended
        again, like padding (speculative decoding: a row's rejected drafts, when another row
        of the batch kept more columns)."""
        if self.valid is None:
            self.valid = torch.ones(hidden.shape[0], self.capacity, dtype=torch.bool,
                                    device=hidden.device)
        self.valid[:, start:start + hidden.shape[1]] &= ~hidden

    def compact(self) -> None:
        """Squeeze out the hidden columns of [0, length): each row's visible columns move, in
        order, to the right end of a left-padded block as wide as the row with the most;
        `length` becomes that width. Keys hold their rotary positions, so nothing else
        changes."""
        if self.valid is None:
            return
        valid = self.valid[:, :self.length]
        counts = valid.sum(1)
        width = int(counts.max())
        # per row: its visible columns, right-aligned; padding slots point at column 0
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]
        pad = width - counts
        slot = torch.arange(width, device=valid.device)[None, :]
        keep = slot >= pad[:, None]
        index = torch.where(keep, order.gather(1, (slot - pad[:, None]).clamp(min=0)), 0)
        for store in (self.keys, self.values):
            for t in store:
                gather = index[:, None, :, None].expand(t.shape[0], t.shape[1], width,
                                                        t.shape[3])
                t[:, :, :width] = t.gather(2, gather)
        full = torch.ones_like(self.valid)
        full[:, :width] = keep
        self.valid, self.length = full, width

    def copy_new_from(self, other: "StaticKVCache", n: int) -> None:
        """Copy, in every layer, the n columns `other` is filling this step (before
        `advance`): a skipped pass takes the previous pass's keys/values."""
        cols = (self.columns if self.columns is not None
                else self._cols[self.length:self.length + n])
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for dst, src in zip(mine, theirs):
                dst.index_copy_(2, cols, src.index_select(2, cols))


class Block(nn.Module):
    """Pre-norm block; GPT-NeoX parallel residual x + attn(ln1 x) + mlp(ln2 x) or sequential
    (LLaMA, GPT-2)."""

    def __init__(self, cfg, mp, inits, sequence_parallel, index):
        super().__init__()
        prefix = f"layers.{index}."
        self.index = index
        self.parallel_residual = cfg.parallel_residual
        self.sequence_parallel = sequence_parallel and par.tp_size() > 1
        self.dropout = cfg.dropout
        self.ln1 = make_norm(cfg, self.sequence_parallel)
        self.ln2 = make_norm(cfg, self.sequence_parallel)
        self.attn = Attention(cfg, mp, inits, self.sequence_parallel, prefix + "attn.")
        self.mlp = MLP(cfg, mp, inits, self.sequence_parallel, prefix + "mlp.")

    def _enter(self, x):
        return par.gather_seq(x) if self.sequence_parallel else x

    def _dropout(self, x):
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x, cos, sin, cache=None, frozen=None):
        """cache: None, or a KVCache (inference) whose entry `self.index` this block uses;
        frozen: None, or the `halting.FrozenPass` of this pass (adaptive pondering)."""
        cache = None if cache is None else (self.index, cache)
        frozen = None if frozen is None else (self.index, frozen)
        attn = self._dropout(self.attn(self._enter(self.ln1(x)), cos, sin, cache, frozen))
        if self.parallel_residual:
            mlp = self._dropout(self.mlp(self._enter(self.ln2(x))))
            return mlp + attn + x
        x = attn + x
        return self._dropout(self.mlp(self._enter(self.ln2(x)))) + x
