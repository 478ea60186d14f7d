"""A stand-in video FlowPolicy for CPU tests: the embedded default digits model run on every frame.

latent_shape is (C, F, H, W), the layout of ComfyUI's video latents (Wan, HunyuanVideo); decode
returns frames [B, F, C, H, W] in [0, 1], what a video VAE gives. The frames are coupled: each
frame's velocity is pulled halfway to the clip's mean velocity, so the LoRA learns one function of
the whole clip (a still clip and a flickering one are different outputs of it).
"""

from __future__ import annotations

import torch

from egrpo_backend.policies.base import lora_disabled


class FramesPolicy:
    def __init__(self, image_policy, frames: int = 3, coupling: float = 0.5):
        self.image = image_policy
        self.frames, self.coupling = frames, coupling
        c, h, w = image_policy.latent_shape
        self.latent_shape = (c, frames, h, w)
        self.device = image_policy.device

    def encode(self, prompts):
        return self.image.encode(prompts)

    def release_text_encoder(self):
        self.image.release_text_encoder()

    def velocity(self, x, sigma, cond):
        B, C, F, H, W = x.shape
        per_frame = x.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W)  # [B, C, F, H, W] -> [B*F, C, H, W]
        rows = torch.arange(B).repeat_interleave(F)
        v = self.image.velocity(per_frame, sigma.repeat_interleave(F), {k: t[rows.to(t.device)] for k, t in cond.items()})
        v = v.reshape(B, F, C, H, W).permute(0, 2, 1, 3, 4)  # back to [B, C, F, H, W]
        return (1 - self.coupling) * v + self.coupling * v.mean(2, keepdim=True)

    def decode(self, latents):
        B, C, F, H, W = latents.shape
        images = self.image.decode(latents.permute(0, 2, 1, 3, 4).reshape(B * F, C, H, W))
        return images.reshape(B, F, *images.shape[1:])  # [B, F, C, H, W]

    def lora_model(self):
        return self.image.lora_model()

    def trainable_parameters(self):
        return self.image.trainable_parameters()

    def set_lora_enabled(self, enabled):
        self.image.set_lora_enabled(enabled)

    def lora_disabled(self):
        return lora_disabled(self)


def make_video_policy(frames: int = 3):
    from egrpo_backend.default_model.policy import load_default_policy

    return FramesPolicy(load_default_policy("cpu"), frames)
