"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): how beautiful an image
looks, on a 1-10 scale (ignores the prompt).

score = MLP(normalised CLIP ViT-L/14 image embedding), as the authors' simple_inference.py computes it:
OpenAI CLIP ViT-L/14 (here its transformers port, openai/clip-vit-large-patch14) embeds the 224 px
center crop, the embedding is L2-normalised, and the published head
`sac+logos+ava1-l14-linearMSE.pth` (mlp_head.py) maps it to the score.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..base import register_reward
from .catalog import AESTHETIC_CLIP, AESTHETIC_HEAD
from .files import find_part, load_state_dict, reward_dirs
from .mlp_head import mlp_head
from .preprocess import preprocess
from .scorer import ModelReward


class AestheticModel(nn.Module):
    def __init__(self, vision, head: nn.Sequential):
        super().__init__()
        self.vision, self.head = vision, head
        if head[0].in_features != vision.config.projection_dim:
            raise ValueError(f"the aesthetic head takes {head[0].in_features}-d embeddings but the CLIP model gives "
                             f"{vision.config.projection_dim}-d ones; it needs CLIP ViT-L/14 ({AESTHETIC_CLIP.hint})")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        embeds = self.vision(pixel_values=pixels).image_embeds
        return self.head(F.normalize(embeds, dim=-1)).squeeze(-1)


class LaionAesthetic(ModelReward):
    def __init__(self, model: AestheticModel, **placement):
        super().__init__("laion_aesthetic", model, **placement)
        self.image_size = int(model.vision.config.image_size)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model(preprocess(images, self.image_size, "crop").to(device=device, dtype=self.dtype))


def load_clip_vision(folder: str | Path):
    """CLIPVisionModelWithProjection from a transformers CLIP folder (a full CLIPModel folder works)."""
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a transformers CLIP folder (no config.json). "
                                f"{AESTHETIC_CLIP.hint}")
    return CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)


@register_reward("laion_aesthetic")
def laion_aesthetic(path=None, clip_path=None, reward_dir=None, device=None, dtype=None, offload: bool = False,
                    batch_size: int = 16) -> LaionAesthetic:
    """path: the head (sac+logos+ava1-l14-linearMSE.pth or .safetensors); clip_path: the ViT-L/14 folder."""
    dirs = reward_dirs(reward_dir)
    head_path = find_part(AESTHETIC_HEAD, dirs, "laion_aesthetic", path)
    clip = find_part(AESTHETIC_CLIP, dirs, "laion_aesthetic", clip_path)
    model = AestheticModel(load_clip_vision(clip), mlp_head(load_state_dict(head_path)))
    return LaionAesthetic(model, device=device, dtype=dtype, offload=offload, batch_size=batch_size)
