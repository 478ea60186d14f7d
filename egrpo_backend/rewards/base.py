"""The Reward seam: `reward(images, prompts) -> scores[B]`, and the registry reward modules add themselves to.
Building a reward by name is the catalogue's job (catalogue.py, which imports the reward modules):
this module imports none of them, so each of them can import it.

images: float tensor [B, C, H, W] in [0, 1] (C = 1 or 3), on any device; prompts: list of B strings.
Scores are float32 on the CPU, one per image, higher is better. Rewards never need gradients.
Videos [B, F, C, H, W] are scored through frames.score_frames (WeightedRewards does), by the frames
a reward's option `frames` picks.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}
_MIN_FRAMES: dict[str, int] = {}  # video rewards: the frames per clip they need (image rewards: 1)


def register_reward(name: str, min_frames: int = 1):
    """Decorator: make a reward factory buildable by name from a job spec or a node. min_frames > 1
    marks a video reward: it gets whole clips [B, F, C, H, W] of at least that many frames."""

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} registered twice")
        _REGISTRY[name] = factory
        _MIN_FRAMES[name] = min_frames
        return factory

    return wrap


def check_memory_options(name: str, options: dict) -> None:
    """The options that bound a model reward's memory (docs/memory.md, "Rewards"), checked by value:
    offload (true: the model sits on the CPU and visits the device only while it scores) and
    batch_size (images per forward, whatever batch the reward is called with)."""
    if "offload" in options and not isinstance(options["offload"], bool):
        raise ValueError(f"reward {name!r}: option offload must be true or false (true keeps the reward model on the "
                         f"CPU between scores), got {options['offload']!r}")
    size = options.get("batch_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"reward {name!r}: option batch_size must be an integer >= 1 (images scored per forward), "
                         f"got {size!r}")


def check_scores(scores: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Every reward's output passes here: shape [B], finite, float32 on the CPU."""
    scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
    if scores.numel() != batch:
        raise ValueError(f"reward {name!r} returned {scores.numel()} scores for {batch} images")
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise FloatingPointError(
            f"reward {name!r} returned {bad} NaN/inf scores out of {batch}; check the reward model's "
            "weights and the images it is given (a diverged LoRA produces NaN images: lower the learning rate)"
        )
    return scores
