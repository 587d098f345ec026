"""meanflow.train.config: presets, errors naming dotted keys, overrides, round trips."""
import dataclasses
import typing

import pytest
import yaml

from meanflow.method.time_sampling import TimeSamplerConfig
from meanflow.train.config import (ConfigError, MethodConfig, TrainConfig, deep_merge, from_dict,
                                   list_presets, load_config, parse_overrides, save_yaml, to_dict)


def _error(*args) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args)
    return str(info.value)


@pytest.mark.parametrize("name", ["digits", "tiny", "flux-dev"])
def test_presets_load_and_round_trip(name):
    assert name in list_presets()
    config = load_config(name, None, [])
    assert isinstance(config, TrainConfig)
    assert from_dict(TrainConfig, to_dict(config)) == config
    assert yaml.safe_load(yaml.safe_dump(to_dict(config))) == to_dict(config)


def test_preset_values():
    digits = load_config("digits", None, [])
    assert digits.method.guidance.mode == "cfg" and digits.method.guidance.scales == (1.5,)
    assert digits.run.device == "cpu" and digits.data.batch_size == 32
    assert digits.method.alignment.steps == 1 and digits.method.alignment.weight == 0.01
    tiny = load_config("tiny", None, [])
    assert tiny.run.max_steps == 4 and tiny.data.batch_size == 4
    assert tiny.eval.samples_per_prompt == 2 and tiny.eval.teacher_steps == (1, 2)
    flux = load_config("flux-dev", None, [])
    assert flux.model.kind == "flux" and flux.model.teacher == "black-forest-labs/FLUX.1-dev"
    assert flux.run.dtype == "bfloat16" and flux.model.gradient_checkpointing
    assert flux.method.guidance.mode == "embedded" and flux.method.guidance.scales == (3.5,)
    assert flux.sample.shift == "flux" and flux.optim.lr == 1e-5 and flux.optim.ema_decay == 0.9999


def test_defaults_are_the_method_defaults():
    config = TrainConfig()
    assert config.method.time == TimeSamplerConfig()
    assert config.method.loss.power == 1.0 and config.method.loss.c == 1e-3
    assert config.optim.betas == (0.9, 0.99) and config.eval.teacher_steps == (1, 2, 4, 32)


def test_unknown_preset_lists_available():
    msg = _error("nope", None, [])
    assert msg.startswith("preset:") and "digits" in msg and "tiny" in msg


def test_unknown_key_suggests():
    msg = _error("tiny", None, ["optim.lrr=1e-4"])
    assert msg.startswith("optim.lrr:") and "'lr'" in msg
    msg = _error(None, None, ["methd.time.mean=0"])
    assert msg.startswith("methd:") and "'method'" in msg


def test_nested_post_init_error_is_prefixed():
    assert _error(None, None, ["method.time.std=-1"]).startswith("method.time.std: ")
    assert _error(None, None, ["method.time.mean=abc"]).startswith("method.time.mean: ")
    msg = _error(None, None, ["method.alignment.t_min=0.99"])
    assert msg.startswith("method.alignment.t_min, method.alignment.t_max: ")
    assert _error(None, None, ["optim.lr=-1"]).startswith("optim.lr: expected a number > 0")


def test_wrong_types():
    assert _error(None, None, ["run.max_steps=1.5"]).startswith("run.max_steps: expected an integer")
    assert _error(None, None, ["run.eval_at_end=3"]).startswith("run.eval_at_end:")
    assert _error(None, None, ["sample.steps=[1, x]"]).startswith("sample.steps[1]:")
    assert _error(None, None, ["method=3"]).startswith("method: expected a mapping")
    assert _error(None, None, ["model.teacher=7"]).startswith("model.teacher: expected a string")


@pytest.mark.parametrize("item", ["method.time.mean=.nan", "method.time.std=.inf", "method.guidance.omega=.nan",
                                  "method.guidance.scales=[.nan]", "method.alignment.weight=.inf",
                                  "method.loss.c=.inf", "optim.lr=.inf", "method.schedule.loss_threshold=-.inf",
                                  "optim.lr=nan"])
def test_non_finite_numbers_are_refused(item):
    """YAML's .nan / .inf used to pass every range check written as a comparison (or none) and
    surface only as a NaN loss; every float key must be finite."""
    key = item.partition("=")[0]
    assert _error(None, None, [item]).startswith(f"{key}")
    assert "finite" in _error(None, None, [item])


def test_overrides_parse_and_merge():
    data = parse_overrides(["optim.lr=1e-4", "method.schedule.phase_a_steps=50", "sample.steps=[1,2]",
                            "model.revision=null", "optim.lr=2e-4"])
    assert data == {"optim": {"lr": 2e-4}, "method": {"schedule": {"phase_a_steps": 50}},
                    "sample": {"steps": [1, 2]}, "model": {"revision": None}}
    config = load_config("tiny", None, ["optim.lr=1e-4", "method.schedule.phase_a_steps=50",
                                        "sample.steps=[1,2]", "method.guidance.scales=3.5"])
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.method.schedule.phase_a_steps == 50 and config.sample.steps == (1, 2)
    assert config.method.guidance.scales == (3.5,)
    assert config.run.max_steps == 4  # the preset's value survives
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


@pytest.mark.parametrize("item", ["optim.lr", "=3", "a..b=1", "optim.lr=[1"])
def test_bad_override_syntax(item):
    with pytest.raises(ConfigError):
        parse_overrides([item])


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  max_steps: 7\noptim:\n  lr: 1e-5\n")
    config = load_config("tiny", str(path), ["run.max_steps=9"])
    assert config.run.max_steps == 9 and config.optim.lr == 1e-5 and config.data.batch_size == 4


def test_config_file_errors(tmp_path):
    missing = tmp_path / "missing.yaml"
    msg = _error(None, str(missing), [])
    assert msg.startswith("config_file:") and "missing.yaml" in msg
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    msg = _error(None, str(listy), [])
    assert msg.startswith("config_file:") and "list.yaml" in msg and "mapping" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [\n")
    assert _error(None, str(bad), []).startswith("config_file:")


def test_cross_field_rules(tmp_path):
    assert _error(None, None, ["model.teacher=nope.safetensors"]).startswith("model.teacher:")
    teacher = tmp_path / "t.safetensors"
    teacher.write_bytes(b"x")
    assert load_config(None, None, [f"model.teacher={teacher}"]).model.teacher == str(teacher)
    assert _error(None, None, ["model.kind=flux"]).startswith("model.teacher:")
    assert _error(None, None, ["data.prompts=nope.txt"]).startswith("data.prompts:")
    assert _error(None, None, ["model.student_init=nope.safetensors"]).startswith("model.student_init:")
    assert _error(None, None, ["run.checkpoint_every=0"]).startswith("run.checkpoint_every:")
    assert _error(None, None, ["eval.student_steps=[0]"]).startswith("eval.student_steps:")
    assert _error(None, None, ["eval.teacher_steps=[]"]).startswith("eval.teacher_steps:")
    assert _error("digits", None, ["run.dtype=bfloat16"]).startswith("run.dtype:")
    assert _error("digits", None, ["method.guidance.scales=[1.5,2]"]).startswith(
        "method.guidance.scales: the cfg mode takes one guidance scale w")
    cache_file = tmp_path / "teacher_latents.safetensors"
    cache_file.write_bytes(b"x")
    assert _error(None, None, [f"data.latents_cache={cache_file}"]).startswith(
        "data.latents_cache: expected a folder (created when missing), got the file")
    assert load_config(None, None, [f"data.latents_cache={tmp_path}"]).data.latents_cache == str(tmp_path)
    msg = _error(None, None, ["method.target.kind=alphaflow"])
    assert "method.schedule.discrete_kind" in msg and "method.target.kind" in msg
    load_config(None, None, ["method.target.kind=alphaflow", "method.schedule.discrete_kind=alphaflow"])


def test_from_dict_generic():
    assert from_dict(TimeSamplerConfig, {"mean": 1}) == TimeSamplerConfig(mean=1.0)
    with pytest.raises(ConfigError, match=r"^x\.std: "):
        from_dict(TimeSamplerConfig, {"std": 0}, "x")
    method = from_dict(MethodConfig, {"guidance": {"scales": [1, 2]}})
    assert method.guidance.scales == (1.0, 2.0)


def test_save_yaml_round_trip(tmp_path):
    config = load_config("flux-dev", None, ["optim.lr=3e-6"])
    path = tmp_path / "config.yaml"
    save_yaml(config, path)
    assert load_config(None, str(path), []) == config
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_every_field_is_documented():
    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])
            else:
                assert f.name in cls.__doc__, f"{cls.__name__}.{f.name} undocumented"
    walk(TrainConfig)


def test_config_error_forms():
    a = ConfigError("run.out_dir", "already holds a run")
    b = ConfigError("run.out_dir: already holds a run")
    assert str(a) == str(b) == "run.out_dir: already holds a run" and a.key == b.key == "run.out_dir"
    assert isinstance(a, ValueError) and b.problem == "already holds a run"
    assert a.prefixed("x").key == "x.run.out_dir"


def test_eval_needs_two_samples_in_all(tmp_path):
    """One prompt × samples_per_prompt 1 is refused at load time (the Fréchet distance failed
    on it after the whole run had trained); 2 per prompt, the builtin prompts, or no eval pass."""
    one = tmp_path / "one.txt"
    one.write_text("# a comment\na handwritten digit three\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^eval\.samples_per_prompt: .*1 prompt\(s\) × 1"):
        load_config("tiny", None, [f"data.prompts={one}", "eval.samples_per_prompt=1"])
    config = load_config("tiny", None, [f"data.prompts={one}", "eval.samples_per_prompt=2"])
    assert config.eval.samples_per_prompt == 2
    load_config("tiny", None, ["eval.samples_per_prompt=1"])  # the 10 builtin digits prompts
    load_config("tiny", None, [f"data.prompts={one}", "eval.samples_per_prompt=1", "run.eval_at_end=false"])
