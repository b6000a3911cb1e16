"""Per-token cross-entropy of bf16 logits at TP = 1, in a few passes over [tokens, V].

megatron's vocab_parallel_cross_entropy (what TP > 1 and fp32 use) works on an fp32 copy of
the logits: cast, max, subtract, exp, sum, divide forward, and a multiply and cast back in
backward, about 50 bytes of memory traffic per logit, keeping the 4-byte softmax. Here:

* forward: fp32 log-probabilities over row chunks (one fused kernel per chunk on CUDA that
  reads bf16; the fp32 temporary is at most CHUNK_BYTES and an eighth of the logits' size),
  of which only the targets' are kept; kept for backward: the bf16 logits themselves and
  the targets' fp32 log-probabilities (2 bytes per logit instead of 4);
* backward: torch's softmax in the logits' dtype (fp32 inside the kernel) scaled by the
  incoming gradient is the gradient of every non-target logit; the target's, p_t - 1, is
  computed in fp32 from its log-probability and written over it. (In bf16, p_t - 1 would
  vanish for confident predictions: bf16 rounds p_t = 0.999 to 1.)

fp16 stays on megatron's path: its narrow exponent would flush small p x g products that
megatron forms in fp32 before its loss-scaled cast.

About 20 bytes of traffic per logit in all, and the backward peak is the kept logits plus
their gradient (4 bytes per logit; megatron's: 6).
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 64 * 2**20  # the forward's fp32 temporary, at most
_FUSED = {"ok": True}  # torch._log_softmax(bf16, half_to_float=True) works here


def _log_softmax_fp32(z: torch.Tensor) -> torch.Tensor:
    if z.is_cuda and _FUSED["ok"]:  # reads bf16 rows, fp32 math and output, one kernel
        try:
            return torch._log_softmax(z, -1, True)
        except RuntimeError as err:  # a torch without the bf16 variant: the cast below
            if isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            _FUSED["ok"] = False
    return torch.log_softmax(z.float(), -1)  # CPU kernels have no bf16 -> fp32 variant


class _CrossEntropyBF16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        t = target.reshape(-1, 1)
        logp_t = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        rows = max(1, min(CHUNK_BYTES, flat.numel() * flat.element_size() // 8) // (4 * vocab))
        for start in range(0, flat.shape[0], rows):
            end = start + rows
            logp_t[start:end] = _log_softmax_fp32(flat[start:end]).gather(1, t[start:end])[:, 0]
        ctx.save_for_backward(logits, target, logp_t)
        return -logp_t.view(target.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, target, logp_t = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        t = target.reshape(-1, 1)
        g = grad.reshape(-1).float()
        out = torch.softmax(flat, dim=-1)
        out.mul_(g[:, None].to(out.dtype))
        # the targets' entries by flat index (CPU's scatter_ allocates a full-size temporary)
        where = torch.arange(flat.shape[0], device=flat.device) * flat.shape[1] + t[:, 0]
        out.view(-1).index_copy_(0, where, ((logp_t.exp() - 1.0) * g).to(out.dtype))
        return out.view(logits.shape), None


def cross_entropy_bf16(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token CE [s, b] (fp32) of bf16 logits [s, b, V] (the whole vocabulary, TP = 1)
    against target [s, b]."""
    if logits.dtype != torch.bfloat16:
        raise ValueError(f"bf16 logits expected, got {logits.dtype}")
    return _CrossEntropyBF16.apply(logits.contiguous(), target)
