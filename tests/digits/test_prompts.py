"""meanflow.digits.prompts: the prompt language and its parser."""
import pytest

from meanflow.digits.prompts import (DIGIT_NAMES, EVAL_TEMPLATES, TRAIN_TEMPLATES, default_prompts,
                                     label_of, prompt, read_prompts, words)


@pytest.mark.parametrize("template", TRAIN_TEMPLATES + EVAL_TEMPLATES)
def test_label_of_every_template_and_digit(template):
    for d in range(10):
        assert label_of(prompt(d, template)) == d


def test_held_out_templates_are_new():
    assert len(TRAIN_TEMPLATES) >= 8 and len(EVAL_TEMPLATES) >= 2
    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    train_prompts = {prompt(d, t) for d in range(10) for t in TRAIN_TEMPLATES}
    assert not train_prompts & {prompt(d, t) for d in range(10) for t in EVAL_TEMPLATES}


def test_examples_and_garbage():
    assert prompt(7, "handwritten {num}") == "handwritten 7"
    assert label_of("A Handwritten Digit SEVEN!") == 7
    assert label_of("the number 7 written by hand") == 7
    assert label_of("") is None
    assert label_of("a cat on a mat") is None
    assert label_of("seventeen") is None
    assert label_of("one and two") is None
    assert label_of("7 seven") == 7
    assert words("a-b_c 7") == ["a", "b", "c", "7"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="label"):
        prompt(10, TRAIN_TEMPLATES[0])
    with pytest.raises(ValueError, match="label"):
        prompt(True, TRAIN_TEMPLATES[0])
    with pytest.raises(ValueError, match="template"):
        prompt(3, "no placeholder")


def test_default_prompts_and_shipped_file():
    ps = default_prompts()
    assert [label_of(p) for p in ps] == list(range(10))
    assert read_prompts() == ps
    assert DIGIT_NAMES[0] == "zero"
