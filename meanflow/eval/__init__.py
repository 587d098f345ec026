"""Evaluation: generic sample-quality metrics (:mod:`meanflow.eval.metrics`)."""
from meanflow.eval.metrics import diversity, frechet_distance, prompt_accuracy

__all__ = ["frechet_distance", "prompt_accuracy", "diversity"]
