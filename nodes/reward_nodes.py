"""Reward nodes: one per reward the backend registers, a weighted combine, and a scorer.

A reward value (EGRPO_REWARD) is the list the job spec takes, [{"name": ..., "weight": ...}], so it
travels into a background job unchanged; `score_images` builds the real rewards in this process.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from . import comfy_glue, types
from .images import image_to_nchw

log = logging.getLogger("egrpo")

# Shown when the registry cannot be imported (a broken optional dependency must not hide the pack).
FALLBACK_REWARDS = ["digit_probability", "jpeg_compressibility", "jpeg_incompressibility"]
HINTS = {
    "digit_probability": "p(the digit named in the prompt) under a classifier of the embedded digits model.",
    "jpeg_compressibility": "Smaller JPEG size scores higher (favours simple images).",
    "jpeg_incompressibility": "Larger JPEG size scores higher (favours detail).",
    "clip_score": "CLIP image-text similarity (needs CLIP weights in models/egrpo_rewards).",
    "pickscore": "PickScore human-preference model (needs its weights).",
    "hpsv2": "HPSv2 human-preference score (needs its weights).",
    "imagereward": "ImageReward preference model (needs its weights).",
    "laion_aesthetic": "LAION aesthetic predictor (needs its weights).",
    "temporal_consistency": "Video models: how alike consecutive frames are (1 = still); combine it with an image "
                            "reward, alone it favours still clips.",
}


def available_rewards() -> list[str]:
    try:
        from egrpo_backend.rewards import reward_names

        return reward_names()
    except Exception as e:  # noqa: BLE001 - show the pack even if an optional reward fails to import
        log.warning("E-GRPO: reward registry failed to import (%s); offering the built-in rewards only", e)
        return list(FALLBACK_REWARDS)


def _takes_reward_dir(name: str) -> bool:
    try:
        from egrpo_backend.rewards import reward_options

        return "reward_dir" in reward_options(name)
    except Exception:  # noqa: BLE001 - an unknown or broken reward simply gets no folder
        return False


def score_images(reward: list[dict], images, prompts: list[str]):
    """Weighted reward of ComfyUI IMAGEs [B, H, W, C] -> scores [B] (built in this process)."""
    from egrpo_backend.rewards import WeightedRewards, build_reward

    built = [build_reward(r["name"], **{k: v for k, v in r.items() if k not in ("name", "weight")}) for r in reward]
    return WeightedRewards(built, [float(r.get("weight", 1.0)) for r in reward])(image_to_nchw(images), prompts)


def frames_option(name: str, text: str) -> dict:
    """The node's frames text as the spec's option: {} for 'all', {"frames": k} for a number k >= 1."""
    text = str(text).strip().lower()
    if text in ("", "all"):
        return {}
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"reward {name!r}: frames must be 'all' or a whole number >= 1 (evenly spaced frames of each "
                         f"video it scores), got {text!r}")
    return {"frames": int(text)}


def _reward_node(name: str) -> type[io.ComfyNode]:
    class RewardNode(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=f"EGRPOReward_{name}", display_name=f"E-GRPO Reward: {name}", category=f"{types.CATEGORY}/rewards",
                description=HINTS.get(name, f"The backend's {name!r} reward."),
                inputs=[io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05,
                                       tooltip="Weight of this reward in a combination (1 when used alone)."),
                        io.String.Input("frames", default="all", optional=True, advanced=True,
                                        tooltip="Video models: 'all' frames of each clip, or k evenly spaced ones "
                                                "(an image reward scores each and takes the mean). Images: leave 'all'.")],
                outputs=[types.Reward.Output(display_name="reward", tooltip="This reward with its weight, for E-GRPO "
                                                                            "Train LoRA, Combine Rewards or Score Images.")],
            )

        @classmethod
        def execute(cls, weight, frames="all") -> io.NodeOutput:
            entry = {"name": name, "weight": float(weight), **frames_option(name, frames)}
            if _takes_reward_dir(name):  # model-based rewards find their files in models/egrpo_rewards
                entry["reward_dir"] = comfy_glue.reward_dirs()
            return io.NodeOutput([entry])

    RewardNode.__name__ = RewardNode.__qualname__ = f"Reward_{name}"
    RewardNode.__doc__ = f"E-GRPO reward {name!r}: {HINTS.get(name, '')}"
    return RewardNode


class CombineRewardsNode(io.ComfyNode):
    """Weighted sum of rewards (each input's own weight applies); a reward may appear only once."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EGRPOCombineRewards", display_name="E-GRPO Combine Rewards", category=f"{types.CATEGORY}/rewards",
            description="Trains on the weighted sum of 2-4 rewards (each keeps the weight set on its own node).",
            inputs=[types.Reward.Input("reward_1", tooltip="First reward (with its weight)."),
                    types.Reward.Input("reward_2", tooltip="Second reward (with its weight)."),
                    types.Reward.Input("reward_3", optional=True, tooltip="Optional third reward."),
                    types.Reward.Input("reward_4", optional=True, tooltip="Optional fourth reward.")],
            outputs=[types.Reward.Output(display_name="reward", tooltip="The combination: sum of weight x reward.")],
        )

    @classmethod
    def execute(cls, reward_1, reward_2, reward_3=None, reward_4=None) -> io.NodeOutput:
        out = [dict(r) for part in (reward_1, reward_2, reward_3, reward_4) if part for r in part]
        names = [r["name"] for r in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward {dup[0]!r} is combined twice; use one node per reward and set its weight")
        return io.NodeOutput(out)


class ScoreImagesNode(io.ComfyNode):
    """Score IMAGEs with a reward: the numbers a training run would see."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EGRPOScoreImages", display_name="E-GRPO Score Images", category=f"{types.CATEGORY}/rewards",
            description="Scores images with a reward (or a combination), in ComfyUI's process: the numbers a "
                        "training run would see for them.",
            inputs=[io.Image.Input("images", tooltip="Images to score."),
                    types.Reward.Input("reward", tooltip="The reward (or a combination)."),
                    io.String.Input("prompt", default="", tooltip="Prompt text for rewards that read it.")],
            outputs=[io.String.Output(display_name="scores", tooltip="One line per image: 'index: score'.")],
        )

    @classmethod
    def execute(cls, images, reward, prompt="") -> io.NodeOutput:
        scores = score_images(reward, images, [prompt] * images.shape[0])
        return io.NodeOutput("\n".join(f"{i}: {s:.4f}" for i, s in enumerate(scores.tolist())))


def reward_nodes() -> list[type[io.ComfyNode]]:
    return [_reward_node(n) for n in available_rewards()] + [CombineRewardsNode, ScoreImagesNode]
