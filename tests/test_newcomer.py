"""The README's first section, "Your own text -> tokenizer -> data -> tiny model -> export ->
generate", run as a newcomer would: its marked block's commands, as written, one after another
in an empty directory holding only `my_text.jsonl`. Then `eval` with a hub task where the Hub
cannot be reached: one line that says so, not a traceback."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- newcomer"
# The README trains `tiny` for its 300 steps (minutes on a laptop, far more on CI's 2 shared
# cores); the path it takes (run directory, checkpoint, export, generation) is the same after
# a few steps, so the test appends this to the training command and changes nothing else.
FEW_STEPS = ["--set", "train.iters=4"]


def newcomer_commands() -> list[list[str]]:
    """The argv of each command in the README's marked block (continuations joined, comments
    and blank lines dropped), split as a POSIX shell splits them."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert text.count(MARK) == 1, f"README.md: expected one {MARK} marker"
    block = re.search(r"```\w*\n(.*?)```", text[text.index(MARK):], re.S)
    assert block, "README.md: no fenced block after the newcomer marker"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines]
    return [argv for argv in commands if argv]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def walked(corpus, tmp_path_factory):
    """Each command's argv and result, run in a fresh directory with the user's text in it
    (the suite's shared docstring corpus standing in for it)."""
    cwd = tmp_path_factory.mktemp("newcomer")
    shutil.copy(corpus, cwd / "my_text.jsonl")
    done = []
    for argv in newcomer_commands():
        assert argv[0] == "ponder-pt", f"the README's newcomer block runs ponder-pt only: {argv}"
        run = [sys.executable, "-m", "ponder_pt", *argv[1:]]
        if argv[1] == "train":
            run += FEW_STEPS
        proc = subprocess.run(run, cwd=cwd, env=_env(), capture_output=True, text=True,
                              timeout=600)
        done.append((argv, proc))
        assert proc.returncode == 0, (f"README newcomer command failed: {shlex.join(argv)}\n"
                                      + proc.stdout[-3000:] + proc.stderr[-3000:])
    return {"cwd": cwd, "done": done}


def _value(walked, command: str, flag: str) -> str:
    """The value of `flag` in the README's `ponder-pt COMMAND ...` line."""
    argv = next(argv for argv, _ in walked["done"] if argv[1] == command)
    return argv[argv.index(flag) + 1]


def test_the_readme_newcomer_block_runs_as_written(walked):
    steps = [argv[1] for argv, _ in walked["done"]]
    assert steps == ["tokenizer", "data", "train", "convert", "generate"], steps
    cwd = walked["cwd"]
    run_dir = cwd / _value(walked, "train", "--out")
    for made in ("checkpoints/latest", "metrics.jsonl", "loss.png", "run_config.yaml"):
        assert (run_dir / made).exists(), made
    train = walked["done"][2][1]
    assert "finished 4 steps" in train.stdout, train.stdout[-2000:]
    assert (cwd / _value(walked, "convert", "--out") / "config.json").exists()
    # generate prints the prompt, then the new text
    argv, gen = walked["done"][-1]
    prompt = _value(walked, "generate", "--prompt")
    said = gen.stdout.rstrip("\n")
    assert said.startswith(prompt) and said[len(prompt):].strip(), gen.stdout
    assert "Traceback" not in gen.stderr, gen.stderr[-3000:]


def test_eval_of_a_hub_task_offline_is_one_line(walked):
    """lm-eval's hub tasks with no way to the Hub: the datasets are read before the model
    loads, and the failure is one line naming the task and the local option."""
    pytest.importorskip("lm_eval")
    export = _value(walked, "convert", "--out")
    env = dict(_env(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(walked["cwd"] / "empty_datasets_cache"))
    proc = subprocess.run([sys.executable, "-m", "ponder_pt", "eval", "--model", export,
                           "--tasks", "lambada_openai", "--limit", "2"], cwd=walked["cwd"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ponder-pt: error: cannot reach the Hugging Face Hub for lm-eval "
                           "task lambada_openai"), last
    assert "--include-path" in last, last
