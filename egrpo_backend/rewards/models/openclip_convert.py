"""open_clip (and OpenAI CLIP) state dicts -> transformers CLIPModel: config and renamed weights.

open_clip is not a dependency (docs/rewards.md says why), so HPS v2 and other open_clip checkpoints
are converted on load. The two implementations compute the same function; only names and layouts
differ:

  open_clip                                          transformers CLIPModel
  visual.conv1.weight                                vision_model.embeddings.patch_embedding.weight
  visual.class_embedding                             vision_model.embeddings.class_embedding
  visual.positional_embedding                        vision_model.embeddings.position_embedding.weight
  visual.ln_pre / visual.ln_post                     vision_model.pre_layrnorm / .post_layernorm
  visual.proj [width, embed] (x @ proj)              visual_projection.weight [embed, width] (transposed)
  {visual.}transformer.resblocks.N.attn.in_proj_*    {vision,text}_model.encoder.layers.N.self_attn.{q,k,v}_proj
     (q, k and v stacked on dim 0)                      (split in three)
  ...attn.out_proj / ln_1 / ln_2 / mlp.c_fc / c_proj ...self_attn.out_proj / layer_norm1 / 2 / mlp.fc1 / fc2
  token_embedding / positional_embedding             text_model.embeddings.token_embedding / position_embedding
  ln_final                                           text_model.final_layer_norm
  text_projection [width, embed]                     text_projection.weight [embed, width] (transposed)
  logit_scale                                        logit_scale

Sizes come from the tensor shapes. Head counts and the activation are not stored in the weights:
the defaults below cover the published ViT-B/L/H/g/bigG models (text heads = width / 64; ViT-H-14,
used by HPS v2, has 16 vision heads of width 80), and laion models use exact GELU while OpenAI's use
QuickGELU. Pass them explicitly for anything else.
"""

from __future__ import annotations

import re

import torch

from .weights_into import model_from_weights

# Vision width -> heads of the published open_clip ViTs (head_width 64, except H/g/bigG with 16 heads).
VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
# Keys some checkpoints carry that are not weights (OpenAI's JIT-era metadata, old attention masks).
IGNORED = {"input_resolution", "context_length", "vocab_size", "attn_mask", "visual.attn_mask"}

_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_PLAIN = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def is_openclip_state_dict(sd: dict) -> bool:
    return "visual.conv1.weight" in sd and "token_embedding.weight" in sd


def _layers(sd: dict, prefix: str) -> int:
    found = {int(m.group(2)) for k in sd if (m := _RESBLOCK.match(k)) and (m.group(1) or "") == prefix}
    return max(found) + 1 if found else 0


def openclip_config(
    sd: dict[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
):
    """A transformers CLIPConfig for an open_clip state dict (sizes read from the shapes)."""
    from transformers import CLIPConfig

    if not is_openclip_state_dict(sd):
        raise ValueError(
            "not an open_clip/OpenAI CLIP state dict (no 'visual.conv1.weight' / 'token_embedding.weight'); "
            "timm-tower and ResNet open_clip models are not supported"
        )
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid != n_pos - 1:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows, not 1 + a square number of patches")
    vocab, t_width = sd["token_embedding.weight"].shape
    embed = sd["text_projection"].shape[1]
    v_heads = vision_heads or VISION_HEADS.get(v_width, max(1, v_width // 64))
    t_heads = text_heads or max(1, t_width // 64)
    text = dict(
        vocab_size=vocab,
        hidden_size=t_width,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layers(sd, ""),
        num_attention_heads=t_heads,
        max_position_embeddings=sd["positional_embedding"].shape[0],
        hidden_act=hidden_act,
        projection_dim=embed,
        layer_norm_eps=1e-5,
    )
    if eos_token_id is not None:  # the pooled text feature is taken at the first EOS token
        text["eos_token_id"] = eos_token_id
    if bos_token_id is not None:
        text["bos_token_id"] = bos_token_id
    vision = dict(
        hidden_size=v_width,
        intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layers(sd, "visual."),
        num_attention_heads=v_heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act=hidden_act,
        projection_dim=embed,
        layer_norm_eps=1e-5,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed)


def openclip_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split / transpose) every open_clip weight; unknown keys raise, listing them."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in IGNORED:
            continue
        if key in _PLAIN:
            out[_PLAIN[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _RESBLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = chunk.contiguous()
            elif rest in _BLOCK:
                out[base + _BLOCK[rest]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{len(unknown)} open_clip weights have no transformers counterpart: {unknown[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}. This converter covers plain ViT CLIP models (the HPS v2 and "
            "laion/OpenAI ViT checkpoints); models with layer scale, attention pooling or custom text towers are not supported."
        )
    return out


def clip_from_openclip(
    sd: dict[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
):
    """A transformers CLIPModel (eval mode, float32) holding the weights of an open_clip state dict.

    Loading is strict: a weight missing on either side raises, so a silent partial load cannot happen.
    """
    from transformers import CLIPModel

    config = openclip_config(sd, vision_heads, text_heads, hidden_act, eos_token_id, bos_token_id)
    weights = openclip_to_transformers(sd)
    return model_from_weights(lambda: CLIPModel(config), weights)
