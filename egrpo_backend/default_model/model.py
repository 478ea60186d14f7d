"""The digits model: a 0.63M-parameter diffusers SD3Transformer2DModel on 1x16x16 pixels.

Conventions (shared with the engine, see policies/base.py):
  latent x = image in [-1, 1], shape [B, 1, 16, 16]; x_t = (1 - t) x0 + t eps, t in [0, 1]
  v = transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=...,
                  pooled_projections=..., return_dict=False)[0]   predicts v = eps - x0
  decode(x) = ((x + 1) / 2).clamp(0, 1)
Weights are committed in weights/ as config.json + transformer.safetensors (safetensors, never pickle).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .text import MAX_TOKENS, TEXT_DIM

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "transformer.safetensors"
TIMESTEP_SCALE = 1000.0  # SD3 embeds timesteps on a 0..1000 scale

# 4 layers x 4 heads x 16 dims: the prototype's size; trains to a useful base in a few CPU minutes.
TRANSFORMER_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=1,
    out_channels=1,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=TEXT_DIM,
    caption_projection_dim=64,  # = inner dim (heads x head dim)
    pooled_projection_dim=TEXT_DIM,
    pos_embed_max_size=8,  # 16 / patch 2; the default (96) would add a 590k-parameter table
)


def build_transformer(seed: int | None = None):
    """A freshly initialised transformer with the default config (seeded when `seed` is given)."""
    from diffusers import SD3Transformer2DModel

    if seed is not None:
        torch.manual_seed(seed)
    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def save_transformer(transformer, folder) -> Path:
    """Write config.json + transformer.safetensors into `folder`; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().float().contiguous().cpu() for k, v in transformer.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "model": "SD3Transformer2DModel"})
    return folder


def load_transformer(folder, device: str | torch.device = "cpu"):
    """SD3Transformer2DModel from `folder` (config.json + transformer.safetensors), eval mode."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"digits model file missing: expected {folder / name}. Retrain it with "
                "`python -m egrpo_backend.default_model.train_base --out runs/base` and install a checkpoint "
                "with `python -m egrpo_backend.default_model.select_checkpoint --run runs/base`"
            )
    config = json.loads((folder / CONFIG_FILE).read_text())
    transformer = SD3Transformer2DModel.from_config(config)
    transformer.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return transformer.to(device).eval()


def load_default_transformer(device: str | torch.device = "cpu"):
    """The committed digits model from egrpo_backend/default_model/weights/."""
    return load_transformer(WEIGHTS_DIR, device)


def velocity(transformer, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """v = eps - x0 predicted at x_t = (1 - t) x0 + t eps; t: [B] in [0, 1]."""
    assert cond["encoder_hidden_states"].shape[1:] == (MAX_TOKENS, TEXT_DIM), cond["encoder_hidden_states"].shape
    return transformer(hidden_states=x, timestep=t * TIMESTEP_SCALE, return_dict=False, **cond)[0]
