"""Rewards on video: which frames a reward scores, and how an image reward scores a clip.

A video policy decodes to frames [B, F, C, H, W] in [0, 1]; an image policy to [B, C, H, W].
Every reward takes the option `frames`: "all" (default) or k, the k evenly spaced frames
`frame_indices(F, k)` picks (pytorchvideo's uniform_temporal_subsample: linspace(0, F - 1, k)
truncated, so k = F is every frame and the first and last frames are always in). `score_frames`,
which WeightedRewards (every job, evaluation and node) calls, scores each picked frame as an image
and averages per clip; a video reward (registered with min_frames, e.g. temporal_consistency) gets
the picked frames as one clip. Images have no frames axis: frames "all" or 1 scores them as they
are (docs/rewards.md, "Video").
"""

from __future__ import annotations

import torch

from .base import check_scores

FRAMES_ALL = "all"


def check_frames(name: str, value):
    """The option `frames` of reward `name`, checked: "all" or an integer k >= 1."""
    if value == FRAMES_ALL:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"reward {name!r}: option frames must be \"all\" or an integer >= 1 (the number of evenly "
                         f"spaced frames of each video it scores), got {value!r}")
    return value


def frame_indices(total: int, frames) -> torch.Tensor:
    """The frames of a clip of `total` frames that a reward scores: all, or k evenly spaced ones."""
    if frames == FRAMES_ALL:
        return torch.arange(total)
    if frames > total:
        raise ValueError(f"reward option frames = {frames} but the videos have {total} frames; lower frames to at "
                         f"most {total} or sample longer videos (the Train node's length)")
    return torch.linspace(0, total - 1, frames).long()


def model_frames(model_spec) -> int | None:
    """Frames per sample the spec's model makes, when the spec says: 1 for image sources (the embedded
    default, diffusers), model.comfy.length for ComfyUI models, None when that is not known before the
    model loads (then the reward checks the decoded clips)."""
    if model_spec.source != "comfy":
        return 1
    return getattr(model_spec.comfy, "length", None)


def check_reward_frames(key: str, name: str, frames, min_frames: int, total: int | None) -> None:
    """A job spec's reward entry against the frames its model makes (ValueError naming what to change)."""
    frames = check_frames(name, frames)
    used = total if frames == FRAMES_ALL else frames
    if total is not None and frames != FRAMES_ALL and frames > total:
        raise ValueError(f"{key}.frames = {frames} but the model makes {total} frame(s) per sample; set frames to at "
                         f"most {total}" + (" (or raise model.comfy.length on a video model)" if total > 1 else
                                            " (an image model: leave frames out)"))
    if used is not None and used < min_frames:
        raise ValueError(f"reward {name!r} compares consecutive frames and needs at least {min_frames} per sample, but "
                         f"{key} gets {used}; " + ("set frames to at least 2" if frames != FRAMES_ALL else
                                                   "train a video model with model.comfy.length >= 2 (the Train "
                                                   "node's length), or remove this reward"))


def score_frames(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """reward's scores [B] of images [B, C, H, W] or videos [B, F, C, H, W]: the reward's `frames` of each
    clip (build_reward sets them; "all" otherwise), scored as images and averaged per clip, or passed as
    one shorter clip to a video reward (min_frames > 1)."""
    name, frames, min_frames = reward.name, getattr(reward, "frames", FRAMES_ALL), getattr(reward, "min_frames", 1)
    if images.ndim == 4:  # images [B, C, H, W]: one frame each
        if min_frames > 1:
            raise ValueError(f"reward {name!r} scores videos [B, F, C, H, W] of at least {min_frames} frames; the "
                             f"model made images {tuple(images.shape)}")
        if frames not in (FRAMES_ALL, 1):
            raise ValueError(f"reward {name!r}: frames = {frames} but the model made images {tuple(images.shape)} "
                             "(one frame each); leave frames out for an image model")
        return reward(images, prompts)
    if images.ndim != 5:
        raise ValueError(f"reward {name!r} takes images [B, C, H, W] or videos [B, F, C, H, W], got shape "
                         f"{tuple(images.shape)}")
    B = images.shape[0]
    clips = images[:, frame_indices(images.shape[1], frames).to(images.device)]  # [B, k, C, H, W]
    if clips.shape[1] < min_frames:
        raise ValueError(f"reward {name!r} needs at least {min_frames} frames per video, got {clips.shape[1]}")
    if min_frames > 1:  # a video reward scores the clip as a whole
        return check_scores(reward(clips, prompts), B, name)
    k = clips.shape[1]
    per_frame = check_scores(reward(clips.flatten(0, 1), [p for p in prompts for _ in range(k)]), B * k, name)
    return per_frame.reshape(B, k).mean(1)  # [B]: the mean of each clip's frame scores
