"""meanflow.train.data: the order in which teacher latents take their prompts."""
import torch

from meanflow.train.data import prompt_order


def test_prompt_order_uses_every_prompt_evenly():
    g = torch.Generator().manual_seed(0)
    for count, num in ((7, 7), (7, 20), (10, 3)):
        order = prompt_order(count, num, g)
        uses = torch.bincount(torch.tensor(order), minlength=count)
        assert len(order) == num and uses.max() - uses.min() <= 1
    assert prompt_order(5, 10, torch.Generator().manual_seed(1)) != prompt_order(5, 10, torch.Generator().manual_seed(2))
