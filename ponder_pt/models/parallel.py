"""Tensor- and sequence-parallel plumbing around megatron-core.

The linear layers, the vocab-parallel embedding and the vocab-parallel cross-entropy are
megatron-core's. What lives here is the glue the model needs on top of them:

* process-group helpers (`tp_size`, `tp_rank`, `init_single_process`) and the
  `ModelParallelConfig` our layers are built with;
* seeded, TP-independent init methods (small_init / wang_init, as in gpt-neox);
* sequence-parallel region changes (`gather_seq`, `split_seq`, `reduce_scatter_seq`,
  `row_parallel_sp`) and the TP sum of SP-replicated params' grads (gradient hooks, or
  `allreduce_sequence_parallel_grads`). megatron-core's own sequence-parallel mappings
  allocate their buffers with `torch.cuda.current_device()` and so cannot run on CPU/gloo;
  these are the same collectives, device-agnostic;
* the vocab-parallel softmax / soft embedding used by pondering (global max and sum by
  all-reduce, local probability shard x local W_in shard, one all-reduce; logits are never
  gathered; top-k by a global threshold built from k candidates per rank);
* this rank's shard of a full ("master") tensor and the full tensor of a sharded parameter,
  following megatron's partition attributes (the split itself: `ponder_pt.weights.layout`).
"""

from __future__ import annotations

import math
import socket
import warnings
import zlib
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

from ..weights import layout

warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated.*")
warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*deprecated.*")
warnings.filterwarnings("ignore", message=r".*tp_group is None.*")

# --------------------------------------------------------------------------- groups


def tp_group() -> Optional[dist.ProcessGroup]:
    return ps.get_tensor_model_parallel_group()


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank()


def free_port() -> int:
    """A TCP port free on this host now (for a one-process or standalone rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(backend: str = "gloo") -> None:
    """Make a one-process world with TP=1 (for notebooks, tests, conversion scripts).

    megatron-core's layers and cross-entropy need `parallel_state` even at TP=1. No-op when a
    process group and model-parallel state already exist.
    """
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)


def megatron_config(params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    """Layer config: weights built on CPU from a full seeded master (TP-independent init).

    `sequence_parallel` stays False here even when the model runs sequence-parallel: the
    region changes are done explicitly (see `gather_seq`), because megatron's SP code paths
    allocate CUDA buffers.
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size(),
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=params_dtype,
    )


# --------------------------------------------------------------------------- init


def small_init_std(hidden: int) -> float:
    """gpt-neox `small_init`: sqrt(2 / (5 d)) (Nguyen & Salazar 2019)."""
    return math.sqrt(2.0 / (5.0 * hidden))


def wang_init_std(hidden: int, num_layers: int) -> float:
    """gpt-neox `wang_init`: 2 / (L sqrt(d)), for the attention dense and MLP output."""
    return 2.0 / num_layers / math.sqrt(hidden)


def seeded_normal(std: float, seed: int, name: str) -> Callable[[torch.Tensor], None]:
    """Init method filling the FULL master weight from a generator keyed by (seed, name).

    megatron's `_initialize_affine_weight_cpu` calls it on the full (output, input) master and
    then keeps this rank's shard, so the weights do not depend on the TP degree nor on the
    order in which parameters are built.
    """
    key = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)

    def init(weight: torch.Tensor) -> None:
        gen = torch.Generator(device="cpu").manual_seed(key)
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=gen, dtype=torch.float32) * std)

    return init


# --------------------------------------------------------------------------- collectives


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] * n,) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    if x.shape[0] % n:
        raise ValueError(f"sequence length {x.shape[0]} not divisible by TP={n}")
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[0] % n:
        raise ValueError(f"sequence length {x.shape[0]} not divisible by TP={n}")
    return x.chunk(n, dim=0)[r].contiguous()


class _GatherSeq(torch.autograd.Function):
    """Sequence shard -> full sequence (forward all-gather, backward reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_dim0(g, ctx.group), None


class _SplitSeq(torch.autograd.Function):
    """Replicated full sequence -> this rank's shard (backward all-gather)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim0(g, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """Partial sums over TP ranks, full sequence -> summed shard (backward all-gather)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim0(g, ctx.group), None


class _GatherSeqReplicated(_GatherSeq):
    """Sequence shard -> full sequence feeding a term computed identically on every TP rank
    (forward all-gather, backward: this rank's shard of the already complete gradient)."""

    @staticmethod
    def backward(ctx, g):
        return _split_dim0(g, ctx.group), None


def gather_seq_replicated(x: torch.Tensor) -> torch.Tensor:
    """[s/tp, ...] -> [s, ...] for a replicated consumer (e.g. the halting loss): unlike
    `gather_seq`, whose consumer is vocab- or head-parallel, the gradient is not summed."""
    return x if tp_size() == 1 else _GatherSeqReplicated.apply(x, tp_group())


def gather_seq(x: torch.Tensor) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h] entering a TP region (sequence parallelism)."""
    return x if tp_size() == 1 else _GatherSeq.apply(x, tp_group())


def split_seq(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h] replicated -> this rank's [s/tp, b, h]."""
    return x if tp_size() == 1 else _SplitSeq.apply(x, tp_group())


def reduce_scatter_seq(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h] partial over TP ranks -> summed [s/tp, b, h]."""
    return x if tp_size() == 1 else _ReduceScatterSeq.apply(x, tp_group())


def row_parallel_sp(layer, x: torch.Tensor) -> torch.Tensor:
    """A megatron RowParallelLinear ending in a reduce-scatter to sequence shards.

    megatron-core does the same inside RowParallelLinear when its config has
    sequence_parallel=True, but allocates the output with torch.cuda.current_device(); this is
    that forward with a device-agnostic reduce-scatter. The bias is then added on the shard,
    so it is marked `sequence_parallel` (its grad needs the TP all-reduce).
    """
    out = reduce_scatter_seq(torch.matmul(x, layer.weight.t()))
    return out + layer.bias if layer.bias is not None else out


def _sequence_parallel_params(model: torch.nn.Module) -> list:
    return [p for p in model.parameters()
            if getattr(p, "sequence_parallel", False) and p.requires_grad]


def register_sequence_parallel_grad_hooks(model: torch.nn.Module) -> None:
    """All-reduce over TP, during backward, the grad of every param marked `sequence_parallel`.

    A tensor hook on the parameter sees each gradient contribution before it is accumulated
    into .grad (or handed to DeepSpeed); summing is linear, so reducing every contribution
    equals reducing the total. All TP ranks run the same graph, so the collectives match.
    """
    group = tp_group()

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for p in _sequence_parallel_params(model):
        if not getattr(p, "sp_grad_hooked", False):
            p.register_hook(hook)
            p.sp_grad_hooked = True


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Sum the grads of parameters marked `sequence_parallel` over the TP group.

    With sequence parallelism the replicated norms and row-parallel biases only see this
    rank's sequence shard, so their gradients are partial. Call after backward and before
    gradient clipping / the optimizer step. No-op at TP=1, without sequence parallelism, or
    when the model already syncs them with hooks (`PonderLM(sp_grad_sync="hooks")`, the
    default), so a training loop may always call it.
    """
    if tp_size() == 1:
        return
    grads = [p.grad for p in _sequence_parallel_params(model)
             if p.grad is not None and not getattr(p, "sp_grad_hooked", False)]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=tp_group())
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


# --------------------------------------------------------------------------- pondering


@torch.no_grad()
def _global_topk_threshold(z: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """k-th largest logit over the whole (vocab-sharded) vocabulary, shape [..., 1].

    Each rank contributes only its k best candidates per position (group None = TP=1).
    """
    local = z.topk(min(k, z.shape[-1]), dim=-1).values
    if group is not None:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        local = torch.cat(parts, dim=-1)
    return local.topk(min(k, local.shape[-1]), dim=-1).values[..., -1:]


class _VocabParallelSoftmax(torch.autograd.Function):
    """Softmax over a vocab-sharded last dimension; saves only the probabilities.

    forward: global max and sum by all-reduce; backward: dz = p * (g - sum_V(g * p)) with the
    sum all-reduced. Masked (top-k) entries have p = 0 and so get no gradient.
    """

    @staticmethod
    def forward(ctx, logits, top_k, group):
        z = logits.float()
        if top_k > 0:
            z = z.masked_fill(z < _global_topk_threshold(z, top_k, group), float("-inf"))
        zmax = z.amax(dim=-1, keepdim=True)
        if group is not None:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
        probs = (z - zmax).exp_()
        denom = probs.sum(dim=-1, keepdim=True)
        if group is not None:
            dist.all_reduce(denom, group=group)
        probs.div_(denom)
        ctx.group, ctx.in_dtype = group, logits.dtype
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        grad = grad.float()
        dot = (grad * probs).sum(dim=-1, keepdim=True)
        if ctx.group is not None:
            dist.all_reduce(dot, group=ctx.group)
        return (probs * (grad - dot)).to(ctx.in_dtype), None, None


def vocab_parallel_softmax(logits: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """Softmax over the full vocabulary of vocab-sharded logits; returns this rank's shard.

    top_k > 0 keeps the k largest logits of the whole vocabulary (by a global threshold; ties
    at the threshold are all kept) and renormalises over them; those and TP > 1 give fp32
    probabilities. A whole vocabulary without top-k (TP = 1) is torch's own softmax in the
    logits' dtype (fp32 inside the kernel): one fused kernel each way, and it keeps only its
    output, the very tensor p . W_in keeps for its weight gradient (bf16: 2 B per logit kept
    per pass instead of fp32 probabilities plus their bf16 cast, 6 B).
    """
    if tp_size() == 1 and top_k <= 0:
        return torch.softmax(logits, dim=-1)
    group = tp_group() if tp_size() > 1 else None
    return _VocabParallelSoftmax.apply(logits, int(top_k), group)


def soft_embedding(probs: torch.Tensor, weight: torch.Tensor,
                   sequence_parallel: bool = False) -> torch.Tensor:
    """p . W_in with p and W_in both vocab-sharded: local product and one reduction.

    probs [s, b, V/tp], weight [V/tp, h] -> [s, b, h] (replicated), or this rank's sequence
    shard [s/tp, b, h] under sequence parallelism (the reduction is then a reduce-scatter).
    """
    partial = torch.matmul(probs.to(weight.dtype), weight)
    if sequence_parallel:
        return reduce_scatter_seq(partial)
    return reduce_from_tensor_model_parallel_region(partial)


# --------------------------------------------------------------------------- sharding


def partition_spec(param: torch.Tensor) -> Optional[tuple[int, int]]:
    """(partition_dim, stride) of a TP-sharded megatron parameter, None if replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return None


def shard(full: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    """This rank's piece of a full tensor, exactly as megatron's CPU init splits a master."""
    return layout.shard(full, dim, stride, rank=tp_rank(), world=tp_size())


def gather_full(param: torch.Tensor) -> torch.Tensor:
    """Full (unsharded) copy of a parameter or gradient-shaped tensor `param`.

    Collective over the TP group when the parameter is sharded (every TP rank must call).
    """
    t = param.detach()
    spec = partition_spec(param)
    if spec is None or tp_size() == 1:
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(tp_size())]
    dist.all_gather(parts, t.contiguous(), group=tp_group())
    return layout.unshard(parts, *spec)


def gather_tensor(t: torch.Tensor, spec: Optional[tuple[int, int]]) -> torch.Tensor:
    """Like `gather_full` for an arbitrary tensor with an explicit (dim, stride) spec."""
    if spec is None or tp_size() == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(tp_size())]
    dist.all_gather(parts, t.detach().contiguous(), group=tp_group())
    return layout.unshard(parts, *spec)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from vocab shards (no autograd; for inference and tests)."""
    return gather_tensor(logits, (logits.dim() - 1, 1))


def mark_sequence_parallel(params: Iterable[torch.nn.Parameter], flag: bool = True) -> None:
    for p in params:
        setattr(p, "sequence_parallel", flag)
