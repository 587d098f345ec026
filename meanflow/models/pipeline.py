"""A diffusers-style text-to-image pipeline for an exported MeanFlow FLUX student.

:class:`MeanFlowFluxPipeline` pairs a :class:`~meanflow.models.flux_student.FluxStudent` (the
folder ``FluxStudent.save_pretrained`` writes, e.g. a run's ``student/``) with the text encoders,
tokenizers and VAE of the FLUX pipeline it was distilled from (the *base*: a diffusers model id
such as ``"black-forest-labs/FLUX.1-dev"`` or a local ``FluxPipeline`` folder), and samples in
1–4 steps (DESIGN §2, "Sampling")::

    pipe = MeanFlowFluxPipeline.from_pretrained("runs/flux-dev/student",
                                                base="black-forest-labs/FLUX.1-dev",
                                                torch_dtype=torch.bfloat16).to("cuda")
    image = pipe("a photo of a cat", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    pipe.save_pretrained("exported")          # student + meanflow_pipeline.json naming the base
    pipe = MeanFlowFluxPipeline.from_pretrained("exported")   # base read from the JSON

Sampling follows FLUX's own layout: the noise is drawn exactly as ``FluxPipeline`` draws it
((B, C_vae, H/s, W/s), s the VAE scale factor, then packed into 2×2 patches: (B, N_img, 4·C_vae)
with N_img = (H/2s)·(W/2s)), so the same ``generator`` gives the same starting noise as the
stock pipeline. The time grid is uniform in K steps, passed through FLUX's resolution-dependent
shift or not (:func:`meanflow.method.sampler.time_grid` with ``shift="flux"`` or ``"none"``): the
one the student was trained and evaluated with, as ``meanflow_pipeline.json`` records it (the
trainer's export writes ``sample.shift`` there), ``"flux"`` for a folder that records none. Each
step is z ← z − (τ_k − τ_{k+1})·u_θ(z, τ_{k+1}, τ_k, c).

The module also holds the FLUX helpers :class:`~meanflow.train.flux_world.FluxWorld` shares:
:func:`encode_flux_prompts`, :func:`pack_latents`, :func:`unpack_latents`,
:func:`latent_image_ids`, :func:`decode_packed`, :func:`check_resolution`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from meanflow.models.flux_student import FluxCondition, FluxStudent, device_and_dtype

__all__ = ["MeanFlowFluxPipeline", "MeanFlowFluxPipelineOutput", "encode_flux_prompts", "pack_latents",
           "unpack_latents", "latent_image_ids", "decode_packed", "check_resolution",
           "default_max_sequence_length", "dtype_kwargs", "save_pipeline_config"]

PIPELINE_CONFIG_NAME = "meanflow_pipeline.json"
_FORMAT = "meanflow.MeanFlowFluxPipeline"
_FORMAT_VERSION = 1
STEP_COUNTS = (1, 2, 3, 4)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
T5_MAX_SEQUENCE_LENGTH = 512
SHIFTS = ("none", "flux")
DEFAULT_SHIFT = "flux"  # FluxPipeline's own grid, for a folder that records no shift


# --------------------------------------------------------------------------------------------
# FLUX helpers (shared with meanflow.train.flux_world)
# --------------------------------------------------------------------------------------------

def _vae_scale_factor(vae) -> int:
    """FluxPipeline's ``vae_scale_factor``: 2 ** (len(block_out_channels) − 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(height: Any, width: Any, vae_scale_factor: int,
                     name: str = "resolution") -> tuple[int, int]:
    """(height, width) as ints, each a positive multiple of 2·``vae_scale_factor`` (the VAE's
    downsampling times FLUX's 2×2 packing); ValueError naming ``name`` otherwise."""
    multiple = 2 * vae_scale_factor
    out = []
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise ValueError(f"{name}: height and width must be positive multiples of {multiple} "
                             f"(2 × the VAE scale factor {vae_scale_factor}), got {height!r} × {width!r}")
        out.append(int(value))
    return out[0], out[1]


def default_max_sequence_length(tokenizer_2) -> int:
    """The T5 token count FLUX.1 pipelines use: 512, or the tokenizer's own maximum if smaller."""
    limit = getattr(tokenizer_2, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < T5_MAX_SEQUENCE_LENGTH:
        return limit
    return T5_MAX_SEQUENCE_LENGTH


def pack_latents(latents: Tensor) -> Tensor:
    """FluxPipeline's ``_pack_latents``: (B, C, h, w) → (B, (h/2)·(w/2), 4·C), same dtype; h, w even."""
    if latents.dim() != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"latents: expected (B, C, h, w) with even h and w, got {tuple(latents.shape)}")
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents.contiguous(), b, c, h, w)


def unpack_latents(latents: Tensor, height: int, width: int, vae_scale_factor: int) -> Tensor:
    """FluxPipeline's ``_unpack_latents``: (B, N_img, 4·C) packed tokens of an image of
    ``height`` × ``width`` pixels → (B, C, height/s, width/s), same dtype (s = ``vae_scale_factor``)."""
    h, w = height // vae_scale_factor, width // vae_scale_factor
    if latents.dim() != 3 or latents.shape[1] != (h // 2) * (w // 2) or latents.shape[2] % 4:
        raise ValueError(f"latents: expected (B, {(h // 2) * (w // 2)}, 4·C) packed latents of a "
                         f"{height}×{width} image, got {tuple(latents.shape)}")
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(latents.contiguous(), height, width, vae_scale_factor)


def latent_image_ids(height: int, width: int, vae_scale_factor: int, device=None) -> Tensor:
    """FluxPipeline's ``_prepare_latent_image_ids`` for an image of ``height`` × ``width`` pixels:
    (N_img, 3) float32, rows (0, row, col) of the packed tokens in raster order."""
    from diffusers import FluxPipeline

    hp, wp = height // (2 * vae_scale_factor), width // (2 * vae_scale_factor)
    return FluxPipeline._prepare_latent_image_ids(1, hp, wp, device, torch.float32)


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """The dtype keyword of diffusers' ``from_pretrained``: ``dtype`` where diffusers has it
    (``torch_dtype`` is deprecated there), else ``torch_dtype``; {} for None."""
    if dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - newer diffusers
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _shift_scale(vae) -> tuple[float, float]:
    shift = getattr(vae.config, "shift_factor", None)
    scale = getattr(vae.config, "scaling_factor", None)
    return (0.0 if shift is None else float(shift)), (1.0 if scale is None else float(scale))


def _module_device(module) -> torch.device:
    return next(module.parameters()).device


def _module_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


@torch.no_grad()
def encode_flux_prompts(pipe, prompts: Sequence[str], img_ids: Tensor, *, device, max_sequence_length: int,
                        dtype: torch.dtype | None = None) -> FluxCondition:
    """The FLUX conditioning of B prompts through a ``FluxPipeline``'s ``encode_prompt`` (CLIP
    pooled output + T5 hidden states; ``prompt_2`` = ``prompt``).

    Args:
        pipe: a ``diffusers.FluxPipeline`` (its transformer may be None).
        prompts: B strings.
        img_ids: (N_img, 3) float32 image position ids (:func:`latent_image_ids`).
        device: where the tensors go.
        max_sequence_length: T, the T5 token count.
        dtype: the floating dtype of the embeddings (default: the text encoders').

    Returns:
        :class:`FluxCondition` with encoder_hidden_states (B, T, joint_attention_dim) and
        pooled_projections (B, pooled_projection_dim) in ``dtype``, txt_ids zeros (T, 3) float32,
        img_ids (N_img, 3) float32, guidance None, all on ``device``.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts \
            or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r:.80}")
    device = torch.device(device)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                                  max_sequence_length=max_sequence_length)
    dtype = dtype or embeds.dtype
    return FluxCondition(encoder_hidden_states=embeds.to(device=device, dtype=dtype),
                         pooled_projections=pooled.to(device=device, dtype=dtype),
                         txt_ids=text_ids.to(device=device, dtype=torch.float32),
                         img_ids=img_ids.to(device=device, dtype=torch.float32))


@torch.no_grad()
def decode_packed(vae, latents: Tensor, height: int, width: int, batch_size: int = 4) -> Tensor:
    """Packed FLUX latents → images, as FluxPipeline decodes them.

    Args:
        vae: the ``AutoencoderKL``.
        latents: (B, N_img, 4·C_vae) packed, scaled latents (any float dtype).
        height, width: the image size in pixels.
        batch_size: images per VAE call.

    Returns:
        (B, 3, height, width) float32 on the CPU, clamped to [-1, 1].
    """
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise ValueError(f"latents: expected a floating tensor (B, N_img, C), got {type(latents).__name__}")
    s = _vae_scale_factor(vae)
    x = unpack_latents(latents.detach(), height, width, s)
    shift, scale = _shift_scale(vae)
    x = x.float() / scale + shift
    device, dtype = _module_device(vae), _module_dtype(vae)
    out = []
    for i in range(0, x.shape[0], max(1, batch_size)):
        chunk = x[i:i + batch_size].to(device=device, dtype=dtype)
        out.append(vae.decode(chunk, return_dict=False)[0].float().cpu())
    return torch.cat(out).clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

def _check_shift(shift: Any, name: str = "shift") -> str:
    if shift not in SHIFTS:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, SHIFTS))}, got {shift!r}")
    return shift


def save_pipeline_config(directory: str | os.PathLike, *, shift: str, base: str | None = None,
                         revision: str | None = None, max_sequence_length: int | None = None) -> None:
    """Writes ``meanflow_pipeline.json`` into a student folder: what :class:`MeanFlowFluxPipeline`
    reads beside the student. ``shift`` is the time grid the student samples on (``"none"`` or
    ``"flux"``, the run's ``sample.shift``); ``base``, ``revision`` and ``max_sequence_length``
    (None: not recorded) are the defaults of :meth:`MeanFlowFluxPipeline.from_pretrained`."""
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "base": base, "revision": revision,
            "max_sequence_length": max_sequence_length, "shift": _check_shift(shift)}
    with open(os.path.join(os.fspath(directory), PIPELINE_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


@dataclass
class MeanFlowFluxPipelineOutput:
    """``images``: a list of B PIL images (``"pil"``), a (B, H, W, 3) float32 numpy array in [0, 1]
    (``"np"``), a (B, 3, H, W) float32 tensor in [0, 1] (``"pt"``), or the packed latents
    (B, N_img, C) float32 (``"latent"``)."""

    images: Any


class MeanFlowFluxPipeline:
    """Few-step text-to-image sampling with a MeanFlow FLUX student (see the module docstring).

    Args:
        student: the :class:`FluxStudent` (set to eval mode, gradients off).
        base_pipeline: a ``diffusers.FluxPipeline`` supplying tokenizers, text encoders and VAE
            (its transformer is not used and may be None).
        base: the base's model id or folder, recorded by :meth:`save_pretrained` (optional).
        revision: the base repository's revision, recorded alike (optional).
        max_sequence_length: T5 tokens per prompt (default: 512, or the T5 tokenizer's maximum
            if smaller).
        shift: the time grid, ``"flux"`` (default: FLUX's resolution-dependent shift) or
            ``"none"`` (uniform); use the one the student was trained with.
    """

    def __init__(self, student: FluxStudent, base_pipeline, base: str | None = None,
                 revision: str | None = None, max_sequence_length: int | None = None,
                 shift: str = DEFAULT_SHIFT):
        if not isinstance(student, FluxStudent):
            raise ValueError(f"student: expected a FluxStudent, got {type(student).__name__}")
        for name in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if getattr(base_pipeline, name, None) is None:
                raise ValueError(f"base_pipeline: expected a FluxPipeline with a {name}, got "
                                 f"{type(base_pipeline).__name__} without one")
        self.student = student.eval().requires_grad_(False)
        self.base_pipeline = base_pipeline
        self.base = base
        self.revision = revision
        if max_sequence_length is None:
            max_sequence_length = default_max_sequence_length(base_pipeline.tokenizer_2)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= T5_MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length: expected an int in [1, {T5_MAX_SEQUENCE_LENGTH}], "
                             f"got {max_sequence_length!r}")
        self.max_sequence_length = max_sequence_length
        self.shift = _check_shift(shift)
        for module in (base_pipeline.vae, base_pipeline.text_encoder, base_pipeline.text_encoder_2):
            module.eval().requires_grad_(False)
        self.vae_scale_factor = _vae_scale_factor(base_pipeline.vae)
        in_channels = student.transformer.config.in_channels
        if in_channels != 4 * base_pipeline.vae.config.latent_channels:
            raise ValueError(f"base_pipeline: the student takes {in_channels} channels per token, but the "
                             f"base's VAE packs 4 × {base_pipeline.vae.config.latent_channels}")

    # -- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, student_dir: str | os.PathLike, base: str | os.PathLike | None = None, *,
                        torch_dtype: torch.dtype | None = None, revision: str | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int | None = None,
                        shift: str | None = None, **base_kwargs) -> "MeanFlowFluxPipeline":
        """Loads a student folder and the base pipeline's encoders and VAE.

        Args:
            student_dir: a folder ``FluxStudent.save_pretrained`` (or :meth:`save_pretrained`) wrote.
            base: the base ``FluxPipeline``'s model id or folder; default: the one recorded in
                ``student_dir/meanflow_pipeline.json`` (ValueError naming ``base`` if none is).
            torch_dtype: dtype of every model (default: as stored).
            revision: the base repository's revision (default: the recorded one, else the
                default branch).
            device: where to move everything (default: stay on the CPU).
            max_sequence_length: see the class.
            shift: the time grid, ``"none"`` or ``"flux"`` (default: the one recorded in
                ``student_dir/meanflow_pipeline.json``, else ``"flux"``).
            base_kwargs: passed on to ``FluxPipeline.from_pretrained``.
        """
        from diffusers import FluxPipeline

        student_dir = os.fspath(student_dir)
        if not os.path.isdir(student_dir):
            raise ValueError(f"student_dir: no such folder {student_dir!r}")
        recorded = {}
        path = os.path.join(student_dir, PIPELINE_CONFIG_NAME)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                recorded = json.load(f)
            if recorded.get("format") != _FORMAT or recorded.get("version") != _FORMAT_VERSION:
                raise ValueError(f"student_dir: {path} has unknown format {recorded.get('format')!r} "
                                 f"version {recorded.get('version')!r}")
        if base is None:
            base = recorded.get("base")
            if revision is None:
                revision = recorded.get("revision")
        if base is None:
            raise ValueError(f"base: {student_dir!r} records no base pipeline; pass base=<the FluxPipeline "
                             "model id or folder the student was distilled from>")
        if max_sequence_length is None:
            max_sequence_length = recorded.get("max_sequence_length")
        if shift is None:
            shift = _check_shift(recorded.get("shift", DEFAULT_SHIFT), f"student_dir: {path}: shift")
        _check_shift(shift)
        base = os.fspath(base)
        kwargs = {**base_kwargs, **dtype_kwargs(torch_dtype)}
        try:
            base_pipeline = FluxPipeline.from_pretrained(base, transformer=None, revision=revision, **kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(f"base: cannot load a FluxPipeline from {base!r} "
                             f"({type(err).__name__}: {err})") from err
        student = FluxStudent.from_pretrained(student_dir, **dtype_kwargs(torch_dtype))
        pipe = cls(student, base_pipeline, base=base, revision=revision,
                   max_sequence_length=max_sequence_length, shift=shift)
        return pipe if device is None else pipe.to(device)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the student (``FluxStudent.save_pretrained``) and ``meanflow_pipeline.json``
        naming the base (an absolute path if it is a local folder) and the time grid, so that
        ``from_pretrained(directory)`` alone works while the base stays where it is."""
        directory = os.fspath(directory)
        self.student.save_pretrained(directory)
        base = self.base
        if base is not None and os.path.isdir(base):
            base = os.path.abspath(base)
        save_pipeline_config(directory, shift=self.shift, base=base, revision=self.revision,
                             max_sequence_length=self.max_sequence_length)

    # -- devices ------------------------------------------------------------------------------

    def to(self, *args, device: str | torch.device | None = None,
           dtype: torch.dtype | None = None) -> "MeanFlowFluxPipeline":
        """Moves and/or casts the student, the text encoders and the VAE, as diffusers pipelines
        do: ``to("cuda")``, ``to(torch.bfloat16)``, ``to("cuda", torch.bfloat16)``,
        ``to(device=..., dtype=...)``. Returns self.

        Raises:
            ValueError: naming ``device`` or ``dtype`` (not a device, not a floating dtype, given twice).
        """
        device, dtype = device_and_dtype(*args, device=device, dtype=dtype)
        for module in (self.student, self.base_pipeline.vae, self.base_pipeline.text_encoder,
                       self.base_pipeline.text_encoder_2):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return _module_device(self.student)

    @property
    def dtype(self) -> torch.dtype:
        return _module_dtype(self.student.transformer)

    # -- sampling -----------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str], height: int, width: int) -> FluxCondition:
        """:func:`encode_flux_prompts` for images of ``height`` × ``width`` pixels, in the student's
        dtype on its device (guidance None)."""
        ids = latent_image_ids(height, width, self.vae_scale_factor)
        return encode_flux_prompts(self.base_pipeline, prompts, ids, device=self.device,
                                   max_sequence_length=self.max_sequence_length, dtype=self.dtype)

    def prepare_latents(self, batch: int, height: int, width: int, generator=None) -> Tensor:
        """Noise (B, N_img, 4·C_vae) float32 on the student's device, drawn as FluxPipeline draws it
        ((B, C_vae, H/s, W/s) then packed)."""
        from diffusers.utils.torch_utils import randn_tensor

        s = self.vae_scale_factor
        channels = self.base_pipeline.vae.config.latent_channels
        noise = randn_tensor((batch, channels, height // s, width // s), generator=generator,
                             device=self.device, dtype=torch.float32)
        return pack_latents(noise)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 4, height: int = 1024,
                 width: int = 1024, guidance_scale: float = 3.5, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, shift: str | None = None):
        """Text to image in K = ``num_inference_steps`` student steps.

        Args:
            prompt: one prompt or a list of B prompts.
            num_inference_steps: K in {1, 2, 3, 4}.
            height, width: image size in pixels; multiples of 2 × the VAE scale factor (16 for FLUX).
            guidance_scale: g written into the guidance embedding (B,) when the transformer has
                ``guidance_embeds`` (FLUX.1-dev); ignored otherwise.
            num_images_per_prompt: images per prompt (the batch is B·this).
            generator: a torch.Generator (or one per image) for the noise, as in FluxPipeline.
            latents: optional starting noise (B·n, N_img, 4·C_vae) instead of drawing it.
            output_type: ``"pil"`` (default), ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a :class:`MeanFlowFluxPipelineOutput` (default) or a 1-tuple.
            shift: the time grid, ``"none"`` or ``"flux"`` (default: the pipeline's ``shift``).

        Returns:
            ``.images`` as documented on :class:`MeanFlowFluxPipelineOutput`.
        """
        from meanflow.method.sampler import SamplerConfig, sample, time_grid

        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts \
                or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r:.80}")
        if type(num_inference_steps) is not int or num_inference_steps not in STEP_COUNTS:
            raise ValueError(f"num_inference_steps: the student samples in "
                             f"{', '.join(map(str, STEP_COUNTS))} "
                             f"steps, got {num_inference_steps!r}")
        height, width = check_resolution(height, width, self.vae_scale_factor, "height, width")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive int, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {', '.join(map(repr, OUTPUT_TYPES))}, "
                             f"got {output_type!r}")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise ValueError(f"guidance_scale: expected a number, got {guidance_scale!r}")
        shift = self.shift if shift is None else _check_shift(shift)

        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: a list of {len(generator)} generators for {batch} images "
                             f"({len(prompts) // num_images_per_prompt} prompts × {num_images_per_prompt}); "
                             "give one per image, or one generator")
        cond = self.encode_prompt(prompts, height, width)
        if getattr(self.student.transformer.config, "guidance_embeds", False):
            from meanflow.method.guidance import set_guidance

            cond = set_guidance(cond, torch.full((batch,), float(guidance_scale), device=self.device,
                                                 dtype=torch.float32))

        n_img = cond.img_ids.shape[0]
        channels = self.student.transformer.config.in_channels
        if latents is None:
            noise = self.prepare_latents(batch, height, width, generator)
        else:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != (batch, n_img, channels):
                raise ValueError(f"latents: expected ({batch}, {n_img}, {channels}) packed noise, got "
                                 f"{tuple(getattr(latents, 'shape', ()))}")
            noise = latents.to(device=self.device, dtype=torch.float32)

        grid = time_grid(SamplerConfig(steps=num_inference_steps, shift=shift), image_seq_len=n_img)
        dtype = self.dtype

        def u(z, r, t, c):
            return self.student(z.to(dtype), r, t, c).float()

        z = sample(u, noise, grid, cond)
        if output_type == "latent":
            images = z
        else:
            decoded = decode_packed(self.base_pipeline.vae, z, height, width)
            images = self.base_pipeline.image_processor.postprocess(decoded, output_type=output_type)
        if not return_dict:
            return (images,)
        return MeanFlowFluxPipelineOutput(images=images)
