"""Reward "temporal_consistency": how alike consecutive frames of a video are (docs/rewards.md, "Video").

score = 1 - mean over consecutive pairs (f, f + 1) and over pixels of |x_{f+1} - x_f|, frames in
[0, 1]: 1 for a still clip, lower the more the frames flicker. It is VBench's temporal-flickering
measure ((255 - mean absolute difference) / 255 on 8-bit frames) on float frames. Alone it favours
still videos; weight it beside an image reward (a combination) to keep motion.
"""

from __future__ import annotations

import torch

from .base import check_scores, register_reward


class TemporalConsistency:
    name = "temporal_consistency"

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if videos.ndim != 5 or videos.shape[1] < 2:
            raise ValueError(f"temporal_consistency scores videos [B, F >= 2, C, H, W], got shape {tuple(videos.shape)}")
        x = videos.detach().float().clamp(0, 1)
        change = (x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(1)  # [B] mean over pairs and pixels
        return check_scores(1.0 - change, videos.shape[0], self.name)


@register_reward("temporal_consistency", min_frames=2)
def temporal_consistency() -> TemporalConsistency:
    return TemporalConsistency()
