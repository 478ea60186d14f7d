"""ImageReward's BLIP checkpoint -> transformers BlipVisionModel + BlipTextModel weights, plus its MLP head.

ImageReward.pt is the state dict of `ImageReward` (THUDM/ImageReward): a BLIP ViT (`blip.visual_encoder`,
timm-style), BLIP's BERT text encoder with cross-attention (`blip.text_encoder`, BLIP's med.py) and
`mlp`. transformers' BLIP classes are ports of the same code:

  blip.visual_encoder.                      BlipVisionModel
    cls_token / pos_embed                     embeddings.class_embedding / embeddings.position_embedding
    patch_embed.proj.{weight,bias}            embeddings.patch_embedding.{weight,bias}
    blocks.N.norm1 / norm2                    encoder.layers.N.layer_norm1 / layer_norm2
    blocks.N.attn.qkv / attn.proj             encoder.layers.N.self_attn.qkv / self_attn.projection
    blocks.N.mlp.fc1 / fc2                    encoder.layers.N.mlp.fc1 / fc2
    norm                                      post_layernorm
  blip.text_encoder.<name>                  BlipTextModel <name> (med.py's names are kept)
  mlp.layers.{0,2,4,6,7}                    the MLP head (mlp_head.py), kept as layers.*
Dropped on purpose (not used to score): blip.vision_proj, blip.text_proj (contrastive projections) and
the text position_ids buffer. Anything else unknown raises.
"""

from __future__ import annotations

import re

import torch

VISION_HEADS = {768: 12, 1024: 16}  # BLIP ViT-B/16 and ViT-L/16 (ImageReward uses ViT-L)
UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.(weight|bias)$|^blip\.text_encoder\.embeddings\.position_ids$")
_VISION_PLAIN = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def split_imagereward(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{'vision': ..., 'text': ..., 'head': ...} state dicts in transformers' names; unknown keys raise."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    unknown = []
    for key, value in sd.items():
        if UNUSED.match(key):
            continue
        if key.startswith("blip.visual_encoder."):
            name = _vision_name(key[len("blip.visual_encoder."):])
            if name is None:
                unknown.append(key)
            else:
                parts["vision"][name] = value
        elif key.startswith("blip.text_encoder."):
            parts["text"][key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            parts["head"][key[len("mlp."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} ImageReward weights have no place in the converted model: {unknown[:8]}; "
                         "is this THUDM's ImageReward.pt?")
    for part, d in parts.items():
        if not d:
            raise ValueError(f"the checkpoint has no {part} weights; is this THUDM's ImageReward.pt?")
    return parts


def _vision_name(key: str) -> str | None:
    if key in _VISION_PLAIN:
        return _VISION_PLAIN[key]
    m = _BLOCK.match(key)
    if m and m.group(2) in _VISION_BLOCK:
        return f"encoder.layers.{m.group(1)}.{_VISION_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def vision_config(vision_sd: dict[str, torch.Tensor], heads: int | None = None):
    """BlipVisionConfig from the converted vision weights (BLIP's ViT: LayerNorm eps 1e-6, exact GELU)."""
    from transformers import BlipVisionConfig

    width, _, patch, _ = vision_sd["embeddings.patch_embedding.weight"].shape
    n_pos = vision_sd["embeddings.position_embedding"].shape[1]
    grid = round((n_pos - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=heads or VISION_HEADS.get(width, max(1, width // 64)),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )


def text_config(med_config: dict, encoder_width: int):
    """BlipTextConfig from ImageReward's med_config.json (a BertConfig), cross-attending to `encoder_width`.

    BLIP overrides the json's encoder_width with the ViT's width, so it is taken from the weights.
    is_decoder=True only makes transformers build the cross-attention layers; scoring runs the encoder
    bidirectionally, like BLIP's multimodal mode.
    """
    from transformers import BlipTextConfig

    c = med_config
    return BlipTextConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        max_position_embeddings=c["max_position_embeddings"],
        hidden_act=c.get("hidden_act", "gelu"),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        pad_token_id=c.get("pad_token_id", 0),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,
        use_cache=False,
    )
