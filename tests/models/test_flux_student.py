"""FluxStudent / FluxTeacher on diffusers' FluxTransformer2DModel, against the stock model.

- the student's primal is diffusers' forward at r = t (bit for bit through ``student(...)``, to
  float rounding through the pair-mode ``forward_with_tangent``);
- ``forward_with_tangent`` equals ``torch.func.jvp`` of the stock model (math SDPA) through z and
  t, and ``torch.func.jvp`` of the student itself through z, r and t;
- a MeanFlow-style loss gives the stock path's gradients; checkpointing gives the same gradients
  and recomputes only the primal;
- save / load, bf16 autocast, validation.

Tiny models (the config of diffusers' own FLUX tests, and one with 2 double + 2 single blocks),
one thread: the whole file runs in well under a minute and a half on a loaded 2-core machine.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402

from meanflow import ops  # noqa: E402
from meanflow.models.flux import JVPFluxAttnProcessor  # noqa: E402
from meanflow.models.flux_student import FluxCondition, FluxStudent, FluxTeacher  # noqa: E402
from meanflow.testing import FLUX_TEST_CONFIGS, TINY_FLUX_CONFIG, triton_param  # noqa: E402

CONFIGS = FLUX_TEST_CONFIGS
TINY = TINY_FLUX_CONFIG

# Relative to the largest magnitude of the expected tensor. float32: attention, norms and the
# stacked linear in another summation order, through a few blocks. float64: diffusers computes
# the rotary embedding and the sinusoidal time projection in float32 even for a float64 model
# (the fused ops keep float64), so the float64 comparisons sit near float32's rounding
# (observed: float32 up to 7e-7, float64 up to 1.1e-8).
REL_TOL = {torch.float32: 5e-6, torch.float64: 1e-7}


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", request.param)
    return request.param


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _stock(config: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**CONFIGS[config]).to(dtype)


def _student(stock, *, random_delta: bool = False) -> FluxStudent:
    student = FluxStudent.from_transformer(copy.deepcopy(stock))
    if random_delta:  # so that r matters
        g = torch.Generator().manual_seed(7)
        w = student.delta_embedder.linear_2.weight
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.2)
            b = student.delta_embedder.linear_2.bias
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.2)
    return student


def _inputs(config: str, dtype: torch.dtype, *, batch: int = 2, height: int = 3, width: int = 4,
            text: int = 5, seed: int = 1):
    """(z, r, t, cond, z_dot, r_dot): packed latents (B, H·W, 4), times r < t in (0, 1), the
    conditioning of a FLUX pipeline, and random tangents."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    img_ids = torch.zeros(height, width, 3, dtype=dtype)
    img_ids[..., 1] = torch.arange(height, dtype=dtype)[:, None]
    img_ids[..., 2] = torch.arange(width, dtype=dtype)[None, :]
    guidance = None
    if CONFIGS[config].get("guidance_embeds"):
        guidance = 1 + 4 * torch.rand(batch, generator=g, dtype=dtype)
    cond = FluxCondition(encoder_hidden_states=randn(batch, text, 32), pooled_projections=randn(batch, 32),
                         txt_ids=torch.zeros(text, 3, dtype=dtype), img_ids=img_ids.reshape(-1, 3),
                         guidance=guidance)
    t = 0.2 + 0.7 * torch.rand(batch, generator=g, dtype=dtype)
    r = t * torch.rand(batch, generator=g, dtype=dtype)
    z = randn(batch, height * width, 4)
    return z, r, t, cond, randn(*z.shape), randn(batch)


def _stock_fn(stock, cond):
    def v(z, t):
        return stock(hidden_states=z, encoder_hidden_states=cond.encoder_hidden_states,
                     pooled_projections=cond.pooled_projections, timestep=t, img_ids=cond.img_ids,
                     txt_ids=cond.txt_ids, guidance=cond.guidance).sample
    return v


def _stock_jvp(stock, z, t, cond, z_dot, t_dot):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(_stock_fn(stock, cond), (z, t), (z_dot, t_dot))


def _assert_close(actual, expected, dtype, what=""):
    scale = expected.detach().abs().max().item()
    tol = REL_TOL[dtype] * max(scale, 1.0)
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e} (max |expected| {scale:.3e})"


def _meanflow_loss(u, u_dot, v, r, t):
    """((u − (v − (t − r)·sg(du/dt)))²).mean()"""
    target = v - (t - r)[:, None, None] * u_dot.detach()
    return ((u - target.detach()) ** 2).mean()


# --------------------------------------------------------------------------------------------
# (a) the primal at r = t is the teacher's
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["tiny", "deep", "guided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_student_equals_diffusers_at_initialisation(config, dtype, monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    stock = _stock(config, dtype)
    student = _student(stock)
    teacher = FluxTeacher(copy.deepcopy(stock))
    z, r, t, cond, _, _ = _inputs(config, dtype)
    with torch.no_grad():
        expected = _stock_fn(stock, cond)(z, t)
        # student(...) runs diffusers' blocks: bit for bit, at r = t and (the (t − r) embedder
        # starting at zero) at any r.
        assert torch.equal(student(z, t, t, cond), expected)
        assert torch.equal(student(z, r, t, cond), expected)
        assert torch.equal(teacher.velocity(z, t, cond), expected)
        # Pair mode: the fused ops, float rounding.
        u, u_dot = student.forward_with_tangent(z, t, t, cond)
    _assert_close(u, expected, dtype, "pair-mode primal")
    assert torch.count_nonzero(u_dot) == 0  # no tangent given: zero


def test_teacher_is_frozen():
    stock = _stock("tiny", torch.float32)
    teacher = FluxTeacher(stock)
    teacher.train()
    assert not teacher.training and not teacher.transformer.training
    assert not any(p.requires_grad for p in teacher.parameters())
    z, _, t, cond, _, _ = _inputs("tiny", torch.float32)
    z.requires_grad_(True)
    v = teacher.velocity(z, t, cond)
    assert v.grad_fn is None and not v.requires_grad
    # The teacher keeps the stock attention processors (fast SDPA); the student gets ours.
    assert not any(isinstance(p, JVPFluxAttnProcessor) for p in stock.attn_processors.values())
    assert all(isinstance(p, JVPFluxAttnProcessor)
               for p in _student(_stock("tiny", torch.float32)).transformer.attn_processors.values())


def test_student_made_from_the_frozen_teachers_transformer_trains():
    """FluxTeacher freezes its transformer; a student built from a copy of it (as the docs say)
    is trainable all the same: every parameter requires grad and gets one, in train mode."""
    teacher = FluxTeacher(_stock("tiny", torch.float32))
    student = FluxStudent.from_transformer(copy.deepcopy(teacher.transformer))
    assert all(p.requires_grad for p in student.parameters())
    assert all(m.training for m in student.modules())
    z, r, t, cond, v, _ = _inputs("tiny", torch.float32)
    u, u_dot = student.forward_with_tangent(z, r, t, cond, v, None, 1.0)
    grads = _grads(student, _meanflow_loss(u, u_dot, v, r, t))
    assert [n for n, g in grads.items() if g is None] == []
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher stays frozen


# --------------------------------------------------------------------------------------------
# (b) the tangent
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, dtype, config", [
    ("reference", torch.float64, "tiny"),
    ("reference", torch.float64, "deep"),
    ("reference", torch.float32, "deep"),
    ("reference", torch.float64, "guided"),
    triton_param(torch.float32, "tiny"),
    triton_param(torch.float32, "deep"),
], indirect=["backend"])
def test_forward_with_tangent_matches_stock_func_jvp(backend, dtype, config):
    """Through z and t (MeanFlow's tangent (v, 0, 1) and a random one), at r < t: at
    initialisation r does not enter, so the stock model under torch.func.jvp is the oracle."""
    stock = _stock(config, dtype)
    student = _student(stock)
    z, r, t, cond, z_dot, _ = _inputs(config, dtype)
    random_t_dot = torch.randn(t.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    for t_dot in (torch.ones_like(t), random_t_dot):
        expected, expected_dot = _stock_jvp(stock, z, t, cond, z_dot, t_dot)
        u, u_dot = student.forward_with_tangent(z, r, t, cond, z_dot, torch.zeros_like(r), t_dot)
        _assert_close(u, expected, dtype, "u")
        _assert_close(u_dot, expected_dot, dtype, "u_dot")
        assert expected_dot.abs().max() > 1e-2  # not vacuous
        assert u.grad_fn is not None
        assert u_dot.grad_fn is None and not u_dot.requires_grad


@pytest.mark.parametrize("backend, dtype, config", [
    ("reference", torch.float64, "deep"),
    ("reference", torch.float64, "guided"),
    triton_param(torch.float32, "tiny"),
], indirect=["backend"])
def test_forward_with_tangent_matches_func_jvp_of_the_student(backend, dtype, config):
    """With a trained-looking (t − r) embedder, through z, r and t: torch.func.jvp of
    ``student(...)`` itself (diffusers' blocks, JVPFluxAttnProcessor) is the oracle."""
    student = _student(_stock(config, dtype), random_delta=True)
    z, r, t, cond, z_dot, r_dot = _inputs(config, dtype)
    t_dot = torch.ones_like(t)
    expected, expected_dot = torch.func.jvp(lambda z, r, t: student(z, r, t, cond), (z, r, t),
                                            (z_dot, r_dot, t_dot))
    u, u_dot = student.forward_with_tangent(z, r, t, cond, z_dot, r_dot, t_dot)
    _assert_close(u, expected, dtype, "u")
    _assert_close(u_dot, expected_dot, dtype, "u_dot")
    # r matters now, in the primal and in the tangent.
    u_rt, _ = student.forward_with_tangent(z, t, t, cond)
    assert (u_rt - u).abs().max() > 1e-3
    _, only_r = student.forward_with_tangent(z, r, t, cond, None, r_dot, None)
    _, expected_only_r = torch.func.jvp(lambda r: student(z, r, t, cond), (r,), (r_dot,))
    _assert_close(only_r, expected_only_r, dtype, "tangent through r alone")
    assert expected_only_r.abs().max() > 1e-3


def test_scalar_times_and_tangents():
    """Floats and 0-d tensors broadcast over the batch (t_dot = 1.0 is MeanFlow's ṫ)."""
    student = _student(_stock("tiny", torch.float32), random_delta=True)
    z, r, t, cond, z_dot, _ = _inputs("tiny", torch.float32)
    a = student.forward_with_tangent(z, 0.25, torch.tensor(0.75), cond, z_dot, 0.0, 1.0)
    b = student.forward_with_tangent(z, torch.full((2,), 0.25), torch.full((2,), 0.75), cond, z_dot,
                                     torch.zeros(2), torch.ones(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_float_times_are_not_rounded_for_a_float64_model():
    """A Python float time reaches a float64 model unrounded: the same u as float64 tensors
    (0.1 and 0.3 are not float32 numbers)."""
    student = _student(_stock("tiny", torch.float64), random_delta=True)
    z, _, _, cond, _, _ = _inputs("tiny", torch.float64)
    as_floats = student(z, 0.1, 0.3, cond)
    as_tensors = student(z, torch.full((2,), 0.1, dtype=torch.float64), torch.full((2,), 0.3, dtype=torch.float64),
                         cond)
    assert torch.equal(as_floats, as_tensors)


# --------------------------------------------------------------------------------------------
# (c) gradients of the MeanFlow loss, with and without checkpointing
# --------------------------------------------------------------------------------------------

def _grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("backend, dtype, config", [
    ("reference", torch.float64, "deep"),
    ("reference", torch.float32, "tiny"),
    triton_param(torch.float32, "tiny"),
], indirect=["backend"])
def test_meanflow_loss_gradients_match_the_stock_path(backend, dtype, config):
    stock = _stock(config, dtype)
    student = _student(stock)
    z, r, t, cond, v, _ = _inputs(config, dtype)
    t_dot = torch.ones_like(t)

    u, u_dot = _stock_jvp(stock, z, t, cond, v, t_dot)
    expected = _grads(stock, _meanflow_loss(u, u_dot, v, r, t))
    u, u_dot = student.forward_with_tangent(z, r, t, cond, v, None, t_dot)
    actual = _grads(student, _meanflow_loss(u, u_dot, v, r, t))

    for name, grad in expected.items():
        assert actual[f"transformer.{name}"] is not None, name
        _assert_close(actual[f"transformer.{name}"], grad, dtype, name)
    # The (t − r) embedder learns from the start through its zero last layer (adaLN-zero style).
    assert actual["delta_embedder.linear_2.weight"].abs().max() > 0
    assert torch.count_nonzero(actual["delta_embedder.linear_1.weight"]) == 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_meanflow_gradients_match_func_jvp_of_the_student(checkpointing, monkeypatch):
    """All parameters, the (t − r) embedder included, against torch.func.jvp of student(...)."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    dtype = torch.float64
    student = _student(_stock("deep", dtype), random_delta=True)
    z, r, t, cond, v, _ = _inputs("deep", dtype)
    t_dot = torch.ones_like(t)
    u, u_dot = torch.func.jvp(lambda z, t: student(z, r, t, cond), (z, t), (v, t_dot))
    expected = _grads(student, _meanflow_loss(u, u_dot, v, r, t))
    student.gradient_checkpointing = checkpointing
    u, u_dot = student.forward_with_tangent(z, r, t, cond, v, None, t_dot)
    actual = _grads(student, _meanflow_loss(u, u_dot, v, r, t))
    missing = [n for n, g in actual.items() if g is None]
    assert not missing, f"parameters without a gradient: {missing}"
    for name, grad in expected.items():
        _assert_close(actual[name], grad, dtype, name)


@pytest.mark.parametrize("backend, dtype, config", [("reference", torch.float64, "deep"),
                                                    ("reference", torch.float32, "deep"),
                                                    triton_param(torch.float32, "tiny")], indirect=["backend"])
def test_checkpointing_gives_the_same_gradients_and_recomputes_only_the_primal(backend, dtype, config,
                                                                               monkeypatch):
    student = _student(_stock(config, dtype), random_delta=True)
    z, r, t, cond, v, r_dot = _inputs(config, dtype)
    inputs = (z, r, t, cond, v, r_dot, torch.ones_like(t))

    u, u_dot = student.forward_with_tangent(*inputs)
    expected = _grads(student, _meanflow_loss(u, u_dot, v, r, t))

    calls = {"pair": 0, "plain": 0}
    real_pair, real_plain = ops.jvp_attention_pair, ops.jvp_attention

    def pair(*args, **kwargs):
        calls["pair"] += 1
        return real_pair(*args, **kwargs)

    def plain(*args, **kwargs):
        calls["plain"] += 1
        return real_plain(*args, **kwargs)

    monkeypatch.setattr(ops, "jvp_attention_pair", pair)
    monkeypatch.setattr(ops, "jvp_attention", plain)
    student.gradient_checkpointing = True
    u2, u2_dot = student.forward_with_tangent(*inputs)
    blocks = student.transformer
    n_blocks = len(blocks.transformer_blocks) + len(blocks.single_transformer_blocks)
    assert calls == {"pair": n_blocks, "plain": 0}
    assert torch.equal(u2, u) and torch.equal(u2_dot, u_dot)
    actual = _grads(student, _meanflow_loss(u2, u2_dot, v, r, t))  # no CheckpointError
    # Backward recomputed every block once, primal only.
    assert calls == {"pair": n_blocks, "plain": n_blocks}
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-7 if dtype == torch.float32 else 1e-15, msg=name)


def test_checkpointing_keeps_only_block_inputs():
    """What autograd keeps for backward, counted with saved-tensor hooks: with checkpointing,
    pair mode keeps far less than without; without, no more than the plain forward."""
    torch.manual_seed(0)
    student = _student(_stock("deep", torch.float32), random_delta=True)
    z, r, t, cond, v, _ = _inputs("deep", torch.float32, height=8, width=8)

    def saved_bytes(fn):
        storages = {}

        def pack(x):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fn()
        del out
        return sum(storages.values())

    pair = saved_bytes(lambda: student.forward_with_tangent(z, r, t, cond, v, None, 1.0))
    plain = saved_bytes(lambda: student(z, r, t, cond))
    student.gradient_checkpointing = True
    pair_ckpt = saved_bytes(lambda: student.forward_with_tangent(z, r, t, cond, v, None, 1.0))
    assert pair <= 1.05 * plain, (pair, plain)
    assert pair_ckpt < 0.5 * pair, (pair_ckpt, pair)


def test_func_jvp_through_the_student_skips_checkpointing_with_a_warning():
    """torch.func.jvp of student(...) with checkpointing on: checkpointing is skipped (its
    recomputation would lack the tangents: torch's CheckpointError in backward), with a warning,
    and the gradients are those without checkpointing."""
    student = _student(_stock("deep", torch.float64), random_delta=True)
    z, r, t, cond, z_dot, _ = _inputs("deep", torch.float64)

    def loss():
        u, u_dot = torch.func.jvp(lambda z, t: student(z, r, t, cond), (z, t), (z_dot, torch.ones_like(t)))
        return (u - u_dot.detach()).square().mean()

    expected = _grads(student, loss())
    student.gradient_checkpointing = True
    with pytest.warns(UserWarning, match="checkpointing is skipped under forward-mode AD"):
        value = loss()
    actual = _grads(student, value)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("backend, checkpointing", [("reference", False), ("reference", True),
                                                    triton_param(True)], indirect=["backend"])
def test_the_meanflow_step_compiles_as_one_graph(backend, checkpointing):
    """torch.compile(fullgraph=True) of a pair-mode MeanFlow loss (the fused ops are opaque
    custom ops; a checkpointed block returns its tangents there) and of the plain forward: eager's
    loss and gradients."""
    import torch._dynamo

    student = _student(_stock("guided", torch.float32), random_delta=True)
    student.gradient_checkpointing = checkpointing
    z, r, t, cond, v, _ = _inputs("guided", torch.float32)

    def meanflow_loss(z, r, t, v):
        u, u_dot = student.forward_with_tangent(z, r, t, cond, z_dot=v, r_dot=None, t_dot=1.0)
        return _meanflow_loss(u, u_dot, v, r, t)

    def flow_matching_loss(z, r, t, v):
        return ((student(z, r, t, cond) - v) ** 2).mean()

    for loss in (meanflow_loss, flow_matching_loss):
        expected = loss(z, r, t, v)
        expected_grads = _grads(student, expected)
        torch._dynamo.reset()
        got = torch.compile(loss, backend="aot_eager", fullgraph=True)(z, r, t, v)
        torch.testing.assert_close(got, expected)
        for name, grad in _grads(student, got).items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_plain_forward_checkpointing():
    """student(...) checkpoints diffusers' blocks too (flow-matching steps, the teacher-free
    discrete targets): the same gradients."""
    student = _student(_stock("deep", torch.float64), random_delta=True)
    z, r, t, cond, v, _ = _inputs("deep", torch.float64)
    expected = _grads(student, ((student(z, r, t, cond) - v) ** 2).mean())
    student.enable_gradient_checkpointing()
    actual = _grads(student, ((student(z, r, t, cond) - v) ** 2).mean())
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-12, atol=1e-15, msg=name)


def test_diffusers_checkpointing_switch_is_the_students(monkeypatch):
    """student.transformer.enable_gradient_checkpointing() (diffusers' switch) checkpoints both
    forwards, as student.gradient_checkpointing = True does: the two are one switch."""
    import pickle

    import meanflow.models.flux_student as flux_student

    calls = []
    real = flux_student.checkpoint
    monkeypatch.setattr(flux_student, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    student = _student(_stock("tiny", torch.float32))
    z, r, t, cond, v, _ = _inputs("tiny", torch.float32)
    student.transformer.enable_gradient_checkpointing()
    assert student.gradient_checkpointing
    student(z, r, t, cond).sum().backward()
    student.forward_with_tangent(z, r, t, cond, v, None, 1.0)[0].sum().backward()
    assert len(calls) == 2 * 2  # one per block (1 double + 1 single), in each forward
    monkeypatch.undo()
    student.gradient_checkpointing = False
    assert not student.transformer.gradient_checkpointing
    student.gradient_checkpointing = True
    assert student.transformer.gradient_checkpointing
    pickle.dumps(student)  # the checkpoint function it installs pickles
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        student.gradient_checkpointing = 1


# --------------------------------------------------------------------------------------------
# (d) save / load, dtypes, validation
# --------------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    student = _student(_stock("guided", torch.float32), random_delta=True)
    student.save_pretrained(tmp_path / "student")
    assert (tmp_path / "student" / "transformer" / "config.json").is_file()
    assert (tmp_path / "student" / "delta_embedder.safetensors").is_file()
    loaded = FluxStudent.from_pretrained(tmp_path / "student")
    state, loaded_state = student.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(student.config)
    z, r, t, cond, z_dot, r_dot = _inputs("guided", torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(z, r, t, cond), student(z, r, t, cond))
    # Eval mode throughout, as diffusers' from_pretrained; trainable once .train() is called.
    assert not any(m.training for m in loaded.modules())
    assert all(p.requires_grad for p in loaded.parameters())
    # The transformer part is a plain diffusers checkpoint: a teacher loads it as such.
    FluxStudent.from_teacher_pretrained(tmp_path / "student", subfolder="transformer")
    with pytest.raises(ValueError, match="directory"):
        FluxStudent.from_pretrained(tmp_path / "student" / "transformer")


def test_save_without_safetensors(tmp_path):
    student = _student(_stock("tiny", torch.float32), random_delta=True)
    student.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.bin").is_file()
    loaded = FluxStudent.from_pretrained(tmp_path)
    state, loaded_state = student.state_dict(), loaded.state_dict()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_save_after_fusing_qkv_writes_the_live_weights(tmp_path, monkeypatch):
    """After fuse_qkv_projections() the trained weights live in to_qkv / to_added_qkv, which
    diffusers' from_pretrained ignores: save_pretrained writes them split into to_q/to_k/to_v and
    add_q_proj/add_k_proj/add_v_proj, and leaves the live model fused and unchanged."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    student = _student(_stock("tiny", torch.float32), random_delta=True)
    student.transformer.fuse_qkv_projections()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a training update of the fused weights only
        for name, p in student.named_parameters():
            if "to_qkv" in name or "to_added_qkv" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student.save_pretrained(tmp_path)
    after = student.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert student.transformer.transformer_blocks[0].attn.fused_projections

    loaded = FluxStudent.from_pretrained(tmp_path)
    attn = student.transformer.transformer_blocks[0].attn
    unfused = loaded.transformer.transformer_blocks[0].attn
    assert torch.equal(unfused.add_k_proj.weight, attn.to_added_qkv.weight.chunk(3)[1])
    assert torch.equal(unfused.to_v.bias, attn.to_qkv.bias.chunk(3)[2])
    z, r, t, cond, _, _ = _inputs("tiny", torch.float32)
    with torch.no_grad():  # fused and unfused projections: the same products, float rounding
        _assert_close(loaded(z, r, t, cond), student(z, r, t, cond), torch.float32, "reloaded fused student")


def test_from_config():
    student = FluxStudent.from_config(dict(TINY))
    assert student.config.num_layers == 1
    assert torch.count_nonzero(student.delta_embedder.linear_2.weight) == 0


def test_bf16_autocast_stays_finite_and_close(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    student = _student(_stock("deep", torch.float32), random_delta=True)
    teacher = FluxTeacher(copy.deepcopy(student.transformer))
    student.delta_embedder.linear_2.weight.data.zero_()
    student.delta_embedder.linear_2.bias.data.zero_()
    z, r, t, cond, v, _ = _inputs("deep", torch.float32)
    u32, u32_dot = student.forward_with_tangent(z, r, t, cond, v, None, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, u_dot = student.forward_with_tangent(z, r, t, cond, v, None, 1.0)
        loss = _meanflow_loss(u.float(), u_dot.float(), v, r, t)
        with torch.no_grad():
            # Student and teacher share the top-level forward and its float32 time path.
            assert torch.equal(student(z, t, t, cond), teacher.velocity(z, t, cond))
    assert u.dtype == torch.bfloat16 and u_dot.dtype == torch.bfloat16
    assert torch.isfinite(u).all() and torch.isfinite(u_dot).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert (u.float() - u32).abs().max() < 0.05 * u32.abs().max()
    assert (u_dot.float() - u32_dot).abs().max() < 0.05 * u32_dot.abs().max()


def test_bf16_model_time_path_in_float32():
    """A bf16 model: the time embedding is computed in float32 (diffusers would round 1000·t
    to bf16 first), so nearby times still give different embeddings."""
    student = _student(_stock("tiny", torch.float32)).to(torch.bfloat16)
    z, _, _, cond, z_dot, _ = _inputs("tiny", torch.bfloat16)
    t1, t2 = torch.full((2,), 0.5), torch.full((2,), 0.5005)  # 500 and 500.5: one bf16 value
    with torch.no_grad():
        u1, u1_dot = student.forward_with_tangent(z, t1, t1, cond, z_dot, None, 1.0)
        u2, _ = student.forward_with_tangent(z, t2, t2, cond, z_dot, None, 1.0)
        assert u1.dtype == torch.bfloat16 and torch.isfinite(u1_dot).all()
        assert not torch.equal(u1, u2)


def test_rejects_bad_arguments():
    student = _student(_stock("tiny", torch.float32))
    z, r, t, cond, z_dot, _ = _inputs("tiny", torch.float32)
    with pytest.raises(ValueError, match="z must have 4 channels"):
        student.forward_with_tangent(z[..., :3], r, t, cond)
    with pytest.raises(ValueError, match="cond must be a FluxCondition"):
        student(z, r, t, {"encoder_hidden_states": cond.encoder_hidden_states})
    with pytest.raises(ValueError, match="t must have shape"):
        student(z, r, t[:1], cond)
    with pytest.raises(ValueError, match="z_dot must have shape"):
        student.forward_with_tangent(z, r, t, cond, z_dot[:, :3])
    with pytest.raises(ValueError, match="img_ids"):
        student(z[:, :5], r, t, cond)
    with pytest.raises(ValueError, match="guidance"):
        student(z, r, t, FluxCondition(**{**cond.__dict__, "guidance": torch.ones(2)}))
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        FluxStudent.from_transformer(torch.nn.Linear(2, 2))
    with_ = lambda **kw: FluxCondition(**{**cond.__dict__, **kw})  # noqa: E731
    for field, value in (("txt_ids", torch.zeros(5, 2)), ("img_ids", cond.img_ids[:, :2]),
                         ("encoder_hidden_states", None), ("pooled_projections", None),
                         ("attention_mask", [1] * 17),
                         ("attention_mask", torch.ones(2, 18, dtype=torch.bool)),  # neither (B, T) nor (B, N)
                         ("attention_mask", torch.ones(2, 3, 17, 17, dtype=torch.bool))):  # 3 heads, not 2
        for forward in (student, student.forward_with_tangent):
            with pytest.raises(ValueError, match=f"cond.{field}"):
                forward(z, r, t, with_(**{field: value}))
    with pytest.raises(ValueError, match="r must be"):
        student(z, None, t, cond)
    with pytest.raises(ValueError, match="z must be floating point"):
        student(z.long(), r, t, cond)


def test_refuses_wrapped_linears_in_pair_mode():
    """A LoRA-style wrapper would be silently ignored by a pair pass reading .weight: refused."""

    class Wrapped(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    student = _student(_stock("tiny", torch.float32))
    old = student.transformer.transformer_blocks[0].attn.to_q
    new = Wrapped(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    student.transformer.transformer_blocks[0].attn.to_q = new
    z, r, t, cond, z_dot, _ = _inputs("tiny", torch.float32)
    with pytest.raises(NotImplementedError, match="to_q"):
        student.forward_with_tangent(z, r, t, cond, z_dot, None, 1.0)


def test_attention_mask(monkeypatch):
    """A key-padding mask in the condition reaches every attention call in both forwards."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    student = _student(_stock("deep", torch.float64), random_delta=True)
    z, r, t, cond, z_dot, r_dot = _inputs("deep", torch.float64)
    mask = torch.ones(2, 5 + 12, dtype=torch.bool)
    mask[0, 3:5] = False
    masked = FluxCondition(**{**cond.__dict__, "attention_mask": mask})
    expected, expected_dot = torch.func.jvp(lambda z, r, t: student(z, r, t, masked), (z, r, t),
                                            (z_dot, r_dot, torch.ones_like(t)))
    u, u_dot = student.forward_with_tangent(z, r, t, masked, z_dot, r_dot, 1.0)
    _assert_close(u, expected, torch.float64, "u")
    _assert_close(u_dot, expected_dot, torch.float64, "u_dot")
    with torch.no_grad():  # the plain forward hands the mask to diffusers' dispatcher
        _assert_close(student(z, r, t, masked), expected, torch.float64, "plain forward")
    unmasked, _ = student.forward_with_tangent(z, r, t, cond, z_dot, r_dot, 1.0)
    assert (unmasked - u).abs().max() > 1e-6


def test_attention_mask_forms_are_read_alike_on_every_path(monkeypatch):
    """bool, 0/1 integer and additive (B, N) masks and a tokenizer's (B, T) text mask (image tokens
    then attended) give the same result, through student(...), pair mode and the teacher."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    stock = _stock("tiny", torch.float64)
    student, teacher = _student(stock, random_delta=True), FluxTeacher(copy.deepcopy(stock))
    z, r, t, cond, z_dot, _ = _inputs("tiny", torch.float64)
    mask = torch.ones(2, 5 + 12, dtype=torch.bool)
    mask[0, 3:5] = False
    additive = torch.zeros(2, 17, dtype=torch.float64).masked_fill(~mask, -torch.inf)
    forms = {"int": mask.long(), "additive": additive, "text (B, T)": mask[:, :5].int(),
             "(B, 1, 1, N)": mask[:, None, None]}
    paths = {"plain": lambda c: student(z, r, t, c),
             "pair": lambda c: student.forward_with_tangent(z, r, t, c, z_dot, None, 1.0)[0],
             "teacher": lambda c: teacher.velocity(z, t, c)}
    with torch.no_grad():
        for path, fn in paths.items():
            expected = fn(FluxCondition(**{**cond.__dict__, "attention_mask": mask}))
            assert (fn(cond) - expected).abs().max() > 1e-6, path  # the mask matters
            for form, m in forms.items():
                _assert_close(fn(FluxCondition(**{**cond.__dict__, "attention_mask": m})), expected,
                              torch.float64, f"{path}, {form} mask")


def test_inputs_of_another_dtype_are_cast_to_the_models():
    """A bf16 model given float32 z and encoder_hidden_states: both forwards (and the teacher)
    cast them to bf16, as if the caller had. (pooled_projections feeds the float32 time path.)"""
    stock = _stock("tiny", torch.float32).to(torch.bfloat16)
    student, teacher = _student(stock, random_delta=True), FluxTeacher(copy.deepcopy(stock))
    z, r, t, cond, z_dot, _ = _inputs("tiny", torch.float32)
    cond16 = FluxCondition(**{**cond.__dict__,
                              "encoder_hidden_states": cond.encoder_hidden_states.bfloat16()})
    with torch.no_grad():
        assert torch.equal(student(z, r, t, cond), student(z.bfloat16(), r, t, cond16))
        a = student.forward_with_tangent(z, r, t, cond, z_dot, None, 1.0)
        b = student.forward_with_tangent(z.bfloat16(), r, t, cond16, z_dot, None, 1.0)
        assert a[0].dtype == torch.bfloat16 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(teacher.velocity(z, t, cond), teacher.velocity(z.bfloat16(), t, cond16))


def test_condition_to_casts_only_the_embeddings():
    """cond.to(bf16) rounds the embeddings only: positions above 256 and guidance scales such as
    4.3 would not survive bf16."""
    ids = torch.zeros(300, 3)
    ids[:, 2] = torch.arange(300.0)
    mask = torch.ones(2, 305, dtype=torch.long)
    cond = FluxCondition(torch.randn(2, 5, 32), torch.randn(2, 32), torch.zeros(5, 3), ids,
                         torch.tensor([4.3, 3.7]), mask)
    half = cond.to(torch.bfloat16)
    assert half.encoder_hidden_states.dtype == half.pooled_projections.dtype == torch.bfloat16
    for name in ("txt_ids", "img_ids", "guidance", "attention_mask"):
        assert torch.equal(getattr(half, name), getattr(cond, name)), name
        assert getattr(half, name).dtype == getattr(cond, name).dtype, name
    moved = cond.to("cpu", dtype=torch.float64, non_blocking=True)
    assert moved.pooled_projections.dtype == torch.float64 and moved.img_ids.dtype == torch.float32
    assert replace(cond, guidance=3.5).to(torch.float16).guidance == 3.5  # a float scale is kept
    with pytest.raises(ValueError, match="dtype"):
        cond.to(torch.int64)


def test_float16_model(monkeypatch):
    """A float16 model (diffusers clips its hidden states to ±65504): pair mode stays at fp16
    rounding of the stock forward; the time path runs in float32 (so student(...) differs from
    diffusers' by rounding too)."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "reference")
    stock = _stock("deep", torch.float32).to(torch.float16)
    student = _student(stock)
    z, _, t, cond, z_dot, _ = _inputs("deep", torch.float16)
    with torch.no_grad():
        expected = _stock_fn(stock, cond)(z, t)
        u, u_dot = student.forward_with_tangent(z, t, t, cond, z_dot, None, 1.0)
        plain = student(z, t, t, cond)
    scale = expected.abs().max()
    assert u.dtype == torch.float16 and torch.isfinite(u_dot).all()
    assert (u - expected).abs().max() <= 5e-3 * scale
    assert (plain - expected).abs().max() <= 5e-3 * scale


# --------------------------------------------------------------------------------------------
# (e) on a GPU: the Triton kernels through the whole student
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_pair_mode_on_cuda_matches_float64_stock_jvp(autocast, monkeypatch):
    """The student on CUDA (Triton backend: attention, norms, rope, activations, residuals;
    cuBLAS linears) against torch.func.jvp of the stock model in float64 on the CPU, for u,
    du/dt and every gradient of the MeanFlow loss (relative L2 error per tensor).

    float32 (TF32 off): no worse than twice the error of the stock model itself run the same
    way on CUDA in float32 (math SDPA), plus 1e-6 — a bias gradient summed over a few tokens
    can cancel, so a fixed relative bound would test the data, not the kernels (on an H100 the
    worst tensor read 2.1e-4 while u read 6e-7). bf16 autocast: within 5 %.
    """
    monkeypatch.setenv("MEANFLOW_BACKEND", "auto")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    stock = _stock("deep", torch.float64)
    z, r, t, cond, v, _ = _inputs("deep", torch.float64, height=8, width=6, text=7)
    t_dot = torch.ones_like(t)
    u64, u64_dot = _stock_jvp(stock, z, t, cond, v, t_dot)
    expected = _grads(stock, _meanflow_loss(u64, u64_dot, v, r, t))

    cuda = torch.device("cuda")
    to = lambda x: None if x is None else x.to(cuda, torch.float32)  # noqa: E731
    cond32 = FluxCondition(**{k: to(getattr(cond, k)) for k in
                              ("encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids",
                               "guidance")})
    z32, r32, t32, v32 = to(z), to(r), to(t), to(v)

    def rel(a, b):
        return ((a.detach().double().cpu() - b.detach()).norm() / b.detach().norm()).item()

    def errors(u, u_dot, grads, prefix):
        out = {"u": rel(u, u64), "u_dot": rel(u_dot, u64_dot)}
        out.update({name: rel(grads[prefix + name], grad) for name, grad in expected.items()
                    if grad.norm() > 0})
        return out

    student = _student(stock).to(cuda, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        u, u_dot = student.forward_with_tangent(z32, r32, t32, cond32, v32, None, 1.0)
        loss = _meanflow_loss(u.float(), u_dot.float(), v32, r32, t32)
    ours = errors(u, u_dot, _grads(student, loss), "transformer.")
    if autocast:
        bound = {name: 5e-2 for name in ours}
    else:
        stock32 = copy.deepcopy(stock).to(cuda, torch.float32)
        u_s, u_s_dot = _stock_jvp(stock32, z32, t32, cond32, v32, torch.ones_like(t32))
        floor = errors(u_s, u_s_dot, _grads(stock32, _meanflow_loss(u_s, u_s_dot, v32, r32, t32)), "")
        bound = {name: 2 * floor[name] + 1e-6 for name in ours}
    worst = max(ours, key=lambda name: ours[name] / bound[name])
    print(f"\n{'bf16 autocast' if autocast else 'float32'}: worst {worst} {ours[worst]:.2e} "
          f"(bound {bound[worst]:.2e}); u {ours['u']:.2e}, u_dot {ours['u_dot']:.2e}")
    assert all(ours[name] <= bound[name] for name in ours), {n: (ours[n], bound[n]) for n in ours}


# --------------------------------------------------------------------------------------------
# A student with LoRA adapters (model.student_lora_rank)
# --------------------------------------------------------------------------------------------

def _lora_student(config: str, dtype: torch.dtype, rank: int = 2):
    """A student with random adapters (B ≠ 0, so they matter) and a random (t − r) embedder."""
    from meanflow.models.lora import add_lora_to_flux_blocks, lora_parameters

    student = _student(_stock(config, dtype), random_delta=True)
    add_lora_to_flux_blocks(student.transformer, rank, 3.0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in lora_parameters(student):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return student


@pytest.mark.parametrize("backend, dtype, config", [
    ("reference", torch.float64, "deep"),
    triton_param(torch.float32, "tiny"),
], indirect=["backend"])
def test_lora_student_pair_mode_matches_func_jvp(backend, dtype, config):
    """Pair mode carries the adapters' tangent: u and du/dt against torch.func.jvp of
    student(...) (whose blocks run LoRALinear.forward), and the MeanFlow loss's gradients, the
    adapters' included."""
    student = _lora_student(config, dtype)
    z, r, t, cond, v, _ = _inputs(config, dtype)
    t_dot = torch.ones_like(t)
    u, u_dot = torch.func.jvp(lambda z, t: student(z, r, t, cond), (z, t), (v, t_dot))
    expected = _grads(student, _meanflow_loss(u, u_dot, v, r, t))
    u_pair, u_dot_pair = student.forward_with_tangent(z, r, t, cond, v, None, t_dot)
    _assert_close(u_pair, u, dtype, "u")
    _assert_close(u_dot_pair, u_dot, dtype, "u_dot")
    actual = _grads(student, _meanflow_loss(u_pair, u_dot_pair, v, r, t))
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and not any(n.endswith(".base.weight") for n in trained)
    for name in trained:
        _assert_close(actual[name], expected[name], dtype, name)


def test_lora_student_saves_merged_weights(tmp_path):
    """save_pretrained folds the adapters into plain weights: from_pretrained gives a plain
    student (no LoRALinear) with the same output."""
    from meanflow.models.lora import LoRALinear

    student = _lora_student("deep", torch.float64)
    z, r, t, cond, _, _ = _inputs("deep", torch.float64)
    expected = student(z, r, t, cond)
    student.save_pretrained(tmp_path / "s")
    loaded = FluxStudent.from_pretrained(tmp_path / "s", torch_dtype=torch.float64)
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    _assert_close(loaded(z, r, t, cond), expected, torch.float64, "u after merge")
    assert any(isinstance(m, LoRALinear) for m in student.modules())  # the live student keeps them


@pytest.mark.gpu
def test_lora_student_pair_mode_on_cuda_under_bf16_autocast(monkeypatch):
    """A student with adapters on CUDA (Triton kernels, bf16 autocast) against torch.func.jvp of
    the same student in float64 on the CPU: u, du/dt and the adapters' and embedder's gradients
    (relative L2 per tensor) within 5 %, or twice the error of torch.func.jvp of the same student
    run the same way (bf16 autocast on CUDA: a gradient that cancels over a few tokens reads
    above 5 % for rounding alone; a CPU stand-in measured 5.3 %)."""
    monkeypatch.setenv("MEANFLOW_BACKEND", "auto")
    student64 = _lora_student("deep", torch.float64)
    z, r, t, cond, v, _ = _inputs("deep", torch.float64, height=8, width=6, text=7)
    t_dot = torch.ones_like(t)
    u64, u64_dot = torch.func.jvp(lambda z, t: student64(z, r, t, cond), (z, t), (v, t_dot))
    expected = _grads(student64, _meanflow_loss(u64, u64_dot, v, r, t))

    cuda = torch.device("cuda")
    to = lambda x: None if x is None else x.to(cuda, torch.float32)  # noqa: E731
    cond32 = FluxCondition(**{k: to(getattr(cond, k)) for k in
                              ("encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids", "guidance")})
    z32, r32, t32, v32 = to(z), to(r), to(t), to(v)
    student = copy.deepcopy(student64).to(cuda, torch.float32)

    def rel(a, b):
        return ((a.detach().double().cpu() - b.detach()).norm() / b.detach().norm()).item()

    def errors(pair: bool) -> dict:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if pair:
                u, u_dot = student.forward_with_tangent(z32, r32, t32, cond32, v32, None, 1.0)
            else:
                u, u_dot = torch.func.jvp(lambda z_, t_: student(z_, r32, t_, cond32), (z32, t32),
                                          (v32, torch.ones_like(t32)))
            loss = _meanflow_loss(u.float(), u_dot.float(), v32, r32, t32)
        grads = _grads(student, loss)
        out = {"u": rel(u, u64), "u_dot": rel(u_dot, u64_dot)}
        out.update({n: rel(grads[n], g) for n, g in expected.items() if g is not None and g.norm() > 0})
        return out

    ours, floor = errors(pair=True), errors(pair=False)
    assert any("lora_" in n for n in ours)
    bound = {n: max(5e-2, 2 * floor[n]) for n in ours}
    worst = max(ours, key=lambda n: ours[n] / bound[n])
    print(f"\nLoRA student, bf16 autocast: worst {worst} {ours[worst]:.2e} (bound {bound[worst]:.2e})")
    assert all(ours[n] <= bound[n] for n in ours), {n: (ours[n], bound[n]) for n in ours}
