"""LoRA adapters for the fake velocity network (``meanflow.models.lora``): exact at the start,
the update is (α/r)·B·A, only the factors train, and the adapted FLUX velocity equals the
teacher until it is trained."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from meanflow.models.lora import LoRALinear, add_lora_to_flux_blocks, lora_parameters


def _linear(seed=0, n_in=7, n_out=5, dtype=torch.float64, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype)


def test_starts_equal_to_the_base_and_computes_the_low_rank_update():
    base = _linear()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    expected = base(x)
    layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=3.0)
    assert torch.equal(layer(x), expected)  # B = 0: the adapted layer is the teacher's
    with torch.no_grad():
        layer.lora_up.normal_()
    a, b = layer.lora_down, layer.lora_up
    update = (x @ a.T @ b.T) * 1.5
    torch.testing.assert_close(layer(x), expected + update, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nn.functional.linear(x, layer.merged_weight(), base.bias), layer(x),
                               rtol=1e-12, atol=1e-12)
    assert (layer.in_features, layer.out_features, layer.scaling) == (7, 5, 1.5)


def test_only_the_factors_receive_gradients():
    layer = LoRALinear(_linear(), rank=3, alpha=3)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    layer(torch.randn(4, 7, dtype=torch.float64)).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    # B starts at zero, so A's first gradient is zero too; B's is not.
    assert layer.lora_up.grad.abs().sum() > 0 and layer.lora_down.grad is not None
    assert lora_parameters(layer) == [layer.lora_down, layer.lora_up]


def test_float32_factors_over_a_16_bit_base():
    layer = LoRALinear(_linear(dtype=torch.bfloat16), rank=2, alpha=2)
    assert layer.lora_down.dtype == layer.lora_up.dtype == torch.float32
    y = layer(torch.randn(2, 7, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, key", [
    ({"rank": 0, "alpha": 1}, "rank"), ({"rank": 1.5, "alpha": 1}, "rank"),
    ({"rank": True, "alpha": 1}, "rank"), ({"rank": 6, "alpha": 1}, "rank"),
    ({"rank": 2, "alpha": 0}, "alpha"), ({"rank": 2, "alpha": float("nan")}, "alpha"),
])
def test_bad_arguments_are_refused_by_name(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}"):
        LoRALinear(_linear(), **kwargs)
    with pytest.raises(ValueError, match="^base"):
        LoRALinear(nn.Conv1d(2, 2, 1), rank=1, alpha=1)


def test_adapted_flux_velocity_equals_the_teacher_until_trained():
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    from meanflow.models.flux_student import FluxCondition, FluxTeacher, FluxVelocity
    from meanflow.testing import FLUX_TEST_CONFIGS

    torch.manual_seed(0)
    stock = FluxTransformer2DModel(**FLUX_TEST_CONFIGS["deep"]).to(torch.float64)
    teacher = FluxTeacher(stock)
    fake = FluxVelocity(copy.deepcopy(stock))
    names = add_lora_to_flux_blocks(fake.transformer, rank=2, alpha=4)
    blocks = (stock.transformer_blocks, stock.single_transformer_blocks)
    linears_in_blocks = sum(type(m) is nn.Linear for block_list in blocks for m in block_list.modules())
    assert len(names) == linears_in_blocks > 0
    trainable = [p for p in fake.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for q in lora_parameters(fake)) for p in trainable)
    adapters = [m for m in fake.modules() if isinstance(m, LoRALinear)]
    assert sum(p.numel() for p in trainable) == sum(2 * (m.in_features + m.out_features) for m in adapters)

    g = torch.Generator().manual_seed(1)
    h, w, text = 3, 4, 5
    grid = torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    img_ids = torch.stack(grid, -1)
    cond = FluxCondition(encoder_hidden_states=torch.randn(2, text, 32, generator=g, dtype=torch.float64),
                         pooled_projections=torch.randn(2, 32, generator=g, dtype=torch.float64),
                         txt_ids=torch.zeros(text, 3, dtype=torch.float64),
                         img_ids=img_ids.reshape(-1, 3).to(torch.float64))
    z = torch.randn(2, h * w, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    expected = teacher.velocity(z, t, cond)
    assert torch.equal(fake(z, t, cond), expected)
    # One optimizer step on the factors moves the output; the frozen copy stays the teacher's.
    optimizer = torch.optim.SGD(trainable, lr=1e-2)
    for _ in range(2):  # the first step only moves B (A's gradient is zero while B is)
        optimizer.zero_grad()
        fake(z, t, cond).square().mean().backward()
        optimizer.step()
    assert not torch.allclose(fake(z, t, cond), expected)
    base = {n.replace(".base.", "."): p for n, p in fake.transformer.named_parameters()
            if "lora_" not in n}
    assert all(torch.equal(base[n], p) for n, p in stock.named_parameters())


def _stock_flux(config="deep", dtype=torch.float64):
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    from meanflow.testing import FLUX_TEST_CONFIGS

    torch.manual_seed(0)
    return FluxTransformer2DModel(**FLUX_TEST_CONFIGS[config]).to(dtype)


def test_a_refused_rank_leaves_the_transformer_untouched():
    transformer = _stock_flux()
    narrowest = min(min(m.in_features, m.out_features) for m in transformer.transformer_blocks.modules()
                    if type(m) is nn.Linear)
    with pytest.raises(ValueError, match="^rank"):
        add_lora_to_flux_blocks(transformer, narrowest + 1, 1.0)
    assert all(p.requires_grad for p in transformer.parameters())
    assert not any(isinstance(m, LoRALinear) for m in transformer.modules())


def test_adapters_are_added_once():
    transformer = _stock_flux()
    add_lora_to_flux_blocks(transformer, 2, 2.0)
    before = [type(m) for m in transformer.modules()]
    with pytest.raises(ValueError, match="already carries adapters"):
        add_lora_to_flux_blocks(transformer, 2, 2.0)
    assert [type(m) for m in transformer.modules()] == before


def test_fused_projections_adapt_the_fused_layers_only_and_fusing_after_adapters_is_refused():
    from meanflow.models.flux import FUSED_PROJECTIONS

    transformer = _stock_flux()
    transformer.fuse_qkv_projections()
    names = add_lora_to_flux_blocks(transformer, 2, 2.0)
    assert "transformer_blocks.0.attn.to_qkv" in names and "transformer_blocks.0.attn.to_added_qkv" in names
    assert "single_transformer_blocks.0.attn.to_qkv" in names
    unread = {part for parts in FUSED_PROJECTIONS.values() for part in parts}
    assert not [n for n in names if n.rpartition(".")[2] in unread]

    layer = LoRALinear(_linear(), rank=2, alpha=2)
    assert not hasattr(layer, "weight")
    other = _stock_flux()
    add_lora_to_flux_blocks(other, 2, 2.0)
    with pytest.raises(AttributeError, match="before adding adapters"):
        other.fuse_qkv_projections()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merging_into_16_bit_weights_warns_when_rounding_drops_the_update(dtype):
    import warnings

    from meanflow.models.lora import lora_scalings, merge_lora_state_dict

    torch.manual_seed(0)
    base = nn.Linear(64, 64, dtype=dtype)
    layer = LoRALinear(base, rank=2, alpha=2)
    with torch.no_grad():  # an update far below bf16's rounding step of weights ~0.1
        layer.lora_up.normal_(std=1e-5)
    holder = nn.Sequential(layer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_lora_state_dict(holder.state_dict(), lora_scalings(holder))
    lost = [w for w in caught if "lost more than" in str(w.message)]
    assert len(lost) == (1 if dtype == torch.bfloat16 else 0)
    torch.testing.assert_close(merged["0.weight"].double(), layer.merged_weight().double())
