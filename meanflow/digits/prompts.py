"""The prompt language of the digits world.

A prompt names one digit, by its English name ("seven") or its numeral ("7"), inside a
template. :data:`TRAIN_TEMPLATES` are what the teacher is trained on; :data:`EVAL_TEMPLATES`
are held-out paraphrases (never seen in training) that show whether a model generalises
beyond the training phrasings. The unconditional prompt is ``""``.

A template is a format string with ``{name}`` (the digit's name) or ``{num}`` (its numeral).
"""
from __future__ import annotations

import operator
import os
import re

__all__ = ["DIGIT_NAMES", "NUMERALS", "TRAIN_TEMPLATES", "EVAL_TEMPLATES", "UNCONDITIONAL",
           "PROMPTS_PATH", "prompt", "label_of", "words", "default_prompts", "read_prompts"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(d) for d in range(10))
UNCONDITIONAL = ""

TRAIN_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {num} written by hand",
    "handwritten {num}",
    "a scanned digit {name}",
    "an image of the number {name}",
    "the digit {num}",
    "a photo of a handwritten {num}",
    "{name}",
    "a small gray picture of {name}",
)

EVAL_TEMPLATES = (
    "a sketch of the numeral {name}",
    "the numeral {num} drawn in ink",
    "a picture of the digit {num}",
)

PROMPTS_PATH = os.path.join(os.path.dirname(__file__), "assets", "prompts.txt")

_WORD = re.compile(r"[a-z0-9]+")
_LABEL_OF_WORD = {**{w: d for d, w in enumerate(DIGIT_NAMES)}, **{w: d for d, w in enumerate(NUMERALS)}}


def words(text: str) -> list[str]:
    """The words of ``text``: lowercased, split on anything not a-z or 0-9."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def _check_label(label) -> int:
    """``label`` as an int in 0..9 (Python, numpy or 0-d torch integers), else ValueError."""
    try:
        value = operator.index(label)
    except TypeError:
        value = None
    if isinstance(label, bool) or value is None or not 0 <= value <= 9:
        raise ValueError(f"label: expected an int in 0..9, got {label!r}")
    return value


def prompt(label: int, template: str) -> str:
    """The prompt of ``template`` for digit ``label`` (0..9), e.g. ``prompt(7, "handwritten
    {num}") == "handwritten 7"``."""
    label = _check_label(label)
    if not isinstance(template, str) or ("{name}" not in template and "{num}" not in template):
        raise ValueError(f"template: expected a str containing {{name}} or {{num}}, got {template!r}")
    return template.format(name=DIGIT_NAMES[label], num=NUMERALS[label])


def label_of(text: str) -> int | None:
    """Which digit ``text`` asks for: the one digit named (by name or numeral) in it, or None
    if it names none or several different ones."""
    found = {_LABEL_OF_WORD[w] for w in words(text) if w in _LABEL_OF_WORD}
    return found.pop() if len(found) == 1 else None


def default_prompts() -> list[str]:
    """One held-out prompt per digit, 0..9, cycling through :data:`EVAL_TEMPLATES`."""
    return [prompt(d, EVAL_TEMPLATES[d % len(EVAL_TEMPLATES)]) for d in range(10)]


def read_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """The prompts of a text file, one per line (blank lines and ``#`` comments skipped);
    default: the shipped ``assets/prompts.txt``."""
    path = PROMPTS_PATH if path is None else path
    if not os.path.isfile(path):
        raise ValueError(f"path: no prompt file at {str(path)!r}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]
