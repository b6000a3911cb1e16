"""Decoding with preallocated K+1 KV caches: every step's logits against the full forward, the
fixed-shape step a CUDA graph captures (run eagerly on the CPU here, replayed on a GPU in the
`gpu` test), capacity errors, and the TP = 1 linears against megatron-core's own forward."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import single_process, tiny_model_config  # noqa: F401

from ponder_pt.config.schema import PonderConfig
from ponder_pt.inference.decode import Decoder, replay_mismatch
from ponder_pt.inference.model import generate_cached, generate_cached_batch
from ponder_pt.models import PonderLM

pytestmark = pytest.mark.usefixtures("single_process")

PONDER = {"plain": PonderConfig(steps=0), "K2": PonderConfig(steps=2),
          "K1-top4": PonderConfig(steps=1, top_k=4),
          "looped-K2": PonderConfig(steps=2, feedback="hidden")}
PROMPT = [5, 9, 11, 3, 7]


def _full_last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), gather_logits=True)[0, -1].float()


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("ponder", list(PONDER))
@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
def test_each_step_matches_the_full_forward(arch, ponder, mode):
    """Prefill, then 12 one-token steps (greedy): each step's logits equal the full forward
    over prompt + tokens so far, in both the eager and the fixed-shape (graph) form."""
    model = PonderLM(tiny_model_config(arch), PONDER[ponder], seed=3).eval()
    dec = Decoder(model, capacity=len(PROMPT) + 12, mode=mode)
    ids = list(PROMPT)
    with torch.no_grad():
        z = dec.prefill_one(ids)
        for _ in range(12):
            assert (z - _full_last_logits(model, ids)).abs().max().item() <= 1e-5
            ids.append(int(z.argmax()))
            z = dec.step_one(ids[-1])
    assert (z - _full_last_logits(model, ids)).abs().max().item() <= 1e-5
    assert dec.length == len(ids) == dec.capacity
    with pytest.raises(ValueError, match="beyond the KV caches"):
        dec.step_one(1)


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("ponder", ["plain", "K2", "looped-K2"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
def test_left_padded_batch_decodes_each_row_as_alone(arch, ponder, mode):
    """Prompts of 1, 3, 5 and 8 tokens in one left-padded batch: every row's logits at every
    step equal that row decoded alone, and the batched greedy tokens equal the single ones."""
    model = PonderLM(tiny_model_config(arch), PONDER[ponder], seed=6).eval()
    prompts = [[7], [3, 9, 4], PROMPT, [2, 8, 6, 1, 5, 5, 9, 30]]
    steps = 6
    dec = Decoder(model, capacity=8 + steps, mode=mode, batch=len(prompts))
    with torch.no_grad():
        z = dec.prefill(prompts)
        tokens = [list(p) for p in prompts]
        for _ in range(steps):
            for row, ids in enumerate(tokens):
                assert (z[row] - _full_last_logits(model, ids)).abs().max().item() <= 1e-5
            picked = z.argmax(-1).tolist()
            for ids, t in zip(tokens, picked):
                ids.append(t)
            z = dec.step(picked)
    single = [generate_cached(model, p, steps + 1) for p in prompts]
    assert generate_cached_batch(model, prompts, steps + 1) == single
    assert [t[len(p):] for t, p in zip(tokens, prompts)] == [s[:steps] for s in single]


def test_batch_rows_stop_at_their_own_eos():
    model = PonderLM(tiny_model_config("gpt_neox"), PonderConfig(steps=1), seed=7).eval()
    prompts = [[4, 5], [9, 1, 2, 3], [6]]
    free = generate_cached_batch(model, prompts, 10, vocab_rows=50)
    assert all(len(f) == 10 and max(f) < 50 for f in free)
    eos = free[1][3]
    stopped = generate_cached_batch(model, prompts, 10, vocab_rows=50, eos_id=eos)
    for f, s in zip(free, stopped):
        assert s == (f[:f.index(eos) + 1] if eos in f else f)
    assert generate_cached_batch(model, [], 5) == []
    with pytest.raises(ValueError, match="non-empty prompts"):
        Decoder(model, 8, batch=2).prefill([[1], []])


def test_sampled_batch_rows_draw_from_their_own_generators():
    """Sampling a batch: row i's tokens are what it samples alone with generator i (top-k and
    temperature included), ended rows draw nothing, and the generators must match the rows."""
    model = PonderLM(tiny_model_config("gpt_neox"), PonderConfig(steps=2), seed=8).eval()
    prompts = [[4, 5], [9, 1, 2, 3], [6]]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    for kw in (dict(temperature=1.3), dict(temperature=0.7, top_k=8)):
        alone = [generate_cached(model, p, 9, vocab_rows=50, greedy=False, generator=g, **kw)
                 for p, g in zip(prompts, gens())]
        batch = generate_cached_batch(model, prompts, 9, vocab_rows=50, greedy=False,
                                      generators=gens(), **kw)
        assert batch == alone and len({tuple(a) for a in alone}) == 3
        eos = alone[0][2]
        stopped = [generate_cached(model, p, 9, vocab_rows=50, eos_id=eos, greedy=False,
                                   generator=g, **kw) for p, g in zip(prompts, gens())]
        assert generate_cached_batch(model, prompts, 9, vocab_rows=50, eos_id=eos,
                                     greedy=False, generators=gens(), **kw) == stopped
        assert stopped[0] == alone[0][:3]
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        generate_cached_batch(model, prompts, 4, greedy=False, generators=gens()[:2])


def test_generate_masks_padded_rows_and_stops_at_eos():
    model = PonderLM(tiny_model_config("gpt_neox"), PonderConfig(steps=2), seed=4).eval()
    free = generate_cached(model, PROMPT, 15, vocab_rows=40)
    assert len(free) == 15 and max(free) < 40
    stop = generate_cached(model, PROMPT, 15, vocab_rows=40, eos_id=free[4])
    assert stop == free[:free.index(free[4]) + 1]
    assert generate_cached(model, PROMPT, 0) == []


def test_gpt2_positions_and_mode_errors():
    model = PonderLM(tiny_model_config("gpt2", max_seq_len=16), PonderConfig(steps=1)).eval()
    dec = Decoder(model, capacity=100)  # GPT-2: capped at its 16 learned positions
    assert dec.capacity == 16
    out = generate_cached(model, list(range(1, 10)), 7)  # 9 + 7 - 1 = 15 positions: fits
    assert len(out) == 7
    with pytest.raises(ValueError, match="learned positions"):
        generate_cached(model, list(range(1, 10)), 9)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        Decoder(model, 8, mode="graph")
    with pytest.raises(ValueError, match="decoding mode"):
        Decoder(model, 8, mode="fast")


@pytest.mark.parametrize("bias", [True, False])
def test_tp1_linears_equal_megatron_forward_and_grads(bias):
    """ColumnLinear / RowLinear run F.linear at TP = 1; megatron's own forward (plain=False)
    is the reference for outputs and parameter / input gradients, the tied-weight call too."""
    from ponder_pt.models import parallel as par
    from ponder_pt.models.linear import ColumnLinear, RowLinear

    mp = par.megatron_config(torch.float32)
    init = par.seeded_normal(0.02, 0, "w")
    layers = [ColumnLinear(16, 24, config=mp, init_method=init, bias=bias, gather_output=False),
              RowLinear(24, 16, config=mp, init_method=init, bias=bias, input_is_parallel=True,
                        skip_bias_add=False)]
    tied = torch.randn(24, 16, requires_grad=True)
    for layer in layers:
        assert layer.plain
        x = torch.randn(5, 3, layer.weight.shape[1], requires_grad=True)
        calls = [(layer, {})] + ([(layer, {"weight": tied})] if isinstance(layer, ColumnLinear)
                                 else [])
        for mod, kw in calls:
            results = []
            for plain in (True, False):
                mod.plain = plain
                for t in [x, tied, *mod.parameters()]:
                    t.grad = None
                y, _ = mod(x, **kw)
                (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
                grads = [t.grad.clone() for t in [x, tied, *mod.parameters()]
                         if t.grad is not None]
                results.append((y.detach(), grads))
            (y1, g1), (y2, g2) = results
            assert torch.allclose(y1, y2, atol=1e-6) and len(g1) == len(g2)
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))


class _FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: replay() runs the fixed-shape step into
    the decoder's output buffer, wrong (one logit off by 1) on the replays in `wrong`."""

    def __init__(self, dec, wrong=()):
        self.dec, self.wrong, self.n = dec, set(wrong), 0

    def replay(self):
        self.n += 1
        out = self.dec._static_step(self.dec.length).clone()
        if self.n in self.wrong:
            out[0, 0] += 1.0
        self.dec._out = out


@pytest.mark.parametrize("wrong", [(), (1,), (2,)])
def test_graph_replays_are_checked_before_their_logits_are_returned(wrong):
    """The first and second replays are compared with the eager step before their logits are
    returned: a wrong replay is never returned, decoding falls back to eager with a warning
    from that step on, and every step's logits equal plain eager decoding's."""
    model = PonderLM(tiny_model_config("gpt_neox"), PonderConfig(steps=2), seed=3).eval()
    ref = Decoder(model, capacity=len(PROMPT) + 6, mode="eager")
    dec = Decoder(model, capacity=len(PROMPT) + 6, mode="static")
    dec.mode, dec.graph = "graph", _FakeGraph(dec, wrong)  # as if captured
    with torch.no_grad():
        assert torch.allclose(dec.prefill_one(PROMPT), ref.prefill_one(PROMPT), atol=1e-5)
        for i, token in enumerate([4, 8, 15, 16, 23]):
            if i + 1 in wrong:
                with pytest.warns(RuntimeWarning, match=f"replay {i + 1} differs from eager"):
                    got = dec.step_one(token)
            else:
                got = dec.step_one(token)
            assert torch.allclose(got, ref.step_one(token), atol=1e-5), i
            if i == 0 and not wrong:
                assert dec.graph_status.startswith("checking")
    if wrong:
        assert dec.mode == "eager" and dec.graph is None
        assert dec.graph_status.startswith(f"fell back: replay {wrong[0]} differs")
    else:
        assert dec.graph_status == "on (replays 1..2 checked against eager)"
        assert dec.replays == 5


def test_replay_mismatch():
    want = torch.tensor([[1.0, -2.0, float("-inf")]])
    assert replay_mismatch(want.clone(), want) is None
    assert replay_mismatch(want + torch.tensor([[5e-4, 0.0, 0.0]]), want) is None  # rounding
    assert replay_mismatch(want + torch.tensor([[0.5, 0.0, 0.0]]), want) == pytest.approx(0.5)
    assert replay_mismatch(torch.tensor([[1.0, -2.0, 0.0]]), want) == float("inf")  # unmasked
    assert replay_mismatch(torch.tensor([[float("nan"), -2.0, float("-inf")]]), want) \
        == float("inf")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_cuda_graph_decoding_equals_eager(arch):
    """On CUDA: the graph-replayed steps give the eager steps' tokens and logits, the replay
    check passes, and the bf16 model decodes with it too."""
    model = PonderLM(tiny_model_config(arch), PonderConfig(steps=3), seed=5).eval().cuda()
    prompts = [[7], [3, 9, 4], PROMPT]
    assert (generate_cached_batch(model, prompts, 12)
            == generate_cached_batch(model, prompts, 12, cuda_graph=False))
    runs = {}
    for mode in ("eager", "graph"):
        dec = Decoder(model, capacity=len(PROMPT) + 20, mode=mode)
        ids, zs = list(PROMPT), []
        with torch.no_grad():
            z = dec.prefill_one(ids)
            for _ in range(20):
                zs.append(z.clone())
                ids.append(int(z.argmax()))
                z = dec.step_one(ids[-1])
        runs[mode] = (ids, torch.stack(zs), dec.graph_status)
    assert runs["graph"][2].startswith("on"), runs["graph"][2]
    assert runs["graph"][0] == runs["eager"][0]
    assert (runs["graph"][1] - runs["eager"][1]).abs().max().item() <= 1e-4
    bf16 = model.to(torch.bfloat16)
    a = generate_cached(bf16, PROMPT, 20, cuda_graph=False)
    b = generate_cached(bf16, PROMPT, 20)
    assert len(b) == 20 and a[:4] == b[:4]


def test_varying_shapes_turns_cudnn_attention_off_on_cuda_only():
    """Where shapes change per call, SDPA on CUDA may use flash / efficient / math but not
    cuDNN (a plan built per new shape); the flags come back afterwards; CPUs are untouched."""
    from ponder_pt.sdpa_backends import varying_shapes

    b = torch.backends.cuda
    before = (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(),
              b.math_sdp_enabled())
    with varying_shapes("cpu"):
        assert (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(),
                b.math_sdp_enabled()) == before
    with varying_shapes(torch.device("cuda", 0)):
        assert not b.cudnn_sdp_enabled()
        assert b.flash_sdp_enabled() and b.mem_efficient_sdp_enabled() and b.math_sdp_enabled()
    assert (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(),
            b.math_sdp_enabled()) == before


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_decoder_runs_varying_shapes_where_shapes_vary(monkeypatch, mode):
    """The prefill (any prompt width) and eager steps (one more key column each) run under
    `varying_shapes`; the fixed-shape step a CUDA graph captures keeps SDPA's own choice."""
    import contextlib

    from ponder_pt.inference import decode

    calls = []

    @contextlib.contextmanager
    def record(device):
        calls.append("enter")
        yield
        calls.append("exit")

    monkeypatch.setattr(decode, "varying_shapes", record)
    model = PonderLM(tiny_model_config("gpt_neox"), PONDER["K2"], seed=3).eval()
    dec = Decoder(model, capacity=len(PROMPT) + 3, mode=mode)
    dec.prefill_one(PROMPT)
    assert calls == ["enter", "exit"]
    dec.step_one(4)
    dec.step_one(5)
    assert len(calls) == (6 if mode == "eager" else 2)


@pytest.mark.gpu
def test_eager_decoding_on_cuda_runs_no_cudnn_attention():
    """On CUDA, eager steps (a new key length each) run flash / efficient attention, not cuDNN's
    (a plan per shape), and give the logits SDPA's default choice gives."""
    from torch.profiler import ProfilerActivity, profile

    model = PonderLM(tiny_model_config("gpt_neox"), PonderConfig(steps=2), seed=5)
    model = model.eval().cuda().to(torch.bfloat16)
    dec = Decoder(model, capacity=len(PROMPT) + 4, mode="eager")
    with torch.no_grad():
        dec.prefill_one(PROMPT)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            z = dec.step_one(3)
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    assert "cudnn" not in names and ("flash" in names or "fmha" in names
                                     or "efficient" in names), names[:500]
    with torch.no_grad():  # the full forward, SDPA choosing freely
        ref = model(torch.tensor([PROMPT + [3]], device="cuda"), gather_logits=True)[0, -1]
    assert (z - ref.float()).abs().max().item() <= 0.05 * max(1.0, ref.float().abs().max().item())
