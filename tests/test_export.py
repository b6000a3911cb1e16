"""`ponder-pt convert to-hf / from-hf`: weights round trips, real training checkpoints of every
layout, stock transformers and our remote-code pondering class."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _export_helpers import stock_check, trained  # noqa: F401
from huggingface_hub import ModelCard
from _model_helpers import random_hf_model, single_process, tiny_model_config  # noqa: F401

from ponder_pt.config import Config
from ponder_pt.export import export_full, hf_to_checkpoint, read_checkpoint
from ponder_pt.models import PonderLM, full_state_dict
from ponder_pt.weights.hf_weights import hf_to_full
from ponder_pt.weights.layout import merge_tp, shard, tp_spec
from zygote import ponder

# hf_compat: CI runs these again at the oldest declared transformers
pytestmark = [pytest.mark.usefixtures("single_process"), pytest.mark.hf_compat]


def _ids(vocab, s=20, seed=3):
    return torch.randint(0, vocab, (2, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_to_ours_to_hf_round_trip(arch, tp, tmp_path):
    from transformers import AutoModelForCausalLM

    mcfg = tiny_model_config(arch)
    hf = random_hf_model(mcfg, seed=5)
    # where `from_pretrained` caches a Hub model: the export's card names it as base_model
    src = str(tmp_path / "hub" / f"models--EleutherAI--tiny-{arch}" / "snapshots" / "0a1b2c")
    hf.save_pretrained(src)
    ckpt = str(tmp_path / "ckpt")
    cfg = hf_to_checkpoint(src, ckpt, tp=tp, progress=False)  # TP-sharded mp_rank files
    assert cfg.model.arch == arch and cfg.parallel.tp == tp
    assert len([f for f in os.listdir(os.path.join(ckpt, "step_00000000"))
                if f.startswith("mp_rank_")]) == tp
    cfg2, full, _ = read_checkpoint(ckpt)  # TP shards merged back
    ours = PonderLM(cfg2.model).eval()
    ours.load_state_dict(full, strict=False)
    ids = _ids(mcfg.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids, gather_logits=True) - ref).abs().max().item() <= 1e-5
    out = str(tmp_path / "hf")
    export_full(cfg2, full, out, progress=False)
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.base_model == f"EleutherAI/tiny-{arch}" and card.data.tags == ["ponder-pt"]
    hub = f"EleutherAI/tiny-{arch}"
    assert f"Initialised from: [{hub}](https://huggingface.co/{hub}) `{src}`" in card.text
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    sd0, sd1 = hf.state_dict(), back.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max().item() <= 1e-5


def test_tp_shard_merge_inverts_megatron_split():
    """merge_tp(shard per rank) is the identity for every parameter (llama: strided fc1)."""
    for arch in ("gpt_neox", "llama"):
        mcfg = tiny_model_config(arch)
        full = hf_to_full(random_hf_model(mcfg).state_dict(), mcfg)
        parts = [{n: (shard(t, *tp_spec(n, mcfg), rank=r, world=2) if tp_spec(n, mcfg)
                      else t) for n, t in full.items()} for r in range(2)]
        merged = merge_tp(parts, mcfg)
        assert all(torch.equal(merged[n], full[n]) for n in full)


# ------------------------------------------------------------------ real checkpoints

IDS = [5, 17, 300, 42, 599, 7, 8, 120, 64, 3, 11, 250]
NAMES = ["plain", "ponder", "tp2", "zero3", "pp2"]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):  # noqa: F811
    """Every run exported (the CLI for the TP=2 one), checked in one stock-transformers process."""
    from ponder_pt.export import checkpoint_to_hf

    root = tmp_path_factory.mktemp("exported")
    dirs = {}
    for name in NAMES:
        out = dirs[name] = str(root / name)
        if name == "tp2":
            proc = ponder(["convert", "to-hf",
                           "--checkpoint", trained[name], "--out", out, "--quiet"],
                          timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            checkpoint_to_hf(trained[name], out, progress=False)
    jobs = [{"path": dirs[n], "rows": [IDS, IDS[3:9]], "n_new": 6} for n in NAMES]
    return dirs, dict(zip(NAMES, stock_check(jobs)))


@pytest.mark.parametrize("name", NAMES)
def test_training_checkpoint_exports_and_matches(trained, exported, name):  # noqa: F811
    from ponder_pt.inference import NativeModel

    dirs, results = exported
    out, res = dirs[name], results[name]
    cfg, _, _ = read_checkpoint(trained[name])
    with open(os.path.join(out, "config.json")) as fh:
        hf_cfg = json.load(fh)
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    if cfg.ponder.steps:
        assert {"modeling_ponder.py", "configuration_ponder.py"} <= files
        assert hf_cfg["ponder_steps"] == cfg.ponder.steps and "auto_map" in hf_cfg
        assert res["class"].startswith("Ponder")
    else:  # stock class, loaded without ponder_pt
        assert hf_cfg["architectures"] == ["GPTNeoXForCausalLM"] and "auto_map" not in hf_cfg
        assert res["class"] == "GPTNeoXForCausalLM" and res["module"].startswith("transformers.")
    if cfg.pause.rate > 0:
        assert hf_cfg["pause_token_id"] == cfg.pause.token_id
        assert hf_cfg["default_pauses"] == cfg.pause.inference_pauses
    _check_card(out, cfg)
    native = NativeModel(trained[name]).logits(torch.tensor([IDS]))[0]
    assert (torch.tensor(res["logits"]) - native).abs().max().item() <= 1e-5
    assert res["cached"] == res["nocache"]  # left-padded batch: K+1 caches vs no cache
    assert res["single"][0] == res["cached"][0]  # the unpadded row alone


def _check_card(out: str, cfg) -> None:
    """The export's README.md: Hub metadata that huggingface_hub parses, and the facts."""
    from ponder_pt import __version__
    from ponder_pt.config import parse_blend

    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation" and card.data.base_model is None
    assert card.data.tags == (["ponder-pt"] + ["pondering"] * bool(cfg.ponder.steps)
                              + ["pause-tokens"] * (cfg.pause.rate > 0))
    text = card.text
    assert f"ponder-pt {__version__}" in text and f"{cfg.model.num_layers} layers" in text
    assert f"{2 * cfg.train.global_batch * cfg.data.seq_len:,} tokens" in text  # 2 steps
    assert all(f"`{prefix}`" in text for prefix, _ in parse_blend(list(cfg.data.train)))
    assert "identical ids" in text  # the tokenizer check
    if cfg.ponder.steps:  # registered classes, or the remote-code copy
        assert f"K = {cfg.ponder.steps} extra passes" in text
        assert "from_pretrained(AutoModelForCausalLM" in text and "trust_remote_code=True" in text
    else:
        assert "trust_remote_code" not in text and "K = 0" in text
    if cfg.pause.rate > 0:
        assert (f"`<pause>` = id {cfg.pause.token_id}" in text
                and f"M = {cfg.pause.inference_pauses} pauses are appended" in text)


def test_weights_identical_across_layouts(trained):  # noqa: F811
    """The TP=2 run and the TP=1 run start from the same seeded weights and see the same data:
    merged TP shards have the TP=1 names and shapes and agree to training-noise level."""
    _, a, _ = read_checkpoint(trained["ponder"])
    _, b, _ = read_checkpoint(trained["tp2"])
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape
        assert (a[k] - b[k]).abs().max().item() < 1e-3, k


def test_pondering_export_generate_cache_exact(bpe_dir, tmp_path):
    """Random pondering models K=1..3 (K=2 LLaMA, K=3 top-k): the exported remote-code class
    matches native logits, and KV-cached greedy generate() equals a cache-free loop token for
    token, for a left-padded batch and for each row alone."""
    ids = [5, 17, 300, 42, 599, 7, 8, 120, 64, 3]
    rows = [ids, ids[:4], ids[2:9]]
    jobs, natives = [], []
    for steps in (1, 2, 3):
        cfg = Config()
        arch = "llama" if steps == 2 else "gpt_neox"
        cfg.model = tiny_model_config(arch, vocab_size=640, max_seq_len=128)
        cfg.ponder.steps = steps
        cfg.ponder.top_k = 7 if steps == 3 else 0
        model = PonderLM(cfg.model, cfg.ponder, seed=steps).eval()
        out = str(tmp_path / f"k{steps}")
        export_full(cfg, full_state_dict(model), out, tokenizer_path=bpe_dir, progress=False)
        with torch.no_grad():
            natives.append(model(torch.tensor([ids]), gather_logits=True)[0])
        jobs.append({"path": out, "rows": rows, "n_new": 10})
    for res, native in zip(stock_check(jobs), natives):
        assert res["class"].startswith("Ponder")
        assert (torch.tensor(res["logits"]) - native).abs().max().item() <= 1e-5
        assert res["cached"] == res["nocache"]
        assert [res["single"][i] for i in range(3)] == res["cached"]
        assert res["sampled_shape"] == [3, 14]


@pytest.mark.slow
def test_from_hf_cli_then_train_from_it(trained, prepared, bpe_dir, tmp_path):  # noqa: F811
    """HF dir -> `convert from-hf --tp 2 --set ponder.steps=1` (a plain model made pondering)
    -> a TP=2 training run initialised from it (checkpoint.init_from) with lr=1e-30 (below
    fp32 resolution) keeps exactly those weights; the from-hf output itself runs with
    `ponder-pt generate`."""
    from train_utils import run_train

    from ponder_pt.export import checkpoint_to_hf

    hf = str(tmp_path / "hf")
    checkpoint_to_hf(trained["plain"], hf, progress=False)
    conv = str(tmp_path / "conv")
    proc = ponder(["convert", "from-hf", "--hf", hf,
                   "--out", conv, "--tp", "2", "--set", "ponder.steps=1", "--quiet"],
                  timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg, init, _ = read_checkpoint(conv)
    assert cfg.ponder.steps == 1 and cfg.parallel.tp == 2
    assert cfg.checkpoint.init_from == os.path.abspath(conv)
    _, plain, _ = read_checkpoint(trained["plain"])
    assert all(torch.equal(init[k], plain[k]) for k in plain)
    gen = ponder(["generate", "--model", conv,
                  "--prompt", "x = ", "--greedy", "--json", "--max-new-tokens", "3"],
                 timeout=300)
    assert gen.returncode == 0 and len(json.loads(gen.stdout)["token_ids"]) <= 3

    run = str(tmp_path / "run")
    run_train(run, prepared, bpe_dir, [f"checkpoint.init_from={conv}", "ponder.steps=1",
                                       "pause.rate=0", "parallel.tp=2", "train.iters=1",
                                       "train.lr=1e-30", "train.min_lr=0",
                                       f"checkpoint.dir={run}/ckpt", "checkpoint.interval=1"],
              nproc=2)
    _, after, _ = read_checkpoint(os.path.join(run, "ckpt"))
    for k in init:
        assert torch.equal(after[k], init[k]), k


def test_sentencepiece_tokenizer_export(sp_dir, tmp_path):
    from transformers import AutoTokenizer

    from ponder_pt.export.to_hf import save_tokenizer
    from ponder_pt.tokenizer import load_tokenizer

    out = str(tmp_path / "tok")
    os.makedirs(out)
    ours = load_tokenizer(sp_dir)
    save_tokenizer(sp_dir, out, pause_id=ours.vocab_size)
    hf = AutoTokenizer.from_pretrained(out)
    text = "Return the value of the file."
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.convert_tokens_to_ids("<pause>") == ours.vocab_size
