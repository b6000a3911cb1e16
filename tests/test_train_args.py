"""`ponder-pt train` and the training entry point (`deepspeed ponder_pt/train.py`,
`torchrun -m ponder_pt.train`) take the same options from one definition: the same flags,
help and defaults, plus --nproc for the CLI and the launcher's hidden --local_rank."""

from __future__ import annotations

import argparse

from ponder_pt import train
from ponder_pt.cli import build_parser


def _options(parser: argparse.ArgumentParser) -> dict:
    return {a.option_strings[0]: (tuple(a.option_strings), a.help, a.default, a.required)
            for a in parser._actions if a.option_strings and a.dest != "help"}


def test_both_command_lines_take_the_same_options():
    cli = build_parser()
    sub = next(a for a in cli._actions if isinstance(a, argparse._SubParsersAction))
    ours, entry = _options(sub.choices["train"]), _options(train.build_parser())
    assert ours.pop("--nproc")[2] == 1
    assert entry.pop("--local_rank")[1] is argparse.SUPPRESS
    assert ours == entry
    assert {"--config", "--set", "--out", "--dry-run", "--mfu-from", "--interconnect",
            "--ranks-per-node"} <= set(entry)
    argv = ["--config", "tiny", "--set", "train.iters=2", "--dry-run", "--interconnect",
            "eth-100", "--ranks-per-node", "4"]
    a, b = cli.parse_args(["train", *argv]), train.parse_args([*argv, "--local_rank=0"])
    for key in ("config", "overrides", "out", "dry_run", "mfu_from", "interconnect",
                "ranks_per_node"):
        assert getattr(a, key) == getattr(b, key), key
    assert (a.nproc, b.local_rank) == (1, 0)
