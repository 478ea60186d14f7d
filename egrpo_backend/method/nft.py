"""DiffusionNFT (arXiv 2509.16117): reinforcement on the forward process, as pure functions.

The sampling ("old") policy generates clean samples x0 by ODE without CFG; each reward becomes an
optimality probability r in [0, 1]; the trained velocity v is pulled towards an implicit positive
policy on good samples and pushed away through an implicit negative policy on bad ones, on x0
noised again by the forward process. docs/baselines.md (DiffusionNFT) describes the reference
(NVlabs/DiffusionNFT, scripts/train_nft_sd3.py) and how the trainer calls these functions.

Names -> paper / reference:
  t, x_t      forward-noised sample x_t = (1 - t) x0 + t eps at a sigma t of the sampling grid
  v, v_old    velocity of the trained policy and of the old (sampling) policy at (x_t, t)
  beta        the NFT beta: v+ = (1 - beta) v_old + beta v, v- = (1 + beta) v_old - beta v
  r           optimality probability: clip(A, -c, c) / (2 c) + 1/2, A the Flow-GRPO advantage
  loss        c / beta * mean[ r ||x0+ - x0||^2 / w+ + (1 - r) ||x0- - x0||^2 / w- ], x0+- = x_t - t v+-,
              w+- = mean |x0+- - x0| (no gradient): the reference's adaptive weighting
Since x_t - t v - x0 = t (eps - x0 - v), the x0 errors are t times the velocity errors against the
flow-matching target eps - x0: the loss is the negative-aware flow-matching loss, weighted per sample.
"""

from __future__ import annotations

import torch

from .advantage import advantages

WEIGHT_FLOOR = 1e-5  # the adaptive weight never drops below this (reference .clip(min=0.00001))
DECAY_TYPES = (0, 1, 2)


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] (or a scalar) -> [B, 1, 1, ...] float32 to broadcast against `like`."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps for t a scalar or one value per sample."""
    tt = _per_sample(t, x0)
    return (1 - tt) * x0.float() + tt * eps.float()


def nft_timesteps(sigmas: list[float], batch: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """[batch, K] training sigmas: each sample trains at K = int(T * fraction) distinct grid sigmas.

    The reference draws one permutation of the T sampling sigmas (sigma_0 .. sigma_{T-1}, never 0)
    per sample and trains at its first K (K = 9 of T = 10 at fraction 0.99); DiffusionNFT
    scripts/train_nft_sd3.py:569, :806-816, :864.
    """
    grid = torch.tensor(sigmas[:-1], dtype=torch.float32)
    k = int(len(grid) * fraction)
    if k < 1:
        raise ValueError(f"nft_timestep_fraction {fraction} trains no sigma of a {len(grid)}-step grid")
    perms = torch.stack([torch.randperm(len(grid), generator=gen) for _ in range(batch)])
    return grid[perms[:, :k]]


def optimality_probability(rewards: torch.Tensor, group_prompt: torch.Tensor | None = None, *,
                           clip: float = 5.0, advantage: str = "prompt_mean_batch_std") -> torch.Tensor:
    """Rewards -> r in [0, 1]: r = clip(A, -c, c) / (2 c) + 1/2.

    `rewards` is [P, G] (one ODE group per prompt) or [NG, n_gran, G] with `group_prompt`; A is the
    reference's advantage, per-prompt mean over the population std of the batch + 1e-4
    (advantage.py, prompt_mean_batch_std). A = 0 gives r = 1/2; |A| >= c gives r = 0 or 1.
    DiffusionNFT scripts/train_nft_sd3.py:744-750, :910-929; flow_grpo/stat_tracking.py:26-31.
    """
    if rewards.ndim == 2:
        rewards = rewards[:, None, :]
        group_prompt = torch.arange(rewards.shape[0]) if group_prompt is None else group_prompt
    a = advantages(rewards, advantage=advantage, clip=clip, group_prompt=group_prompt)  # [NG, G], clipped
    return (a / clip / 2.0 + 0.5).clamp(0.0, 1.0)


def _weighted_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """mean ||x0_pred - x0||^2 / w per sample, w = mean |x0_pred - x0| in float64 without gradient."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        w = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=WEIGHT_FLOOR)
    return ((x0_pred - x0) ** 2 / w).mean(dim=dims)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t, r: torch.Tensor,
             beta: float, *, v_ref: torch.Tensor | None = None, kl_beta: float = 0.0,
             adv_clip: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The DiffusionNFT loss of one batch of noised clean samples -> (scalar loss, metrics).

    v: [B, ...] trained velocity (with gradient); v_old: the old policy's velocity at the same
    (x_t, t) (treated as a constant); x_t: forward_noise(x0, eps, t); t: [B] sigmas; r: [B]
    optimality probabilities; v_ref: the base model's velocity for the KL term kl_beta *
    mean ||v - v_ref||^2 (the reference's `train.beta`). The policy part is scaled by adv_clip /
    beta like the reference, so its gradient does not shrink with beta. DiffusionNFT
    scripts/train_nft_sd3.py:934-970.
    """
    if not beta > 0:
        raise ValueError(f"nft_beta must be > 0, got {beta}")
    v32, old, x0f, xt = v.float(), v_old.detach().float(), x0.float(), x_t.float()
    tt = _per_sample(t, x0f)
    r = torch.as_tensor(r, device=x0f.device).double()
    v_pos = beta * v32 + (1.0 - beta) * old  # implicit positive policy
    v_neg = (1.0 + beta) * old - beta * v32  # implicit negative policy
    pos = _weighted_x0_error(xt - tt * v_pos, x0f)  # [B]
    neg = _weighted_x0_error(xt - tt * v_neg, x0f)  # [B]
    per_sample = (r * pos + (1.0 - r) * neg) / beta  # [B]
    loss = (per_sample * adv_clip).mean()
    dims = tuple(range(1, x0f.ndim))
    metrics = {"policy_loss": loss.item(), "unweighted_policy_loss": per_sample.mean().item(),
               "positive_loss": pos.mean().item(), "negative_loss": neg.mean().item(), "r_mean": r.mean().item(),
               "old_deviate": ((v32 - old) ** 2).mean().item()}
    if v_ref is not None:
        kl = ((v32 - v_ref.detach().float()) ** 2).mean(dim=dims)  # [B]
        loss = loss + kl_beta * kl.mean()
        metrics["kl"] = kl.mean().item()
    return loss, metrics  # float64, like the reference (its weights and r are float64)


def old_policy_decay(step: int, decay_type: int = 1) -> float:
    """EMA decay of the old policy after `step` optimizer steps (0 = copy the trained policy).

    type 0: always 0; type 1: min(0.001 step, 0.5); type 2: 0 for 75 steps, then
    min(0.0075 (step - 75), 0.999) (DiffusionNFT scripts/train_nft_sd3.py:169-189, config/nft.py:60, :78).
    """
    flat, rate, cap = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[_decay_type(decay_type)]
    return 0.0 if step < flat else min((step - flat) * rate, cap)


def _decay_type(decay_type: int) -> int:
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"unknown nft_decay {decay_type!r}; valid: {', '.join(map(str, DECAY_TYPES))}")
    return decay_type


@torch.no_grad()
def update_old_policy(old_params, params, decay: float) -> None:
    """old <- decay * old + (1 - decay) * trained, in place, once per iteration after the update
    (DiffusionNFT scripts/train_nft_sd3.py:1034-1039)."""
    for o, p in zip(old_params, params, strict=True):
        o.copy_(o * decay + p.detach() * (1.0 - decay))
