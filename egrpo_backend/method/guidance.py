"""Classifier-free guidance on top of any FlowPolicy, and the one velocity closure the engine calls.

`guided_velocity` is v = v_u + s (v_c - v_u) in one batched call. `GuidedVelocity` binds a policy
to an iteration's conds, guidance and batch size, and counts model evaluations (NFE), so rollout,
evaluation and update never pass (policy, cond, uncond, scale, batch, counter) around by hand.
"""

from __future__ import annotations

import torch

from ..policies.base import Cond, FlowPolicy, cond_cat, cond_select


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


class GuidedVelocity:
    """v(x, sigma, prompt_rows) for one batch of prompts, in chunks of `batch` rows, counting NFE.

    cond: the encoded prompts (row p = prompt p); prompt_rows: [B] which cond row each sample uses.
    nfe counts model evaluations per sample (CFG counts twice), with or without gradients.
    """

    def __init__(self, policy: FlowPolicy, cond: Cond, *, uncond: Cond | None = None, guidance_scale: float = 1.0,
                 batch: int = 64):
        self.policy, self.cond, self.uncond, self.guidance_scale = policy, cond, uncond, guidance_scale
        self.batch, self.nfe = batch, 0
        self.per_row = evaluations_per_call(guidance_scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, prompt_rows: torch.Tensor) -> torch.Tensor:
        """Chunks never mix prompts: a prompt's velocities are then computed on the same batch
        whichever other prompts share the call, its process or its rank, so one process and N ranks
        give bit-identical rollouts (a matmul's rounding depends on its batch; docs/scale_out.md)."""
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for rows in prompt_chunks(prompt_rows, self.batch):
            idx = rows.to(x.device)
            c = cond_select(self.cond, prompt_rows[rows])
            out[idx] = guided_velocity(self.policy, x[idx], sigma[idx], c, self.uncond, self.guidance_scale).float()
            self.nfe += rows.numel() * self.per_row
        return out


def prompt_chunks(prompt_rows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Row indices grouped by prompt (first-appearance order, rows in their order), at most `batch` each."""
    rows = prompt_rows.cpu()
    order = dict.fromkeys(rows.tolist())
    return [chunk for p in order for chunk in torch.nonzero(rows == p).squeeze(1).split(batch)]
