"""The MeanFlow student and the frozen teacher built on diffusers' ``FluxTransformer2DModel``.

Conventions (DESIGN §2): t ∈ [0, 1], t = 1 is noise; z (B, N_img, C) are the packed latent
tokens FLUX takes; the student u_θ(z, r, t, c), r ≤ t, predicts the average velocity over
[r, t]. :class:`FluxCondition` holds the prompt conditioning c.

**The student** (:class:`FluxStudent`) is the teacher's transformer plus an embedder of
(t − r) of the same form as FLUX's timestep embedder: the sinusoidal projection of
1000·(t − r), then Linear-SiLU-Linear whose last Linear is zero-initialised. Its output is
added to the time embedding, so at initialisation u_θ(z, t, t, c) equals the teacher's
velocity exactly. The time path (sinusoidal projections and their MLPs, the pooled-text MLP,
their sum) runs in float32 (float64 for a float64 model) with autocast off, even under bf16
autocast or for a bf16 model; the time embedding is cast to the model's compute dtype only
where the blocks read it.

Two forwards:

- ``student(z, r, t, cond) -> u``: diffusers' own blocks (``block(...)``) with
  :class:`~meanflow.models.flux.JVPFluxAttnProcessor` installed, so it is the stock
  computation and ``torch.func.jvp`` / forward-AD dual tensors work through it too;
- ``student.forward_with_tangent(z, r, t, cond, z_dot, r_dot, t_dot) -> (u, u_dot)``: the
  *pair mode* of DESIGN §3. One pass over the blocks carries (h, ḣ) pairs through the fused
  pair ops of :mod:`meanflow.ops` (linear, RMS norm, LayerNorm-modulate, SiLU, GELU-tanh,
  RoPE, attention, gated residual). u is differentiable; u_dot has no autograd history, and
  nothing of the tangent computation is kept for backward.

**Activation checkpointing in pair mode** (``student.gradient_checkpointing = True``): each
block runs inside ``torch.utils.checkpoint`` (non-reentrant). In the forward the checkpointed
function computes the full pair pass and returns only the primal outputs; the tangent outputs
are handed out through a side channel and, being outputs of the fused ops, carry no autograd
history, so checkpoint never sees them. When backward recomputes the block, the same function
runs again with every tangent None: a primal-only pass. Both passes record exactly the same
sequence of differentiable ops (the tangent work happens inside the fused ops' forward, or on
tensors that do not require grad, so it saves nothing), which is what checkpoint's
saved-tensor check verifies. Cost: one pair forward plus one primal recompute per block, the
same as a plain checkpointed step plus the tangent. Under ``torch.compile`` (which allows no
side channel inside a checkpoint) the block returns its tangents, and the compiled backward
recomputes the whole pair pass: the tangent is computed twice per block there.

**The teacher** (:class:`FluxTeacher`) is frozen and evaluated under ``torch.no_grad``; it
uses the same top-level forward (and fp32 time path) as the student, so the two agree exactly
at initialisation under autocast as well.

Deviations from diffusers (all only where diffusers would lose precision or where it does not
apply): the time path in float32 for 16-bit models and under autocast (diffusers casts the
timestep to the hidden dtype, bf16, before ×1000); in pair mode under autocast, every op runs
in the autocast dtype with explicit casts (autocast is switched off inside), rather than
autocast's per-op policy (which runs LayerNorm in float32, for instance). Without autocast, for
a float32 or float64 model, ``student(...)`` is diffusers' forward bit for bit at r = t, and
``forward_with_tangent`` agrees with it to float rounding.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from meanflow import ops
from meanflow.models.flux import FUSED_PROJECTIONS, _key_padding_to_4d, enable_jvp_attention
from meanflow.models.lora import LoRALinear, lora_scalings, merge_lora_state_dict
from meanflow.ops.pair import forward_ad_active

__all__ = ["FluxCondition", "FluxStudent", "FluxTeacher", "device_and_dtype"]

Tensor = torch.Tensor

STUDENT_CONFIG_NAME = "meanflow_student.json"
DELTA_WEIGHTS_NAME = "delta_embedder.safetensors"
TRANSFORMER_SUBFOLDER = "transformer"
_FORMAT = "meanflow.FluxStudent"
_FORMAT_VERSION = 1
_FP16_MAX = 65504.0


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------

def device_and_dtype(*args, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype), each None when not given, of ``to``'s arguments as diffusers' pipelines take
    them: ``to(device)``, ``to(dtype)``, ``to(device, dtype)``, ``to(device=..., dtype=...)``.

    Raises:
        ValueError: naming ``device`` or ``dtype`` (not a device, not a floating dtype, given twice).
    """
    for arg in args:
        if isinstance(arg, torch.dtype):
            if dtype is not None:
                raise ValueError(f"dtype: given twice ({dtype} and {arg})")
            dtype = arg
        elif isinstance(arg, (str, torch.device)):
            if device is not None:
                raise ValueError(f"device: given twice ({device} and {arg})")
            device = arg
        else:
            raise ValueError(f"device, dtype: expected a device (str or torch.device) and/or a "
                             f"torch.dtype, got {arg!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    try:
        device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: expected a device, got {device!r} ({err})") from err
    return device, dtype


@dataclass
class FluxCondition:
    """The prompt conditioning of a FLUX transformer, as ``FluxPipeline`` prepares it.

    Attributes:
        encoder_hidden_states: (B, T, joint_attention_dim) T5 token embeddings.
        pooled_projections: (B, pooled_projection_dim) pooled CLIP embedding.
        txt_ids: (T, 3) text position ids (zeros in FLUX).
        img_ids: (N_img, 3) image position ids, (0, row, col) per packed latent token.
        guidance: None, or (B,) guidance scales g (a float or 0-d tensor broadcasts) for
            guidance-distilled models (FLUX.1-dev);
            multiplied by 1000 inside, as diffusers does. Required exactly when the model was
            built with ``guidance_embeds=True``.
        attention_mask: None; a (B, T) text mask as a tokenizer returns it (the image tokens
            are then all attended); a (B, T + N_img) key mask; or a mask broadcastable to
            (B, H, N, N), N = T + N_img, text tokens first. bool (True = attend), 0/1 integers
            (nonzero = attend) or floating (added to the attention scores).
    """

    encoder_hidden_states: Tensor
    pooled_projections: Tensor
    txt_ids: Tensor
    img_ids: Tensor
    guidance: Tensor | None = None
    attention_mask: Tensor | None = None

    def to(self, *args, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "FluxCondition":
        """A copy moved and cast: ``to(device)``, ``to(dtype)``, ``to(device, dtype)``,
        ``to(device=..., dtype=..., non_blocking=...)`` (see :func:`device_and_dtype`).

        A device move applies to every field. A dtype applies to the embeddings only
        (``encoder_hidden_states``, ``pooled_projections``): the position ids, the guidance scales
        and the attention mask keep theirs, since bf16 would round positions above 256 and
        guidance scales (4.3 → 4.3125); the model reads them in float32 itself.

        Raises:
            ValueError: naming ``device`` or ``dtype`` (not a device, not a floating dtype).
        """
        device, dtype = device_and_dtype(*args, device=device, dtype=dtype)

        def move(name: str, t):
            if not isinstance(t, torch.Tensor):  # None, or a float guidance scale
                return t
            cast = dtype if name in ("encoder_hidden_states", "pooled_projections") else None
            return t.to(device=device, dtype=cast, non_blocking=non_blocking)

        return replace(self, **{f.name: move(f.name, getattr(self, f.name)) for f in fields(self)})


# --------------------------------------------------------------------------------------------
# Small helpers: None tangents are zeros that cost nothing
# --------------------------------------------------------------------------------------------

def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _chunk(t: Tensor | None, n: int) -> tuple:
    if t is None:
        return (None,) * n
    return tuple(c.contiguous() for c in t.chunk(n, dim=1))


def _check_linear(layer: nn.Module, what: str) -> None:
    """Pair mode reads ``weight`` and ``bias`` (and a :class:`LoRALinear`'s factors): a Linear
    whose forward does anything else (other adapter wrappers, quantised layers) would be silently
    wrong, so it is refused."""
    if isinstance(layer, LoRALinear):
        return
    if not isinstance(layer, nn.Linear) or type(layer).forward is not nn.Linear.forward:
        raise NotImplementedError(
            f"pair mode reads {what} as a plain torch.nn.Linear or a meanflow LoRALinear, got "
            f"{type(layer).__name__}: merge other adapters into the weights, or use student(...) with "
            "torch.func.jvp")


def _linear(x: Tensor, x_dot: Tensor | None, layer: nn.Module, dtype: torch.dtype, what: str = "a Linear"):
    _check_linear(layer, what)
    if isinstance(layer, LoRALinear):
        # y = x·Wᵀ + b + (α/r)·(x·Aᵀ)·Bᵀ, and the same for the tangent without b.
        y, y_dot = _linear(x, x_dot, layer.base, dtype, what)
        h, h_dot = _linear_weight(x, x_dot, layer.lora_down.to(dtype), None)
        u, u_dot = _linear_weight(h, h_dot, layer.lora_up.to(dtype), None)
        return y + layer.scaling * u, None if y_dot is None else y_dot + layer.scaling * u_dot
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return _linear_weight(x, x_dot, layer.weight.to(dtype), bias)


def _linear_weight(x: Tensor, x_dot: Tensor | None, weight: Tensor, bias: Tensor | None):
    if x_dot is None:
        return ops.jvp_linear(x, weight, bias), None
    return ops.jvp_linear_pair(x, x_dot, weight, bias)


# The pair forms return zeros for absent tangents; the primal-only pass (r = t without
# tangents, or the recompute of a checkpointed block) calls the plain forms instead.

def _silu(x: Tensor, x_dot: Tensor | None):
    return (ops.jvp_silu(x), None) if x_dot is None else ops.jvp_silu_pair(x, x_dot)


def _gelu_tanh(x: Tensor, x_dot: Tensor | None):
    return (ops.jvp_gelu_tanh(x), None) if x_dot is None else ops.jvp_gelu_tanh_pair(x, x_dot)


def _rope(x: Tensor, x_dot: Tensor | None, cos: Tensor, sin: Tensor):
    return (ops.jvp_rope(x, cos, sin), None) if x_dot is None else ops.jvp_rope_pair(x, x_dot, cos, sin)


def _ln_modulate(x, x_dot, scale, scale_dot, shift, shift_dot, eps):
    if x_dot is None and scale_dot is None and shift_dot is None:
        return ops.jvp_layer_norm_modulate(x, scale, shift, eps=eps), None
    return ops.jvp_layer_norm_modulate_pair(x, x_dot, scale, scale_dot, shift, shift_dot, eps=eps)


def _gated_residual(h, h_dot, gate, gate_dot, y, y_dot):
    if h_dot is None and gate_dot is None and y_dot is None:
        return ops.jvp_gated_residual(h, gate, y), None
    return ops.jvp_gated_residual_pair(h, h_dot, gate, gate_dot, y, y_dot)


def _rms_norm(norm: nn.Module | None, x: Tensor, x_dot: Tensor | None, dtype: torch.dtype):
    if norm is None:
        return x, x_dot
    if not isinstance(norm, nn.RMSNorm) or norm.weight is None:
        raise NotImplementedError(f"pair mode supports the q/k norms of FLUX (torch.nn.RMSNorm with weight), "
                                  f"got {type(norm).__name__}")
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    if x_dot is None:
        return ops.jvp_rms_norm(x, norm.weight.to(dtype), eps), None
    return ops.jvp_rms_norm_pair(x, x_dot, norm.weight.to(dtype), eps)


def _attention(q, k, v, q_dot, k_dot, v_dot, mask):
    if q_dot is None and k_dot is None and v_dot is None:
        return ops.jvp_attention(q, k, v, attn_mask=mask), None
    return ops.jvp_attention_pair(q, k, v, q_dot, k_dot, v_dot, attn_mask=mask)


def _clip_fp16(x: Tensor, x_dot: Tensor | None):
    """diffusers clips float16 hidden states to ±65504; the tangent is zero where clipped."""
    if x.dtype != torch.float16:
        return x, x_dot
    if x_dot is not None:
        with torch.no_grad():
            x_dot = x_dot * ((x >= -_FP16_MAX) & (x <= _FP16_MAX)).to(x_dot.dtype)
    return x.clip(-_FP16_MAX, _FP16_MAX), x_dot


def _cat(parts: list, primals: list, dim: int) -> Tensor | None:
    """Concatenation of tangents, zeros standing in for the None ones (None if all are)."""
    if all(p is None for p in parts):
        return None
    with torch.no_grad():
        return torch.cat([torch.zeros_like(x) if p is None else p for p, x in zip(parts, primals)], dim=dim)


# --------------------------------------------------------------------------------------------
# The time path
# --------------------------------------------------------------------------------------------

def _sinusoid(time_proj: nn.Module, ts: Tensor, ts_dot: Tensor | None):
    """diffusers' ``Timesteps`` (its ``get_timestep_embedding``) on ts (B,), and its tangent.

    The primal is the module's own output. The tangent is the derivative of the same float32
    arithmetic: d/dτ [sin(τf), cos(τf)] = [cos(τf), −sin(τf)]·f·τ̇, flipped and padded alike.
    """
    emb = time_proj(ts)
    if ts_dot is None:
        return emb, None
    n = time_proj.num_channels
    half = n // 2
    with torch.no_grad():
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=ts.device)
        freqs = torch.exp(exponent / (half - time_proj.downscale_freq_shift))
        arg = time_proj.scale * (ts.detach()[:, None].float() * freqs[None, :])
        arg_dot = time_proj.scale * (ts_dot[:, None].float() * freqs[None, :])
        dot = torch.cat([torch.cos(arg) * arg_dot, -torch.sin(arg) * arg_dot], dim=-1)
        if time_proj.flip_sin_to_cos:
            dot = torch.cat([dot[:, half:], dot[:, :half]], dim=-1)
        if n % 2 == 1:
            dot = F.pad(dot, (0, 1, 0, 0))
    return emb, dot


def _check_timestep_mlp(mlp: nn.Module, what: str) -> None:
    if getattr(mlp, "cond_proj", None) is not None or getattr(mlp, "post_act", None) is not None \
            or not isinstance(getattr(mlp, "act", None), nn.SiLU):
        raise NotImplementedError(f"{what} must be a TimestepEmbedding Linear-SiLU-Linear (no cond_proj, "
                                  "no post_act)")


def _mlp(mlp: nn.Module, x: Tensor, x_dot: Tensor | None, dtype: torch.dtype, pair: bool,
         first: str = "linear_1", act: str = "act", second: str = "linear_2"):
    """Linear-SiLU-Linear in ``dtype``: plain torch (``pair`` False: forward AD passes through)
    or the pair ops."""
    l1, l2 = getattr(mlp, first), getattr(mlp, second)
    if not isinstance(getattr(mlp, act), nn.SiLU):
        raise NotImplementedError(f"{type(mlp).__name__}.{act} must be SiLU")
    if not pair:
        h = F.silu(F.linear(x, l1.weight.to(dtype), _cast(l1.bias, dtype)))
        return F.linear(h, l2.weight.to(dtype), _cast(l2.bias, dtype)), None
    h, h_dot = _linear(x, x_dot, l1, dtype)
    h, h_dot = _silu(h, h_dot)
    return _linear(h, h_dot, l2, dtype)


def _no_autocast(device_type: str):
    if device_type in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _time_dtype(transformer) -> torch.dtype:
    weight = transformer.time_text_embed.timestep_embedder.linear_1.weight
    return torch.promote_types(weight.dtype, torch.float32)


def _as_times(x, batch: int, like: Tensor, name: str) -> Tensor:
    """``x`` (a Python number, a 0-d or a (batch,) floating tensor) as a (batch,) tensor; a number
    becomes a tensor on ``like``'s device in at least float32 (float64 beside a float64 ``like``,
    so a float64 model reads the number unrounded)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        x = torch.full((batch,), float(x), device=like.device,
                       dtype=torch.promote_types(like.dtype, torch.float32))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape ({batch},), a 0-d tensor or a float, "
                         f"got {type(x).__name__}")
    if x.dim() == 0:
        x = x.expand(batch)
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one per sample), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return x


def _time_embedding(transformer, delta_embedder, t, r, guidance, pooled, t_dot=None, r_dot=None, pair=False):
    """temb (B, D) in the time dtype, and its tangent (None if no tangent reaches it).

    diffusers: temb = timestep_embedder(proj(1000 t)) [+ guidance_embedder(proj(1000 g))]
    + text_embedder(pooled). The student adds delta_embedder(proj(1000 (t − r))) after the time
    and guidance terms (its output is exactly zero at initialisation, so the sum is unchanged).
    """
    tte = transformer.time_text_embed
    td = _time_dtype(transformer)
    with _no_autocast(t.device.type):
        ts = t.to(td) * 1000
        ts_dot = None if t_dot is None else t_dot.to(td) * 1000
        proj, proj_dot = _sinusoid(tte.time_proj, ts, ts_dot)
        temb, temb_dot = _mlp(tte.timestep_embedder, proj.to(td), _cast(proj_dot, td), td, pair)

        has_guidance = hasattr(tte, "guidance_embedder")
        if has_guidance != (guidance is not None):
            raise ValueError("cond.guidance must be given exactly when the transformer has guidance_embeds "
                             f"(it has {'a' if has_guidance else 'no'} guidance embedder)")
        if guidance is not None:
            guidance = _as_times(guidance, t.shape[0], t, "cond.guidance")
            gproj, _ = _sinusoid(tte.time_proj, guidance.to(td) * 1000, None)
            gemb, _ = _mlp(tte.guidance_embedder, gproj.to(td), None, td, pair)
            temb = temb + gemb

        if delta_embedder is not None:
            d = (t.to(td) - r.to(td)) * 1000
            d_dot = None
            if t_dot is not None or r_dot is not None:
                d_dot = _add(_cast(t_dot, td), None if r_dot is None else -r_dot.to(td)) * 1000
            dproj, dproj_dot = _sinusoid(tte.time_proj, d, d_dot)
            demb, demb_dot = _mlp(delta_embedder, dproj.to(td), _cast(dproj_dot, td), td, pair)
            temb = temb + demb
            temb_dot = _add(temb_dot, demb_dot)

        text, _ = _mlp(tte.text_embedder, pooled.to(td), None, td, pair, act="act_1")
        temb = temb + text
    return temb, temb_dot


# --------------------------------------------------------------------------------------------
# Pair-mode blocks
# --------------------------------------------------------------------------------------------

def _qkv(attn, x, x_dot, dtype, fused_name, names):
    if getattr(attn, "fused_projections", False) and hasattr(attn, fused_name):
        y, y_dot = _linear(x, x_dot, getattr(attn, fused_name), dtype, fused_name)
        return tuple(zip(y.chunk(3, dim=-1), _chunk_last(y_dot, 3)))
    return tuple(_linear(x, x_dot, getattr(attn, n), dtype, n) for n in names)


def _chunk_last(t, n):
    return (None,) * n if t is None else t.chunk(n, dim=-1)


def _heads(attn, pairs, norms, dtype):
    """(B, S, H·D) pairs -> (B, S, H, D), through the q/k RMS norms (None for v)."""
    out = []
    for (y, y_dot), norm_name in zip(pairs, norms):
        y = y.unflatten(-1, (-1, attn.head_dim))
        y_dot = None if y_dot is None else y_dot.unflatten(-1, (-1, attn.head_dim))
        if norm_name is not None:
            y, y_dot = _rms_norm(getattr(attn, norm_name, None), y, y_dot, dtype)
        out.append((y, y_dot))
    return out


def _attention_block(attn, x, x_dot, cx, cx_dot, rope, mask, dtype):
    """FluxAttnProcessor's computation in pair form. x (B, S, C) (single-stream: all tokens);
    cx (B, T, C) text tokens for the double-stream blocks, else None. Returns the attention
    output (B, N, H·D) before any output projection, text tokens first."""
    q, k, v = _heads(attn, _qkv(attn, x, x_dot, dtype, "to_qkv", ("to_q", "to_k", "to_v")),
                     ("norm_q", "norm_k", None), dtype)
    if cx is not None:
        cq, ck, cv = _heads(attn, _qkv(attn, cx, cx_dot, dtype, "to_added_qkv",
                                       ("add_q_proj", "add_k_proj", "add_v_proj")),
                            ("norm_added_q", "norm_added_k", None), dtype)
        q, k, v = ((torch.cat([c[0], s[0]], dim=1), _cat([c[1], s[1]], [c[0], s[0]], 1))
                   for c, s in ((cq, q), (ck, k), (cv, v)))
    # (B, N, H, D) -> (B, H, N, D)
    q, k, v = ((y.transpose(1, 2), None if y_dot is None else y_dot.transpose(1, 2))
               for y, y_dot in (q, k, v))
    if rope is not None:
        cos, sin = rope
        q, k = _rope(*q, cos, sin), _rope(*k, cos, sin)
    out, out_dot = _attention(q[0], k[0], v[0], q[1], k[1], v[1], mask)
    out = out.transpose(1, 2).flatten(2, 3).to(q[0].dtype)
    out_dot = None if out_dot is None else out_dot.transpose(1, 2).flatten(2, 3).to(q[0].dtype)
    return out, out_dot


def _feed_forward(ff, x, x_dot, dtype):
    act = ff.net[0]
    if getattr(act, "approximate", None) != "tanh":
        raise NotImplementedError("pair mode supports FLUX's FeedForward (GELU, approximate='tanh')")
    y, y_dot = _linear(x, x_dot, act.proj, dtype, "ff.net.0.proj")
    y, y_dot = _gelu_tanh(y, y_dot)
    return _linear(y, y_dot, ff.net[2], dtype, "ff.net.2")


def _double_block(block, h, h_dot, c, c_dot, s, s_dot, rope, mask, dtype):
    """FluxTransformerBlock.forward in pair form. s = SiLU(temb) in ``dtype``."""
    e, e_dot = _linear(s, s_dot, block.norm1.linear, dtype, "norm1.linear")
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _chunk(e, 6)
    d_shift_msa, d_scale_msa, d_gate_msa, d_shift_mlp, d_scale_mlp, d_gate_mlp = _chunk(e_dot, 6)
    ce, ce_dot = _linear(s, s_dot, block.norm1_context.linear, dtype, "norm1_context.linear")
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _chunk(ce, 6)
    dc_shift_msa, dc_scale_msa, dc_gate_msa, dc_shift_mlp, dc_scale_mlp, dc_gate_mlp = _chunk(ce_dot, 6)

    x, x_dot = _ln_modulate(h, h_dot, scale_msa, d_scale_msa, shift_msa, d_shift_msa, block.norm1.norm.eps)
    cx, cx_dot = _ln_modulate(c, c_dot, c_scale_msa, dc_scale_msa, c_shift_msa, dc_shift_msa,
                              block.norm1_context.norm.eps)

    attn = block.attn
    out, out_dot = _attention_block(attn, x, x_dot, cx, cx_dot, rope, mask, dtype)
    n_text = c.shape[1]
    c_out, a_out = out[:, :n_text], out[:, n_text:]
    c_out_dot, a_out_dot = (None, None) if out_dot is None else (out_dot[:, :n_text], out_dot[:, n_text:])
    a_out, a_out_dot = _linear(a_out.contiguous(), _contiguous(a_out_dot), attn.to_out[0], dtype,
                               "attn.to_out.0")
    c_out, c_out_dot = _linear(c_out.contiguous(), _contiguous(c_out_dot), attn.to_add_out, dtype,
                               "attn.to_add_out")

    # Image stream.
    h, h_dot = _gated_residual(h, h_dot, gate_msa, d_gate_msa, a_out, a_out_dot)
    x, x_dot = _ln_modulate(h, h_dot, scale_mlp, d_scale_mlp, shift_mlp, d_shift_mlp, block.norm2.eps)
    y, y_dot = _feed_forward(block.ff, x, x_dot, dtype)
    h, h_dot = _gated_residual(h, h_dot, gate_mlp, d_gate_mlp, y, y_dot)

    # Text stream.
    c, c_dot = _gated_residual(c, c_dot, c_gate_msa, dc_gate_msa, c_out, c_out_dot)
    cx, cx_dot = _ln_modulate(c, c_dot, c_scale_mlp, dc_scale_mlp, c_shift_mlp, dc_shift_mlp,
                              block.norm2_context.eps)
    y, y_dot = _feed_forward(block.ff_context, cx, cx_dot, dtype)
    c, c_dot = _gated_residual(c, c_dot, c_gate_mlp, dc_gate_mlp, y, y_dot)
    c, c_dot = _clip_fp16(c, c_dot)
    return h, h_dot, c, c_dot


def _contiguous(t):
    return None if t is None else t.contiguous()


def _single_block(block, h, h_dot, c, c_dot, s, s_dot, rope, mask, dtype):
    """FluxSingleTransformerBlock.forward in pair form."""
    n_text = c.shape[1]
    x_dot = _cat([c_dot, h_dot], [c, h], 1)
    x = torch.cat([c, h], dim=1)

    e, e_dot = _linear(s, s_dot, block.norm.linear, dtype, "norm.linear")
    shift, scale, gate = _chunk(e, 3)
    d_shift, d_scale, d_gate = _chunk(e_dot, 3)
    n, n_dot = _ln_modulate(x, x_dot, scale, d_scale, shift, d_shift, block.norm.norm.eps)

    if getattr(block.act_mlp, "approximate", None) != "tanh":
        raise NotImplementedError("pair mode supports FLUX's single-block MLP (GELU, approximate='tanh')")
    mlp, mlp_dot = _linear(n, n_dot, block.proj_mlp, dtype, "proj_mlp")
    mlp, mlp_dot = _gelu_tanh(mlp, mlp_dot)
    a, a_dot = _attention_block(block.attn, n, n_dot, None, None, rope, mask, dtype)

    y_dot = _cat([a_dot, mlp_dot], [a, mlp], 2)
    y, y_dot = _linear(torch.cat([a, mlp], dim=2), y_dot, block.proj_out, dtype, "proj_out")
    x, x_dot = _gated_residual(x, x_dot, gate, d_gate, y, y_dot)
    x, x_dot = _clip_fp16(x, x_dot)
    c, h = x[:, :n_text], x[:, n_text:]
    c_dot, h_dot = (None, None) if x_dot is None else (x_dot[:, :n_text], x_dot[:, n_text:])
    return h, h_dot, c, c_dot


# Each block carries its pair form as a method, so that pair mode calls the block itself rather
# than reaching into its submodules from outside: a wrapper that hooks a block's forward (FSDP2's
# unshard and reduce-scatter, see meanflow.train.distributed) hooks this method the same way.
PAIR_FORWARD = "meanflow_pair_forward"


def _install_pair_forwards(transformer) -> None:
    """Gives every block of ``transformer`` its pair form as the method ``PAIR_FORWARD``
    (``block.meanflow_pair_forward(h, h_dot, c, c_dot, s, s_dot, rope, mask, dtype)``)."""
    for fn, blocks in ((_double_block, transformer.transformer_blocks),
                       (_single_block, transformer.single_transformer_blocks)):
        for block in blocks:
            if not hasattr(block, PAIR_FORWARD):  # a partial (not a bound method): it pickles
                setattr(block, PAIR_FORWARD, functools.partial(fn, block))


def _checkpointed(block_fn: Callable, h, h_dot, c, c_dot, s, s_dot, rope, mask, dtype):
    """One block in pair mode under ``torch.utils.checkpoint`` (non-reentrant); ``block_fn`` is
    the block's bound pair form (``block.meanflow_pair_forward``).

    The checkpointed function returns the primal outputs only. Its first call (the forward)
    runs the full pair pass and puts the tangent outputs, which have no autograd history, in
    ``tangents``; checkpoint drops every tensor the primal graph saved. Any later call is the
    recompute in backward: tangents are None there, so only the primal is computed. The two
    calls record the same differentiable ops (tangents live inside the fused ops or on tensors
    that do not require grad), so checkpoint's saved-tensor check passes.
    """
    if torch.compiler.is_compiling():
        # Dynamo's checkpoint allows no side channel: the block returns its tangents too, and the
        # compiled backward recomputes its whole pair pass (each fused op gives y and ẏ at once).
        def pair(h_, c_, s_):
            return block_fn(h_, h_dot, c_, c_dot, s_, s_dot, rope, mask, dtype)

        return checkpoint(pair, h, c, s, use_reentrant=False, preserve_rng_state=False)
    tangents: list = []

    def run(h_, c_, s_):
        if not tangents:
            h2, h2_dot, c2, c2_dot = block_fn(h_, h_dot, c_, c_dot, s_, s_dot, rope, mask, dtype)
            tangents.append((h2_dot, c2_dot))
        else:  # recompute in backward: the primal only
            h2, _, c2, _ = block_fn(h_, None, c_, None, s_, None, rope, mask, dtype)
        return h2, c2

    h, c = checkpoint(run, h, c, s, use_reentrant=False, preserve_rng_state=False)
    h_dot, c_dot = tangents[0]
    return h, h_dot, c, c_dot


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _check_transformer(transformer) -> None:
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError as e:  # pragma: no cover
        raise ImportError("FluxStudent needs diffusers (pip install 'meanflow[flux]')") from e
    if not isinstance(transformer, FluxTransformer2DModel):
        raise ValueError("transformer must be a diffusers FluxTransformer2DModel, "
                         f"got {type(transformer).__name__}")
    for block in transformer.transformer_blocks:
        for drop in (block.attn.to_out[1], block.ff.net[1], block.ff_context.net[1]):
            if isinstance(drop, nn.Dropout) and drop.p != 0:
                raise ValueError("transformer: dropout inside the blocks is not supported (FLUX has none)")
    norm = transformer.norm_out.norm
    if getattr(norm, "weight", None) is not None or not isinstance(norm, nn.LayerNorm):
        raise ValueError("transformer.norm_out must be FLUX's AdaLayerNormContinuous with a non-affine "
                         "LayerNorm")


def _check_inputs(transformer, z, cond) -> tuple[Tensor, Tensor, Tensor | None]:
    """The input check shared by the student's two forwards and the teacher's.

    Returns:
        z (B, N_img, in_channels) and ``cond.encoder_hidden_states`` (B, T, joint_attention_dim),
        each cast to the dtype of the layer that reads it (the model's parameter dtype: a float32
        z into a bf16 model is rounded to bf16, as a diffusers pipeline casts its latents), and
        the attention mask in SDPA form (:func:`_attention_mask`).

    Raises:
        ValueError: naming the argument (``z``, ``cond``, ``cond.<field>``) that is malformed.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 3:
        raise ValueError(f"z must be a (B, N_img, C) tensor of packed latents, got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if not z.is_floating_point():
        raise ValueError(f"z must be floating point, got {z.dtype}")
    in_ch = transformer.config.in_channels
    if z.shape[-1] != in_ch:
        raise ValueError(f"z must have {in_ch} channels (the transformer's in_channels), got {z.shape[-1]}")
    if not isinstance(cond, FluxCondition):
        raise ValueError(f"cond must be a FluxCondition, got {type(cond).__name__}")
    b = z.shape[0]
    ehs, pooled = cond.encoder_hidden_states, cond.pooled_projections
    for name, x in (("encoder_hidden_states", ehs), ("pooled_projections", pooled)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"cond.{name} must be a floating tensor, got "
                             f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if ehs.dim() != 3 or ehs.shape[0] != b or ehs.shape[-1] != transformer.config.joint_attention_dim:
        raise ValueError(f"cond.encoder_hidden_states must be (B={b}, T, "
                         f"{transformer.config.joint_attention_dim}), got {tuple(ehs.shape)}")
    if pooled.shape != (b, transformer.config.pooled_projection_dim):
        raise ValueError(f"cond.pooled_projections must be (B={b}, "
                         f"{transformer.config.pooled_projection_dim}), got {tuple(pooled.shape)}")
    n_text, n_img = ehs.shape[1], z.shape[1]
    for name, ids, rows, what in (("txt_ids", cond.txt_ids, n_text, "text"),
                                  ("img_ids", cond.img_ids, n_img, "image")):
        if not isinstance(ids, torch.Tensor) or ids.dim() not in (2, 3) or ids.shape[-1] != 3:
            raise ValueError(f"cond.{name} must be a ({rows}, 3) tensor (one (axis 0, axis 1, axis 2) "
                             f"position per {what} token), got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if _ids(ids).shape[0] != rows:
            raise ValueError(f"cond.{name} must have one row per {what} token ({rows}), "
                             f"got {tuple(ids.shape)}")
    mask = _attention_mask(cond.attention_mask, b, n_text, n_img, transformer.config.num_attention_heads)
    z = z.to(transformer.x_embedder.weight.dtype)
    ehs = ehs.to(transformer.context_embedder.weight.dtype)
    return z, ehs, mask


def _attention_mask(mask, batch: int, n_text: int, n_img: int, heads: int) -> Tensor | None:
    """``cond.attention_mask`` in the form every attention call takes, on every path (the stock
    processor, JVPFluxAttnProcessor, pair mode): see :func:`~meanflow.models.flux._key_padding_to_4d`.

    A (B, T) text mask gets the image tokens appended as attended (True, 1 or 0.0 added), then
    (B, N) becomes (B, 1, 1, N); 0/1 integers become bool; a 3-d or 4-d mask must broadcast to
    (B, H, N, N). N = T + N_img.
    """
    if mask is None:
        return None
    n = n_text + n_img
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"cond.attention_mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dim() == 2 and tuple(mask.shape) == (batch, n_text):
        attend = 0 if mask.is_floating_point() else 1
        mask = torch.cat([mask, mask.new_full((batch, n_img), attend)], dim=1)
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, n):
            raise ValueError(f"cond.attention_mask: a 2-d mask must be (B, T) = ({batch}, {n_text}) or "
                             f"(B, T + N_img) = ({batch}, {n}), got {tuple(mask.shape)}")
    else:
        target = (batch, heads, n, n)
        try:
            fits = mask.dim() in (3, 4) and torch.broadcast_shapes(mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"cond.attention_mask must be (B, T), (B, N) or broadcastable to (B, H, N, N) "
                             f"= {target}, got {tuple(mask.shape)}")
    return _key_padding_to_4d(mask, batch, n)


def _check_tangent(name: str, tangent, primal: Tensor) -> Tensor | None:
    if tangent is None:
        return None
    if not isinstance(tangent, torch.Tensor):
        raise ValueError(f"{name} must be a tensor or None, got {type(tangent).__name__}")
    if tangent.shape != primal.shape:
        raise ValueError(f"{name} must have shape {tuple(primal.shape)}, got {tuple(tangent.shape)}")
    return tangent.detach()


def _ids(ids: Tensor) -> Tensor:
    return ids[0] if ids.dim() == 3 else ids  # diffusers' deprecated batched ids


def _rotary_tables(transformer, cond: FluxCondition):
    return transformer.pos_embed(torch.cat((_ids(cond.txt_ids), _ids(cond.img_ids)), dim=0))


def _compute_dtype(transformer, device_type: str) -> torch.dtype:
    dtype = transformer.x_embedder.weight.dtype
    autocast = device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type)
    if dtype != torch.float64 and autocast:
        return torch.get_autocast_dtype(device_type)
    return dtype


# --------------------------------------------------------------------------------------------
# Forwards
# --------------------------------------------------------------------------------------------

def _plain_forward(transformer, delta_embedder, z, r, t, cond: FluxCondition, gradient_checkpointing: bool):
    """diffusers' FluxTransformer2DModel.forward with the student's time embedding, through the
    blocks' own modules (so forward AD works with JVPFluxAttnProcessor installed). The teacher
    passes ``delta_embedder`` None (and r is then ignored); the student needs r."""
    z, ehs, mask = _check_inputs(transformer, z, cond)
    b = z.shape[0]
    t = _as_times(t, b, z, "t")
    r = None if delta_embedder is None else _as_times(r, b, z, "r")
    h = transformer.x_embedder(z)
    temb, _ = _time_embedding(transformer, delta_embedder, t, r, cond.guidance, cond.pooled_projections)
    # Where the blocks read it, temb takes the dtype of their modulation weights (a 16-bit model),
    # else stays in float32 and autocast casts it at the Linear.
    temb = temb.to(transformer.norm_out.linear.weight.dtype)
    c = transformer.context_embedder(ehs)
    rope = _rotary_tables(transformer, cond)
    jak = None if mask is None else {"attention_mask": mask}
    use_ckpt = gradient_checkpointing and torch.is_grad_enabled()
    if use_ckpt and forward_ad_active():
        # The backward's recomputation runs without the forward's tangents, so it would save
        # fewer tensors than the forward did: torch's CheckpointError, after a whole forward.
        warnings.warn("gradient checkpointing is skipped under forward-mode AD (torch.func.jvp, dual "
                      "tensors); forward_with_tangent gives u and its tangent with checkpointing",
                      stacklevel=3)
        use_ckpt = False
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        if use_ckpt:
            c, h = checkpoint(block, h, c, temb, rope, jak, use_reentrant=False)
        else:
            c, h = block(hidden_states=h, encoder_hidden_states=c, temb=temb, image_rotary_emb=rope,
                         joint_attention_kwargs=jak)
    h = transformer.norm_out(h, temb)
    return transformer.proj_out(h)


def _pair_forward(transformer, delta_embedder, z, r, t, cond, z_dot, r_dot, t_dot, gradient_checkpointing):
    z, ehs, mask = _check_inputs(transformer, z, cond)
    b = z.shape[0]
    t = _as_times(t, b, z, "t")
    r = _as_times(r, b, z, "r")
    t_dot = None if t_dot is None else _as_times(t_dot, b, z, "t_dot").detach()
    r_dot = None if r_dot is None else _as_times(r_dot, b, z, "r_dot").detach()
    z_dot = _check_tangent("z_dot", z_dot, z)
    dtype = _compute_dtype(transformer, z.device.type)

    temb, temb_dot = _time_embedding(transformer, delta_embedder, t, r, cond.guidance,
                                     cond.pooled_projections, t_dot=t_dot, r_dot=r_dot, pair=True)
    with _no_autocast(z.device.type):
        # SiLU(temb) is what every modulation reads (diffusers recomputes it in each AdaLN):
        # once, in the time dtype, then cast to the compute dtype.
        s, s_dot = _silu(temb, temb_dot)
        s, s_dot = s.to(dtype), _cast(s_dot, dtype)

        h, h_dot = _linear(z.to(dtype), _cast(z_dot, dtype), transformer.x_embedder, dtype, "x_embedder")
        c, c_dot = _linear(ehs.to(dtype), None, transformer.context_embedder, dtype, "context_embedder")
        rope = _rotary_tables(transformer, cond)

        use_ckpt = gradient_checkpointing and torch.is_grad_enabled()
        for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
            pair_forward = getattr(block, PAIR_FORWARD)
            if use_ckpt:
                h, h_dot, c, c_dot = _checkpointed(pair_forward, h, h_dot, c, c_dot, s, s_dot, rope, mask, dtype)
            else:
                h, h_dot, c, c_dot = pair_forward(h, h_dot, c, c_dot, s, s_dot, rope, mask, dtype)

        e, e_dot = _linear(s, s_dot, transformer.norm_out.linear, dtype, "norm_out.linear")
        scale, shift = _chunk(e, 2)
        d_scale, d_shift = _chunk(e_dot, 2)
        x, x_dot = _ln_modulate(h, h_dot, scale, d_scale, shift, d_shift, transformer.norm_out.norm.eps)
        u, u_dot = _linear(x, x_dot, transformer.proj_out, dtype, "proj_out")
    u_dot = torch.zeros_like(u).detach() if u_dot is None else u_dot.detach()
    return u, u_dot


# --------------------------------------------------------------------------------------------
# Student and teacher
# --------------------------------------------------------------------------------------------

def _plain_view(transformer):
    """``transformer`` itself if no attention layer is fused and no Linear carries adapters; else
    a model of the same config holding the live weights in diffusers' plain layout: each fused
    ``to_qkv`` / ``to_added_qkv`` weight and bias split (copied) into its q, k, v layers, in place
    of their stale pre-fusion values, and each :class:`LoRALinear` merged into a plain weight
    (W + (α/r)·B·A). Every other tensor is shared, not copied (the split and merged pieces take
    their layers' memory once more while the view lives); ``transformer`` is not touched."""
    fused = {name: module for name, module in transformer.named_modules()
             if getattr(module, "fused_projections", False)}
    scalings = lora_scalings(transformer)
    if not fused and not scalings:
        return transformer
    state = merge_lora_state_dict(transformer.state_dict(), scalings)
    for name, attn in fused.items():
        for fused_name, parts in FUSED_PROJECTIONS.items():
            if getattr(attn, fused_name, None) is None:
                continue
            sizes = [getattr(attn, part).out_features for part in parts]
            for param in ("weight", "bias"):
                value = state.pop(f"{name}.{fused_name}.{param}", None)
                if value is None:
                    continue
                for part, piece in zip(parts, value.detach().split(sizes)):
                    state[f"{name}.{part}.{param}"] = piece.clone()  # own storage: safetensors refuses views
    with torch.device("meta"):
        plain = type(transformer).from_config(transformer.config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def _make_delta_embedder(transformer) -> nn.Module:
    from diffusers.models.embeddings import TimestepEmbedding

    ref = transformer.time_text_embed.timestep_embedder
    emb = TimestepEmbedding(in_channels=ref.linear_1.in_features, time_embed_dim=ref.linear_1.out_features)
    nn.init.zeros_(emb.linear_2.weight)
    nn.init.zeros_(emb.linear_2.bias)
    return emb.to(device=ref.linear_1.weight.device, dtype=ref.linear_1.weight.dtype)


def _checkpointing_switch() -> property:
    """``gradient_checkpointing`` of a wrapper: the transformer's own diffusers switch, so that
    ``wrapper.gradient_checkpointing = True`` and ``wrapper.transformer.enable_gradient_checkpointing()``
    are the same thing (either turns per-block checkpointing on, in every forward of the wrapper)."""

    def get(self) -> bool:
        return bool(getattr(self.transformer, "gradient_checkpointing", False))

    def set(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise ValueError(f"gradient_checkpointing must be a bool, got {type(on).__name__}")
        if on == get(self):
            return
        if on:  # diffusers' default checkpoint function, as a partial (it pickles, a closure does not)
            self.transformer.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=False))
        else:
            self.transformer.disable_gradient_checkpointing()

    return property(get, set, doc="Per-block activation checkpointing (the transformer's diffusers switch).")


class FluxStudent(nn.Module):
    """u_θ(z, r, t, c): a FLUX transformer plus a zero-initialised embedder of (t − r).

    Build with :meth:`from_transformer`, :meth:`from_config`, :meth:`from_teacher_pretrained`
    or :meth:`from_pretrained` (a directory :meth:`save_pretrained` wrote).

    A student is made to be trained: the constructor sets every parameter (transformer and
    delta embedder) to ``requires_grad=True`` and the whole student to train mode, whatever
    state the transformer came in (a copy of a :class:`FluxTeacher`'s frozen, eval-mode
    transformer, say). Freeze parts afterwards if you want to. :meth:`from_pretrained` returns
    it in eval mode, as diffusers' ``from_pretrained`` does.

    Inputs of any floating dtype are accepted: z and ``cond.encoder_hidden_states`` are cast to
    the model's parameter dtype (a float32 z into a bf16 model is rounded to bf16, as diffusers'
    pipelines cast their latents to the transformer's dtype), in both forwards; u comes out in
    the compute dtype (the parameter dtype, or autocast's).

    Attributes:
        transformer: the ``FluxTransformer2DModel`` (owned, not copied; its attention layers get
            :class:`~meanflow.models.flux.JVPFluxAttnProcessor`).
        delta_embedder: diffusers ``TimestepEmbedding`` of the sinusoidal projection of
            1000·(t − r); its last Linear starts at zero.
        gradient_checkpointing: per-block activation checkpointing, in both forwards. It is the
            transformer's own switch: ``student.transformer.enable_gradient_checkpointing()``
            turns it on too.
    """

    gradient_checkpointing = _checkpointing_switch()

    def __init__(self, transformer, delta_embedder: nn.Module | None = None):
        super().__init__()
        _check_transformer(transformer)
        enable_jvp_attention(transformer)
        _install_pair_forwards(transformer)
        self.transformer = transformer
        if delta_embedder is None:
            delta_embedder = _make_delta_embedder(transformer)
        self.delta_embedder = delta_embedder
        _check_timestep_mlp(self.delta_embedder, "delta_embedder")
        self.requires_grad_(True)
        self.train()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_transformer(cls, transformer) -> "FluxStudent":
        """A student around ``transformer`` (taken over, not copied: deep-copy the teacher's
        first if the teacher must stay as it is). The transformer is made trainable and put in
        train mode (see the class)."""
        return cls(transformer)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FluxStudent":
        """A randomly initialised student from a ``FluxTransformer2DModel`` config dict."""
        from diffusers import FluxTransformer2DModel

        if not isinstance(config, dict):
            raise ValueError("config must be a dict of FluxTransformer2DModel arguments, "
                             f"got {type(config).__name__}")
        return cls(FluxTransformer2DModel.from_config(config))

    @classmethod
    def from_teacher_pretrained(cls, path_or_id: str | os.PathLike, **kwargs) -> "FluxStudent":
        """The teacher's weights via ``FluxTransformer2DModel.from_pretrained(path_or_id, **kwargs)``
        (e.g. ``subfolder="transformer", torch_dtype=torch.bfloat16``) and a fresh (t − r) embedder."""
        from diffusers import FluxTransformer2DModel

        return cls(FluxTransformer2DModel.from_pretrained(path_or_id, **kwargs))

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        """Writes ``transformer/`` (diffusers' ``save_pretrained``: config and weights, loadable as
        a plain FLUX transformer), ``delta_embedder.safetensors`` and ``meanflow_student.json``.

        ``kwargs`` go to the transformer's ``save_pretrained`` (``safe_serialization``,
        ``max_shard_size``, ``variant``, ...). Attention layers fused with
        ``transformer.fuse_qkv_projections()`` are written in diffusers' unfused layout (the
        fused weights split into ``to_q``/``to_k``/``to_v`` and ``add_q_proj``/``add_k_proj``/
        ``add_v_proj``), the only one ``from_pretrained`` reads, and adapters (:class:`LoRALinear`)
        merged into their weights; the live model is left as it is.
        """
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        transformer_dir = os.path.join(directory, TRANSFORMER_SUBFOLDER)
        _plain_view(self.transformer).save_pretrained(transformer_dir, **kwargs)
        state = {k: v.detach().contiguous().cpu() for k, v in self.delta_embedder.state_dict().items()}
        save_file(state, os.path.join(directory, DELTA_WEIGHTS_NAME), metadata={"format": "pt"})
        ref = self.delta_embedder.linear_1
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "transformer_subfolder": TRANSFORMER_SUBFOLDER,
                "delta_embedder": {"in_channels": ref.in_features, "time_embed_dim": ref.out_features,
                                   "weights": DELTA_WEIGHTS_NAME}}
        with open(os.path.join(directory, STUDENT_CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> "FluxStudent":
        """Loads what :meth:`save_pretrained` wrote, in eval mode (as diffusers' ``from_pretrained``;
        call ``.train()`` to train it). ``kwargs`` (``torch_dtype``, ...) go to the transformer's
        ``from_pretrained``; the (t − r) embedder takes the transformer's dtype."""
        from diffusers import FluxTransformer2DModel
        from diffusers.models.embeddings import TimestepEmbedding
        from safetensors.torch import load_file

        path = os.path.join(directory, STUDENT_CONFIG_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"directory {str(directory)!r} has no {STUDENT_CONFIG_NAME}: "
                             "not a saved FluxStudent")
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: unknown format {meta.get('format')!r} version {meta.get('version')!r}")
        transformer = FluxTransformer2DModel.from_pretrained(
            os.path.join(directory, meta.get("transformer_subfolder", TRANSFORMER_SUBFOLDER)), **kwargs)
        spec = meta["delta_embedder"]
        delta = TimestepEmbedding(in_channels=spec["in_channels"], time_embed_dim=spec["time_embed_dim"])
        delta.load_state_dict(load_file(os.path.join(directory, spec["weights"])), strict=True)
        ref = transformer.time_text_embed.timestep_embedder.linear_1.weight
        return cls(transformer, delta.to(device=ref.device, dtype=ref.dtype)).eval()

    # -- checkpointing --------------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        """Per-block activation checkpointing on (the transformer's switch, see the class)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    # -- forwards -------------------------------------------------------------------------

    @property
    def config(self):
        return self.transformer.config

    def forward(self, z: Tensor, r, t, cond: FluxCondition) -> Tensor:
        """u_θ(z, r, t, c) (B, N_img, patch²·out_channels), through diffusers' blocks.

        Args:
            z: (B, N_img, in_channels) packed latents.
            r, t: (B,) times in [0, 1] (0-d tensors and floats broadcast), r ≤ t.
            cond: the prompt conditioning.

        ``torch.func.jvp`` and forward-AD dual tensors work through it (attention runs through
        ``meanflow.ops.jvp_attention`` when tangents are present), but the tangent then
        carries autograd history through the parameters, and ``gradient_checkpointing`` is
        skipped with a warning under forward AD (PyTorch's checkpoint would recompute the
        blocks without their tangents and raise ``CheckpointError`` in backward): prefer
        :meth:`forward_with_tangent`, which checkpoints.
        """
        return _plain_forward(self.transformer, self.delta_embedder, z, r, t, cond,
                              self.gradient_checkpointing)

    def forward_with_tangent(self, z: Tensor, r, t, cond: FluxCondition, z_dot: Tensor | None = None,
                             r_dot=None, t_dot=None) -> tuple[Tensor, Tensor]:
        """(u, du) in one pass: u = u_θ(z, r, t, c) and its directional derivative along
        (ż, ṙ, ṫ) (MeanFlow's d/dt u_θ: ż = v, ṙ = 0, ṫ = 1).

        Args:
            z, r, t, cond: as :meth:`forward`.
            z_dot: (B, N_img, in_channels) or None (zero).
            r_dot, t_dot: (B,), 0-d, a float, or None (zero).

        Returns:
            u: differentiable (to the parameters and to z, r, t).
            u_dot: same shape and dtype, detached (no ``grad_fn``).
        """
        return _pair_forward(self.transformer, self.delta_embedder, z, r, t, cond, z_dot, r_dot, t_dot,
                             self.gradient_checkpointing)


class FluxTeacher(nn.Module):
    """The frozen teacher: v_T(z, t, c), evaluated in eval mode under ``torch.no_grad``.

    Uses the same top-level forward (and float32 time path) as :class:`FluxStudent`, so a
    student made from a copy of the same transformer agrees with it exactly at r = t, under
    autocast too. Without autocast, for a float32/float64 model, it is diffusers' forward bit
    for bit. The transformer's parameters are set to ``requires_grad=False`` and it is put in
    eval mode; a student made with ``FluxStudent.from_transformer(copy.deepcopy(teacher.transformer))``
    is trainable all the same (the student's constructor unfreezes its copy). Inputs are checked
    and cast as :class:`FluxStudent` checks and casts them.
    """

    def __init__(self, transformer):
        super().__init__()
        _check_transformer(transformer)
        self.transformer = transformer
        transformer.requires_grad_(False)
        transformer.eval()

    def train(self, mode: bool = True) -> "FluxTeacher":
        return super().train(False)  # frozen: always eval

    @torch.no_grad()
    def velocity(self, z: Tensor, t, cond: FluxCondition) -> Tensor:
        """v_T(z, t, c): (B, N_img, C) velocity at times t (B,) (or a 0-d tensor / float)."""
        return _plain_forward(self.transformer, None, z, None, t, cond, False)

    def forward(self, z: Tensor, t, cond: FluxCondition) -> Tensor:
        return self.velocity(z, t, cond)


class FluxVelocity(nn.Module):
    """A trainable velocity v_φ(z, t, c) on a FLUX transformer: the fake velocity network of
    trajectory alignment (DESIGN §2), started as a copy of the teacher. Same top-level forward
    and float32 time path as :class:`FluxTeacher`, with gradients; ``gradient_checkpointing`` is
    the transformer's diffusers switch, as for :class:`FluxStudent`.

    Args:
        transformer: a ``FluxTransformer2DModel`` (owned; copy the teacher's first).
    """

    gradient_checkpointing = _checkpointing_switch()

    def __init__(self, transformer):
        super().__init__()
        _check_transformer(transformer)
        self.transformer = transformer

    def forward(self, z: Tensor, t, cond: FluxCondition) -> Tensor:
        """v_φ(z, t, c): (B, N_img, C) for z (B, N_img, C) and t (B,) (or 0-d / float)."""
        return _plain_forward(self.transformer, None, z, None, t, cond, self.gradient_checkpointing)
