"""``meanflow distill``: a whole run, from a resolved config to a report.

Run folder (``run.out_dir``)::

    config.yaml          the resolved configuration that ran
    metrics.csv          one row per logged step (TensorBoard events beside it if installed)
    samples/step-*.png   student samples (EMA weights) at 1, 2, 4 steps, fixed noise
    checkpoints/         step-*/ folders (student, EMA, fake network, optimizers, RNG, schedule)
                         and a ``latest`` pointer, written atomically
    student/             the final student (EMA weights), ``FluxStudent.from_pretrained``-loadable
    eval.json, report.md, loss.png, eval grids    at the end (``run.eval_at_end``)

A run folder that already holds checkpoints is never overwritten: pass ``resume=True`` to
continue it, or choose another ``run.out_dir``. Ctrl-C saves a checkpoint at the current step and
returns 130; too many non-finite steps in a row save nothing new and return 1 (the last good
checkpoint stays).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from meanflow.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from meanflow.train.config import ConfigError, TrainConfig, load_config, save_yaml, to_dict
from meanflow.train.logger import Progress, RunLogger
from meanflow.train.loop import Distiller, NonFiniteLossError, sample_student

CHECKPOINTS = "checkpoints"
GRID_SEED = 4321
LOG_COLUMNS = ("phase", "loss", "meanflow", "mse", "align", "fake", "grad_norm", "lr", "skipped", "nonfinite_total")


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    has_run = find_checkpoint(out_dir / CHECKPOINTS) is not None
    if resume and not has_run:
        raise ConfigError(f"run.out_dir: --resume given, but {str(out_dir)!r} holds no checkpoint")
    if not resume and has_run:
        raise ConfigError(f"run.out_dir: {str(out_dir)!r} already holds a run; pass --resume to continue it "
                          "or choose another run.out_dir")


# What a resumed run may change (how long, how often, what is reported); the rest must match.
RESUMABLE_CHANGES = ("run", "sample", "eval")


def _check_same_run(config: TrainConfig, out_dir: Path) -> None:
    """On resume: the recorded config.yaml and ``config`` must agree outside RESUMABLE_CHANGES."""
    path = out_dir / "config.yaml"
    if not path.is_file():
        return
    recorded = to_dict(load_config(None, path, []))
    current = to_dict(config)

    def flat(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    old, new = dict(flat(recorded)), dict(flat(current))
    changed = [k for k in new if k.split(".")[0] not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if changed:
        raise ConfigError(f"{changed[0]}: --resume with a different setting than the run recorded in {path} "
                          f"({old.get(changed[0])!r} there, {new[changed[0]]!r} now; all differing: {changed})")


class Run:
    """One ``meanflow distill`` run; see the module docstring. ``log`` prints status lines."""

    def __init__(self, config: TrainConfig, resume: bool = False, log=print):
        self.config = config
        self.out_dir = Path(config.run.out_dir)
        _check_out_dir(self.out_dir, resume)
        if resume:
            _check_same_run(config, self.out_dir)
        self.resume = resume
        self.log = log
        if config.run.threads > 0:
            torch.set_num_threads(config.run.threads)
        self.distiller = Distiller(config)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.restore(load_checkpoint(self.out_dir / CHECKPOINTS))
        else:
            save_yaml(config, self.out_dir / "config.yaml")
        prompts = self.distiller.world.eval_prompts()
        self.grid_prompts = [p for p in prompts for _ in range(config.sample.per_prompt)]
        self.grid_noise = torch.randn((len(self.grid_prompts), *self.distiller.world.latent_shape),
                                      generator=torch.Generator().manual_seed(GRID_SEED))

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        d = self.distiller
        modules = {"student": d.student.state_dict(), "ema": d.ema.state_dict()}
        optimizers = {"student": d.optimizer}
        if d.fake is not None:
            modules["fake"] = d.fake.state_dict()
            optimizers["fake"] = d.fake_optimizer
        return save_checkpoint(self.out_dir / CHECKPOINTS, d.step_index, modules, d.state(),
                               optimizers=optimizers, generators={"train": d.generator})

    def restore(self, checkpoint) -> None:
        d = self.distiller
        d.student.load_state_dict(checkpoint.tensors("student"))
        d.ema.load_state_dict(checkpoint.tensors("ema"))
        checkpoint.restore_optimizer("student", d.optimizer)
        if d.fake is not None:
            d.fake.load_state_dict(checkpoint.tensors("fake"))
            checkpoint.restore_optimizer("fake", d.fake_optimizer)
        checkpoint.restore_rng({"train": d.generator})
        d.load_state(checkpoint.state)
        self.log(f"resumed from {checkpoint.path} at step {d.step_index}")

    # -- pieces ------------------------------------------------------------------------------
    def write_samples(self, tag: str) -> Path:
        """A grid: one row per step count in ``sample.steps``, the EMA student, fixed noise."""
        world, model = self.distiller.world, self.distiller.ema_student()
        rows = [world.decode(sample_student(model, world, self.grid_prompts, steps, self.grid_noise,
                                            self.config.sample.shift))
                for steps in self.config.sample.steps]
        path = self.out_dir / "samples" / f"{tag}.png"
        world.save_grid(torch.cat(rows), str(path), nrow=len(self.grid_prompts))
        return path

    # -- the run -----------------------------------------------------------------------------
    def train(self) -> int:
        """Trains up to ``run.max_steps``; returns 0, 1 (non-finite stop) or 130 (Ctrl-C)."""
        cfg, d = self.config, self.distiller
        logger = RunLogger(self.out_dir, resume_step=d.step_index - 1 if self.resume else None,
                           columns=LOG_COLUMNS)
        progress = Progress(cfg.run.max_steps, initial=d.step_index)
        try:
            while d.step_index < cfg.run.max_steps:
                result = d.step()
                done = result.step + 1
                if result.step % cfg.run.log_every == 0 or done == cfg.run.max_steps or result.skipped:
                    logger.log(result.step, phase=result.phase, loss=result.loss, meanflow=result.meanflow, mse=result.mse,
                               align=result.align, fake=result.fake, grad_norm=result.grad_norm, lr=result.lr,
                               skipped=int(result.skipped), nonfinite_total=d.nonfinite_total)
                progress.update(done, loss=result.loss, phase=result.phase)
                d.check_finite()
                if done % cfg.run.sample_every == 0:
                    self.write_samples(f"step-{done:06d}")
                if done % cfg.run.checkpoint_every == 0 or done == cfg.run.max_steps:
                    self.save()
        except KeyboardInterrupt:
            progress.close()
            path = self.save()
            self.log(f"\ninterrupted: saved {path} at step {d.step_index}; continue with --resume")
            logger.close()
            return 130
        except NonFiniteLossError as err:
            progress.close()
            logger.close()
            self.log(f"\nstopped: {err}")
            return 1
        progress.close()
        logger.close()
        return 0

    def finish(self) -> dict | None:
        """Exports the EMA student and, with ``run.eval_at_end``, evaluates and writes the report."""
        from meanflow.eval.report import write_report

        d = self.distiller
        student = d.ema_student()
        student.save_pretrained(self.out_dir / "student")
        self.log(f"student (EMA weights) saved to {self.out_dir / 'student'}")
        if not self.config.run.eval_at_end:
            return None
        try:
            d.world.evaluator()
        except ValueError as err:
            self.log(f"no evaluation: {err}")
            return None
        from meanflow.eval.evaluate import evaluate, json_ready

        result = evaluate(d.world, student, self.config, log=self.log)
        with open(self.out_dir / "eval.json", "w") as f:
            json.dump(json_ready(result), f, indent=2)
        report = write_report(self.out_dir, self.config, result, d.world)
        self.log(f"report: {report}")
        return result


def distill(config: TrainConfig, resume: bool = False, log=print) -> int:
    """The whole command: train, then export and evaluate. Returns the exit status."""
    start = time.perf_counter()
    run = Run(config, resume=resume, log=log)
    log(f"distilling the {config.model.kind} teacher into {config.run.out_dir} "
        f"({config.run.max_steps} steps, batch {config.data.batch_size}, device {run.distiller.device})")
    status = run.train()
    if status != 0:
        return status
    run.write_samples("final")
    run.finish()
    log(f"done in {time.perf_counter() - start:.0f} s")
    return 0

