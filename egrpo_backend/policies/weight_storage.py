"""Frozen base weights stored in one dtype (fp8) and computed in another (bf16), diffusers path.

Every Linear / Conv inside the model's repeated blocks (its ModuleLists) is stored in the storage
dtype and upcast to the compute dtype just for its own forward, by diffusers' layerwise casting hooks
(docs/memory.md, "Weight storage"). Layers outside the blocks (embedders, final norm and projection,
under 2% of a FLUX / SD3.5 transformer) stay in the compute dtype. Modulation Linears inside the
blocks are stored in fp8 too, as ComfyUI's fp8 checkpoints store them; that is what fits FLUX.1-dev
in 12 GB of weights.

The LoRA: peft wraps a hooked Linear as its `base_layer`, so the hook casts only the base weight and
never the adapter's lora_A / lora_B, which `lora.add_lora` keeps in the LoRA dtype (fp32 by default).
Casting is applied before the LoRA is injected (the policies do it when they load the model). If a
model already carries peft layers, their adapter sub-modules are skipped here by name, so either
order leaves the adapter alone.

Backward through a cast layer is exact (autograd keeps the upcast copy it used), but it keeps that
copy until the backward pass: train with gradient checkpointing, or the update phase holds a
compute-dtype copy of every layer it ran (docs/memory.md).
"""

from __future__ import annotations

from collections import Counter

import torch

from ..dtypes import is_fp8


def _adapter_patterns() -> tuple[str, ...]:
    """Name patterns of peft's adapter sub-modules (lora_A, lora_B, ...), which are never cast."""
    from peft.tuners.lora.layer import LoraLayer

    return tuple(rf"(^|\.){name}(\.|$)" for name in LoraLayer.adapter_layer_names)


def block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The model's repeated blocks: its direct ModuleList children (transformer_blocks, ...)."""
    return [(name, child) for name, child in model.named_children() if isinstance(child, torch.nn.ModuleList)]


def store_weights(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> int:
    """Store the blocks' Linear / Conv weights in `storage`, computing in `compute`; returns how many
    layers now cast per forward. The rest of `model` must already be in `compute`. A no-op (0) when
    the two dtypes are equal."""
    if storage == compute:
        return 0
    if storage.is_floating_point and not is_fp8(storage) and torch.finfo(storage).bits > torch.finfo(compute).bits:
        raise ValueError(f"model.weight_dtype {storage} is wider than the compute dtype {compute}: storing weights in "
                         "more bytes than they compute in saves nothing; use weight_dtype 'auto' or a narrower dtype")
    from diffusers.hooks import apply_layerwise_casting

    blocks = block_lists(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks (ModuleList children) to store in {storage}; "
                         "use model.weight_dtype 'auto' for this model")
    for _, block_list in blocks:
        apply_layerwise_casting(block_list, storage, compute, skip_modules_pattern=_adapter_patterns())
    _keep_peft_input_casting(model)
    count = count_cast_layers(model)
    if not count:
        raise ValueError(f"{type(model).__name__}'s blocks have no Linear or Conv layers to store in {storage}; "
                         "use model.weight_dtype 'auto' for this model")
    return count


def _keep_peft_input_casting(model: torch.nn.Module) -> None:
    """Undo diffusers' switch-off of peft's input casting on LoRA layers (set when a LoRA was injected
    first). diffusers needs it because its adapters would be cast to fp8; ours stay in the LoRA dtype,
    so peft casting the input up to it (e.g. bf16 -> fp32) is exact and what the adapter needs."""
    from diffusers.hooks.layerwise_casting import _PEFT_AUTOCAST_DISABLE_HOOK

    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(_PEFT_AUTOCAST_DISABLE_HOOK) is not None:
            registry.remove_hook(_PEFT_AUTOCAST_DISABLE_HOOK, recurse=False)


def count_cast_layers(model: torch.nn.Module) -> int:
    """How many sub-modules carry a layerwise-casting hook."""
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    return sum(1 for m in model.modules()
               if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(_LAYERWISE_CASTING_HOOK))


def has_cast_layers(model: torch.nn.Module) -> bool:
    return count_cast_layers(model) > 0


def bytes_by_dtype(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters per dtype name (meta models included: nothing is read)."""
    out: Counter = Counter()
    for p in model.parameters():
        out[str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size()
    return dict(out)
