"""Arguments of `ponder-pt sft` and `ponder-pt sft-task` (import-light: the CLI parser loads
this module), and the argv that re-runs `sft` under torchrun for `--nproc N`."""

from __future__ import annotations

import argparse

# (flag, dest, type) of every option forwarded to the torchrun workers
_FORWARD = [
    ("--pauses", "pauses", int), ("--max-length", "max_length", int),
    ("--epochs", "epochs", int), ("--max-steps", "max_steps", int),
    ("--batch-size", "batch_size", int), ("--lr", "lr", float),
    ("--min-lr", "min_lr", float), ("--warmup", "warmup", float),
    ("--lr-decay", "lr_decay", str), ("--weight-decay", "weight_decay", float),
    ("--grad-clip", "grad_clip", float), ("--zero-stage", "zero_stage", int),
    ("--precision", "precision", str), ("--seed", "seed", int),
    ("--eval-every", "eval_every", int), ("--early-stop", "early_stop", int),
    ("--max-train", "max_train", int), ("--max-eval", "max_eval", int),
    ("--max-new-tokens", "max_new_tokens", int), ("--metric", "metric", str),
    ("--device", "device", str), ("--source-model", "source_model", str),
    ("--source-task", "source_task", str), ("--halt-q", "halt_q", float),
]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR",
                   help="backbone (required unless --eval-only): a training checkpoint.dir or an "
                        "HF export (plain, pondering, looped or pause-trained; GPT-NeoX / LLaMA)")
    p.add_argument("--task", required=True, metavar="DIR_OR_NAME",
                   help="a task directory (train/validation[/test] .jsonl/.tsv/.csv with "
                        "prompt/answer, or prompt/choices/label; task.json maps other field "
                        "names), or a hub dataset: squad, commonsense_qa, gsm8k")
    p.add_argument("--pauses", type=int, default=None, metavar="M",
                   help="M <pause> tokens appended after each prompt, in training and at "
                        "inference (recorded in OUT/final); default 0 = standard fine-tuning "
                        "(with --eval-only: the model's recorded M)")
    p.add_argument("--out", default="sft_out", metavar="OUT",
                   help="OUT/final (HF export), eval.json, predictions.jsonl, metrics.jsonl, "
                        "loss.png")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (torchrun)")
    p.add_argument("--inspect", type=int, metavar="N",
                   help="print N prepared training examples and exit (no training)")
    p.add_argument("--json", action="store_true",
                   help='with --inspect: one {"input_ids", "labels", "pause_positions"} per line')
    p.add_argument("--eval-only", metavar="MODEL_DIR",
                   help="skip training: score an sft OUT/final (or any model) on the task's "
                        "test split with --pauses M (default: the model's recorded M)")
    p.add_argument("--max-length", type=int, default=0,
                   help="tokens per example (input side); longer examples lose prompt tokens "
                        "from the left (counted); 0 = the model's max_seq_len")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training rows")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps; 0 = --epochs")
    p.add_argument("--batch-size", type=int, default=16,
                   help="global batch (split over the --nproc processes)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=0.0,
                   help="learning rate at the end of the decay")
    p.add_argument("--warmup", type=float, default=0.06,
                   help="warmup: a fraction of the steps (< 1) or a number of steps")
    p.add_argument("--lr-decay", default="linear", choices=["linear", "cosine", "constant"],
                   help="schedule after the warmup")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="gradient norm clipping; 0 = off")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2],
                   help="DeepSpeed ZeRO stage")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--seed", type=int, default=42, help="random seed (data order)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="validate every N steps; 0 = once per epoch")
    p.add_argument("--early-stop", type=int, default=3,
                   help="stop after N validations without improvement; 0 = never")
    p.add_argument("--max-train", type=int, default=0, help="first N training rows (0 = all)")
    p.add_argument("--max-eval", type=int, default=200,
                   help="validation/test rows scored (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="generation length; 0 = longest gold answer + 2")
    p.add_argument("--metric", default="",
                   help="headline metric: exact_match, f1, numeric_match or accuracy "
                        "(default: the task's)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda; the final "
                        "evaluation and --eval-only run here")
    p.add_argument("--halt-q", type=float, default=None,
                   help="adaptive pondering backbones: the Q-exit threshold fine-tuning, "
                        "validation, the export and scoring use (default: the backbone's)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="with --eval-only: run Python code shipped in the model directory (its "
                        "auto_map); ponder-pt exports do not need it")
    p.add_argument("--unsafe-unpickle", action="store_true",
                   help="read a training checkpoint with full unpickling (runs any code its "
                        "files hold); by default only tensors and DeepSpeed's types load")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("--source-model", help=argparse.SUPPRESS)
    p.add_argument("--source-task", help=argparse.SUPPRESS)


def worker_argv(args, model: str, task: str) -> list[str]:
    """The argv of `python -m ponder_pt.sft.train` that repeats this run in each worker."""
    argv = ["--model", model, "--task", task, "--out", args.out]
    for flag, dest, _ in _FORWARD:
        value = getattr(args, dest, None)
        if value is not None and value != "":
            argv += [flag, str(value)]
    return argv + (["--unsafe-unpickle"] if getattr(args, "unsafe_unpickle", False) else [])


def add_task_args(p: argparse.ArgumentParser) -> None:
    """`ponder-pt sft-task`: write a synthetic task directory."""
    p.add_argument("kind", choices=["addition", "variables", "sort"],
                   help="addition: multi-digit sums; variables: multi-hop resolution "
                        "(a=3; b=a+4; c=b*2; c=?); sort: sort a short list")
    p.add_argument("--level", type=int, default=1,
                   help="difficulty 1..5 (digits / hops / list length grow with it)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes DIR/train.jsonl, validation.jsonl, test.jsonl and task.json")
    p.add_argument("--train", type=int, default=2000, help="training rows")
    p.add_argument("--validation", type=int, default=200, help="validation rows")
    p.add_argument("--test", type=int, default=200, help="test rows")
    p.add_argument("--seed", type=int, default=0,
                   help="the rows are a function of kind, level and seed")
