"""GPT-2 (`model.arch=gpt2`): logits equal HF GPT2LMHeadModel at TP=1 and TP=2, HF weights in
and out (Conv1D transposes, fused c_attn split over TP), pondering and its export with K+1 KV
caches, TP/PP training equal to one process, `finetune` on an export, and the rule that every
config that validates also exports (each run preset x each arch).

HF models are random-initialised tiny GPT-2s built here (no hub downloads). The TP=2 part runs
`python tests/test_gpt2.py --out FILE` (2 gloo processes, tests/_model_helpers.spawn_gloo).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _model_helpers import (batch, masked_ce, ponder_reference, random_hf_model,  # noqa: E402
                            tiny_model_config)

from ponder_pt.config.schema import PonderConfig  # noqa: E402

# name -> (arch, model overrides, ponder overrides, sequence_parallel): _model_helpers._run_case
GPT2_TP_CASES = {
    "gpt2_plain": ("gpt2", {}, {}, False),
    "gpt2_plain_sp": ("gpt2", {}, {}, True),
    "gpt2_ponder2_sp": ("gpt2", {}, {"steps": 2}, True),
    "gpt2_ponder2_top3": ("gpt2", {}, {"steps": 2, "top_k": 3}, False),
    "gpt2_ponder1_ckpt_full_sp_manual": ("gpt2", {"activation_checkpointing": "full"},
                                         {"steps": 1}, True),
    "gpt2_ponder1_ckpt_sel_chunk": ("gpt2", {"activation_checkpointing": "selective",
                                             "vocab_chunk": 24}, {"steps": 1}, True),
    "gpt2_looped1_sp": ("gpt2", {}, {"steps": 1, "feedback": "hidden"}, True),
    # latent thoughts: the learned positions of the interleaved slots, per SP shard
    "gpt2_thoughts1_sp": ("gpt2", {}, {"thoughts": 1}, True),
}


if __name__ == "__main__":
    import argparse

    from _model_helpers import _tp_report, spawn_gloo

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    spawn_gloo(functools.partial(_tp_report, GPT2_TP_CASES, ("gpt2",)), ap.parse_args().out)
    sys.exit(0)

from _model_helpers import single_process  # noqa: E402,F401  (pytest fixture)

from ponder_pt.config.schema import ModelConfig  # noqa: E402
from ponder_pt.models import (PonderLM, hf_config_from, load_hf_state_dict,  # noqa: E402
                              to_hf_state_dict)
from ponder_pt.weights.hf_config import model_config_from_hf  # noqa: E402
from zygote import ponder

HF_COMPAT = pytest.mark.hf_compat  # CI runs these again at the oldest declared transformers


def _pair(seed=0, **over):
    cfg = tiny_model_config("gpt2", **over)
    hf = random_hf_model(cfg, seed=seed)
    model = PonderLM(cfg).eval()
    load_hf_state_dict(model, hf.state_dict())
    return cfg, hf, model


# --------------------------------------------------------------------------- TP = 1


@HF_COMPAT
@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("over", [{}, {"ffn_hidden_size": 96, "norm_eps": 1e-6}])
def test_logits_and_loss_match_hf(over):
    cfg, hf, model = _pair(**over)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids, labels, mask = batch(b=2, s=24, seed=1)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
        loss = model(ids, labels=labels, loss_mask=mask)
    assert ours.shape == ref.shape == (2, 24, cfg.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert abs(loss.item() - masked_ce(ref, labels, mask).item()) <= 1e-5


@HF_COMPAT
@pytest.mark.usefixtures("single_process")
def test_positions_and_inputs_embeds_match_hf():
    """Offset position ids pick rows of the learned table; inputs_embeds get no positions
    added before the pass (GPT2Model adds them itself)."""
    _, hf, model = _pair(seed=2)
    ids, _, _ = batch(b=1, s=16, seed=4)
    pos = torch.arange(30, 46).unsqueeze(0)
    with torch.no_grad():
        emb = hf.get_input_embeddings()(ids)
        ref = hf(inputs_embeds=emb, position_ids=pos).logits
        assert (model(inputs_embeds=emb, position_ids=pos) - ref).abs().max().item() <= 1e-5
        assert (model(ids, position_ids=pos) - ref).abs().max().item() <= 1e-5
        with pytest.raises(ValueError, match="learned positions"):
            model(ids, position_ids=pos + 40)  # beyond max_seq_len=64


@HF_COMPAT
@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("K,top_k", [(1, 0), (3, 5)])
def test_pondering_matches_reference_over_hf(K, top_k):
    """DESIGN.md pondering written plainly over HF's GPT2LMHeadModel (each pass on
    inputs_embeds = e_{k-1}, positions added by GPT2Model in every pass) = PonderLM."""
    cfg, hf, _ = _pair(seed=3)
    model = PonderLM(cfg, PonderConfig(steps=K, top_k=top_k)).eval()
    load_hf_state_dict(model, hf.state_dict())
    ids, _, _ = batch(b=2, s=12, seed=5)
    with torch.no_grad():
        ref = ponder_reference(hf.get_input_embeddings().weight,
                               lambda e: hf(inputs_embeds=e).logits, ids, K, top_k=top_k)
        assert (model(ids) - ref).abs().max().item() <= 1e-4
        caches = model.new_caches()  # K+1 caches: prefill then one token at a time
        steps = [model(ids[:, :5], caches=caches)]
        steps += [model(ids[:, t:t + 1], caches=caches) for t in range(5, 12)]
        assert (torch.cat(steps, dim=1) - model(ids)).abs().max().item() <= 1e-5


@HF_COMPAT
@pytest.mark.usefixtures("single_process")
def test_hf_state_dict_and_config_round_trip():
    cfg, hf, model = _pair(seed=5)
    sd = hf.state_dict()
    back = to_hf_state_dict(model)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key
    random_hf_model(cfg, seed=9).load_state_dict(back, strict=True)
    again = model_config_from_hf(hf_config_from(cfg), ModelConfig())
    for field in ("arch", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_size",
                  "rotary_pct", "parallel_residual", "tie_embeddings", "norm_eps",
                  "vocab_size", "max_seq_len"):
        assert getattr(again, field) == getattr(cfg, field), field
    assert hf.config.activation_function == "gelu_new"


@pytest.mark.usefixtures("single_process")
def test_init_is_gpt2_like_and_seeded():
    from ponder_pt.config import load_config

    m = dataclasses.replace(load_config("demo", ["model.preset=gpt2-tiny"]).model,
                            vocab_size=256)
    assert (m.arch, m.rotary_pct, m.tie_embeddings, m.init_method_std) == ("gpt2", 0.0, True,
                                                                           0.02)
    a, b = PonderLM(m, seed=3), PonderLM(m, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    std = {n: p.std().item() for n, p in a.named_parameters() if p.dim() == 2}
    assert abs(std["pos_embed.weight"] - 0.02) < 0.002
    assert abs(std["layers.0.attn.qkv.weight"] - 0.02) < 0.002
    assert abs(std["layers.1.mlp.fc2.weight"] - 0.01) < 0.001  # 0.02 / sqrt(2 L)
    assert a.output.weight is None  # tied head


# --------------------------------------------------------------------------- TP = 2


@pytest.fixture(scope="module")
def tp2_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2_tp") / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--out", str(out)],
                          capture_output=True, text=True, timeout=420, env=env)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"TP worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def test_tp2_logits_and_hf_round_trip(tp2_report):
    """At TP=2 (fused c_attn regrouped per head, then split): HF -> ours -> HF is exact, our
    gathered logits equal HF's, and K=1 pondering decodes with 2 KV caches."""
    r = tp2_report["hf_tp2"]["gpt2"]
    assert r["same_keys"] and r["max_weight_diff"] == 0.0
    assert r["max_logit_diff"] <= 1e-5
    assert r["max_decode_diff"] <= 1e-5


@pytest.mark.parametrize("name", list(GPT2_TP_CASES))
def test_tp2_loss_and_grads_match_tp1(tp2_report, name):
    """Sequence parallel included: each rank adds its shard's positions, the position table's
    grad is summed over TP (hooks, or allreduce_sequence_parallel_grads for *_manual)."""
    r = tp2_report[name]
    assert r["same_params"] and r["tp2_local_vocab_rows"] == 64
    assert r["tp2_sequence_parallel"] == GPT2_TP_CASES[name][3]
    assert r["max_weight_diff"] == 0.0
    assert abs(r["loss_tp1"] - r["loss_tp2"]) <= 1e-5
    assert r["min_grad_norm"] > 0 and r["max_grad_diff"] <= 1e-5


# --------------------------------------------------------------------------- HF in / out


def _stock_gpt2_dir(path, hf, prefixed: bool):
    """An HF GPT-2 directory; prefixed=False writes GPT2Model keys (no `transformer.`, an
    `attn.bias` mask buffer per layer) as the hub's openai-community/gpt2 does."""
    if prefixed:
        hf.save_pretrained(path)
        return path
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    hf.config.save_pretrained(path)
    sd = {k[len("transformer."):]: v.contiguous() for k, v in hf.state_dict().items()
          if k.startswith("transformer.")}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.ones(n, n).tril().view(1, 1, n, n)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


@HF_COMPAT
@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("tp,prefixed", [(1, False), (2, True)])
def test_from_hf_to_hf_round_trip(tp, prefixed, tmp_path):
    from transformers import AutoModelForCausalLM

    from ponder_pt.export import export_full, hf_to_checkpoint, read_checkpoint

    cfg, hf, _ = _pair(seed=6)
    src = _stock_gpt2_dir(str(tmp_path / "src"), hf, prefixed)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    if tp == 1:
        hf_to_checkpoint(src, ckpt, tp=tp, progress=False)
    else:  # the CLI, both ways
        for args in (["from-hf", "--hf", src, "--out", ckpt, "--tp", "2"],
                     ["to-hf", "--checkpoint", ckpt, "--out", out]):
            proc = ponder(["convert", *args,
                           "--quiet"], timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([f for f in os.listdir(os.path.join(ckpt, "step_00000000"))
                if f.startswith("mp_rank_")]) == tp
    cfg2, full, _ = read_checkpoint(ckpt)  # TP shards merged back
    assert (cfg2.model.arch, cfg2.parallel.tp, cfg2.model.rotary_pct) == ("gpt2", tp, 0.0)
    ours = PonderLM(cfg2.model).eval()
    ours.load_state_dict(full, strict=True)
    ids = batch(b=2, s=20, seed=3)[0]
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids) - ref).abs().max().item() <= 1e-5
    if tp == 1:
        export_full(cfg2, full, out, progress=False)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "GPT2LMHeadModel"
    sd0, sd1 = hf.state_dict(), back.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)


@HF_COMPAT
def test_tp_shards_hold_whole_heads():
    """The fused QKV rows (and bias) of TP rank r are exactly heads r*H/tp.. of HF's q, k, v."""
    from ponder_pt.weights.hf_weights import hf_to_full
    from ponder_pt.weights.layout import merge_tp, shard, tp_spec

    cfg = tiny_model_config("gpt2")
    sd = random_hf_model(cfg).state_dict()
    full = hf_to_full(sd, cfg)
    h, d = cfg.hidden_size, cfg.head_dim
    w = sd["transformer.h.0.attn.c_attn.weight"]  # [in, 3h] = [q | k | v]
    parts = [{n: (shard(t, *tp_spec(n, cfg), rank=r, world=2) if tp_spec(n, cfg) else t)
              for n, t in full.items()} for r in range(2)]
    for r in range(2):
        rows = parts[r]["layers.0.attn.qkv.weight"].view(2, 3, d, h)  # 2 local heads
        for j in range(2):
            head = r * 2 + j
            for part in range(3):  # q, k, v
                cols = w[:, part * h + head * d: part * h + (head + 1) * d]
                assert torch.equal(rows[j, part], cols.t())
    merged = merge_tp(parts, cfg)
    assert all(torch.equal(merged[n], full[n]) for n in full)


# --------------------------------------------------------------------------- exports


@HF_COMPAT
def test_pondering_export_generate_cache_exact(bpe_dir, tmp_path):
    """Exports of random GPT-2s, K = 0..3 (K=3 top-k): K=0 is the stock GPT2LMHeadModel, K>0
    our registered / remote-code PonderGPT2ForCausalLM; logits equal ours and KV-cached greedy
    generate() (K+1 caches) equals a cache-free loop, for a left-padded batch and each row."""
    from _export_helpers import stock_check

    from ponder_pt.config import Config
    from ponder_pt.export import export_full
    from ponder_pt.models import full_state_dict, init_single_process

    init_single_process()
    ids = [5, 17, 300, 42, 599, 7, 8, 120, 64, 3]
    rows = [ids, ids[:4], ids[2:9]]
    jobs, natives = [], []
    for steps in (0, 1, 2, 3):
        cfg = Config()
        cfg.model = tiny_model_config("gpt2", vocab_size=640, max_seq_len=64)
        cfg.ponder.steps = steps
        cfg.ponder.top_k = 7 if steps == 3 else 0
        model = PonderLM(cfg.model, cfg.ponder, seed=steps + 1).eval()
        out = str(tmp_path / f"k{steps}")
        export_full(cfg, full_state_dict(model), out, tokenizer_path=bpe_dir, progress=False)
        with torch.no_grad():
            natives.append(model(torch.tensor([ids]), gather_logits=True)[0])
        jobs.append({"path": out, "rows": rows, "n_new": 10})
    for steps, res, native in zip((0, 1, 2, 3), stock_check(jobs), natives):
        if steps == 0:
            assert res["class"] == "GPT2LMHeadModel" and res["module"].startswith("transformers.")
        else:
            assert res["class"] == "PonderGPT2ForCausalLM"
        assert (torch.tensor(res["logits"]) - native).abs().max().item() <= 1e-5
        assert res["cached"] == res["nocache"]
        assert [res["single"][i] for i in range(3)] == res["cached"]


@HF_COMPAT
def test_early_exit_backbone_runs_pondering_gpt2_export(bpe_dir, tmp_path):
    """load_backbone on a K=2 GPT-2 export: the last layer's pooled vector gives the exported
    model's forward logits at the last real token (start() runs the 2 pondering passes)."""
    from _ee_helpers import pondering_export

    from ponder_pt.early_exit.backbones import load_backbone

    path = pondering_export(str(tmp_path / "exp"), bpe_dir, arch="gpt2", steps=2)
    bb, tok = load_backbone(path, dtype=torch.float32)
    assert bb.kind == "gpt2" and bb.ponder_steps == 2
    enc = tok(["The quick brown fox jumps over the dog.", "Hello world"], padding=True,
              return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any()
    rows, last = torch.arange(2), mask.sum(-1) - 1
    with torch.no_grad():
        pooled = bb(ids, mask)
        ref = bb.model(ids, attention_mask=mask, use_cache=False).logits[rows, last]
    assert (bb.lm_head(pooled[-1]) - ref).abs().max().item() <= 1e-5


def test_finetune_caps_max_length_at_gpt2_positions(bpe_dir, tmp_path, capsys):
    """GPT-2's learned positions (64 in this export) bound train.max_length: a longer setting
    is capped with a one-line notice instead of indexing past wpe inside the model."""
    from _ee_helpers import pondering_export

    from ponder_pt.early_exit.config import load_finetune_config
    from ponder_pt.early_exit.finetune import build

    backbone = pondering_export(str(tmp_path / "exp"), bpe_dir, arch="gpt2", steps=1)
    task = tmp_path / "long"
    task.mkdir()
    sentence = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    for split in ("train", "validation"):
        (task / f"{split}.jsonl").write_text("".join(
            json.dumps({"sentence": sentence, "label": i % 2}) + "\n" for i in range(4)))
    (task / "task.json").write_text(json.dumps({"name": "long", "text_keys": ["sentence"],
                                                "num_labels": 2, "metric": "accuracy"}))
    cfg = load_finetune_config("pabee", None, ["train.max_length=256"], validate=False,
                               backbone=backbone, task=str(task), out=str(tmp_path / "ft"))
    model, _, _, train, _ = build(cfg)
    err = capsys.readouterr().err
    assert "train.max_length 256 is more than the backbone's 64 positions; using 64" in err
    assert cfg.train.max_length == 64 and train.truncated == 4  # counted, then reported
    batch = train.collate([train[i] for i in range(len(train))])
    assert batch["input_ids"].shape[1] == 64
    with torch.no_grad():
        loss, _ = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.isfinite(loss)


def test_finetune_on_gpt2_export(bpe_dir, tmp_path):
    from ponder_pt.early_exit.toy import write_polarity_task
    from _ee_helpers import pondering_export

    task = write_polarity_task(str(tmp_path / "polarity"), n_train=64, n_valid=16,
                               negation=0.0)
    backbone = pondering_export(str(tmp_path / "exp"), bpe_dir, arch="gpt2", steps=1)
    out = str(tmp_path / "ft")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = ponder(
        ["finetune", "--backbone", backbone, "--task", task,
         "--exit", "pabee", "--out", out, "--set", "train.max_steps=3", "--set",
         "train.batch_size=16", "--set", "train.max_length=64", "--set", "eval.batch1=false",
         "--set", "eval.max_eval_samples=16"],
        timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "eval.json")) as fh:
        doc = json.load(fh)
    assert doc["num_samples"] == 16 and doc["strategy"] == "pabee" and doc["num_layers"] == 2


# --------------------------------------------------------------------------- training


GPT2_TRAIN = ["model.preset=gpt2-tiny"]  # on top of train_utils.TINY (K=2, pauses)


@pytest.fixture(scope="module")
def gpt2_reference(prepared, bpe_dir, tmp_path_factory):
    from train_utils import metrics, run_train

    run = tmp_path_factory.mktemp("gpt2_ref")
    run_train(str(run), prepared, bpe_dir, GPT2_TRAIN)
    return metrics(str(run))


@pytest.mark.parametrize("layout", [
    ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"],
    ["parallel.pp=2", "model.vocab_chunk=200"],
], ids=["tp2_sp_zero2", "pp2_vocab_chunk"])
def test_parallel_training_matches_single_process_and_exports(gpt2_reference, prepared,
                                                              bpe_dir, tmp_path, layout):
    """K=2 pondering GPT-2 with pauses: TP=2 + sequence parallel, and PP=2 (the position table
    tied across stages with the embedding) train like one process; the final checkpoint
    (TP shards merged / the pipeline's tied shared weights) exports to PonderGPT2ForCausalLM
    with our logits."""
    from test_train import _assert_same
    from train_utils import metrics, run_train
    from transformers import AutoModelForCausalLM

    from ponder_pt.export import export_full, read_checkpoint
    from ponder_pt.export.hf_auto import from_pretrained
    from ponder_pt.models import init_single_process

    ckpt = str(tmp_path / "ckpt")
    run_train(str(tmp_path), prepared, bpe_dir,
              [*GPT2_TRAIN, *layout, f"checkpoint.dir={ckpt}", "checkpoint.interval=4"],
              nproc=2)
    _assert_same(metrics(str(tmp_path)), gpt2_reference)
    cfg, full, _ = read_checkpoint(ckpt)
    assert cfg.model.arch == "gpt2" and full["pos_embed.weight"].shape == (256, 32)
    assert "output.weight" not in full  # tied
    init_single_process()
    cfg.model.vocab_chunk = 0
    ours = PonderLM(cfg.model, cfg.ponder).eval()
    ours.load_state_dict(full, strict=True)
    out = str(tmp_path / "hf")
    export_full(cfg, full, out, progress=False)
    hf = from_pretrained(AutoModelForCausalLM, out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "PonderGPT2ForCausalLM"
    ids = batch(b=1, s=16, seed=7, vocab=cfg.model.vocab_size)[0]
    with torch.no_grad():
        assert (hf(ids, use_cache=False).logits - ours(ids)).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------- validation


def _tiny_like(m):
    """A 2-layer, hidden-64 model with what decides exportability kept: arch, rotary_pct,
    residual layout, tying, GQA (kv < heads), norm eps."""
    gqa = m.kv_heads < m.num_heads
    heads = 4
    return dataclasses.replace(m, preset=None, num_layers=2, hidden_size=64, num_heads=heads,
                               num_kv_heads=2 if gqa else None, ffn_hidden_size=128,
                               max_seq_len=64, vocab_size=128, init_method_std=0.05)


@HF_COMPAT
def test_every_preset_times_every_arch_validates_only_if_it_exports():
    """For each run preset and each arch: either validation refuses, or a tiny model of that
    config exports to the stock HF class with equal logits; the exporter refuses exactly the
    configs whose export rules (config/exportable.py) fail."""
    from ponder_pt.config import RUN_PRESETS, load_config, problems
    from ponder_pt.config.exportable import export_problems
    from ponder_pt.config.validate import ARCHS
    from ponder_pt.models import init_single_process
    from ponder_pt.weights.hf_weights import hf_to_full

    init_single_process()
    exported, refused, checked = {}, 0, set()
    for preset in sorted(RUN_PRESETS):
        for arch in ARCHS:
            cfg = load_config(preset, [f"model.arch={arch}"], validate=False)
            found = problems(cfg)
            rules = export_problems(cfg.model)
            assert set(rules) <= set(found), (preset, arch)  # validation applies the rules
            tiny = _tiny_like(cfg.model)
            tiny_rules = export_problems(tiny)
            assert len(tiny_rules) == len(rules)  # the shrinking keeps what matters
            key = tuple(sorted(dataclasses.asdict(tiny).items()))
            if key not in checked:  # the exporter refuses exactly when the rules do
                checked.add(key)
                try:
                    hf_config_from(tiny)
                    assert not tiny_rules, (preset, arch, tiny_rules)
                except ValueError as exc:
                    assert tiny_rules and all(r in str(exc) for r in tiny_rules), exc
            if found:
                refused += 1
                continue
            assert not export_problems(tiny), (preset, arch)
            if key not in exported:  # logits of the stock HF class = ours
                hf = random_hf_model(tiny, seed=1)
                ours = PonderLM(tiny).eval()
                ours.load_state_dict(hf_to_full(hf.state_dict(), tiny), strict=True)
                ids = batch(b=1, s=12, seed=2)[0]
                with torch.no_grad():
                    exported[key] = (ours(ids) - hf(ids).logits).abs().max().item()
                assert exported[key] <= 1e-5, (preset, arch, exported[key])
    # the combinations the issue names
    assert refused > 0 and len(exported) >= 3
    msg = "\n".join(problems(load_config("pythia-14m", ["model.arch=llama"], validate=False)))
    assert "model.rotary_pct=0.25" in msg and "partial rotary" in msg
    msg = "\n".join(problems(load_config("gpt2-small", ["data.seq_len=2048"], validate=False)))
    assert "data.seq_len=2048 exceeds model.max_seq_len=1024" in msg
    for bad, text in [("model.parallel_residual=true", "GPT-2 blocks are sequential"),
                      ("model.tie_embeddings=false", "model.tie_embeddings: GPT-2 ties"),
                      ("model.rotary_pct=0.25", "no rotary"),
                      ("model.num_kv_heads=4", "GPT-2 has no grouped-query attention")]:
        assert any(text in p for p in problems(load_config("gpt2-small", [bad],
                                                           validate=False))), bad
    assert not problems(load_config("pondergpt2-xl"))


@pytest.mark.usefixtures("single_process")
def test_presets_and_parameter_counts():
    from ponder_pt.config import load_config
    from ponder_pt.engine import estimate
    from ponder_pt.engine.flops import param_count

    shapes = {"small": (12, 768, 12, 124_439_808), "medium": (24, 1024, 16, 354_823_168),
              "large": (36, 1280, 20, 774_030_080), "xl": (48, 1600, 25, 1_557_611_200)}
    for size, (layers, hidden, heads, params) in shapes.items():
        plain, ponder = load_config(f"gpt2-{size}"), load_config(f"pondergpt2-{size}")
        m = plain.model
        assert (m.arch, m.num_layers, m.hidden_size, m.num_heads, m.max_seq_len) == (
            "gpt2", layers, hidden, heads, 1024)
        assert plain.ponder.steps == 0 and ponder.ponder.steps == 3 and ponder.model == m
        assert param_count(m, 50257)["total"] == params  # OpenAI's GPT-2 parameter counts
    tiny = dataclasses.replace(load_config("demo", ["model.preset=gpt2-tiny"]).model,
                               vocab_size=256)
    n = PonderLM(tiny).num_parameters()  # the position table counts, the tied head does not
    assert n == param_count(tiny, 256)["total"] == (
        tiny.num_layers * estimate.block_params(tiny) + estimate.shared_params(tiny, 256))
