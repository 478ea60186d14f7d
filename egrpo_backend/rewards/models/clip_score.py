"""CLIP score: how well an image matches its prompt under a CLIP model (cosine of the two features).

The raw cosine (about 0.2-0.4 for matching pairs) is the default; `scale=100` gives torchmetrics'
CLIPScore convention (without its clamp at 0), `scale=2.5` Hessel et al.'s. The E-GRPO paper's
"HPS-v2.1 + CLIP" reward and its CLIP evaluation use the laion ViT-H-14 model found by default.
"""

from __future__ import annotations

from ..base import register_reward
from .catalog import CLIP_MODEL
from .clip_loading import find_clip_tokenizer, load_clip
from .clip_similarity import ClipSimilarity
from .files import find_part, reward_dirs


@register_reward("clip_score")
def clip_score(path=None, reward_dir=None, tokenizer=None, scale: float = 1.0, quick_gelu: bool = False,
               vision_heads: int | None = None, text_heads: int | None = None, device=None, dtype=None,
               offload: bool = False, batch_size: int = 16) -> ClipSimilarity:
    """path: a transformers CLIP folder or an open_clip checkpoint (found in the reward folder if omitted).

    quick_gelu / vision_heads / text_heads describe open_clip checkpoints only (OpenAI-trained ones use
    QuickGELU; head counts default to the published ViTs').
    """
    dirs = reward_dirs(reward_dir)
    model_path = find_part(CLIP_MODEL, dirs, "clip_score", path)
    tok_path = find_clip_tokenizer(model_path, tokenizer, dirs, "clip_score")
    model, tok = load_clip(model_path, tok_path, vision_heads, text_heads, "quick_gelu" if quick_gelu else "gelu")
    return ClipSimilarity("clip_score", model, tok, factor=float(scale), fit="crop", device=device, dtype=dtype,
                          offload=offload, batch_size=batch_size)
