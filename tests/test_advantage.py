"""Group advantages (one std rule per reference, docs/baselines.md) and the clipped objective,
with hand-computed values."""

import math

import pytest
import torch

from egrpo_backend.method.advantage import ADVANTAGE_MODES, advantages, normalise
from egrpo_backend.method.objective import clipped_objective


def test_hand_computed_group_advantage():
    r = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # 1 group, 1 granularity, G = 4
    # mean 2.5; unbiased std sqrt(5/3) = 1.2910 (group), population std sqrt(1.25) = 1.1180 (group_population)
    torch.testing.assert_close(advantages(r), torch.tensor([[-1.1619, -0.3873, 0.3873, 1.1619]]), atol=1e-4, rtol=0)
    expect_pop = torch.tensor([[-1.3416, -0.4472, 0.4472, 1.3416]])
    torch.testing.assert_close(advantages(r, advantage="group_population"), expect_pop, atol=1e-4, rtol=0)


def test_unbiased_group_std_is_sqrt_g_over_g_minus_1_times_population_std():
    torch.manual_seed(3)
    r = torch.randn(5, 1, 8)  # G = 8
    pop, unb = normalise(r, "group_population"), normalise(r, "group")
    # A_group = A_population / sqrt(8 / 7): the population std is 6.9% smaller.
    torch.testing.assert_close(unb * math.sqrt(8 / 7), pop, atol=1e-5, rtol=1e-5)
    assert math.sqrt(8 / 7) == pytest.approx(1.069, abs=1e-3)


def test_group_modes_add_eps_1e8_and_flow_grpo_adds_1e4():
    r = torch.tensor([[[0.0, 1e-4]]])  # G = 2, mean 5e-5
    # population std 5e-5: (+-5e-5) / (5e-5 + 1e-8) and / (5e-5 + 1e-4)
    torch.testing.assert_close(normalise(r, "group_population").flatten(), torch.tensor([-1.0, 1.0]) * 5e-5 / (5e-5 + 1e-8))
    flow = normalise(r, "prompt_mean_batch_std", torch.tensor([0])).flatten()
    torch.testing.assert_close(flow, torch.tensor([-1.0, 1.0]) * 5e-5 / (5e-5 + 1e-4))
    # unbiased std of two values d apart is d / sqrt(2)
    torch.testing.assert_close(normalise(r, "group").flatten(), torch.tensor([-1.0, 1.0]) * 5e-5 / (1e-4 / math.sqrt(2) + 1e-8))


def test_zero_mean_unit_std_within_each_group():
    torch.manual_seed(0)
    r = torch.randn(6, 1, 8) * torch.arange(1, 7).view(6, 1, 1) + torch.arange(6).view(6, 1, 1) * 10
    a = advantages(r, clip=100.0)
    torch.testing.assert_close(a.mean(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.std(1), torch.ones(6), atol=1e-5, rtol=0)  # unbiased, like the mode
    p = advantages(r, clip=100.0, advantage="group_population")
    torch.testing.assert_close(p.std(1, unbiased=False), torch.ones(6), atol=1e-5, rtol=0)


def test_groups_never_mix():
    torch.manual_seed(1)
    r = torch.randn(4, 1, 8)
    a = advantages(r)
    r2 = r.clone()
    r2[1:] = r2[1:] * 100 + 50  # change every other group
    torch.testing.assert_close(advantages(r2)[0], a[0])


def test_granularities_normalised_separately_then_summed_and_clipped():
    r = torch.tensor([[[0.0, 1.0], [10.0, 30.0]]])  # two granularities of one group, G = 2
    # Each row normalises to +-1 (population std) or +-sqrt(1/2) (unbiased), whatever its scale.
    torch.testing.assert_close(advantages(r, advantage="group_population"), torch.tensor([[-2.0, 2.0]]), atol=1e-6, rtol=0)
    h = math.sqrt(0.5)
    torch.testing.assert_close(advantages(r), torch.tensor([[-2 * h, 2 * h]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages(r, clip=1.0), torch.tensor([[-1.0, 1.0]]))


def test_identical_rewards_give_zero_advantage():
    assert advantages(torch.ones(2, 1, 4)).abs().max() == 0


def test_per_reward_normalisation():
    a = torch.tensor([[[1.0, 2.0]]])
    b = torch.tensor([[[200.0, 100.0]]])  # large scale, opposite order
    # weighted sum: b dominates. per-reward: each normalised to +-1, then weighted.
    ws = advantages(a + b, advantage="group_population")
    pr = advantages(a + b, advantage="group_population", components={"a": a, "b": b}, weights={"a": 2.0, "b": 1.0})
    torch.testing.assert_close(ws, torch.tensor([[1.0, -1.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(pr, torch.tensor([[-1.0, 1.0]]), atol=1e-6, rtol=0)


def test_flow_grpo_prompt_mean_batch_std():
    r = torch.tensor([[[0.0, 2.0]], [[4.0, 6.0]]])  # two groups of the same prompt
    out = normalise(r, "prompt_mean_batch_std", torch.tensor([0, 0]))
    std = math.sqrt(5.0)  # population std of 0, 2, 4, 6 (mean 3): sqrt((9 + 1 + 1 + 9) / 4)
    torch.testing.assert_close(out.flatten(), (torch.tensor([0.0, 2.0, 4.0, 6.0]) - 3.0) / (std + 1e-4))


def test_flow_grpo_fast_per_prompt_mean_over_global_std():
    # Two prompts with different means: each centred on its own mean, all scaled by one batch std.
    r = torch.tensor([[[1.0, 3.0]], [[10.0, 14.0]]])
    out = normalise(r, "prompt_mean_batch_std", torch.tensor([0, 1])).flatten()
    std = torch.tensor([1.0, 3.0, 10.0, 14.0]).std(unbiased=False).item()  # by hand: mean 7, sqrt((36 + 16 + 9 + 49) / 4)
    assert std == pytest.approx(math.sqrt(27.5), rel=1e-6)
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (std + 1e-4))


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: " + ", ".join(ADVANTAGE_MODES)):
        normalise(torch.zeros(1, 1, 2), "nope")


def test_clipped_objective_hand_values():
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    t = clipped_objective(new, old, adv, clip_range=0.2)
    # r=1: -1 | r=1.5, A=1: max(-1.5, -1.2) = -1.2 | r=0.5, A=-1: max(0.5, 0.8) = 0.8 | r=1.5, A=-1: max(1.5, 1.2) = 1.5
    torch.testing.assert_close(t.loss, torch.tensor([-1.0, -1.2, 0.8, 1.5]))
    assert t.clipped.tolist() == [False, True, True, False]
    torch.testing.assert_close(t.ratio, torch.tensor([1.0, 1.5, 0.5, 1.5]))
