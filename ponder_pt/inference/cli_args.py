"""Arguments of `ponder-pt generate` and `ponder-pt eval` (no heavy imports), and the options
every command spells the same way: `--model` for the model to load, `--out` for where results
go (`add_option` keeps a command's older spelling working, unlisted in --help)."""

import argparse

from .device import DEVICE_HELP

TRUST_HELP = ("run Python code shipped in the model directory (its auto_map); ponder-pt exports "
              "do not need it, they load with the installed ponder-pt's classes")
HALT_Q_HELP = ("adaptive pondering models: Q-exit threshold in (0, 1], a token stops at the "
               "first pass whose cumulative exit probability reaches it (default: the model's "
               "ponder.halting.q; 1 = every pass, exactly fixed-K pondering)")
UNSAFE_HELP = ("read a training checkpoint with full unpickling (runs any code its files hold); "
               "by default only tensors and DeepSpeed's checkpoint types load")


PREFILL_HELP = ("latent-thoughts models: how a prompt's thoughts are computed: exact (slot "
                "after slot, as decoding does) or jacobi (thoughts.jacobi_iters parallel "
                "iterations, as in training; native checkpoints only). Default: the model's "
                "thoughts.prefill")

SPECULATIVE_HELP = ("pondering models (native checkpoints): decode speculatively, the first d "
                    "passes drafting n tokens that the remaining passes verify in one step; "
                    "the same tokens as ordinary greedy decoding, and sampling from the same "
                    "distribution, e.g. 1:3. Adaptive models draft at --halt-q 1 only")

MODEL_HELP = ("a run directory (`ponder-pt train --out DIR`), a training checkpoint.dir (with "
              "run_config.yaml) or an HF directory")


def add_option(p, flag: str, *old: str, required: bool = False, **kwargs):
    """`p.add_argument(flag, **kwargs)`; the `old` spellings set the same value and are not
    listed in --help (scripts written for them keep working). Giving two spellings at once
    is an error."""
    if not old:
        return p.add_argument(flag, required=required, **kwargs)
    group = p.add_mutually_exclusive_group(required=required)
    action = group.add_argument(flag, **kwargs)
    same = {key: kwargs[key] for key in ("type", "nargs", "choices", "action", "metavar")
            if key in kwargs}
    group.add_argument(*old, dest=action.dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                       **same)
    return action


def add_generate_args(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompts-file", metavar="FILE",
                     help="many prompts: a .txt (one per line) or .jsonl ({\"prompt\": ...} per "
                          "line); one JSON line per prompt is written to stdout or --out, "
                          "prompts decoded --batch-size at a time, each as alone (prompt i "
                          "sampled with --seed + i)")
    add_option(p, "--out", "--output", dest="output", metavar="FILE",
               help="with --prompts-file: write the JSON lines here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="with --prompts-file: prompts decoded together (HF directories sample "
                        "one at a time)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (not with --greedy)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens only; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--pauses", type=int, default=None,
                   help="M <pause> tokens appended to the prompt (default: the M the model "
                        "records: pause.inference_pauses of a pause-trained run, or `sft "
                        "--pauses M`; else 0)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true",
                   help='print {"token_ids": [...], "text": ...} of the new tokens (adaptive '
                        'pondering models add "passes": the passes each new token took; '
                        '--speculative adds "speculative": the acceptance rate and tokens per '
                        'verify step)')
    p.add_argument("--halt-q", type=float, default=None, help=HALT_Q_HELP)
    p.add_argument("--speculative", metavar="D:N", default=None, help=SPECULATIVE_HELP)
    p.add_argument("--thought-prefill", choices=("exact", "jacobi"), default=None,
                   help=PREFILL_HELP)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--unsafe-unpickle", action="store_true", help=UNSAFE_HELP)


def add_eval_args(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help=MODEL_HELP)
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names (comma or space)")
    p.add_argument("--pauses", type=int, default=None,
                   help="M <pause> tokens after each prompt (default: the model's recorded M, "
                        "e.g. from `sft --pauses M`)")
    p.add_argument("--halt-q", type=float, default=None, help=HALT_Q_HELP)
    p.add_argument("--thought-prefill", choices=("exact", "jacobi"), default=None,
                   help=PREFILL_HELP)
    p.add_argument("--speculative", metavar="D:N", default=None,
                   help=SPECULATIVE_HELP + " (generate_until tasks; the results add the "
                                           "acceptance rate)")
    p.add_argument("--include-path", metavar="DIR",
                   help="directory of extra lm-eval task YAMLs (offline tasks: a YAML whose "
                        "dataset_path is `json` with local data_files needs no network)")
    p.add_argument("--limit", type=float, help="examples per task (int) or fraction (< 1)")
    p.add_argument("--num-fewshot", type=int,
                   help="few-shot examples per prompt (default: the task's own)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="requests scored / greedy generations decoded together")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_option(p, "--out", "--output", dest="output", metavar="FILE",
               help="write the results JSON here")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--write-card", action="store_true",
                   help="add the results to the HF export's model card (README.md: its "
                        "results section and model-index metadata; the rest is kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--unsafe-unpickle", action="store_true", help=UNSAFE_HELP)

