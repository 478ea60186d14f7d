"""Group-normalised advantages (SPEC 5): within the G members that share one consolidated SDE step.

Rewards arrive as [NG, n_gran, G]: NG groups (prompt x branch step), one row per granularity,
G members. Statistics use the population std (like Flow-GRPO's np.std) plus 1e-8, never mix
groups, and are computed per granularity before summing; |A| is clipped at the end.
"""

from __future__ import annotations

import torch

EPS = 1e-8
ADVANTAGE_MODES = ("group", "prompt_mean_batch_std")
REWARD_MODES = ("weighted_sum", "per_reward")  # several rewards: sum them, or normalise each and sum advantages


def normalise(rewards: torch.Tensor, mode: str = "group", group_prompt: torch.Tensor | None = None) -> torch.Tensor:
    """[NG, n_gran, G] -> same shape, normalised per granularity.

    group: (R - mean_group) / (std_group + eps)                (E-GRPO, Granular-GRPO)
    prompt_mean_batch_std: (R - mean over the prompt's groups) / (std over the whole batch + eps)  (Flow-GRPO)
    """
    r = rewards.double()
    if mode == "group":
        return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, unbiased=False, keepdim=True) + EPS)).float()
    if mode == "prompt_mean_batch_std":
        if group_prompt is None:
            raise ValueError("prompt_mean_batch_std needs the prompt of each group")
        out = torch.empty_like(r)
        batch_std = r.transpose(0, 1).reshape(r.shape[1], -1).std(-1, unbiased=False)  # [n_gran]
        for p in group_prompt.unique():
            sel = group_prompt == p
            mean = r[sel].mean(dim=(0, 2), keepdim=True)  # [1, n_gran, 1]
            out[sel] = (r[sel] - mean) / (batch_std[None, :, None] + EPS)
        return out.float()
    raise ValueError(f"unknown advantage mode {mode!r}; valid: {', '.join(ADVANTAGE_MODES)}")


def advantages(
    rewards: torch.Tensor,
    *,
    mode: str = "group",
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
        a = sum(weights[k] * normalise(v, mode, group_prompt) for k, v in components.items())
    else:
        a = normalise(rewards, mode, group_prompt)
    return a.sum(1).clamp(-clip, clip)
