"""meanflow.train.ema: the EMA formula, warm-up, copy_to and an exact state round trip."""
import pytest
import torch

from meanflow.train.ema import EMA

torch.set_num_threads(1)


def _toy(dtype=torch.float32):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(dtype)
    return model


def test_update_math():
    model = _toy()
    ema = EMA(model, decay=0.9)
    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model)
    for name, p in model.named_parameters():
        assert torch.allclose(ema.params[name], 0.9 * p0[name] + 0.1 * p.detach(), atol=1e-6)
    assert torch.equal(ema.buffers["1.running_mean"], torch.full((2,), 5.0))
    assert ema.num_updates == 1


def test_warmup_decay():
    ema = EMA(_toy(), decay=0.999, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(_toy())
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert EMA(_toy(), decay=0.5, warmup=True).current_decay() == pytest.approx(0.1)
    ema.num_updates = 10 ** 6
    assert ema.current_decay() == 0.999


def test_bf16_module_fp32_shadow_and_copy_to():
    model = _toy(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    assert all(v.dtype == torch.float32 for v in ema.params.values())
    target = _toy(torch.bfloat16)
    ema.copy_to(target)
    for (_, a), (_, b) in zip(model.state_dict().items(), target.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_state_round_trip_exact():
    model = _toy()
    ema = EMA(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    other = EMA(_toy(), decay=0.99)
    other.load_state_dict(state)
    assert other.num_updates == 3
    for k, v in ema.state_dict().items():
        assert torch.equal(other.state_dict()[k], v) and other.state_dict()[k].dtype == v.dtype
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"num_updates": torch.tensor(1)})
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_frozen_parameters_are_not_averaged():
    """Frozen parameters (the weights under adapters) never move: the EMA keeps no shadow of them
    and copy_to leaves them as they are."""
    model = _toy()
    model[0].weight.requires_grad_(False)
    ema = EMA(model, decay=0.5)
    assert set(ema.params) == {"0.bias", "1.weight", "1.bias"}
    frozen = model[0].weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    ema.copy_to(model)
    assert torch.equal(model[0].weight, frozen + 1.0)
    model[0].weight.requires_grad_(True)  # a different set of trainable parameters is refused
    with pytest.raises(ValueError, match="trainable parameter names differ"):
        ema.update(model)
