"""meanflow.digits.classifier: the shipped classifier and the architecture."""
import pytest
import torch

from meanflow.digits.classifier import DigitsClassifier, evaluate_classifier, load_classifier, save_classifier

torch.set_num_threads(1)


def test_shipped_classifier_accuracy():
    clf = load_classifier()
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    assert evaluate_classifier(clf, "test") >= 0.95


def test_shapes_and_round_trip(tmp_path):
    clf = DigitsClassifier().eval()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert clf.features(x).shape == (3, 64) and clf(x).shape == (3, 10)
    save_classifier(tmp_path / "c.safetensors", clf)
    back = load_classifier(tmp_path / "c.safetensors")
    assert torch.equal(back(x), clf(x))
    with pytest.raises(ValueError, match="images"):
        clf(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="path"):
        load_classifier(tmp_path / "missing.safetensors")
