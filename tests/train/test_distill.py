"""``meanflow distill | sample | eval | generate-data`` end to end on the tiny preset (the
shipped digits teacher, a few steps), resume exactness, Ctrl-C, the non-finite guard, and the
errors that must leave everything untouched."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from meanflow.cli import main  # noqa: E402
from meanflow.testing import distill_args  # noqa: E402
from meanflow.train import loop as loop_module  # noqa: E402


pytestmark = pytest.mark.usefixtures("reference_one_thread")


@contextlib.contextmanager
def _sigint(handler):
    """SIGINT handled by ``handler`` inside the block, the previous handler back after it."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def sigint_handler():
    """Python's own Ctrl-C handler for the test. A shell starts background jobs with SIGINT
    ignored, and Python then keeps it ignored: a test of what a Ctrl-C does needs a process
    that takes one."""
    with _sigint(signal.default_int_handler):
        yield


def _ema_update_sending_sigint_in_step_2():
    """``EMA.update`` that sends this process a real SIGINT first when called in step 2 (after
    that step's ``optimizer.step()``)."""
    from meanflow.train import ema as ema_module

    real_update = ema_module.EMA.update

    def update(self, module):
        if self.num_updates == 2:
            os.kill(os.getpid(), signal.SIGINT)
        real_update(self, module)

    return update


def _distill(out, *overrides, resume=False):
    return main(distill_args(out, *overrides, resume=resume))


def _rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _student_weights(run):
    return load_file(str(run / "student" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_distill_end_to_end(tmp_path):
    run = tmp_path / "run"
    assert _distill(run) == 0
    for name in ("config.yaml", "metrics.csv", "eval.json", "report.md", "loss.png", "eval-teacher.png",
                 "eval-student.png", "samples/final.png", "samples/step-000002.png", "student/meanflow_student.json",
                 "checkpoints/latest"):
        assert (run / name).exists(), name
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert {r["phase"] for r in rows} == {"A", "B", "C"}  # every phase of the schedule ran
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)  # finite
    report = (run / "report.md").read_text()
    assert "| teacher | 1 |" in report and "| student | 2 |" in report
    # The export records the time grid the run sampled on (sample.shift), for the pipeline.
    assert json.loads((run / "student" / "meanflow_pipeline.json").read_text())["shift"] == "none"


def test_student_init_is_trained(tmp_path):
    """model.student_init: FluxStudent.from_pretrained gives eval mode (as diffusers does); the
    trainer puts it in train mode, and one step updates every transformer weight."""
    import copy

    from meanflow.models.flux_student import FluxStudent
    from meanflow.train.config import load_config
    from meanflow.train.loop import Distiller
    from meanflow.train.world import DigitsWorld

    world = DigitsWorld()
    FluxStudent.from_transformer(copy.deepcopy(world.teacher.transformer)).save_pretrained(tmp_path / "init")
    config = load_config("tiny", None, [f"model.student_init={tmp_path / 'init'}",
                                        f"run.out_dir={tmp_path / 'run'}"])
    distiller = Distiller(config, world=world)
    student = distiller.student
    assert all(m.training for m in student.modules()) and all(p.requires_grad for p in student.parameters())
    before = {n: p.detach().clone() for n, p in student.transformer.named_parameters()}
    assert not distiller.step().skipped
    assert all(not torch.equal(before[n], p) for n, p in student.transformer.named_parameters())


@pytest.mark.parametrize("fake", ["full", "lora"])
def test_resume_is_bit_exact(tmp_path, fake):
    whole, split = tmp_path / "whole", tmp_path / "split"
    lora = ["model.fake_lora_rank=2", "model.student_lora_rank=2"] if fake == "lora" else []
    common = ("run.eval_at_end=false", *lora)
    assert _distill(whole, *common) == 0
    assert _distill(split, *common, "run.max_steps=2") == 0
    assert _distill(split, *common, resume=True) == 0
    a, b = _rows(whole), _rows(split)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "meanflow", "mse", "align", "fake", "grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa, wb = _student_weights(whole), _student_weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The resume changed run.max_steps: config.yaml records what ran last, not the first leg's 2.
    recorded = [yaml.safe_load((run / "config.yaml").read_text())["run"] for run in (whole, split)]
    assert recorded[1]["max_steps"] == recorded[0]["max_steps"] != 2


def test_resume_reads_the_runs_own_config(tmp_path, capsys):
    """`meanflow distill --resume --out DIR` alone continues the run as it was configured (its
    config.yaml, not the default preset); --set may change run.* keys, not the method's."""
    run = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--out", str(run), "--set", "run.eval_at_end=false",
                 "--set", "optim.lr=1e-4", "--set", "run.max_steps=2"]) == 0
    assert main(["distill", "--resume", "--out", str(run), "--set", "run.max_steps=3"]) == 0
    assert [int(r["step"]) for r in _rows(run)] == [0, 1, 2]
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["optim"]["lr"] == 1e-4 and recorded["run"]["max_steps"] == 3
    assert main(["distill", "--resume", "--out", str(run), "--set", "optim.lr=1e-3"]) == 2
    assert "optim.lr: --resume with a different setting" in capsys.readouterr().err


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(run, "run.eval_at_end=false", "run.max_steps=2") == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert _distill(run, "run.eval_at_end=false") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert _distill(tmp_path / "empty", resume=True) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert _distill(run, "run.eval_at_end=false", "optim.lr=1e-3", resume=True) == 2  # not the same run
    assert "optim.lr: --resume with a different setting" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_refuses_a_folder_left_by_a_run_without_checkpoint(tmp_path, capsys):
    """A run that failed before its first checkpoint leaves config.yaml and metrics.csv; a new
    run there must not overwrite them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {max_steps: 7}\n")
    (run / "metrics.csv").write_text("step,loss\n0,1.5\n")
    before = {p: p.read_bytes() for p in run.rglob("*")}
    assert _distill(run, "run.eval_at_end=false") == 2
    err = capsys.readouterr().err
    assert "run.out_dir" in err and "config.yaml, metrics.csv but no checkpoint" in err
    assert {p: p.read_bytes() for p in run.rglob("*")} == before


def _interrupted_at_step_3_then_resumed(run, monkeypatch, owner, name, patched):
    """Runs with ``owner.name`` replaced by ``patched`` (which interrupts the run), checks that
    it stopped with 130 and a checkpoint at step 3, then resumes it unpatched to the end."""
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, patched)
    assert _distill(run, "run.eval_at_end=false", "run.checkpoint_every=100") == 130
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("3")
    monkeypatch.setattr(owner, name, original)
    assert _distill(run, "run.eval_at_end=false", resume=True) == 0


def test_keyboard_interrupt_saves_and_resumes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_step = loop_module.Distiller.step

    def interrupted(self):
        if self.step_index == 3:
            raise KeyboardInterrupt
        return real_step(self)

    _interrupted_at_step_3_then_resumed(run, monkeypatch, loop_module.Distiller, "step", interrupted)
    assert [int(r["step"]) for r in _rows(run)] == [0, 1, 2, 3]


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_ctrl_c_during_the_export_leaves_no_half_student_and_resume_finishes(tmp_path, monkeypatch):
    """A Ctrl-C after training, while the student is written (here: between its weights and its
    pipeline file), exits 130 with the final checkpoint saved and no ``student/`` (it used to
    leave one holding only ``transformer/``, which ``eval`` and a re-run refused); --resume
    exports it."""
    from meanflow.models import pipeline
    from meanflow.models.flux_student import FluxStudent

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    real = pipeline.save_pipeline_config
    monkeypatch.setattr(pipeline, "save_pipeline_config", interrupted)
    assert _distill(run) == 130
    assert not (run / "student").exists() and _hidden(run) == []
    assert not (run / "eval.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("4")
    monkeypatch.setattr(pipeline, "save_pipeline_config", real)
    assert _distill(run, resume=True) == 0
    FluxStudent.from_pretrained(str(run / "student"))
    assert json.loads((run / "eval.json").read_text())["rows"]


class _InterruptedWhenSerialised(dict):
    """A mapping whose serialisation is interrupted: json reads its items, and a Ctrl-C lands."""

    def items(self):
        raise KeyboardInterrupt


def test_ctrl_c_while_eval_json_is_written_keeps_the_old_one(tmp_path, monkeypatch):
    """A Ctrl-C halfway through writing eval.json leaves the previous file (it used to leave a
    truncated one) and exits 130; a re-export on --resume goes in whole."""
    from meanflow.eval import evaluate as evaluate_module
    from meanflow.models.flux_student import FluxStudent

    run = tmp_path / "run"
    assert _distill(run) == 0
    before = (run / "eval.json").read_bytes()
    real = evaluate_module.json_ready
    monkeypatch.setattr(evaluate_module, "json_ready",
                        lambda result: {**real(result), "zz": _InterruptedWhenSerialised(a=1)})
    assert _distill(run, resume=True) == 130
    assert (run / "eval.json").read_bytes() == before and _hidden(run) == []
    FluxStudent.from_pretrained(str(run / "student"))


def test_report_shows_the_phase_a_that_ran_under_switch_loss(tmp_path):
    """switch=loss may end phase A before phase_a_steps; the report states the length that ran
    (it used to print the configured maximum)."""
    run = tmp_path / "run"
    assert _distill(run, "run.max_steps=6", "method.schedule.switch=loss", "method.schedule.phase_a_steps=4",
                    "method.schedule.loss_window=1", "method.schedule.loss_patience=1",
                    "method.schedule.loss_threshold=1e9") == 0
    assert [r["phase"] for r in _rows(run)][:3] == ["A", "A", "B"]
    assert "warm-up A 2 (switch=loss: at most 4) / B" in (run / "report.md").read_text()


def test_ctrl_c_inside_a_step_finishes_the_step_then_saves(tmp_path, monkeypatch, sigint_handler):
    """A real SIGINT after the optimizer step of step 2 but before its EMA update: the step
    completes, the checkpoint is at step 3, and the resumed run equals an uninterrupted one
    (the interrupt used to save the moved weights with step 2 still to run: done twice)."""
    from meanflow.train import ema as ema_module

    whole, run = tmp_path / "whole", tmp_path / "run"
    assert _distill(whole, "run.eval_at_end=false") == 0
    _interrupted_at_step_3_then_resumed(run, monkeypatch, ema_module.EMA, "update",
                                        _ema_update_sending_sigint_in_step_2())
    a, b = _rows(whole), _rows(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert all(ra[k] == rb[k] for ra, rb in zip(a, b) for k in ("loss", "grad_norm", "fake"))
    wa, wb = _student_weights(whole), _student_weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_while_a_row_is_written_keeps_the_row(tmp_path, monkeypatch, sigint_handler):
    """A SIGINT that lands as step 2's metrics row is being written: the row is written, the
    checkpoint is at step 3, and the resumed run logs every step once."""
    from meanflow.train import logger as logger_module

    run = tmp_path / "run"
    real_log = logger_module.RunLogger.log

    def log(self, step, **values):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        real_log(self, step, **values)

    _interrupted_at_step_3_then_resumed(run, monkeypatch, logger_module.RunLogger, "log", log)
    assert [int(r["step"]) for r in _rows(run)] == [0, 1, 2, 3]


def test_an_ignored_sigint_leaves_the_run_to_its_end(tmp_path, monkeypatch):
    """A run started with SIGINT ignored (a background job of a shell) keeps it ignored: the
    SIGINT that lands in step 2 changes nothing, and the run ends with 0 and every row."""
    from meanflow.train import ema as ema_module

    monkeypatch.setattr(ema_module.EMA, "update", _ema_update_sending_sigint_in_step_2())
    run = tmp_path / "run"
    with _sigint(signal.SIG_IGN):
        assert _distill(run, "run.eval_at_end=false") == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert [int(r["step"]) for r in _rows(run)] == [0, 1, 2, 3]  # the tiny preset's 4 steps
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("4")


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = loop_module.GuidedTeacher.__call__

    def poisoned(self, z, t, cond, **kw):
        v = real(self, z, t, cond, **kw)
        return v * float("nan") if poisoned.on else v

    poisoned.on = False
    monkeypatch.setattr(loop_module.GuidedTeacher, "__call__", poisoned)
    real_step = loop_module.Distiller.step

    def step(self):
        poisoned.on = self.step_index >= 2  # two good steps, then NaN targets
        return real_step(self)

    monkeypatch.setattr(loop_module.Distiller, "step", step)
    assert _distill(run, "run.eval_at_end=false", "run.max_steps=10", "run.checkpoint_every=2") == 1
    err = capsys.readouterr().out
    assert "2 steps in a row" in err and "non-finite" in err
    rows = _rows(run)
    assert [int(r["skipped"]) for r in rows] == [0, 0, 1, 1]
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("2")  # the last good one


def test_a_skipped_fake_update_gets_its_metrics_row(tmp_path, monkeypatch):
    """A fake-network update skipped for a NaN loss is logged (column fake_skipped) even between
    log_every rows, as skipped student steps are."""
    real, calls = loop_module.fake_flow_matching_loss, []

    def poisoned(*args, **kwargs):
        calls.append(None)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(loop_module, "fake_flow_matching_loss", poisoned)
    run = tmp_path / "run"
    assert _distill(run, "run.eval_at_end=false", "run.log_every=100") == 0
    assert calls, "the tiny preset's run made no fake update"
    rows = {int(r["step"]): r for r in _rows(run)}
    assert [int(r["fake_skipped"]) for r in rows.values()].count(1) == 1
    assert int(rows[max(rows)]["skipped"]) == 0


def test_sample_every_zero_writes_no_previews(tmp_path):
    run = tmp_path / "run"
    assert _distill(run, "run.sample_every=0", "run.max_steps=3", "run.eval_at_end=false") == 0
    assert len(_rows(run)) >= 1
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["final.png"]  # no step-* previews


def test_sample_and_eval_on_a_finished_run(tmp_path):
    run = tmp_path / "run"
    assert _distill(run, "run.eval_at_end=false") == 0
    out = tmp_path / "samples"
    assert main(["sample", "--run", str(run), "--prompt", "a handwritten digit three", "--steps", "1", "2",
                 "--num", "2", "--output", str(out)]) == 0
    assert (out / "samples-1step.png").is_file() and (out / "samples-2step.png").is_file()
    assert main(["eval", "--run", str(run), "--teacher-steps", "1", "--student-steps", "1",
                 "--output", str(tmp_path / "ev")]) == 0
    table = (tmp_path / "ev" / "eval.md").read_text()
    assert "| teacher | 1 |" in table and "| student | 1 |" in table


def test_generate_data_then_train_on_teacher_latents(tmp_path):
    data = tmp_path / "data"
    path = data / "teacher_latents.safetensors"
    assert main(["generate-data", "--preset", "tiny", "--num", "6", "--steps", "2", "--output", str(path)]) == 0
    latents = load_file(str(path))["latents"]
    assert latents.shape == (6, 16, 4) and torch.isfinite(latents).all()
    run = tmp_path / "run"
    assert _distill(run, "run.eval_at_end=false", "data.source=teacher", f"data.latents_cache={data}") == 0
    assert len(_rows(run)) == 4
    # The file records its teacher: a run of another teacher does not train on it.
    from meanflow.digits.teacher import TEACHER_PATH

    other = tmp_path / "other"
    assert _distill(other, "data.source=teacher", f"data.latents_cache={data}", f"model.teacher={TEACHER_PATH}") == 2
    assert not other.exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lr=-1"], "optim.lr"),
    (["--set", "optim.lrr=1"], "optim.lrr"),
    (["--config", "/nonexistent.yaml"], "nonexistent.yaml"),
    (["--preset", "nope"], "nope"),
    (["--set", "data.prompts=/nonexistent/prompts.txt"], "prompts"),
])
def test_bad_config_is_a_clear_error_and_touches_nothing(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--out", str(run), *args]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("args", [
    ["sample", "--run", "x", "--num", "-2"],           # was a RuntimeError traceback
    ["sample", "--run", "x", "--num", "0"],
    ["eval", "--run", "x", "--teacher-steps", "0"],
    ["generate-data", "--steps", "0", "--output", "x.safetensors"],  # was silently the default
    ["generate-data", "--num", "many", "--output", "x.safetensors"],
    ["plan", "--gpus", "0"],
])
def test_cli_counts_must_be_positive(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_bad_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n")
    run = tmp_path / "run"
    assert _distill(run, f"data.prompts={prompts}") == 2
    assert "holds no prompt" in capsys.readouterr().err and not run.exists()
    prompts.write_text("a photo of a cat\n")
    assert _distill(run, f"data.prompts={prompts}") == 2
    assert "name a digit" in capsys.readouterr().err and not run.exists()
    os.remove(prompts)


def test_corrupt_checkpoint_is_a_clear_error_and_touches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert _distill(run, "run.eval_at_end=false", "run.max_steps=2") == 0
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    weights = latest / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as a full disk would leave it
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}
    assert _distill(run, "run.eval_at_end=false", resume=True) == 2
    assert "student.safetensors" in capsys.readouterr().err
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")} == before


def test_student_with_adapters_exports_merged_ema_weights(tmp_path):
    """model.student_lora_rank: the exported student is a plain FLUX student whose adapted
    weights are the frozen copy plus (α/r)·B·A of the EMA's factors (what the run sampled with)."""
    from meanflow.models.flux_student import FluxStudent
    from meanflow.models.lora import LoRALinear
    from meanflow.train.checkpoint import load_checkpoint

    run = tmp_path / "run"
    assert _distill(run, "run.eval_at_end=false", "model.student_lora_rank=2", "model.student_lora_alpha=3") == 0
    exported = _student_weights(run)
    checkpoint = load_checkpoint(run / "checkpoints")
    weights, ema = checkpoint.tensors("student"), checkpoint.tensors("ema")
    layer = "transformer_blocks.0.attn.to_q"
    prefix = f"transformer.{layer}"
    update = ema[f"params.{prefix}.lora_up"] @ ema[f"params.{prefix}.lora_down"]
    assert update.abs().max() > 0  # trained
    torch.testing.assert_close(exported[f"{layer}.weight"], weights[f"{prefix}.base.weight"] + 1.5 * update)
    assert torch.equal(exported[f"{layer}.bias"], weights[f"{prefix}.base.bias"])
    student = FluxStudent.from_pretrained(run / "student")
    assert not any(isinstance(m, LoRALinear) for m in student.modules())


def test_resume_refuses_a_changed_sample_shift_and_a_missing_config_yaml(tmp_path):
    from meanflow.train.config import ConfigError, load_config, save_yaml
    from meanflow.train.distill import _check_same_run

    config = load_config("flux-dev", None, [f"run.out_dir={tmp_path}", "sample.shift=none"])
    with pytest.raises(ConfigError, match="no config.yaml"):
        _check_same_run(config, tmp_path)
    save_yaml(config, tmp_path / "config.yaml")
    assert _check_same_run(load_config(None, tmp_path / "config.yaml", ["run.max_steps=9"]), tmp_path)
    with pytest.raises(ConfigError, match="^sample.shift"):
        _check_same_run(load_config(None, tmp_path / "config.yaml", ["sample.shift=flux"]), tmp_path)


def test_a_refused_adapter_rank_writes_no_teacher_latents(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--out", str(out), "--set", "run.eval_at_end=false",
                 "--set", "data.source=teacher", "--set", "model.student_lora_rank=100000"]) == 2
    assert "model.student_lora_rank" in capsys.readouterr().err
    assert not out.exists() or not list(out.rglob("*.safetensors"))
