"""Evaluate one trained run of the study, the same code and the same held-out data for every run.

    python -m experiments.evaluate --run-dir DIR --data DATA_DIR [--curve-windows N] [--pauses]

For every checkpoint tag in DIR/ckpt (the curve; all windows unless --curve-windows) and, in
full, for the last one:

* validation loss / perplexity on the fixed held-out windows (`windows.npy`, [N, L+1]): mean
  next-token cross-entropy over all N·L targets, in nats, no pauses anywhere. A pause-trained
  model is scored exactly like the others (its pause row is just never an input);
* for pause-trained runs, the same windows with pauses inserted at the training rate by the
  training code itself (`ponder_pt.data.pause.make_sample`, split "valid"), the loss over the
  non-pause targets only;
* the held-out next-token task (`task.npy`, [n, P+T]): input = prompt (P tokens) + M `<pause>`
  ids (`ponder_pt.inference.append_pauses`) + the first T-1 targets (teacher forcing); the
  outputs at the last pause and after it are scored against the T targets: mean NLL per target
  token and top-1 accuracy (argmax over the tokenizer's real rows, as generation does). M = 0
  for every run; M in eval.pause_counts for pause-trained runs.

Models are rebuilt from the native checkpoints (`ponder_pt.export.native.read_checkpoint`) as
one-process `PonderLM`s, the forward the trainer ran. Writes DIR/eval.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

PAUSE_EVAL_SEED = 4321  # pause positions of the pause-inserted validation windows


def load_model(ckpt_dir: str, tag: str, device: str):
    from ponder_pt.export.native import read_checkpoint
    from ponder_pt.models import PonderLM, init_single_process

    init_single_process()
    cfg, full, tag = read_checkpoint(ckpt_dir, tag)
    cfg.parallel.tp, cfg.model.activation_checkpointing = 1, "none"
    model = PonderLM(cfg.model, cfg.ponder, thoughts=cfg.thoughts, pause=cfg.pause).eval()
    missing, unexpected = model.load_state_dict(full, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"{ckpt_dir}/{tag}: missing {missing}, unexpected {unexpected}")
    return cfg, model.to(device)


def model_logits(model, ids, exact: bool = True):
    """Full-vocabulary logits [b, s, V]. A latent-thoughts model computes its thoughts
    exactly through a cache (what it does at inference), or with exact=False by training's
    Jacobi iterations (`thoughts.jacobi_iters`)."""
    if exact and model.thoughts_cfg.count:
        return model(ids, caches=model.new_caches(), gather_logits=True)
    return model(ids, gather_logits=True)


@torch.no_grad()
def window_loss(model, windows: np.ndarray, batch: int, device: str, pause_id=None,
                pause_rate: float = 0.0, exact: bool = True) -> dict:
    """Token-weighted next-token loss over `windows` [N, L+1]; with pause_rate > 0, pauses are
    inserted by the training code and pause targets excluded (exact: `model_logits`)."""
    from ponder_pt.data.pause import make_sample

    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        rows = [make_sample(w, pause_id=pause_id, pause_rate=pause_rate, seed=PAUSE_EVAL_SEED,
                            index=start + i, split="valid")
                for i, w in enumerate(windows[start:start + batch])]
        tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows])).to(device)
        labels = torch.from_numpy(np.stack([r["labels"] for r in rows])).to(device)
        mask = torch.from_numpy(np.stack([r["loss_mask"] for r in rows])).to(device)
        logits = model_logits(model, tokens, exact).float()
        per = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        total += float((per.double() * mask.flatten().double()).sum())
        count += int(mask.sum())
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def next_token_task(model, task: np.ndarray, prompt_len: int, pauses: int, pause_id,
                    vocab_rows: int, batch: int, device: str) -> dict:
    """Target NLL / accuracy of the held-out task with `pauses` pauses after each prompt."""
    from ponder_pt.inference.pauses import append_pauses

    T = task.shape[1] - prompt_len
    nll = correct = first = n = 0.0
    for start in range(0, len(task), batch):
        part = task[start:start + batch]
        inputs = [append_pauses(row[:prompt_len].tolist(), pauses, pause_id)
                  + row[prompt_len:-1].tolist() for row in part]
        ids = torch.tensor(inputs, device=device)
        logits = model_logits(model, ids).float()
        at = prompt_len + pauses - 1  # the last pause (or prompt token) predicts target 0
        z = logits[:, at:at + T]
        target = torch.from_numpy(part[:, prompt_len:]).to(device)
        nll += float(F.cross_entropy(z.flatten(0, 1), target.flatten(), reduction="sum"))
        hit = z[..., :vocab_rows].argmax(-1) == target
        correct += float(hit.sum())
        first += float(hit[:, 0].sum())
        n += len(part)
    per_token = nll / (n * T)
    return {"nll": per_token, "ppl": math.exp(min(per_token, 50.0)), "acc": correct / (n * T),
            "acc_first": first / n, "examples": int(n), "targets_per_example": T}


def evaluate_run(run_dir: str, data_dir: str, curve_windows: int, pause_counts: list[int],
                 batch: int, device: str, keep_checkpoints: bool, log=print) -> dict:
    from ponder_pt.weights.files import list_tags
    from ponder_pt.engine.flops import param_count, run_flops_per_token

    with open(os.path.join(data_dir, "data.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    windows = np.load(os.path.join(data_dir, "windows.npy"))
    task = np.load(os.path.join(data_dir, "task.npy"))
    ckpt = os.path.join(run_dir, "ckpt")
    tags = sorted(list_tags(ckpt), key=lambda t: int(t.split("_")[-1]))
    if not tags:
        raise FileNotFoundError(f"{ckpt}: no checkpoints to evaluate")
    t0 = time.perf_counter()
    curve, out = [], {}
    for i, tag in enumerate(tags):
        cfg, model = load_model(ckpt, tag, device)
        step = int(tag.split("_")[-1])
        tokens = step * cfg.train.global_batch * cfg.data.seq_len
        fpt = run_flops_per_token(cfg)
        last = i == len(tags) - 1
        subset = windows if last or curve_windows <= 0 else windows[:curve_windows]
        ev = window_loss(model, subset, batch, device)
        curve.append({"step": step, "tokens": tokens, "flops": tokens * fpt,
                      "valid_loss": ev["loss"], "windows": len(subset)})
        log(f"  {os.path.basename(run_dir)} {tag}: valid loss {ev['loss']:.4f}")
        if not last:
            continue
        out["final"] = {"tag": tag, "step": step, "tokens": tokens, "flops": tokens * fpt,
                        "flops_per_token": fpt, "valid_loss": ev["loss"], "valid_ppl": ev["ppl"],
                        "valid_tokens": ev["tokens"]}
        if cfg.thoughts.count:  # training's approximation on the same windows: the gap
            jac = window_loss(model, windows, batch, device, exact=False)
            out["final"].update(valid_loss_jacobi=jac["loss"],
                                jacobi_iters=cfg.thoughts.jacobi_iters)
        out["params"] = param_count(cfg.model, cfg.model.vocab_size)
        out["config"] = {"ponder_steps": cfg.ponder.steps, "feedback": cfg.ponder.feedback,
                         "thoughts": cfg.thoughts.count, "pause_every": cfg.pause.every_token,
                         "pause_rate": cfg.pause.rate, "seed": cfg.train.seed,
                         "iters": cfg.train.iters, "seq_len": cfg.data.seq_len,
                         "global_batch": cfg.train.global_batch}
        pause_id = cfg.pause.token_id if cfg.pause.rate > 0 else None
        if pause_id is not None:
            pv = window_loss(model, windows, batch, device, pause_id, cfg.pause.rate)
            out["pause_valid"] = {"valid_loss": pv["loss"], "valid_ppl": pv["ppl"],
                                  "valid_tokens": pv["tokens"], "rate": cfg.pause.rate}
        counts = pause_counts if pause_id is not None else [0]
        out["task"] = {str(m): next_token_task(model, task, meta["prompt_len"], m, pause_id,
                                               meta["vocab_rows"], batch, device)
                       for m in counts}
    out["curve"] = curve
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if not keep_checkpoints:
        import shutil

        for tag in tags[:-1]:
            shutil.rmtree(os.path.join(ckpt, tag), ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--data", required=True, help="the study's work/data directory")
    ap.add_argument("--curve-windows", type=int, default=0,
                    help="windows for the intermediate checkpoints (0 = all, as the last one)")
    ap.add_argument("--pause-counts", default="0,2,10")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--extra", default="{}", help="JSON merged into eval.json (the run spec)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = evaluate_run(args.run_dir, args.data, args.curve_windows,
                       [int(x) for x in args.pause_counts.split(",") if x != ""], args.batch,
                       args.device, args.keep_checkpoints)
    out.update(json.loads(args.extra))
    path = os.path.join(args.run_dir, "eval.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
