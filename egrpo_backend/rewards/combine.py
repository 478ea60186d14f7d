"""A weighted combination of rewards is a Reward too; it owns each reward's weight by name."""

from __future__ import annotations

import torch

from .base import Reward, check_scores
from .frames import score_frames


class WeightedRewards:
    def __init__(self, rewards: list[Reward], weights: list[float]):
        if not rewards:
            raise ValueError("no rewards given; add at least one, e.g. {'name': 'jpeg_compressibility'}")
        if len(rewards) != len(weights):
            raise ValueError(f"{len(rewards)} rewards but {len(weights)} weights")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"a reward is listed twice: {names}")
        self.rewards = list(rewards)
        self.weights: dict[str, float] = {n: float(w) for n, w in zip(names, weights)}
        self.name = "+".join(f"{w:g}*{n}" for n, w in self.weights.items()) if len(names) > 1 else names[0]

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Unweighted scores of each reward, name -> [B]; images [B, C, H, W] or videos [B, F, C, H, W]."""
        return {r.name: check_scores(score_frames(r, images, prompts), images.shape[0], r.name) for r in self.rewards}

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * scores for name, scores in components.items())

    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted sum [B], each reward's own scores name -> [B])."""
        components = self.components(images, prompts)
        return self.combine(components), components

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score(images, prompts)[0]
