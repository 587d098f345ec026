"""Builds the digits world's shipped assets: ``python -m meanflow.digits.build``.

Trains the classifier and the teacher (seeded), writes ``classifier.safetensors``,
``teacher.safetensors`` and ``build.json`` (settings, times, classifier accuracy, and the
teacher's quality on the test split) into ``--out`` (default: the package's ``assets/``).

Teacher quality: 300 samples, one per test image, prompted with the image's label in the
held-out :data:`~meanflow.digits.prompts.EVAL_TEMPLATES` (cycled); Euler sampling with K = 1,
2, 4, 32 steps, true CFG scales w (1 = no guidance). Per setting: the Fréchet distance (FD)
between the classifier features of the samples and of the test images, prompt accuracy and
diversity (:mod:`meanflow.eval.metrics`). References: FD train vs test images, diversity of
the test images. ``default_cfg_scale``: the scale with the lowest 32-step FD among those whose
32-step prompt accuracy is within 2 points of the best.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from meanflow.digits._io import ASSETS
from meanflow.digits.classifier import save_classifier, train_classifier
from meanflow.digits.data import load_split
from meanflow.digits.prompts import EVAL_TEMPLATES, prompt
from meanflow.digits.teacher import TEACHER_CONFIG, load_teacher, sample_teacher, save_teacher, train_teacher
from meanflow.eval.metrics import diversity, frechet_distance, prompt_accuracy

__all__ = ["evaluate_teacher", "build", "main", "CFG_SCALES", "EVAL_STEPS"]

CFG_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
EVAL_STEPS = (1, 2, 4, 32)


@torch.no_grad()
def evaluate_teacher(teacher, text_encoder, classifier, steps=EVAL_STEPS, cfg_scales=CFG_SCALES,
                     seed: int = 0) -> dict:
    """The teacher's quality on the test split (see the module docstring).

    Returns:
        {"reference": {...}, "samples": [{"steps", "cfg_scale", "fd", "prompt_accuracy",
        "diversity"}, ...], "default_cfg_scale": w}.
    """
    x_test, y_test = load_split("test")
    x_train, _ = load_split("train")
    f_test = classifier.features(x_test)
    reference = {"fd_train_vs_test": frechet_distance(classifier.features(x_train), f_test),
                 "test_diversity": diversity(f_test, y_test),
                 "test_prompt_accuracy": prompt_accuracy(classifier(x_test), y_test),
                 "n": len(y_test), "templates": list(EVAL_TEMPLATES)}
    prompts = [prompt(int(y), EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)]) for i, y in enumerate(y_test)]
    noise = torch.randn(len(prompts), 16, 4, generator=torch.Generator().manual_seed(seed))
    rows = []
    for k in steps:
        for w in cfg_scales:
            x = sample_teacher(teacher, text_encoder, prompts, k, w, noise=noise)
            feats = classifier.features(x)
            rows.append({"steps": k, "cfg_scale": w, "fd": frechet_distance(feats, f_test),
                         "prompt_accuracy": prompt_accuracy(classifier.head(feats), y_test),
                         "diversity": diversity(feats, y_test)})
    last = [r for r in rows if r["steps"] == max(steps)]
    best_acc = max(r["prompt_accuracy"] for r in last)
    ok = [r for r in last if r["prompt_accuracy"] >= best_acc - 0.02]
    default = min(ok, key=lambda r: r["fd"])["cfg_scale"]
    return {"reference": reference, "samples": rows, "default_cfg_scale": default}


def build(out: str | os.PathLike = ASSETS, teacher_steps: int = 1200, seed: int = 0,
          classifier_epochs: int = 20, verbose: bool = True) -> dict:
    """Trains both models, writes the three files into ``out`` and returns build.json's dict."""
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    classifier, cinfo = train_classifier(seed, epochs=classifier_epochs)
    if verbose:
        print(f"classifier: test accuracy {cinfo['test_accuracy']:.4f} ({cinfo['train_seconds']:.0f} s)",
              flush=True)
    save_classifier(os.path.join(out, "classifier.safetensors"), classifier)
    transformer, text_encoder, tinfo = train_teacher(teacher_steps, seed, verbose=verbose)
    path = os.path.join(out, "teacher.safetensors")
    save_teacher(path, transformer, text_encoder)
    teacher, text_encoder = load_teacher(path)  # evaluate exactly what is shipped
    t0 = time.perf_counter()
    quality = evaluate_teacher(teacher, text_encoder, classifier, seed=seed)
    report = {
        "seed": seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "classifier": cinfo, "teacher": {**tinfo, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                             for k, v in TEACHER_CONFIG.items()}},
        "teacher_quality": quality, "default_cfg_scale": quality["default_cfg_scale"],
        "eval_seconds": time.perf_counter() - t0, "build_seconds": time.perf_counter() - start,
    }
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump(report, f, indent=2)
    if verbose:
        for r in quality["samples"]:
            print(f"K={r['steps']:2d} w={r['cfg_scale']:.1f}  FD {r['fd']:8.3f}  acc {r['prompt_accuracy']:.3f}  "
                  f"div {r['diversity']:.3f}")
        print(f"reference: {quality['reference']}; default cfg {quality['default_cfg_scale']}; "
              f"build {report['build_seconds']:.0f} s", flush=True)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meanflow.digits.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=ASSETS, help="output directory (default: the package's assets/)")
    parser.add_argument("--teacher-steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.teacher_steps < 1:
        parser.error("--teacher-steps: expected a positive int")
    torch.set_num_threads(args.threads)
    build(args.out, args.teacher_steps, args.seed)


if __name__ == "__main__":
    main()
