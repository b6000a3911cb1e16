"""The CLI's surface: every option of every (nested) subcommand has help and shows its default,
the same things are spelled the same way across commands (older spellings still parse, out of
sight), and the dry run's time estimate reads as a GPU estimate with the right number."""

from __future__ import annotations

import argparse
import re

import pytest

from ponder_pt.cli import build_parser


def _parsers(parser, path=()):
    """(command path, parser) of the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _trivial(default) -> bool:
    return (default is None or default is False or default is argparse.SUPPRESS
            or (isinstance(default, (str, list, tuple, dict)) and not default))


def _flat(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_every_option_has_help_and_shows_its_default():
    problems, checked, defaults = [], 0, 0
    for path, parser in _parsers(build_parser()):
        command = " ".join(("ponder-pt", *path))
        parser.format_help()  # a bad %-placeholder in any help string raises here
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                problems += [f"{command} {name}: no help line" for name in action.choices
                             if not helps.get(name)]
                continue
            if action.help is argparse.SUPPRESS:  # older spellings, worker-only flags
                continue
            name = "/".join(action.option_strings) or action.dest
            checked += 1
            if not action.help:
                problems.append(f"{command} {name}: no help")
                continue
            if _trivial(action.default):
                continue
            defaults += 1
            shown = _flat(parser._get_formatter()._format_action(action))
            if "default" not in shown or _flat(str(action.default)) not in shown:
                problems.append(f"{command} {name}: default {action.default!r} not in its help")
    assert not problems, "\n".join(problems)
    assert checked > 150 and defaults > 40, (checked, defaults)  # the walk reached them all


def test_the_default_shows_in_nested_subcommands():
    """Formatted as a user sees it: `ponder-pt convert from-hf --help`."""
    parser = build_parser()
    convert = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = next(a for a in convert.choices["convert"]._actions
               if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["from-hf"].format_help().split())
    assert "tensor-parallel degree to split it for (default: 1)" in text
    assert text.count("(default: None)") == 0 and "(default: False)" not in text


# (command, old spelling, its one name now, the rest of the arguments, dest, value)
OLD_AND_NEW = [
    (["convert", "to-hf"], "--checkpoint", "--model", ["R", "--out", "H"], "checkpoint", "R"),
    (["convert", "from-hf"], "--hf", "--model", ["H", "--out", "C"], "hf", "H"),
    (["finetune"], "--backbone", "--model", ["B", "--task", "rte"], "backbone", "B"),
    (["generate"], "--output", "--out", ["o.jsonl", "--model", "M", "--prompts-file", "p.txt"],
     "output", "o.jsonl"),
    (["eval"], "--output", "--out", ["r.json", "--model", "M", "--tasks", "t"], "output",
     "r.json"),
    (["data", "merge"], "--inputs", "--input", ["a", "b", "--out", "m"], "inputs", ["a", "b"]),
]


def _help_of(parser, command: list[str]) -> str:
    for name in command:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser.format_help()


@pytest.mark.parametrize("command,old,new,rest,dest,value", OLD_AND_NEW,
                         ids=[" ".join(case[0]) for case in OLD_AND_NEW])
def test_one_spelling_per_thing_and_the_old_ones_still_work(command, old, new, rest, dest,
                                                           value, capsys):
    parser = build_parser()
    before = parser.parse_args([*command, old, *rest])
    now = parser.parse_args([*command, new, *rest])
    assert vars(before).keys() == vars(now).keys()
    assert getattr(before, dest) == getattr(now, dest) == value
    # only the one name is advertised; two spellings at once are an error
    shown = _help_of(parser, command).split()
    assert new in shown and old not in shown
    with pytest.raises(SystemExit):
        parser.parse_args([*command, new, *rest, old, "x"])
    assert "not allowed with" in capsys.readouterr().err


def test_a_missing_model_names_the_one_spelling(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["convert", "to-hf", "--out", "H"])
    assert exc.value.code == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err


def test_dry_run_time_estimate_is_a_gpu_estimate_in_good_grammar():
    from ponder_pt.config import load_config
    from ponder_pt.engine.estimate import format_estimate, memory_estimate, time_estimate

    cfg = load_config("tiny", ["model.vocab_size=4096", "train.precision=fp32"], validate=False)
    for world, said in ((1, "on 1 GPU ="), (2, "on 2 GPUs =")):
        tim = time_estimate(cfg, world)
        text = "\n".join(format_estimate(memory_estimate(cfg, world), tim))
        heading = next(line for line in text.splitlines() if line.startswith("# time to train"))
        assert f"GPU estimate: {world} x {tim['gpu']}" in heading, heading
        assert said in text and "1 GPUs" not in text, text


def test_generate_out_goes_with_a_prompts_file(tmp_path, capsys):
    """--out writes the JSON lines of --prompts-file; with one --prompt it would be ignored,
    so it is refused before any model loads."""
    from ponder_pt.cli import main

    assert main(["generate", "--model", str(tmp_path), "--prompt", "Hi", "--out", "x.jsonl"]) == 2
    assert "--out FILE goes with --prompts-file" in capsys.readouterr().err
