"""Deterministic ODE sampling of the digits model: plain Euler on the shifted sigma grid.

Used to evaluate pretraining checkpoints and held-out reward. Each sample's noise comes from its own
seed (torch.Generator().manual_seed(seed), shape [1, 1, 16, 16]), so an image depends only on its
(prompt, seed) pair, never on batch composition.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..jobs.evaluation import sample_ode
from ..method.schedule import shifted_sigmas
from .digits import IMAGE_SIZE, decode
from .model import velocity

SampleFn = Callable[[list[str], list[int]], torch.Tensor]


class _TransformerView:
    """What the engine's sample_ode needs from a policy, over a transformer that may be mid-training
    (a DiffusersPolicy would freeze its parameters)."""

    latent_shape = (1, IMAGE_SIZE, IMAGE_SIZE)

    def __init__(self, transformer, encoder):
        self.transformer, self.encoder = transformer, encoder
        self.device = next(transformer.parameters()).device

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.encoder.encode(prompts, self.device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return velocity(self.transformer, x, sigma, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode(latents)


def make_sample_fn(transformer, encoder, steps: int = 16, shift: float = 3.0, guidance: float = 1.0,
                   batch_size: int = 100) -> SampleFn:
    """sample_fn(prompts, seeds) -> images [B, 1, 16, 16] in [0, 1] (ODE, shifted grid, Euler).

    guidance != 1 applies classifier-free guidance against the "" prompt.
    """
    sigmas = shifted_sigmas(steps, shift)
    view = _TransformerView(transformer, encoder)
    uncond = view.encode([""]) if guidance != 1.0 else None

    def sample_fn(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        return sample_ode(view, sigmas, prompts, seeds, guidance_scale=guidance, uncond=uncond, batch=batch_size)

    return sample_fn
