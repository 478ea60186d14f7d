"""What the graph did to the MODEL before the Train node: recorded to be done again, or refused by name.

The training child reloads the model file, so every patch on the MODEL (a ComfyUI ModelPatcher) must
be carried explicitly (egrpo_backend/policies/comfy_graph.py applies them) or the trained function is
not the one the graph samples (docs/comfyui.md, "The contract"). Carried:
  - LoRA weight patches (LoraLoader, LoraLoaderModelOnly): each is matched to its file in ComfyUI's
    loras folders (key names from the file's header, then one tensor compared by value) and recorded as
    {"name": path relative to the loras folder, "strength"}.
  - A ModelSampling patch (ModelSamplingSD3 / AuraFlow / Flux): {"kind", "shift", "multiplier"}.
Everything else (other object patches, model_function_wrapper, CFG functions, transformer patches,
wrappers, callbacks, hooks, injections, weight patches that are not a loras-folder file) raises a
ValueError that names it, before any job folder exists.
"""

from __future__ import annotations

import math
import os

CARRIED_OBJECT_PATCHES = ("model_sampling",)
CARRIED_ATTACHMENTS = ("lora_metadata",)  # set by load_lora_for_models: the LoRA file's own header


def _fix() -> str:
    return ("remove that node between the model loader and E-GRPO Train LoRA (train the bare model, or "
            "bake the change into a model file first)")


def _nonempty(value) -> bool:
    if isinstance(value, dict):
        return any(_nonempty(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return len(value) > 0
    return value is not None


def refuse_uncarried(patcher) -> None:
    """Raise, naming it, on any patch of the MODEL that the training child cannot do again."""
    for key in getattr(patcher, "object_patches", {}) or {}:
        if key not in CARRIED_OBJECT_PATCHES:
            raise ValueError(f"the MODEL carries an object patch on {key!r}, which E-GRPO cannot carry into the "
                             f"training job; {_fix()}")
    options = dict(getattr(patcher, "model_options", {}) or {})
    for key, value in options.items():
        if key == "transformer_options":
            for tkey, tvalue in (value or {}).items():
                if _nonempty(tvalue):
                    raise ValueError(f"the MODEL carries transformer_options[{tkey!r}] (attention / block patches "
                                     f"or wrappers from a node), which E-GRPO cannot carry; {_fix()}")
        elif _nonempty(value):
            raise ValueError(f"the MODEL carries model_options[{key!r}] (e.g. model_function_wrapper, CFG or "
                             f"sampler functions from a node), which E-GRPO cannot carry; {_fix()}")
    for attr in ("wrappers", "callbacks", "hook_patches", "injections", "additional_models", "weight_wrapper_patches"):
        if _nonempty(getattr(patcher, attr, None)):
            raise ValueError(f"the MODEL carries {attr} from a node, which E-GRPO cannot carry into the training job; "
                             f"{_fix()}")
    for key, value in (getattr(patcher, "attachments", {}) or {}).items():
        if key not in CARRIED_ATTACHMENTS and _nonempty(value):
            raise ValueError(f"the MODEL carries the attachment {key!r} from a node, which E-GRPO cannot carry; {_fix()}")


def model_sampling_record(patcher) -> dict:
    """{} when the MODEL samples with its own ModelSampling, else the patch as the child rebuilds it."""
    obj = (getattr(patcher, "object_patches", {}) or {}).get("model_sampling")
    if obj is None:
        return {}
    import comfy.model_sampling as ms

    if isinstance(obj, ms.CONST) and isinstance(obj, ms.ModelSamplingFlux):
        return {"kind": "flux", "shift": float(obj.shift)}
    if isinstance(obj, ms.CONST) and isinstance(obj, ms.ModelSamplingDiscreteFlow):
        return {"kind": "discrete_flow", "shift": float(obj.shift), "multiplier": float(obj.multiplier)}
    raise ValueError(f"the MODEL carries a ModelSampling patch of kind {type(obj).__mro__[1].__name__} (not a "
                     "flow-matching ModelSamplingSD3 / AuraFlow / Flux); E-GRPO trains rectified-flow sampling only; "
                     "remove that node")


def equivalent_shift(record: dict) -> float | None:
    """The schedule shift s (sigma = s t / (1 + (s - 1) t)) the patch gives ComfyUI's schedulers."""
    if not record:
        return None
    return math.exp(record["shift"]) if record["kind"] == "flux" else record["shift"]


def _lora_files():
    """(name relative to a loras folder, path, header key set) for every .safetensors LoRA ComfyUI lists."""
    from safetensors import safe_open

    from .comfy_glue import lora_files

    for name, path in lora_files():
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = set(f.keys())
        except Exception:  # an unreadable file is simply not a candidate
            continue
        yield name, path, keys


def _same_file(adapter, path: str) -> bool:
    """One of the adapter's tensors equals the file's tensor of the same key (by value)."""
    import torch
    from safetensors import safe_open

    weights = [w for w in getattr(adapter, "weights", ()) if torch.is_tensor(w)]
    if not weights:
        return False
    with safe_open(path, framework="pt", device="cpu") as f:
        for key in sorted(adapter.loaded_keys):
            t = f.get_tensor(key)
            for w in weights:
                if w.shape == t.shape and torch.equal(w.detach().cpu().to(t.dtype), t):
                    return True
    return False


def lora_stack(patcher) -> list[dict]:
    """The LoRA files patched onto the MODEL, in order, as [{"name", "strength"}]; refuses what is not one."""
    patches = getattr(patcher, "patches", {}) or {}
    if not patches:
        return []
    for weight_key, entries in patches.items():  # what is not a LoRA file is refused before any file is read
        for strength_patch, adapter, strength_model, offset, function in entries:
            if not getattr(adapter, "loaded_keys", None):
                raise ValueError(f"the MODEL's weight {weight_key!r} carries a {type(adapter).__name__} patch that is "
                                 f"not a LoRA file (e.g. a model merge); {_fix()}")
    files = list(_lora_files())
    found: dict[str, float] = {}
    checked: dict[int, str] = {}
    for weight_key, entries in patches.items():
        for strength_patch, adapter, strength_model, offset, function in entries:
            keys = adapter.loaded_keys
            if offset is not None or function is not None or strength_model != 1.0:
                raise ValueError(f"the MODEL's weight {weight_key!r} carries a LoRA patch with an offset, function "
                                 f"or model strength, which LoraLoader never sets; {_fix()}")
            name = checked.get(id(adapter))
            if name is None:
                ordered = sorted(files, key=lambda f: f[0] not in found)  # the files already matched first
                name = next((n for n, path, fkeys in ordered if set(keys) <= fkeys and _same_file(adapter, path)), None)
                if name is None:
                    raise ValueError(f"the MODEL carries a LoRA patch on {weight_key!r} whose file is not in ComfyUI's "
                                     "loras folders (or differs from it); load LoRAs with LoraLoader / "
                                     "LoraLoaderModelOnly from models/loras")
                checked[id(adapter)] = name
            if name in found and found[name] != strength_patch:
                raise ValueError(f"the LoRA {name!r} is applied to the MODEL more than once or with mixed strengths "
                                 f"({found[name]} and {strength_patch}); apply it once")
            found[name] = float(strength_patch)
    return [{"name": n.replace(os.sep, "/"), "strength": s} for n, s in found.items()]


def record_graph_patches(model) -> dict:
    """The model.comfy keys that let the child rebuild this MODEL: loras, lora_dirs, model_sampling."""
    patcher = getattr(model, "patcher", model)
    refuse_uncarried(patcher)
    out = {"model_sampling": model_sampling_record(patcher), "loras": lora_stack(patcher)}
    if out["loras"]:
        from .comfy_glue import lora_folders

        out["lora_dirs"] = lora_folders()
    return out
