"""The halting arithmetic adaptive pondering and early exit share (`ponder_pt.halting_math`):
the exit distribution and the two priors against their definitions, Q-exit at a CDF exactly
equal to q (where DESIGN.md's two methods part: adaptive pondering exits when the CDF reaches
q, PALBERT when it exceeds it), and adaptive pondering's forward and metrics counting the same
exits at such a boundary."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from _model_helpers import batch, tiny_model_config

from ponder_pt import halting_math as hm
from ponder_pt.config.schema import HaltingConfig, PonderConfig
from ponder_pt.early_exit import losses
from ponder_pt.early_exit.exits import QExit
from ponder_pt.models import PonderLM, init_single_process

init_single_process()


def test_exit_distribution_and_the_two_priors():
    lam = torch.tensor([[0.2, 0.5, 0.4]])  # 3 halting steps, the 4th takes the rest
    want = [0.2, 0.8 * 0.5, 0.8 * 0.5 * 0.4, 0.8 * 0.5 * 0.6]
    assert torch.allclose(hm.exit_distribution(lam, dim=1)[0], torch.tensor(want))
    assert torch.allclose(hm.exit_distribution(lam.t(), dim=0)[:, 0], torch.tensor(want))
    # early exit's columns are the N layers; the last layer's own lambda is not used
    assert torch.allclose(losses.exit_distribution(torch.tensor([[0.2, 0.5, 0.4, 0.01]]))[0],
                          torch.tensor(want))
    geo = [0.1 * 0.9 ** k for k in range(4)]
    renorm = hm.truncated_geometric(0.1, 4, "renormalise")
    last = hm.truncated_geometric(0.1, 4, "last")
    assert renorm.tolist() == pytest.approx([g / sum(geo) for g in geo], rel=1e-6)
    assert last.tolist() == pytest.approx(geo[:3] + [1 - sum(geo[:3])], rel=1e-6)
    assert losses.geometric_prior(4, 0.1).tolist() == last.tolist()  # early exit's tail
    with pytest.raises(ValueError, match="tail must be one of"):
        hm.truncated_geometric(0.1, 4, "drop")


def test_q_exit_at_a_cdf_equal_to_q():
    """lambda 1/2, 1/2: CDF 1/2 then 3/4, exact in binary. At q = 3/4 adaptive pondering exits
    at step 1 (reaches q), PALBERT at step 2 (exceeds q); q >= 1 never exits early."""
    lam = torch.full((2, 1), 0.5)
    assert hm.q_exit(lam, 0.75).item() == 1
    assert hm.q_exit(lam, 0.75, strict=True).item() == 2
    assert hm.q_exit(torch.ones(2, 1), 1.0).item() == 2  # even when lambda rounds to 1
    # early exit's rule over 3 layers: not at layer 2 (CDF = q), at layer 3 (the last)
    rule = QExit(0.75)
    rule.reset(torch.arange(1))
    got = [bool(rule.step(i, torch.zeros(1, 2), torch.tensor([0.5]))) for i in range(2)]
    assert got == [False, False]
    # adaptive pondering: every token at pass 1 of K = 2, in the forward and in its metrics
    model = _constant_lambda_model(0.0, K=2)  # lambda = sigmoid(0) = 1/2 for every token
    ids, labels, mask = batch(seed=3)
    with torch.no_grad():
        _, exits = model(ids, labels=labels, loss_mask=mask, halt_q=0.75, return_exits=True)
    assert exits.unique().tolist() == [1]
    assert model.halting_stats["exit_hist"].tolist() == [0.0, 1.0, 0.0]


def _constant_lambda_model(bias: float, K: int) -> PonderLM:
    """A pondernet head with zero weights: lambda = sigmoid(bias) for every token and pass."""
    model = PonderLM(tiny_model_config(), PonderConfig(steps=K,
                                                       halting=HaltingConfig(mode="pondernet")),
                     seed=3)
    with torch.no_grad():
        model.halting.proj.weight.zero_()
        model.halting.proj.bias.fill_(bias)
    return model.eval()


def test_forward_and_metrics_count_the_same_exits_at_the_boundary():
    """q = the exact CDF after pass k (from the float32 lambda the head gives): whether the
    rounded arithmetic says 'reached' is a coin toss, but the forward's exits, the exit
    histogram the trainer logs and `halting_math.q_exit` must say the same. A cumulative sum
    of p, as the metrics once computed it, disagrees with the survival form on some of
    these cases (so the check is not vacuous)."""
    K, ids, labels, mask = 3, *batch(seed=4)
    disagreeing = 0
    for bias in (-2.994, -2.997, -2.976, -1.3, -0.7, 0.4):
        model = _constant_lambda_model(bias, K)
        lam = torch.sigmoid(torch.tensor(bias, dtype=torch.float32))
        assert model.halting(torch.zeros(1, 1, model.cfg.hidden_size), None).item() == lam.item()
        for k in (0, 1, 2):
            q = float(1 - (1 - Fraction(lam.item())) ** (k + 1))  # CDF after pass k, exactly
            want = hm.q_exit(lam.expand(K, 1), q).item()
            p = hm.exit_distribution(lam.expand(K, 1), dim=0)
            cumsum_says = int((torch.cumsum(p[:, 0], 0) >= q).float().argmax())
            disagreeing += cumsum_says != want
            with torch.no_grad():
                _, exits = model(ids, labels=labels, loss_mask=mask, halt_q=q,
                                 return_exits=True)
            assert exits.unique().tolist() == [want], (bias, k)
            hist = [0.0] * (K + 1)
            hist[want] = 1.0
            assert model.halting_stats["exit_hist"].tolist() == hist, (bias, k)
            model.train()  # the training objective's metrics count the same exits
            model.ponder_cfg.halting.q = q
            model(ids, labels=labels, loss_mask=mask)
            assert model.halting_stats["exit_hist"].tolist() == hist, (bias, k)
            model.eval()
    assert disagreeing > 0
