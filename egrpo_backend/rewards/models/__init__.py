"""Neural reward models loaded from local files: CLIP score, PickScore v1, HPS v2/v2.1, ImageReward,
LAION aesthetic v2 (see docs/rewards.md for what each measures and where its files go).

Importing registers them by name (base.build_reward); transformers is imported only when one is built,
and nothing ever downloads.
"""

from . import aesthetic, clip_score, hps, imagereward, pickscore  # noqa: F401  (register the rewards)
from .files import RewardFileNotFound, UnsafeCheckpointError, convert_to_safetensors, load_state_dict
from .status import reward_status

__all__ = ["RewardFileNotFound", "UnsafeCheckpointError", "convert_to_safetensors", "load_state_dict", "reward_status"]
