from .base import Reward, check_scores, register_reward
from .catalogue import build_reward, reward_names, reward_options
from .combine import WeightedRewards

__all__ = ["Reward", "WeightedRewards", "build_reward", "check_scores", "register_reward", "reward_names", "reward_options"]
