"""Supervised fine-tuning of our decoders with pause tokens (`ponder-pt sft`, PauseFT).

Modules: `tasks` (task directories, hub datasets), `examples` (prompt + M pauses + answer,
labels), `metrics` (EM / F1 / numeric match / multiple-choice accuracy, pause-aware),
`evaluate` (scoring a model on a task), `backbone` (checkpoint or HF export -> our PonderLM),
`train` (the DeepSpeed loop and the command), `synthetic` (`ponder-pt sft-task`), `args`.
"""
