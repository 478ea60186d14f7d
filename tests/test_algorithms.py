"""Each preset's defining behaviour: where groups branch, which steps are SDE, how advantages form;
and the helpers for the reference behaviours that need new AlgorithmSpec fields (docs/baselines.md)."""

import dataclasses

import pytest
import torch

from egrpo_backend.method.advantage import advantages
from egrpo_backend.method.algorithms import (LOSSES, PRESETS, branch_starts, coarse_grid_authors, sliding_window, train_mask,
                                      trained_count)
from egrpo_backend.config import AlgorithmSpec, JobSpec
from egrpo_backend.method.guidance import GuidedVelocity
from egrpo_backend.method.rollout import coarse_grid, expected_nfe, finish_grid, rollout
from egrpo_backend.method.schedule import shifted_sigmas
from egrpo_backend.method.sde import flow_grpo_kl, gaussian_kl
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
                 granularities=a.granularities, sde_window=a.sde_window, shared_initial_noise=a.shared_initial_noise,
                 window_last_step=plan.active[-1] if a.window_within_active else None)
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
    assert rewards.shape == (2 * 8, 2, 4)  # the authors' config: granularities [1, 2]


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
    adv = advantages(rewards, advantage=a.advantage, group_prompt=ro.group_prompt)
    r = rewards[:, 0]
    expect = (r - r.mean(1, keepdim=True)) / (r.std(unbiased=False) + 1e-4)  # Flow-GRPO: population std + 1e-4
    torch.testing.assert_close(adv, expect.clamp(-5, 5), atol=1e-5, rtol=1e-5)


def test_flowgrpo_fast_two_sde_steps_at_a_random_step_with_independent_noise():
    a = algo("flowgrpo_fast")
    plan = a.plan()
    starts = {tuple(branch_starts(a, plan, it, torch.Generator().manual_seed(it))) for it in range(200)}
    # randint(0, T - 2) like the reference's window range (0, T): the window may hold the last step
    assert all(len(s) == 1 and s[0] in range(15) for s in starts) and {(0,), (14,)} <= starts
    assert not a.shared_initial_noise and a.advantage == "prompt_mean_batch_std"
    _, _, ro, rewards = roll(a)
    assert int(ro.window_pos.max()) == 1  # two SDE steps per member, ODE elsewhere


def test_mixgrpo_window_moves_every_25_iterations():
    a = algo("mixgrpo")
    plan = a.plan()
    assert plan.active == list(range(14))  # 0..T-3 at T = 16
    assert [branch_starts(a, plan, it, torch.Generator())[0] for it in (0, 24, 25, 49, 50, 349, 350)] == [0, 0, 1, 1, 2, 13, 0]
    _, _, ro, rewards = roll(a, iteration=75)
    assert int(ro.window_pos.max()) == 3 and ro.input_step.min() == 3
    assert a.reward_mode == "per_reward"  # the reference's advantage_aggr


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


# ---------------------------------------------------------------- helpers for the pending fields


def test_mixgrpo_window_positions_and_roll_back():
    """At T = 16 the window starts run over 0..13 (T - 3) and move every 25 iterations."""
    active = list(range(14))
    w = lambda it, **kw: sliding_window(it, active, 4, 25, **kw)  # noqa: E731
    assert w(0) == w(24) == [0, 1, 2, 3]
    assert w(25) == [1, 2, 3, 4]
    assert w(275) == [11, 12, 13] and w(349) == [13]  # cut at the last active step, like MixGRPO's min(., T - 2)
    assert w(350) == [0, 1, 2, 3]  # 14 positions x 25 iterations: roll back
    assert w(350, rollback=False) == [13] and w(10_000, rollback=False) == [13]
    assert w(275, within_active=False) == [11, 12, 13, 14]
    # The reference's own grid, T = 25: starts 0..22; it rolls back after 24 x 25 = 600 iterations
    # because it also visits the empty window at 23; skipping that position rolls back at 575.
    ref = list(range(23))
    assert sliding_window(0, ref, 4, 25) == sliding_window(24, ref, 4, 25) == [0, 1, 2, 3]
    assert sliding_window(25, ref, 4, 25) == [1, 2, 3, 4]
    assert sliding_window(574, ref, 4, 25) == [22] and sliding_window(575, ref, 4, 25) == [0, 1, 2, 3]


def test_authors_granularity_grid_takes_one_fine_step_then_strides():
    sig = shifted_sigmas(16, 3.0)
    idx = lambda grid: [sig.index(s) for s in grid]  # noqa: E731
    # Branch 0 -> 1, g = 2: one fine step 1 -> 2, then every 2nd; the stride lands on sigma_16 = 0.
    assert idx(coarse_grid_authors(sig[1:], 2)) == [1, 2, 4, 6, 8, 10, 12, 14, 16]
    # E-GRPO's merged branch 2 -> 4 (width 2), g = 2: fine step 4 -> 5, then 7, 9, 11, 13; the next
    # kept sigma would be 15, and the authors' x0-prediction from 13 replaces it by 0.
    assert idx(coarse_grid_authors(sig[4:], 2)) == [4, 5, 7, 9, 11, 13, 16]
    assert idx(coarse_grid(sig[4:], 2)) == [4, 6, 8, 10, 12, 14, 16]  # ours strided from the branch end
    assert coarse_grid_authors(sig[4:], 1) == sig[4:]
    assert coarse_grid_authors([0.5, 0.3, 0.0], 2) == [0.5, 0.0]  # the fine step would be the last
    assert coarse_grid_authors([0.0], 2) == [0.0]  # branch already at sigma = 0: no step


def _members(G=4, groups=2, T=16):
    """Transitions of members that run every step 0..T-1 as SDE (DanceGRPO, Flow-GRPO)."""
    sig = shifted_sigmas(T, 3.0)
    member = torch.arange(groups * G).repeat_interleave(T)
    pos = torch.arange(T).repeat(groups * G)
    return pos, member, torch.tensor(sig[1:]).repeat(groups * G)


def test_dance_trains_9_of_the_15_steps_before_the_last_drawn_per_member():
    assert trained_count(15, 0.6) == 9 and trained_count(16, 0.6) == 9 and trained_count(3, 0.1) == 1
    pos, member, sigma_next = _members()
    keep = train_mask(pos, member, sigma_next, group_size=4, fraction=0.6, train_last_step=False,
                      subset="per_sample", gen=torch.Generator().manual_seed(0))
    per_member = [set(pos[keep & (member == m)].tolist()) for m in range(8)]
    assert all(len(s) == 9 and 15 not in s for s in per_member)
    assert len({tuple(sorted(s)) for s in per_member}) > 1  # a fresh draw per member
    grouped = train_mask(pos, member, sigma_next, group_size=4, fraction=0.6, train_last_step=True,
                         subset="per_group", gen=torch.Generator().manual_seed(0))
    sets = [tuple(sorted(pos[grouped & (member == m)].tolist())) for m in range(8)]
    assert len(set(sets[:4])) == 1 and len(set(sets[4:])) == 1 and len(sets[0]) == 9  # int(16 * 0.6)
    with pytest.raises(ValueError, match="per_group, per_sample"):
        train_mask(pos, member, sigma_next, group_size=4, fraction=0.6, train_last_step=True, subset="x",
                   gen=torch.Generator())


def test_flowgrpo_never_trains_the_last_step():
    pos, member, sigma_next = _members()
    keep = train_mask(pos, member, sigma_next, group_size=4, fraction=1.0, train_last_step=False,
                      subset="per_group", gen=torch.Generator())
    assert keep.sum() == 8 * 15 and not keep[pos == 15].any()
    assert train_mask(pos, member, sigma_next, group_size=4, fraction=1.0, train_last_step=True,
                      subset="per_group", gen=torch.Generator()).all()


def test_flow_grpo_kl_at_a_hand_computed_point():
    mean_p, mean_q = torch.full((2, 1, 2, 2), 0.3), torch.zeros(2, 1, 2, 2)
    g, dt = torch.tensor([0.5, 1.0]), 0.1
    # (0.3)^2 / (2 g^2): 0.09 / 0.5 = 0.18 and 0.09 / 2 = 0.045
    torch.testing.assert_close(flow_grpo_kl(mean_p, mean_q, g), torch.tensor([0.18, 0.045]))
    # ours divides by the transition variance g^2 |dt|: 1/|dt| = 10 times larger
    ours = gaussian_kl(mean_p, mean_q, (g * dt**0.5).view(2, 1, 1, 1))
    torch.testing.assert_close(ours * dt, flow_grpo_kl(mean_p, mean_q, g))


def test_every_preset_is_a_valid_spec_and_names_its_loss():
    existing = {f.name for f in dataclasses.fields(AlgorithmSpec)}
    for preset, values in PRESETS.items():
        assert set(values) <= existing, preset
        assert algo(preset).loss in LOSSES
    assert {p for p in PRESETS if algo(p).loss == "nft"} == {"nft", "nft_multi_reward"}


def test_wired_reference_fields_per_preset_and_their_validation():
    assert (algo("dance").train_last_step, algo("dance").train_subset) == (False, "per_sample")
    assert (algo("flowgrpo").train_last_step, algo("flowgrpo").kl_form) == (False, "flow_grpo")
    assert algo("flowgrpo_fast").kl_form == "flow_grpo" and algo("egrpo").kl_form == "gaussian"
    assert algo("egrpo").train_last_step and algo("egrpo").train_subset == "per_group"
    for bad in ({"kl_form": "x"}, {"train_subset": "x"}, {"train_last_step": 1}, {"slide_rollback": "no"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            JobSpec.from_dict({"algorithm": {"preset": "egrpo", **bad}})


def test_mixgrpo_branch_stays_at_the_last_step_without_roll_back():
    a, b = algo("mixgrpo"), algo("mixgrpo", slide_rollback=False)
    plan = a.plan()
    start = lambda spec, it: branch_starts(spec, plan, it, torch.Generator())[0]  # noqa: E731
    assert [start(a, it) for it in (0, 24, 25, 349, 350)] == [0, 0, 1, 13, 0]
    assert [start(b, it) for it in (0, 24, 25, 349, 350, 10_000)] == [0, 0, 1, 13, 13, 13]


def test_rollout_finishes_on_the_authors_grid_by_default_and_strided_on_request():
    """E-GRPO's merged branch 2 -> 4 at g = 2: authors 4, 5, 7, .., 13, 0; strided 4, 6, .., 14, 0."""
    a = algo("egrpo", granularities=[1, 2])
    assert a.granularity_grid == "authors"
    plan = a.plan()
    sig = list(plan.sigmas)
    assert [sig.index(s) for s in finish_grid(sig[4:], 2)] == [4, 5, 7, 9, 11, 13, 16]
    assert [sig.index(s) for s in finish_grid(sig[4:], 2, "strided")] == [4, 6, 8, 10, 12, 14, 16]

    def finals(kind):
        policy = CountingPolicy()
        velocity = GuidedVelocity(policy, policy.encode(["p0"]))
        ro = rollout(velocity, plan, [2], generators(0, 1), group_size=2, granularities=[1, 2], granularity_grid=kind)
        assert ro.nfe == expected_nfe(plan, [2], 2, [1, 2], granularity_grid=kind)
        return ro.final

    ours, authors = finals("strided"), finals("authors")
    assert torch.equal(ours[:, 0], authors[:, 0]) and not torch.equal(ours[:, 1], authors[:, 1])
    with pytest.raises(ValueError, match="granularity_grid"):
        algo("egrpo", granularity_grid="fine")


def test_mixgrpo_window_is_cut_at_the_last_active_step():
    """Window 4 over starts 0..13 at T = 16: at iteration 275 it starts at 11 and holds 11, 12, 13."""
    a = algo("mixgrpo")
    assert a.window_within_active
    _, starts, ro, _ = roll(a, iteration=275)
    assert starts == [11] and sorted(ro.input_step.unique().tolist()) == [11, 12, 13]
    _, _, ro, _ = roll(a, iteration=349)
    assert ro.input_step.unique().tolist() == [13]
    _, _, ro, _ = roll(algo("mixgrpo", window_within_active=False), iteration=275)
    assert sorted(ro.input_step.unique().tolist()) == [11, 12, 13, 14]
