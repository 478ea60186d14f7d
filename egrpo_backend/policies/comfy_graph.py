"""What the graph did to the MODEL before the Train node, done again in the job's child process.

The Train node records the MODEL's patches (nodes/graph_patches.py) and refuses any it cannot carry;
here they are applied the way ComfyUI's own nodes apply them, so the trained base is the patched
model the graph samples (docs/comfyui.md, "The contract"):
  - LoRAs (LoraLoader / LoraLoaderModelOnly): the same file and strength through
    comfy.sd.load_lora_for_models, then baked into the weights as a full model load does; our
    trained LoRA stacks on top.
  - ModelSampling (ModelSamplingSD3 / AuraFlow / Flux): the same sampling object (shift, multiplier).
And models that need an image next to the prompt are refused by name (refuse_needs_image).
"""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_lora(name: str, lora_dirs: list[str]) -> str:
    """A LoRA file name (relative to a loras folder) -> its path, never outside those folders."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"model.comfy.loras name {name!r} must be a file name relative to ComfyUI's loras folder")
    for folder in lora_dirs:
        root = Path(folder).resolve()
        path = (root / name).resolve()
        if root in path.parents and path.is_file():
            return str(path)
    raise FileNotFoundError(f"LoRA {name!r} (patched onto the MODEL before the Train node) is not in the loras "
                            f"folders {lora_dirs}; put it back or remove it from the graph")


def model_sampling_object(base_model, record: dict):
    """The ModelSampling object ComfyUI's ModelSamplingSD3 / AuraFlow (kind discrete_flow) or
    ModelSamplingFlux (kind flux) node builds for this model."""
    import comfy.model_sampling as ms

    base = {"discrete_flow": ms.ModelSamplingDiscreteFlow, "flux": ms.ModelSamplingFlux}[record["kind"]]

    class ModelSamplingAdvanced(base, ms.CONST):
        pass

    obj = ModelSamplingAdvanced(base_model.model_config)
    if record["kind"] == "flux":
        obj.set_parameters(shift=record["shift"])
    else:
        obj.set_parameters(shift=record["shift"], multiplier=record["multiplier"])
    original = base_model.model_sampling
    if hasattr(original, "noise_scale") and hasattr(obj, "set_noise_scale"):
        obj.set_noise_scale(original.noise_scale)
    return obj


def apply_graph_patches(patcher, loras: list[dict], lora_dirs: list[str], model_sampling: dict, device):
    """The patcher with the graph's LoRAs baked into its weights and its ModelSampling patch set."""
    import comfy.sd
    import comfy.utils

    for entry in loras:
        lora = comfy.utils.load_torch_file(resolve_lora(entry["name"], lora_dirs), safe_load=True)
        patcher = comfy.sd.load_lora_for_models(patcher, None, lora, float(entry["strength"]), 0)[0]
    if patcher.patches:
        with torch.no_grad():
            for key in list(patcher.patches):
                patcher.patch_weight_to_device(key, device_to=device)
        patcher.backup.clear()  # the unpatched weights: never restored in a training job
        patcher.patches.clear()
    if model_sampling:
        patcher.model.model_sampling = model_sampling_object(patcher.model, model_sampling)
    return patcher


def image_input_needed(base_model) -> str | None:
    """What a model needs besides the prompt (a reference or concat image), or None for text-to-image."""
    cfg = getattr(base_model, "model_config", None)
    unet = dict(getattr(cfg, "unet_config", {}) or {})
    name = type(base_model).__name__
    model_type = unet.get("model_type")
    if model_type not in (None, "t2v"):
        return f"{name} ({model_type}) needs an image or control input (clip_fea / concat_latent_image / ...)"
    cin = unet.get("in_channels", unet.get("in_dim"))
    cout = unet.get("out_channels", unet.get("out_dim"))
    if isinstance(cin, int) and isinstance(cout, int) and cin > cout:
        return f"{name} takes {cin} input channels for {cout} latent channels: it needs a concat image (a fill, " \
               "depth, canny or image-to-video model)"
    if unet.get("default_ref_method") in ("index_timestep_zero",):
        return f"{name} is an edit model (Qwen-Image-Edit 2511): it needs reference latents (ReferenceLatent)"
    return None


def refuse_needs_image(base_model) -> None:
    why = image_input_needed(base_model)
    if why:
        raise ValueError(f"{why}; E-GRPO trains on prompts only (no (prompt, reference image) pairs yet): use the "
                         "text-to-image / text-to-video model of this family")
