"""Deterministic ODE sampling of the digits model: plain Euler on the shifted sigma grid.

Used to evaluate pretraining checkpoints and held-out reward. Each sample's noise comes from its own
seed (torch.Generator().manual_seed(seed), shape [1, 1, 16, 16]), so an image depends only on its
(prompt, seed) pair, never on batch composition.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..schedule import shifted_sigmas
from .digits import IMAGE_SIZE, decode
from .model import velocity

SampleFn = Callable[[list[str], list[int]], torch.Tensor]


def seeded_noise(seeds: list[int]) -> torch.Tensor:
    """[B, 1, 16, 16] standard normal noise, one generator per seed."""
    return torch.cat([torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def ode_sample(transformer, cond: dict[str, torch.Tensor], noise: torch.Tensor, sigmas: list[float],
               guidance: float = 1.0, uncond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Euler ODE from sigma 1 to 0: x += v * (sigma_next - sigma). Returns latents [B, 1, 16, 16].

    guidance != 1 applies classifier-free guidance v = v_u + w (v_c - v_u) with `uncond` (the "" prompt).
    """
    x = noise.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((x.shape[0],), float(s), device=x.device)
        v = velocity(transformer, x, t, cond)
        if guidance != 1.0:
            if uncond is None:
                raise ValueError(f"guidance {guidance} needs the unconditional ('') embedding")
            v_u = velocity(transformer, x, t, uncond)
            v = v_u + guidance * (v - v_u)
        x = x + v * (s_next - s)
    return x


def make_sample_fn(transformer, encoder, steps: int = 16, shift: float = 3.0, guidance: float = 1.0,
                   batch_size: int = 100) -> SampleFn:
    """sample_fn(prompts, seeds) -> images [B, 1, 16, 16] in [0, 1] (ODE, shifted grid, Euler)."""
    sigmas = shifted_sigmas(steps, shift)
    device = next(transformer.parameters()).device

    def sample_fn(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        out = []
        for i in range(0, len(prompts), batch_size):
            p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
            cond = encoder.encode(p, device)
            uncond = encoder.encode([""] * len(p), device) if guidance != 1.0 else None
            x = ode_sample(transformer, cond, seeded_noise(s).to(device), sigmas, guidance, uncond)
            out.append(decode(x).cpu())
        return torch.cat(out)

    return sample_fn
