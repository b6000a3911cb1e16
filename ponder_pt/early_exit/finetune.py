"""`ponder-pt finetune`: fine-tune a backbone with exit heads on a GLUE-style task.

Runs in one process or data-parallel under DeepSpeed (ZeRO 0-2): `ponder-pt finetune
--nproc N`, `torchrun --nproc-per-node N -m ponder_pt.early_exit.finetune ...` or
`deepspeed --module ponder_pt.early_exit.finetune ...`. Validation (rank 0) drives early
stopping and keeps the best model in OUT/best; the final evaluation of the best model writes
OUT/eval.json, OUT/predictions.jsonl and OUT/threshold_sweep.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

import torch

from ..config import ConfigError
from ..inference.device import resolve_device, training_device
from .config import FinetuneConfig, check, load_finetune_config, to_dict
from .finetune_args import add_args


def _ds_config(cfg: FinetuneConfig, dp: int) -> dict:
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    return {"train_batch_size": t.batch_size, "train_micro_batch_size_per_gpu": t.batch_size // dp,
            "gradient_accumulation_steps": 1, "gradient_clipping": t.grad_clip,
            "zero_optimization": zero, "bf16": {"enabled": t.precision == "bf16"},
            "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0},
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def _cap_max_length(cfg: FinetuneConfig, limit: Optional[int], announce: bool) -> None:
    """A learned position table cannot embed longer inputs (they would crash inside the model):
    cap train.max_length at it, as a tokenizer's model_max_length does."""
    if limit is None or cfg.train.max_length <= limit:
        return
    if announce:
        print(f"finetune: train.max_length {cfg.train.max_length} is more than the backbone's "
              f"{limit} positions; using {limit}", file=sys.stderr)
    cfg.train.max_length = limit


def build(cfg: FinetuneConfig, heads_from: Optional[str] = None, announce: bool = True):
    """(ExitModel, tokenizer, TaskData, train Encoded, validation Encoded). Caps
    cfg.train.max_length at the backbone's positions (with a notice when `announce`)."""
    from .backbones import load_backbone
    from .heads import ExitModel
    from .tasks import Encoded, load_task

    task = load_task(cfg.task, max_train=cfg.train.max_train_samples,
                     max_eval=cfg.eval.max_eval_samples, task_format=cfg.task_format)
    # fp32 master weights whatever the checkpoint's dtype; DeepSpeed casts for bf16/fp16
    backbone, tokenizer = load_backbone(cfg.backbone, dtype=torch.float32,
                                        trust_remote_code=cfg.trust_remote_code)
    _cap_max_length(cfg, backbone.max_positions, announce)
    model = ExitModel(backbone, task.spec.num_labels, cfg.exit)
    if heads_from:
        model.load_heads(heads_from)
    regression = task.spec.num_labels == 1
    train = Encoded(task.train, tokenizer, cfg.train.max_length, regression)
    valid = Encoded(task.validation, tokenizer, cfg.train.max_length, regression)
    return model, tokenizer, task, train, valid


def _validate(model, task, valid, cfg) -> dict:
    from .evaluate import run_exit, summarize
    from .exits import make_rule

    was_training = model.training
    out = run_exit(model, valid, lambda: make_rule(model), cfg.eval.batch_size)
    summary = summarize(task.spec, valid, out, model.num_layers)
    model.train(was_training)
    return {"metric": summary["metrics"][task.spec.metric], **summary["metrics"],
            "avg_exit_layer": summary["avg_exit_layer"]}


def finetune(cfg: FinetuneConfig, device: Optional[str] = None) -> dict:
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import get_linear_schedule_with_warmup

    from ..engine import distributed as D
    from ..engine.finetune_loop import keep_best, report_rejects, run_finetune_loop, seed_everything
    from ..engine.metrics import MetricsLogger
    from ..sdpa_backends import varying_shapes

    world = D.init(1, 1)
    check(cfg, world.dp)
    main = world.is_main
    os.makedirs(cfg.out, exist_ok=True)
    if not cfg.log.dir:
        cfg.log.dir = cfg.out
    seed_everything(cfg.train.seed)
    model, tokenizer, task, train, valid = build(cfg, announce=main)
    if main:
        report_rejects(task.rejected, cfg.out, "finetune")
        if train.truncated or valid.truncated:
            print(f"finetune: {train.truncated} of {len(train)} training and {valid.truncated} "
                  f"of {len(valid)} validation rows are longer than train.max_length "
                  f"{cfg.train.max_length} tokens and were truncated", file=sys.stderr)
        with open(os.path.join(cfg.out, "finetune_config.json"), "w", encoding="utf-8") as fh:
            json.dump(to_dict(cfg), fh, indent=1)
    micro = cfg.train.batch_size // world.dp
    sampler = DistributedSampler(train, num_replicas=world.dp, rank=world.dp_rank, shuffle=True,
                                 seed=cfg.train.seed, drop_last=True)
    loader = DataLoader(train, batch_size=micro, sampler=sampler, collate_fn=train.collate,
                        drop_last=True)
    if len(loader) == 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: larger than the "
                          f"{len(train)} training rows; lower it")
    total = cfg.train.max_steps or cfg.train.epochs * len(loader)
    t = cfg.train
    exit_params = {id(p) for p in model.exit_parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in exit_params],
               "lr": t.lr}]
    if exit_params:
        groups.append({"params": model.exit_parameters(), "lr": t.exit_lr})
    optimizer = torch.optim.AdamW(groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total), total)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=_ds_config(cfg, world.dp))
    device = engine.device
    logger = MetricsLogger(cfg.log, enabled=main, run_config=to_dict(cfg))
    best_dir = os.path.join(cfg.out, "best")

    def train_step(batch) -> dict:
        engine.train()
        tt = batch.get("token_type_ids")
        # batches are padded to their longest row; backward too (checkpointing recomputes)
        with varying_shapes(device):
            loss, stats = engine(batch["input_ids"].to(device),
                                 batch["attention_mask"].to(device), batch["labels"].to(device),
                                 tt.to(device) if tt is not None else None)
            engine.backward(loss)
        engine.step()
        # batch statistics averaged over the data-parallel ranks, as a 1-process run logs
        stats = {"loss": loss, **stats}
        logged = dict(zip(stats, D.dp_mean(torch.stack(
            [v.reshape(()).float() for v in stats.values()]), world).tolist()))
        return {**logged, "lr": scheduler.get_last_lr()[0]}

    def validate() -> dict:
        with varying_shapes(device):
            return _validate(engine.module, task, valid, cfg)

    def save_best(step: int, metric: float) -> None:
        def write(tmp: str) -> None:
            engine.module.save(tmp, {"step": step, "metric": metric})
            tokenizer.save_pretrained(tmp)

        keep_best(best_dir, write)

    summary = run_finetune_loop(
        loader, total=total, eval_every=t.eval_every or len(loader), patience=t.early_stop,
        train_step=train_step, validate=validate,
        save_best=save_best, logger=logger, is_main=main, desc="finetune",
        set_epoch=sampler.set_epoch)
    logger.close()
    D.shutdown()  # the final evaluation is rank 0's alone: nobody waits on a barrier for it
    if main:
        summary["eval_json"] = final_eval(cfg, best_dir, cfg.out, extra={"training": summary},
                                          device=device)
    return summary


def final_eval(cfg: FinetuneConfig, model_dir: str, out_dir: str,
               extra: Optional[dict] = None, device: Optional[str] = None) -> str:
    """Evaluate the saved model in `model_dir` (backbone + exit heads) into out_dir, on
    `device` ("auto"/None: cuda when available, else cpu)."""
    from ..sdpa_backends import varying_shapes
    from .evaluate import evaluate_model, write_eval
    from .heads import heads_file

    eval_cfg = load_finetune_config(None, None, (), validate=False)
    eval_cfg.exit, eval_cfg.train, eval_cfg.eval = cfg.exit, cfg.train, cfg.eval
    eval_cfg.backbone, eval_cfg.task = model_dir, cfg.task
    eval_cfg.task_format = cfg.task_format
    eval_cfg.trust_remote_code = cfg.trust_remote_code
    model, _, task, _, valid = build(eval_cfg, heads_from=heads_file(model_dir))
    device = torch.device(resolve_device(device))
    model.to(device).eval()
    thresholds = [float(x) for x in cfg.eval.sweep] or None
    with varying_shapes(device):  # batches trimmed to their rows' lengths, exits at any depth
        result = evaluate_model(model, task.spec, valid, batch_size=cfg.eval.batch_size,
                                thresholds=thresholds, repeats=cfg.eval.timing_repeats,
                                batch1=cfg.eval.batch1)
    info = {"backbone": cfg.backbone, "model_dir": model_dir, "rejected_rows": len(task.rejected),
            "exit": dataclasses.asdict(cfg.exit),
            "device": str(device), "threads": torch.get_num_threads(), **(extra or {})}
    return write_eval(result, task.spec, out_dir, info)


# ---------------------------------------------------------------------- CLI

def _config_from(args) -> FinetuneConfig:
    return load_finetune_config(args.exit, args.config, args.overrides, validate=False,
                                backbone=args.backbone or args.eval_only, task=args.task,
                                task_format=getattr(args, "task_format", None),
                                out=args.out, trust_remote_code=args.trust_remote_code or None)


def cmd_finetune(args) -> int:
    cfg = _config_from(args)
    device = getattr(args, "device", "auto")
    if args.eval_only:
        from .heads import heads_file

        if heads_file(args.eval_only) is None:
            raise FileNotFoundError(f"--eval-only {args.eval_only}: no exit_heads.safetensors "
                                    f"(or older exit_heads.pt): point it at a finetune "
                                    f"OUT/best directory")
        check(cfg)
        previous = os.path.join(cfg.out, "eval.json")  # keep the training record on a re-run
        extra = None
        if os.path.exists(previous):
            with open(previous, encoding="utf-8") as fh:
                extra = {k: v for k, v in json.load(fh).items() if k == "training"}
        path = final_eval(cfg, args.eval_only, cfg.out, extra=extra, device=device)
        print(f"finetune: wrote {path}")
        return 0
    launched = "WORLD_SIZE" in os.environ
    check(cfg, args.nproc if not launched else None)
    training_device(device)
    if not launched:
        # before any process starts: a bad task directory fails with its rows listed, a hub
        # task is fetched into the cache (or fails in one line when the Hub is unreachable)
        from .tasks import resolve_task

        resolve_task(cfg.task, cfg.task_format)
    if args.nproc > 1 and not launched:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "ponder_pt.early_exit.finetune",
               "--exit", args.exit, "--backbone", cfg.backbone, "--task", cfg.task,
               "--out", cfg.out, "--device", device]
        if args.config:
            cmd += ["--config", args.config]
        if args.trust_remote_code:
            cmd += ["--trust-remote-code"]
        if cfg.task_format:
            cmd += ["--task-format", cfg.task_format]
        for item in args.overrides:
            cmd += ["--set", item]
        from ..engine.failures import run_torchrun

        return run_torchrun(cmd, "ponder-pt finetune")
    summary = finetune(cfg, device=device)
    if "eval_json" in summary:
        with open(summary["eval_json"], encoding="utf-8") as fh:
            doc = json.load(fh)
        print(f"finetune: best {doc['metric_name']} {summary['best_metric']:.4f} at step "
              f"{summary['best_step']}; eval: {doc['metric_name']} {doc['metric']:.4f}, "
              f"average exit layer {doc['avg_exit_layer']:.2f}/{doc['num_layers']}, wall "
              f"speed-up {doc['wall_speedup']:.2f}x -> {summary['eval_json']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ponder_pt.early_exit.finetune",
                                     description=__doc__.split("\n\n")[0])
    add_args(parser)
    args = parser.parse_args(argv)
    from ..engine.failures import run_cli

    return run_cli("ponder-pt finetune", lambda: cmd_finetune(args),
                   (ConfigError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
