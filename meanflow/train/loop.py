"""The distillation loop: one :class:`Distiller` per run (DESIGN §2, §4).

A training step, for a batch of clean latents x (B, N_img, C) with prompts c:

1. the warm-up schedule says which objective (phase A: discrete target; B: discrete and
   differential, the differential share rising; C: differential, plus alignment);
2. (r, t) from the time sampler, ε ~ N(0, I), z_t = (1 − t)·x + t·ε;
3. v = v_T^g(z_t, t, c), the guided teacher velocity (no grad);
4. differential rows: (u, du/dt) in one pair-mode pass
   (``student.forward_with_tangent`` along (v, 0, 1)), u_tgt = v − (t − r)·sg(du/dt);
   discrete rows: u_tgt from the configured discrete target, u = student(z_t, r, t, c);
5. loss = adaptive-weighted ‖u − sg(u_tgt)‖² (+ λ_align · L_align in phase C);
6. AdamW with gradient clipping, EMA of the student; the fake velocity network takes its own
   flow-matching steps on the student's samples.

Every random draw of the loop comes from one CPU ``torch.Generator`` that the checkpoint saves,
so a resumed run repeats an uninterrupted one bit for bit on a CPU. A non-finite loss or
gradient skips the step (counted); too many in a row stop the run with a clear message.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from meanflow.method import (GuidedTeacher, WarmupSchedule, differential_target, discrete_target,
                             sample, sample_times, time_grid)
from meanflow.method.alignment import fake_flow_matching_loss, trajectory_alignment
from meanflow.method.sampler import SamplerConfig
from meanflow.models.flux_student import FluxStudent, FluxVelocity
from meanflow.ops import adaptive_weighted_loss
from meanflow.train.config import TrainConfig
from meanflow.train.ema import EMA
from meanflow.train.world import World, make_world


class NonFiniteLossError(RuntimeError):
    """Raised when ``run.max_nonfinite_in_a_row`` consecutive steps had a non-finite loss."""


@dataclass
class StepResult:
    """What one :meth:`Distiller.step` did (floats for logging; NaN where not applicable):
    ``loss`` the total, ``meanflow`` the adaptive-weighted MeanFlow loss (≈ 1 while the squared
    error is far above its offset c), ``mse`` its unweighted mean squared error per element."""

    step: int
    phase: str
    loss: float
    meanflow: float
    mse: float
    align: float
    fake: float
    grad_norm: float
    lr: float
    skipped: bool


class Distiller:
    """Student, EMA, fake network, optimizers and schedule of one run.

    Args:
        config: the resolved :class:`~meanflow.train.config.TrainConfig`.
        world: the model family (default :func:`~meanflow.train.world.make_world`).
    """

    def __init__(self, config: TrainConfig, world: World | None = None):
        self.config = config
        torch.manual_seed(config.run.seed)
        self.world = world if world is not None else make_world(config)
        self.device = self.world.device
        if config.data.source == "teacher":
            from meanflow.train.data import prepare_teacher_data

            prepare_teacher_data(self.world, config)
        self.generator = torch.Generator().manual_seed(config.run.seed)
        teacher = self.world.teacher
        if config.model.student_init:
            self.student = FluxStudent.from_pretrained(config.model.student_init)
        else:
            self.student = FluxStudent.from_transformer(copy.deepcopy(teacher.transformer))
        # Trained weights stay float32 (master weights); bf16 is autocast's, in the forward only.
        self.student.to(self.device, torch.float32)
        self.student.requires_grad_(True).train()
        self.student.gradient_checkpointing = config.model.gradient_checkpointing
        self.ema = EMA(self.student, config.optim.ema_decay, warmup=True)  # short runs: no pull to the init
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        self.schedule = WarmupSchedule(config.method.schedule)
        self.guided = GuidedTeacher(teacher.velocity, config.method.guidance)
        self.fake = self.fake_optimizer = None
        if config.method.schedule.alignment:
            self.fake = FluxVelocity(copy.deepcopy(teacher.transformer)).to(self.device, torch.float32)
            self.fake.requires_grad_(True).train()
            self.fake_optimizer = torch.optim.AdamW(self.fake.parameters(), lr=o.fake_lr, betas=tuple(o.betas))
        self._uncond_cache: dict = {}
        self.step_index = 0           # the next step to run
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0

    # -- pieces ------------------------------------------------------------------------------
    def _autocast(self):
        if self.config.run.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _randn(self, shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator).to(self.device)

    def _guidance(self, cond, batch: int):
        """(cond with embedded g if any, uncond or None, per-sample scales or None)."""
        cond, scales = self.guided.prepare(cond, batch, generator=self.generator)
        if scales is not None:
            scales = scales.to(self.device)
        uncond = self._uncond(batch) if self.guided.config.mode == "cfg" else None
        return cond, uncond, scales

    def _uncond(self, batch: int):
        """The conditioning of B empty prompts, encoded once per batch size (the text encoder is
        frozen, so it never changes)."""
        if batch not in self._uncond_cache:
            self._uncond_cache[batch] = self.world.condition([""] * batch)
        return self._uncond_cache[batch]

    def _lr(self, step: int) -> float:
        o = self.config.optim
        return o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else o.lr

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Runs training step ``self.step_index`` and advances it."""
        cfg, m = self.config, self.config.method
        step = self.step_index
        objective = self.schedule.objective(step)
        batch = cfg.data.batch_size
        x, prompts = self.world.training_batch(batch, self.generator)
        cond, uncond, scales = self._guidance(self.world.condition(prompts), batch)
        r, t = sample_times(batch, m.time, generator=self.generator)
        r, t = r.to(self.device), t.to(self.device)
        eps = self._randn(x.shape)
        z = (1 - t)[:, None, None] * x + t[:, None, None] * eps

        def teacher_v(z_, t_, c_=cond):
            return self.guided(z_, t_, c_, uncond=uncond, scale=scales)

        def student_no_grad(z_, r_, t_):
            with torch.no_grad():
                return self.student(z_, r_, t_, cond)

        v = teacher_v(z, t)
        if self.guided.config.mixing:
            v = self.guided.mixed(v, lambda *a: student_no_grad(*a[:3]), z, t, cond, uncond)

        with self._autocast():
            target = u = None
            if objective.needs_differential:
                u, du_dt = self.student.forward_with_tangent(z, r, t, cond, v, None, 1.0)
                target = differential_target(v, r, t, du_dt.to(v.dtype))
            if objective.needs_discrete:
                discrete = discrete_target(replace(m.target, kind=objective.discrete_kind), z=z, r=r, t=t, v=v,
                                           velocity=lambda z_, t_: teacher_v(z_, t_), student=student_no_grad,
                                           generator=self.generator)
                if target is None:
                    target = discrete
                    u = self.student(z, r, t, cond)
                else:  # per-sample mixing in phase B
                    rows = objective.mask(batch, generator=self.generator).to(self.device)
                    target = torch.where(rows[:, None, None], target, discrete)
            meanflow, per_sample = adaptive_weighted_loss(u.float(), target.float(), p=m.loss.power, c=m.loss.c)
            total = meanflow
            alignment = None
            if objective.alignment and self.fake is not None:
                alignment = trajectory_alignment(
                    lambda z_, r_, t_, c_: self.student(z_, r_, t_, c_), teacher_v,
                    lambda x_, t_, c_: self.fake(x_, t_, c_), self._randn((batch, *self.world.latent_shape)),
                    m.alignment, cond=cond, generator=self.generator)
                total = total + m.alignment.weight * alignment.loss.float()

        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(total.detach()))
        grad_norm = float("nan")
        if finite:
            total.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optim.grad_clip))
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.ema.update(self.student)
            self.nonfinite_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1

        fake_loss = float("nan")
        if alignment is not None and finite:
            for _ in range(m.alignment.fake_updates_per_student_step):
                with self._autocast():
                    loss_fake = fake_flow_matching_loss(lambda x_, t_, c_: self.fake(x_, t_, c_), alignment.x_hat,
                                                        m.alignment, cond=cond, generator=self.generator)
                self.fake_optimizer.zero_grad(set_to_none=True)
                loss_fake.backward()
                torch.nn.utils.clip_grad_norm_(self.fake.parameters(), cfg.optim.grad_clip)
                self.fake_optimizer.step()
                fake_loss = float(loss_fake.detach())
        if finite:
            self.schedule.observe(step, float(meanflow.detach()))
        self.step_index += 1
        return StepResult(step=step, phase=objective.phase, loss=float(total.detach()),
                          meanflow=float(meanflow.detach()), mse=float(per_sample.mean()) / u[0].numel(),
                          align=float("nan") if alignment is None else float(alignment.loss.detach()),
                          fake=fake_loss, grad_norm=grad_norm, lr=lr, skipped=not finite)

    def check_finite(self) -> None:
        """Raises :class:`NonFiniteLossError` once ``run.max_nonfinite_in_a_row`` steps in a row
        were skipped."""
        limit = self.config.run.max_nonfinite_in_a_row
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} steps in a row (up to step {self.step_index - 1}) had a non-finite "
                f"loss or gradient; stopping (run.max_nonfinite_in_a_row = {limit}). Lower optim.lr, check "
                "the teacher and the data, or use run.dtype float32.")

    # -- sampling ----------------------------------------------------------------------------
    def ema_student(self) -> FluxStudent:
        """A copy of the student holding the EMA weights (eval mode)."""
        model = copy.deepcopy(self.student)
        self.ema.copy_to(model)
        return model.eval()

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able trainer state (without tensors): step, counters, schedule."""
        return {"step": self.step_index, "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "schedule": self.schedule.state_dict()}

    def load_state(self, state: dict) -> None:
        self.step_index = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.schedule.load_state_dict(state["schedule"])


@torch.no_grad()
def sample_student(student: FluxStudent, world: World, prompts: Sequence[str], steps: int, noise: Tensor,
                   shift: str = "none") -> Tensor:
    """K-step samples (B, N_img, C) float32 of a student for ``prompts`` from ``noise``."""
    cond = world.condition(list(prompts))
    grid = time_grid(SamplerConfig(steps=steps, shift=shift), image_seq_len=world.latent_shape[0])
    return sample(lambda z, r, t, c: student(z, r, t, c).float(), noise.to(world.device).float(), grid, cond)


@torch.no_grad()
def sample_teacher(world: World, prompts: Sequence[str], steps: int, noise: Tensor, guidance,
                   shift: str = "none") -> Tensor:
    """K-step Euler samples (B, N_img, C) float32 of the guided teacher (``guidance`` a
    :class:`~meanflow.method.GuidanceConfig`; its first scale is used), from ``noise``, on the
    time grid of ``shift`` (``"none"`` or ``"flux"``)."""
    batch = noise.shape[0]
    cond = world.condition(list(prompts))
    guided = GuidedTeacher(world.teacher.velocity, guidance)
    scale = guidance.scales[0]
    uncond = None
    if guidance.mode == "cfg":
        uncond = world.condition([""] * batch)
    elif guidance.mode == "embedded":
        from meanflow.method.guidance import set_guidance

        cond = set_guidance(cond, torch.full((batch,), scale, device=world.device))
    grid = time_grid(SamplerConfig(steps=steps, shift=shift), image_seq_len=world.latent_shape[0])
    return sample(lambda z, r, t, c: guided(z, t, c, uncond=uncond, scale=scale).float(),
                  noise.to(world.device).float(), grid, cond)
