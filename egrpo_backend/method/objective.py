"""The PPO-clipped policy-gradient objective (docs/algorithm.md, "Update"), as one pure function."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ObjectiveTerms:
    loss: torch.Tensor  # [N] per-transition loss (to be averaged)
    ratio: torch.Tensor  # [N] exp(logp_new - logp_old), detached
    clipped: torch.Tensor  # [N] bool: the clipped branch was active


def clipped_objective(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip_range: float) -> ObjectiveTerms:
    """max(-A r, -A clip(r, 1 - eps, 1 + eps)) per transition."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    return ObjectiveTerms(loss, ratio.detach(), (clipped > unclipped).detach())
