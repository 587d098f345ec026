"""Few-step quality of a student against its teacher, at equal step budgets.

For every evaluation prompt, ``samples_per_prompt`` samples from one fixed set of noises
(the same noise for every model and step count, so rows differ only by the model):

- the guided teacher with K Euler steps (K in ``eval.teacher_steps``; with classifier-free
  guidance each step costs two network evaluations);
- the student (EMA weights) with K of its own steps (K in ``eval.student_steps``).

Metrics need a world with an evaluator (``world.evaluator()``; the digits world has one: its
classifier): Fréchet distance between classifier features of the samples and of held-out real
images, prompt accuracy (the classifier's label equals the digit the prompt names) and
diversity (mean pairwise feature distance within a prompt's label).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch import Tensor

from meanflow.eval.metrics import diversity, frechet_distance, prompt_accuracy


def _batched(fn: Callable[[list, Tensor], Tensor], prompts: list, noise: Tensor, batch: int) -> Tensor:
    return torch.cat([fn(prompts[i:i + batch], noise[i:i + batch]) for i in range(0, len(prompts), batch)])


def evaluate(world, student, config, *, seed: int = 1234, log: Callable[[str], None] = print,
             sampling: Callable = contextlib.nullcontext) -> dict:
    """Evaluate the teacher and ``student`` (a FluxStudent, eval mode) as ``config.eval`` says.
    ``sampling()`` is the context the models' sampling runs in (decoding and metrics run
    outside it).

    Returns a dict: ``rows`` (one per model and step count: model, steps, nfe, fd, accuracy,
    diversity, seconds), ``reference`` (the same metrics for as many real training images,
    against the held-out reference set: the floor a perfect generator would reach), and ``samples`` ({"teacher-K"/"student-K": images (P, C, H, W)
    float32, one per prompt}) for grids.
    """
    from meanflow.train.loop import sample_student, sample_teacher

    evaluator = world.evaluator()
    prompts = world.eval_prompts()
    n = config.eval.samples_per_prompt
    all_prompts = [p for p in prompts for _ in range(n)]
    labels = torch.tensor([evaluator.label_of(p) for p in all_prompts])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(all_prompts), *world.latent_shape), generator=generator)
    guidance = config.method.guidance
    per_step = 2 if guidance.mode == "cfg" else 1
    shift = config.sample.shift
    runs = [("teacher", k, per_step * k, lambda p, z, k=k: sample_teacher(world, p, k, z, guidance, shift))
            for k in config.eval.teacher_steps]
    runs += [("student", k, k, lambda p, z, k=k: sample_student(student, world, p, k, z, shift))
             for k in config.eval.student_steps]
    reference = evaluator.reference_features()
    rows, samples = [], {}
    for model, steps, nfe, fn in runs:
        start = time.perf_counter()
        with sampling():
            latents = _batched(fn, all_prompts, noise, config.eval.batch_size)
        seconds = time.perf_counter() - start
        images = world.decode(latents)
        feats, logits = evaluator.features_and_logits(images)
        row = {"model": model, "steps": steps, "nfe": nfe,
               "fd": frechet_distance(feats, reference),
               "accuracy": prompt_accuracy(logits, labels),
               "diversity": diversity(feats, labels), "seconds": seconds}
        rows.append(row)
        samples[f"{model}-{steps}"] = images[::n][: len(prompts)]
        log(f"eval {model:7s} K={steps:<3d} FD {row['fd']:.3f}  accuracy {row['accuracy']:.3f}  "
            f"diversity {row['diversity']:.3f}  ({seconds:.1f} s)")
    real_feats, real_logits, real_labels = evaluator.real_sample(len(all_prompts))
    floor = {"fd": frechet_distance(real_feats, reference), "accuracy": prompt_accuracy(real_logits, real_labels),
             "diversity": diversity(real_feats, real_labels)}
    return {"rows": rows, "reference": floor, "samples": samples, "prompts": prompts,
            "samples_per_prompt": n}


def markdown_table(result: dict) -> str:
    """The evaluation rows as a markdown table (and the real-data floor as its last row)."""
    lines = ["| model | steps | network evaluations | Fréchet distance ↓ | prompt accuracy ↑ | diversity | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['model']} | {row['steps']} | {row['nfe']} | {row['fd']:.3f} | "
                     f"{row['accuracy']:.3f} | {row['diversity']:.3f} | {row['seconds']:.1f} |")
    ref = result["reference"]
    lines.append(f"| real images (floor) | – | – | {ref['fd']:.3f} | {ref['accuracy']:.3f} | "
                 f"{ref['diversity']:.3f} | – |")
    return "\n".join(lines)


def json_ready(result: dict) -> dict:
    """``result`` without the sample tensors (for JSON)."""
    return {k: v for k, v in result.items() if k != "samples"}

