"""`ponder-pt sft`: supervised fine-tuning of our decoders, with M pauses after each prompt
(PauseFT, Goyal et al.; M = 0 is standard fine-tuning).

Runs in one process or data-parallel under DeepSpeed ZeRO 0-2: `ponder-pt sft --nproc N`
(torchrun), `torchrun --nproc-per-node N -m ponder_pt.sft.train ...` or `deepspeed --module
ponder_pt.sft.train ...`. The launching process resolves the task (hub names -> OUT/task) and
the backbone (HF dir -> OUT/backbone) before any worker starts. The loss is the mean over the
global batch's answer tokens (each rank's sum divided by the global count), so N processes
train exactly as one. Rank 0 validates (loss and the task metric, pause-aware), keeps the best
weights (OUT/best) for early stopping, and at the end writes OUT/final (an HF export recording
M: `generate`/`eval` append M pauses by default), OUT/eval.json, OUT/predictions.jsonl,
OUT/metrics.jsonl and OUT/loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional, Sequence

from ..config.validate import halt_q_problem
from .args import add_args, worker_argv


def _precision(name: str) -> str:
    import torch

    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return name


def _pauses(args) -> int:
    m = 0 if args.pauses is None else int(args.pauses)
    if m < 0:
        raise ValueError(f"--pauses must be >= 0, got {m}")
    return m


def report_prepared(task, train, valid, out_dir: str, max_length: int) -> dict:
    """Print (stderr) and file the rejected rows and the truncation count; returns counts."""
    from ..engine.finetune_loop import report_rejects

    rejected = task.rejected + train.rejected + valid.rejected
    report_rejects(rejected, out_dir, "sft")
    truncated = train.truncated + valid.truncated
    if truncated:
        print(f"sft: {truncated} examples longer than --max-length {max_length} lost prompt "
              f"tokens from the left ({train.truncated} train, {valid.truncated} validation)",
              file=sys.stderr)
    return {"rejected_rows": len(rejected), "truncated": truncated}


def _full_state(model) -> dict:
    import torch

    full = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}
    if model.cfg.tie_embeddings:
        full.pop("output.weight", None)
    return full


def _save_best(model, out_dir: str, step: int, metric: float) -> None:
    """OUT/best/model.safetensors, replaced atomically."""
    from safetensors.torch import save_file

    from ..engine.finetune_loop import keep_best

    keep_best(out_dir, lambda tmp: save_file(
        _full_state(model), os.path.join(tmp, "model.safetensors"),
        metadata={"step": str(step), "metric": repr(metric)}))


def train(args) -> dict:
    """One worker's fine-tuning run (every rank calls this); returns rank 0's summary."""
    import deepspeed
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from ..engine import distributed as D
    from ..engine.ds_config import build_ds_config
    from ..engine.finetune_loop import run_finetune_loop, seed_everything
    from ..engine.metrics import MetricsLogger
    from ..engine.schedule import make_scheduler
    from ..engine.trainer import param_groups
    from ..models import PonderLM
    from ..models.hf import load_full_state_dict
    from ..sdpa_backends import varying_shapes
    from .backbone import load_backbone
    from .evaluate import LiveModel, evaluate, validation_loss
    from .examples import collate, prepare_split
    from .tasks import load_local_task

    m = _pauses(args)
    world = D.init(1, 1)
    main = world.is_main
    if args.batch_size % world.dp:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world.dp} "
                         f"processes")
    os.makedirs(args.out, exist_ok=True)
    seed_everything(args.seed)
    task = load_local_task(args.task, args.max_train)
    cfg, full, tok, pause_id = load_backbone(args.model, m, args.unsafe_unpickle)
    if args.halt_q is not None:  # adaptive pondering: train, validate and export at this q
        if cfg.ponder.halting.mode == "off":
            raise ValueError(f"--halt-q {args.halt_q}: {args.model} has no halting head (not "
                             "an adaptive pondering model)")
        cfg.ponder.halting.q = args.halt_q
    max_length = args.max_length or cfg.model.max_seq_len
    if max_length > cfg.model.max_seq_len:
        raise ValueError(f"--max-length {max_length} exceeds the model's max_seq_len "
                         f"{cfg.model.max_seq_len}")
    train_set = prepare_split(task.train, tok, pause_id, m, max_length)
    valid_set = prepare_split(task.validation, tok, pause_id, m, max_length)
    counts = report_prepared(task, train_set, valid_set, args.out, max_length) if main else {}
    if not len(train_set) or not len(valid_set):
        raise ValueError("no training or validation example fits --max-length "
                         f"{max_length}; raise it")
    micro = args.batch_size // world.dp
    sampler = DistributedSampler(train_set, num_replicas=world.dp, rank=world.dp_rank,
                                 shuffle=True, seed=args.seed, drop_last=True)
    pad_id = tok.eod_id
    loader = DataLoader(train_set, batch_size=micro, sampler=sampler, drop_last=True,
                        collate_fn=lambda items: collate(items, pad_id))
    if len(loader) == 0:
        raise ValueError(f"--batch-size {args.batch_size}: larger than the {len(train_set)} "
                         f"training examples; lower it")
    total = args.max_steps or args.epochs * len(loader)

    t = cfg.train
    t.iters, t.global_batch, t.micro_batch = total, args.batch_size, micro
    t.lr, t.min_lr, t.warmup, t.lr_decay = args.lr, args.min_lr, args.warmup, args.lr_decay
    t.weight_decay, t.grad_clip, t.seed = args.weight_decay, args.grad_clip, args.seed
    t.precision, t.compile = _precision(args.precision), False
    cfg.parallel.zero_stage = args.zero_stage
    cfg.log.dir, cfg.log.wandb, cfg.log.tensorboard = args.out, False, False

    model = PonderLM(cfg.model, cfg.ponder, seed=args.seed, thoughts=cfg.thoughts,
                     pause=cfg.pause)
    load_full_state_dict(model, full, source=args.model)
    del full
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, t.weight_decay),
        config=build_ds_config(cfg, world.dp), mpu=D.MegatronMPU(),
        lr_scheduler=lambda opt: make_scheduler(opt, t))
    device = engine.device
    logger = MetricsLogger(cfg.log, enabled=main, run_config=vars(args))
    valid_rows = task.validation[:args.max_eval] if args.max_eval else task.validation
    valid_items = [it for it in valid_set.items if not args.max_eval
                   or it["index"] < args.max_eval]
    best_dir = os.path.join(args.out, "best")
    tokens, steps = 0, 0

    def train_step(batch) -> dict:
        nonlocal tokens, steps
        engine.train()
        engine.module.begin_step(steps)  # latent thoughts: this step's Jacobi iterations
        steps += 1
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        n_local = (labels >= 0).sum().float()
        n_global = D.dp_mean(n_local, world) * world.dp
        lr = engine.get_lr()[0]
        # batches are as wide as their longest example; backward too (checkpointing recomputes)
        with varying_shapes(device):
            mean_local = engine(ids, labels=labels)
            # this rank's token sum over the global token count, times dp (DeepSpeed averages
            # gradients over ranks): the global token mean, as one process computes it
            loss = mean_local * (n_local * world.dp / n_global)
            engine.backward(loss)
        engine.step()
        tokens += int(n_global)
        return {"loss": float(D.dp_mean(loss, world)), "lr": lr, "tokens": tokens}

    def validate() -> dict:
        live = LiveModel(engine.module, tok, pause_id, m)
        metrics, _ = evaluate(live, valid_rows, task.kind, m, args.max_new_tokens)
        metric = args.metric or task.metric
        with varying_shapes(device):
            loss = validation_loss(engine.module, valid_items, pad_id)
        return {"loss": loss, "metric": metrics[metric], **metrics}

    summary = run_finetune_loop(
        loader, total=total, eval_every=args.eval_every or len(loader),
        patience=args.early_stop, train_step=train_step, validate=validate,
        save_best=lambda step, metric: _save_best(engine.module, best_dir, step, metric),
        logger=logger, is_main=main, desc="sft", set_epoch=sampler.set_epoch)
    logger.close()
    summary.update(counts)
    D.shutdown()
    if main:
        summary["eval_json"] = finish(args, cfg, tok, task, m, summary)
    return summary


def finish(args, cfg, tok, task, m: int, summary: dict) -> str:
    """Export the best weights to OUT/final, plot the losses, score OUT/final on the test
    split (validation when the task has none) with its recorded M."""
    from safetensors.torch import load_file

    from ..engine.plot import plot_runs
    from ..export.to_hf import export_full

    best = load_file(os.path.join(args.out, "best", "model.safetensors"))
    final = os.path.join(args.out, "final")
    shutil.rmtree(final, ignore_errors=True)
    finetune = {"method": "ponder-pt sft", "task": args.source_task or args.task,
                "steps": summary["steps"], "best_step": summary["best_step"],
                "backbone": args.source_model or args.model}
    export_full(cfg, best, final, tokenizer_path=cfg.data.tokenizer, progress=False,
                card={"finetune": finetune})
    plot_runs([args.out], os.path.join(args.out, "loss.png"), labels=[f"sft M={m}"])
    info = {"training": summary, "pauses_trained": m}
    path = score(final, args, task, None, info)
    backbone = os.path.join(args.out, "backbone")
    if os.path.isdir(backbone):  # the converted HF backbone: its weights are not needed now
        for name in os.listdir(backbone):
            if name.startswith("step_"):
                shutil.rmtree(os.path.join(backbone, name), ignore_errors=True)
    return path


def score(model_dir: str, args, task, pauses: Optional[int], extra: dict) -> str:
    """Score `model_dir` (an HF export or checkpoint.dir) on the task's evaluation split with
    M = pauses (None: the model's recorded M); writes OUT/eval.json and predictions.jsonl."""
    from ..inference.model import load_model
    from ..inference.pauses import resolve_pauses
    from .evaluate import evaluate, write_eval

    lm = load_model(model_dir, device=args.device, trust_remote_code=args.trust_remote_code,
                    unsafe_unpickle=args.unsafe_unpickle)
    lm.set_halt_q(args.halt_q)
    m = resolve_pauses(pauses, lm.default_pauses, lm.pause_id)
    split, rows = task.eval_split
    rows = rows[:args.max_eval] if args.max_eval else rows
    metrics, records = evaluate(lm, rows, task.kind, m, args.max_new_tokens)
    metric = args.metric or task.metric
    if metric not in metrics:
        raise ValueError(f"--metric {metric}: this {task.kind} task reports "
                         f"{', '.join(metrics)}")
    info = {"M": m, "K": lm.ponder_steps, "split": split, "examples": len(rows),
            "task": args.source_task or args.task, "model": model_dir,
            "backbone": args.source_model or args.model, **extra}
    return write_eval(args.out, metric, metrics, records, info)


# ---------------------------------------------------------------------- CLI

def cmd_inspect(args, task_dir: str) -> int:
    from .backbone import backbone_meta
    from .examples import prepare_split, render
    from .tasks import load_local_task

    m = _pauses(args)
    task = load_local_task(task_dir, args.max_train)
    meta = backbone_meta(args.model, m)
    max_length = args.max_length or meta["max_seq_len"]
    rows = task.train[:args.inspect]
    prepared = prepare_split(rows, meta["tokenizer"], meta["pause_id"], m, max_length)
    for item in prepared.items:
        if args.json:
            print(json.dumps({k: item[k] for k in ("input_ids", "labels", "pause_positions")},
                             separators=(",", ":")))
        else:
            print(render(item, meta["tokenizer"], meta["pause_id"]))
    rejected = task.rejected + prepared.rejected
    for r in rejected[:20]:
        print(f"sft: rejected {r['file']}:{r['line']}: {r['reason']}", file=sys.stderr)
    if rejected:
        print(f"sft: {len(rejected)} rows rejected" + (" (first 20 shown)" if len(rejected) > 20
                                                       else ""), file=sys.stderr)
    return 0


def cmd_sft(args) -> int:
    from .tasks import load_local_task, resolve_task

    if not args.model and not args.eval_only:
        raise ValueError("--model DIR is required (the backbone to fine-tune)")
    task_dir = resolve_task(args.task, args.out)  # hub names: here, before any worker starts
    if args.inspect is not None:
        return cmd_inspect(args, task_dir)
    if args.eval_only:
        task = load_local_task(task_dir)
        path = score(args.eval_only, args, task, args.pauses, {})
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        print(f"sft: {doc['metric']} {doc['value']:.4f} with M={doc['M']} pauses "
              f"(K={doc['K']}) -> {path}")
        return 0
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    problem = None if args.halt_q is None else halt_q_problem(args.halt_q, "--halt-q")
    if problem:  # before any worker starts
        raise ValueError(problem)
    _pauses(args)
    launched = "WORLD_SIZE" in os.environ
    model_dir = args.model
    if not launched:
        from ..inference.device import training_device
        from .backbone import native_backbone

        training_device(args.device)  # training follows DeepSpeed's accelerator

        load_local_task(task_dir, args.max_train)  # a bad task directory fails here
        if args.batch_size % args.nproc:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by --nproc "
                             f"{args.nproc}")
        model_dir = native_backbone(args.model, args.out)
    args.source_model = args.source_model or args.model
    args.source_task = args.source_task or args.task
    if args.nproc > 1 and not launched:
        from ..engine.failures import run_torchrun

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "ponder_pt.sft.train",
               *worker_argv(args, model_dir, task_dir)]
        code = run_torchrun(cmd, "ponder-pt sft")
        if code:
            return code
        with open(os.path.join(args.out, "eval.json"), encoding="utf-8") as fh:
            doc = json.load(fh)
    else:
        args.model, args.task = model_dir, task_dir
        summary = train(args)
        if "eval_json" not in summary:
            return 0
        with open(summary["eval_json"], encoding="utf-8") as fh:
            doc = json.load(fh)
    print(f"sft: {doc['metric']} {doc['value']:.4f} on {doc['split']} with M={doc['M']} "
          f"pauses (K={doc['K']}), best validation at step {doc['training']['best_step']} -> "
          f"{os.path.join(args.out, 'final')}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ponder_pt.sft.train",
                                     description=__doc__.split("\n\n")[0])
    add_args(parser)
    args = parser.parse_args(argv)
    from ..config import ConfigError
    from ..engine.failures import run_cli

    def run() -> int:
        if "WORLD_SIZE" in os.environ:  # a torchrun/deepspeed worker: train only
            return 0 if train(args) is not None else 1
        return cmd_sft(args)

    return run_cli("ponder-pt sft", run, (ConfigError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
