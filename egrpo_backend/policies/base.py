"""The FlowPolicy seam: everything the algorithm needs from a model, and nothing else.

The algorithm (schedule, sde, rollout, advantage, trainer) talks only to this protocol and never
asks which model is behind it. Conventions:
  - latents x: float tensor [B, *latent_shape]; x_t = (1 - sigma) x0 + sigma eps (rectified flow);
    latent_shape is (C, H, W) for image models and (C, F, H, W) for video latents (any rank works:
    the algorithm only reduces over "every non-batch dimension")
  - sigma: float tensor [B] in [0, 1] (1 = pure noise)
  - velocity(x, sigma, cond) -> v = eps - x0, same shape as x (no guidance; see guidance.py)
  - cond: a dict of batch-first tensors (see cond_select / cond_cat), the output of encode()
  - decode(latents) -> images float [B, C, H, W] in [0, 1]; video (the comfy source with
    model.comfy.length > 1): frames float [B, F, C, H, W] in [0, 1]
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, runtime_checkable

import torch

Cond = dict[str, torch.Tensor]


@runtime_checkable
class FlowPolicy(Protocol):
    latent_shape: tuple[int, ...]  # (C, H, W) of one latent; (C, F, H, W) for video
    device: torch.device

    def encode(self, prompts: list[str]) -> Cond: ...

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def lora_model(self) -> torch.nn.Module:
        """The module that carries the LoRA (the denoiser); lora.py injects, toggles and exports on it."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def set_lora_enabled(self, enabled: bool) -> None: ...

    def lora_disabled(self) -> contextlib.AbstractContextManager:
        """`with policy.lora_disabled():` runs the base model (the KL reference), then turns the LoRA back on."""
        ...


@contextlib.contextmanager
def lora_disabled(policy) -> Iterator[None]:
    """The shared implementation of FlowPolicy.lora_disabled, for policies that toggle via set_lora_enabled."""
    policy.set_lora_enabled(False)
    try:
        yield
    finally:
        policy.set_lora_enabled(True)


def cond_select(cond: Cond, index: torch.Tensor | list[int]) -> Cond:
    """Rows `index` of every tensor in cond (repeats allowed)."""
    idx = torch.as_tensor(index, dtype=torch.long)
    return {k: v.index_select(0, idx.to(v.device)) for k, v in cond.items()}


def cond_cat(conds: list[Cond]) -> Cond:
    keys = conds[0].keys()
    return {k: torch.cat([c[k] for c in conds], 0) for k in keys}
