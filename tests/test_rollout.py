"""SPEC 4: grouped rollouts. A counting policy proves the cost formula and the sharing of work."""

import pytest
import torch

from egrpo_backend.method.guidance import GuidedVelocity
from egrpo_backend.method.rollout import coarse_grid, expected_nfe, rollout, window_steps
from egrpo_backend.method.schedule import build_plan, shifted_sigmas
from egrpo_backend.method.sde import ode_step, sde_step


class CountingPolicy:
    """A cheap analytic velocity field that counts every evaluated sample and records its sigma."""

    latent_shape = (1, 4, 4)
    device = torch.device("cpu")

    def __init__(self):
        self.rows, self.sigmas = 0, []

    def encode(self, prompts):
        return {"c": torch.tensor([[float(len(p))] for p in prompts])}

    def velocity(self, x, sigma, cond):
        self.rows += x.shape[0]
        self.sigmas.extend(sigma.tolist())
        return 0.5 * x - cond["c"].view(-1, 1, 1, 1) * 0.01 * (1 - sigma.view(-1, 1, 1, 1))

    def decode(self, latents):
        return ((latents + 1) / 2).clamp(0, 1)


def mean_pixel(images):
    return images.mean((1, 2, 3))


def rewards_of(policy, ro, G):
    """The mean-pixel reward of every member, as the trainer shapes rewards: [NG, n_gran, G]."""
    R, n_gran = ro.final.shape[:2]
    r = mean_pixel(policy.decode(ro.final.flatten(0, 1)))
    return r.reshape(R // G, G, n_gran).transpose(1, 2)


def generators(seed, n):
    return [torch.Generator().manual_seed(seed * 1000 + p) for p in range(n)]


PAPER = dict(eta=0.7, tau=2.2, active="0-7")


def run(policy, plan, starts, G=8, gran=(1,), window=1, shared=True, scale=1.0, seed=0, prompts=("a", "bb"), gens=None):
    uncond = policy.encode([""]) if scale != 1.0 else None
    velocity = GuidedVelocity(policy, policy.encode(list(prompts)), uncond=uncond, guidance_scale=scale)
    return rollout(velocity, plan, starts, gens or generators(seed, len(prompts)), group_size=G,
                   granularities=list(gran), sde_window=window, shared_initial_noise=shared)


def test_paper_setting_costs_672_evaluations_per_prompt():
    plan = build_plan(shifted_sigmas(16, 3.0), **PAPER)
    # By hand: anchor v_0..v_7 = 8; branch steps reuse the anchor's v; ODE finishes from
    # targets [1,2,4,5,6,8,9,10] take [15,14,12,11,10,8,7,6] = 83 steps, times G = 8 -> 664.
    assert expected_nfe(plan, plan.active, 8, [1]) == 672
    policy = CountingPolicy()
    ro = run(policy, plan, plan.active)
    assert policy.rows == ro.nfe == 2 * 672


@pytest.mark.parametrize("gran,window,shared,scale,starts", [
    ((1, 2), 1, True, 1.0, None),
    ((1,), 1, True, 4.5, None),
    ((1, 3), 2, True, 1.0, [2, 5]),
    ((1,), 0, False, 1.0, [0]),
    ((2,), 4, True, 1.0, [3]),
])
def test_counted_evaluations_equal_the_formula(gran, window, shared, scale, starts):
    plan = build_plan(shifted_sigmas(16, 3.0), **PAPER)
    starts = starts or plan.active
    policy = CountingPolicy()
    ro = run(policy, plan, starts, G=4, gran=gran, window=window, shared=shared, scale=scale)
    per_prompt = expected_nfe(plan, starts, 4, list(gran), window, shared, scale)
    assert ro.nfe == 2 * per_prompt
    assert policy.rows * (2 if scale != 1.0 else 1) == ro.nfe * (2 if scale != 1.0 else 1)


def test_branch_inputs_are_shared_and_come_from_the_anchor():
    plan = build_plan(shifted_sigmas(16, 3.0), **PAPER)
    policy = CountingPolicy()
    ro = run(policy, plan, plan.active, G=8)
    n_groups = 2 * 8
    assert ro.input_x.shape[0] == n_groups  # one unique input per group, shared by its 8 members
    assert ro.x_next.shape[0] == n_groups * 8
    assert torch.equal(ro.input_id, torch.arange(n_groups).repeat_interleave(8))
    # Rebuild the anchor by hand for prompt 0 and check the state of group (prompt 0, step 4).
    x = torch.randn((1, 1, 4, 4), generator=generators(0, 1)[0])
    cond = policy.encode(["a"])
    for k in range(4):
        x = ode_step(x, policy.velocity(x, torch.tensor([plan.sigmas[k]]), cond), plan.sigmas[k], plan.sigmas[k + 1])
    g4 = (ro.group_prompt == 0) & (ro.group_start == 4)
    torch.testing.assert_close(ro.input_x[g4.nonzero()[0, 0]], x[0])
    # The recorded old log-prob is the log-density of the recorded transition.
    idx = (ro.input_id == g4.nonzero()[0, 0]).nonzero().squeeze(1)
    v = policy.velocity(x, torch.tensor([plan.sigmas[4]]), cond).expand(len(idx), -1, -1, -1)
    out = sde_step(x.expand(len(idx), -1, -1, -1), v, plan.sigmas[4], plan.sigmas[6], plan.g[4], x_next=ro.x_next[idx])
    torch.testing.assert_close(out.log_prob, ro.log_prob[idx], atol=1e-6, rtol=0)
    # Members took independent noise: their next states differ.
    assert ro.x_next[idx].std(0).mean() > 0.01


def test_rewards_have_group_shape_and_rollouts_are_reproducible():
    plan = build_plan(shifted_sigmas(8, 3.0), 0.7, 2.2, "0-3")
    policy = CountingPolicy()
    a = run(policy, plan, plan.active, G=4, gran=(1, 2), seed=3)
    b = run(policy, plan, plan.active, G=4, gran=(1, 2), seed=3)
    c = run(policy, plan, plan.active, G=4, gran=(1, 2), seed=4)
    assert rewards_of(policy, a, 4).shape == (2 * 4, 2, 4)
    assert torch.equal(rewards_of(policy, a, 4), rewards_of(policy, b, 4)) and torch.equal(a.x_next, b.x_next)
    assert not torch.equal(rewards_of(policy, a, 4), rewards_of(policy, c, 4))


def test_coarse_grid_always_ends_at_zero():
    s = [0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
    assert coarse_grid(s, 1) == s
    assert coarse_grid(s, 2) == [0.9, 0.5, 0.1, 0.0]
    assert coarse_grid(s, 3) == [0.9, 0.3, 0.0]
    assert coarse_grid([0.0], 2) == [0.0]


def test_window_steps_follow_merge_widths():
    plan = build_plan(shifted_sigmas(16, 3.0), **PAPER)
    assert window_steps(plan, 2, 1) == [(2, 4)]
    assert window_steps(plan, 5, 2) == [(5, 8), (8, 12)]  # step 8 is ODE in the plan: its width follows tau too
    assert window_steps(plan, 14, 0) == [(14, 16)]  # no width reaches tau: merge to the end (DECIDED)
    single = build_plan(shifted_sigmas(16, 3.0), 0.7, 0.0, "all")
    assert window_steps(single, 14, 0) == [(14, 15), (15, 16)]


@pytest.mark.parametrize("shared", [True, False])
def test_a_prompts_rollout_does_not_depend_on_the_other_prompts(shared):
    """Noise comes from each prompt's own generator (seed, iteration, prompt slot): prompt "bb" rolled
    out alone gives the same latents and log-probs as beside other prompts, first or last."""
    plan = build_plan(shifted_sigmas(16, 3.0), **PAPER)
    policy = CountingPolicy()

    def gen(slot):
        return torch.Generator().manual_seed(100 + slot)

    alone = run(policy, plan, plan.active, G=4, shared=shared, prompts=("bb",), gens=[gen(7)])
    together = run(policy, plan, plan.active, G=4, shared=shared, prompts=("a", "bb", "ccc"), gens=[gen(1), gen(7), gen(9)])
    mine = together.member_prompt == 1
    torch.testing.assert_close(together.final[mine], alone.final, rtol=0, atol=0)
    t_mine = torch.isin(together.member, mine.nonzero().squeeze(1))
    assert torch.equal(together.log_prob[t_mine], alone.log_prob)
    assert torch.equal(together.x_next[t_mine], alone.x_next)


def test_a_prompts_rollout_does_not_depend_on_the_batch_with_a_real_transformer():
    """The same with a tiny real SD3 transformer: equal to float rounding of batched matmuls."""
    from tiny_models import make_policy

    policy = make_policy("sd3")
    plan = build_plan(shifted_sigmas(6, 3.0), 0.7, 2.2, "0-2")
    alone = run(policy, plan, plan.active, G=2, prompts=("a blue sphere",), gens=[generators(5, 1)[0]])
    both = run(policy, plan, plan.active, G=2, prompts=("a red cube", "a blue sphere"),
               gens=[generators(9, 1)[0], generators(5, 1)[0]])
    mine = both.member_prompt == 1
    torch.testing.assert_close(both.final[mine], alone.final, rtol=0, atol=1e-5)
    t_mine = torch.isin(both.member, mine.nonzero().squeeze(1))
    torch.testing.assert_close(both.log_prob[t_mine], alone.log_prob, rtol=0, atol=1e-5)
