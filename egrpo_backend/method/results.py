"""What one training iteration returns, whichever update ran it (the GRPO trainer or the NFT update)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepResult:
    metrics: dict  # what events.jsonl records for the iteration (phases included)
    images: torch.Tensor  # [k, C, H, W] samples of the first groups, G consecutive images per group
    prompts: list[str]  # the iteration's prompts
