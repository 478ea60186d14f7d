"""The latent a ComfyUI graph samples for a family: its shape from the model's latent format and VAE.

Images: [C, H / r, W / r]. Latent formats with latent_dimensions == 3 (Wan, HunyuanVideo, Qwen-Image,
...): [C, F, H / r, W / r], where F is what ComfyUI's empty-latent nodes compute from `length` pixel
frames: ((length - 1) // t) + 1 with the VAE's temporal compression t (comfy_extras/nodes_wan.py,
nodes_hunyuan.py: 4; nodes_mochi.py: 6; nodes_lt.py, nodes_cosmos.py: 8). The spatial ratio r is the
VAE's (comfy.sd.VAE.downscale_ratio, a (frames_fn, h, w) tuple for video VAEs), or without a VAE the
latent format's spacial_downscale_ratio (8 by default, 16 for Flux.2 and Wan 2.2, 32 for HunyuanImage 2.1).
"""

from __future__ import annotations

# Temporal compression of the families whose video VAE is not 4x (used when no VAE is connected).
TEMPORAL_COMPRESSION = {"Mochi": 6, "LTXV": 8, "LTXAV": 8, "Cosmos1CV8x8x8": 8}


def latent_frames(latent_format, vae, length: int) -> int:
    ratio = getattr(vae, "downscale_ratio", None)
    if isinstance(ratio, tuple) and callable(ratio[0]):
        return max(1, int(ratio[0](length)))
    t = TEMPORAL_COMPRESSION.get(type(latent_format).__name__, 4)
    return ((length - 1) // t) + 1


def spatial_ratio(latent_format, vae) -> int:
    ratio = getattr(vae, "downscale_ratio", None)
    if isinstance(ratio, tuple):
        ratio = ratio[-1]
    if isinstance(ratio, int) and ratio > 0:
        return ratio
    return int(getattr(latent_format, "spacial_downscale_ratio", 8))


def latent_shape(latent_format, vae, width: int, height: int, length: int = 1) -> tuple[int, ...]:
    """One latent's shape (no batch axis) as the family's empty-latent node makes it."""
    r = spatial_ratio(latent_format, vae)
    c, h, w = latent_format.latent_channels, height // r, width // r
    dims = getattr(latent_format, "latent_dimensions", 2)
    if dims == 2:
        if length != 1:
            raise ValueError(f"model.comfy.length = {length} but this model makes images "
                             f"({type(latent_format).__name__} latents have no frames axis); set length to 1")
        return (c, h, w)
    if dims == 3:
        return (c, latent_frames(latent_format, vae, length), h, w)
    raise ValueError(f"{type(latent_format).__name__} latents have {dims} dimensions (audio or 3D models): "
                     "E-GRPO trains image and video models only")
