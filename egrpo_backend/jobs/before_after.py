"""The fixed-seed before/after grid of the held-out prompts: the base model (LoRA off) above the LoRA
of the latest evaluation, one column per prompt, the same noise seed in both rows.

It is redrawn at every held-out evaluation into JOB/before_after.png (before_after.webp, animated, for a
video model) and announced by a "before_after" event {iteration, path, prompts, seeds}; the panel shows
the file the event names. The base row is the evaluation's
own samples when it runs before the first iteration; a resumed job samples it once with the LoRA off.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import distributed
from .evaluation import sample_ode

FILE = "before_after.png"
VIDEO_FILE = "before_after.webp"  # clips [N, F, C, H, W]: an animated grid
MAX_PROMPTS = 6  # columns: the first seed of each of the first distinct held-out prompts
TILE_PIXELS = 128  # small images (the digits model's 16 px) are upscaled to about this size


def grid_columns(pairs: list[tuple[str, int]], limit: int = MAX_PROMPTS) -> list[int]:
    """Indices into the held-out pairs: the first (prompt, seed) of each distinct prompt, at most `limit`."""
    seen, out = set(), []
    for i, (prompt, _) in enumerate(pairs):
        if prompt not in seen and len(out) < limit:
            seen.add(prompt)
            out.append(i)
    return out


class BeforeAfter:
    def __init__(self, held_out, job_dir: Path):
        self.held_out, self.job_dir = held_out, Path(job_dir)
        self.columns = grid_columns(held_out.pairs)
        self.base: torch.Tensor | None = None

    def _sample_base(self) -> torch.Tensor:
        t = self.held_out.trainer
        pairs = [self.held_out.pairs[i] for i in self.columns]
        with t.policy.lora_disabled():
            return sample_ode(t.policy, list(t.plan.sigmas), [p for p, _ in pairs], [s for _, s in pairs],
                              guidance_scale=t.algo.guidance_scale, uncond=t.uncond, batch=t.cfg.rollout_batch)

    def update(self, images: torch.Tensor, iteration: int) -> dict:
        """Redraw the grid from an evaluation's images (all held-out pairs, in order); the event's data.
        Every rank calls it (sampling the base may need them all); rank 0 alone writes the file."""
        from ..plots import image_grid

        latest = images[self.columns].float().cpu()
        if self.base is None:
            self.base = latest if iteration == 0 else self._sample_base().float().cpu()
        scale = max(1, round(TILE_PIXELS / max(1, latest.shape[-1])))
        name = VIDEO_FILE if latest.ndim == 5 else FILE
        if distributed.is_writer():
            image_grid([self.base, latest], self.job_dir / name, scale=scale)  # rows: base, then LoRA (the panel labels them)
        pairs = [self.held_out.pairs[i] for i in self.columns]
        return {"iteration": iteration, "path": name, "prompts": [p for p, _ in pairs], "seeds": [s for _, s in pairs]}
