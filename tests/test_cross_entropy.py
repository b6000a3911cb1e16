"""The TP = 1 bf16 cross-entropy against megatron's vocab-parallel CE in fp32 on the same
(bf16-valued) logits: the loss to fp32 rounding, every gradient element to bf16 rounding,
including the target gradient of a confident prediction, which a softmax rounded to bf16
would lose."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import single_process  # noqa: F401

from ponder_pt.models import cross_entropy as ce

pytestmark = pytest.mark.usefixtures("single_process")


def _reference(z: torch.Tensor, t: torch.Tensor, g: torch.Tensor):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    x = z.float().requires_grad_()
    loss = vocab_parallel_cross_entropy(x.clone(), t)
    (loss * g).sum().backward()
    return loss.detach(), x.grad


def _ours(z: torch.Tensor, t: torch.Tensor, g: torch.Tensor):
    x = z.clone().requires_grad_()
    loss = ce.cross_entropy_bf16(x, t)
    (loss * g).sum().backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    return loss.detach(), x.grad.float()


def _logits(s=29, b=3, V=1000, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(s, b, V, generator=gen) * 3).bfloat16()
    t = torch.randint(0, V, (s, b), generator=gen)
    g = torch.rand(s, b, generator=gen) / (s * b)  # a mean's scale, some rows near 0
    g[0, 1] = 0.0  # a masked token
    return z.to(device), t.to(device), g.to(device)


def _check(ours, ref):
    (l1, g1), (l0, g0) = ours, ref
    assert torch.allclose(l1, l0, atol=1e-5, rtol=1e-6), (l1 - l0).abs().max()
    # each element to bf16 rounding of the exact value: p, the row's scale and their product
    # are each rounded once (at most 2^-8 relative each)
    assert ((g1 - g0).abs() <= 3 * 2**-8 * g0.abs() + 1e-12).all(), (g1 - g0).abs().max()


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_values_and_gradients_match_megatron_in_fp32(monkeypatch, chunk_rows):
    z, t, g = _logits()
    if chunk_rows:  # several forward chunks, the last one short
        monkeypatch.setattr(ce, "CHUNK_BYTES", 4 * z.shape[-1] * chunk_rows)
    _check(_ours(z, t, g), _reference(z, t, g))


def test_confident_target_keeps_its_small_gradient():
    """p_t = 0.999: bf16 rounds it to 1, so p_t - 1 taken from a bf16 softmax would be 0;
    the target's gradient is formed in fp32 instead."""
    z, t, g = _logits(s=4, b=2, V=256)
    z.zero_()
    margin = float(torch.log(torch.tensor(0.999 / 0.001 * 255)))
    z[..., 7] = margin  # every row predicts id 7 with p = 0.999
    t.fill_(7)
    g.fill_(1.0)
    ours, ref = _ours(z, t, g), _reference(z, t, g)
    want = ref[1][..., 7]
    assert torch.allclose(want, torch.full_like(want, -0.001), rtol=0.02)
    _check(ours, ref)
    assert torch.softmax(z, -1)[..., 7].eq(1.0).all()  # what the naive way would use


def test_model_loss_takes_it_for_bf16_at_tp1(monkeypatch):
    """PonderLM.loss: bf16 logits at TP = 1 go through the bf16 CE, fp32 ones through
    megatron's, and both give the same masked mean."""
    from ponder_pt.models import PonderLM

    calls = []
    real = ce.cross_entropy_bf16
    monkeypatch.setattr("ponder_pt.models.ponder_pass.cross_entropy_bf16",
                        lambda *a: calls.append(1) or real(*a))
    z, t, _ = _logits(s=16, b=2, V=300)
    labels = t.t().contiguous()
    labels[0, 3] = -100
    mask = torch.ones_like(labels, dtype=torch.float)
    mask[1, :5] = 0
    got = PonderLM.loss(z, labels, mask)
    assert calls == [1]
    want = PonderLM.loss(z.float(), labels, mask)
    assert calls == [1]
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_path_matches_megatron():
    """On CUDA the forward reads bf16 straight into fp32 log-probabilities (one kernel)."""
    z, t, g = _logits(s=64, b=4, V=50304, device="cuda")
    _check(_ours(z, t, g), _reference(z, t, g))
