"""ImageReward (Xu et al. 2023): a BLIP image-text model with an MLP head, trained on human rankings.

Reproduces THUDM/ImageReward's `ImageReward.score` without the image-reward package: the BLIP ViT-L
encodes the 224 px image (ImageReward scores at 224, not BLIP's 384), the BERT text encoder reads
the prompt (bert-base-uncased WordPiece, padded to 35 tokens) while cross-attending to every image
token, the [CLS] feature goes through the MLP head, and the result is standardised:
(r - 0.16717362830052426) / 1.0333394966054072. Typical scores lie in about -2..2.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..base import register_reward
from .blip_convert import split_imagereward, text_config, vision_config
from .catalog import BERT_TOKENIZER, IMAGEREWARD_CHECKPOINT, IMAGEREWARD_CONFIG
from .files import find_part, load_state_dict, reward_dirs
from .mlp_head import mlp_head
from .preprocess import preprocess
from .scorer import ModelReward
from .weights_into import model_from_weights

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's score standardisation
MAX_TEXT_TOKENS = 35  # ImageReward tokenizes with max_length=35


class ImageRewardModel(nn.Module):
    """BLIP vision + cross-attending text encoder + MLP head -> standardised reward [B]."""

    def __init__(self, vision, text, mlp: nn.Sequential):
        super().__init__()
        self.vision, self.text, self.mlp = vision, text, mlp

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts)
        reward = self.mlp(out.last_hidden_state[:, 0, :])  # the [CLS] token's feature
        return ((reward.float() - MEAN) / STD).squeeze(-1)


def build_imagereward_model(sd: dict[str, torch.Tensor], med_config: dict, vision_heads: int | None = None):
    """ImageRewardModel (eval, CPU, float32) from ImageReward.pt's state dict; loads are strict."""
    from transformers import BlipTextModel, BlipVisionModel

    parts = split_imagereward(sd)
    vcfg = vision_config(parts["vision"], vision_heads)
    tcfg = text_config(med_config, vcfg.hidden_size)
    vision = model_from_weights(lambda: BlipVisionModel(vcfg), parts["vision"])
    text = model_from_weights(lambda: BlipTextModel(tcfg, add_pooling_layer=False), parts["text"])
    return ImageRewardModel(vision, text, mlp_head(parts["head"])).eval()


def load_bert_tokenizer(path: str | Path):
    """bert-base-uncased's WordPiece tokenizer from its vocab.txt (or the folder holding it), like BLIP's."""
    from transformers import BertTokenizer

    p = Path(path)
    vocab_file = p / "vocab.txt" if p.is_dir() else p
    if not vocab_file.is_file():
        raise FileNotFoundError(f"no vocab.txt at {str(p)!r}. {BERT_TOKENIZER.hint}")
    tokens = vocab_file.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    # BLIP's init_tokenizer adds these; they only matter for prompts that contain them literally.
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward(ModelReward):
    def __init__(self, model: ImageRewardModel, tokenizer, **placement):
        super().__init__("imagereward", model, **placement)
        self.tokenizer = tokenizer
        self.image_size = int(model.vision.config.image_size)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = preprocess(images, self.image_size, "crop").to(device=device, dtype=self.dtype)
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                             return_tensors="pt")
        return self.model(pixels, enc["input_ids"].to(device), enc["attention_mask"].to(device))


@register_reward("imagereward")
def imagereward(path=None, reward_dir=None, config=None, tokenizer=None, vision_heads: int | None = None,
                device=None, dtype=None, offload: bool = False, batch_size: int = 16) -> ImageReward:
    """path: ImageReward.pt (or its .safetensors); config: med_config.json (default: beside the checkpoint);
    tokenizer: bert-base-uncased's vocab.txt or its folder. vision_heads: only for non-ViT-L checkpoints."""
    dirs = reward_dirs(reward_dir)
    ckpt = find_part(IMAGEREWARD_CHECKPOINT, dirs, "imagereward", path)
    if config is None and (ckpt.parent / "med_config.json").is_file():
        config = ckpt.parent / "med_config.json"
    cfg_path = find_part(IMAGEREWARD_CONFIG, dirs, "imagereward", config)
    if tokenizer is None and (ckpt.parent / "bert-base-uncased" / "vocab.txt").is_file():
        tokenizer = ckpt.parent / "bert-base-uncased"
    tok = load_bert_tokenizer(find_part(BERT_TOKENIZER, dirs, "imagereward", tokenizer))
    med = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
    model = build_imagereward_model(load_state_dict(ckpt), med, vision_heads)
    if len(tok) > model.text.config.vocab_size:
        raise ValueError(f"the tokenizer ({len(tok)} tokens) is larger than the ImageReward text vocabulary "
                         f"({model.text.config.vocab_size}); use bert-base-uncased's vocab.txt. {BERT_TOKENIZER.hint}")
    return ImageReward(model, tok, device=device, dtype=dtype, offload=offload, batch_size=batch_size)
