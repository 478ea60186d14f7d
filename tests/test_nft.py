"""DiffusionNFT (docs/baselines.md): the loss equals a transcription of the reference's training step
on identical inputs, the optimality probability and the old-policy schedule by hand."""

import math

import pytest
import torch

from egrpo_backend.method.nft import (forward_noise, nft_loss, nft_timesteps, old_policy_decay, optimality_probability,
                               update_old_policy)
from egrpo_backend.method.schedule import shifted_sigmas


def reference_advantages(prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
    """The reference's per-prompt stat tracker with global_std: prompt mean, batch population std + 1e-4
    (DiffusionNFT flow_grpo/stat_tracking.py:17-31)."""
    r = rewards.double()
    out = torch.empty_like(r)
    std = r.std(unbiased=False) + 1e-4
    for p in set(prompts):
        sel = torch.tensor([q == p for q in prompts])
        out[sel] = (r[sel] - r[sel].mean()) / std
    return out


def reference_step(x0, noise, t, adv, forward, old, ref, nft_beta, kl_beta, adv_clip_max=5.0):
    """The reference's loss for one timestep of one micro-batch, transcribed step by step as a check
    (DiffusionNFT scripts/train_nft_sd3.py:862-870, :910-970)."""
    te = t.view(-1, *([1] * (x0.ndim - 1)))
    xt = (1 - te) * x0 + te * noise
    a = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    r = torch.clamp((a / adv_clip_max) / 2.0 + 0.5, 0, 1)
    positive = nft_beta * forward + (1 - nft_beta) * old.detach()
    negative = (1.0 + nft_beta) * old.detach() - nft_beta * forward
    dims = tuple(range(1, x0.ndim))
    x0_pos = xt - te * positive
    with torch.no_grad():
        w_pos = torch.abs(x0_pos.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    loss_pos = ((x0_pos - x0) ** 2 / w_pos).mean(dim=dims)
    x0_neg = xt - te * negative
    with torch.no_grad():
        w_neg = torch.abs(x0_neg.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    loss_neg = ((x0_neg - x0) ** 2 / w_neg).mean(dim=dims)
    policy = (r * loss_pos / nft_beta + (1.0 - r) * loss_neg / nft_beta) * adv_clip_max
    loss = policy.mean()
    kl = ((forward - ref) ** 2).mean(dim=dims)
    return loss + kl_beta * torch.mean(kl)


@pytest.mark.parametrize("nft_beta", [1.0, 0.1])
def test_nft_loss_equals_the_reference_on_identical_inputs(nft_beta):
    g = torch.Generator().manual_seed(0)
    B, shape = 48, (16, 8, 8)  # two prompts x G = 24, the reference's group size
    prompts = ["a"] * 24 + ["b"] * 24
    rewards = torch.randn(B, generator=g) + torch.tensor([0.0] * 24 + [3.0] * 24)
    rewards[0] = 100.0  # an outlier: its advantage (about 6.8) is clipped at 5, r = 1
    x0, noise = torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)
    sig = shifted_sigmas(10, 3.0)
    t = torch.tensor(sig[:-1], dtype=torch.float32)[torch.randint(0, 10, (B,), generator=g)]
    forward = torch.randn(B, *shape, generator=g)
    old = forward + 0.1 * torch.randn(B, *shape, generator=g)
    ref = forward + 0.05 * torch.randn(B, *shape, generator=g)

    fw_ref = forward.clone().requires_grad_(True)
    expect = reference_step(x0, noise, t, reference_advantages(prompts, rewards), fw_ref, old, ref, nft_beta, 1e-4)
    expect.backward()

    fw = forward.clone().requires_grad_(True)
    r = optimality_probability(rewards.view(2, 24)).flatten()  # [P, G]: prompts a and b
    assert r[0] == 1.0
    loss, metrics = nft_loss(fw, old, forward_noise(x0, noise, t), x0, t, r, nft_beta, v_ref=ref, kl_beta=1e-4)
    loss.backward()

    diff = (loss.double() - expect.double()).abs().item()
    grad_diff = (fw.grad - fw_ref.grad).abs().max().item()
    print(f"\nDiffusionNFT loss vs reference (beta {nft_beta}): loss {loss.item():.6f}, "
          f"max abs diff {diff:.3e}, max abs grad diff {grad_diff:.3e}")
    assert diff < 1e-5 and grad_diff < 1e-5
    assert metrics["kl"] > 0 and 0 <= metrics["r_mean"] <= 1


def test_on_policy_gradient_is_zero_at_r_half_and_flow_matching_at_r_one():
    """With v = v_old the two implicit policies coincide: r = 1/2 balances them (no gradient) and
    r = 1 gives adv_clip times the gradient of the weighted flow-matching loss of v itself."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    t = torch.tensor([0.8, 0.3])
    x_t = forward_noise(x0, eps, t)
    v_old = torch.randn(2, 4, 4, 4, generator=g)

    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, t, torch.full((2,), 0.5), 0.3)[0].backward()
    assert v.grad.abs().max() < 1e-6

    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, t, torch.ones(2), 0.3)[0].backward()
    fm = v_old.clone().requires_grad_(True)
    x0_pred = x_t - t.view(-1, 1, 1, 1) * fm
    w = (x0_pred - x0).abs().mean((1, 2, 3), keepdim=True).detach()
    (5.0 * ((x0_pred - x0) ** 2 / w).mean((1, 2, 3)).mean()).backward()
    torch.testing.assert_close(v.grad, fm.grad, atol=1e-5, rtol=1e-4)


def test_x0_error_is_t_times_the_velocity_error_against_eps_minus_x0():
    x0, eps, t, v = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.tensor([0.9, 0.5, 0.1]), torch.randn(3, 2, 2, 2)
    te = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(forward_noise(x0, eps, t) - te * v - x0, te * (eps - x0 - v), atol=1e-6, rtol=1e-5)


def test_optimality_probability_by_hand():
    r = optimality_probability(torch.tensor([[1.0, 3.0], [10.0, 14.0]]))
    # per-prompt means 2 and 12; population std of the batch sqrt(27.5); A / 5 / 2 + 1/2
    a = torch.tensor([[-1.0, 1.0], [-2.0, 2.0]]) / (math.sqrt(27.5) + 1e-4)
    torch.testing.assert_close(r, a / 10 + 0.5)
    assert optimality_probability(torch.ones(2, 4)).eq(0.5).all()  # no signal: both policies equally
    # One outlier among G = 40: A = sqrt(39) = 6.2 before clipping at 5 -> r = 1; the others
    # A = -1 / sqrt(39) -> r just below 1/2.
    far = optimality_probability(torch.tensor([[0.0] * 39 + [100.0]]))
    assert far[0, -1] == 1.0
    torch.testing.assert_close(far[0, 0], torch.tensor(0.5 - 100 / 40 / (100 * math.sqrt(39) / 40 + 1e-4) / 10))


def test_training_sigmas_are_a_fresh_permutation_per_sample():
    sig = shifted_sigmas(10, 3.0)
    ts = nft_timesteps(sig, 4, 0.99, torch.Generator().manual_seed(0))
    assert ts.shape == (4, 9)  # int(10 * 0.99)
    grid = torch.tensor(sig[:-1], dtype=torch.float32)
    for row in ts:
        assert len(set(row.tolist())) == 9 and torch.isin(row, grid).all() and (row > 0).all()
    assert len({tuple(row.tolist()) for row in ts}) > 1
    with pytest.raises(ValueError, match="trains no sigma"):
        nft_timesteps(sig, 1, 0.05, torch.Generator())


def test_old_policy_decay_schedules_and_ema():
    assert [old_policy_decay(s, 0) for s in (0, 500)] == [0.0, 0.0]
    assert [old_policy_decay(s, 1) for s in (0, 100, 1000)] == [0.0, pytest.approx(0.1), 0.5]
    assert [old_policy_decay(s, 2) for s in (74, 75, 175, 1000)] == [0.0, 0.0, pytest.approx(0.75), 0.999]
    with pytest.raises(ValueError, match="0, 1, 2"):
        old_policy_decay(1, 3)
    old, new = [torch.zeros(3)], [torch.ones(3)]
    update_old_policy(old, new, 0.25)
    torch.testing.assert_close(old[0], torch.full((3,), 0.75))
    with pytest.raises(ValueError, match="nft_beta"):
        nft_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), 0.5, torch.ones(1), 0.0)
