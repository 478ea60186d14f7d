"""DDPO's JPEG rewards: compressibility = -(JPEG size in kB), incompressibility = +(size in kB)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import check_scores, register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image saved as JPEG (quality 95, like ddpo-pytorch)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    arr = arr.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
    sizes = []
    for a in arr:
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode="L" if a.shape[-1] == 1 else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(np.array(sizes), dtype=torch.float32)


class JpegCompressibility:
    def __init__(self, quality: int = 95, sign: float = -1.0, name: str = "jpeg_compressibility"):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality, self.sign, self.name = int(quality), sign, name

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return check_scores(self.sign * jpeg_size_kb(images, self.quality), images.shape[0], self.name)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> JpegCompressibility:
    return JpegCompressibility(quality, -1.0, "jpeg_compressibility")


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> JpegCompressibility:
    return JpegCompressibility(quality, 1.0, "jpeg_incompressibility")
