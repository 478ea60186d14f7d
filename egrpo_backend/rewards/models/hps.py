"""HPS v2 / v2.1 (Wu et al. 2023): human preference score, an open_clip ViT-H-14 fine-tuned on HPD v2.

The published files (xswu/HPSv2: HPS_v2_compressed.pt, HPS_v2.1_compressed.pt) are open_clip training
checkpoints ({'state_dict': ...}); they are read with weights_only=True and converted on load to a
transformers CLIPModel (openclip_convert.py). Score = cosine of the normalised image and text features,
as HPSv2's `img_score.score` computes it (no logit scale; about 0.2-0.35). Images go through HPS's
evaluation transform: longest side to 224 and zero padding to a square (`light_augmentation=True`).
"""

from __future__ import annotations

from ..base import register_reward
from .catalog import CLIP_TOKENIZER, HPS_VERSIONS, hps_checkpoint
from .clip_loading import check_tokenizer
from .clip_similarity import ClipSimilarity
from .clip_tokenizer import ClipTokenizer
from .files import find_part, load_state_dict, reward_dirs
from .openclip_convert import clip_from_openclip


@register_reward("hpsv2")
def hpsv2(version: str = "v2.1", path=None, reward_dir=None, tokenizer=None, vision_heads: int | None = None,
          text_heads: int | None = None, device=None, dtype=None, offload: bool = False,
          batch_size: int = 16) -> ClipSimilarity:
    """version: "v2.0" or "v2.1"; path: the checkpoint (.pt or its .safetensors conversion).

    vision_heads / text_heads: only for checkpoints that are not ViT-H-14 (tests use tiny ones).
    """
    if version not in HPS_VERSIONS:
        raise ValueError(f"unknown HPS version {version!r}; valid: {', '.join(HPS_VERSIONS)}")
    dirs = reward_dirs(reward_dir)
    ckpt = find_part(hps_checkpoint(version), dirs, "hpsv2", path)
    tok = ClipTokenizer(find_part(CLIP_TOKENIZER, dirs, "hpsv2", tokenizer))
    model = clip_from_openclip(load_state_dict(ckpt), vision_heads, text_heads, "gelu", tok.eos_token_id,
                               tok.bos_token_id)
    check_tokenizer(model, tok, ckpt)
    return ClipSimilarity("hpsv2", model, tok, factor=1.0, fit="pad", device=device, dtype=dtype, offload=offload,
                          batch_size=batch_size)
