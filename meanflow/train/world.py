"""What the trainer needs from a model family: the frozen teacher, its prompt encoder, the data,
and the way back from latents to images.

The loop (:mod:`meanflow.train.loop`) only sees a :class:`World`:

- ``teacher``: a frozen :class:`~meanflow.models.flux_student.FluxTeacher`;
- ``condition(prompts)`` → :class:`~meanflow.models.flux_student.FluxCondition` (no grad);
- ``latent_shape`` (N_img, C): the packed latent tokens of one image;
- ``training_batch(batch, generator)`` → (x (B, N_img, C) float32 clean latents, prompts);
- ``decode(latents)`` → images (B, channels, H, W) float32 in [-1, 1], and ``save_grid``.

:class:`DigitsWorld` is the embedded default: the project's small FLUX-architecture teacher
on scikit-learn's digits, its own text encoder, and the identity "VAE" of packed 8×8 pixels.
The FLUX.1-dev world lives in :mod:`meanflow.train.flux_world`.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from meanflow.models.flux_student import FluxCondition, FluxTeacher


class World:
    """The interface the loop uses; see the module docstring."""

    name: str = "world"
    teacher: FluxTeacher
    latent_shape: tuple[int, int]
    device: torch.device

    def condition(self, prompts: Sequence[str]) -> FluxCondition:
        raise NotImplementedError

    def training_batch(self, batch: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def save_grid(self, images: Tensor, path: str, nrow: int) -> None:
        raise NotImplementedError

    def eval_prompts(self) -> list[str]:
        """The prompts sample grids and the evaluation use by default."""
        raise NotImplementedError

    def train_prompts(self) -> list[str]:
        """The prompts teacher-generated training data is drawn from."""
        raise NotImplementedError

    def evaluator(self):
        """The metrics' feature extractor (see :mod:`meanflow.eval.evaluate`); ValueError if
        this world has none."""
        raise ValueError(f"eval: the {self.name} world has no offline evaluator")


def digits_prompts(prompts: str) -> list[str]:
    """The digits world's prompts for ``data.prompts``: its built-in ones, or a prompt file's."""
    if prompts != "builtin":
        return read_prompt_file(prompts)
    from meanflow.digits import default_prompts  # imported here, as the digits world does

    return default_prompts()


def read_prompt_file(path: str) -> list[str]:
    """One prompt per line (UTF-8); blank lines and lines starting with ``#`` are skipped.

    Raises ValueError naming the file when it is missing, unreadable, not text, or holds no
    prompt."""
    if not os.path.isfile(path):
        raise ValueError(f"data.prompts: no such file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"data.prompts: cannot read {path!r} as UTF-8 text ({err})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"data.prompts: {path!r} holds no prompt (one per line expected)")
    return prompts


class DigitsWorld(World):
    """The digits world (see :mod:`meanflow.digits`).

    Args:
        teacher: ``"builtin"`` (the shipped checkpoint) or a path to a teacher ``.safetensors``.
        prompts: ``"builtin"`` or a prompt file; the evaluation prompts (each must name a digit).
        device: where the teacher and the text encoder run.
        source: ``"dataset"`` (the digits train split with captions drawn from the training
            templates) or ``"teacher"`` (latents the teacher generated, see
            :func:`meanflow.train.data.teacher_latents`; set with :meth:`use_latents`).
    """

    name = "digits"

    def __init__(self, teacher: str = "builtin", prompts: str = "builtin", device: str | torch.device = "cpu",
                 source: str = "dataset"):
        from meanflow import digits

        self.device = torch.device(device)
        path = None if teacher == "builtin" else teacher
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"model.teacher: no such file {path!r}")
        teacher_model, text_encoder = digits.load_teacher(path)
        self.teacher = teacher_model.to(self.device)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.latent_shape = (16, 4)
        self._prompt_file = None if prompts == "builtin" else prompts
        self._prompts = digits_prompts(prompts)
        unknown = [p for p in self._prompts if digits.label_of(p) is None]
        if unknown:
            raise ValueError(f"data.prompts: the digits world needs prompts that name a digit; "
                             f"these do not: {unknown[:3]}")
        self.source = source
        self._latents: tuple[Tensor, list[str]] | None = None
        images, labels = digits.load_split("train")
        self._images, self._labels = images, labels

    # -- conditioning ----------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, prompts: Sequence[str]) -> FluxCondition:
        from meanflow.digits import encode_condition

        return encode_condition(self.text_encoder, list(prompts), device=self.device)

    # -- data ------------------------------------------------------------------------------
    def use_latents(self, latents: Tensor, prompts: list[str]) -> None:
        """Train on teacher-generated latents (N, 16, 4) with their prompts instead of the dataset."""
        if latents.dim() != 3 or tuple(latents.shape[1:]) != self.latent_shape or len(prompts) != latents.shape[0]:
            raise ValueError(f"latents: expected (N, 16, 4) with N prompts, got {tuple(latents.shape)} "
                             f"and {len(prompts)} prompts")
        self._latents = (latents.float(), list(prompts))

    def training_batch(self, batch: int, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """(x (B, 16, 4) float32 on the device, B prompts), drawn with ``generator`` (CPU)."""
        from meanflow import digits

        if self._latents is not None:
            latents, prompts = self._latents
            rows = torch.randint(latents.shape[0], (batch,), generator=generator)
            return latents[rows].to(self.device), [prompts[i] for i in rows.tolist()]
        rows = torch.randint(self._images.shape[0], (batch,), generator=generator)
        templates = torch.randint(len(digits.TRAIN_TEMPLATES), (batch,), generator=generator)
        prompts = [digits.prompt(int(self._labels[i]), digits.TRAIN_TEMPLATES[j])
                   for i, j in zip(rows.tolist(), templates.tolist())]
        return digits.pack(self._images[rows]).to(self.device), prompts

    def eval_prompts(self) -> list[str]:
        return list(self._prompts)

    def train_prompts(self) -> list[str]:
        """Every training template for every digit (``builtin``), else the prompt file."""
        from meanflow import digits

        if self._prompt_file is not None:
            return list(self._prompts)
        return [digits.prompt(label, template) for label in range(10) for template in digits.TRAIN_TEMPLATES]

    # -- images ----------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        """(B, 16, 4) → (B, 1, 8, 8) float32 in [-1, 1] (clamped)."""
        from meanflow.digits import unpack

        return unpack(latents.detach().float().cpu()).clamp(-1, 1)

    def evaluator(self) -> "DigitsEvaluator":
        return DigitsEvaluator()

    def save_grid(self, images: Tensor, path: str, nrow: int) -> None:
        from meanflow.digits import grid_image

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        grid_image(images, nrow).save(path)


class DigitsEvaluator:
    """The digits classifier the project trains (:mod:`meanflow.digits.classifier`) as the
    metrics' feature extractor; the reference set is the held-out test split."""

    def __init__(self):
        from meanflow import digits

        self.classifier = digits.load_classifier().eval()
        self._digits = digits

    def label_of(self, prompt: str) -> int:
        label = self._digits.label_of(prompt)
        if label is None:
            raise ValueError(f"prompt {prompt!r} names no digit")
        return label

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 1, 8, 8) float in [-1, 1] → (features (B, F) float64, logits (B, 10))."""
        images = images.float().cpu()
        return self.classifier.features(images).double(), self.classifier(images)

    def reference_features(self) -> Tensor:
        """Features (300, F) float64 of the test split (seen by neither teacher nor classifier)."""
        images, _ = self._digits.load_split("test")
        return self.features_and_logits(images)[0]

    def real_sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """(features, logits, labels) of n training images drawn with a fixed seed: the floor."""
        images, labels = self._digits.load_split("train")
        rows = torch.randint(images.shape[0], (n,), generator=torch.Generator().manual_seed(seed))
        feats, logits = self.features_and_logits(images[rows])
        return feats, logits, labels[rows]


def make_world(config, device: torch.device | None = None, *, training: bool = True) -> World:
    """The :class:`World` a :class:`~meanflow.train.config.TrainConfig` asks for, on ``device``
    (default: ``run.device`` resolved). ``training=False`` (sampling, evaluation, generating
    data): a FLUX world does not load or encode its ``data.source: dataset`` images."""
    device = device if device is not None else resolve_device(config.run.device)
    if config.model.kind == "digits":
        return DigitsWorld(config.model.teacher, config.data.prompts, device, config.data.source)
    if config.model.kind == "flux":
        from meanflow.train.flux_world import FluxWorld

        return FluxWorld(config, device, load_dataset=training)
    raise ValueError(f"model.kind: expected 'digits' or 'flux', got {config.model.kind!r}")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU; ``"cuda"`` without CUDA → ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: {name!r} asked for, but torch sees no CUDA device")
    return device
