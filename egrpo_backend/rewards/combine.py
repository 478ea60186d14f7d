"""A weighted combination of rewards is a Reward too; `components` feeds per-reward advantages."""

from __future__ import annotations

import torch

from .base import Reward, check_scores


class WeightedRewards:
    def __init__(self, rewards: list[Reward], weights: list[float]):
        if not rewards:
            raise ValueError("no rewards given; add at least one, e.g. {'name': 'jpeg_compressibility'}")
        if len(rewards) != len(weights):
            raise ValueError(f"{len(rewards)} rewards but {len(weights)} weights")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"a reward is listed twice: {names}")
        self.rewards, self.weights = list(rewards), [float(w) for w in weights]
        self.name = "+".join(f"{w:g}*{n}" for w, n in zip(self.weights, names)) if len(names) > 1 else names[0]

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Unweighted scores of each reward, name -> [B]."""
        return {r.name: check_scores(r(images, prompts), images.shape[0], r.name) for r in self.rewards}

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * components[r.name] for r, w in zip(self.rewards, self.weights))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.combine(self.components(images, prompts))
