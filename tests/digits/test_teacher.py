"""meanflow.digits.teacher: the shipped teacher follows its prompts; save/load is exact."""
import pytest
import torch

from meanflow.digits.classifier import load_classifier
from meanflow.digits.prompts import EVAL_TEMPLATES, TRAIN_TEMPLATES, prompt
from meanflow.digits.teacher import TEACHER_CONFIG, load_teacher, sample_teacher, save_teacher
from meanflow.models.flux_student import FluxTeacher

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shipped():
    return load_teacher()


def test_shipped_teacher_is_small_frozen_flux(shipped):
    teacher, text_encoder = shipped
    assert isinstance(teacher, FluxTeacher)
    n = sum(p.numel() for p in teacher.parameters()) + sum(p.numel() for p in text_encoder.parameters())
    assert n < 2_000_000
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(p.requires_grad for p in text_encoder.parameters())
    assert not text_encoder.training
    assert teacher.transformer.config.in_channels == TEACHER_CONFIG["in_channels"]


@pytest.mark.parametrize("templates", [TRAIN_TEMPLATES, EVAL_TEMPLATES], ids=["train", "held-out"])
def test_samples_follow_the_prompt(shipped, templates):
    teacher, text_encoder = shipped
    labels = torch.arange(40) % 10
    prompts = [prompt(int(d), templates[i % len(templates)]) for i, d in enumerate(labels)]
    x = sample_teacher(teacher, text_encoder, prompts, steps=8, cfg_scale=2.0,
                       generator=torch.Generator().manual_seed(0))
    assert x.shape == (40, 1, 8, 8) and x.dtype == torch.float32
    acc = (load_classifier()(x).argmax(1) == labels).float().mean().item()
    assert acc >= 0.7, acc


def test_sampling_is_deterministic_and_checks_arguments(shipped):
    teacher, text_encoder = shipped
    a = sample_teacher(teacher, text_encoder, ["seven"], 2, 2.0, generator=torch.Generator().manual_seed(3))
    b = sample_teacher(teacher, text_encoder, ["seven"], 2, 2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="steps"):
        sample_teacher(teacher, text_encoder, ["seven"], 0)
    with pytest.raises(ValueError, match="noise"):
        sample_teacher(teacher, text_encoder, ["seven"], 1, noise=torch.zeros(2, 16, 4))


def test_save_load_round_trip_bit_exact(shipped, tmp_path):
    teacher, text_encoder = shipped
    path = tmp_path / "t.safetensors"
    save_teacher(path, teacher.transformer, text_encoder)
    teacher2, text_encoder2 = load_teacher(path)
    for (k, v), (k2, v2) in zip(teacher.transformer.state_dict().items(), teacher2.transformer.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    for (k, v), (k2, v2) in zip(text_encoder.state_dict().items(), text_encoder2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert text_encoder2.tokenizer.vocab == text_encoder.tokenizer.vocab
    noise = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    x1 = sample_teacher(teacher, text_encoder, ["3", "nine"], 2, 2.0, noise=noise)
    x2 = sample_teacher(teacher2, text_encoder2, ["3", "nine"], 2, 2.0, noise=noise)
    assert torch.equal(x1, x2)
    with pytest.raises(ValueError, match="path"):
        load_teacher(tmp_path / "missing.safetensors")
