"""meanflow.cli: `sample` / `eval` read a run folder's config and the options given beside it."""
import pytest

from meanflow import cli
from meanflow.train.config import load_config, save_yaml


@pytest.fixture
def run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_yaml(load_config("tiny", None, [f"run.out_dir={run}"]), run / "config.yaml")
    return run


@pytest.fixture
def worlds(monkeypatch):
    """make_world replaced by a stub that records the config it gets (and stops the command)."""
    import meanflow.train.world as world_module

    seen = []

    def make_world(config, device=None, *, training=True):
        assert not training, "sample / eval / generate-data train nothing: no training data to load"
        seen.append(config)
        raise ValueError("stub world")

    monkeypatch.setattr(world_module, "make_world", make_world)
    return seen


@pytest.mark.parametrize("command", [["eval"], ["sample", "--steps", "1"]])
def test_set_applies_over_a_run_folder(run_folder, worlds, command):
    """`--set` with `--run` was accepted and silently ignored: `meanflow eval --run R --set
    eval.samples_per_prompt=3` evaluated with the run's own value."""
    recorded = load_config(None, run_folder / "config.yaml", [])
    assert recorded.eval.samples_per_prompt != 3
    assert cli.main([*command, "--run", str(run_folder), "--set", "eval.samples_per_prompt=3",
                     "--set", "eval.batch_size=7"]) == 2
    assert worlds[-1].eval.samples_per_prompt == 3 and worlds[-1].eval.batch_size == 7
    assert worlds[-1].model == recorded.model  # the rest is the run's


def test_run_folder_without_options_keeps_its_config(run_folder, worlds):
    assert cli.main(["eval", "--run", str(run_folder)]) == 2
    assert worlds[-1] == load_config(None, run_folder / "config.yaml", [])


@pytest.mark.parametrize("option", ["--config", "--preset", "--out"])
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_config_options_with_a_run_folder_are_refused(run_folder, worlds, tmp_path, capsys, command, option):
    """The run's config.yaml is the config: --config, --preset and --out were silently ignored."""
    extra = tmp_path / "extra.yaml"
    extra.write_text("eval:\n  samples_per_prompt: 3\n")
    value = {"--config": str(extra), "--preset": "tiny", "--out": str(tmp_path / "elsewhere")}[option]
    assert cli.main([command, "--run", str(run_folder), option, value]) == 2
    assert f"{option}: not used with --run" in capsys.readouterr().err and not worlds


def test_bad_override_over_a_run_folder_is_a_clear_error(run_folder, worlds, capsys):
    assert cli.main(["eval", "--run", str(run_folder), "--set", "eval.samples_per_promt=3"]) == 2
    assert "eval.samples_per_promt" in capsys.readouterr().err and not worlds


def _namespace(**kwargs):
    import argparse

    return argparse.Namespace(**{"preset": None, "config": None, "overrides": [], "out": None, "resume": False,
                                 **kwargs})


@pytest.mark.parametrize("out", ["runs/exp #2", "2024-06-01", "null", "yes"])
def test_out_is_the_folder_named_not_yaml(out):
    assert cli._load(_namespace(preset="tiny", out=out)).run.out_dir == out


def test_resume_reads_the_run_config_before_checking_overrides(tmp_path):
    """A FLUX run's resume with run.* / sample.* keys that the digits preset would refuse."""
    from meanflow.train.config import load_config, save_yaml

    save_yaml(load_config("flux-dev", None, [f"run.out_dir={tmp_path}"]), tmp_path / "config.yaml")
    config = cli._load(_namespace(resume=True, out=str(tmp_path), overrides=["run.dtype=bfloat16",
                                                                              "run.max_steps=7"]))
    assert (config.model.kind, config.run.max_steps, config.run.out_dir) == ("flux", 7, str(tmp_path))


def test_resume_without_a_config_yaml_is_refused(tmp_path):
    from meanflow.train.config import ConfigError

    with pytest.raises(ConfigError, match="has none"):
        cli._load(_namespace(resume=True, out=str(tmp_path)))


@pytest.mark.parametrize("section", ["run:\n#  max_steps: 100\n", "run: 5\n"])
def test_a_section_that_is_not_a_mapping_is_refused_also_with_out(tmp_path, section):
    """An empty (null) or scalar section is an error naming it, with --out as without: --out's
    folder used to replace it, and the preset's whole section with it."""
    from meanflow.train.config import ConfigError

    path = tmp_path / "my.yaml"
    path.write_text(section + "optim:\n  lr: 1.0e-4\n")
    for out in (None, str(tmp_path / "run")):
        with pytest.raises(ConfigError, match="^run: expected a mapping"):
            cli._load(_namespace(preset="tiny", config=str(path), out=out))
    with pytest.raises(ConfigError, match="^run: expected a mapping"):
        cli._load(_namespace(preset="tiny", overrides=["run=null"], out=str(tmp_path / "run")))


def test_resume_with_a_scalar_run_section_is_a_config_error(tmp_path):
    from meanflow.train.config import ConfigError, load_config, save_yaml

    save_yaml(load_config("tiny", None, [f"run.out_dir={tmp_path}"]), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="^run: expected a mapping"):
        cli._load(_namespace(resume=True, overrides=["run=3"]))
    with pytest.raises(ConfigError, match="^run: expected a mapping"):
        cli._load(_namespace(resume=True, out=str(tmp_path), overrides=["run=null"]))


@pytest.fixture
def fake_eval(monkeypatch):
    """`meanflow eval` with the world and the evaluation stubbed: returns the calls of evaluate."""
    import meanflow.eval.evaluate as evaluate_module

    calls = []
    config = load_config("tiny", None, [])
    monkeypatch.setattr(cli, "_world_and_student", lambda args: (config, "world", None))

    def evaluate(world, student, config):
        calls.append(config)
        row = {"model": "teacher", "steps": 1, "nfe": 1, "fd": 2.5, "accuracy": 1.0, "diversity": 3.0,
               "seconds": 0.1}
        return {"rows": [row], "reference": {"fd": 0.5, "accuracy": 1.0, "diversity": 3.5}}

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    return calls


def _eval_output(run, output):
    return cli.main(["eval", "--run", str(run), "--teacher-steps", "1", "--output", str(output)])


@pytest.mark.parametrize("target", ["the run", "a link to it", "another run"])
def test_eval_output_holding_a_run_is_refused_before_evaluating(run_folder, fake_eval, tmp_path, capsys,
                                                                 target):
    """`--output <run>` silently replaced the eval.json the run's report.md was built from."""
    (run_folder / "eval.json").write_text('{"rows": "from training"}')
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "eval.json").write_text('{"rows": "from training"}')
    link = tmp_path / "link"
    link.symlink_to(run_folder)
    output = {"the run": run_folder, "a link to it": link, "another run": other}[target]
    assert _eval_output(run_folder, output) == 2
    assert "--output" in capsys.readouterr().err and not fake_eval  # refused before the evaluation
    assert (output / "eval.json").read_text() == '{"rows": "from training"}'


@pytest.mark.parametrize("name", ["eval.json", "eval.json/again"])
def test_eval_output_that_is_a_file_is_a_clear_error(run_folder, fake_eval, capsys, name):
    """It failed after the whole evaluation, with a FileExistsError traceback from makedirs."""
    (run_folder / "eval.json").write_text("{}")
    assert _eval_output(run_folder, run_folder / name) == 2
    assert "--output" in capsys.readouterr().err and not fake_eval


@pytest.mark.parametrize("name", ["student", "checkpoints", "samples", "student/eval", "checkpoints/step-000010"])
def test_eval_output_into_the_runs_own_folders_is_refused(run_folder, fake_eval, capsys, name):
    """`--output <run>/student` put eval.json into the exported student's folder (which the next
    export replaces whole), at any depth."""
    assert (run_folder / "config.yaml").exists()
    assert _eval_output(run_folder, run_folder / name) == 2
    assert "--output" in capsys.readouterr().err and not fake_eval


def test_eval_output_to_a_fresh_folder_writes_both_files(run_folder, fake_eval, tmp_path):
    import json

    output = tmp_path / "evals" / "again"
    for _ in range(2):  # the second time over its own files: not a run, so allowed
        assert _eval_output(run_folder, output) == 0
    assert json.loads((output / "eval.json").read_text())["rows"][0]["fd"] == 2.5
    assert (output / "eval.md").read_text().startswith("| model | steps |") and len(fake_eval) == 2


def test_eval_output_interrupted_mid_write_keeps_the_old_file(run_folder, fake_eval, tmp_path, monkeypatch):
    """The files were written in place: a Ctrl-C during the JSON dump left half an eval.json."""
    import json

    import meanflow.eval.evaluate as evaluate_module

    output = tmp_path / "ev"
    assert _eval_output(run_folder, output) == 0
    before = (output / "eval.json").read_bytes()

    def interrupted(encoder, value):
        raise KeyboardInterrupt

    # A Ctrl-C once the rows are dumped: at a value the encoder hands to its default().
    monkeypatch.setattr(evaluate_module, "json_ready", lambda result: {**result, "late": object()})
    monkeypatch.setattr(json.JSONEncoder, "default", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _eval_output(run_folder, output)
    assert (output / "eval.json").read_bytes() == before
    assert sorted(p.name for p in output.iterdir()) == ["eval.json", "eval.md"]  # no temporary left


def test_eval_with_fewer_than_two_samples_is_refused_before_sampling(run_folder, fake_eval, tmp_path, capsys,
                                                                   monkeypatch):
    """A run that did not evaluate at its end (run.eval_at_end=false) can hold an eval config that
    cannot give a Fréchet distance; `meanflow eval` refuses it before sampling, naming the key."""
    prompts = tmp_path / "one.txt"
    prompts.write_text("a handwritten digit three\n")
    config = load_config("tiny", None, [f"data.prompts={prompts}", "eval.samples_per_prompt=1",
                                        "run.eval_at_end=false"])
    monkeypatch.setattr(cli, "_world_and_student", lambda args: (config, "world", None))
    assert cli.main(["eval", "--run", str(run_folder)]) == 2
    assert "eval.samples_per_prompt" in capsys.readouterr().err and not fake_eval
