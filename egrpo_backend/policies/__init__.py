"""Model sources behind the FlowPolicy seam. `build_policy` is the only place that asks which source."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Cond, FlowPolicy, cond_cat, cond_select
from .names import FAMILY_NAMES, SOURCES



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device = {name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    from ..dtypes import resolve_compute_dtype

    return resolve_compute_dtype(name, device)


def build_policy(model_spec, device: torch.device, dtype: torch.dtype, cond_cache: Path | None = None,
                 cond_cache_gb: float = 20.0, cond_memory_gb: float = 2.0) -> FlowPolicy:
    """A FlowPolicy for ModelSpec.source (default | diffusers | comfy).

    dtype is the compute dtype; model_spec.weight_dtype the storage dtype of the frozen base
    (docs/memory.md). cond_cache (default and diffusers sources): the folder of encoded prompts
    (cond_store.py, docs/prompts.md), at most cond_cache_gb on disk and cond_memory_gb in memory. The
    comfy source reads the cache its node wrote (model.comfy.cond_cache) and, when the node recorded the
    CLIP's files (model.comfy.clip), encodes the other prompts as needed into cond_cache too.
    """
    from ..dtypes import resolve_storage_dtype

    ckpt = model_spec.gradient_checkpointing_on(device)
    if model_spec.source == "default":
        from ..default_model.policy import load_default_policy

        return load_default_policy(device=device, cond_cache=cond_cache, cond_cache_gb=cond_cache_gb,
                                   cond_memory_gb=cond_memory_gb)
    if model_spec.source == "diffusers":
        from .diffusers_policy import load_diffusers_policy

        return load_diffusers_policy(model_spec.path, model_spec.family, device, dtype, gradient_checkpointing=ckpt,
                                     weight_dtype=resolve_storage_dtype(model_spec.weight_dtype, dtype),
                                     cond_cache=cond_cache, cond_cache_gb=cond_cache_gb, cond_memory_gb=cond_memory_gb,
                                     offload_blocks=model_spec.offload_blocks, width=model_spec.width, height=model_spec.height)
    if model_spec.source == "comfy":
        from .comfy_policy import load_comfy_policy  # imports ComfyUI: only ever inside a job's child process

        return load_comfy_policy(model_spec, device, dtype, gradient_checkpointing=ckpt, cond_cache=cond_cache,
                                 cond_cache_gb=cond_cache_gb, cond_memory_gb=cond_memory_gb)
    raise ValueError(f"unknown model source {model_spec.source!r}; valid: {', '.join(SOURCES)}")


def source_defaults(model_spec) -> dict:
    """What a source offers when the spec leaves it out: prompts, held-out pairs, rewards."""
    if model_spec.source == "default":
        from ..default_model.policy import default_job_inputs

        return default_job_inputs()
    return {}


__all__ = ["Cond", "FlowPolicy", "FAMILY_NAMES", "SOURCES", "build_policy", "cond_cat", "cond_select",
           "resolve_device", "resolve_dtype", "source_defaults"]
