"""The launchers' integer helpers agree with Triton's own (which cost more per call), and the grid rule."""
import torch
import triton

from meanflow.kernels.launch import cdiv, next_power_of_2


def test_cdiv_matches_triton():
    for numerator in range(0, 300):
        for denominator in (1, 2, 3, 7, 16, 64, 128):
            assert cdiv(numerator, denominator) == triton.cdiv(numerator, denominator)


def test_next_power_of_2_matches_triton():
    for n in range(1, 70000, 7):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    for n in (1, 2, 3, 64, 65, 4096, 4097, 2**20):
        assert next_power_of_2(n) == triton.next_power_of_2(n)


# --------------------------------------------------------------------------------------------
# The grid rule (split_program_id): CUDA caps a grid's axes 1 and 2 at 65535 programs, so no
# launch may put the batch (or batch · heads) there. Run every op's forward and backward at two
# batch sizes through the interpreter and compare the grids it is given.
# --------------------------------------------------------------------------------------------

def _grids_of(run, monkeypatch):
    import triton.runtime.interpreter as interpreter

    grids = []
    original = interpreter.interpreter_builder.set_grid_dim
    with monkeypatch.context() as patch:
        patch.setattr(interpreter.interpreter_builder, "set_grid_dim",
                      lambda *dims: grids.append(dims) or original(*dims))
        run()
    return grids


def _every_op(batch):
    from meanflow import ops

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    x, sc, q, table = randn(batch, 5, 8), randn(batch, 8), randn(batch, 3, 5, 8), torch.randn(5, 8)
    outputs = [
        ops.jvp_rms_norm_pair(x, x.detach(), randn(8))[0],
        ops.jvp_layer_norm_modulate_pair(x, x.detach(), sc, None, sc, None)[0],
        ops.jvp_gated_residual_pair(x, x.detach(), sc, None, x, x.detach())[0],
        ops.jvp_rope_pair(q, q.detach(), table, table)[0],
        ops.jvp_attention_pair(q, q, q, q.detach(), q.detach(), q.detach())[0],
        ops.adaptive_weighted_loss(x, x.detach() + 1)[0],
        ops.alignment_loss(x, x.detach() + 1, x.detach() - 1)[0],
    ]
    sum(o.sum() for o in outputs).backward()


def test_no_launch_puts_the_batch_on_grid_axis_1_or_2(monkeypatch):
    monkeypatch.setenv("MEANFLOW_BACKEND", "triton")
    _every_op(1)  # first calls also launch for the autotuners' caches
    small, large = (_grids_of(lambda b=b: _every_op(b), monkeypatch) for b in (1, 3))
    assert len(small) == len(large) >= 14  # a forward and a backward launch per op at least
    for one, three in zip(small, large):
        assert one[1:] == three[1:], f"a launch's grid axes 1-2 grow with the batch: {one} -> {three}"
