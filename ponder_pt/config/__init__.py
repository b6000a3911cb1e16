"""Typed configuration: schema, named presets, YAML/CLI loading and validation, and the run
configs saved next to checkpoints."""

from .errors import ConfigError
from .loader import load_config
from .presets import MODEL_PRESETS, RUN_PRESETS
from .resolve import load_run_config, write_run_config
from .schema import (CheckpointConfig, Config, DataConfig, LogConfig, ModelConfig, ParallelConfig,
                     PauseConfig, PonderConfig, ThoughtsConfig, TrainConfig,
                     parse_blend)
from .tree import config_to_dict, config_to_yaml, parse_override
from .validate import check, problems
from .vocab import fill_vocab

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LogConfig", "MODEL_PRESETS",
    "ModelConfig", "ParallelConfig", "PauseConfig", "PonderConfig", "RUN_PRESETS", "ThoughtsConfig",
    "TrainConfig",
    "check", "config_to_dict", "config_to_yaml", "fill_vocab", "load_config", "load_run_config", "parse_blend",
    "parse_override", "problems", "write_run_config",
]
