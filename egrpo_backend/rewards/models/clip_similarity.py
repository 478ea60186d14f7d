"""Image-text similarity under a CLIP model: the one computation behind CLIP score, PickScore and HPS v2.

score = factor * cos(image feature, text feature), features from the CLIP projections. The three
rewards differ only in the weights, the image fit and the factor:
  - clip_score: any CLIP, resize + center crop, factor `scale` (1 = the raw cosine);
  - pickscore: PickScore_v1, resize + center crop, factor = exp(logit_scale) (about 100), like the
    authors' inference code (the paper's tables divide by 100);
  - hpsv2: HPS v2/v2.1, longest side + pad (HPS's evaluation transform), factor 1 (the cosine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .clip_tokenizer import ClipTokenizer
from .preprocess import FITS, preprocess
from .scorer import ModelReward, unique_prompts


class ClipSimilarity(ModelReward):
    """A Reward scoring factor * cosine(image, prompt) with a transformers CLIPModel."""

    def __init__(self, name: str, model, tokenizer: ClipTokenizer, factor: float | str = 1.0, fit: str = "crop",
                 **placement):
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        if not (factor == "logit_scale" or isinstance(factor, (int, float))):
            raise ValueError(f"factor must be a number or 'logit_scale', got {factor!r}")
        super().__init__(name, model, **placement)
        self.tokenizer, self.factor, self.fit = tokenizer, factor, fit
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)

    def features(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 image features [b, E] and text features [b, E] (one per image)."""
        device = next(self.model.parameters()).device
        pixels = preprocess(images, self.image_size, self.fit).to(device=device, dtype=self.dtype)
        image = self.model.get_image_features(pixel_values=pixels).pooler_output
        texts, index = unique_prompts(prompts)
        ids = self.tokenizer(texts, self.context_length).to(device)
        text = self.model.get_text_features(input_ids=ids).pooler_output[index.to(device)]
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image, text = self.features(images, prompts)
        cosine = (image * text).sum(-1)
        if self.factor == "logit_scale":
            return self.model.logit_scale.float().exp() * cosine
        return float(self.factor) * cosine
