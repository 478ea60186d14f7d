"""SPEC 5 and 6: group advantages and the clipped objective, with hand-computed values."""

import pytest
import torch

from egrpo_backend.advantage import advantages, normalise
from egrpo_backend.objective import clipped_objective


def test_hand_computed_group_advantage():
    r = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # 1 group, 1 granularity, G = 4
    # mean 2.5, population std sqrt(1.25) = 1.1180
    expect = torch.tensor([[-1.3416, -0.4472, 0.4472, 1.3416]])
    torch.testing.assert_close(advantages(r), expect, atol=1e-4, rtol=0)


def test_zero_mean_unit_std_within_each_group():
    torch.manual_seed(0)
    r = torch.randn(6, 1, 8) * torch.arange(1, 7).view(6, 1, 1) + torch.arange(6).view(6, 1, 1) * 10
    a = advantages(r, clip=100.0)
    torch.testing.assert_close(a.mean(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.std(1, unbiased=False), torch.ones(6), atol=1e-5, rtol=0)


def test_groups_never_mix():
    torch.manual_seed(1)
    r = torch.randn(4, 1, 8)
    a = advantages(r)
    r2 = r.clone()
    r2[1:] = r2[1:] * 100 + 50  # change every other group
    torch.testing.assert_close(advantages(r2)[0], a[0])


def test_granularities_normalised_separately_then_summed_and_clipped():
    r = torch.tensor([[[0.0, 1.0], [10.0, 30.0]]])  # two granularities of one group, G = 2
    torch.testing.assert_close(advantages(r, clip=5.0), torch.tensor([[-2.0, 2.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages(r, clip=1.5), torch.tensor([[-1.5, 1.5]]))


def test_identical_rewards_give_zero_advantage():
    assert advantages(torch.ones(2, 1, 4)).abs().max() == 0


def test_per_reward_normalisation():
    a = torch.tensor([[[1.0, 2.0]]])
    b = torch.tensor([[[200.0, 100.0]]])  # large scale, opposite order
    # weighted sum: b dominates. per-reward: each normalised to +-1, then weighted.
    ws = advantages(a + b)
    pr = advantages(a + b, components={"a": a, "b": b}, weights={"a": 2.0, "b": 1.0})
    torch.testing.assert_close(ws, torch.tensor([[1.0, -1.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(pr, torch.tensor([[-1.0, 1.0]]), atol=1e-6, rtol=0)


def test_flow_grpo_prompt_mean_batch_std():
    r = torch.tensor([[[0.0, 2.0]], [[4.0, 6.0]]])  # two groups of the same prompt
    out = normalise(r, "prompt_mean_batch_std", torch.tensor([0, 0]))
    std = torch.tensor([0.0, 2.0, 4.0, 6.0]).std(unbiased=False)
    torch.testing.assert_close(out.flatten(), (torch.tensor([0.0, 2.0, 4.0, 6.0]) - 3.0) / std)
    with pytest.raises(ValueError, match="valid"):
        normalise(r, "nope")


def test_clipped_objective_hand_values():
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    t = clipped_objective(new, old, adv, clip_range=0.2)
    # r=1: -1 | r=1.5, A=1: max(-1.5, -1.2) = -1.2 | r=0.5, A=-1: max(0.5, 0.8) = 0.8 | r=1.5, A=-1: max(1.5, 1.2) = 1.5
    torch.testing.assert_close(t.loss, torch.tensor([-1.0, -1.2, 0.8, 1.5]))
    assert t.clipped.tolist() == [False, True, True, False]
    torch.testing.assert_close(t.ratio, torch.tensor([1.0, 1.5, 0.5, 1.5]))
