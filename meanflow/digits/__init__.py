"""The digits world: the embedded default that ``meanflow distill`` distills on a CPU.

A small FLUX-architecture text-to-image teacher (diffusers ``FluxTransformer2DModel``) trained by
the project on scikit-learn's bundled digits, conditioned on real prompts through a small text
encoder the project trains with it; a digits classifier for the metrics.

- :mod:`.data`: the train / test split, 2×2 packing into 16 tokens × 4 channels, PNG grids;
- :mod:`.prompts`: the prompt language (templates, held-out paraphrases, ``label_of``);
- :mod:`.text`: the word tokenizer and :class:`DigitsTextEncoder`, ``encode_condition``;
- :mod:`.teacher`: training, saving and loading the teacher (shipped in ``assets/``);
- :mod:`.classifier`: the classifier whose features the metrics use (shipped in ``assets/``).
"""
from .classifier import DigitsClassifier, load_classifier, save_classifier, train_classifier
from .data import grid_image, image_ids, load_split, pack, to_uint8, unpack
from .prompts import (DIGIT_NAMES, EVAL_TEMPLATES, TRAIN_TEMPLATES, UNCONDITIONAL, default_prompts, label_of,
                      prompt, read_prompts)
from .teacher import TEACHER_CONFIG, load_teacher, sample_teacher, save_teacher, train_teacher
from .text import DigitsTextEncoder, WordTokenizer, encode_condition

__all__ = [
    "DigitsClassifier", "load_classifier", "save_classifier", "train_classifier",
    "grid_image", "image_ids", "load_split", "pack", "to_uint8", "unpack",
    "DIGIT_NAMES", "EVAL_TEMPLATES", "TRAIN_TEMPLATES", "UNCONDITIONAL", "default_prompts", "label_of",
    "prompt", "read_prompts",
    "TEACHER_CONFIG", "load_teacher", "sample_teacher", "save_teacher", "train_teacher",
    "DigitsTextEncoder", "WordTokenizer", "encode_condition",
]
