"""What a job writes for people to look at: sample grids, metrics.json and the reward curve."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_write_json
from .files import job_subdir


def write_sample_grid(job_dir: Path, iteration: int, images: torch.Tensor, group_size: int) -> str:
    """samples/iter_NNNNNN.png, one row per group (G consecutive images); videos [k, F, C, H, W] go to an
    animated samples/iter_NNNNNN.webp of F frames. Returns the path within the job."""
    from ..plots import image_grid

    suffix = ".webp" if images.ndim == 5 else ".png"
    path = job_subdir(job_dir, "samples") / f"iter_{iteration:06d}{suffix}"
    image_grid([images[i : i + group_size] for i in range(0, len(images), group_size)], path)
    return str(path.relative_to(job_dir))


def write_reports(job_dir: Path, history: list, eval_history: list) -> None:
    from ..plots import plot_reward_curves

    atomic_write_json(Path(job_dir) / "metrics.json", {"train": history, "eval": eval_history})
    curves = {"train (rollout mean)": [(h["iteration"], h["reward_mean"]) for h in history]}
    bands = {}
    if eval_history:
        curves["held-out"] = [(e["iteration"], e["reward_mean"]) for e in eval_history]
        bands["held-out"] = [(e["iteration"], *e["reward_ci"]) for e in eval_history]
    plot_reward_curves(curves, Path(job_dir) / "reward_curve.png", bands=bands, title="E-GRPO reward")
