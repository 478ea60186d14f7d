"""Conversions between the backend's images and ComfyUI's IMAGE ([B, H, W, C] float in [0, 1])."""

from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
import torch


def png_to_image(path_or_bytes) -> torch.Tensor:
    """A PNG file (or its bytes) as an IMAGE batch of one, RGB."""
    from PIL import Image

    src = _io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes)
    with Image.open(src) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def render_png(draw) -> torch.Tensor:
    """Call draw(path) with a temporary PNG path (the backend's plot writers) and load the result."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "figure.png"
        draw(path)
        return png_to_image(path)


def blank_image(h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.ones(1, h, w, 3)


def nchw_to_image(images: torch.Tensor) -> torch.Tensor:
    """Backend [B, C, H, W] (C = 1 or 3) -> IMAGE [B, H, W, 3]."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].permute(0, 2, 3, 1).contiguous()


def image_to_nchw(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> [B, C, H, W] as the backend's rewards take it."""
    return image.detach().float().clamp(0, 1).permute(0, 3, 1, 2).contiguous()
