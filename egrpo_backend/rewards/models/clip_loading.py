"""Load a CLIP model from local files: a transformers folder, or an open_clip checkpoint converted on load.

Accepted `path`s:
  - a transformers CLIP folder: config.json + model.safetensors (or pytorch_model.bin, which
    transformers reads with weights_only=True);
  - an open_clip / OpenAI-format checkpoint file (.safetensors, or .pt/.pth/.bin read with
    weights_only=True), or a folder holding open_clip_model.safetensors / open_clip_pytorch_model.bin.
The tokenizer comes from the folder itself when it has vocab.json + merges.txt, else from `tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .clip_tokenizer import TOKENIZER_HINT, ClipTokenizer, has_clip_tokenizer
from .files import load_state_dict
from .openclip_convert import clip_from_openclip, is_openclip_state_dict

OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def load_clip(path: str | Path, tokenizer: str | Path | None = None, vision_heads: int | None = None,
              text_heads: int | None = None, hidden_act: str = "gelu"):
    """(CLIPModel in eval mode on the CPU, ClipTokenizer) for a local CLIP model.

    vision_heads / text_heads / hidden_act matter only for open_clip checkpoints (see openclip_convert).
    """
    path = Path(path)
    tok_source = tokenizer if tokenizer is not None else (path if path.is_dir() and has_clip_tokenizer(path) else None)
    if tok_source is None:
        raise FileNotFoundError(f"no CLIP tokenizer for the model at {str(path)!r}. {TOKENIZER_HINT}")
    tok = ClipTokenizer(tok_source)

    if path.is_dir() and (path / "config.json").is_file():
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    else:
        ckpt = path
        if path.is_dir():
            ckpt = next((path / n for n in OPENCLIP_FILES if (path / n).is_file()), None)
            if ckpt is None:
                raise FileNotFoundError(
                    f"{str(path)!r} is neither a transformers CLIP folder (config.json + model.safetensors) nor holds "
                    f"an open_clip checkpoint ({', '.join(OPENCLIP_FILES)})"
                )
        sd = load_state_dict(ckpt)
        if not is_openclip_state_dict(sd):
            raise ValueError(
                f"{str(ckpt)!r} is not an open_clip/OpenAI CLIP checkpoint; for transformers weights pass the folder "
                "that holds config.json and the weights"
            )
        model = clip_from_openclip(sd, vision_heads, text_heads, hidden_act, tok.eos_token_id, tok.bos_token_id)
    check_tokenizer(model, tok, path)
    return model.eval(), tok


def check_tokenizer(model, tok: ClipTokenizer, path) -> None:
    """Fail early on a tokenizer that does not fit the model, and pool text at the tokenizer's EOS."""
    vocab = model.config.text_config.vocab_size
    if tok.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer at {tok.source!r} has {tok.vocab_size} tokens but the model at {str(path)!r} only "
            f"{vocab}: they do not belong together. {TOKENIZER_HINT}"
        )
    # transformers pools the text feature at the first EOS id (or, for configs with the old id 2, at the
    # largest id); setting the tokenizer's id makes both kinds of config pool at the real EOS token.
    model.text_model.eos_token_id = tok.eos_token_id
    model.config.text_config.eos_token_id = tok.eos_token_id


def find_clip_tokenizer(model_path: Path, tokenizer, dirs, reward: str) -> Path:
    """The tokenizer to use: `tokenizer` if given, else the model folder's own, else one from the reward folders."""
    from .catalog import CLIP_TOKENIZER
    from .files import find_part

    if tokenizer is None and model_path.is_dir() and has_clip_tokenizer(model_path):
        return model_path
    return find_part(CLIP_TOKENIZER, dirs, reward, tokenizer)
