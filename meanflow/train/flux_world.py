"""The FLUX world: a diffusers ``FluxPipeline`` (FLUX.1-dev and kin) as the trainer's teacher.

:class:`FluxWorld` implements :class:`~meanflow.train.world.World` for a FLUX pipeline:

- the teacher is :class:`~meanflow.models.flux_student.FluxTeacher` around the pipeline's
  transformer; the text encoders (CLIP, T5) and the VAE are frozen on the device;
- latents are FLUX's packed tokens: the VAE latent (C_vae, H/s, W/s) (s the pipeline's
  ``vae_scale_factor``, 8 for FLUX) cut into 2×2 patches, so ``latent_shape`` is
  ((H/2s)·(W/2s), 4·C_vae) = (4096, 64) at 1024² for FLUX.1; clean latents are scaled as FLUX's
  sampler produces them, (z − shift_factor)·scaling_factor;
- ``data.source: teacher``: the trainer generates latents from the prompt file and hands them
  over with :meth:`FluxWorld.use_latents`;
- ``data.source: dataset``: an image–caption folder (every ``.png/.jpg/.jpeg/.webp`` file with a
  ``.txt`` caption of the same stem), resized (shorter side) and center-cropped to the
  resolution, encoded once through the VAE (the posterior mean) and cached in
  ``dataset_latents.safetensors`` (in ``data.latents_cache``, else the run folder).

The resolution and the image folder come from the config (``model.resolution``,
``data.images``) unless the constructor is given them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from meanflow.models.flux_student import FluxCondition, FluxTeacher
from meanflow.models.pipeline import (_vae_scale_factor, check_resolution, decode_packed,
                                      default_max_sequence_length, dtype_kwargs, encode_flux_prompts,
                                      latent_image_ids, pack_latents)
from meanflow.train.world import World, read_prompt_file

BUILTIN_PROMPTS = os.path.join(os.path.dirname(__file__), "presets", "flux_prompts.txt")

__all__ = ["FluxWorld", "IMAGE_EXTENSIONS", "DATASET_LATENTS_FILE", "find_captioned_images", "load_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DATASET_LATENTS_FILE = "dataset_latents.safetensors"
EVAL_PROMPTS = 8


def _parse_resolution(value, name: str):
    """An int, (height, width), or a string ``"1024"`` / ``"768x1344"`` → (height, width) ints
    (not yet checked against the VAE)."""
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        try:
            nums = [int(p.strip()) for p in parts]
        except ValueError:
            raise ValueError(f"{name}: expected a size like 1024 or 768x1344, got {value!r}") from None
        value = nums[0] if len(nums) == 1 else tuple(nums)
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected one size or (height, width), got {value!r}")
        return value[0], value[1]
    return value, value


def find_captioned_images(image_dir: str | os.PathLike, name: str = "image_dir") -> list[tuple[Path, str]]:
    """(image path, caption) for every image file in ``image_dir`` (not recursive; sorted by
    name) that has a UTF-8 ``.txt`` caption of the same stem. ValueError naming ``name`` if the
    folder is missing or holds no captioned image."""
    folder = Path(image_dir)
    if not folder.is_dir():
        raise ValueError(f"{name}: no such folder {str(folder)!r}")
    pairs = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            continue
        try:
            text = caption.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{name}: cannot read the caption {str(caption)!r} as UTF-8 text "
                             f"({err})") from None
        pairs.append((path, " ".join(text.split())))
    if not pairs:
        raise ValueError(f"{name}: {str(folder)!r} holds no captioned image (expected files "
                         f"{'/'.join(IMAGE_EXTENSIONS)} each with a .txt caption of the same name)")
    return pairs


def folder_fingerprint(pairs: Sequence[tuple[Path, str]]) -> str:
    """sha256 over the (file name, size, caption) of each captioned image: what a dataset cache
    was made from (sizes, not contents: reading every image again would cost what the cache saves)."""
    import hashlib

    digest = hashlib.sha256()
    for path, caption in pairs:
        digest.update(f"{Path(path).name}\t{Path(path).stat().st_size}\t{caption}\n".encode())
    return digest.hexdigest()


def load_image(path: str | os.PathLike, height: int, width: int) -> Tensor:
    """An image file as (3, height, width) float32 in [-1, 1]: turned upright by its EXIF
    orientation (as viewers and ``diffusers.utils.load_image`` show it), RGB, resized so that it
    covers height × width (bicubic; the shorter side for a square target), then center-cropped."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"image_dir: cannot read the image {str(path)!r} ({err})") from None
    w0, h0 = img.size
    scale = max(height / h0, width / w0)
    new_w, new_h = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    img = img.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return pixels / 127.5 - 1.0


def _to_uint8(images: Tensor) -> Tensor:
    """(N, C, H, W) float in [-1, 1] → (N, H, W, C) uint8."""
    pixels = (images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1)


class FluxWorld(World):
    """A FLUX pipeline as the trainer's world (see the module docstring).

    Args:
        config: the :class:`~meanflow.train.config.TrainConfig` (reads ``model.teacher``,
            ``model.revision``, ``run.dtype``, ``run.out_dir``, ``data.prompts``, ``data.source``,
            ``data.latents_cache``).
        device: where the teacher, text encoders and VAE run.
        pipeline: a ready ``diffusers.FluxPipeline`` to use instead of loading ``model.teacher``
            (its dtype is kept).
        resolution: the training / sampling image size: an int (square) or (height, width) in
            pixels, multiples of 2 × the VAE scale factor (16 for FLUX). Default:
            ``model.resolution``.
        image_dir: the image–caption folder for ``data.source: dataset``. Default:
            ``data.images``.
        max_sequence_length: T5 tokens per prompt (default 512, or the T5 tokenizer's maximum if
            smaller).
        encode_batch_size: images per VAE call when encoding the dataset / decoding (default 4).
        default_guidance: the guidance scale g :meth:`condition` writes for a transformer with
            ``guidance_embeds`` (FLUX.1-dev), so that every caller gets a usable conditioning:
            ``"auto"`` (default) = the first of ``method.guidance.scales`` in the embedded mode,
            else 3.5 (FluxPipeline's default); a number; or None (leave guidance None). The
            trainer replaces it with its per-sample draws in training (``GuidedTeacher.prepare``);
            the preview / evaluation sampler (``loop.sample_student``) does not write guidance
            itself and relies on it.
        log: status lines (default ``print``).
        load_dataset: whether ``data.source: dataset`` loads its latents now (from the cache, or
            by encoding the images); False where nothing trains (sampling, evaluation): the
            world then has no training data.

    Attributes:
        teacher, latent_shape (N_img, C), device, height, width, vae_scale_factor, pipeline,
        img_ids (N_img, 3) float32, max_sequence_length, source, default_guidance (float or None).
    """

    name = "flux"

    def __init__(self, config, device: str | torch.device = "cpu", pipeline=None, resolution=None,
                 image_dir: str | os.PathLike | None = None, max_sequence_length: int | None = None,
                 encode_batch_size: int = 4, default_guidance: float | str | None = "auto", log=print,
                 load_dataset: bool = True):
        self.config = config
        self.device = torch.device(device)
        self.log = log
        if isinstance(encode_batch_size, bool) or not isinstance(encode_batch_size, int) \
                or encode_batch_size < 1:
            raise ValueError(f"encode_batch_size: expected a positive int, got {encode_batch_size!r}")
        self.encode_batch_size = encode_batch_size

        # Prompts first: cheap to check, before loading gigabytes.
        # "builtin": the prompt list shipped beside the presets (meanflow/train/presets/flux_prompts.txt).
        prompts = BUILTIN_PROMPTS if config.data.prompts == "builtin" else config.data.prompts
        self._prompts = read_prompt_file(prompts)

        if pipeline is None:
            pipeline = self._load_pipeline(config)
        for part in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if getattr(pipeline, part, None) is None:
                raise ValueError(f"pipeline: expected a FluxPipeline with a {part}, got "
                                 f"{type(pipeline).__name__} without one")
        self.pipeline = pipeline
        for module in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.vae):
            module.to(self.device).eval().requires_grad_(False)
        self.teacher = FluxTeacher(pipeline.transformer.to(self.device))

        self.vae_scale_factor = _vae_scale_factor(pipeline.vae)
        name = "resolution"
        if resolution is None:
            resolution, name = config.model.resolution, "model.resolution"
        height, width = _parse_resolution(resolution, name)
        self.height, self.width = check_resolution(height, width, self.vae_scale_factor, name)

        in_channels = pipeline.transformer.config.in_channels
        latent_channels = pipeline.vae.config.latent_channels
        if in_channels != 4 * latent_channels:
            raise ValueError(f"pipeline: the transformer takes {in_channels} channels per token, but "
                             f"2×2 packing of the VAE's {latent_channels} latent channels gives "
                             f"{4 * latent_channels}")
        s2 = 2 * self.vae_scale_factor
        self.latent_shape = ((self.height // s2) * (self.width // s2), in_channels)
        self.img_ids = latent_image_ids(self.height, self.width, self.vae_scale_factor, device=self.device)
        if max_sequence_length is None:
            max_sequence_length = default_max_sequence_length(pipeline.tokenizer_2)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length: expected an int in [1, 512], got {max_sequence_length!r}")
        self.max_sequence_length = max_sequence_length

        has_guidance = bool(getattr(pipeline.transformer.config, "guidance_embeds", False))
        if default_guidance == "auto":
            g = config.method.guidance
            default_guidance = (g.scales[0] if g.mode == "embedded" else 3.5) if has_guidance else None
        elif default_guidance is not None and (isinstance(default_guidance, bool)
                                               or not isinstance(default_guidance, (int, float))):
            raise ValueError(f"default_guidance: expected 'auto', a number or None, got {default_guidance!r}")
        if default_guidance is not None and not has_guidance:
            raise ValueError("default_guidance: the transformer has no guidance embedding (guidance_embeds "
                             "False); pass None")
        self.default_guidance = None if default_guidance is None else float(default_guidance)

        self.source = config.data.source
        self._latents: tuple[Tensor, list[str]] | None = None
        if self.source == "dataset" and load_dataset:
            name = "image_dir"
            if image_dir is None:
                image_dir, name = config.data.images, "data.images"
            self._latents = self._dataset_latents(image_dir, name)

    # -- loading -------------------------------------------------------------------------------
    @staticmethod
    def _load_pipeline(config):
        from diffusers import FluxPipeline

        dtype = torch.bfloat16 if config.run.dtype == "bfloat16" else torch.float32
        try:
            return FluxPipeline.from_pretrained(config.model.teacher, revision=config.model.revision,
                                                **dtype_kwargs(dtype))
        except (OSError, ValueError) as err:
            raise ValueError(f"model.teacher: cannot load a FluxPipeline from {config.model.teacher!r} "
                             f"(revision {config.model.revision!r}): {type(err).__name__}: {err}") from err

    # -- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, prompts: Sequence[str]) -> FluxCondition:
        """The conditioning of B prompts: encoder_hidden_states (B, T, joint_attention_dim) and
        pooled_projections (B, pooled_projection_dim) in the transformer's dtype, txt_ids (T, 3)
        and img_ids (N_img, 3) float32, on the device; T = ``max_sequence_length``. guidance:
        (B,) float32 filled with ``default_guidance`` for a guidance-embedding transformer (the
        trainer overwrites it with its own draws), else None."""
        from meanflow.method.guidance import set_guidance

        dtype = self.teacher.transformer.dtype
        cond = encode_flux_prompts(self.pipeline, list(prompts) if not isinstance(prompts, str) else prompts,
                                   self.img_ids, device=self.device,
                                   max_sequence_length=self.max_sequence_length, dtype=dtype)
        if self.default_guidance is not None:
            batch = cond.encoder_hidden_states.shape[0]
            cond = set_guidance(cond, torch.full((batch,), self.default_guidance, device=self.device))
        return cond

    # -- prompts -------------------------------------------------------------------------------
    def eval_prompts(self) -> list[str]:
        """The first (at most 8) prompts of ``data.prompts``."""
        return list(self._prompts[:EVAL_PROMPTS])

    def train_prompts(self) -> list[str]:
        """Every prompt of ``data.prompts``."""
        return list(self._prompts)

    # -- data ----------------------------------------------------------------------------------
    def use_latents(self, latents: Tensor, prompts: list[str]) -> None:
        """Train on latents (N, N_img, C) (teacher-generated, or any packed, scaled FLUX latents)
        with their N prompts; stored as float32 on the CPU."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 3 \
                or tuple(latents.shape[1:]) != tuple(self.latent_shape) or latents.shape[0] < 1:
            raise ValueError(f"latents: expected (N, {self.latent_shape[0]}, {self.latent_shape[1]}), got "
                             f"{tuple(getattr(latents, 'shape', ()))}")
        if len(prompts) != latents.shape[0] or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: expected {latents.shape[0]} strings (one per latent), "
                             f"got {len(prompts)}")
        self._latents = (latents.detach().float().cpu(), list(prompts))

    @property
    def training_data(self) -> tuple[Tensor, list[str]] | None:
        """(latents (N, N_img, C) float32 on the CPU, N prompts) the batches are drawn from, or
        None before :meth:`use_latents` (``data.source: teacher``)."""
        return self._latents

    def training_batch(self, batch: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """(x (B, N_img, C) float32 on the device, B prompts): rows drawn uniformly with
        replacement with ``generator`` (a CPU generator)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected a positive int, got {batch!r}")
        if self._latents is None:
            raise ValueError("data.source: no training latents yet; with source 'teacher' the trainer must "
                             "call use_latents(latents, prompts) first (with source 'dataset', the world "
                             "must be made with load_dataset=True)")
        latents, prompts = self._latents
        rows = torch.randint(latents.shape[0], (batch,), generator=generator)
        return latents[rows].to(self.device), [prompts[i] for i in rows.tolist()]

    def dataset_cache_path(self) -> Path:
        """``data.latents_cache``/dataset_latents.safetensors, else in ``run.out_dir``."""
        folder = self.config.data.latents_cache or self.config.run.out_dir
        return Path(folder) / DATASET_LATENTS_FILE

    def _cache_info(self, image_dir) -> dict:
        return {"kind": "flux-dataset", "teacher": self.config.model.teacher,
                "revision": self.config.model.revision, "resolution": [self.height, self.width],
                "image_dir": None if image_dir is None else os.path.abspath(os.fspath(image_dir))}

    def _dataset_latents(self, image_dir, name: str = "image_dir") -> tuple[Tensor, list[str]]:
        from meanflow.train.data import load_latents, read_info, save_latents

        path = self.dataset_cache_path()
        expected = self._cache_info(image_dir)
        if path.is_file():
            info = read_info(path)
            for key in ("teacher", "revision", "resolution") + (("image_dir",) if image_dir is not None else ()):
                # (A revision is compared where recorded: caches of older versions have none.)
                if (key != "revision" or key in info) and info.get(key) != expected[key]:
                    raise ValueError(f"data.latents_cache: {str(path)!r} holds latents of {key} "
                                     f"{info.get(key)!r}, "
                                     f"this run wants {expected[key]!r}; delete it or choose another "
                                     "data.latents_cache")
            # The folder as it is now: a cache of what it held before (images added, removed or
            # replaced, captions edited) is refused, never trained on silently. (Caches made
            # before the fingerprint was recorded, or used where the folder is absent, are not.)
            if info.get("images") is not None and image_dir is not None and Path(image_dir).is_dir():
                if info["images"] != folder_fingerprint(find_captioned_images(image_dir, name)):
                    raise ValueError(f"data.latents_cache: {str(path)!r} holds latents of the images "
                                     f"{str(image_dir)!r} held when it was made; images or captions changed "
                                     "since: delete it or choose another data.latents_cache")
            latents, prompts = load_latents(path)
            if tuple(latents.shape[1:]) != tuple(self.latent_shape):
                raise ValueError(f"data.latents_cache: {str(path)!r} holds latents {tuple(latents.shape)}, "
                                 f"expected (N, {self.latent_shape[0]}, {self.latent_shape[1]})")
            self.log(f"training on {latents.shape[0]} cached dataset latents from {path}")
            return latents, prompts
        if image_dir is None:
            raise ValueError("image_dir: data.source 'dataset' needs an image–caption folder; pass "
                             "image_dir or set data.images (or use data.source teacher)")
        pairs = find_captioned_images(image_dir, name)
        self.log(f"encoding {len(pairs)} captioned images from {image_dir} at {self.height}×{self.width} "
                 f"into {path}")
        latents = self.encode_images([p for p, _ in pairs])
        prompts = [c for _, c in pairs]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_latents(path, latents, prompts, dict(expected, images=folder_fingerprint(pairs)))
        return latents, prompts

    @torch.no_grad()
    def encode_images(self, paths: Sequence[str | os.PathLike]) -> Tensor:
        """Image files → packed, scaled latents (N, N_img, C) float32 on the CPU: each image
        resized and center-cropped to the resolution (:func:`load_image`), encoded by the VAE
        (the posterior mean), (z − shift_factor)·scaling_factor, then packed into 2×2 patches."""
        vae = self.pipeline.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scale = getattr(vae.config, "scaling_factor", None) or 1.0
        dtype = next(vae.parameters()).dtype
        out = []
        for i in range(0, len(paths), self.encode_batch_size):
            chunk = paths[i:i + self.encode_batch_size]
            pixels = torch.stack([load_image(p, self.height, self.width) for p in chunk])
            z = vae.encode(pixels.to(device=self.device, dtype=dtype)).latent_dist.mean.float()
            out.append(pack_latents((z - shift) * scale).cpu())
        return torch.cat(out)

    # -- images --------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        """(B, N_img, C) packed latents → (B, 3, H, W) float32 on the CPU in [-1, 1] (clamped):
        unpacked, (z / scaling_factor) + shift_factor, ``vae.decode``."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 3 \
                or tuple(latents.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(f"latents: expected (B, {self.latent_shape[0]}, {self.latent_shape[1]}), got "
                             f"{tuple(getattr(latents, 'shape', ()))}")
        return decode_packed(self.pipeline.vae, latents, self.height, self.width, self.encode_batch_size)

    def save_grid(self, images: Tensor, path: str, nrow: int, gutter: int = 2) -> None:
        """Writes images (N, 3 or 1, H, W) float in [-1, 1] as a PNG grid of ``nrow`` images per
        row, separated by ``gutter``-pixel gray lines."""
        import numpy as np
        from PIL import Image

        if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
            raise ValueError(f"nrow: expected a positive int, got {nrow!r}")
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3) \
                or images.shape[0] < 1:
            raise ValueError(f"images: expected (N, 3 or 1, H, W) with N >= 1, got "
                             f"{tuple(getattr(images, 'shape', ()))}")
        pix = _to_uint8(images).numpy()
        n, h, w, c = pix.shape
        ncol = min(nrow, n)
        rows = -(-n // ncol)
        canvas = np.full((rows * h + (rows + 1) * gutter, ncol * w + (ncol + 1) * gutter, c), 128, np.uint8)
        for k in range(n):
            y, x = divmod(k, ncol)
            top, left = gutter + y * (h + gutter), gutter + x * (w + gutter)
            canvas[top:top + h, left:left + w] = pix[k]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path, format="PNG")
