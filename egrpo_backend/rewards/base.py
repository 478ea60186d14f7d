"""The Reward seam: `reward(images, prompts) -> scores[B]`, plus a registry of rewards by name.

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


def reward_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_reward(name: str, frames="all", **options) -> Reward:
    """Build a registered reward; unknown names raise listing the valid ones. `frames` ("all" or k) and
    the registered min_frames ride on the reward: frames.score_frames reads them to score videos."""
    from .frames import check_frames

    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    check_memory_options(name, options)  # before the factory loads a model for nothing
    check_frames(name, frames)
    try:
        reward = _REGISTRY[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for reward {name!r}: {e}") from None
    reward.frames, reward.min_frames = frames, _MIN_FRAMES[name]
    return reward


def reward_min_frames(name: str) -> int:
    """Frames per clip a registered reward needs: 1 for image rewards, more for video rewards."""
    _load_builtin()
    return _MIN_FRAMES.get(name, 1)


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


def reward_options(name: str) -> list[str]:
    """The keyword options a registered reward's factory takes (e.g. path, reward_dir, device)."""
    import inspect

    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    return [*inspect.signature(_REGISTRY[name]).parameters, "frames"]  # frames: every reward (build_reward)


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


def _load_builtin() -> None:
    # Importing the modules registers their rewards; model-based rewards import lazily inside.
    from . import combine, jpeg, temporal  # noqa: F401

    try:
        from . import models  # noqa: F401  (model-based rewards, if present)
    except ImportError as e:  # pragma: no cover - only when an optional module is absent
        if "models" not in str(e):
            raise
    try:
        from ..default_model import rewards as _default  # noqa: F401
    except ImportError as e:  # pragma: no cover
        if "default_model" not in str(e):
            raise


def reward_factory(name: str):
    """The registered factory of a reward (its signature gives the options and their defaults)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
