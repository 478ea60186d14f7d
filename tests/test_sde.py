"""SPEC 2: the SDE step and its log-probability, against hand-written formulas."""

import math

import pytest
import torch

from egrpo_backend.method.sde import gaussian_kl, gaussian_log_prob, ode_step, sde_step


def test_log_prob_matches_hand_written_density():
    torch.manual_seed(0)
    x, mean = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    scale = torch.tensor([0.3, 1.7]).view(2, 1, 1, 1)
    got = gaussian_log_prob(x, mean, scale)
    for b in range(2):
        s = scale[b].item()
        dens = [math.log(1 / (s * math.sqrt(2 * math.pi)) * math.exp(-((xi - mi) ** 2) / (2 * s * s)))
                for xi, mi in zip(x[b].flatten().tolist(), mean[b].flatten().tolist())]
        assert got[b].item() == pytest.approx(sum(dens) / len(dens), rel=1e-5)


def test_sde_step_mean_and_scale_by_hand():
    x, v = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), -0.25)
    sigma, sigma_next, g = 0.8, 0.6, 0.7 * math.sqrt(0.8 / 0.2)
    dt = sigma_next - sigma
    mean = 0.5 * (1 + g * g * dt / (2 * sigma)) + -0.25 * (1 + g * g * (1 - sigma) / (2 * sigma)) * dt
    out = sde_step(x, v, sigma, sigma_next, g, noise=torch.zeros_like(x))
    assert out.mean.flatten()[0].item() == pytest.approx(mean, rel=1e-6)
    assert out.scale.item() == pytest.approx(g * math.sqrt(-dt), rel=1e-6)
    assert torch.equal(out.x_next, out.mean)  # zero noise -> the mean


def test_sampling_and_scoring_agree():
    torch.manual_seed(1)
    x, v, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    s, sn, g = torch.tensor([1.0, 0.7, 0.4]), torch.tensor([0.9, 0.5, 0.2]), torch.tensor([2.0, 1.0, 0.5])
    sampled = sde_step(x, v, s, sn, g, noise=noise)
    scored = sde_step(x, v, s, sn, g, x_next=sampled.x_next)
    torch.testing.assert_close(scored.log_prob, sampled.log_prob, rtol=0, atol=1e-6)
    # With the noise standard normal, log p = -0.5 mean(noise^2) - log(scale) - 0.5 log(2 pi).
    expect = -0.5 * (noise**2).mean((1, 2, 3)) - torch.log(sampled.scale.flatten()) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(sampled.log_prob, expect, rtol=1e-5, atol=1e-5)


def test_float32_even_from_bf16_inputs():
    x, v = torch.randn(2, 1, 4, 4, dtype=torch.bfloat16), torch.randn(2, 1, 4, 4, dtype=torch.bfloat16)
    out = sde_step(x, v, 0.5, 0.4, 0.7, noise=torch.randn(2, 1, 4, 4))
    assert out.x_next.dtype == out.log_prob.dtype == torch.float32
    assert ode_step(x, v, 0.5, 0.4).dtype == torch.float32


def test_ode_is_euler_and_the_zero_noise_limit():
    x, v = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(ode_step(x, v, 0.5, 0.3), x + v * -0.2)
    tiny = sde_step(x, v, 0.5, 0.3, 1e-6, noise=torch.zeros_like(x))
    torch.testing.assert_close(tiny.mean, x + v * -0.2, atol=1e-6, rtol=0)


def test_bad_calls_raise():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="exactly one"):
        sde_step(x, x, 0.5, 0.4, 0.7)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step(x, x, 0.4, 0.5, 0.7, noise=x)


def test_kl_between_equal_scale_gaussians():
    m1, m2 = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.3)
    kl = gaussian_kl(m1, m2, torch.tensor(0.5).view(1, 1, 1, 1))
    assert kl.item() == pytest.approx(0.09 / (2 * 0.25))
