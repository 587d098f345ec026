"""meanflow.digits.data: the split, FLUX packing, position ids, image helpers."""
import pytest
import torch

from meanflow.digits.data import grid_image, image_ids, load_split, pack, to_uint8, unpack

torch.set_num_threads(1)


def test_split_sizes_ranges_and_determinism():
    x, y = load_split("train")
    xt, yt = load_split("test")
    assert x.shape == (1497, 1, 8, 8) and x.dtype == torch.float32
    assert xt.shape == (300, 1, 8, 8) and yt.shape == (300,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    x2, y2 = load_split("train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # Disjoint: no test image is (by index) a train image; the union is the whole dataset.
    from sklearn.datasets import load_digits
    assert len(x) + len(xt) == len(load_digits().images)
    x2[0] = 5.0  # callers get copies
    assert load_split("train")[0][0].max() <= 1.0


def test_split_rejects_unknown():
    with pytest.raises(ValueError, match="split"):
        load_split("val")


def test_pack_layout_and_round_trip():
    img = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    lat = pack(img)
    assert lat.shape == (1, 16, 4)
    # token (row 1, col 2) is patch rows 2-3, cols 4-5; channels (dy, dx) row-major
    assert lat[0, 1 * 4 + 2].tolist() == [20.0, 21.0, 28.0, 29.0]
    assert lat[0, 0].tolist() == [0.0, 1.0, 8.0, 9.0]
    x, _ = load_split("test")
    assert torch.equal(unpack(pack(x)), x)
    z = torch.randn(5, 16, 4, dtype=torch.float64)
    assert torch.equal(pack(unpack(z)), z)


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="images"):
        pack(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        unpack(torch.zeros(2, 16, 3))


def test_image_ids():
    ids = image_ids()
    assert ids.shape == (16, 3) and ids.dtype == torch.float32
    assert (ids[:, 0] == 0).all()
    assert ids[6].tolist() == [0.0, 1.0, 2.0]
    assert ids[15].tolist() == [0.0, 3.0, 3.0]


def test_to_uint8_and_grid():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).repeat(16).reshape(1, 1, 8, 8)
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 8, 8)
    assert u[0, 0, :4].tolist() == [0, 128, 255, 255]
    img = grid_image(torch.zeros(12, 1, 8, 8), nrow=5)
    assert img.size == (5 * 32 + 6, 3 * 32 + 4) and img.mode == "L"
    with pytest.raises(ValueError, match="nrow"):
        grid_image(torch.zeros(2, 1, 8, 8), nrow=0)
