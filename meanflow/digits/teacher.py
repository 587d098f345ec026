"""The digits world's teacher: a small FLUX-architecture text-to-image transformer trained by
flow matching on the digits, jointly with its text encoder.

Convention (FLUX, DESIGN §2): z_t = (1 − t)·x + t·ε, t ∈ [0, 1] (t = 1 is noise); the
network predicts v = ε − x and is called with ``timestep=t`` (diffusers multiplies by 1000).
Latents are packed pixels (:func:`~meanflow.digits.data.pack`), 16 tokens × 4 channels.
Prompts are dropped to ``""`` 10 % of the time in training, so true classifier-free guidance
v = v_u + w·(v_c − v_u) works at sampling time (w = 1 is plain conditional sampling).
"""
from __future__ import annotations

import copy
import math
import os
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from meanflow.digits._io import ASSETS, load_state, save_modules
from meanflow.digits.data import image_ids, load_split, pack, unpack
from meanflow.digits.prompts import TRAIN_TEMPLATES, UNCONDITIONAL, prompt
from meanflow.digits.text import DigitsTextEncoder, encode_condition

__all__ = ["TEACHER_CONFIG", "TEACHER_PATH", "train_teacher", "save_teacher", "load_teacher",
           "guided_velocity", "sample_teacher"]

TEACHER_PATH = os.path.join(ASSETS, "teacher.safetensors")

TEACHER_CONFIG = dict(
    patch_size=1, in_channels=4, out_channels=None, num_layers=2, num_single_layers=2,
    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
    guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _make_transformer(config: dict):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**config)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def train_teacher(steps: int = 1200, seed: int = 0, batch_size: int = 128, lr: float = 1.5e-3,
                  ema_decay: float = 0.995, prompt_dropout: float = 0.1, word_dropout: float = 0.1,
                  config: dict | None = None, verbose: bool = False):
    """Trains the transformer and the text encoder jointly by flow matching on the train split.

    Each image is paired with a prompt from :data:`TRAIN_TEMPLATES` for its label (dropped to
    ``""`` with probability ``prompt_dropout``; each word replaced by [UNK] with probability
    ``word_dropout``, which makes unseen words harmless). t ~ logit-normal(0, 1); loss
    ‖v_θ(z_t, t, c) − (ε − x)‖² (mean); AdamW with linear warm-up and cosine decay; the
    returned weights are the EMA (``ema_decay``) of both modules. Reproducible for a given
    seed and thread count.

    Returns:
        (transformer, text_encoder, info): the EMA ``FluxTransformer2DModel`` and
        :class:`DigitsTextEncoder` (eval mode, float32) and a dict with the settings,
        ``train_seconds`` and ``final_loss`` (mean of the last 50 steps).
    """
    _check_int(steps, "steps", 1)
    _check_int(batch_size, "batch_size", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    for name, v in (("prompt_dropout", prompt_dropout), ("word_dropout", word_dropout)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay: expected a value in [0, 1), got {ema_decay!r}")
    config = dict(TEACHER_CONFIG if config is None else config)
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    transformer = _make_transformer(config)
    text_encoder = DigitsTextEncoder()
    x_all, y_all = load_split("train")
    lat_all = pack(x_all)

    # Every training prompt, tokenised once: row (label · n_templates + template), then "".
    prompts = [prompt(d, tpl) for d in range(10) for tpl in TRAIN_TEMPLATES] + [UNCONDITIONAL]
    ids_all, mask_all = text_encoder.tokenizer.encode(prompts)
    n_tpl, uncond_row = len(TRAIN_TEMPLATES), len(prompts) - 1
    unk = text_encoder.tokenizer.vocab.index("[UNK]")
    eos = text_encoder.tokenizer.vocab.index("[EOS]")
    img_ids, txt_ids = image_ids(), torch.zeros(ids_all.shape[1], 3)

    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema_t, ema_e = copy.deepcopy(transformer).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    transformer.train()
    text_encoder.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x, y = lat_all[idx], y_all[idx]
        rows = y * n_tpl + torch.randint(0, n_tpl, (batch_size,), generator=gen)
        drop = torch.rand(batch_size, generator=gen) < prompt_dropout
        rows = torch.where(drop, torch.full_like(rows, uncond_row), rows)
        ids, mask = ids_all[rows].clone(), mask_all[rows]
        word = mask & (ids != eos) & (torch.rand(ids.shape, generator=gen) < word_dropout)
        ids[word] = unk
        t = torch.sigmoid(torch.randn(batch_size, generator=gen))
        eps = torch.randn(x.shape, generator=gen)
        z = (1 - t)[:, None, None] * x + t[:, None, None] * eps
        hidden, pooled = text_encoder.forward_ids(ids, mask)
        v = transformer(hidden_states=z, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=t,
                        img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_t, transformer, decay)
        _ema_update(ema_e, text_encoder, decay)
        losses.append(loss.item())
        if verbose and (step + 1) % 100 == 0:
            print(f"teacher step {step + 1}/{steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    ema_t.eval()
    ema_e.eval()
    info = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
            "prompt_dropout": prompt_dropout, "word_dropout": word_dropout, "time_sampling": "logit-normal(0, 1)",
            "train_seconds": time.perf_counter() - start,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "parameters": sum(p.numel() for p in ema_t.parameters()) + sum(p.numel() for p in ema_e.parameters())}
    return ema_t, ema_e, info


def save_teacher(path: str | os.PathLike, transformer, text_encoder: DigitsTextEncoder) -> None:
    """One safetensors file: the transformer's state dict under ``transformer.``, the text
    encoder's under ``text_encoder.``, and both configs (JSON) in the metadata
    (``transformer_config``, ``text_encoder_config``)."""
    if not isinstance(text_encoder, DigitsTextEncoder):
        raise ValueError(f"text_encoder: expected a DigitsTextEncoder, got {type(text_encoder).__name__}")
    if not hasattr(transformer, "config") or not hasattr(transformer, "transformer_blocks"):
        raise ValueError(f"transformer: expected a FluxTransformer2DModel, got {type(transformer).__name__}")
    tconf = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer.config.items()
             if not k.startswith("_") and k in _config_keys()}
    save_modules(path, {"transformer": transformer, "text_encoder": text_encoder},
                 {"transformer": tconf, "text_encoder": text_encoder.config})


def _config_keys() -> set:
    import inspect

    from diffusers import FluxTransformer2DModel

    return set(inspect.signature(FluxTransformer2DModel.__init__).parameters) - {"self"}


def load_teacher(path: str | os.PathLike | None = None):
    """The teacher :func:`save_teacher` wrote (default: the shipped asset).

    Returns:
        (teacher, text_encoder): a :class:`~meanflow.models.flux_student.FluxTeacher` and the
        :class:`DigitsTextEncoder`, float32 on the CPU, eval mode, ``requires_grad`` False.
    """
    from meanflow.models.flux_student import FluxTeacher

    states, configs = load_state(TEACHER_PATH if path is None else path, ("transformer", "text_encoder"))
    tconf = configs["transformer"]
    if "axes_dims_rope" in tconf:
        tconf["axes_dims_rope"] = tuple(tconf["axes_dims_rope"])
    transformer = _make_transformer(tconf)
    transformer.load_state_dict(states["transformer"], strict=True)
    text_encoder = DigitsTextEncoder(**configs["text_encoder"])
    text_encoder.load_state_dict(states["text_encoder"], strict=True)
    text_encoder.eval().requires_grad_(False)
    return FluxTeacher(transformer), text_encoder


@torch.no_grad()
def guided_velocity(teacher, z: Tensor, t: Tensor, cond, uncond=None, cfg_scale: float = 1.0) -> Tensor:
    """True CFG velocity v_u + w·(v_c − v_u) (w = ``cfg_scale``; plain v_c when w = 1).

    Args:
        teacher: a ``FluxTeacher``.
        z: (B, 16, 4) float latents; t: (B,) times.
        cond, uncond: ``FluxCondition`` of the prompts and of B ``""`` prompts (uncond may be
            None when w = 1).

    Returns:
        (B, 16, 4) in z's dtype. Conditional and unconditional halves run as one batch.
    """
    if cfg_scale == 1.0:
        return teacher.velocity(z, t, cond)
    if uncond is None:
        raise ValueError("uncond: needed for a cfg_scale other than 1")
    both = type(cond)(
        encoder_hidden_states=torch.cat([cond.encoder_hidden_states, uncond.encoder_hidden_states]),
        pooled_projections=torch.cat([cond.pooled_projections, uncond.pooled_projections]),
        txt_ids=cond.txt_ids, img_ids=cond.img_ids)
    v = teacher.velocity(torch.cat([z, z]), torch.cat([t, t]), both)
    v_c, v_u = v.chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


@torch.no_grad()
def sample_teacher(teacher, text_encoder: DigitsTextEncoder, prompts: Sequence[str], steps: int = 32,
                   cfg_scale: float = 1.0, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> Tensor:
    """Euler sampling of the teacher on the uniform grid 1 → 0 (``meanflow.method.sampler``).

    Args:
        prompts: B prompts.
        steps: Euler steps K ≥ 1.
        cfg_scale: true-CFG scale w (1 = no guidance).
        generator: for the starting noise (ignored when ``noise`` is given).
        noise: optional (B, 16, 4) float32 starting latents.

    Returns:
        images: (B, 1, 8, 8) float32 (not clipped; the data lie in [-1, 1]).
    """
    from meanflow.method.sampler import SamplerConfig, sample

    _check_int(steps, "steps", 1)
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of str")
    b = len(prompts)
    if noise is None:
        noise = torch.randn(b, 16, 4, generator=generator)
    elif tuple(noise.shape) != (b, 16, 4):
        raise ValueError(f"noise: expected shape ({b}, 16, 4), got {tuple(noise.shape)}")
    cond = encode_condition(text_encoder, list(prompts))
    uncond = None if cfg_scale == 1.0 else encode_condition(text_encoder, [UNCONDITIONAL] * b)

    def u(z, r, t):
        return guided_velocity(teacher, z, t, cond, uncond, cfg_scale)

    z = sample(u, noise.float(), config=SamplerConfig(steps=steps))
    return unpack(z)
