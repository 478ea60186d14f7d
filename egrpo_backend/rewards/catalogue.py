"""The catalogue of rewards: imports every reward module (each registers itself in base.py's registry)
and builds rewards by name. base.py imports none of the reward modules, so they can all import base."""

from __future__ import annotations

import inspect

from .base import _REGISTRY, Reward, check_memory_options


def _load_builtin() -> None:
    # Importing the modules registers their rewards; model-based rewards import lazily inside.
    from . import combine, jpeg  # noqa: F401

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


def build_reward(name: str, **options) -> Reward:
    """Build a registered reward; unknown names raise listing the valid ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    check_memory_options(name, options)  # before the factory loads a model for nothing
    try:
        return _REGISTRY[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for reward {name!r}: {e}") from None


def reward_options(name: str) -> list[str]:
    """The keyword options a registered reward's factory takes (e.g. path, reward_dir, device)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(_REGISTRY))}")
    return list(inspect.signature(_REGISTRY[name]).parameters)
