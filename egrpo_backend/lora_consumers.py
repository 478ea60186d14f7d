"""Each LoRA format read back the way its consumer reads it, before the file is written: how many of
its keys land on a module of the model (docs/lora_formats.md).

  peft   diffusers: the family's LoraLoaderMixin.lora_state_dict (diffusers' own converter), whose
         transformer.<module> keys must name diffusers modules of the model;
  comfy  ComfyUI: diffusion_model.<native module>;
  kohya  kohya sd-scripts, Forge and ComfyUI: lora_unet_<native module, '.' -> '_'>.
The ComfyUI rules are a copy of the two lines of model_lora_keys_unet (ComfyUI 0.33.0,
comfy/lora.py) that map these prefixes from the model's own state-dict keys; ComfyUI cannot be
imported outside ComfyUI. tests/comfy_integration/test_comfy_lora_formats.py checks them against the real
function. A file that maps less than all of its keys is never written (lora.export_lora).
"""

from __future__ import annotations

from typing import NamedTuple

CONSUMERS = {"peft": "diffusers (load_lora_weights)", "comfy": "ComfyUI (LoraLoader)",
             "kohya": "kohya sd-scripts / Forge (and ComfyUI)", "own": "this project's loader (lora.load_lora_file)"}
_DIFFUSERS_MIXINS = {"flux": "FluxLoraLoaderMixin", "sd3": "SD3LoraLoaderMixin", "sana": "SanaLoraLoaderMixin",
                     "qwenimage": "QwenImageLoraLoaderMixin"}
_SUFFIXES = {"peft": (".lora_A.weight", ".lora_B.weight"), "comfy": (".lora_down.weight", ".lora_up.weight", ".alpha"),
             "kohya": (".lora_down.weight", ".lora_up.weight", ".alpha")}


class KeysMapped(NamedTuple):
    consumer: str
    mapped: int
    total: int
    unmapped: list  # file keys the consumer would not load

    def header(self) -> dict:
        return {"consumer": self.consumer, "mapped": self.mapped, "total": self.total}


def comfy_key_map(native_modules) -> dict[str, str]:
    """ComfyUI's names for a model's modules: for each state-dict key diffusion_model.<m>.weight,
    model_lora_keys_unet maps lora_unet_<m with '.' -> '_'> and diffusion_model.<m> to it."""
    key_map = {}
    for m in native_modules:
        key_map[f"lora_unet_{m.replace('.', '_')}"] = m
        key_map[f"diffusion_model.{m}"] = m
    return key_map


def _module_of(key: str, fmt: str) -> str | None:
    for suffix in _SUFFIXES[fmt]:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def keys_mapped(state_dict: dict, fmt: str, modules, family: str | None, own: bool = False) -> KeysMapped:
    """How many keys of `state_dict` (a file's tensors, as they will be written) the consumer of `fmt`
    maps onto `modules` (the model's module names in that consumer's naming). `own`: the file is for
    this project's loader only (our default model), which maps a key when it names one of `modules`."""
    keys = list(state_dict)
    if own:
        prefix = {"peft": "transformer.", "comfy": "diffusion_model.", "kohya": "lora_unet_"}[fmt]
        names = {prefix + (m.replace(".", "_") if fmt == "kohya" else m) for m in modules}
        bad = [k for k in keys if _module_of(k, fmt) not in names]
        return KeysMapped(CONSUMERS["own"], len(keys) - len(bad), len(keys), bad)
    if fmt == "peft":
        converted = _diffusers_view(state_dict, family)
        names = {f"transformer.{m}" for m in modules}
        bad_converted = [k for k in converted if _module_of(k, "peft") not in names]
        # diffusers' converter renames and splits keys: count file keys, blame the converted ones
        mapped = len(keys) if not bad_converted and converted else 0
        return KeysMapped(CONSUMERS["peft"], mapped, len(keys), bad_converted or ([] if converted else keys))
    key_map = comfy_key_map(modules)
    bad = [k for k in keys if _module_of(k, fmt) not in key_map]
    return KeysMapped(CONSUMERS[fmt], len(keys) - len(bad), len(keys), bad)


def _diffusers_view(state_dict: dict, family: str | None) -> dict:
    """The state dict as diffusers' loader of the family sees it after its own key conversion."""
    import diffusers.loaders.lora_pipeline as pipelines

    mixin = getattr(pipelines, _DIFFUSERS_MIXINS.get(family, ""), None)
    if mixin is None:  # a family without a LoRA loader in diffusers: its keys as written
        return dict(state_dict)
    out = mixin.lora_state_dict(dict(state_dict))
    return out[0] if isinstance(out, tuple) else out


def refusal(fmt: str, result: KeysMapped, family: str | None) -> str:
    return (f"LoRA format {fmt!r} would load only {result.mapped} of {result.total} keys in {result.consumer} "
            f"({family or 'this model'}); unmapped: {', '.join(result.unmapped[:8])}"
            f"{' ...' if len(result.unmapped) > 8 else ''}. Nothing was written; export a format this model maps "
            "fully (docs/lora_formats.md has the table)")
