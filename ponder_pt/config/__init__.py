"""Typed configuration: schema, named presets, YAML/CLI loading and validation."""

from .loader import ConfigError, config_to_dict, config_to_yaml, load_config, parse_override
from .presets import MODEL_PRESETS, RUN_PRESETS
from .schema import (CheckpointConfig, Config, DataConfig, LogConfig, ModelConfig, ParallelConfig,
                     PauseConfig, PonderConfig, TrainConfig, parse_blend)
from .validate import check, problems

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LogConfig", "MODEL_PRESETS",
    "ModelConfig", "ParallelConfig", "PauseConfig", "PonderConfig", "RUN_PRESETS", "TrainConfig",
    "check", "config_to_dict", "config_to_yaml", "load_config", "parse_blend", "parse_override",
    "problems",
]
