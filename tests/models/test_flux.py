"""enable_jvp_attention on diffusers' FluxTransformer2DModel: plain forward, torch.func.jvp,
forward-AD dual tensors and the MeanFlow loss's gradients against the stock model run on
SDPA's math backend (the only stock backend with forward AD).

Tiny models (the config of diffusers' own FLUX tests, and one with 2 double + 2 single
blocks) so that the Triton cases, which run through the interpreter on CPU, stay at a few
seconds each.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

import meanflow.models.flux as flux  # noqa: E402
from meanflow.models.flux import (  # noqa: E402
    JVPFluxAttnProcessor,
    disable_jvp_attention,
    enable_jvp_attention,
    jvp_attention_enabled,
)
from meanflow.testing import FLUX_TEST_CONFIGS, TINY_FLUX_CONFIG, triton_param  # noqa: E402

# The module, not the function of the same name that meanflow.ops re-exports.
jvp_attention_module = importlib.import_module("meanflow.ops.jvp_attention")

CONFIGS = FLUX_TEST_CONFIGS
TINY = TINY_FLUX_CONFIG

# Relative to the largest magnitude of the expected tensor. float32: attention in a different
# summation order, through a handful of blocks; float64: the same, at double precision.
REL_TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _models(config: str, dtype: torch.dtype, *, always_jvp: bool = False):
    """(stock model, the same weights with enable_jvp_attention)."""
    torch.manual_seed(0)
    stock = FluxTransformer2DModel(**CONFIGS[config]).to(device=_device(), dtype=dtype)
    ours = copy.deepcopy(stock)
    enable_jvp_attention(ours, always_jvp=always_jvp)
    return stock, ours


def _inputs(dtype: torch.dtype, *, batch: int = 1, height: int = 3, width: int = 4, text: int = 5,
            seed: int = 1):
    """Model kwargs: hidden_states (B, H·W, 4), encoder_hidden_states (B, T, 32), pooled (B, 32),
    timestep (B,) in (0, 1), and the position ids of a FLUX pipeline (text 0, image (0, row, col))."""
    g = torch.Generator().manual_seed(seed)
    dev = _device()

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(dev)

    img_ids = torch.zeros(height, width, 3, dtype=dtype)
    img_ids[..., 1] = torch.arange(height, dtype=dtype)[:, None]
    img_ids[..., 2] = torch.arange(width, dtype=dtype)[None, :]
    return dict(
        hidden_states=randn(batch, height * width, 4),
        encoder_hidden_states=randn(batch, text, 32),
        pooled_projections=randn(batch, 32),
        timestep=torch.rand(batch, generator=g, dtype=dtype).to(dev),
        img_ids=img_ids.reshape(-1, 3).to(dev),
        txt_ids=torch.zeros(text, 3, dtype=dtype, device=dev),
    )


def _fn(model, inputs, **extra):
    """u(hidden_states, timestep) with the other inputs fixed: (B, S, 4)."""
    fixed = {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}

    def u(hidden_states, timestep):
        return model(hidden_states=hidden_states, timestep=timestep, **fixed, **extra).sample

    return u


def _tangents(inputs, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = inputs["hidden_states"]
    x_dot = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return x_dot, torch.ones_like(inputs["timestep"])


def _jvp(model, inputs, *, math_sdpa: bool = False, **extra):
    primals = (inputs["hidden_states"], inputs["timestep"])
    if math_sdpa:
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(_fn(model, inputs, **extra), primals, _tangents(inputs))
    return torch.func.jvp(_fn(model, inputs, **extra), primals, _tangents(inputs))


def _assert_close(actual, expected, dtype, what=""):
    scale = expected.detach().abs().max().item()
    tol = REL_TOL[dtype] * max(scale, 1.0)
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e} (max |expected| {scale:.3e})"


@pytest.fixture
def backend(request, monkeypatch):
    """Sets MEANFLOW_BACKEND and checks, after the test, that attention ran on that backend only."""
    monkeypatch.setenv("MEANFLOW_BACKEND", request.param)
    used = set()
    real = jvp_attention_module.implementation

    def spy(op, name):
        used.add(name)
        return real(op, name)

    monkeypatch.setattr(jvp_attention_module, "implementation", spy)
    yield request.param
    assert used == {request.param}, f"attention ran on {used or 'no backend'}, expected {request.param}"


# --------------------------------------------------------------------------------------------
# (a) plain forward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["tiny", "deep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_forward_is_the_stock_computation(config, dtype):
    stock, ours = _models(config, dtype)
    inputs = _inputs(dtype, batch=2)
    with torch.no_grad():
        expected = stock(**inputs).sample
        actual = ours(**inputs).sample
    # Without tangents the processor hands attention to diffusers' own dispatcher: bit for bit.
    assert torch.equal(actual, expected)
    assert all(isinstance(p, JVPFluxAttnProcessor) for p in ours.attn_processors.values())
    assert len(ours.attn_processors) == CONFIGS[config]["num_layers"] + CONFIGS[config]["num_single_layers"]


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("reference", torch.float32),
                                            triton_param(torch.float32)], indirect=["backend"])
def test_plain_forward_through_jvp_attention_matches_stock(backend, dtype):
    stock, ours = _models("tiny", dtype, always_jvp=True)
    inputs = _inputs(dtype, batch=2)
    with torch.no_grad():
        _assert_close(ours(**inputs).sample, stock(**inputs).sample, dtype, "output")


# --------------------------------------------------------------------------------------------
# (b) torch.func.jvp against the math SDPA path
# --------------------------------------------------------------------------------------------

def test_stock_model_has_no_forward_ad_without_the_math_backend():
    """Why the processor exists: on CPU SDPA picks a fused kernel with no forward-AD rule."""
    if torch.cuda.is_available():
        pytest.skip("the fused kernel picked on CUDA depends on the GPU")
    stock, _ = _models("tiny", torch.float32)
    with pytest.raises(NotImplementedError, match="forward AD"):
        _jvp(stock, _inputs(torch.float32))


@pytest.mark.parametrize("backend, dtype, config", [
    ("reference", torch.float64, "tiny"),
    ("reference", torch.float64, "deep"),
    ("reference", torch.float32, "deep"),
    triton_param(torch.float32, "tiny"),
    triton_param(torch.float32, "deep"),
], indirect=["backend"])
def test_jvp_matches_stock_math_sdpa(backend, dtype, config):
    stock, ours = _models(config, dtype)
    inputs = _inputs(dtype)
    expected_out, expected_tan = _jvp(stock, inputs, math_sdpa=True)
    out, tan = _jvp(ours, inputs)
    _assert_close(out, expected_out, dtype, "output")
    _assert_close(tan, expected_tan, dtype, "tangent")
    assert expected_tan.abs().max() > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), triton_param(torch.float32)],
                         indirect=["backend"])
def test_stock_model_under_jvp_attention_mode_matches_stock_math_sdpa(backend, dtype):
    """The stock model with its stock processors (no enable_jvp_attention) inside
    JVPAttentionMode: diffusers' own SDPA calls run jvp_attention, so torch.func.jvp works."""
    from meanflow.ops import JVPAttentionMode

    stock, _ = _models("deep", dtype)
    inputs = _inputs(dtype)
    expected_out, expected_tan = _jvp(stock, inputs, math_sdpa=True)
    with JVPAttentionMode():
        out, tan = _jvp(stock, inputs)
    _assert_close(out, expected_out, dtype, "output")
    _assert_close(tan, expected_tan, dtype, "tangent")
    assert expected_tan.abs().max() > 1e-3


@pytest.mark.parametrize("mask_kind", ["key_padding_bool", "additive_4d"])
def test_jvp_with_attention_mask(mask_kind, monkeypatch):
    """attention_mask reaches the processors through joint_attention_kwargs, as diffusers passes it."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    dtype = torch.float64
    stock, ours = _models("deep", dtype)
    inputs = _inputs(dtype, batch=2, text=5)
    n = inputs["encoder_hidden_states"].shape[1] + inputs["hidden_states"].shape[1]
    if mask_kind == "key_padding_bool":
        mask = torch.ones(2, n, dtype=torch.bool, device=_device())
        mask[0, 3:5] = False  # padding of the first prompt
        mask[1, 4] = False
    else:
        g = torch.Generator().manual_seed(5)
        mask = torch.randn(2, 1, n, n, generator=g, dtype=dtype).to(_device())
    kwargs = dict(joint_attention_kwargs={"attention_mask": mask})
    expected_out, expected_tan = _jvp(stock, inputs, math_sdpa=True, **kwargs)
    out, tan = _jvp(ours, inputs, **kwargs)
    _assert_close(out, expected_out, dtype, "output")
    _assert_close(tan, expected_tan, dtype, "tangent")
    # The mask matters: without it the result differs.
    unmasked, _ = _jvp(ours, inputs)
    assert (unmasked - out).abs().max() > 1e-6


def test_integer_mask_is_read_as_bool_on_the_plain_path_too(monkeypatch):
    """A tokenizer's 0/1 integer mask (which SDPA refuses) is read as bool on the plain forward,
    as under forward AD: one normalisation for both paths."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    dtype = torch.float64
    stock, ours = _models("tiny", dtype)
    inputs = _inputs(dtype, batch=2, text=5)
    mask = torch.ones(2, 5 + 12, dtype=torch.bool, device=_device())
    mask[0, 3:5] = False
    run = lambda model, m: _fn(model, inputs, joint_attention_kwargs={"attention_mask": m})(  # noqa: E731
        inputs["hidden_states"], inputs["timestep"])
    with torch.no_grad():
        expected = run(stock, mask)
        assert torch.equal(run(ours, mask.long()), expected)
        assert (run(ours, None) - expected).abs().max() > 1e-6
    out, _ = _jvp(ours, inputs, joint_attention_kwargs={"attention_mask": mask.long()})
    _assert_close(out, expected, dtype, "forward-AD path")


def test_jvp_with_fused_qkv_projections(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    dtype = torch.float64
    stock, ours = _models("tiny", dtype)
    stock.fuse_qkv_projections()
    ours.fuse_qkv_projections()
    inputs = _inputs(dtype)
    expected_out, expected_tan = _jvp(stock, inputs, math_sdpa=True)
    out, tan = _jvp(ours, inputs)
    _assert_close(out, expected_out, dtype, "output")
    _assert_close(tan, expected_tan, dtype, "tangent")


def test_forward_ad_dual_tensors_match_func_jvp(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    dtype = torch.float64
    stock, ours = _models("deep", dtype)
    inputs = _inputs(dtype)
    expected_out, expected_tan = _jvp(stock, inputs, math_sdpa=True)
    x_dot, t_dot = _tangents(inputs)
    with fwAD.dual_level():
        x = fwAD.make_dual(inputs["hidden_states"], x_dot)
        t = fwAD.make_dual(inputs["timestep"], t_dot)
        out, tan = fwAD.unpack_dual(_fn(ours, inputs)(x, t))
    _assert_close(out, expected_out, dtype, "output")
    _assert_close(tan, expected_tan, dtype, "tangent")


# --------------------------------------------------------------------------------------------
# (c) the MeanFlow loss pattern: gradients through the primal only
# --------------------------------------------------------------------------------------------

def _meanflow_grads(model, inputs, *, math_sdpa: bool = False):
    model.zero_grad(set_to_none=True)
    out, tan = _jvp(model, inputs, math_sdpa=math_sdpa)
    (out - tan.detach()).pow(2).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend, dtype, config", [
    ("reference", torch.float64, "deep"),
    ("reference", torch.float32, "tiny"),
    triton_param(torch.float32, "tiny"),
], indirect=["backend"])
def test_meanflow_loss_gradients_match_stock_math_sdpa(backend, dtype, config):
    stock, ours = _models(config, dtype)
    inputs = _inputs(dtype)
    expected = _meanflow_grads(stock, inputs, math_sdpa=True)
    actual = _meanflow_grads(ours, inputs)
    assert expected.keys() == actual.keys()
    missing = [name for name, g in actual.items() if g is None]
    assert not missing, f"parameters without a gradient: {missing}"
    for name, grad in actual.items():
        _assert_close(grad, expected[name], dtype, name)
    # The attention projections' gradients pass through jvp_attention's backward.
    assert any(expected[n].abs().max() > 1e-6 for n in expected if ".attn.to_q." in n)


# --------------------------------------------------------------------------------------------
# (d) the attention tangent is not recorded for backward
# --------------------------------------------------------------------------------------------

def test_attention_tangent_has_no_grad_fn(monkeypatch):
    """Every attention call gets tangents and returns a tangent with no autograd history,
    while its output stays differentiable. (The tangent of the whole model does carry history
    when parameters require grad: the linear layers' tangents are plain torch ops.)"""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    records = []
    real = flux.jvp_attention

    def recording(query, key, value, **kwargs):
        out = real(query, key, value, **kwargs)
        primal, tangent = fwAD.unpack_dual(out)
        records.append((primal.requires_grad, tangent))
        return out

    monkeypatch.setattr(flux, "jvp_attention", recording)
    dtype = torch.float64
    _, ours = _models("deep", dtype)
    inputs = _inputs(dtype)
    x_dot, t_dot = _tangents(inputs)
    with fwAD.dual_level():
        x = fwAD.make_dual(inputs["hidden_states"], x_dot)
        t = fwAD.make_dual(inputs["timestep"], t_dot)
        _fn(ours, inputs)(x, t)
    assert len(records) == len(ours.attn_processors)
    for primal_requires_grad, tangent in records:
        assert primal_requires_grad
        assert tangent is not None
        assert tangent.grad_fn is None and not tangent.requires_grad

    # Under torch.func.jvp as well, and the model tangent is detached once parameters are frozen.
    records.clear()
    ours.requires_grad_(False)
    _, tan = _jvp(ours, inputs)
    assert len(records) == len(ours.attn_processors)
    assert all(tangent is not None and tangent.grad_fn is None for _, tangent in records)
    assert tan.grad_fn is None


# --------------------------------------------------------------------------------------------
# (e) arguments, and putting the stock processors back
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.ReLU()), "model", None])
def test_rejects_what_is_not_a_flux_transformer(bad):
    with pytest.raises(ValueError, match="transformer"):
        enable_jvp_attention(bad)


def test_rejects_a_processor_it_cannot_stand_in_for():
    class IPAdapterLikeProcessor:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            raise AssertionError("not called")

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY)
    model.transformer_blocks[0].attn.set_processor(IPAdapterLikeProcessor())
    with pytest.raises(ValueError, match="transformer.*transformer_blocks.0.attn"):
        enable_jvp_attention(model)


def test_rejects_a_bad_previous():
    _, model = _models("tiny", torch.float32)
    with pytest.raises(ValueError, match="previous"):
        disable_jvp_attention(model, ["not", "a", "dict"])
    with pytest.raises(ValueError, match="previous"):
        disable_jvp_attention(model, {"blocks.7.attn.processor": JVPFluxAttnProcessor()})


def test_always_jvp_must_be_bool():
    with pytest.raises(ValueError, match="always_jvp"):
        JVPFluxAttnProcessor(always_jvp="yes")


def test_disable_and_context_manager_restore_the_processors():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY)
    original = dict(model.attn_processors)

    previous = enable_jvp_attention(model)
    assert previous.keys() == original.keys()
    assert all(previous[k] is original[k] for k in original)
    disable_jvp_attention(model, previous)
    assert all(model.attn_processors[k] is original[k] for k in original)

    with jvp_attention_enabled(model) as prev:
        assert all(prev[k] is original[k] for k in original)
        assert all(isinstance(p, JVPFluxAttnProcessor) for p in model.attn_processors.values())
    assert all(model.attn_processors[k] is original[k] for k in original)

    # diffusers' own setter takes the returned dict as well.
    model.set_attn_processor(enable_jvp_attention(model))
    assert all(model.attn_processors[k] is original[k] for k in original)


def test_keeps_the_configured_diffusers_attention_backend():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY)
    for processor in model.attn_processors.values():
        processor._attention_backend = "native"
    enable_jvp_attention(model)
    assert all(p._attention_backend == "native" for p in model.attn_processors.values())
