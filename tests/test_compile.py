"""`train.compile`: torch.compile per transformer block gives the eager losses, keeps
checkpoint keys and resumes; rejected with TP or PP > 1.

Tolerance: REL = 1e-4. Inductor fuses and reorders fp32 reductions (layer norms, softmax,
GELU, the residual sums) differently from eager, so the two agree to fp32 rounding per op
(~1e-7 relative), which K+1 = 3 passes, backward and 4 Adam steps at lr 3e-3 can amplify;
the observed gap is <= 1e-7 (torch 2.13, CPU), and 1e-4 still catches any real bug (a wrong
or stale block, a missing gradient moves the losses by far more).
"""

import os
import shutil

import pytest
import torch

from train_utils import metrics, run_train

REL = 1e-4


@pytest.fixture(autouse=True)
def _inductor_cache(tmp_path_factory, monkeypatch):
    """Inductor's compiled kernels under the test's tmp (shared by this module's runs)."""
    cache = tmp_path_factory.getbasetemp() / "inductor_cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))


def test_compile_rejected_with_tp_or_pp():
    from ponder_pt.config import ConfigError, load_config

    assert load_config("demo", ["train.compile=true"]).train.compile is True
    for key in ("parallel.tp=2", "parallel.pp=2"):
        with pytest.raises(ConfigError, match="train.compile=true is supported at parallel.tp=1"):
            load_config("demo", ["train.compile=true", key])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_blocks_same_loss_grads_and_keys(mode):
    """In-process: compiled blocks under activation checkpointing give eager's loss and
    gradients, with unchanged parameter / state_dict names and no graph break."""
    from torch._dynamo.utils import counters

    from ponder_pt.config.schema import ModelConfig, PonderConfig
    from ponder_pt.models import PonderLM, init_single_process

    init_single_process()
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64,
                      vocab_size=256, activation_checkpointing=mode)
    eager, compiled = (PonderLM(cfg, PonderConfig(steps=2), seed=7) for _ in range(2))
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    counters.clear()
    for model in (eager, compiled):
        model.train()
        model(x[:, :-1], labels=x[:, 1:]).backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    compiled.load_state_dict(eager.state_dict())  # loads into the compiled blocks as is


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes(prepared, bpe_dir, tmp_path):
    """The tests' TINY run (K=2, fp32, 4 steps) with train.compile=true: same losses as eager;
    its DeepSpeed checkpoint has the eager keys and a compiled run resumes from it."""
    run_train(str(tmp_path / "eager"), prepared, bpe_dir)
    ref_train, ref_valid = metrics(str(tmp_path / "eager"))
    ckpt = tmp_path / "ckpt"
    extra = ["train.compile=true", f"checkpoint.dir={ckpt}", "checkpoint.interval=2"]
    run_train(str(tmp_path / "compiled"), prepared, bpe_dir, extra)
    train, valid = metrics(str(tmp_path / "compiled"))
    assert sorted(train) == sorted(ref_train) == [1, 2, 3, 4]
    for step, loss in ref_train.items():
        assert train[step] == pytest.approx(loss, rel=REL), (step, train, ref_train)
    assert valid[4] == pytest.approx(ref_valid[4], rel=REL)

    states = torch.load(ckpt / "step_00000004" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    assert "layers.0.attn.qkv.weight" in states
    assert not [k for k in states if "_orig_mod" in k]

    shutil.rmtree(ckpt / "step_00000004")  # as if the run died after step 3
    out = run_train(str(tmp_path / "resumed"), prepared, bpe_dir, extra).stdout
    assert "training steps 2..4" in out
    resumed, _ = metrics(str(tmp_path / "resumed"))
    for step in (3, 4):
        assert resumed[step] == pytest.approx(train[step], rel=1e-6), (resumed, train)
    assert os.path.isdir(ckpt / "step_00000004")
