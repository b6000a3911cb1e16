"""ponder-pt: pretraining language models that think longer per token.

Each command parses its flags and calls one library function; user errors (bad config, missing
files, bad input under --strict) exit with code 2 and one clear message, not a traceback
(PONDER_PT_DEBUG=1 shows the traceback)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from . import __version__


def _trivial(default) -> bool:
    """A default not worth showing: unset, off, or empty."""
    return (default is None or default is False or default is argparse.SUPPRESS
            or (isinstance(default, (str, list, tuple, dict)) and not default))


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default where it has one ("(default: 16)"), unless
    the help places it itself with %(default)s."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or _trivial(action.default):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Commands(argparse._SubParsersAction):
    """Subcommands whose own --help opens with the line the command list shows."""

    def add_parser(self, name, **kwargs):
        if kwargs.get("help"):
            kwargs.setdefault("description", kwargs["help"])
        return super().add_parser(name, **kwargs)


class Parser(argparse.ArgumentParser):
    """ponder-pt's parsers: defaults in --help, and the same for every nested subcommand (an
    ArgumentParser's subparsers are of its own class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Commands)

    def error(self, message):
        # an option with an older spelling sits in a group of its own (cli_args.add_option)
        if message.startswith("one of the arguments ") and " " not in message[21:-12]:
            message = "the following arguments are required: " + message[21:-12]
        super().error(message)


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", required=required, metavar="NAME_OR_YAML",
                   help="named config (see `ponder-pt config list`) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")


def _load(args, validate: bool = True):
    from .config import load_config

    return load_config(args.config, args.overrides, validate=validate)


# ---------------------------------------------------------------- config
def cmd_config_show(args) -> int:
    from .config import check, config_to_yaml, fill_vocab

    cfg = _load(args, validate=False)
    if args.tokenizer or cfg.data.tokenizer:  # shown and checked as a run would resolve it
        from .tokenizer import load_tokenizer

        fill_vocab(cfg, load_tokenizer(args.tokenizer or cfg.data.tokenizer))
    check(cfg, world_size=args.world_size, vocab_size=cfg.model.vocab_size)
    sys.stdout.write(config_to_yaml(cfg))
    return 0


def cmd_config_list(args) -> int:
    from .config import MODEL_PRESETS, RUN_PRESETS

    print("named run configs (--config NAME):")
    for name in sorted(RUN_PRESETS):
        print(f"  {name}")
    print("model presets (model.preset=NAME):")
    for name, shape in MODEL_PRESETS.items():
        print(f"  {name:16s} {shape['arch']:9s} layers={shape['num_layers']:<3d} "
              f"hidden={shape['hidden_size']:<5d} heads={shape['num_heads']}")
    return 0


# ---------------------------------------------------------------- tokenizer
def cmd_tokenizer_train(args) -> int:
    from .tokenizer import load_tokenizer, train_tokenizer

    path = train_tokenizer(args.input, args.vocab_size, args.out, kind=args.type,
                           text_key=args.text_key)
    info = load_tokenizer(path).describe()
    print(json.dumps(info, indent=2))
    return 0


def cmd_tokenizer_info(args) -> int:
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.path, eod_token=args.eod_token)
    print(json.dumps(tok.describe(args.divisible_by, args.tp), indent=2))
    return 0


# ---------------------------------------------------------------- data
def cmd_data_corpus(args) -> int:
    from .data.corpus import write_corpus

    print(json.dumps(write_corpus(args.out, max_bytes=int(args.max_mb * 1e6))))
    return 0


def cmd_data_prepare(args) -> int:
    from .data.prepare import prepare
    from .data.tokenizer_record import record_path

    stats = prepare(args.input, args.tokenizer, args.out, text_key=args.text_key,
                    workers=args.workers, strict=args.strict, txt_mode=args.txt_mode,
                    progress=not args.quiet, eod_token=args.eod_token)
    print(f"wrote {stats.prefix}.bin/.idx: {stats.documents_written} documents, "
          f"{stats.tokens:,} tokens ({stats.tokens_per_s:,.0f} tok/s, {stats.workers} workers)",
          file=sys.stderr)
    print(f"documents in {stats.documents_in} = written {stats.documents_written} + "
          f"rejected {stats.rejected}" + (f" {stats.rejected_by_reason}; see "
                                          f"{stats.prefix}.rejects.jsonl" if stats.rejected else ""),
          file=sys.stderr)
    if stats.keys_seen:  # some records lacked --text-key: say what they had instead
        print(f"records without the key {stats.text_key!r}: {stats.text_key_hint()}",
              file=sys.stderr)
    print(f"tokenizer {stats.tokenizer} (largest id written: {stats.max_token_id}) recorded in "
          f"{record_path(stats.prefix)}", file=sys.stderr)
    return 0


def cmd_data_merge(args) -> int:
    from .data.prepare import merge, unrecorded

    n = merge(args.inputs, args.out)
    print(f"merged {len(args.inputs)} prefixes into {args.out}: {n} documents", file=sys.stderr)
    missing = unrecorded(args.inputs)
    if missing:
        print(f"note: no tokenizer record for {', '.join(missing)} (prepared by another tool "
              f"or an older ponder-pt), so {args.out} gets none: `ponder-pt train` scans it when "
              f"it is small; check a large one once with `ponder-pt data verify --full "
              f"--tokenizer TOK {args.out}`", file=sys.stderr)
    return 0


def cmd_data_inspect(args) -> int:
    from .data.inspect import dumps, iter_records, open_samples, render

    cfg = tok = None
    if args.config:
        cfg = _load(args)
        if args.seq_len:
            cfg.data.seq_len = args.seq_len
        if args.pause_rate is not None:
            cfg.pause.rate = args.pause_rate
        if args.pause_id is not None:
            cfg.pause.token_id = args.pause_id
        if args.data:
            cfg.data.train, cfg.data.valid, cfg.data.test = [args.data], [], []
    tok_path = args.tokenizer or (cfg.data.tokenizer if cfg else None)
    if tok_path:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(tok_path)
    pause_rate = args.pause_rate or 0.0
    pause_id = args.pause_id
    if pause_id is None and tok is not None:
        pause_id = tok.pause_row
    if cfg is None and pause_rate > 0 and pause_id is None:
        raise ValueError("--pause-rate needs --pause-id (or --tokenizer to use its reserved row)")
    from .data.verify import check_data, config_prefixes

    check_data(config_prefixes(cfg) if cfg is not None else [args.data] if args.data else [],
               tok.vocab_size if tok else None)
    ds = open_samples(args.data, args.seq_len, seed=args.seed, pause_rate=pause_rate,
                      pause_id=pause_id, eod_id=tok.eod_id if tok else args.eod_id,
                      vocab_size=tok.vocab_size if tok else 65536,
                      num_samples=args.start + args.num_samples, split=args.split,
                      cache_dir=args.cache_dir, cfg=cfg, tokenizer=tok)
    if cfg is not None:
        pause_id = ds.pause_id
    for record in iter_records(ds, args.start, args.num_samples):
        print(dumps(record) if args.json else render(record, tok, pause_id))
    return 0


def cmd_data_verify(args) -> int:
    from .data.verify import verify_prefixes

    vocab = args.vocab_size
    if args.tokenizer:
        from .tokenizer import load_tokenizer

        vocab = load_tokenizer(args.tokenizer).vocab_size
    reports = verify_prefixes(args.prefixes, vocab, full=args.full)
    for rep in reports:
        if args.json:
            print(json.dumps(rep.as_dict()))
        elif rep.ok:
            print(f"ok {rep.prefix}: {rep.documents:,} documents, {rep.tokens:,} {rep.dtype} "
                  f"tokens, {rep.bin_bytes:,} bytes"
                  + (f", max token id {rep.max_token}" if rep.max_token is not None else ""))
        else:
            for problem in rep.problems:
                print(f"FAILED {rep.prefix}: {problem}", file=sys.stderr)
    return 0 if all(r.ok for r in reports) else 1


# ---------------------------------------------------------------- train
def cmd_train(args) -> int:
    import shlex

    from .train import command_line, prepare_run, resolve, run, torchrun_command

    overrides = list(args.overrides) + ([f"run.dir={args.out}"] if args.out else [])
    if not args.dry_run:  # Ctrl-C during start-up: remembered, not a traceback
        from .engine.preemption import catch_early

        catch_early()
    launched = "WORLD_SIZE" in os.environ  # already under torchrun/deepspeed/srun
    if args.nproc > 1 and not launched:
        # reject a bad config here, before torchrun starts any process
        cfg, _ = resolve(args.config, overrides, args.nproc, need_tokenizer=not args.dry_run)
        if args.dry_run:
            cmd = torchrun_command(args.nproc, args.config, overrides)
            return run(args.config, overrides, dry_run=True, world_size=args.nproc,
                       launch=" ".join(shlex.quote(c) for c in cmd), mfu_from=args.mfu_from,
                       interconnect=args.interconnect,
                       per_node=args.ranks_per_node or args.nproc)
        prepare_run(cfg, args.config, 1)  # the ranks resume-check it again, quietly
        overrides.append(f"run.dir={cfg.run.dir}")
        again = command_line(args.config, overrides, cfg.run.dir, args.nproc)
        more = command_line(args.config, [*overrides, f"train.iters={2 * cfg.train.iters}"],
                            cfg.run.dir, args.nproc)
        return _launch_and_wait(torchrun_command(args.nproc, args.config, overrides), cfg,
                                again, more)
    return run(args.config, overrides, dry_run=args.dry_run, mfu_from=args.mfu_from,
               interconnect=args.interconnect, per_node=args.ranks_per_node)


def _launch_and_wait(cmd: list[str], cfg, again: str, more: str) -> int:
    """Run torchrun and report the run's end. Stop signals (Ctrl-C, SIGTERM to this process
    or its group, SIGUSR1) go to the ranks once each, directly (torchrun, in a session of its
    own, would otherwise give them only 30 s before killing them); they save and exit, and
    this process says where they stopped. A second Ctrl-C kills the ranks at once."""
    import signal
    import subprocess
    import time

    import psutil

    from .engine.failures import run_torchrun
    from .engine.preemption import (EXIT_INTERRUPTED, EXIT_REQUEUE, SAME_PRESS_S, SIGNALS,
                                    read_marker, signal_name)
    from .launch_env import LAUNCHER_REPORTS_ENV
    from .train import end_lines

    started = time.time()
    stops: list = []  # (signal, time) of the first stop signal
    env = dict(os.environ, **{LAUNCHER_REPORTS_ENV: "1"})
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner

    def wait(full_cmd: list) -> int:
        child = subprocess.Popen(full_cmd, env=env, start_new_session=True)

        def tree():
            try:
                parent = psutil.Process(child.pid)
                return parent, parent.children()
            except psutil.NoSuchProcess:
                return None, []

        def forward(signum, frame):
            now = time.monotonic()
            if stops:
                if (signum == signal.SIGINT and stops[0][0] == signal.SIGINT
                        and now - stops[0][1] > SAME_PRESS_S):
                    print("\nponder-pt train: second Ctrl-C: stopping the ranks now, without "
                          "saving (the last complete checkpoint is kept)", file=sys.stderr,
                          flush=True)
                    parent, _ = tree()
                    for proc in ([*parent.children(recursive=True), parent] if parent else []):
                        try:
                            proc.kill()
                        except psutil.NoSuchProcess:
                            pass
                return
            stops.append((signum, now))
            if signum == signal.SIGINT:
                print("\nponder-pt train: Ctrl-C: the ranks stop after this step and save "
                      "(Ctrl-C again to exit at once, without saving)", file=sys.stderr,
                      flush=True)
            parent, workers = tree()
            for proc in workers or ([parent] if parent else []):
                try:
                    proc.send_signal(signum)
                except psutil.NoSuchProcess:
                    pass

        previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
        try:
            return child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # the last line names the failing rank and its exception (engine/failures.py)
    code = run_torchrun(cmd, "ponder-pt train", wait)
    ckpt = cfg.checkpoint.dir
    marker = read_marker(ckpt, since=started) if ckpt else None
    signum = marker[1] if marker else (stops[0][0] if stops else None)
    if signum is not None:
        if marker is None:  # stopped before the first step, or killed by a second Ctrl-C
            print(f"stopped ({signal_name(signum)}) with nothing new saved; resume with: "
                  f"{again}", flush=True)
        else:
            for line in end_lines(cfg, 0, marker[0], signum, again):
                print(line, flush=True)
        return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_REQUEUE
    if code == 0:
        from .weights.files import newest_complete, read_meta

        tag = newest_complete(ckpt) if ckpt else None
        step = int(read_meta(ckpt, tag).get("step", 0)) if tag else 0
        for line in end_lines(cfg, 0, step, None, again, more):
            print(line, flush=True)
    return code


def cmd_plot(args) -> int:
    from .engine.plot import plot_runs

    print(plot_runs(args.runs, args.out, labels=args.labels, x=args.x))
    return 0


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import DemoCheckFailed, run_demo

    try:
        run_demo(args.out, quick=args.quick)
    except DemoCheckFailed as exc:
        print(f"ponder-pt demo: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


def _lazy(p, module: str, func: str) -> None:
    """Run `module.func(args)`, importing the module only when the command runs."""
    import importlib

    p.set_defaults(func=lambda args: getattr(importlib.import_module(module), func)(args))


def _add_convert_parsers(sub) -> None:
    from .inference.cli_args import add_option

    p_conv = sub.add_parser("convert", help="training checkpoints <-> Hugging Face directories")
    s_conv = p_conv.add_subparsers(dest="subcommand", required=True)
    p = s_conv.add_parser("to-hf", help="checkpoint (any TP/PP/ZeRO layout) -> HF directory")
    add_option(p, "--model", "--checkpoint", required=True, dest="checkpoint", metavar="DIR",
               help="the run directory (`train --out DIR`) or its checkpoint.dir")
    p.add_argument("--tag", help="step_NNNNNNNN (default: the newest complete one)")
    p.add_argument("--out", required=True, metavar="DIR", help="the HF directory to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--unsafe-unpickle", action="store_true",
                   help="unpickle the checkpoint files fully (runs any code they hold; only for "
                        "files you trust); by default only tensors and DeepSpeed's types load")
    _lazy(p, "ponder_pt.export.to_hf", "cmd_to_hf")
    p = s_conv.add_parser("from-hf", help="HF GPT-NeoX/LLaMA directory -> checkpoint.dir to "
                                          "train from (checkpoint.init_from) or run")
    add_option(p, "--model", "--hf", required=True, dest="hf", metavar="DIR",
               help="the HF model directory (GPT-NeoX, LLaMA or GPT-2, or a ponder-pt export)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the checkpoint.dir to write (with its run_config.yaml)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree to split it for")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree to split it for")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. ponder.steps=3 or pause.rate=0.1")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _lazy(p, "ponder_pt.export.from_hf", "cmd_from_hf")


def build_parser() -> argparse.ArgumentParser:
    from .train import add_train_args

    parser = Parser(prog="ponder-pt", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"ponder-pt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # config
    p_cfg = sub.add_parser("config", help="show, validate and list configurations")
    s_cfg = p_cfg.add_subparsers(dest="subcommand", required=True)
    p = s_cfg.add_parser("show", help="print the resolved config as YAML after validation")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, metavar="N",
                   help="validate the layout for this many processes")
    p.add_argument("--tokenizer", help="validate vocabulary-dependent keys against this tokenizer")
    p.set_defaults(func=cmd_config_show)
    p = s_cfg.add_parser("list", help="list named configs and model presets")
    p.set_defaults(func=cmd_config_list)

    # tokenizer
    p_tok = sub.add_parser("tokenizer", help="train or describe tokenizers")
    s_tok = p_tok.add_subparsers(dest="subcommand", required=True)
    p = s_tok.add_parser("train", help="train a byte-level BPE (tokenizer.json) or sentencepiece model")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".txt or .jsonl files")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="tokens in the vocabulary (before padding)")
    p.add_argument("--type", choices=["bpe", "sentencepiece"], default="bpe",
                   help="byte-level BPE (GPT-NeoX style tokenizer.json) or a sentencepiece "
                        "model (LLaMA style)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--text-key", default="text", help="the text field of .jsonl records")
    p.set_defaults(func=cmd_tokenizer_train)
    p = s_tok.add_parser("info", help="vocab size, EOD id, padded vocab and the <pause> row")
    p.add_argument("path", help="a tokenizer directory, tokenizer.json or sentencepiece .model")
    p.add_argument("--tp", type=int, default=1, help="pad the vocabulary for this TP degree")
    p.add_argument("--divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x --tp")
    p.add_argument("--eod-token", help="end-of-document token (default: the tokenizer's EOS)")
    p.set_defaults(func=cmd_tokenizer_info)

    # data
    from .inference.cli_args import add_option

    p_data = sub.add_parser("data", help="prepare, merge and inspect pretraining data")
    s_data = p_data.add_subparsers(dest="subcommand", required=True)
    p = s_data.add_parser("prepare", help="tokenize corpora into a Megatron indexed dataset")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DATASET",
                   help=".jsonl/.json/.txt/.parquet/.arrow/.csv, a save_to_disk folder, or hf:NAME")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="a `tokenizer train` output (or tokenizer.json / .model)")
    p.add_argument("--out", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin and PREFIX.idx (and PREFIX.stats.json)")
    p.add_argument("--text-key", default="text",
                   help="the text field of .jsonl/.parquet/... records")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--txt-mode", choices=["line", "paragraph", "file"], default="paragraph",
                   help="what a document is in .txt inputs")
    p.add_argument("--eod-token", help="end-of-document token (default: the tokenizer's EOS)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_prepare)
    p = s_data.add_parser("merge", help="concatenate indexed datasets into one prefix")
    add_option(p, "--input", "--inputs", required=True, dest="inputs", nargs="+",
               metavar="PREFIX", help="prepared prefixes, in order")
    p.add_argument("--out", required=True, metavar="PREFIX", help="the merged prefix")
    p.set_defaults(func=cmd_data_merge)
    p = s_data.add_parser("inspect", help="print training samples (tokens, labels, loss mask)")
    p.add_argument("--data", metavar="PREFIX", help="a prepared prefix (or with --config: "
                                                     "instead of its data.train)")
    p.add_argument("--seq-len", type=int, metavar="L", help="tokens per sample")
    p.add_argument("--pause-rate", type=float, metavar="R",
                   help="insert round(R x L) <pause> tokens per sample, as training does")
    p.add_argument("--pause-id", type=int, metavar="ID",
                   help="the <pause> token id (default with --tokenizer: its reserved row)")
    p.add_argument("--num-samples", type=int, default=4, metavar="N", help="samples to print")
    p.add_argument("--start", type=int, default=0, help="first global sample index")
    p.add_argument("--split", choices=["train", "valid", "test"], default="train",
                   help="which split of the data to sample")
    p.add_argument("--seed", type=int, default=1234,
                   help="the shuffle and pause seed (train.seed)")
    p.add_argument("--tokenizer", metavar="DIR", help="decode samples (and find the <pause> row)")
    p.add_argument("--eod-id", type=int, default=0,
                   help="end-of-document id without --tokenizer")
    p.add_argument("--cache-dir", help="where megatron-core caches sample indices")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    _add_config_args(p)
    p.set_defaults(func=cmd_data_inspect)
    p = s_data.add_parser("verify", help="check PREFIX.bin/.idx: index header, .bin size, "
                                         "dtype vs vocabulary (--full: every token id)")
    p.add_argument("prefixes", nargs="+", metavar="PREFIX", help="prepared prefixes to check")
    p.add_argument("--full", action="store_true",
                   help="also scan every token id of the .bin against the vocabulary")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="the vocabulary to check against (else --vocab-size)")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help="the vocabulary size to check token ids against")
    p.add_argument("--json", action="store_true", help="one JSON report per prefix")
    p.set_defaults(func=cmd_data_verify)
    p = s_data.add_parser("corpus", help="write the embedded (stdlib docstring) corpus as jsonl")
    p.add_argument("--out", required=True, metavar="FILE", help="the .jsonl file to write")
    p.add_argument("--max-mb", type=float, default=4.0, help="stop after this many MB of text")
    p.set_defaults(func=cmd_data_corpus)

    # train
    p = sub.add_parser("train", help="pretrain (DeepSpeed ZeRO, TP/PP); see ponder_pt/train.py")
    add_train_args(p)  # the options `deepspeed ponder_pt/train.py` takes too
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (launches torchrun when > 1)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("plot", help="loss curves of runs (their run directories) to a PNG")
    p.add_argument("runs", nargs="+", help="each run's directory (or log.dir), or "
                                           "metrics.jsonl files")
    p.add_argument("--out", default="loss.png", metavar="FILE", help="the PNG to write")
    p.add_argument("--labels", nargs="+",
                   help="one legend label per run (default: each path's last component)")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="the x axis")
    p.set_defaults(func=cmd_plot)

    # convert / generate / eval (command functions live in ponder_pt.export / .inference)
    from .inference import cli_args

    _add_convert_parsers(sub)
    p = sub.add_parser("generate", help="generate text from a checkpoint or an HF directory")
    cli_args.add_generate_args(p)
    _lazy(p, "ponder_pt.inference.generate", "cmd_generate")
    p = sub.add_parser("eval", help="lm-evaluation-harness tasks on a checkpoint or HF directory")
    cli_args.add_eval_args(p)
    _lazy(p, "ponder_pt.inference.evaluation", "cmd_eval")

    # early-exit fine-tuning (ponder_pt.early_exit)
    from .early_exit import finetune_args

    p = sub.add_parser("finetune", help="fine-tune a backbone with early-exit heads (PALBERT "
                                        "Q-exit, PonderNet, PABEE, entropy) on a GLUE task")
    finetune_args.add_args(p)
    _lazy(p, "ponder_pt.early_exit.finetune", "cmd_finetune")

    # supervised fine-tuning with pauses (ponder_pt.sft)
    from .sft import args as sft_args

    p = sub.add_parser("sft", help="supervised fine-tuning of our decoders, M <pause> tokens "
                                   "after each prompt (PauseFT; M=0: standard)")
    sft_args.add_args(p)
    _lazy(p, "ponder_pt.sft.train", "cmd_sft")
    p = sub.add_parser("sft-task", help="write a synthetic task directory for sft (addition, "
                                        "multi-hop variables, sorting)")
    sft_args.add_task_args(p)
    _lazy(p, "ponder_pt.sft.synthetic", "cmd_sft_task")

    # demo
    p = sub.add_parser("demo", help="the embedded end-to-end run on a CPU")
    p.add_argument("--out", default="demo_out", metavar="DIR",
                   help="where the corpus, tokenizer, data and run go")
    p.add_argument("--quick", action="store_true", help="smaller corpus, for smoke tests")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .data.prepare import DataError
    from .weights.files import CheckpointLoadError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError, CheckpointLoadError) as exc:
        if os.environ.get("PONDER_PT_DEBUG"):
            raise
        print(f"ponder-pt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
