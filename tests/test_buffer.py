import pytest
import torch

from mbpo_core.buffer import ReplayBuffer, mixed_batch


def _rows(start, n, width=5):
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, width).clone()


def test_fifo_keeps_newest_rows_in_age_order():
    buf = ReplayBuffer(6, 1, 1)
    buf.add_rows(_rows(0, 4))
    buf.add_rows(_rows(4, 5))
    assert len(buf) == 6
    assert buf.rows()[:, 0].tolist() == [3, 4, 5, 6, 7, 8]
    buf.add_rows(_rows(9, 20))
    assert buf.rows()[:, 0].tolist() == [23, 24, 25, 26, 27, 28]


def test_resize_keeps_newest():
    buf = ReplayBuffer(6, 1, 1)
    buf.add_rows(_rows(0, 9))
    buf.resize(4)
    assert buf.rows()[:, 0].tolist() == [5, 6, 7, 8]
    buf.resize(10)
    buf.add_rows(_rows(9, 2))
    assert buf.rows()[:, 0].tolist() == [5, 6, 7, 8, 9, 10]


def test_split_layout():
    buf = ReplayBuffer(3, obs_dim=2, act_dim=1)
    buf.add(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]]), torch.tensor([4.0]),
            torch.tensor([[5.0, 6.0]]), torch.tensor([True]))
    b = buf.split(buf.rows())
    assert b.obs.tolist() == [[1, 2]] and b.act.tolist() == [[3]] and b.rew.tolist() == [4]
    assert b.next_obs.tolist() == [[5, 6]] and b.done.tolist() == [1]


def test_mixed_batch_real_ratio():
    real, model = ReplayBuffer(100, 1, 1), ReplayBuffer(100, 1, 1)
    real.add_rows(torch.zeros(50, 5))
    g = torch.Generator().manual_seed(0)
    assert (mixed_batch(real, model, 256, 0.05, g) == 0).all(), "no model data: all real"
    model.add_rows(torch.ones(50, 5))
    batch = mixed_batch(real, model, 256, 0.05, g)
    assert batch.shape == (256, 5) and int((batch[:, 0] == 0).sum()) == int(256 * 0.05)


def test_bad_capacity():
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        ReplayBuffer(0, 1, 1)
