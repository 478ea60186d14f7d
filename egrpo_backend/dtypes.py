"""Names of torch dtypes in specs, and how "auto" resolves: one table for config and policies.

Weights have two dtypes (docs/memory.md): the *storage* dtype the frozen base sits in (fp8 halves
bf16's bytes) and the *compute* dtype its layers run in. fp8 is storage only: every forward upcasts
a layer's weight to the compute dtype just before use, as ComfyUI and diffusers' layerwise casting do.
"""

from __future__ import annotations

import torch

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
STORAGE_DTYPES: dict[str, torch.dtype] = {
    **COMPUTE_DTYPES,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
LORA_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on CUDA (what these models are trained in), fp32 on CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return COMPUTE_DTYPES[name]


def resolve_storage_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """'auto' = store the weights in the compute dtype (no casting per layer)."""
    return compute if name == "auto" else STORAGE_DTYPES[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
