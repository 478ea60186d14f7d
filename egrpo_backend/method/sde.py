"""One SDE / ODE / merged step with its Gaussian log-probability (docs/algorithm.md, "The SDE step").

Changed from Flow-GRPO's `sde_step_with_logprob`: the diffusion coefficient g is an argument (the
plan computes it once, so the sigma = 1 convention and DanceGRPO's constant g live in schedule.py),
the step may span several grid points (a merged step evaluates drift and std at sigma and uses
dt = sigma_next - sigma), and the log-prob is averaged, not summed, over latent dimensions.
Like ddpo-pytorch's `ddim_step_with_logprob`, the same function samples a step or, given
`prev_sample` (our `x_next`), recomputes the log-prob of a recorded transition.

Names -> docs/algorithm.md: x = x_t at sigma_i, v = model velocity (eps - x0), g = std_i, dt = sigma_j - sigma_i < 0,
mean = x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt, scale = g sqrt(-dt).
Everything is computed in float32 whatever dtype the model ran in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    x_next: torch.Tensor  # [B, ...] float32
    mean: torch.Tensor  # [B, ...] float32
    scale: torch.Tensor  # [B, 1, ...] float32 (std of the transition)
    log_prob: torch.Tensor  # [B] float32, averaged over non-batch dims


def _per_sample(value, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] tensor as float32 shaped [B, 1, 1, ...] to broadcast against x."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, scale^2) averaged over all non-batch dimensions -> [B]."""
    lp = -((x.float() - mean) ** 2) / (2 * scale**2) - torch.log(scale) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    g,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> StepOutput:
    """Euler-Maruyama step sigma -> sigma_next; samples with `noise`, or scores a given `x_next`."""
    if (noise is None) == (x_next is None):
        raise ValueError("sde_step needs exactly one of `noise` (to sample) or `x_next` (to score)")
    x32, v32 = x.float(), v.float()
    s, sn, g = _per_sample(sigma, x32), _per_sample(sigma_next, x32), _per_sample(g, x32)
    dt = sn - s
    if bool((dt >= 0).any()):
        raise ValueError("sde_step needs sigma_next < sigma (steps run from noise to clean)")
    mean = x32 * (1 + g**2 * dt / (2 * s)) + v32 * (1 + g**2 * (1 - s) / (2 * s)) * dt
    scale = g * torch.sqrt(-dt)
    if x_next is None:
        x_next = mean + scale * noise.float()
    return StepOutput(x_next.float(), mean, scale, gaussian_log_prob(x_next, mean, scale))


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Plain Euler x + v dt (the a = 0 limit of the SDE step; it has no log-prob)."""
    x32 = x.float()
    dt = _per_sample(sigma_next, x32) - _per_sample(sigma, x32)
    return x32 + v.float() * dt


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, s^2) || N(mean_q, s^2)) averaged over non-batch dims -> [B] (equal scales)."""
    kl = (mean_p - mean_q) ** 2 / (2 * scale**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def flow_grpo_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, g) -> torch.Tensor:
    """Flow-GRPO's KL penalty: ||mean_p - mean_q||^2 / (2 g^2) averaged over non-batch dims -> [B].

    Flow-GRPO divides by the squared diffusion coefficient g (its `std_dev_t`), not by the squared
    transition scale g^2 |dt| that `gaussian_kl` uses, so it equals `gaussian_kl * |dt|`
    (docs/baselines.md, Flow-GRPO; Flow-GRPO scripts/train_sd3.py:900). `g` is a scalar or one
    value per sample.
    """
    g = _per_sample(g, mean_p.float())
    kl = (mean_p.float() - mean_q.float()) ** 2 / (2 * g**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
