"""`ponder-pt demo` / `make demo`: the embedded end-to-end run on a CPU.

embedded corpus -> BPE tokenizer -> indexed dataset (2 workers) -> packed samples with pause
tokens -> a tiny PonderPythia (K=1) with pause tokens trained by 2 processes under DeepSpeed
ZeRO-1 (the real `ponder-pt train` launch path) -> validation loss -> loss-curve PNG ->
Hugging Face export (the pondering class registered by ponder-pt) -> a sample generated from
the export with the K+1 KV caches and the model's default pauses, checked token for token
against native generation from the same checkpoint (the demo fails if they differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from .config import load_config


class DemoCheckFailed(RuntimeError):
    """The demo's own end-to-end check did not hold."""


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _stage(name: str):
    print(f"\n=== {name}", flush=True)
    return time.perf_counter()


def run_demo(out_dir: str = "demo_out", quick: bool = False) -> dict:
    from .data.corpus import write_corpus
    from .data.inspect import iter_records, render
    from .data.prepare import prepare
    from .data.samples import datasets_for_config
    from .tokenizer import load_tokenizer, train_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    summary: dict = {}

    t = _stage("1/6 embedded corpus: Python standard-library docstrings")
    corpus = os.path.join(out_dir, "corpus.jsonl")
    info = write_corpus(corpus, max_bytes=300_000 if quick else 2_000_000)
    print(f"{info['documents']} documents, {info['characters']:,} characters "
          f"({time.perf_counter() - t:.1f}s)")
    summary["corpus"] = info

    t = _stage("2/6 tokenizer: byte-level BPE")
    tok_dir = os.path.join(out_dir, "tokenizer")
    train_tokenizer([corpus], 1024 if quick else 4096, tok_dir, show_progress=False)
    tok = load_tokenizer(tok_dir)
    summary["tokenizer"] = tok.describe()
    print(json.dumps(summary["tokenizer"]) + f" ({time.perf_counter() - t:.1f}s)")

    t = _stage("3/6 data prepare: indexed dataset with 2 workers")
    prefix = os.path.join(out_dir, "data", "corpus")
    stats = prepare([corpus], tok_dir, prefix, workers=2, progress=True)
    print(f"{stats.documents_written} documents, {stats.tokens:,} tokens, "
          f"{stats.tokens_per_s:,.0f} tok/s, {stats.rejected} rejected "
          f"({time.perf_counter() - t:.1f}s)")
    summary["prepare"] = {k: getattr(stats, k) for k in
                          ("documents_in", "documents_written", "rejected", "tokens")}

    t = _stage("4/6 samples: packed, blended-ready, with pause tokens (pause.rate=0.1)")
    run_dir = os.path.join(out_dir, "run")
    overrides = [f"data.train=[{prefix}]", f"data.tokenizer={tok_dir}",
                 f"data.cache_dir={os.path.join(out_dir, 'data', 'cache')}",
                 f"run.dir={run_dir}"]
    if quick:
        overrides += ["train.iters=20", "train.eval_interval=10", "train.warmup=2"]
    cfg = load_config("demo", overrides)
    tr = cfg.train
    valid_samples = (tr.iters // tr.eval_interval + 1) * tr.eval_iters * tr.global_batch
    train_ds, valid_ds, _ = datasets_for_config(cfg, tok, (tr.iters * tr.global_batch,
                                                           valid_samples, 0))
    for record in iter_records(train_ds, 0, 2):
        print(render(record, tok, train_ds.pause_id)[:900])
    summary["samples"] = {"train": len(train_ds), "valid": len(valid_ds) if valid_ds else 0,
                          "seq_len": cfg.data.seq_len, "pause_id": train_ds.pause_id}
    print(f"train samples {len(train_ds)}, valid samples {summary['samples']['valid']} "
          f"({time.perf_counter() - t:.1f}s)")

    t = _stage(f"5/6 train: tiny PonderPythia (K={cfg.ponder.steps}, pause rate "
               f"{cfg.pause.rate}), 2 processes, ZeRO-{cfg.parallel.zero_stage}, "
               f"{cfg.train.iters} steps")
    from .train import torchrun_command
    from .engine.metrics import read_metrics

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if os.path.isdir(run_dir):
        import shutil

        shutil.rmtree(run_dir)  # the demo always starts afresh
    code = subprocess.call(torchrun_command(2, "demo", overrides), env=env)
    if code != 0:
        raise RuntimeError(f"demo training exited with code {code}")
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    train_losses = [r["loss"] for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_loss" in r]
    summary["train"] = {"steps": len(train_losses), "first_loss": train_losses[0],
                        "last_loss": train_losses[-1], "valid_loss": valid[-1]["valid_loss"],
                        "valid_ppl": valid[-1]["valid_ppl"],
                        "loss_curve": os.path.join(run_dir, "loss.png"),
                        "seconds": round(time.perf_counter() - t, 1)}
    print(f"train loss {train_losses[0]:.3f} -> {train_losses[-1]:.3f}; validation loss "
          f"{valid[-1]['valid_loss']:.3f} (ppl {valid[-1]['valid_ppl']:.1f}); loss curve "
          f"{summary['train']['loss_curve']} ({time.perf_counter() - t:.0f}s)")

    t = _stage("6/6 export to Hugging Face and generate")
    from .export import checkpoint_to_hf
    from .inference import generate_text, load_model

    hf_dir = os.path.join(out_dir, "hf")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tag = checkpoint_to_hf(ckpt_dir, hf_dir, progress=False)
    prompt = "Return the number of"
    sample = generate_text(load_model(hf_dir), prompt, max_new_tokens=40, greedy=True)
    print(f"exported {tag} to {hf_dir} (AutoModelForCausalLM.from_pretrained(...) with "
          f"ponder-pt installed); greedy sample after {sample['pauses']} pauses:")
    print(f"  {prompt}{sample['text']}")
    # the demo checks itself: the export must generate exactly what the checkpoint does
    native = generate_text(load_model(ckpt_dir, tag=tag), prompt, max_new_tokens=40, greedy=True)
    if native["token_ids"] != sample["token_ids"]:
        raise DemoCheckFailed(
            f"the export generated different tokens than native generation from {ckpt_dir}/{tag}"
            f" (transformers {_transformers_version()}):\n  export: {sample['token_ids']}\n"
            f"  native: {native['token_ids']}")
    print(f"native generation from {tag} gives the same {len(native['token_ids'])} tokens")
    summary["export"] = {"dir": hf_dir, "tag": tag, "prompt": prompt, "sample": sample["text"],
                         "token_ids": sample["token_ids"], "matches_native": True,
                         "pauses": sample["pauses"], "seconds": round(time.perf_counter() - t, 1)}
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    print(f"\ndemo finished: {os.path.join(out_dir, 'summary.json')}")
    return summary
