"""The memory planner (meanflow.train.plan): exact parameter counts, state bytes equal to a real
Distiller's, the activation model against autograd's saved tensors, FSDP2 scaling, FLUX.1-dev."""
import copy
import time

import pytest
import torch

from meanflow.testing import TINY_FLUX_CONFIG, state_bytes
from meanflow.train.config import load_config
from meanflow.train.plan import FAKE_ROWS, STUDENT_ROWS, format_plan, plan_memory


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_equal_real_models():
    from diffusers import FluxTransformer2DModel
    from diffusers.models.embeddings import TimestepEmbedding

    from meanflow.digits.teacher import TEACHER_CONFIG, load_teacher

    for cfg in (TINY_FLUX_CONFIG, TEACHER_CONFIG):
        plan = plan_memory(load_config("tiny", None, []), 1, transformer_config=dict(cfg))
        real = FluxTransformer2DModel(**cfg)
        assert plan.transformer_params == _numel(real)
        delta = TimestepEmbedding(256, real.inner_dim)
        assert plan.student_params == _numel(real) + _numel(delta)
    # The digits text encoder of the shipped teacher, built for real.
    _, text_encoder = load_teacher()
    plan = plan_memory(load_config("tiny", None, []), 1)
    assert plan.encoder_params == {"digits text encoder": _numel(text_encoder)}
    assert plan.bytes_of("text encoders + VAE") == 4 * _numel(text_encoder)


@pytest.mark.parametrize("fake", ["full", "lora"])
def test_state_bytes_equal_a_real_distiller(tmp_path, fake):
    from meanflow.train.loop import Distiller

    lora = ["model.fake_lora_rank=2", "model.student_lora_rank=3"] if fake == "lora" else []
    config = load_config("tiny", None, [f"run.out_dir={tmp_path}", *lora])
    distiller = Distiller(config)
    phases = set()
    while "C" not in phases:  # phase C runs the fake network's optimizer too (step 3 of tiny)
        phases.add(distiller.step().phase)
    student, fake = distiller.student, distiller.fake
    measured = {
        "student params": state_bytes(student.parameters()),
        "student grads": state_bytes(p.grad for p in student.parameters()),
        "student AdamW": state_bytes(t for s in distiller.optimizer.state.values() for t in s.values()),
        "student EMA": state_bytes(distiller.ema.state_dict().values()),
        "fake params": state_bytes(fake.parameters()),
        "fake grads": state_bytes(p.grad for p in fake.parameters()),
        "fake AdamW": state_bytes(t for s in distiller.fake_optimizer.state.values() for t in s.values()),
    }
    plan = plan_memory(config, 1)
    for name in STUDENT_ROWS + FAKE_ROWS:
        assert plan.bytes_of(name) == measured[name], name
    assert plan.bytes_of("teacher") == state_bytes(distiller.world.teacher.parameters())


def _saved_bytes(fn, exclude):
    """Bytes of the tensors autograd saves during fn(), deduplicated by storage, parameters excluded."""
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def test_activation_estimate_within_factor_two_of_saved_tensors():
    from meanflow.models.flux_student import FluxStudent
    from meanflow.train.world import DigitsWorld

    config = load_config("tiny", None, [])
    world = DigitsWorld()
    student = FluxStudent.from_transformer(copy.deepcopy(world.teacher.transformer)).float()
    student.requires_grad_(True).train()
    batch = config.data.batch_size
    x, prompts = world.training_batch(batch, torch.Generator().manual_seed(0))
    cond = world.condition(prompts)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(x.shape, generator=gen)
    r = torch.rand(batch, generator=gen) * 0.5
    t = r + 0.4
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    plain = _saved_bytes(lambda: student(z, r, t, cond), params)
    pair = _saved_bytes(lambda: student.forward_with_tangent(z, r, t, cond, torch.randn_like(z), None, 1.0)[0],
                        params)
    estimate = plan_memory(config, 1).activation_kept_per_forward
    print(f"\nactivations per student forward, batch {batch}: estimate {estimate:,} B, "
          f"measured plain {plain:,} B, pair mode {pair:,} B")
    for measured in (plain, pair):
        assert estimate / 2 <= measured <= 2 * estimate


def test_gpus_scaling_and_validation():
    config = load_config("tiny", None, ["data.batch_size=8"])
    one = plan_memory(config, 1, transformer_config=dict(TINY_FLUX_CONFIG, in_channels=8))
    for gpus in (2, 4, 8):
        plan = plan_memory(config, gpus, transformer_config=dict(TINY_FLUX_CONFIG, in_channels=8))
        for row in plan.rows:
            if row.sharded:
                assert row.bytes == pytest.approx(one.bytes_of(row.name) / gpus, rel=0.01), row.name
        for name in ("text encoders + VAE", "CUDA context + allocator"):
            assert plan.bytes_of(name) == one.bytes_of(name)
        assert {r.name for r in plan.rows if r.sharded} == set(STUDENT_ROWS + FAKE_ROWS + ("teacher",))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="gpus"):
            plan_memory(config, bad)
    with pytest.raises(ValueError, match="config"):
        plan_memory({"model": {}}, 1)
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        one.fits(0)
    with pytest.raises(ValueError, match="data.batch_size: 8 does not split evenly over 3 ranks"):
        plan_memory(config, 3)


def test_flux_dev_plan_on_meta():
    config = load_config("flux-dev", None, [])
    start = time.perf_counter()
    plans = {g: plan_memory(config, g) for g in (8, 1)}
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed
    plan = plans[8]
    assert plan.transformer_params == pytest.approx(11.9e9, rel=0.01)
    assert plan.per_rank_batch == 1 and plan.image_tokens == 4096 and plan.text_tokens == 512
    assert plan.fits(80) and not plans[1].fits(80)
    for g, p in plans.items():
        print(f"\n{format_plan(p)}\n")


def test_cli(capsys):
    from meanflow.cli import main

    assert main(["plan", "--preset", "tiny", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 GPUs" in out and "**total**" in out and "fits in 80 GiB" in out
    assert main(["plan", "--preset", "tiny", "--gpu-memory", "1e-6"]) == 1  # does not fit: exit 1
    with pytest.raises(SystemExit) as info:  # argparse's usage error, exit 2
        main(["plan", "--preset", "tiny", "--gpus", "0"])
    assert info.value.code == 2
    assert "--gpus: expected a positive integer" in capsys.readouterr().err
