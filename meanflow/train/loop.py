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
   flow-matching steps on the student's samples (all its weights, or low-rank adapters over a
   frozen copy with ``model.fake_lora_rank``).

Every random draw of the loop comes from one CPU ``torch.Generator`` that the checkpoint saves,
so a resumed run repeats an uninterrupted one bit for bit on a CPU. A non-finite loss or
gradient skips the step (counted); too many in a row stop the run with a clear message. The fake
network's updates are guarded and counted the same way, apart from the student's steps.

On several ranks (``torchrun``, :mod:`meanflow.train.distributed`) the student, teacher and
fake network are sharded with FSDP2, every rank draws the whole global batch's random values
from the same generator and computes its own rows, and the logged figures are averages over
ranks: the run repeats the one-process run of the same global batch, to float rounding.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from meanflow.method import draws
from meanflow.method import (GuidedTeacher, WarmupSchedule, differential_target, discrete_target,
                             sample, sample_times, time_grid)
from meanflow.method.alignment import fake_flow_matching_loss, trajectory_alignment
from meanflow.method.sampler import SamplerConfig
from meanflow.models.flux_student import FluxStudent, FluxVelocity
from meanflow.models.lora import add_lora_to_flux_blocks, lora_targets
from meanflow.ops import adaptive_weighted_loss
from meanflow.train.config import ConfigError, TrainConfig
from meanflow.train.distributed import (Ranks, check_batch_split, device_mesh, mixed_precision, reshard, shard_flux,
                                        silent)
from meanflow.train.ema import EMA
from meanflow.train.world import World, make_world, resolve_device


# Seeds of the adapters' initial A, apart from the run's other draws.
STUDENT_LORA_SEED_OFFSET, FAKE_LORA_SEED_OFFSET = 1_000_003, 2_000_003


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
    fake_skipped: int = 0  # the fake network's updates skipped this step (non-finite loss or gradient)


class Distiller:
    """Student, EMA, fake network, optimizers and schedule of one run.

    Args:
        config: the resolved :class:`~meanflow.train.config.TrainConfig`.
        world: the model family (default :func:`~meanflow.train.world.make_world`).
        ranks: this process's :class:`~meanflow.train.distributed.Ranks` (default one process);
            with ``ranks.sharded`` the models are sharded with FSDP2 over the process group.
        device: the device of this rank (default ``run.device`` resolved).
        resume: whether this continues a run (its cached teacher latents are its own data, made
            before any resumable setting changed; see :func:`meanflow.train.data.prepare_teacher_data`).
    """

    def __init__(self, config: TrainConfig, world: World | None = None, ranks: Ranks | None = None,
                 device: torch.device | None = None, resume: bool = False):
        self.config = config
        self.ranks = ranks = ranks or Ranks.single()
        check_batch_split(config.data.batch_size, ranks.size)
        torch.manual_seed(config.run.seed)
        self.world = world if world is not None else _make_world(config, ranks, device)
        if config.method.guidance.mode == "embedded" and not getattr(
                self.world.teacher.transformer.config, "guidance_embeds", False):
            # Caught here, before the run folder is written, not as a model error at step 0.
            raise ConfigError("method.guidance.mode", "'embedded' needs a guidance-distilled teacher "
                                                      "(guidance_embeds); this one has none: use 'cfg' or 'none'")
        check_config_lora_ranks(self.world.teacher.transformer, config)  # before any data is written
        if config.data.source == "teacher":
            from meanflow.train.data import prepare_teacher_data

            prepare_teacher_data(self.world, config, log=print if ranks.main else silent, ranks=ranks,
                                 resume=resume)
        self.device = self.world.device
        self.generator = torch.Generator().manual_seed(config.run.seed)
        teacher = self.world.teacher
        # Sharded, the trained copies are made on the CPU and each is sharded at once: FSDP2 moves
        # every unit's shard to this rank's device, so no device ever holds a whole copy.
        home = torch.device("cpu") if ranks.sharded else self.device
        mesh = device_mesh(self.device, ranks) if ranks.sharded else None
        policy = mixed_precision(config.run.dtype)
        if config.model.student_init:
            self.student = FluxStudent.from_pretrained(config.model.student_init)
        else:
            self.student = FluxStudent.from_transformer(float32_copy(teacher.transformer, home))
        # Trained weights stay float32 (master weights); bf16 is autocast's, in the forward only.
        self.student.to(home, torch.float32)
        self.student.train()  # trainable by construction; from_pretrained gives eval mode, as diffusers does
        self.student.gradient_checkpointing = config.model.gradient_checkpointing
        if config.model.student_lora_rank:  # the (t − r) embedder and the adapters train, the copy stays
            add_config_lora(self.student.transformer, config.model.student_lora_rank, config.model.student_lora_alpha,
                            "model.student_lora_rank", config.run.seed + STUDENT_LORA_SEED_OFFSET)
        if ranks.sharded:
            shard_flux(self.student, mesh, ("forward_with_tangent",), policy)
        self.fake = self.fake_optimizer = None
        if config.method.schedule.alignment:
            self.fake = make_fake(teacher.transformer, home, config)
            self.fake.gradient_checkpointing = config.model.gradient_checkpointing
            if ranks.sharded:
                shard_flux(self.fake, mesh, (), policy)
        if ranks.sharded:  # after the copies of it
            shard_flux(teacher, mesh, ("velocity",), frozen=True)
        self.ema = EMA(self.student, config.optim.ema_decay, warmup=True)  # short runs: no pull to the init
        o = config.optim
        self.optimizer = torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=o.lr,
                                           betas=tuple(o.betas), weight_decay=o.weight_decay)
        if self.fake is not None:
            self.fake_optimizer = torch.optim.AdamW([p for p in self.fake.parameters() if p.requires_grad],
                                                    lr=o.fake_lr, betas=tuple(o.betas),
                                                    weight_decay=o.weight_decay)
        self.schedule = WarmupSchedule(config.method.schedule)
        # The step's forwards, compiled with model.compile; the modules stay as they are (EMA,
        # sampling and checkpoints use them directly). Each looks its model up at every call.
        compiled = _compiler(config.model.compile)
        self.student_forward = compiled(lambda *args: self.student(*args))
        self.student_pair = compiled(lambda *args: self.student.forward_with_tangent(*args))
        self.fake_forward = compiled(lambda *args: self.fake(*args))
        self.guided = GuidedTeacher(compiled(lambda *args: self.world.teacher.velocity(*args)),
                                    config.method.guidance)
        self._uncond_cache: dict = {}
        self.step_index = 0           # the next step to run
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.fake_nonfinite_in_a_row = 0   # the fake network's updates, counted apart
        self.fake_nonfinite_total = 0
        self.nonfinite_from_fake = False   # the last skipped step: the fake velocity broke its loss

    # -- pieces ------------------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast on the run's device for ``run.dtype="bfloat16"``, else nothing."""
        if self.config.run.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sampling_precision(self):
        """The context of the forwards outside training steps (sample grids, evaluation): bf16
        autocast for a sharded bf16 run, whose blocks compute with bf16 parameters and need it;
        nothing otherwise (one process samples its float32 weights in float32)."""
        return self.autocast() if self.ranks.sharded else contextlib.nullcontext()

    def _guidance(self, cond, batch: int, rows):
        """(cond with embedded g if any, uncond or None, per-sample scales or None).

        uncond is made for true CFG and for the ω/κ mixing (its u_θ(z, t, t | ∅) term), in every
        mode; with embedded guidance it carries the same g as cond."""
        cond, scales = self.guided.prepare(cond, batch, generator=rows)
        if scales is not None:
            scales = scales.to(self.device)
        mode = self.guided.config.mode
        uncond = None
        if mode == "cfg" or self.guided.config.mixing:
            uncond = self._uncond(batch)
            if mode == "embedded":
                uncond = self.guided.set_guidance(uncond, scales)
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
        # Every draw is made for the global batch; this rank keeps its rows (all of them on one process).
        rows = self.ranks.rows(cfg.data.batch_size, self.generator)
        x, prompts = self.world.training_batch(cfg.data.batch_size, self.generator)
        if isinstance(rows, draws.RowShard):
            x, prompts = x[rows.local], prompts[rows.local]
        batch = x.shape[0]
        cond, uncond, scales = self._guidance(self.world.condition(prompts), batch, rows)
        r, t = sample_times(batch, m.time, generator=rows)
        r, t = r.to(self.device), t.to(self.device)
        eps = draws.randn(x.shape, rows, device=self.device)
        z = (1 - t)[:, None, None] * x + t[:, None, None] * eps

        def teacher_v(z_, t_, c_=cond):
            return self.guided(z_, t_, c_, uncond=uncond, scale=scales)

        def student_no_grad(z_, r_, t_, c_=cond):
            with torch.no_grad():
                return self.student_forward(z_, r_, t_, c_)

        v = v_teacher = teacher_v(z, t)
        if self.guided.config.mixing:  # the student's own r = t predictions, given c and given ∅
            v = self.guided.mixed(v_teacher, student_no_grad, z, t, cond, uncond)

        with self.autocast():
            target = u = None
            if objective.needs_differential:
                u, du_dt = self.student_pair(z, r, t, cond, v, None, 1.0)
                target = differential_target(v, r, t, du_dt.to(v.dtype))
            if objective.needs_discrete:
                discrete = discrete_target(replace(m.target, kind=objective.discrete_kind), z=z, r=r, t=t, v=v,
                                           velocity=lambda z_, t_: teacher_v(z_, t_), student=student_no_grad,
                                           generator=rows, teacher_v=v_teacher)
                if target is None:
                    target = discrete
                    u = self.student_forward(z, r, t, cond)
                else:  # per-sample mixing in phase B
                    differential = objective.mask(batch, generator=rows).to(self.device)
                    target = torch.where(differential[:, None, None], target, discrete)
            meanflow, per_sample = adaptive_weighted_loss(u.float(), target.float(), p=m.loss.power, c=m.loss.c)
            total = meanflow
            alignment = None
            if objective.alignment and self.fake is not None:
                alignment = trajectory_alignment(
                    self.student_forward, teacher_v, self.fake_forward,
                    draws.randn((batch, *self.world.latent_shape), rows, device=self.device),
                    m.alignment, cond=cond, generator=rows, grid=self.alignment_grid())
                total = total + m.alignment.weight * alignment.loss.float()

        lr = self._lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        finite = self.ranks.all(bool(torch.isfinite(total.detach())))  # every rank skips, or none
        grad_norm = float("nan")
        if finite:
            total.backward()
            grad_norm = _clip_grad_norm(self.student, cfg.optim.grad_clip)
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.ema.update(self.student)
            self.nonfinite_in_a_row = 0
            self.nonfinite_from_fake = False
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            # The fake's clean estimate failed where the teacher's, at the same x_t′, did not: the
            # fake network is to blame (the stop message then names optim.fake_lr, not optim.lr).
            fake_ok = teacher_ok = True
            if alignment is not None:
                fake_ok = bool(torch.isfinite(alignment.x0_fake).all())
                teacher_ok = bool(torch.isfinite(alignment.x0_teacher).all())
            self.nonfinite_from_fake = not self.ranks.all(fake_ok or not teacher_ok)

        fake_loss, fake_skipped = float("nan"), 0
        if alignment is not None and finite:
            for _ in range(m.alignment.fake_updates_per_student_step):
                with self.autocast():
                    loss_fake = fake_flow_matching_loss(self.fake_forward, alignment.x_hat, m.alignment,
                                                        cond=cond, generator=rows)
                fake_skipped += not self._fake_update(loss_fake)
                fake_loss = float(loss_fake.detach())
        # Figures of the whole batch: averages over ranks of equal shares.
        meanflow_value, loss_value, mse, align, fake_loss = self.ranks.mean(
            float(meanflow.detach()), float(total.detach()), float(per_sample.mean()) / u[0].numel(),
            float("nan") if alignment is None else float(alignment.loss.detach()), fake_loss)
        if finite:  # the plain error: its drop says how far the discrete phase got (schedule.switch=loss)
            self.schedule.observe(step, mse)
        self.step_index += 1
        return StepResult(step=step, phase=objective.phase, loss=loss_value, meanflow=meanflow_value, mse=mse,
                          align=align, fake=fake_loss, grad_norm=grad_norm, lr=lr, skipped=not finite,
                          fake_skipped=fake_skipped)

    def _fake_update(self, loss: Tensor) -> bool:
        """One optimizer step of the fake network on its scalar flow-matching ``loss``, guarded as
        the student's step is: skipped (and counted) when the loss is non-finite on any rank or the
        clipped gradient norm is non-finite, so NaNs never reach its weights. Returns whether it stepped."""
        self.fake_optimizer.zero_grad(set_to_none=True)
        finite = self.ranks.all(bool(torch.isfinite(loss.detach())))  # every rank skips, or none
        if finite:
            loss.backward()
            finite = math.isfinite(_clip_grad_norm(self.fake, self.config.optim.grad_clip))  # the global norm
        if finite:
            self.fake_optimizer.step()
            self.fake_nonfinite_in_a_row = 0
        else:
            self.fake_optimizer.zero_grad(set_to_none=True)
            self.fake_nonfinite_in_a_row += 1
            self.fake_nonfinite_total += 1
        return finite

    def alignment_grid(self) -> Tensor:
        """The (K + 1,) time grid alignment rolls the student out on: the grid the run samples on
        (``sample.shift``), with ``method.alignment.steps`` steps."""
        config = SamplerConfig(steps=self.config.method.alignment.steps, shift=self.config.sample.shift)
        return time_grid(config, image_seq_len=self.world.latent_shape[0])

    def check_finite(self) -> None:
        """Raises :class:`NonFiniteLossError` once ``run.max_nonfinite_in_a_row`` steps, or fake
        network updates, in a row were skipped; the message names the network to blame."""
        limit = self.config.run.max_nonfinite_in_a_row
        last = self.step_index - 1
        fake_hint = "Lower optim.fake_lr (the alignment's fake velocity network), or use run.dtype float32."
        if self.fake_nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.fake_nonfinite_in_a_row} updates in a row of the fake network (up to step {last}) "
                f"had a non-finite loss or gradient; stopping (run.max_nonfinite_in_a_row = {limit}). "
                f"{fake_hint}")
        if self.nonfinite_in_a_row >= limit:
            hint = ("The fake network's velocity in the alignment term was non-finite. " + fake_hint
                    if self.nonfinite_from_fake else
                    "Lower optim.lr, check the teacher and the data, or use run.dtype float32.")
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} steps in a row (up to step {last}) had a non-finite "
                f"loss or gradient; stopping (run.max_nonfinite_in_a_row = {limit}). {hint}")

    # -- sampling ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self):
        """The student with the EMA weights in place, in eval mode; its own weights and mode come
        back on exit. Works on sharded students (each rank swaps its shards; every rank must
        then make the same calls). Costs one copy of the trained parameters."""
        reshard(self.student)
        # What the EMA writes: the trained parameters and the buffers (frozen ones never move).
        tensors = {**{n: p for n, p in self.student.named_parameters() if n in self.ema.params},
                   **dict(self.student.named_buffers())}
        with torch.no_grad():
            saved = {name: t.detach().clone() for name, t in tensors.items()}
        training = self.student.training
        try:
            self.ema.copy_to(self.student)
            self.student.eval()
            yield self.student
        finally:
            reshard(self.student)
            with torch.no_grad():
                for name, t in tensors.items():
                    t.copy_(saved[name])
            self.student.train(training)

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-able trainer state (without tensors): step, counters, schedule."""
        return {"step": self.step_index, "nonfinite_total": self.nonfinite_total,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "fake_nonfinite_total": self.fake_nonfinite_total,
                "fake_nonfinite_in_a_row": self.fake_nonfinite_in_a_row,
                "nonfinite_from_fake": self.nonfinite_from_fake, "schedule": self.schedule.state_dict()}

    def load_state(self, state: dict) -> None:
        self.step_index = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        # Checkpoints written before the fake network's updates were counted have none.
        self.fake_nonfinite_total = int(state.get("fake_nonfinite_total", 0))
        self.fake_nonfinite_in_a_row = int(state.get("fake_nonfinite_in_a_row", 0))
        self.nonfinite_from_fake = bool(state.get("nonfinite_from_fake", False))
        self.schedule.load_state_dict(state["schedule"])


def float32_copy(transformer, device: torch.device):
    """A float32 copy of a ``FluxTransformer2DModel`` on ``device``, built on the meta device and
    filled tensor by tensor, so the source's device never holds a second whole copy."""
    with torch.device("meta"):
        clone = type(transformer).from_config(transformer.config)
    state = {name: value.detach().to(device=device, dtype=torch.float32, copy=True)
             for name, value in transformer.state_dict().items()}
    clone.load_state_dict(state, strict=True, assign=True)
    return clone


def check_config_lora_ranks(transformer: torch.nn.Module, config: TrainConfig) -> None:
    """A ConfigError naming ``model.student_lora_rank`` / ``model.fake_lora_rank`` when the
    adapters of that rank cannot go on ``transformer``'s blocks (:func:`lora_targets`)."""
    for key in ("student_lora_rank", "fake_lora_rank"):
        rank = getattr(config.model, key)
        if rank:
            with _as_config_error(f"model.{key}"):
                lora_targets(transformer, rank)


def add_config_lora(transformer: torch.nn.Module, rank: int, alpha: float | None, key: str, seed: int) -> None:
    """Adds rank-``rank`` adapters (α = ``alpha``, default the rank) to every Linear of
    ``transformer``'s blocks (:func:`meanflow.models.lora.add_lora_to_flux_blocks`), their A drawn
    from a generator seeded with ``seed``; a rank the layers cannot take is a ConfigError naming
    ``key``."""
    with _as_config_error(key):
        add_lora_to_flux_blocks(transformer, rank, rank if alpha is None else alpha,
                                torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _as_config_error(key: str):
    """The adapters' ValueError as a ConfigError naming the config ``key``."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(key, str(err).removeprefix("rank: ")) from None


def make_fake(transformer: torch.nn.Module, home: torch.device, config: TrainConfig) -> FluxVelocity:
    """The fake velocity network v_φ, in train mode: a float32 copy of the teacher's
    ``transformer`` on ``home``, trained in full (``model.fake_lora_rank`` 0) or frozen under
    rank-r adapters on every Linear of its blocks (:mod:`meanflow.models.lora`)."""
    fake = FluxVelocity(float32_copy(transformer, home))
    model = config.model
    if model.fake_lora_rank:
        add_config_lora(fake.transformer, model.fake_lora_rank, model.fake_lora_alpha, "model.fake_lora_rank",
                        config.run.seed + FAKE_LORA_SEED_OFFSET)
    else:
        fake.requires_grad_(True)
    return fake.train()


def _compiler(backend: str | None):
    """model.compile: ``torch.compile`` with that backend, or the callable as it is."""
    if backend is None:
        return lambda fn: fn
    return lambda fn: torch.compile(fn, backend=backend)


def _clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """``clip_grad_norm_`` over the model's parameters (``max_norm`` 0: no clipping, the norm
    only); the norm of the whole (unsharded) gradient as a float (FSDP2's DTensor gradients give
    a DTensor norm)."""
    # clip_grad_norm_ with 0 would scale every gradient by 0; with inf it scales by 1.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _make_world(config: TrainConfig, ranks: Ranks, device: torch.device | None) -> World:
    """The run's world. On several ranks, rank 0 builds its world first: it writes any cache
    the world builds (the VAE latents of an image folder), which the others, having waited for
    it (for hours if need be), then read."""
    device = device if device is not None else resolve_device(config.run.device)
    world = None
    for first in (True, False):
        if ranks.main == first:
            world = make_world(config, device)
        ranks.barrier(timeout_hours=24)
    return world


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
