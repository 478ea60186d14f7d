"""Tiny random diffusers models built from config (CPU, no network) and a test-only text encoder."""

from __future__ import annotations

import torch


class ByteTextEncoder:
    """Test-only text encoder: a seeded embedding of the prompt's bytes (different prompts differ).

    Real runs use the pipeline's own text encoders or MiniLM; the algorithm only sees the Cond dict.
    """

    def __init__(self, dim: int = 16, length: int = 8, seed: int = 0, pooled_dim: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(256, dim, generator=g) * 0.5
        self.proj = torch.randn(dim, pooled_dim or dim, generator=g) * 0.5
        self.length = length

    def __call__(self, prompts):
        rows = []
        for p in prompts:
            ids = list(p.encode())[: self.length] + [0] * max(0, self.length - len(p.encode()))
            rows.append(self.table[torch.tensor(ids)])
        h = torch.stack(rows)
        return {"encoder_hidden_states": h, "pooled_projections": h.mean(1) @ self.proj}


def make_tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4)


def make_tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=(4, 6, 6))


def make_tiny_vae(seed: int = 0):
    """A real AutoencoderKL with 2 blocks (x2 downsampling): 4x8x8 latents <-> 3x16x16 images."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def make_policy(kind: str = "sd3", seed: int = 0, vae: bool = True):
    from egrpo_backend.policies.diffusers_policy import DiffusersPolicy

    model = make_tiny_sd3(seed) if kind == "sd3" else make_tiny_flux(seed)
    return DiffusersPolicy(model, ByteTextEncoder(), (4, 8, 8), vae=make_tiny_vae(seed) if vae else None)
