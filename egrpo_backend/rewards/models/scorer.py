"""What every model-based reward shares: device and dtype placement, offloading, micro-batches, no grad.

A subclass holds its networks in `self.model` (one nn.Module) and implements `score(images, prompts)`
for one micro-batch already on `self.device`. `__call__` is the Reward protocol: it checks the inputs,
moves the model onto the device for the call when `offload=True` (and back to the CPU afterwards, so
the GPU is free for the policy between rollouts), scores `batch_size` images per forward whatever
batch it is given (each chunk moves to the device only for its own forward), and returns float32
CPU scores via check_scores. Memory of the scoring phase: docs/memory.md, "Rewards".
"""

from __future__ import annotations

import torch

from ..base import check_memory_options, check_scores

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class ModelReward:
    """Base of the neural rewards. Options: device (None = CUDA if available), dtype, offload, batch_size."""

    name: str
    model: torch.nn.Module

    def __init__(self, name: str, model: torch.nn.Module, device=None, dtype=None, offload: bool = False,
                 batch_size: int = 16):
        check_memory_options(name, {"offload": offload, "batch_size": batch_size})
        self.name = name
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.offload, self.batch_size = bool(offload), int(batch_size)
        # Rewards are never trained: eval mode (no dropout) and no grads, whatever the caller does.
        self.model = model.eval().requires_grad_(False).to(dtype=self.dtype)
        self.model.to("cpu" if self.offload else self.device)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores [b] of one micro-batch; images are already on self.device (any float dtype)."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"reward {self.name!r} takes images [B, C, H, W]; got shape {tuple(images.shape)}")
        batch = images.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"reward {self.name!r} got {batch} images but {len(prompts)} prompts")
        if self.offload:
            self.model.to(self.device)
        try:
            with torch.no_grad():
                parts = [
                    self.score(images[i : i + self.batch_size].to(self.device), list(prompts[i : i + self.batch_size]))
                    .float()
                    .cpu()
                    for i in range(0, batch, self.batch_size)
                ]
        finally:
            if self.offload:
                self.model.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return check_scores(torch.cat(parts) if parts else torch.zeros(0), batch, self.name)

    def to(self, device) -> "ModelReward":
        """Change the scoring device (the model moves now unless offloaded)."""
        self.device = torch.device(device)
        if not self.offload:
            self.model.to(self.device)
        return self


def unique_prompts(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct prompts (first-seen order) and, per input, its index among them: encode text once per group."""
    order: dict[str, int] = {}
    index = [order.setdefault(p, len(order)) for p in prompts]
    return list(order), torch.tensor(index, dtype=torch.long)
