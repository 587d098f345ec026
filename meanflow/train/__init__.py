"""The trainer's infrastructure (DESIGN §4, ``train/``): configuration, checkpoints, EMA, logging.

- :mod:`.config`: :class:`TrainConfig` and its sections, :func:`load_config` (preset, YAML file,
  overrides), :class:`ConfigError`, :func:`save_yaml`; presets in ``presets/*.yaml``.
- :mod:`.structured`: the generic dict <-> dataclass machinery behind it.
"""
from .config import (ConfigError, DataConfig, EvalConfig, LossConfig, MethodConfig, ModelConfig,
                     OptimConfig, RunConfig, SampleConfig, TrainConfig, deep_merge, from_dict,
                     list_presets, load_config, load_preset, parse_overrides, save_yaml, to_dict)

__all__ = [
    "ConfigError", "TrainConfig", "RunConfig", "ModelConfig", "DataConfig", "OptimConfig",
    "MethodConfig", "LossConfig", "SampleConfig", "EvalConfig",
    "from_dict", "to_dict", "parse_overrides", "deep_merge",
    "load_config", "load_preset", "list_presets", "save_yaml",
]
