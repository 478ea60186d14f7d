"""PickScore v1 (Kirstain et al. 2023): human preference between images for a prompt, from a CLIP-H
fine-tuned on Pick-a-Pic.

Score = exp(logit_scale) * cosine, exactly what the authors' inference code returns (about 18-23 for
typical images). The paper's tables report it divided by 100; divide yourself when comparing.
"""

from __future__ import annotations

from ..base import register_reward
from .catalog import PICKSCORE_MODEL
from .clip_loading import find_clip_tokenizer, load_clip
from .clip_similarity import ClipSimilarity
from .files import find_part, reward_dirs


@register_reward("pickscore")
def pickscore(path=None, reward_dir=None, tokenizer=None, device=None, dtype=None, offload: bool = False,
              batch_size: int = 16) -> ClipSimilarity:
    """path: the PickScore_v1 transformers folder (found in the reward folder if omitted)."""
    dirs = reward_dirs(reward_dir)
    model_path = find_part(PICKSCORE_MODEL, dirs, "pickscore", path)
    tok_path = find_clip_tokenizer(model_path, tokenizer, dirs, "pickscore")
    model, tok = load_clip(model_path, tok_path)
    return ClipSimilarity("pickscore", model, tok, factor="logit_scale", fit="crop", device=device, dtype=dtype,
                          offload=offload, batch_size=batch_size)
