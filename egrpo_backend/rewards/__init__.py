from .base import Reward, build_reward, check_scores, register_reward, reward_names, reward_options
from .combine import WeightedRewards

__all__ = ["Reward", "WeightedRewards", "build_reward", "check_scores", "register_reward", "reward_names", "reward_options"]
