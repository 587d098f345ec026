"""``meanflow distill``: a whole run, from a resolved config to a report.

Run folder (``run.out_dir``)::

    config.yaml          the resolved configuration that ran
    metrics.csv          one row per logged step (TensorBoard events beside it if installed)
    samples/step-*.png   student samples (EMA weights) at 1, 2, 4 steps, fixed noise
    checkpoints/         step-*/ folders (student, EMA, fake network, optimizers, RNG, schedule)
                         and a ``latest`` pointer, written atomically
    student/             the final student (EMA weights), ``FluxStudent.from_pretrained``-loadable, and
                         ``meanflow_pipeline.json`` recording its time grid (``sample.shift``) and
                         base pipeline (FLUX: ``model.teacher``)
    eval.json, report.md, loss.png, eval grids    at the end (``run.eval_at_end``)

A run folder that already holds checkpoints, or any of the files above (a run that stopped
before its first checkpoint), is never overwritten: pass ``resume=True`` to continue a run, or
choose another ``run.out_dir``. A resume may change ``run.*``, ``sample.*`` and ``eval.*`` but
``sample.shift`` (the rest must match config.yaml); config.yaml is then rewritten to what runs. Ctrl-C lets the current step finish, saves a
checkpoint there and returns 130 (a second Ctrl-C stops at once, saving nothing new); too many
non-finite steps in a row save nothing new and return 1 (the last good checkpoint stays).

Under ``torchrun`` (:mod:`meanflow.train.distributed`) every rank runs this; rank 0 alone logs
and writes the run folder's files, checkpoints are sharded (``torch.distributed.checkpoint``,
each rank writes its shards) and resume on any number of ranks, or in one process; a
one-process checkpoint resumes on several ranks too. The exported
student is whole (gathered on rank 0). Ctrl-C there stops without a new checkpoint (the ranks
may be at different points of a step). An error on one rank ends that process; torchrun then
stops the others and prints the error.
"""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import torch

from meanflow.train.atomic import atomic_folder, atomic_write_text
from meanflow.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from meanflow.train.config import ConfigError, TrainConfig, load_config, save_yaml, to_dict
from meanflow.train.distributed import Ranks, full_state_dict, init_ranks, silent
from meanflow.train.logger import Progress, RunLogger
from meanflow.train.loop import Distiller, NonFiniteLossError, sample_student
from meanflow.train.world import resolve_device

CHECKPOINTS = "checkpoints"
GRID_SEED = 4321
LOG_COLUMNS = ("phase", "loss", "meanflow", "mse", "align", "fake", "grad_norm", "lr", "skipped", "nonfinite_total",
               "fake_skipped")


# What a run writes into its folder besides checkpoints/: a folder holding any of them is another
# run's (or a failed one's) and is not overwritten without --resume.
RUN_FILES = ("config.yaml", "metrics.csv", "samples", "student", "eval.json", "report.md", "loss.png", "tb")


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    has_run = find_checkpoint(out_dir / CHECKPOINTS) is not None
    if resume and not has_run:
        raise ConfigError(f"run.out_dir: --resume given, but {str(out_dir)!r} holds no checkpoint")
    if not resume and has_run:
        raise ConfigError(f"run.out_dir: {str(out_dir)!r} already holds a run; pass --resume to continue it "
                          "or choose another run.out_dir")
    if not resume:
        # A run that stopped before its first checkpoint leaves config.yaml and metrics.csv; a new
        # run would overwrite them (and anything else of that name the folder holds).
        found = [name for name in RUN_FILES if (out_dir / name).exists()]
        if found:
            raise ConfigError(f"run.out_dir: {str(out_dir)!r} already holds {', '.join(found)} but no checkpoint "
                              "(a run that stopped before saving one?); remove them or choose another run.out_dir")


# What a resumed run may change (how long, how often, what is reported); the rest must match.
RESUMABLE_CHANGES = ("run", "sample", "eval")
# Keys inside those sections that training reads, so they must match too: alignment rolls the
# student out on the sampling grid, and teacher latents are generated on it.
FIXED_ON_RESUME = ("sample.shift",)


def _flat(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _check_same_run(config: TrainConfig, out_dir: Path) -> list[str]:
    """On resume: the recorded config.yaml and ``config`` must agree outside RESUMABLE_CHANGES.
    Returns the keys that differ inside them, as ``"key: old -> new"``."""
    path = out_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError("run.out_dir", f"--resume: {str(out_dir)!r} has a checkpoint but no config.yaml, so "
                                         "the settings it ran with cannot be checked")
    old = dict(_flat(to_dict(load_config(None, path, []))))
    new = dict(_flat(to_dict(config)))
    differing = [k for k in new if old.get(k) != new[k]]
    changed = [k for k in differing if k.split(".")[0] not in RESUMABLE_CHANGES or k in FIXED_ON_RESUME]
    if changed:
        raise ConfigError(f"{changed[0]}: --resume with a different setting than the run recorded in {path} "
                          f"({old.get(changed[0])!r} there, {new[changed[0]]!r} now; all differing: {changed})")
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differing]


class _StepInterrupt:
    """Holds a Ctrl-C (SIGINT) that arrives during a training step (and the writing of its
    metrics row) until the step is done, so
    the checkpoint Ctrl-C saves never holds half a step (weights moved by the optimizer, but the
    EMA, the step count or the fake network not yet): ``requested`` is then set, and the loop
    stops once the step is logged (:meth:`stop_if_requested`). A second Ctrl-C interrupts at
    once; the step is then torn (``torn``) and must not be saved. Main thread only (elsewhere,
    or with SIGINT ignored, a no-op)."""

    def __init__(self):
        self.torn = False
        self.requested = False

    def stop_if_requested(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def around_step(self):
        previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() \
            else signal.SIG_IGN
        if previous is signal.SIG_IGN:  # not the main thread, or SIGINT ignored (a background job)
            yield
            return
        if previous is None:  # a handler not set from Python: restore Python's default
            previous = signal.default_int_handler
        pending = []

        def hold(signum, frame):
            pending.append(signum)
            signal.signal(signal.SIGINT, previous)  # the next Ctrl-C acts at once

        signal.signal(signal.SIGINT, hold)
        try:
            yield
        except KeyboardInterrupt:
            self.torn = bool(pending)  # a second Ctrl-C broke into the step
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
        self.requested = bool(pending)


class Run:
    """One ``meanflow distill`` run; see the module docstring. ``log`` prints status lines (on
    rank 0 only). ``ranks`` and ``device``: this process's place (default: joins the process
    group when started by torchrun, else one process)."""

    def __init__(self, config: TrainConfig, resume: bool = False, log=print, ranks: Ranks | None = None,
                 device: torch.device | None = None):
        self.config = config
        self.out_dir = Path(config.run.out_dir)
        _check_out_dir(self.out_dir, resume)
        changed = _check_same_run(config, self.out_dir) if resume else []
        if ranks is None:
            ranks, device = init_ranks(resolve_device(config.run.device))
        self.ranks = ranks
        self.resume = resume
        self.log = log if ranks.main else silent
        if config.run.threads > 0:
            torch.set_num_threads(config.run.threads)
        self.distiller = Distiller(config, ranks=ranks, device=device, resume=resume)
        if resume:
            self.restore(load_checkpoint(self.out_dir / CHECKPOINTS))
            if changed:
                self.log(f"resumed with changed settings: {'; '.join(changed)}")
        if ranks.main and (not resume or changed):
            # config.yaml always holds what runs now (a resume may change run.*, sample.*, eval.*).
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(config, self.out_dir / "config.yaml")
        prompts = self.distiller.world.eval_prompts()
        self.grid_prompts = [p for p in prompts for _ in range(config.sample.per_prompt)]
        self.grid_noise = torch.randn((len(self.grid_prompts), *self.distiller.world.latent_shape),
                                      generator=torch.Generator().manual_seed(GRID_SEED))

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        d = self.distiller
        if d.ranks.sharded:
            # No sha256 of the shards: for FLUX they are hundreds of GB, read again by every rank on
            # resume. Sizes are still recorded and checked, and DCP checks its own metadata.
            return save_sharded_checkpoint(self.out_dir / CHECKPOINTS, d.step_index, self._sharded_state(),
                                           d.state(), ranks=d.ranks, generators={"train": d.generator},
                                           checksums=False)
        modules = {"student": d.student.state_dict(), "ema": d.ema.state_dict()}
        optimizers = {"student": d.optimizer}
        if d.fake is not None:
            modules["fake"] = d.fake.state_dict()
            optimizers["fake"] = d.fake_optimizer
        return save_checkpoint(self.out_dir / CHECKPOINTS, d.step_index, modules, d.state(),
                               optimizers=optimizers, generators={"train": d.generator})

    def _sharded_state(self) -> dict:
        """The models' and optimizers' state as ``torch.distributed.checkpoint`` saves and loads it
        (DTensor shards when sharded, whole tensors in one process)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        d = self.distiller
        state = {"student": get_model_state_dict(d.student), "ema": d.ema.state_dict(),
                 "optimizer.student": get_optimizer_state_dict(d.student, d.optimizer)}
        if d.fake is not None:
            state["fake"] = get_model_state_dict(d.fake)
            state["optimizer.fake"] = get_optimizer_state_dict(d.fake, d.fake_optimizer)
        return state

    def restore(self, checkpoint) -> None:
        d = self.distiller
        if checkpoint.sharded:
            self._restore_sharded(checkpoint)
        elif d.ranks.sharded:
            self._restore_whole_into_shards(checkpoint)
        else:
            d.student.load_state_dict(checkpoint.tensors("student"))
            d.ema.load_state_dict(checkpoint.tensors("ema"))
            checkpoint.restore_optimizer("student", d.optimizer)
            if d.fake is not None:
                d.fake.load_state_dict(checkpoint.tensors("fake"))
                checkpoint.restore_optimizer("fake", d.fake_optimizer)
        checkpoint.restore_rng({"train": d.generator})
        d.load_state(checkpoint.state)
        self.log(f"resumed from {checkpoint.path} at step {d.step_index}")

    def _restore_sharded(self, checkpoint) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        d = self.distiller
        state = self._sharded_state()
        checkpoint.load_sharded(state)
        set_model_state_dict(d.student, state["student"])
        set_optimizer_state_dict(d.student, d.optimizer, state["optimizer.student"])
        d.ema.load_state_dict(state["ema"])
        if d.fake is not None:
            set_model_state_dict(d.fake, state["fake"])
            set_optimizer_state_dict(d.fake, d.fake_optimizer, state["optimizer.fake"])

    def _restore_whole_into_shards(self, checkpoint) -> None:
        """A one-process checkpoint (whole tensors) resumed on several ranks: every rank reads it
        and keeps its shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from torch.distributed.tensor import DTensor, distribute_tensor

        d = self.distiller
        whole = StateDictOptions(full_state_dict=True)
        models = [("student", d.student, d.optimizer)]
        if d.fake is not None:
            models.append(("fake", d.fake, d.fake_optimizer))
        for name, model, optimizer in models:
            set_model_state_dict(model, checkpoint.tensors(name), options=whole)
            set_optimizer_state_dict(model, optimizer,
                                     _by_parameter_name(model, optimizer, checkpoint.optimizer_state(name)),
                                     options=whole)
        saved = checkpoint.tensors("ema")
        d.ema.load_state_dict({
            key: distribute_tensor(saved[key].to(current.device), current.device_mesh, current.placements)
            if isinstance(current, DTensor) else saved[key]
            for key, current in d.ema.state_dict().items()})

    # -- pieces ------------------------------------------------------------------------------
    def write_samples(self, tag: str) -> Path:
        """A grid: one row per step count in ``sample.steps``, the EMA student, fixed noise.
        Every rank samples (the models are sharded); rank 0 writes."""
        world = self.distiller.world
        with self.distiller.ema_weights() as model, self.distiller.sampling_precision():
            latents = [sample_student(model, world, self.grid_prompts, steps, self.grid_noise, self.config.sample.shift)
                       for steps in self.config.sample.steps]
        path = self.out_dir / "samples" / f"{tag}.png"
        if self.ranks.main:
            world.save_grid(torch.cat([world.decode(z) for z in latents]), str(path), nrow=len(self.grid_prompts))
        return path

    # -- the run -----------------------------------------------------------------------------
    def train(self) -> int:
        """Trains up to ``run.max_steps``; returns 0, 1 (non-finite stop) or 130 (Ctrl-C)."""
        cfg, d = self.config, self.distiller
        logger, progress = _Quiet(), _Quiet()
        if self.ranks.main:
            logger = RunLogger(self.out_dir, resume_step=d.step_index - 1 if self.resume else None,
                               columns=LOG_COLUMNS)
            progress = Progress(cfg.run.max_steps, initial=d.step_index)
        interrupt = _StepInterrupt()
        try:
            while d.step_index < cfg.run.max_steps:
                # The step's metrics row is written inside the held section too: a Ctrl-C that
                # landed between the step and its row would have saved the step without it.
                with interrupt.around_step():
                    result = d.step()
                    done = result.step + 1
                    # Every skipped step or fake update gets its row, whatever log_every says.
                    if (result.step % cfg.run.log_every == 0 or done == cfg.run.max_steps or result.skipped
                            or result.fake_skipped):
                        logger.log(result.step, phase=result.phase, loss=result.loss, meanflow=result.meanflow,
                                   mse=result.mse, align=result.align, fake=result.fake, grad_norm=result.grad_norm,
                                   lr=result.lr, skipped=int(result.skipped), nonfinite_total=d.nonfinite_total,
                                   fake_skipped=result.fake_skipped)
                progress.update(done, loss=result.loss, phase=result.phase)
                interrupt.stop_if_requested()
                d.check_finite()
                if cfg.run.sample_every and done % cfg.run.sample_every == 0:  # 0: never
                    self.write_samples(f"step-{done:06d}")
                if done % cfg.run.checkpoint_every == 0 or done == cfg.run.max_steps:
                    self.save()
        except KeyboardInterrupt:
            progress.close()
            logger.close()
            if self.ranks.sharded or interrupt.torn:
                self.log(f"\ninterrupted at step {d.step_index}; continue from the last checkpoint with --resume")
                return 130
            path = self.save()
            self.log(f"\ninterrupted: saved {path} at step {d.step_index}; continue with --resume")
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
        with d.ema_weights() as student:
            self.export_student(self.out_dir / "student")
            self.log(f"student (EMA weights) saved to {self.out_dir / 'student'}")
            if not self.config.run.eval_at_end:
                return None
            try:
                d.world.evaluator()
            except ValueError as err:
                self.log(f"no evaluation: {err}")
                return None
            from meanflow.eval.evaluate import evaluate, json_ready

            # Every rank evaluates (the models are sharded); rank 0 writes.
            result = evaluate(d.world, student, self.config, log=self.log, sampling=d.sampling_precision)
        if self.ranks.main:
            atomic_write_text(self.out_dir / "eval.json", json.dumps(json_ready(result), indent=2))
            report = write_report(self.out_dir, self.config, result, d.world, phase_a_steps=d.schedule.b_start)
            self.log(f"report: {report}")
        return result

    def export_student(self, directory: Path) -> None:
        """Writes the student as it is now, whole (``FluxStudent.save_pretrained``, adapters
        merged), and in ``meanflow_pipeline.json``, which ``MeanFlowFluxPipeline`` reads, the
        time grid it samples on (``sample.shift``) and, for FLUX, the teacher's pipeline as its
        base, from rank 0. Every rank calls it; the weights are gathered on rank 0's CPU. The
        folder is replaced whole (``atomic_folder``): never half a new student beside an old one."""
        from meanflow.models.flux_student import FluxStudent
        from meanflow.models.lora import lora_scalings, merge_lora_state_dict
        from meanflow.models.pipeline import save_pipeline_config

        d = self.distiller
        state = full_state_dict(d.student, d.ranks)
        if d.ranks.main:
            # Adapters (model.student_lora_rank) merged into plain weights: a plain FLUX student.
            state = merge_lora_state_dict(state, lora_scalings(d.student))
            with torch.device("meta"):  # the shapes only: the weights are assigned from `state`
                whole = FluxStudent.from_config(dict(d.student.transformer.config))
            whole.load_state_dict(state, assign=True)
            model = self.config.model
            flux = model.kind == "flux"  # its teacher is the FLUX pipeline whose encoders and VAE sample with it

            def write(folder: Path) -> None:
                whole.save_pretrained(folder)
                save_pipeline_config(folder, shift=self.config.sample.shift, base=model.teacher if flux else None,
                                     revision=model.revision if flux else None)

            atomic_folder(directory, write)
        d.ranks.barrier()


def distill(config: TrainConfig, resume: bool = False, log=print) -> int:
    """The whole command: train, then export and evaluate. Returns the exit status."""
    start = time.perf_counter()
    run = Run(config, resume=resume, log=log)
    run.log(f"distilling the {config.model.kind} teacher into {config.run.out_dir} "
            f"({config.run.max_steps} steps, batch {config.data.batch_size}, device {run.distiller.device})")
    status = run.train()
    if status != 0:
        return status
    try:
        run.write_samples("final")
        run.finish()
    except KeyboardInterrupt:
        # The final checkpoint is saved; the export and the eval are redone from it. Each of
        # their files is written whole or not at all (atomic_folder, atomic_write).
        run.log("\ninterrupted after training: the final checkpoint is saved; run again with --resume "
                "to export and evaluate")
        return 130
    run.log(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _by_parameter_name(model, optimizer, state: dict) -> dict:
    """An optimizer state_dict keyed by parameter index (``optimizer.state_dict()``: the indices
    count the optimizer's own parameters, in its groups' order, which are the trained ones only
    where adapters freeze the rest) re-keyed by parameter name, the form
    ``set_optimizer_state_dict`` takes."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [dict(group, params=[names[i] for i in group["params"]]) for group in state["param_groups"]]
    return {"state": {names[int(i)]: value for i, value in state["state"].items()}, "param_groups": groups}


class _Quiet:
    """The metrics logger and progress line of ranks other than 0: they do nothing."""

    def log(self, *args, **kwargs) -> None:
        pass

    update = close = log

