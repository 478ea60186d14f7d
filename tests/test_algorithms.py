"""Each preset's defining behaviour: where groups branch, which steps are SDE, how advantages form."""

import pytest
import torch

from egrpo_backend.advantage import advantages
from egrpo_backend.algorithms import PRESETS
from egrpo_backend.config import AlgorithmSpec, JobSpec
from egrpo_backend.rollout import rollout
from egrpo_backend.algorithms import branch_starts
from egrpo_backend.guidance import GuidedVelocity
from test_rollout import CountingPolicy, generators, rewards_of


def algo(preset, **over):
    return JobSpec.from_dict({"model": {"source": "default"}, "algorithm": {"preset": preset, **over}}).algorithm


def roll(a, iteration=0, prompts=("p0", "p1"), G=4):
    plan = a.plan()
    gen = torch.Generator().manual_seed(iteration)
    starts = branch_starts(a, plan, iteration, gen)
    policy = CountingPolicy()
    velocity = GuidedVelocity(policy, policy.encode(list(prompts)))
    ro = rollout(velocity, plan, starts, generators(iteration, len(prompts)), group_size=G,
                 granularities=a.granularities, sde_window=a.sde_window, shared_initial_noise=a.shared_initial_noise)
    return plan, starts, ro, rewards_of(policy, ro, G)


def test_egrpo_one_merged_sde_step_per_active_step():
    a = algo("egrpo")
    plan, starts, ro, rewards = roll(a)
    assert starts == list(range(8))
    # Every transition is one consolidated step n -> n + l_n with l from the entropy plan.
    widths = [1, 1, 2, 2, 2, 3, 3, 3]
    sig = torch.tensor(plan.sigmas, dtype=torch.float32)
    expect_next = torch.tensor([float(sig[n + widths[n]]) for n in ro.input_step.tolist()])
    torch.testing.assert_close(ro.sigma_next[ro.input_id.argsort(stable=True)], expect_next.repeat_interleave(4))
    assert rewards.shape == (2 * 8, 1, 4)


def test_granular_is_egrpo_with_tau_zero_and_two_granularities():
    a = algo("granular")
    plan, starts, ro, rewards = roll(a)
    assert [s.merge for s in plan.steps[:8]] == [1] * 8
    assert rewards.shape == (2 * 8, 2, 4)  # one reward row per granularity
    # tau = 0 reproduces Granular-GRPO exactly: same rollout as E-GRPO settings with tau 0.
    _, _, ro2, rewards2 = roll(algo("egrpo", tau=0.0, granularities=[1, 2]))
    assert torch.equal(rewards, rewards2) and torch.equal(ro.x_next, ro2.x_next)


def test_egrpo_fast_samples_a_subset_of_active_steps():
    a = algo("egrpo_fast")
    plan = a.plan()
    picks = [branch_starts(a, plan, it, torch.Generator().manual_seed(it)) for it in range(200)]
    assert all(len(p) == 2 and set(p) <= set(range(8)) for p in picks)
    _, _, ro, rewards = roll(a)
    full = roll(algo("egrpo"))[2]
    assert ro.nfe < full.nfe / 2  # a fraction of full E-GRPO's rollout cost
    # Entropy weighting prefers the high-entropy (early) steps.
    w = algo("egrpo_fast", branch_weighting="entropy")
    counts = torch.zeros(8)
    for it in range(400):
        for s in branch_starts(w, plan, it, torch.Generator().manual_seed(it)):
            counts[s] += 1
    assert counts[:2].sum() > counts[6:].sum()


def test_dance_all_steps_sde_with_constant_diffusion_and_a_step_subset():
    a = algo("dance")
    plan, starts, ro, rewards = roll(a)
    assert starts == [0] and all(g == pytest.approx(0.3) for g in plan.g)
    assert ro.x_next.shape[0] == 2 * 4 * 16  # every member takes all 16 steps as SDE
    assert int(ro.window_pos.max()) == 15
    assert a.train_fraction == 0.6


def test_flowgrpo_independent_noise_and_batch_std_advantage():
    a = algo("flowgrpo")
    plan, starts, ro, rewards = roll(a)
    assert starts == [0] and not a.shared_initial_noise
    first = ro.window_pos == 0
    assert ro.input_id[first].unique().numel() == first.sum()  # no shared input: members start apart
    assert a.advantage == "prompt_mean_batch_std"
    adv = advantages(rewards, mode=a.advantage, group_prompt=ro.group_prompt)
    r = rewards[:, 0]
    expect = (r - r.mean(1, keepdim=True)) / (r.std(unbiased=False) + 1e-8)
    torch.testing.assert_close(adv, expect.clamp(-5, 5), atol=1e-5, rtol=1e-5)


def test_flowgrpo_fast_two_sde_steps_at_a_random_active_step():
    a = algo("flowgrpo_fast")
    plan = a.plan()
    starts = {tuple(branch_starts(a, plan, it, torch.Generator().manual_seed(it))) for it in range(50)}
    assert all(len(s) == 1 and s[0] in range(8) for s in starts) and len(starts) > 3
    _, _, ro, rewards = roll(a)
    assert int(ro.window_pos.max()) == 1  # two SDE steps per member, ODE elsewhere


def test_mixgrpo_window_slides_each_iteration():
    a = algo("mixgrpo")
    plan = a.plan()
    assert [branch_starts(a, plan, it, torch.Generator())[0] for it in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    _, _, ro, rewards = roll(a, iteration=3)
    assert int(ro.window_pos.max()) == 3 and ro.input_step.min() == 3


def test_presets_are_overridable_and_validated():
    assert algo("granular", granularities=[1]).tau == 0.0
    assert algo("dance", eta=0.5).eta == 0.5
    with pytest.raises(ValueError, match="preset"):
        algo("grpo")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_applies_however_the_spec_is_built(preset):
    """AlgorithmSpec(preset=...) built directly equals the same preset loaded from a dict."""
    direct = AlgorithmSpec(preset=preset)
    loaded = JobSpec.from_dict({"algorithm": {"preset": preset}}).algorithm
    assert direct == loaded
    for key, value in PRESETS[preset].items():
        assert getattr(direct, key) == value, key
    # An explicit value wins over the preset's, in both constructions.
    assert AlgorithmSpec(preset=preset, eta=0.55).eta == 0.55
    assert JobSpec.from_dict({"algorithm": {"preset": preset, "eta": 0.55}}).algorithm.eta == 0.55
