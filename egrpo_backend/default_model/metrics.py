"""Reward-hacking guards: a hacked model collapses (low diversity) and drifts from real digits.

Both use L2 distances between images in [0, 1] flattened to 256 values (16x16). On this scale real
digits of one class are ~3.4 apart; a collapsed, reward-hacked model falls well below that while its
distance to the nearest real digit rises.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..jobs.evaluation import within_prompt_diversity  # noqa: F401  (re-exported: the guards live together)
from .digits import real_digits


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.detach().double().cpu().reshape(images.shape[0], -1)


@lru_cache(maxsize=1)
def _heldout_real() -> torch.Tensor:
    return _flat(real_digits("heldout")[0])


def nearest_real_distance(images: torch.Tensor) -> float:
    """Mean over images of the L2 distance to the nearest REAL digit of the held-out split."""
    x = _flat(images)
    return float(torch.cdist(x, _heldout_real()).min(1).values.mean())
