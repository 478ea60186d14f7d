"""Which LoRA formats a job can export, known from its spec before anything is created
(docs/lora_formats.md): the model family and whose module names its LoRA will carry.

  model.source diffusers: diffusers names; the family is model.family or the pipeline folder's
      transformer class (transformer/config.json "_class_name");
  model.source comfy: native names (ComfyUI's); the family is read from the model file's tensor
      names (double_blocks -> FLUX, joint_blocks -> SD3);
  model.source default: our own model, loaded by our own loader only: every format, names as they are.
Formats are refused when the family has no published mapping between the two namings (lora_names.RULES):
diffusers-trained Sana / Qwen-Image as kohya or comfy, ComfyUI-trained models other than FLUX / SD3 as peft.
A custom lora.target_modules that covers a fused module only partly (to_q without to_k) is refused
for kohya / comfy at export, where the module list is known (lora_names.to_native).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import lora_names

NAMING_OF_SOURCE = {"diffusers": "diffusers", "comfy": "native", "default": "own"}
_CLASS_FAMILY = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "SanaTransformer2DModel": "sana",
                 "QwenImageTransformer2DModel": "qwenimage"}
_NATIVE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def spec_naming(spec) -> str:
    return NAMING_OF_SOURCE.get(spec.model.source, "own")


def spec_family(spec) -> str | None:
    """The model family, when the spec (or the files it names) says it; None when unknown."""
    model = spec.model
    if model.source == "diffusers":
        if model.family != "auto":
            return model.family
        config = Path(model.path) / "transformer" / "config.json"
        try:
            return _CLASS_FAMILY.get(json.loads(config.read_text()).get("_class_name"))
        except (OSError, ValueError, AttributeError):
            return None
    if model.source == "comfy":
        return _file_family(model.path)
    return None


def _file_names(path: str) -> list[str] | None:
    """The tensor names of a .safetensors file (its header only); None when it cannot be read as one."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                return None
            return [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    except (OSError, ValueError, AttributeError):
        return None


def _file_family(path: str) -> str | None:
    """FLUX / SD3 from a .safetensors model file's tensor names."""
    names = _file_names(path) or []
    stripped = []
    for k in names:
        for p in _NATIVE_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        stripped.append(k)
    family, naming = lora_names.naming_of(stripped)
    return family if naming == "native" else None


def unloadable_formats(spec) -> list[tuple[str, str]]:
    """[(format, why)] for the spec's output formats that its model's LoRA cannot be written in."""
    naming = spec_naming(spec)
    if naming == "own":
        return []
    family = spec_family(spec)
    out = []
    for fmt in spec.output.formats:
        want = "diffusers" if fmt == "peft" else "native"
        if want == naming:
            continue
        if family is None:
            if spec.model.source == "comfy" and fmt == "peft" and _file_names(spec.model.path) is not None:
                out.append((fmt, "the ComfyUI model file is not a FLUX or SD3 model, and only those have a published "
                                 "mapping to diffusers' module names"))
            continue  # not known before loading (a file not there yet, a non-safetensors file): checked at export
        if family not in lora_names.RULES:
            out.append((fmt, f"{family} has no published mapping between diffusers' and ComfyUI's / kohya's module names "
                             f"(only {', '.join(lora_names.RULES)} do)"))
    return out
