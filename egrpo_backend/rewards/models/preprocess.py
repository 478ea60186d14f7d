"""Image preprocessing of the reward models, on tensors, without torchvision.

Every reward here was trained on images that went through torchvision (or PIL) transforms; these
functions do the same on batched float tensors, matching torchvision's tensor path:
  - `resize_crop`: Resize(size, BICUBIC) of the shortest side + CenterCrop(size) (CLIP, PickScore,
    ImageReward, the aesthetic predictor);
  - `resize_pad`: the longest side to `size` + zero padding to a square (HPS v2's ResizeMaxSize,
    which its `light_augmentation=True` evaluation transform uses);
then Normalize with the CLIP mean/std (BLIP/ImageReward use the same constants).
Resizing is bicubic with antialias=True, like torchvision on tensors; values are not clamped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FITS = ("crop", "pad")


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B, 1|3, H, W] -> [B, 3, H, W]; gray images are repeated to three channels."""
    if images.ndim != 4:
        raise ValueError(f"reward models take images [B, C, H, W]; got shape {tuple(images.shape)}")
    channels = images.shape[1]
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels != 3:
        raise ValueError(f"reward models take 1- or 3-channel images; got {channels} channels (drop alpha first)")
    return images


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(images.shape[-2:]) == (height, width):
        return images  # torchvision skips the resize too, so the pixels stay exact
    return F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)


def resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shortest side to `size` (torchvision's rounding), then a centered `size` x `size` crop."""
    h, w = images.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    images = _resize(images, new_h, new_w)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def resize_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """Longest side to `size`, then zero padding (black, before normalisation) centred to a square."""
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        images = _resize(images, new_h, new_w)
        pad_h, pad_w = size - new_h, size - new_w
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return images


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def preprocess(images: torch.Tensor, size: int, fit: str = "crop") -> torch.Tensor:
    """Images [B, C, H, W] in [0, 1] -> normalised float32 pixels [B, 3, size, size] for the model."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    images = to_rgb(images.float())
    images = resize_crop(images, size) if fit == "crop" else resize_pad(images, size)
    return normalize(images)
