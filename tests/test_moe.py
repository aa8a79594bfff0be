"""models/moe.py: the two-expert router of Wan2.2 A14B."""

from __future__ import annotations

import pytest
import torch

from models.components import build_dit
from models.moe import ExpertPair
from models.registry import get_spec


@pytest.fixture(scope="module")
def pair() -> ExpertPair:
    def expert(seed: int):
        torch.manual_seed(seed)
        dit = build_dit(get_spec("tiny-t2v").dit).eval()
        torch.nn.init.normal_(dit.head.head.weight, std=0.02)  # Wan's init zeroes the head: outputs would be 0
        return dit

    high, low = expert(0), expert(1)
    return ExpertPair(high, low, boundary=0.875)


def test_each_sample_goes_to_the_expert_of_its_timestep(pair):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 3, 8, 8, generator=g)
    ctx = torch.randn(4, 5, pair.high_noise_model.text_dim, generator=g)
    t = torch.tensor([999.0, 100.0, 875.0, 874.9])  # the boundary itself belongs to the high-noise expert
    with torch.no_grad():
        got = pair(x, t, ctx)
        for i, expert in enumerate([pair.high_noise_model, pair.low_noise_model, pair.high_noise_model,
                                    pair.low_noise_model]):
            want = expert(x[i:i + 1], t[i:i + 1], ctx[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)  # batch of 1 vs 2: float tolerance
    assert pair.is_high(t).tolist() == [True, False, True, False]
    assert pair.is_high(torch.tensor([[0.0, 900.0]])).tolist() == [True]  # per-token t: the noisy tokens' t
    assert pair.expert_for(875.0) is pair.high_noise_model and pair.expert_for(500) is pair.low_noise_model


def test_boundary_must_be_a_fraction():
    m = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"fraction of 1000"):
        ExpertPair(m, m, boundary=875)
