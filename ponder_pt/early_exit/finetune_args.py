"""Arguments of `ponder-pt finetune` (kept import-light: the CLI parser loads this)."""

from __future__ import annotations

import argparse

from ..inference.cli_args import add_option


def add_args(p: argparse.ArgumentParser) -> None:
    add_option(p, "--model", "--backbone", dest="backbone", metavar="DIR_OR_NAME",
               help="the backbone: an HF directory or hub name (ALBERT/BERT/RoBERTa, or a "
                    "`ponder-pt convert to-hf` export); required unless --eval-only")
    p.add_argument("--task", help="GLUE task name (rte, mrpc, stsb, cola, sst2, qnli, qqp, "
                                  "mnli) or a local task directory")
    p.add_argument("--task-format", metavar="GLUE_TASK",
                   help="the GLUE task whose original layout (columns, label strings) a local "
                        "--task directory has, when its name does not say (RTE/, SST-2/, MNLI/ "
                        "are recognised); mnli_mismatched validates on dev_mismatched.tsv")
    p.add_argument("--exit", default="palbert",
                   help="none | palbert | pondernet | pabee | entropy; each brings its "
                        "preset's defaults")
    p.add_argument("--config", metavar="YAML", help="YAML file with exit/train/eval/log sections")
    p.add_argument("--out", metavar="DIR", help="output directory (default: finetune_out, or "
                                                "the config's out)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="e.g. --set train.lr=2e-5 --set exit.q=0.3")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (torchrun)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped in the backbone directory (its auto_map); "
                        "ponder-pt exports and stock encoders/decoders do not need it")
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda when torch.cuda.is_available(), else cpu), cpu, "
                        "cuda or cuda:N. Training follows DeepSpeed's accelerator (the "
                        "process's GPU when CUDA is visible); the final evaluation and "
                        "--eval-only run on this device")
    p.add_argument("--eval-only", metavar="MODEL_DIR",
                   help="skip training: evaluate a fine-tuned OUT/best directory")
