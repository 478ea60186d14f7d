"""Reward-hacking guards: a hacked model collapses (low diversity) and drifts from real digits.

Both use L2 distances between images in [0, 1] flattened to 256 values (16x16). On this scale real
digits of one class are ~2.3 apart; a collapsed, reward-hacked model falls to ~1.1-1.4 while its
distance to the nearest real digit rises.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .digits import real_digits


def _flat(images: torch.Tensor) -> torch.Tensor:
    return images.detach().double().cpu().reshape(images.shape[0], -1)


def within_prompt_diversity(images: torch.Tensor, group_ids) -> float:
    """Mean over groups of the mean pairwise L2 distance between images of the same group (prompt).

    Groups with a single image are skipped; at least one group needs two images.
    """
    x = _flat(images)
    ids = list(group_ids.tolist() if torch.is_tensor(group_ids) else group_ids)
    if len(ids) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {len(ids)} group ids")
    per_group = []
    for gid in dict.fromkeys(ids):
        members = x[[i for i, g in enumerate(ids) if g == gid]]
        n = members.shape[0]
        if n < 2:
            continue
        d = torch.cdist(members, members)
        per_group.append(d.sum() / (n * (n - 1)))  # the diagonal is 0
    if not per_group:
        raise ValueError("within_prompt_diversity needs at least one group with two or more images")
    return float(torch.stack(per_group).mean())


@lru_cache(maxsize=1)
def _heldout_real() -> torch.Tensor:
    return _flat(real_digits("heldout")[0])


def nearest_real_distance(images: torch.Tensor) -> float:
    """Mean over images of the L2 distance to the nearest REAL digit of the held-out split."""
    x = _flat(images)
    return float(torch.cdist(x, _heldout_real()).min(1).values.mean())
