"""Fine-tuning configuration: exit strategy, optimisation, evaluation.

`ponder-pt finetune --exit NAME` starts from the preset NAME (the papers' defaults), a YAML
file (`--config`) and `--set section.key=value` override it, exactly as for pretraining.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

from ..config.errors import ConfigError, suggest
from ..config.schema import LogConfig
from ..config.tree import build, deep_merge, load_raw_yaml, parse_override, set_path

STRATEGIES = ("none", "palbert", "pondernet", "pabee", "entropy")
KL_DIRECTIONS = ("p_prior", "prior_p")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ExitConfig:
    strategy: str = "none"
    """none (last layer) | palbert (Q-exit) | pondernet (sampled exit) | pabee | entropy."""
    beta: float = 0.5
    """Weight of the KL to the geometric prior (palbert, pondernet)."""
    prior_lambda: float = 0.1
    """λ_p of the truncated geometric prior."""
    kl: str = "p_prior"
    """p_prior = KL(p ‖ prior), the papers' formula; prior_p = KL(prior ‖ p), the public code's."""
    epsilon: float = 0.05
    """Training: once a sample's exit CDF passes 1-ε its later layers leave the task loss
    (p = ε/N in the KL), and unrolling stops when every sample in the batch has."""
    lambda_layers: int = 3
    """Depth of the halting MLP on [h_i; h_{i-1}]: tanh hidden layers before the output unit."""
    q: float = 0.5
    """Q-exit threshold: exit at the first layer whose exit CDF exceeds q."""
    patience: int = 6
    """PABEE: exit once this many consecutive layers agree with the previous one."""
    regression_threshold: float = 0.1
    """PABEE on regression tasks: consecutive predictions 'agree' when |Δ| < τ."""
    entropy: float = 0.3
    """DeeBERT: exit at the first layer whose prediction entropy (nats) is below S."""
    seed: int = 0
    """Seed of PonderNet's exit draws (per sample, so batching does not change them)."""
    dropout: float = 0.1
    """Dropout on pooled vectors before the heads (training only)."""


@dataclass
class TrainConfig:
    lr: float = 1e-5
    """Backbone and classification heads."""
    exit_lr: float = 1e-5
    """Halting network (the λ MLP)."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 10
    max_steps: int = 0
    """0 = epochs decide."""
    batch_size: int = 32
    """Global batch size (split over data-parallel ranks)."""
    max_length: int = 128
    eval_every: int = 0
    """Validate every N optimizer steps; 0 = at the end of every epoch."""
    early_stop: int = 3
    """Stop after this many validations without improvement; 0 = never stop early."""
    seed: int = 42
    precision: str = "fp32"
    zero_stage: int = 0
    max_train_samples: int = 0
    """0 = all; otherwise the first N (for quick runs)."""


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_eval_samples: int = 0
    sweep: list = field(default_factory=list)
    """Thresholds for the metric-vs-threshold sweep (q, patience or S); empty = defaults."""
    timing_repeats: int = 1
    """Timed passes over the validation set per measurement, after one untimed warm-up pass
    (the fastest is reported)."""
    batch1: bool = True
    """Also time the classic batch-size-1 exit (and the full model at batch size 1)."""


@dataclass
class FinetuneConfig:
    backbone: str = ""
    """HF directory or hub name (ALBERT, BERT, RoBERTa, or our GPT-NeoX/LLaMA exports)."""
    task: str = ""
    """GLUE task name (rte, mrpc, stsb, cola, sst2, qnli, qqp, mnli) or a local directory."""
    task_format: str = ""
    """GLUE task whose columns and labels a local task directory has, when neither its name
    (RTE/, SST-2/, ...) nor a task.json says (`--task-format rte`; mnli_mismatched picks
    MNLI's dev_mismatched.tsv)."""
    out: str = "finetune_out"
    trust_remote_code: bool = False
    """Run Python code shipped in the backbone directory (`--trust-remote-code`); ponder-pt
    exports and stock ALBERT/BERT/RoBERTa/GPT-NeoX/LLaMA models do not need it."""
    exit: ExitConfig = field(default_factory=ExitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    """log.dir defaults to `out`; tensorboard / wandb as for pretraining."""


# The papers' defaults. PALBERT: Adam lr 1e-5 for the backbone and for the λ layers, β 0.5,
# λ_p 0.1, q 0.5, ε 0.05, a 3-layer λ MLP on [h_i; h_{i-1}]; PonderNet (as run by PALBERT's
# code): a single linear λ layer, sampled exit, batch 16; PABEE: lr 1e-5, patience 6.
PRESETS: dict[str, dict] = {
    "none": {"exit": {"strategy": "none"}},
    "palbert": {"exit": {"strategy": "palbert", "beta": 0.5, "prior_lambda": 0.1, "q": 0.5,
                         "epsilon": 0.05, "lambda_layers": 3},
                "train": {"lr": 1e-5, "exit_lr": 1e-5, "batch_size": 32}},
    "pondernet": {"exit": {"strategy": "pondernet", "beta": 0.5, "prior_lambda": 0.1,
                           "epsilon": 0.05, "lambda_layers": 1},
                  "train": {"lr": 1e-5, "exit_lr": 1e-5, "batch_size": 16}},
    "pabee": {"exit": {"strategy": "pabee", "patience": 6, "regression_threshold": 0.1},
              "train": {"lr": 1e-5, "batch_size": 32}},
    "entropy": {"exit": {"strategy": "entropy", "entropy": 0.3},
                "train": {"lr": 2e-5, "batch_size": 32}},
}


def problems(cfg: FinetuneConfig) -> list[str]:
    out = []
    e, t, ev = cfg.exit, cfg.train, cfg.eval
    if not cfg.backbone:
        out.append("backbone: required (--backbone DIR_OR_NAME)")
    if not cfg.task:
        out.append("task: required (--task NAME_OR_DIR)")
    if e.strategy not in STRATEGIES:
        out.append(f"exit.strategy: {e.strategy!r} is not one of {', '.join(STRATEGIES)}"
                   f"{suggest(e.strategy, STRATEGIES)}")
    if e.kl not in KL_DIRECTIONS:
        out.append(f"exit.kl: {e.kl!r} is not one of {', '.join(KL_DIRECTIONS)}")
    if not 0 < e.prior_lambda < 1:
        out.append(f"exit.prior_lambda: {e.prior_lambda} must be in (0, 1)")
    if not 0 < e.q < 1:
        out.append(f"exit.q: {e.q} must be in (0, 1)")
    if not 0 <= e.epsilon < 1:
        out.append(f"exit.epsilon: {e.epsilon} must be in [0, 1)")
    if e.beta < 0:
        out.append(f"exit.beta: {e.beta} must be >= 0")
    if e.lambda_layers < 1:
        out.append(f"exit.lambda_layers: {e.lambda_layers} must be >= 1")
    if e.patience < 1:
        out.append(f"exit.patience: {e.patience} must be >= 1 (use exit.strategy=none for the "
                   f"full model)")
    if e.entropy <= 0:
        out.append(f"exit.entropy: {e.entropy} must be > 0")
    if not 0 <= e.dropout < 1:
        out.append(f"exit.dropout: {e.dropout} must be in [0, 1)")
    for key in ("lr", "exit_lr"):
        if getattr(t, key) <= 0:
            out.append(f"train.{key}: must be > 0")
    if t.epochs < 1 and t.max_steps < 1:
        out.append("train.epochs / train.max_steps: one of them must be >= 1")
    if t.batch_size < 1 or ev.batch_size < 1:
        out.append("train.batch_size / eval.batch_size: must be >= 1")
    if t.max_length < 8:
        out.append(f"train.max_length: {t.max_length} is too short (>= 8)")
    if not 0 <= t.warmup_ratio < 1:
        out.append(f"train.warmup_ratio: {t.warmup_ratio} must be in [0, 1)")
    if t.precision not in PRECISIONS:
        out.append(f"train.precision: {t.precision!r} is not one of {', '.join(PRECISIONS)}")
    if t.zero_stage not in (0, 1, 2):
        out.append(f"train.zero_stage: {t.zero_stage}; fine-tuning supports ZeRO 0, 1, 2")
    try:
        [float(x) for x in ev.sweep]
    except ValueError:
        out.append(f"eval.sweep: {ev.sweep} must be numbers")
    return out


def check(cfg: FinetuneConfig, world_size: Optional[int] = None) -> FinetuneConfig:
    found = problems(cfg)
    if world_size and cfg.train.batch_size % world_size:
        found.append(f"train.batch_size: {cfg.train.batch_size} is not divisible by the "
                     f"{world_size} data-parallel processes; pick a multiple of {world_size}")
    if found:
        raise ConfigError(found)
    return cfg


def load_finetune_config(preset: Optional[str] = None, yaml_path: Optional[str] = None,
                         overrides: Iterable[str] = (), validate: bool = True,
                         **top: str) -> FinetuneConfig:
    """Preset (the exit strategy's defaults) < YAML file < top-level args < --set."""
    raw: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--exit {preset!r}: unknown; choose one of {', '.join(PRESETS)}"
                              f"{suggest(preset, PRESETS)}")
        raw = copy.deepcopy(PRESETS[preset])
    if yaml_path:
        raw = deep_merge(raw, load_raw_yaml(yaml_path))
    for key, value in top.items():
        if value is not None:
            raw[key] = value
    for text in overrides:
        path, value = parse_override(text)
        set_path(raw, path, value)
    cfg = build(FinetuneConfig, raw, "")
    return check(cfg) if validate else cfg


def to_dict(cfg: FinetuneConfig) -> dict:
    return asdict(cfg)
