"""meanflow.method.draws: the rows of every rank, put together, are the draws of one process for
the whole batch, for every function of the method that draws per sample."""
import pytest
import torch

from meanflow.method import GuidanceConfig, TimeSamplerConfig, draws, sample_times
from meanflow.method.alignment import AlignmentConfig, fake_flow_matching_loss, renoise_times
from meanflow.method.guidance import sample_scales
from meanflow.method.schedule import ScheduleConfig, WarmupSchedule


def _shards(seed: int, total: int, ranks: int):
    rows = total // ranks
    return [draws.RowShard(torch.Generator().manual_seed(seed), r * rows, rows, total) for r in range(ranks)]


def _one_and_split(fn, total=12, ranks=3, seed=5, dim=0):
    """(fn on one process for the whole batch, fn per rank concatenated); fn(generator, batch)."""
    whole = fn(torch.Generator().manual_seed(seed), total)
    parts = [fn(shard, shard.rows) for shard in _shards(seed, total, ranks)]
    if isinstance(whole, tuple):
        return whole, tuple(torch.cat([p[i] for p in parts], dim) for i in range(len(whole)))
    return whole, torch.cat(parts, dim)


@pytest.mark.parametrize("name, fn, dim", [
    ("rand", lambda g, b: draws.rand((b, 3), g, dtype=torch.float64), 0),
    ("randn", lambda g, b: draws.randn((b, 5, 2), g), 0),
    ("randn dim 1", lambda g, b: draws.randn((2, b), g, batch_dim=1), 1),
    ("randint", lambda g, b: draws.randint(7, (b,), g), 0),
    ("choose_rows", lambda g, b: draws.choose_rows(b, 0.25, g), 0),
    ("sample_times", lambda g, b: sample_times(b, TimeSamplerConfig(equal_fraction=0.5), generator=g), 0),
    ("sample_scales", lambda g, b: sample_scales(b, GuidanceConfig(scales=(1.0, 2.0, 3.5)), g), 0),
    ("renoise_times", lambda g, b: renoise_times(b, AlignmentConfig(window="global"), generator=g), 0),
])
def test_split_equals_whole(name, fn, dim):
    whole, split = _one_and_split(fn, dim=dim)
    for w, s in zip(whole if isinstance(whole, tuple) else (whole,), split if isinstance(split, tuple) else (split,)):
        assert torch.equal(w, s), name


def test_choose_rows_counts_the_global_batch():
    # 0.25 of 12 rows is 3 in all: a rank's share is not rounded on its own 4 rows.
    masks = [draws.choose_rows(4, 0.25, shard) for shard in _shards(0, 12, 3)]
    assert sum(int(m.sum()) for m in masks) == 3


def test_phase_b_mask_and_fake_loss_noise_split():
    schedule = WarmupSchedule(ScheduleConfig(phase_a_steps=1, phase_b_steps=4))
    objective = schedule.objective(2)
    whole, split = _one_and_split(lambda g, b: objective.mask(b, generator=g), total=8, ranks=2)
    assert torch.equal(whole, split)

    def fake_loss(g, b):
        seen = []
        fake_flow_matching_loss(lambda x, t: seen.append((x, t)) or x, torch.zeros(b, 3), generator=g)
        return seen[0]

    whole, split = _one_and_split(fake_loss, total=8, ranks=2)
    assert all(torch.equal(w, s) for w, s in zip(whole, split))


def test_one_process_draws_unchanged():
    # A plain generator draws exactly what torch draws: no RowShard, no change.
    assert torch.equal(draws.randn((4, 3), torch.Generator().manual_seed(1)),
                       torch.randn((4, 3), generator=torch.Generator().manual_seed(1)))
    assert draws.shared_generator(None) is None


def test_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match="RowShard"):
        draws.RowShard(g, 4, 4, 6)
    with pytest.raises(ValueError, match="RowShard"):
        draws.RowShard(g, 0, 0, 6)
    with pytest.raises(ValueError, match="shape: dimension 0 is 3, but this rank holds 2 rows"):
        draws.rand((3,), draws.RowShard(g, 0, 2, 4))
