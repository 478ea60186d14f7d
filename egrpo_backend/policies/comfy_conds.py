"""The comfy source's cond cache: each prompt's WHOLE ComfyUI conditioning, as its CLIP made it.

A ComfyUI CONDITIONING is a list of [cross_attn tensor, options dict]; `clip.encode_from_tokens_scheduled`
gives one or more such entries per prompt (pooled_output, attention_mask, conditioning_lyrics, ...) and
conditioning nodes add more (FluxGuidance's guidance). The sampler hands every option to the model's
`extra_conds`, so the cache keeps every one: tensors as safetensors tensors, a list of tensors as one
tensor per item, scalars (numbers, strings, booleans, None) in the JSON metadata. A value of any other
kind is refused by name when the file is written (never dropped). Tensors keep their dtype: ComfyUI's
`apply_model` casts them itself.

Layout: tensor `p{i}.e{j}.{key}` (key "cross_attn" is the entry's first element; a list item adds
`.{k}`); metadata "prompts" (JSON list) and "layout" (JSON: per prompt, per entry, key -> "tensor",
["list", n] or ["value", scalar]). Written atomically.
"""

from __future__ import annotations

import json

import torch

from ..atomic import atomic_save_safetensors

SCALARS = (int, float, str, bool, type(None))
COMFY_FAMILY = "comfy"  # the cond store's family for ComfyUI conditionings (node and child alike)


def _refuse(prompt: str, key: str, value) -> ValueError:
    return ValueError(f"the conditioning of prompt {prompt!r} carries {key!r} = a {type(value).__name__}, which "
                      "E-GRPO cannot store for the training job (tensors, lists of tensors and plain values only); "
                      "remove the node that adds it, or ask for it to be supported")


def flatten_conditioning(prompt: str, conditioning, prefix: str = "") -> tuple[dict, list]:
    """One prompt's CONDITIONING as (tensors named `{prefix}e{j}.{key}[.{k}]`, layout: per entry, key -> kind)."""
    tensors, entries = {}, []
    for j, (cross_attn, options) in enumerate(conditioning):
        kinds = {}
        for key, value in {"cross_attn": cross_attn, **options}.items():
            name = f"{prefix}e{j}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous().clone()
                kinds[key] = "tensor"
            elif isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
                for k, v in enumerate(value):
                    tensors[f"{name}.{k}"] = v.detach().cpu().contiguous().clone()
                kinds[key] = ["list", len(value)]
            elif isinstance(value, SCALARS):
                kinds[key] = ["value", value]
            else:
                raise _refuse(prompt, key, value)
        entries.append(kinds)
    return tensors, entries


def unflatten_conditioning(get_tensor, entries, prefix: str = "") -> list[tuple]:
    """The CONDITIONING [(cross_attn, options), ...] that flatten_conditioning stored."""
    conditioning = []
    for j, kinds in enumerate(entries):
        values = {}
        for key, kind in kinds.items():
            name = f"{prefix}e{j}.{key}"
            if kind == "tensor":
                values[key] = get_tensor(name)
            elif kind[0] == "list":
                values[key] = [get_tensor(f"{name}.{k}") for k in range(kind[1])]
            else:
                values[key] = kind[1]
        cross_attn = values.pop("cross_attn", None)
        conditioning.append((cross_attn, values))
    return conditioning


LAYOUT = "layout"  # the key of a store row's layout: its JSON as a uint8 tensor


def conditioning_to_cond(prompt: str, conditioning) -> dict:
    """A CONDITIONING as a batch-1 Cond for the cond store (policies/cond_store.py): the same tensors as
    the cache file, each given a batch dimension of 1 (the store strips it again), and the layout as bytes."""
    tensors, entries = flatten_conditioning(prompt, conditioning)
    cond = {k: v.unsqueeze(0) for k, v in tensors.items()}
    cond[LAYOUT] = torch.tensor(list(json.dumps(entries).encode("utf-8")), dtype=torch.uint8).unsqueeze(0)
    return cond


def cond_to_conditioning(cond: dict) -> list[tuple]:
    """The CONDITIONING a Cond from conditioning_to_cond holds (exact)."""
    entries = json.loads(bytes(cond[LAYOUT][0].tolist()).decode("utf-8"))
    return unflatten_conditioning(lambda name: cond[name][0], entries)


def write_comfy_conds(conditionings: dict[str, list], path) -> None:
    """prompt -> ComfyUI CONDITIONING ([[tensor, {options}], ...]) into one safetensors file."""
    tensors, layout = {}, []
    for i, (prompt, conditioning) in enumerate(conditionings.items()):
        t, entries = flatten_conditioning(prompt, conditioning, f"p{i}.")
        tensors.update(t)
        layout.append(entries)
    atomic_save_safetensors(tensors, path, {"prompts": json.dumps(list(conditionings)), "layout": json.dumps(layout)})


def read_comfy_conds(path) -> tuple[list[str], list[list[tuple]]]:
    """(prompts, per prompt its CONDITIONING as [(cross_attn, options), ...]) on the CPU."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if "layout" not in meta:
            raise ValueError(f"{path} is not a comfy cond cache of this version (no 'layout' in its metadata); "
                             "queue the graph again so the Train node re-encodes the prompts")
        prompts, layout = json.loads(meta["prompts"]), json.loads(meta["layout"])
        out = [unflatten_conditioning(f.get_tensor, entries, f"p{i}.") for i, entries in enumerate(layout)]
    return prompts, out
