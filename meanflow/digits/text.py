"""The digits world's text encoder: a word tokenizer and a small transformer the project
trains together with the teacher (no download).

:class:`DigitsTextEncoder` plays the role of FLUX's two text encoders at once: its token
states are the ``encoder_hidden_states`` (T5's role) and their masked mean is the
``pooled_projections`` (CLIP's role). :func:`encode_condition` builds the
:class:`~meanflow.models.flux_student.FluxCondition` a FLUX transformer takes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from meanflow.digits.data import image_ids
from meanflow.digits.prompts import DIGIT_NAMES, EVAL_TEMPLATES, NUMERALS, TRAIN_TEMPLATES, words

__all__ = ["PAD", "UNK", "EOS", "MAX_LENGTH", "WIDTH", "default_vocab", "WordTokenizer",
           "DigitsTextEncoder", "encode_condition"]

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
MAX_LENGTH = 12
WIDTH = 64


def default_vocab() -> list[str]:
    """[PAD], [UNK], [EOS], then every word of every template (train and held-out), digit
    name and numeral, sorted."""
    vocab = set(DIGIT_NAMES) | set(NUMERALS)
    for template in TRAIN_TEMPLATES + EVAL_TEMPLATES:
        vocab |= set(words(template.format(name=" ", num=" ")))
    return [PAD, UNK, EOS] + sorted(vocab)


class WordTokenizer:
    """Lowercase, split on non-alphanumerics, map words to ids ([UNK] for unknown ones), append
    [EOS], pad with [PAD] to ``max_length`` (longer prompts are cut to max_length − 1 words).

    Attributes:
        vocab: the word list; id i is ``vocab[i]``; [PAD], [UNK], [EOS] are ids 0, 1, 2.
        max_length: T, the fixed token count.
    """

    def __init__(self, vocab: Sequence[str] | None = None, max_length: int = MAX_LENGTH):
        vocab = default_vocab() if vocab is None else list(vocab)
        if vocab[:3] != [PAD, UNK, EOS] or len(set(vocab)) != len(vocab) \
                or not all(isinstance(w, str) for w in vocab):
            raise ValueError("vocab: expected distinct strings starting with [PAD], [UNK], [EOS]")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
        self.vocab = vocab
        self.max_length = max_length
        self._index = {w: i for i, w in enumerate(vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and their mask.

        Args:
            prompts: B strings ("" is the unconditional prompt: [EOS] alone).

        Returns:
            ids: (B, T) int64, T = max_length.
            mask: (B, T) bool, True on real tokens (words and [EOS]), False on padding.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) \
                or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts: expected a list of str")
        b, t = len(prompts), self.max_length
        ids = torch.zeros(b, t, dtype=torch.int64)
        mask = torch.zeros(b, t, dtype=torch.bool)
        unk, eos = self._index[UNK], self._index[EOS]
        for i, p in enumerate(prompts):
            toks = [self._index.get(w, unk) for w in words(p)][: t - 1] + [eos]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.int64)
            mask[i, : len(toks)] = True
        return ids, mask


class DigitsTextEncoder(nn.Module):
    """Embedding + learned positions + a 2-layer ``nn.TransformerEncoder`` (pre-norm, GELU, no
    dropout) + LayerNorm. Padding never changes the other tokens (key padding mask), and
    the hidden states at padded positions are set to zero.

    Attributes:
        tokenizer: the :class:`WordTokenizer`.
        config: the constructor's keyword arguments (``vocab`` included), JSON-serialisable.
    """

    def __init__(self, vocab: Sequence[str] | None = None, max_length: int = MAX_LENGTH,
                 width: int = WIDTH, num_layers: int = 2, num_heads: int = 4, ff_mult: int = 2):
        super().__init__()
        for name, v in (("width", width), ("num_layers", num_layers), ("num_heads", num_heads),
                        ("ff_mult", ff_mult)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if width % num_heads:
            raise ValueError(f"num_heads: must divide width {width}, got {num_heads}")
        self.tokenizer = WordTokenizer(vocab, max_length)
        self.config = {"vocab": list(self.tokenizer.vocab), "max_length": max_length, "width": width,
                       "num_layers": num_layers, "num_heads": num_heads, "ff_mult": ff_mult}
        self.width = width
        self.embed = nn.Embedding(len(self.tokenizer), width)
        self.pos = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, num_heads, dim_feedforward=ff_mult * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward_ids(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder on token ids.

        Args:
            ids: (B, T) int64 token ids, T ≤ max_length.
            mask: (B, T) bool, True on real tokens; at least one per row.

        Returns:
            hidden: (B, T, width) in the parameters' dtype, zero where ``mask`` is False.
            pooled: (B, width), the mean of ``hidden`` over the real tokens.
        """
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.int64 \
                or ids.shape[1] > self.tokenizer.max_length:
            raise ValueError(f"ids: expected a (B, T <= {self.tokenizer.max_length}) int64 tensor")
        if not isinstance(mask, Tensor) or mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor of shape {tuple(ids.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("mask: every row needs at least one real token")
        device = self.embed.weight.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        hidden = self.norm(x) * m
        pooled = hidden.sum(dim=1) / m.sum(dim=1)
        return hidden, pooled

    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encodes B prompts: hidden (B, T, width), pooled (B, width), as :meth:`forward_ids`."""
        ids, mask = self.tokenizer.encode(prompts)
        return self.forward_ids(ids, mask)


def encode_condition(text_encoder: DigitsTextEncoder, prompts: Sequence[str], device=None,
                     dtype: torch.dtype | None = None):
    """The FLUX conditioning of B prompts.

    Returns:
        a :class:`~meanflow.models.flux_student.FluxCondition` with encoder_hidden_states
        (B, T, 64), pooled_projections (B, 64) (in ``dtype``, default the encoder's), txt_ids
        zeros (T, 3) float32 and img_ids :func:`~meanflow.digits.data.image_ids` (16, 3)
        float32, all on ``device`` (default the encoder's). Gradients flow into the encoder
        unless called under ``torch.no_grad``.
    """
    from meanflow.models.flux_student import FluxCondition

    if not isinstance(text_encoder, DigitsTextEncoder):
        raise ValueError(f"text_encoder: expected a DigitsTextEncoder, got {type(text_encoder).__name__}")
    hidden, pooled = text_encoder(prompts)
    device = hidden.device if device is None else torch.device(device)
    dtype = hidden.dtype if dtype is None else dtype
    return FluxCondition(
        encoder_hidden_states=hidden.to(device=device, dtype=dtype),
        pooled_projections=pooled.to(device=device, dtype=dtype),
        txt_ids=torch.zeros(hidden.shape[1], 3, device=device),
        img_ids=image_ids().to(device),
    )
