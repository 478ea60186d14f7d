"""Classifier-free guidance on top of any FlowPolicy: v = v_u + s (v_c - v_u), one batched call."""

from __future__ import annotations

import torch

from .policies.base import Cond, FlowPolicy, cond_cat, cond_select


def guided_velocity(
    policy: FlowPolicy, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, uncond: Cond | None, scale: float
) -> torch.Tensor:
    """Velocity with CFG. `uncond` has one row (the negative prompt) and is broadcast to the batch."""
    if scale == 1.0 or uncond is None:
        return policy.velocity(x, sigma, cond)
    b = x.shape[0]
    u = cond_select(uncond, [0] * b)
    v = policy.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat([cond, u]))
    v_c, v_u = v[:b], v[b:]
    return v_u + scale * (v_c - v_u)


def evaluations_per_call(scale: float) -> int:
    """Model evaluations per sample per velocity call (CFG doubles the batch)."""
    return 1 if scale == 1.0 else 2
