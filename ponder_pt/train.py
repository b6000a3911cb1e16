"""Training entry point.

    deepspeed ponder_pt/train.py --config ponderpythia-410m --set data.train=[data/pile]
    torchrun --nproc-per-node 8 -m ponder_pt.train --config ...
    ponder-pt train --nproc 2 --config ...

The config is resolved and validated (against the launcher's world size and the tokenizer's
padded vocabulary) before any process group starts; `--dry-run` prints what would run.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--dry-run" not in sys.argv:
    # a stop signal (SLURM's time limit or preemption, Ctrl-C through torchrun) can arrive
    # while the imports below run; caught from here on (preemption imports nothing else), it
    # is remembered instead of killing the rank. The batch script requeues ranks killed even
    # earlier (slurm/pretrain.sh)
    from ponder_pt.engine.preemption import catch_early

    catch_early()

import argparse  # noqa: E402
import shlex  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

# absolute imports: this file is also run as a script by the deepspeed launcher
from ponder_pt.config import Config, check, config_to_yaml, fill_vocab, load_config
from ponder_pt.launch_env import launcher_reports

DEFAULT_VOCAB = 50304  # GPT-NeoX-20B tokenizer padded to 128, used by --dry-run without data


def torchrun_command(nproc: int, config: str, overrides: Sequence[str], extra=()) -> list[str]:
    """The command that runs this entry point in `nproc` processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "ponder_pt.train", "--config", config]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + list(extra)


def resolve(config: Optional[str], overrides: Sequence[str], world_size: int,
            need_tokenizer: bool = True) -> tuple[Config, object]:
    """Config + tokenizer with the vocabulary-dependent fields filled in, validated."""
    cfg = load_config(config, overrides, validate=False)
    tok = None
    if cfg.data.tokenizer and (need_tokenizer or os.path.exists(cfg.data.tokenizer)):
        from ponder_pt.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.data.tokenizer)
    elif need_tokenizer:
        from ponder_pt.config import ConfigError

        raise ConfigError("data.tokenizer: not set; point it at the tokenizer used for "
                          "`ponder-pt data prepare`")
    if tok is not None:
        fill_vocab(cfg, tok)
    elif cfg.model.vocab_size is None:
        cfg.model.vocab_size = DEFAULT_VOCAB
    check(cfg, world_size=world_size, vocab_size=cfg.model.vocab_size)
    _check_optional_packages(cfg)
    if need_tokenizer and not cfg.data.train:
        from ponder_pt.config import ConfigError

        raise ConfigError("data.train: no training data; set it to the PREFIX written by "
                          "`ponder-pt data prepare` (or a weighted list)")
    if need_tokenizer:  # a truncated .bin or a foreign .idx fails here, not at some step
        from ponder_pt.data.verify import check_data, config_prefixes

        check_data(config_prefixes(cfg, with_keys=True), tokenizer=tok,
                   model_vocab=cfg.model.vocab_size)
    return cfg, tok


def _check_optional_packages(cfg: Config) -> None:
    import importlib.util

    from ponder_pt.config import ConfigError

    missing = [f"log.{key}=true needs the {key!r} package: pip install {pip} "
               f"(or set log.{key}=false)"
               for key, pip in (("tensorboard", "tensorboard"), ("wandb", "'ponder-pt[wandb]'"))
               if getattr(cfg.log, key) and importlib.util.find_spec(key) is None]
    if missing:
        raise ConfigError(missing)


def ranks_per_node(world_size: int, given: Optional[int] = None) -> int:
    """Ranks on one node, for the interconnect estimate: `given`, else what the sbatch script
    or SLURM says, else 8 (GPUs per node) up to the world size."""
    for value in (given, os.environ.get("PONDER_PT_RANKS_PER_NODE"),
                  os.environ.get("SLURM_NTASKS_PER_NODE")):
        count = str(value or "").split("(")[0]  # SLURM writes "2(x3)" for 3 nodes of 2
        if count.isdigit() and int(count) > 0:
            return int(count)
    return min(world_size, 8)


def dry_run_report(cfg: Config, world_size: int, launch: str,
                   mfu_from: Optional[str] = None, interconnect: Optional[str] = None,
                   per_node: Optional[int] = None) -> str:
    from ponder_pt.engine import comm_model
    from ponder_pt.engine.estimate import (format_duration, format_estimate, memory_estimate,
                                           time_estimate)
    from ponder_pt.engine.flops import param_count, run_flops_per_token

    m, tr, par = cfg.model, cfg.train, cfg.parallel
    dp = world_size // (par.tp * par.pp)
    params = param_count(m, m.vocab_size)
    fpt = run_flops_per_token(cfg)
    tokens = tr.iters * tr.global_batch * cfg.data.seq_len
    lines = [
        "# resolved config",
        config_to_yaml(cfg).rstrip(),
        "# world layout",
        f"world_size: {world_size} = tp {par.tp} x pp {par.pp} x dp {dp}",
        f"batch: global {tr.global_batch} = micro {tr.micro_batch} x dp {dp} x grad-accum "
        f"{tr.global_batch // (tr.micro_batch * dp)}; {tr.global_batch * cfg.data.seq_len:,} "
        "tokens/step",
        f"zero_stage: {par.zero_stage}  precision: {tr.precision}  sequence_parallel: "
        f"{par.sequence_parallel}",
        "# model",
        f"parameters: {params['total']:,} total, {params['non_embedding']:,} non-embedding",
        f"flops_per_token: {fpt:.4g} (training, " + (
            f"latent thoughts: {cfg.thoughts.count} per token, Jacobi iterations from "
            f"{cfg.thoughts.train_iters})" if cfg.thoughts.count else
            f"1 pass over {cfg.pause.every_token + 1} slots per token: every-token pauses)"
            if cfg.pause.every_token else
            f"{cfg.ponder.steps + 1} pass{'es' if cfg.ponder.steps else ''})"),
        f"total: {tokens:,} tokens, {fpt * tokens:.3g} FLOPs",
    ]
    lines += adaptive_decode_lines(cfg, fpt)
    lines += thoughts_lines(cfg, fpt)
    tim = time_estimate(cfg, world_size, mfu_from)
    lines += format_estimate(memory_estimate(cfg, world_size), tim)
    rpn = ranks_per_node(world_size, per_node)
    comm = comm_model.estimate(cfg, world_size, rpn)
    gbps, latency, fabric = comm_model.parse_interconnect(interconnect)
    lines += comm_model.format_comm(comm, tim["seconds"] / tr.iters, gbps, latency,
                                    f"{fabric} ({rpn} ranks per node)")
    if comm.nodes > 1:
        total = tim["seconds"] + tr.iters * comm.seconds(gbps, latency)
        bound = "about" if par.pp > 1 else "at most"  # pipeline stalls: comm_model.format_comm
        lines.append(f"time to train with communication: {bound} {format_duration(total)} "
                     f"({tim['gpus'] * total / 3600:,.0f} GPU-hours)")
    from ponder_pt.data.verify import dry_run_lines  # unset/absent data and tokenizer

    lines += dry_run_lines(cfg, DEFAULT_VOCAB)
    lines += ["# launch", launch]
    return "\n".join(lines)


def adaptive_decode_lines(cfg: Config, train_fpt: float) -> list[str]:
    """Dry-run lines of adaptive pondering: training pays every pass; decoding pays the
    passes tokens take, shown at each mean from 1 to K+1 (context: data.seq_len)."""
    from ponder_pt.engine.flops import decode_flops_per_token

    h, K = cfg.ponder.halting, cfg.ponder.steps
    if not cfg.ponder.adaptive:
        return []
    m, ctx = cfg.model, cfg.data.seq_len
    full = decode_flops_per_token(m, m.vocab_size, ctx, K + 1, cfg.ponder.feedback)
    lines = ["# adaptive pondering",
             f"halting: {h.mode}, train_exits {h.train_exits}, q {h.q}, beta {h.beta}, prior "
             f"{h.prior}{', head_only' if h.head_only else ''}",
             f"training still pays all {K + 1} passes for every token ({train_fpt:.4g} "
             "FLOPs/token above): every pass's loss and exit probability are trained",
             f"decode FLOPs/token at context {ctx} by mean passes per token (fixed K = {K}: "
             f"{full:.4g}):"]
    for passes in [1 + i * 0.5 for i in range(2 * K + 1)]:
        flops = decode_flops_per_token(m, m.vocab_size, ctx, passes, cfg.ponder.feedback)
        lines.append(f"  {passes:.1f} passes: {flops:.4g} ({flops / full:.0%} of fixed K)")
    return lines


def thoughts_lines(cfg: Config, train_fpt: float) -> list[str]:
    """Dry-run lines of latent thoughts: training's passes, decoding's slots, the KV cache."""
    from ponder_pt.engine.flops import (decode_flops_per_token, flops_per_token,
                                        thought_pass_slots)

    t, m, ctx = cfg.thoughts, cfg.model, cfg.data.seq_len
    if not t.count:
        return []
    plain = flops_per_token(m, m.vocab_size, ctx)
    decode = decode_flops_per_token(m, m.vocab_size, ctx, 1, thoughts=t.count)
    plain_decode = decode_flops_per_token(m, m.vocab_size, ctx, 1)
    kv = 2 * m.num_layers * m.kv_heads * m.head_dim * (4 if cfg.train.precision == "fp32" else 2)
    return ["# latent thoughts",
            f"training: M = {t.count} thought(s) per token; per step n Jacobi iterations drawn "
            f"from {t.train_iters}; passes over "
            + ", ".join(f"n = {n}: {thought_pass_slots(t.count, n)} slots per token"
                        for n in t.train_iters)
            + f"; {train_fpt / plain:.1f}x a plain model's training FLOPs/token",
            f"decoding: {t.count + 1} one-slot passes per token over {t.count + 1}x as many "
            f"cached slots: {decode:.4g} FLOPs/token at context {ctx} ({decode / plain_decode:.1f}x "
            f"plain); prefill {t.prefill}"
            + (f" ({t.jacobi_iters} Jacobi iterations)" if t.prefill == "jacobi" else
               " (slot after slot)"),
            f"KV cache: {(t.count + 1) * kv:,} B per token and sequence ({t.count + 1}x plain)"]


def _interconnect(value: str) -> str:
    """--interconnect, checked as it is parsed (a clear usage error, not a traceback)."""
    from ponder_pt.engine.comm_model import parse_interconnect

    try:
        parse_interconnect(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_interconnect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interconnect", metavar="FABRIC|GBPS[@US]", default=None,
                   type=_interconnect,
                   help="with --dry-run: the link between nodes, a fabric name (ib-8x400, "
                        "ib-8x200, ib-400, roce-400, eth-100, eth-25, eth-10; default "
                        "ib-8x400) or Gbit/s per node with an optional latency in µs")
    p.add_argument("--ranks-per-node", type=int, default=None, metavar="N",
                   help="with --dry-run: ranks on one node (default: the sbatch script's, "
                        "SLURM_NTASKS_PER_NODE, else 8)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The options of a training run, for both of its command lines: `ponder-pt train` (which
    adds --nproc) and this entry point under a launcher (which takes --local_rank)."""
    p.add_argument("--config", required=True, metavar="NAME_OR_YAML",
                   help="named config (see `ponder-pt config list`) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="the run directory (run.dir): checkpoints/, metrics.jsonl, "
                        "tensorboard/, loss.png, run_config.yaml; an existing run there is "
                        "resumed (default: a new directory under runs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="print resolved config, layout, parameters, FLOPs/token, per-GPU "
                        "memory and time-to-train estimates, launch command; train nothing")
    p.add_argument("--mfu-from", metavar="FILE", default=None,
                   help="with --dry-run: a gpu_results.json whose measured MFU the time "
                        "estimate uses (default: benchmarks/results/*/gpu_results.json)")
    add_interconnect_args(p)


def build_parser() -> argparse.ArgumentParser:
    """This entry point's command line (`deepspeed ponder_pt/train.py ...`,
    `torchrun -m ponder_pt.train ...`)."""
    p = argparse.ArgumentParser(prog="ponder_pt/train.py", description=__doc__.split("\n")[0])
    add_train_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def command_line(config: Optional[str], overrides: Sequence[str], run_dir: Optional[str] = None,
                 nproc: int = 1, prog: Sequence[str] = ("ponder-pt", "train")) -> str:
    """The shell command that runs this training again (in `run_dir`: resumes it)."""
    parts = [*prog, "--config", config or "custom"]
    last = {item.split("=", 1)[0].strip(): i for i, item in enumerate(overrides)}
    for i, item in enumerate(overrides):
        key = item.split("=", 1)[0].strip()
        if last[key] == i and (run_dir is None or key != "run.dir"):  # the last one wins
            parts += ["--set", item]
    if run_dir is not None:
        parts += ["--out", run_dir]
    if nproc > 1:
        parts += ["--nproc", str(nproc)]
    return shlex.join(parts)


def prepare_run(cfg: Config, config: Optional[str], world_size: int):
    """The run's directory and what it resumes, settled before any process group starts;
    the resume plan (None: a fresh run). A multi-rank launch that names no directory gets
    one from rank 0 later (`share_run_dir`)."""
    from ponder_pt.config.resume import plan_resume
    from ponder_pt.config.run_dir import place_run

    place_run(cfg, config, create=world_size == 1)
    return plan_resume(cfg) if cfg.run.dir else None


def share_run_dir(cfg: Config, config: Optional[str]) -> None:
    """Ranks launched without a run directory: rank 0 makes a new one for all of them."""
    from ponder_pt.config.run_dir import fill_dirs, new_run_dir, run_name
    from ponder_pt.engine import distributed as D

    if cfg.run.dir is None:
        import torch.distributed as dist

        made = new_run_dir(run_name(cfg, config)) if dist.get_rank() == 0 else None
        fill_dirs(cfg, D.from_main(made))


def start_lines(cfg: Config, plan) -> list[str]:
    """What a run says first: where it lives, where checkpoints go, what it resumes."""
    ck = cfg.checkpoint
    lines = [f"run directory: {cfg.run.dir}"
             + (f" (logs in {cfg.log.dir})" if cfg.log.dir != cfg.run.dir else "")]
    if ck.dir:
        lines.append(f"checkpoints: {ck.dir}, every {ck.interval} steps, at the end and when "
                     "stopped (Ctrl-C, SIGTERM, SIGUSR1)")
    else:
        lines.append("checkpoints: off (checkpoint.save=false): a stop loses the run")
    if plan is not None:
        lines += plan.describe()
    return lines


def end_lines(cfg: Config, code: int, step: int, signum: Optional[int], again: str,
              more: Optional[str] = None) -> list[str]:
    """What a run says last: how to export and resume it, or why it stopped. `again` is the
    command that runs it again in the same directory, `more` the one that trains it further."""
    from ponder_pt.engine.preemption import signal_name

    run_dir, ck = cfg.run.dir, cfg.checkpoint.dir
    if signum is not None:
        if not ck:
            return [f"stopped at step {step} ({signal_name(signum)}), nothing saved "
                    "(checkpoint.save=false)"]
        return [f"stopped at step {step} ({signal_name(signum)}), saved; resume with: {again}"]
    if code != 0 or not ck:
        return []
    return [f"finished {step} steps in {run_dir}",
            f"  export:   ponder-pt convert to-hf --model {run_dir} --out "
            f"{os.path.join(run_dir, 'hf')}",
            f"  continue: {more or again + f' --set train.iters={2 * step}'}"]


def run(config: Optional[str], overrides: Sequence[str], dry_run: bool = False,
        launch: Optional[str] = None, world_size: Optional[int] = None,
        mfu_from: Optional[str] = None, interconnect: Optional[str] = None,
        per_node: Optional[int] = None, again: Optional[str] = None) -> int:
    """Train (or with `dry_run`, report). `again`: the command that resumes this run, for
    its last line (default: `ponder-pt train` with the same config and settings)."""
    from ponder_pt.engine import distributed as D

    world_size = world_size or D.env_world_size()
    cfg, tok = resolve(config, overrides, world_size, need_tokenizer=not dry_run)
    if dry_run:
        launch = launch or os.environ.get("PONDER_PT_LAUNCH") or command_line(
            config, overrides, prog=(sys.executable, "-m", "ponder_pt.train"))
        print(dry_run_report(cfg, world_size, launch, mfu_from, interconnect, per_node))
        return 0
    plan = prepare_run(cfg, config, world_size)
    from ponder_pt.engine.trainer import Trainer

    world = D.init(cfg.parallel.tp, cfg.parallel.pp, cfg.dist.timeout)
    share_run_dir(cfg, config)
    report = world.is_main and not launcher_reports()
    finished = False
    try:
        if world.world_size > 1:
            where = D.describe_world()
            if world.is_main:
                print(where, flush=True)
        if world.is_main:
            print("\n".join(start_lines(cfg, plan)), flush=True)
        if cfg.parallel.pp > 1:
            from ponder_pt.engine.pipeline import PipelineTrainer as TrainerClass
        else:
            TrainerClass = Trainer
        try:
            trainer = TrainerClass(cfg, tok, world)
            code = trainer.train()
        except RuntimeError as exc:  # a peer rank gone: say which, for the job's last line
            why = D.explain_comm_error(exc, cfg.dist.timeout)
            if why is None:
                raise
            raise D.PeerLost(why) from exc
        finished = True
    finally:
        D.shutdown(clean=finished)
    if report:
        if again is None and os.environ.get("SLURM_JOB_ID") and world_size > 1:
            again = f"the same job script, with RUN_DIR={cfg.run.dir}"
        more = None if again else command_line(
            config, [*overrides, f"train.iters={2 * trainer.last_step}"], cfg.run.dir, world_size)
        again = again or command_line(config, overrides, cfg.run.dir, world_size)
        for line in end_lines(cfg, code, trainer.last_step, trainer.stop_signal, again, more):
            print(line, flush=True)
    if trainer.stop_signal is not None and launcher_reports():
        return 0  # the launcher reports the stop (torchrun would report an exit code as a crash)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not args.dry_run:  # before anything slow
        from ponder_pt.engine.preemption import catch_early

        catch_early()
    # torch elastic's @record: torchrun's failure summary names the rank and its exception,
    # and a failing rank ends its output with one line (ponder_pt/engine/failures.py)
    from ponder_pt.config import ConfigError
    from ponder_pt.data.prepare import DataError
    from ponder_pt.engine.failures import run_cli
    from ponder_pt.weights.files import CheckpointLoadError

    if args.out:
        args.overrides.append(f"run.dir={args.out}")
    return run_cli("ponder-pt train", lambda: run(args.config, args.overrides, args.dry_run,
                                                  mfu_from=args.mfu_from,
                                                  interconnect=args.interconnect,
                                                  per_node=args.ranks_per_node),
                   (ConfigError, DataError, FileNotFoundError, CheckpointLoadError))


if __name__ == "__main__":
    sys.exit(main())
