"""The digits world: a small FLUX-architecture text-to-image teacher on scikit-learn's bundled
8×8 digits, conditioned on real text prompts, that the default preset distills on a CPU.

- :mod:`~meanflow.digits.data`: the split, FLUX 2×2 packing (the identity "VAE"), ids, images.
- :mod:`~meanflow.digits.prompts`: the prompt language (train and held-out templates).
- :mod:`~meanflow.digits.text`: the word tokenizer and the small trained text encoder.
- :mod:`~meanflow.digits.teacher`: the teacher's config, training, saving, loading, sampling.
- :mod:`~meanflow.digits.classifier`: the CNN whose features and logits the metrics use.
- :mod:`~meanflow.digits.build`: ``python -m meanflow.digits.build`` writes the shipped assets.
"""
from meanflow.digits.classifier import (CLASSIFIER_PATH, DigitsClassifier, evaluate_classifier,
                                        load_classifier, save_classifier, train_classifier)
from meanflow.digits.data import grid_image, image_ids, load_split, pack, to_uint8, unpack
from meanflow.digits.prompts import (DIGIT_NAMES, EVAL_TEMPLATES, NUMERALS, PROMPTS_PATH, TRAIN_TEMPLATES,
                                     UNCONDITIONAL, default_prompts, label_of, prompt, read_prompts)
from meanflow.digits.teacher import (TEACHER_CONFIG, TEACHER_PATH, guided_velocity, load_teacher,
                                     sample_teacher, save_teacher, train_teacher)
from meanflow.digits.text import DigitsTextEncoder, WordTokenizer, encode_condition

__all__ = [
    "load_split", "pack", "unpack", "image_ids", "to_uint8", "grid_image",
    "DIGIT_NAMES", "NUMERALS", "TRAIN_TEMPLATES", "EVAL_TEMPLATES", "UNCONDITIONAL", "PROMPTS_PATH",
    "prompt", "label_of", "default_prompts", "read_prompts",
    "WordTokenizer", "DigitsTextEncoder", "encode_condition",
    "TEACHER_CONFIG", "TEACHER_PATH", "train_teacher", "save_teacher", "load_teacher", "guided_velocity",
    "sample_teacher",
    "DigitsClassifier", "train_classifier", "evaluate_classifier", "save_classifier", "load_classifier",
    "CLASSIFIER_PATH",
]
