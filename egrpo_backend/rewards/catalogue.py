"""The catalogue of rewards: imports every reward module (each registers itself in base.py's registry)
and builds rewards by name. base.py imports none of the reward modules, so they can all import base."""

from __future__ import annotations

from .base import _MIN_FRAMES, _REGISTRY, Reward, check_memory_options


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


def reward_options(name: str) -> list[str]:
    """The keyword options a registered reward's factory takes (e.g. path, reward_dir, device)."""
    import inspect

    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    return [*inspect.signature(_REGISTRY[name]).parameters, "frames"]  # frames: every reward (build_reward)


def reward_factory(name: str):
    """The registered factory of a reward (its signature gives the options and their defaults)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
