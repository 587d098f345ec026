"""The trainer's configuration: a tree of dataclasses, loaded from presets, YAML and overrides.

    TrainConfig
      run:    RunConfig       where, how long, on what device, how often to log / sample / save
      model:  ModelConfig     which teacher (and optional student start)
      data:   DataConfig      prompts, where training latents come from, batch size
      optim:  OptimConfig     AdamW, gradient clipping, EMA, the fake network's learning rate
      method: MethodConfig    the method's own dataclasses (meanflow.method) + LossConfig
      sample: SampleConfig    preview sampling during training
      eval:   EvalConfig      the evaluation at the end

:func:`load_config` resolves, in order: a preset (``meanflow/train/presets/<name>.yaml``), the
user's YAML file, command-line overrides (``optim.lr=1e-4``); then builds the tree with
:func:`~meanflow.train.structured.from_dict` (unknown keys, wrong types and every section's own
checks raise :class:`ConfigError` naming the dotted key) and checks the cross-field rules in
:meth:`TrainConfig.__post_init__`. :func:`save_yaml` writes the resolved tree, so a run folder
records exactly what ran. Fields not given anywhere keep the defaults documented below (the
method sections keep the defaults of ``meanflow.method``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from meanflow.method.alignment import AlignmentConfig
from meanflow.method.guidance import GuidanceConfig
from meanflow.method.schedule import ScheduleConfig
from meanflow.method.targets import DiscreteTargetConfig
from meanflow.method.time_sampling import TimeSamplerConfig

from .structured import ConfigError, deep_merge, from_dict, parse_overrides, to_dict, yaml_load

__all__ = [
    "ConfigError", "TrainConfig", "RunConfig", "ModelConfig", "DataConfig", "OptimConfig",
    "MethodConfig", "LossConfig", "SampleConfig", "EvalConfig",
    "from_dict", "to_dict", "parse_overrides", "deep_merge",
    "load_config", "load_preset", "list_presets", "save_yaml", "PRESETS_DIR",
]

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
BUILTIN = "builtin"


# --------------------------------------------------------------------------------------------
# Small checks (raise ConfigError with the field's own name; from_dict adds the section prefix)
# --------------------------------------------------------------------------------------------

def _int_at_least(obj, name: str, low: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(name, f"expected an integer >= {low}, got {value!r}")


def _positive_number(obj, name: str, *, allow_zero: bool = False) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(name, f"expected a number {'>=' if allow_zero else '>'} 0, got {value!r}")


def _one_of(obj, name: str, options: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in options:
        raise ConfigError(name, f"expected one of {', '.join(map(repr, options))}, got {value!r}")


def _steps_tuple(obj, name: str) -> None:
    value = tuple(getattr(obj, name))
    if not value or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in value):
        raise ConfigError(name, f"expected a non-empty list of positive integers, got {list(value)!r}")
    setattr(obj, name, value)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    """Where the run writes, for how long, on what, and how often it reports.

    Attributes:
        out_dir: the run folder (config.yaml, metrics.csv, checkpoints/, samples/). Default
            ``"runs/digits"``.
        seed: the base seed of every random stream (default 0).
        device: ``"auto"`` (CUDA if available, else CPU; default), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.
        dtype: ``"float32"`` (default) or ``"bfloat16"`` (bf16 autocast on a GPU; parameters,
            optimizer states and EMA stay float32).
        max_steps: student optimizer steps in total (default 600); >= 1.
        log_every: metrics row every N steps (default 10); >= 1.
        sample_every: preview samples every N steps (default 200); 0 = never (the final grid is
            still written).
        checkpoint_every: checkpoint every N steps (default 200); >= 1 (a final one is also
            written at the end).
        eval_at_end: run the evaluation (section ``eval``) after the last step (default True).
        max_nonfinite_in_a_row: abort after this many consecutive steps with a non-finite loss
            or gradient (skipped steps; default 10), or as many fake-network updates (counted
            apart); >= 1.
        threads: ``torch.set_num_threads`` (default 0 = leave torch's default).
    """

    out_dir: str = "runs/digits"
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    max_steps: int = 600
    log_every: int = 10
    sample_every: int = 200
    checkpoint_every: int = 200
    eval_at_end: bool = True
    max_nonfinite_in_a_row: int = 10
    threads: int = 0

    def __post_init__(self):
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError("out_dir", f"expected a non-empty path, got {self.out_dir!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError("device", f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        _one_of(self, "dtype", ("float32", "bfloat16"))
        _int_at_least(self, "seed", 0)
        for name in ("max_steps", "log_every", "checkpoint_every", "max_nonfinite_in_a_row"):
            _int_at_least(self, name, 1)
        for name in ("sample_every", "threads"):
            _int_at_least(self, name, 0)


@dataclass
class ModelConfig:
    """The teacher, and optionally where the student starts.

    Attributes:
        kind: ``"digits"`` (the small CPU world; default) or ``"flux"``.
        teacher: digits: ``"builtin"`` (default, the shipped teacher) or a path to a teacher
            ``.safetensors``; flux: a diffusers model id (``"black-forest-labs/FLUX.1-dev"``)
            or a local folder.
        revision: the model repository's revision (flux only; default None = the default
            branch).
        gradient_checkpointing: recompute activations in backward, per block, in the student
            and the fake network (default False).
        student_init: optional student folder (``FluxStudent.save_pretrained``, e.g. a run's
            ``student/``) to start from instead of the teacher copy (default None). Must exist.
        resolution: flux only: the image size in pixels, square (default 1024); a multiple of
            16.
        student_lora_rank: 0 (default) trains the whole student; r >= 1 keeps its copy of the
            teacher frozen and trains rank-r adapters on every Linear of its blocks
            (:mod:`meanflow.models.lora`) with the (t − r) embedder: gradients, AdamW moments and
            EMA shrink from 16 bytes per parameter to the adapters' size. The exported student
            has the adapters merged into its weights.
        student_lora_alpha: their scale numerator α (update × α/r); default None = r.
        fake_lora_rank, fake_lora_alpha: the same for the fake velocity network of alignment
            (default 0: a full float32 copy of the teacher, trained).
        compile: None (default: eager) or a ``torch.compile`` backend (``"inductor"``, or any
            name ``torch._dynamo.list_backends`` knows) for the training step's forwards: the
            student's pair mode and plain forward, the teacher's velocity, the fake network.
            The modules themselves, their state and checkpoints are unchanged. Under FSDP2 the
            graphs break at each sharded module's hooks, which FSDP2 keeps out of Dynamo.
    """

    kind: str = "digits"
    teacher: str = BUILTIN
    revision: str | None = None
    gradient_checkpointing: bool = False
    student_init: str | None = None
    resolution: int = 1024
    student_lora_rank: int = 0
    student_lora_alpha: float | None = None
    fake_lora_rank: int = 0
    fake_lora_alpha: float | None = None
    compile: str | None = None

    def __post_init__(self):
        _one_of(self, "kind", ("digits", "flux"))
        if self.compile is not None:
            import torch._dynamo

            _one_of(self, "compile", tuple(torch._dynamo.list_backends(exclude_tags=())))
        _int_at_least(self, "resolution", 16)
        for who in ("student", "fake"):
            _int_at_least(self, f"{who}_lora_rank", 0)
            if getattr(self, f"{who}_lora_alpha") is not None:
                _positive_number(self, f"{who}_lora_alpha")
        if self.resolution % 16:
            raise ConfigError("resolution", f"expected a multiple of 16, got {self.resolution}")
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ConfigError("teacher", f"expected a non-empty string, got {self.teacher!r}")


@dataclass
class DataConfig:
    """Prompts and training latents.

    Attributes:
        prompts: ``"builtin"`` (default; the world's own prompt list: the digits prompts, or
            for flux ``presets/flux_prompts.txt``) or a text file with one prompt per line.
            Must exist.
        source: ``"dataset"`` (default; real images: the digits train split, or for flux the
            image-caption folder ``images``) or ``"teacher"`` (latents generated by the teacher
            from the prompts).
        images: flux with ``source="dataset"``: a folder of images, each with a same-stem
            ``.txt`` caption (default None). Must exist.
        latents_cache: folder where encoded / generated latents are cached (default None = no
            cache); created when missing.
        batch_size: samples per student step (default 64); >= 1.
        num_teacher_latents: how many latents ``source="teacher"`` generates (default 2048); >= 1.
    """

    prompts: str = BUILTIN
    source: str = "dataset"
    images: str | None = None
    latents_cache: str | None = None
    batch_size: int = 64
    num_teacher_latents: int = 2048

    def __post_init__(self):
        _one_of(self, "source", ("dataset", "teacher"))
        _int_at_least(self, "batch_size", 1)
        _int_at_least(self, "num_teacher_latents", 1)
        if self.latents_cache is not None:
            if not isinstance(self.latents_cache, str) or not self.latents_cache:
                raise ConfigError("latents_cache", f"expected a folder or None, got {self.latents_cache!r}")
            if os.path.exists(self.latents_cache) and not os.path.isdir(self.latents_cache):
                raise ConfigError("latents_cache", f"expected a folder (created when missing), got the file "
                                                   f"{self.latents_cache!r}: give the folder that holds it")


@dataclass
class OptimConfig:
    """AdamW for the student (and the fake velocity network), clipping and EMA.

    Attributes:
        lr: the student's learning rate (default 3e-4); > 0.
        betas: AdamW (β1, β2) (default (0.9, 0.99)); each in [0, 1).
        weight_decay: AdamW's decoupled weight decay, student and fake network (default 0.0); >= 0.
        grad_clip: max global gradient norm (default 1.0); 0 = no clipping.
        ema_decay: the largest decay of the student's EMA (default 0.999); in [0, 1). Update n
            uses min(ema_decay, (1 + n) / (10 + n)) (a warm-up: 0.999 holds only after ~9,000
            updates), so short runs are not pulled towards the initial weights.
        fake_lr: the fake velocity network's learning rate (alignment; default 3e-4); > 0.
        warmup_steps: linear learning-rate warm-up from 0 (default 0 = none); >= 0.
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    fake_lr: float = 3e-4
    warmup_steps: int = 0

    def __post_init__(self):
        _positive_number(self, "lr")
        _positive_number(self, "fake_lr")
        _positive_number(self, "weight_decay", allow_zero=True)
        _positive_number(self, "grad_clip", allow_zero=True)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"expected two numbers in [0, 1), got {list(self.betas)!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ConfigError("ema_decay", f"expected a number in [0, 1), got {self.ema_decay!r}")
        _int_at_least(self, "warmup_steps", 0)


@dataclass
class LossConfig:
    """The adaptive weighted loss w·L with w = 1 / sg(L + c)^power (DESIGN §2, "Loss").

    Attributes:
        power: p (default 1.0; 0 = plain squared error); >= 0.
        c: the constant c (default 1e-3); > 0.
    """

    power: float = 1.0
    c: float = 1e-3

    def __post_init__(self):
        _positive_number(self, "power", allow_zero=True)
        _positive_number(self, "c")


@dataclass
class MethodConfig:
    """The method's options: the sections are ``meanflow.method``'s dataclasses (see each)."""

    time: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    target: DiscreteTargetConfig = field(default_factory=DiscreteTargetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self):
        if self.schedule.discrete_kind != self.target.kind:
            raise ConfigError(
                "schedule.discrete_kind, target.kind",
                f"must name the same discrete target, got {self.schedule.discrete_kind!r} and "
                f"{self.target.kind!r}; set both")


@dataclass
class SampleConfig:
    """Preview sampling during training (every ``run.sample_every`` steps).

    Attributes:
        steps: the student's step counts to sample with (default (1, 2, 4)); positive.
        shift: the time grid: ``"none"`` (uniform; default) or ``"flux"`` (FLUX's
            resolution-dependent shift).
        per_prompt: images per prompt (default 4); >= 1.
    """

    steps: tuple[int, ...] = (1, 2, 4)
    shift: str = "none"
    per_prompt: int = 4

    def __post_init__(self):
        _steps_tuple(self, "steps")
        _one_of(self, "shift", ("none", "flux"))
        _int_at_least(self, "per_prompt", 1)


@dataclass
class EvalConfig:
    """The evaluation after training (``run.eval_at_end``): teacher vs student at few steps.

    Attributes:
        samples_per_prompt: generated samples per prompt and per setting (default 50); >= 1,
            and at least 2 samples in all (the Fréchet distance needs 2).
        teacher_steps: the teacher's sampler step counts (default (1, 2, 4, 32)); positive.
        student_steps: the student's (and its EMA's) step counts (default (1, 2, 4)); positive.
        batch_size: generation batch size (default 250); >= 1.
    """

    samples_per_prompt: int = 50
    teacher_steps: tuple[int, ...] = (1, 2, 4, 32)
    student_steps: tuple[int, ...] = (1, 2, 4)
    batch_size: int = 250

    def __post_init__(self):
        _int_at_least(self, "samples_per_prompt", 1)
        _steps_tuple(self, "teacher_steps")
        _steps_tuple(self, "student_steps")
        _int_at_least(self, "batch_size", 1)


@dataclass
class TrainConfig:
    """The whole configuration of a distillation run (sections documented on their classes).

    Cross-field rules (checked here, errors name the dotted keys):
    - ``model.teacher``: for ``kind="digits"``, ``"builtin"`` or an existing file; for
      ``kind="flux"``, not ``"builtin"``.
    - ``model.student_init`` and ``data.prompts`` (unless ``"builtin"``) must exist; flux needs
      ``data.images`` when ``data.source="dataset"``.
    - ``run.dtype="bfloat16"`` needs a CUDA device (``run.device`` not ``"cpu"``).
    - ``sample.shift="flux"`` needs ``model.kind="flux"``.
    - with ``run.eval_at_end``, the digits evaluation needs at least 2 samples in all (its
      prompts × ``eval.samples_per_prompt``).
    """

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        m = self.model
        if m.kind == "digits" and m.teacher != BUILTIN and not os.path.isfile(m.teacher):
            raise ConfigError("model.teacher", f"expected 'builtin' or an existing teacher "
                                               f".safetensors file, got {m.teacher!r} (not found)")
        if m.kind == "flux" and m.teacher == BUILTIN:
            raise ConfigError("model.teacher", "the flux kind has no builtin teacher; give a "
                                               "diffusers model id or folder")
        if m.student_init is not None and not os.path.isdir(m.student_init):
            raise ConfigError("model.student_init", f"expected a student folder, got {m.student_init!r} (not found)")
        if m.kind == "flux" and self.data.source == "dataset" and (
                self.data.images is None or not os.path.isdir(self.data.images)):
            raise ConfigError("data.images", f"data.source 'dataset' with model.kind 'flux' needs an existing "
                                             f"image-caption folder, got {self.data.images!r}")
        if self.data.prompts != BUILTIN and not os.path.isfile(self.data.prompts):
            raise ConfigError("data.prompts", f"expected 'builtin' or an existing text file, "
                                              f"got {self.data.prompts!r} (not found)")
        if self.run.dtype == "bfloat16" and self.run.device == "cpu":
            raise ConfigError("run.dtype", "bfloat16 autocast needs a CUDA device, but run.device "
                                           "is 'cpu'; use float32 or device auto/cuda")
        if self.sample.shift == "flux" and m.kind != "flux":
            raise ConfigError("sample.shift", f"the flux shift needs model.kind 'flux', got {m.kind!r}")
        if self.run.eval_at_end:
            self.check_eval_sample_count()

    def check_eval_sample_count(self) -> None:
        """The evaluation's Fréchet distance needs 2 samples or more: refused before any sampling (at
        config time with run.eval_at_end, and by ``meanflow eval``), not after training."""
        k = self.eval.samples_per_prompt
        # Only the digits world evaluates (flux has no offline evaluator; the run skips its eval),
        # and every prompt list holds a prompt or more, so only k = 1 needs the count.
        if self.model.kind != "digits" or k >= 2:
            return
        prompts = _digits_eval_prompt_count(self.data.prompts)
        if prompts * k < 2:
            raise ConfigError("eval.samples_per_prompt",
                              f"the evaluation needs at least 2 samples in all, got {prompts} prompt(s) × {k}: "
                              "raise eval.samples_per_prompt or give more prompts (data.prompts)")


def _digits_eval_prompt_count(prompts: str) -> int:
    """How many prompts the digits world evaluates for ``data.prompts`` (as
    :class:`~meanflow.train.world.DigitsWorld` reads them)."""
    # Imported here: the world's modules are heavy, and this runs only for samples_per_prompt 1.
    from .world import digits_prompts

    try:
        return len(digits_prompts(prompts))
    except ValueError as err:  # its message starts with "data.prompts: "
        raise ConfigError(str(err)) from None


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------

def list_presets() -> list[str]:
    """The names of the shipped presets (``meanflow/train/presets/*.yaml``), sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml_mapping(path: Path, key: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(key, f"cannot read {str(path)!r}: {err.strerror or err}") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(key, f"{str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(key, f"{str(path)!r} must hold a mapping of sections, got "
                               f"{type(data).__name__}")
    return data


def load_preset(name: str) -> dict:
    """The preset ``name`` as a dict (not yet validated); ConfigError listing the presets if unknown."""
    available = list_presets()
    if name not in available:
        raise ConfigError("preset", f"unknown preset {name!r}; available: {', '.join(available)}")
    return _read_yaml_mapping(PRESETS_DIR / f"{name}.yaml", "preset")


def load_config(preset: str | None = None, config_file: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = (), values: dict | None = None) -> TrainConfig:
    """The resolved :class:`TrainConfig`: preset, then ``config_file``, then ``overrides``
    (``KEY=VALUE`` strings, values read as YAML), then ``values`` (a nested dict taken as it is:
    a folder named on the command line stays the string it is).

    Raises :class:`ConfigError` (naming the dotted key, or ``preset`` / ``config_file``) for an
    unknown preset, a missing, unreadable or non-mapping config file, a malformed override, an
    unknown key, a wrong type or an invalid value.
    """
    data: dict = load_preset(preset) if preset else {}
    if config_file is not None:
        data = deep_merge(data, _read_yaml_mapping(Path(config_file), "config_file"))
    data = deep_merge(data, parse_overrides(list(overrides)))
    return from_dict(TrainConfig, deep_merge(data, values or {}))


def save_yaml(config: TrainConfig, path: str | os.PathLike) -> None:
    """Writes the resolved ``config`` as YAML to ``path`` (atomically; sections in schema order)."""
    from .atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None))
