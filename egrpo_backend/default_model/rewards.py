"""Reward "digit_probability": p(named digit | image) under the real-digits classifier.

The digit comes from the prompt (digit_of_prompt: 'three' or '3'). Images are [B, C, H, W] in [0, 1];
RGB is averaged to gray and other sizes are resized to 16x16, so any policy's output can be scored.
"""

from __future__ import annotations

import torch

from ..rewards.base import check_scores, register_reward
from .classifier import get_classifier
from .digits import IMAGE_SIZE, digit_of_prompt


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> [B, 1, 16, 16] float32 on the CPU (gray, bilinear resize)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"digit_probability expects images [B, 1 or 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(0.0, 1.0).mean(1, keepdim=True)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


class DigitProbability:
    """Scores each image with the classifier's probability of the digit its prompt names."""

    name = "digit_probability"

    def __init__(self):
        self.classifier = get_classifier()

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 10] class probabilities."""
        return self.classifier(to_classifier_input(images)).softmax(-1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        digits = torch.tensor([digit_of_prompt(p) for p in prompts])
        probs = self.probabilities(images)
        return check_scores(probs.gather(1, digits[:, None])[:, 0], images.shape[0], self.name)


@register_reward("digit_probability")
def digit_probability() -> DigitProbability:
    """p(named digit) for the embedded digits model (classifier built at first use, then cached)."""
    return DigitProbability()
