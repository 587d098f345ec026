"""meanflow.digits.text: tokenizer, encoder, FLUX conditioning."""
import pytest
import torch

from meanflow.digits.prompts import DIGIT_NAMES, EVAL_TEMPLATES, TRAIN_TEMPLATES, prompt
from meanflow.digits.text import EOS, PAD, UNK, DigitsTextEncoder, WordTokenizer, encode_condition

torch.set_num_threads(1)


def test_tokenizer():
    tok = WordTokenizer()
    assert tok.vocab[:3] == [PAD, UNK, EOS]
    for t in TRAIN_TEMPLATES + EVAL_TEMPLATES:
        ids, mask = tok.encode([prompt(3, t)])
        assert not (ids == 1).any(), t  # every template word is in the vocabulary
    ids, mask = tok.encode(["Handwritten 7", "", "zebra seven"])
    assert ids.shape == (3, 12) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 1, 3]
    assert ids[0, 0] == tok.vocab.index("handwritten") and ids[0, 1] == tok.vocab.index("7")
    assert ids[0, 2] == 2 and ids[1, 0] == 2 and (ids[1, 1:] == 0).all()
    assert ids[2, 0] == 1  # unknown word
    long_ids, long_mask = tok.encode([" ".join(DIGIT_NAMES * 2)])
    assert long_mask.all() and long_ids[0, -1] == 2
    with pytest.raises(ValueError, match="prompts"):
        tok.encode("seven")


def test_encoder_shapes_and_determinism():
    torch.manual_seed(0)
    enc = DigitsTextEncoder().eval()
    h, p = enc(["a handwritten digit seven", ""])
    assert h.shape == (2, 12, 64) and p.shape == (2, 64) and h.dtype == torch.float32
    assert (h[1, 1:] == 0).all()  # padding states are zero
    torch.testing.assert_close(p[0], h[0, :5].mean(0))
    h2, p2 = enc(["a handwritten digit seven", ""])
    assert torch.equal(h, h2) and torch.equal(p, p2)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    enc = DigitsTextEncoder().eval()
    ids, mask = enc.tokenizer.encode(["the digit 4"])
    other = ids.clone()
    other[~mask] = torch.randint(3, len(enc.tokenizer), (int((~mask).sum()),))
    with torch.no_grad():
        h1, p1 = enc.forward_ids(ids, mask)
        h2, p2 = enc.forward_ids(other, mask)
        h3, p3 = enc.forward_ids(ids[:, :5], mask[:, :5])  # shorter padding
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(h1[:, :5], h3)
    torch.testing.assert_close(p1, p3)
    # but a real token does change the result
    h4, _ = enc(["the digit 5"])
    assert not torch.allclose(h1, h4)


def test_unknown_words_map_to_unk():
    torch.manual_seed(0)
    enc = DigitsTextEncoder().eval()
    a, _ = enc(["zebra seven"])
    b, _ = enc(["giraffe seven"])
    assert torch.equal(a, b)


def test_encode_condition_and_errors():
    enc = DigitsTextEncoder().eval()
    c = encode_condition(enc, ["seven", "8"], dtype=torch.float64)
    assert c.encoder_hidden_states.shape == (2, 12, 64) and c.encoder_hidden_states.dtype == torch.float64
    assert c.pooled_projections.shape == (2, 64)
    assert c.txt_ids.shape == (12, 3) and (c.txt_ids == 0).all()
    assert c.img_ids.shape == (16, 3)
    with pytest.raises(ValueError, match="text_encoder"):
        encode_condition(torch.nn.Linear(2, 2), ["x"])
    with pytest.raises(ValueError, match="mask"):
        enc.forward_ids(torch.zeros(1, 12, dtype=torch.int64), torch.zeros(1, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_heads"):
        DigitsTextEncoder(num_heads=3)
