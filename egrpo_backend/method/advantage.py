"""Group-normalised advantages: within the G members that share one consolidated SDE step.

Rewards arrive as [NG, n_gran, G]: NG groups (prompt x branch step), one row per granularity,
G members. Statistics never mix groups and are computed per granularity before summing; |A| is
clipped at the end. Each form (AlgorithmSpec.advantage) is the normalisation of one reference (docs/baselines.md):

  group                  (R - mean_group) / (unbiased std_group + 1e-8)     E-GRPO authors, DanceGRPO, MixGRPO
  group_population       (R - mean_group) / (population std_group + 1e-8)   this project before issue 9
  prompt_mean_batch_std  (R - mean over the prompt's groups)
                         / (population std of the whole batch + 1e-4)     Flow-GRPO, Flow-GRPO-Fast, DiffusionNFT

The unbiased std is sqrt(G / (G - 1)) times the population std, so `group` advantages are that
much smaller than `group_population` ones (6.9% at G = 8).
"""

from __future__ import annotations

import torch

ADVANTAGE_MODES = ("group", "group_population", "prompt_mean_batch_std")
# advantage form -> (unbiased std?, eps added to the std); see the module docstring for the references.
STD_RULE = {"group": (True, 1e-8), "group_population": (False, 1e-8), "prompt_mean_batch_std": (False, 1e-4)}
REWARD_MODES = ("weighted_sum", "per_reward")  # several rewards: sum them, or normalise each and sum advantages


def normalise(rewards: torch.Tensor, advantage: str = "group", group_prompt: torch.Tensor | None = None) -> torch.Tensor:
    """[NG, n_gran, G] -> same shape, normalised per granularity with the form's std rule."""
    if advantage not in STD_RULE:
        raise ValueError(f"unknown advantage form {advantage!r}; valid: {', '.join(ADVANTAGE_MODES)}")
    unbiased, eps = STD_RULE[advantage]
    r = rewards.double()
    if advantage != "prompt_mean_batch_std":
        return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, unbiased=unbiased, keepdim=True) + eps)).float()
    if group_prompt is None:
        raise ValueError("prompt_mean_batch_std needs the prompt of each group")
    out = torch.empty_like(r)
    batch_std = r.transpose(0, 1).reshape(r.shape[1], -1).std(-1, unbiased=unbiased)  # [n_gran]
    for p in group_prompt.unique():
        sel = group_prompt == p
        mean = r[sel].mean(dim=(0, 2), keepdim=True)  # [1, n_gran, 1]
        out[sel] = (r[sel] - mean) / (batch_std[None, :, None] + eps)
    return out.float()


def advantages(
    rewards: torch.Tensor,
    *,
    advantage: str = "group",
    clip: float = 5.0,
    group_prompt: torch.Tensor | None = None,
    components: dict[str, torch.Tensor] | None = None,
    weights: dict[str, float] | None = None,
) -> torch.Tensor:
    """[NG, n_gran, G] rewards -> [NG, G] advantages (sum over granularities, clipped).

    With `components` and `weights` (reward_mode per_reward), each reward is normalised on its own
    and the advantages are summed with the weights; otherwise the combined reward is normalised.
    """
    if components:
        a = sum(weights[k] * normalise(v, advantage, group_prompt) for k, v in components.items())
    else:
        a = normalise(rewards, advantage, group_prompt)
    return a.sum(1).clamp(-clip, clip)
