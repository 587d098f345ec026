"""The trainer's infrastructure (DESIGN §4, ``train/``): configuration, checkpoints, EMA, logging.

- :mod:`.config`: :class:`TrainConfig` and its sections, :func:`load_config` (preset, YAML file,
  overrides), :class:`ConfigError`, :func:`save_yaml`; presets in ``presets/*.yaml``.
- :mod:`.structured`: the generic dict <-> dataclass machinery behind it.
- :mod:`.checkpoint`: :func:`save_checkpoint` / :func:`load_checkpoint` (atomic, validated),
  with :mod:`.atomic` (:func:`atomic_write`), :mod:`.codec` (optimizer states through
  safetensors + JSON) and :mod:`.rng` (:func:`capture_rng` / :func:`restore_rng`).
- :mod:`.ema`: :class:`EMA`.
- :mod:`.logger`: :class:`RunLogger` (metrics.csv + TensorBoard) and :class:`Progress`.
"""
from .atomic import atomic_write
from .checkpoint import Checkpoint, find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .codec import load_optimizer_state, save_optimizer
from .config import (ConfigError, DataConfig, EvalConfig, LossConfig, MethodConfig, ModelConfig,
                     OptimConfig, RunConfig, SampleConfig, TrainConfig, deep_merge, from_dict,
                     list_presets, load_config, load_preset, parse_overrides, save_yaml, to_dict)
from .ema import EMA
from .logger import Progress, RunLogger, read_metrics
from .rng import capture_rng, restore_rng

__all__ = [
    "ConfigError", "TrainConfig", "RunConfig", "ModelConfig", "DataConfig", "OptimConfig",
    "MethodConfig", "LossConfig", "SampleConfig", "EvalConfig",
    "from_dict", "to_dict", "parse_overrides", "deep_merge",
    "load_config", "load_preset", "list_presets", "save_yaml",
    "atomic_write", "Checkpoint", "save_checkpoint", "load_checkpoint", "find_checkpoint",
    "list_checkpoints", "save_optimizer", "load_optimizer_state", "capture_rng", "restore_rng",
    "EMA", "RunLogger", "Progress", "read_metrics",
]
