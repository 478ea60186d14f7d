"""Held-out reward of a sampler on the fixed (prompt, seed) eval set, with a bootstrap 95% CI."""

from __future__ import annotations

import torch

from ..jobs.evaluation import bootstrap_ci
from .digits import digit_of_prompt, heldout_eval_set
from .metrics import nearest_real_distance, within_prompt_diversity


def _sample_pairs(sample_fn, eval_set):
    pairs = heldout_eval_set() if eval_set is None else list(eval_set)
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    return prompts, sample_fn(prompts, seeds)


def _score(images: torch.Tensor, prompts: list[str], reward, n_boot: int) -> dict:
    scores = reward(images, prompts).double()
    return {"mean": float(scores.mean()), "ci": list(bootstrap_ci(scores, n_boot)), "per_sample": scores.tolist()}


def heldout_reward(sample_fn, reward, n_boot: int = 1000, eval_set: list[tuple[str, int]] | None = None) -> dict:
    """Mean reward over the held-out set: {'mean', 'ci': [lo, hi], 'per_sample': [...]}.

    sample_fn(prompts, seeds) -> images [B, 1, 16, 16] in [0, 1] (ODE sampling, per-sample seeded noise).
    """
    prompts, images = _sample_pairs(sample_fn, eval_set)
    return _score(images, prompts, reward, n_boot)


def heldout_report(sample_fn, reward, n_boot: int = 1000, eval_set: list[tuple[str, int]] | None = None) -> dict:
    """heldout_reward plus the hacking guards on the same images.

    Diversity groups images by the digit their prompt names (20 seeds per digit in the default set).
    """
    prompts, images = _sample_pairs(sample_fn, eval_set)
    out = _score(images, prompts, reward, n_boot)
    out["diversity"] = within_prompt_diversity(images, [digit_of_prompt(p) for p in prompts])
    out["nearest_real"] = nearest_real_distance(images)
    return out
