"""Build a transformers model straight from converted weights, skipping its random initialisation.

Constructing ViT-H or ViT-L + BERT on the CPU spends seconds drawing random weights that the checkpoint
overwrites at once. The model is built on the meta device (shapes only), the weights are assigned with
a strict load (nothing missing, nothing unexpected), and the non-persistent position-id buffers, which
no checkpoint holds, are rebuilt.
"""

from __future__ import annotations

from typing import Callable

import torch


def model_from_weights(build: Callable[[], torch.nn.Module], weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`build()` on the meta device, then `weights` (cast to float32) loaded strictly; returns it in eval mode."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"uninitialised buffer {name!r} in {type(module).__name__}: not in the weights")
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return model.eval()
