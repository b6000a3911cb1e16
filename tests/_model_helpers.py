"""Shared helpers for tests/test_model_*.py, and the 2-process TP worker.

`python tests/_model_helpers.py --out FILE` spawns 2 gloo processes, runs every case in
`TP_CASES` at TP=2 and then at TP=1 (same world, DP=2) and writes a JSON report of the
differences (loss, gathered gradients, gathered initial weights) that test_model_tp.py reads.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from ponder_pt.config.schema import ModelConfig, PonderConfig  # noqa: E402

VOCAB = 128


def tiny_model_config(arch: str = "gpt_neox", **over) -> ModelConfig:
    """2 layers, hidden 64; GPT-NeoX (parallel residual, rotary 0.25), LLaMA (GQA 4/2) or
    GPT-2 (learned positions, tied)."""
    if arch == "gpt_neox":
        base = dict(arch="gpt_neox", num_layers=2, hidden_size=64, num_heads=4,
                    ffn_hidden_size=128, rotary_pct=0.25, parallel_residual=True)
    elif arch == "gpt2":
        base = dict(arch="gpt2", num_layers=2, hidden_size=64, num_heads=4,
                    ffn_hidden_size=256, rotary_pct=0.0, parallel_residual=False)
    else:
        base = dict(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=96, rotary_pct=1.0, parallel_residual=False, norm_eps=1e-6)
    base.update(max_seq_len=64, vocab_size=VOCAB, tie_embeddings=arch == "gpt2")
    base.update(over)
    return ModelConfig(**base)


def random_hf_model(cfg: ModelConfig, seed: int = 0):
    """fp32 eval-mode HF model of our shape with every parameter randomised (norms too)."""
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM

    from ponder_pt.models import hf_config_from

    hf_cfg = hf_config_from(cfg)
    hf_cfg._attn_implementation = "eager"
    cls = {"gpt_neox": GPTNeoXForCausalLM, "llama": LlamaForCausalLM,
           "gpt2": GPT2LMHeadModel}[cfg.arch]
    torch.manual_seed(seed)
    model = cls(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.08 * noise)
    return model


def batch(b: int = 2, s: int = 16, seed: int = 0, vocab: int = VOCAB):
    """ids (including the last padded row, e.g. a pause id), aligned labels, 0/1 loss mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    ids[:, 3] = vocab - 1
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    mask = (torch.rand(b, s, generator=gen) > 0.25).long()
    mask[0, 0] = 1
    return ids, labels, mask


def ponder_reference(embed_weight, run_logits, ids, K, *, scale_embeds=True,
                     scale_initial_by_steps=False, top_k=0):
    """DESIGN.md pondering, written plainly: returns the final-pass logits [b, s, V].

    embed_weight: W_in (V x d); run_logits(inputs_embeds [b,s,d]) -> logits [b,s,V].
    """
    s = math.sqrt(embed_weight.shape[1]) if scale_embeds else 1.0
    e = embed_weight[ids] * s * (K if scale_initial_by_steps else 1)
    for _ in range(K):
        z = run_logits(e)
        if top_k > 0:
            vals, idx = z.topk(top_k, dim=-1)
            p = torch.zeros_like(z).scatter(-1, idx, torch.softmax(vals, dim=-1))
        else:
            p = torch.softmax(z, dim=-1)
        e = e + s * (p @ embed_weight)
    return run_logits(e)


def masked_ce(logits, labels, mask):
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          reduction="none")
    mask = mask.reshape(-1).float()
    return (per * mask).sum() / mask.sum()


# --------------------------------------------------------------------------- TP worker

# name -> (arch, model overrides, ponder overrides, sequence_parallel); SP cases sync the norm
# grads with hooks (the default) unless the name says "manual" (allreduce_sequence_parallel_grads)
TP_CASES = {
    "neox_plain": ("gpt_neox", {}, {}, False),
    "neox_plain_sp": ("gpt_neox", {}, {}, True),
    "neox_seqres_plain": ("gpt_neox", {"parallel_residual": False}, {}, False),
    "llama_gqa_plain": ("llama", {}, {}, False),
    "llama_gqa_plain_sp": ("llama", {}, {}, True),
    "neox_ponder2": ("gpt_neox", {}, {"steps": 2}, False),
    "neox_ponder2_sp": ("gpt_neox", {}, {"steps": 2}, True),
    "neox_ponder2_top5": ("gpt_neox", {}, {"steps": 2, "top_k": 5}, False),
    "neox_ponder2_top5_sp": ("gpt_neox", {}, {"steps": 2, "top_k": 5}, True),
    "llama_ponder2_sp": ("llama", {}, {"steps": 2}, True),
    "neox_tied_ponder1": ("gpt_neox", {"tie_embeddings": True}, {"steps": 1}, False),
    "llama_tied_ponder3_top3_sp": ("llama", {"tie_embeddings": True}, {"steps": 3, "top_k": 3},
                                   True),
    "neox_ponder1_ckpt_full_sp": ("gpt_neox", {"activation_checkpointing": "full"},
                                  {"steps": 1}, True),
    "llama_ponder1_ckpt_sel": ("llama", {"activation_checkpointing": "selective"},
                               {"steps": 1, "top_k": 3}, False),
    # the looped baseline (ponder.feedback=hidden): the fed-back hidden is SP-sharded like e
    "neox_looped2": ("gpt_neox", {}, {"steps": 2, "feedback": "hidden"}, False),
    "neox_looped2_sp": ("gpt_neox", {}, {"steps": 2, "feedback": "hidden"}, True),
    "llama_tied_looped1_sp": ("llama", {"tie_embeddings": True},
                              {"steps": 1, "feedback": "hidden"}, True),
    "neox_ponder2_sp_manual": ("gpt_neox", {}, {"steps": 2}, True),
    "llama_ponder1_ckpt_full_sp_manual": ("llama", {"activation_checkpointing": "full"},
                                          {"steps": 1}, True),
    # adaptive pondering (halting head replicated, lambda gathered over SP, per-pass CE)
    "neox_halt_palbert2": ("gpt_neox", {}, {"steps": 2, "halting": "palbert"}, False),
    "llama_halt_pondernet3_sp": ("llama", {}, {"steps": 3, "halting": "pondernet"}, True),
    "neox_halt_frozen2_sp_chunk_ckpt": (
        "gpt_neox", {"vocab_chunk": 24, "activation_checkpointing": "full"},
        {"steps": 2, "halting": "palbert", "train_exits": "frozen"}, True),
    # latent thoughts (each rank's sequence shard holds whole positions, all their slots)
    "neox_thoughts1_sp": ("gpt_neox", {}, {"thoughts": 1}, True),
    "llama_thoughts2_sp_chunk_ckpt": ("llama", {"vocab_chunk": 24,
                                                "activation_checkpointing": "full"},
                                      {"thoughts": 2}, True),
    "neox_tied_thoughts1": ("gpt_neox", {"tie_embeddings": True}, {"thoughts": 1}, False),
    "llama_pause_every2_sp": ("llama", {}, {"pause_every": 2}, True),  # PonderLM-2's pauses
    # negative control: SP without the norm-grad all-reduce must NOT match TP=1
    "neox_plain_sp_manual_no_allreduce": ("gpt_neox", {}, {}, True),
}


def _run_case(name, spec):
    from ponder_pt.models import PonderLM, allreduce_sequence_parallel_grads, gather_full
    from ponder_pt.models.parallel import gather_tensor, partition_spec

    arch, mover, pover, sp = spec
    cfg = tiny_model_config(arch, **mover)
    sync = "manual" if "_manual" in name else "hooks"
    pover = dict(pover)
    if "halting" in pover:
        from ponder_pt.config.schema import HaltingConfig

        pover["halting"] = HaltingConfig(mode=pover["halting"], q=0.5,
                                         train_exits=pover.pop("train_exits", "dense"))
    thoughts = None
    if "thoughts" in pover:  # Jacobi iterations fixed at 2 (the draw is the trainer's)
        from ponder_pt.config.schema import ThoughtsConfig

        thoughts = ThoughtsConfig(count=pover.pop("thoughts"), train_iters=[2])
    pause = None
    if "pause_every" in pover:
        from ponder_pt.config.schema import PauseConfig

        pause = PauseConfig(mode="every_token", per_token=pover.pop("pause_every"),
                            token_id=VOCAB - 1)
    model = PonderLM(cfg, PonderConfig(**pover), sequence_parallel=sp, sp_grad_sync=sync, seed=7,
                     thoughts=thoughts, pause=pause)
    if model.halting is not None:  # spread lambda out: tokens exit at different passes
        with torch.no_grad():
            w = model.halting.proj.weight
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    model.train()  # dropout is 0; train mode exercises activation checkpointing
    weights = {n: gather_full(p) for n, p in model.named_parameters()}
    ids, labels, mask = batch(seed=1)
    loss = model(ids, labels=labels, loss_mask=mask)
    loss.backward()
    if not name.endswith("_no_allreduce"):
        allreduce_sequence_parallel_grads(model)
    grads = {n: gather_tensor(p.grad, partition_spec(p)) for n, p in model.named_parameters()}
    hist = None if model.halting_stats is None else model.halting_stats["exit_hist"].tolist()
    return {"loss": loss.item(), "weights": weights, "grads": grads, "exit_hist": hist,
            "sequence_parallel": model.sequence_parallel,
            "local_vocab_rows": model.embed.weight.shape[0]}


def _hf_roundtrip_tp(archs=("gpt_neox", "llama")):
    """At TP=2: HF -> ours -> HF, and our gathered logits vs HF's."""
    from ponder_pt.models import PonderLM, load_hf_state_dict, to_hf_state_dict

    out = {}
    for arch in archs:
        cfg = tiny_model_config(arch)
        hf = random_hf_model(cfg, seed=3)
        sd = hf.state_dict()
        model = PonderLM(cfg).eval()
        load_hf_state_dict(model, sd)
        back = to_hf_state_dict(model)
        ids, _, _ = batch(seed=2)
        with torch.no_grad():
            ours = model(ids, gather_logits=True)
            ref = hf(ids).logits
        pondering = PonderLM(cfg, PonderConfig(steps=1)).eval()
        load_hf_state_dict(pondering, sd)
        with torch.no_grad():
            full = pondering(ids, gather_logits=True)
            caches = pondering.new_caches()
            steps = [pondering(ids[:, :6], caches=caches, gather_logits=True)]
            steps += [pondering(ids[:, t:t + 1], caches=caches, gather_logits=True)
                      for t in range(6, ids.shape[1])]
        out[arch] = {
            "max_decode_diff": (torch.cat(steps, dim=1) - full).abs().max().item(),
            "same_keys": sorted(back) == sorted(sd),
            "max_weight_diff": max((back[k] - v).abs().max().item() for k, v in sd.items()),
            "max_logit_diff": (ours - ref).abs().max().item(),
        }
    return out


def _tp_report(cases=None, hf_archs=("gpt_neox", "llama")) -> dict:
    """Every case (default TP_CASES) at TP=2, then at TP=1 (same world, DP=2), and their
    differences; `hf_archs`: the HF round trips at TP=2. (tests/test_gpt2.py runs its own
    cases through functools.partial(_tp_report, ...).)"""
    from megatron.core import parallel_state as ps

    cases = TP_CASES if cases is None else cases
    report = {}
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tp2 = {n: _run_case(n, spec) for n, spec in cases.items()}
    report["hf_tp2"] = _hf_roundtrip_tp(hf_archs)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    for n, spec in cases.items():
        ref, got = _run_case(n, spec), tp2[n]
        report[n] = {
            "loss_tp1": ref["loss"], "loss_tp2": got["loss"],
            "max_weight_diff": max((got["weights"][k] - v).abs().max().item()
                                   for k, v in ref["weights"].items()),
            "max_grad_diff": max((got["grads"][k] - v).abs().max().item()
                                 for k, v in ref["grads"].items()),
            "min_grad_norm": min(v.norm().item() for v in ref["grads"].values()),
            "same_params": sorted(ref["grads"]) == sorted(got["grads"]),
            "tp2_sequence_parallel": got["sequence_parallel"],
            "tp2_local_vocab_rows": got["local_vocab_rows"],
            "exit_hist_tp1": ref["exit_hist"], "exit_hist_tp2": got["exit_hist"],
        }
    ps.destroy_model_parallel()
    return report


def _gloo_worker(rank, world, port, out_path, body):
    """One gloo rank running body() -> a JSON-able report, which rank 0 writes to out_path."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        report = body()
    except Exception as exc:  # report instead of hanging the other rank
        import traceback

        report = {"error": f"rank {rank}: {exc!r}\n{traceback.format_exc()}"}
        with open(f"{out_path}.rank{rank}.err", "w") as fh:
            json.dump(report, fh)
        raise
    dist.barrier()
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(report, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def spawn_gloo(body, out_path: str, world: int = 2) -> None:
    """Run `body` (a module-level function, picklable) in `world` spawned gloo processes; rank
    0 writes its report as JSON to out_path. For the `python tests/X.py --out FILE` workers."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_worker, args=(world, port, out_path, body), nprocs=world, join=True)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    spawn_gloo(_tp_report, args.out)


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- fixtures

try:
    import pytest

    @pytest.fixture(scope="module")
    def single_process():
        """A 1-process gloo world with TP=1 for the module; torn down afterwards."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from ponder_pt.models import init_single_process

        owns_world = not dist.is_initialized()
        owns_mp = not ps.model_parallel_is_initialized()
        init_single_process()
        yield
        if owns_mp:
            ps.destroy_model_parallel()
        if owns_world:
            dist.destroy_process_group()
except ImportError:  # the worker script does not need pytest
    pass
