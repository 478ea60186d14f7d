"""One LoRA in two namings: diffusers' module names and the native (BFL / SAI) names that ComfyUI,
kohya sd-scripts and Forge use, converted exactly (docs/lora_formats.md).

The name rules below are the Linear-weight entries of two published mappings, kept as data here
because ComfyUI cannot be imported outside ComfyUI (it is not a package):
  ComfyUI 0.33.0, comfy/utils.py: flux_to_diffusers (FLUX) and mmdit_to_diffusers with
      MMDIT_MAP_BLOCK (SD3 / SD3.5), as comfy/lora.py's model_lora_keys_unet uses them;
  diffusers 0.42.1, loaders/lora_conversion_utils.py: _convert_kohya_flux_lora_to_diffusers
      (the same FLUX names, kohya side).
tests/test_lora_formats.py checks the FLUX rules against diffusers' converter, and
tests/comfy_integration/test_comfy_lora_formats.py checks both families against the real ComfyUI functions.

A native module that fuses several diffusers modules (FLUX / SD3 qkv = to_q, to_k, to_v; FLUX's
single-block linear1 = to_q, to_k, to_v, proj_mlp) stacks them by rows in that order. Splitting a
fused LoRA keeps its down and slices its up by rows; fusing stacks the downs and puts the ups on a
block diagonal (rank = sum of the ranks). Both are exact: the update of every row is unchanged.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch


class BlockRules(NamedTuple):
    native: str  # block list in native names ("double_blocks")
    diffusers: str  # the same blocks in diffusers ("transformer_blocks")
    modules: dict  # native module in the block -> the diffusers modules it stacks, by rows


_FLUX_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_SD3_JOINT = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD3.5 dual attention
    "x_block.attn.proj": ("attn.to_out.0",),
    "context_block.attn.proj": ("attn.to_add_out",),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    # context_block.adaLN_modulation.1 is left out: ComfyUI swaps its scale/shift halves in the last block.
}
RULES: dict[str, tuple[BlockRules, ...]] = {
    "flux": (BlockRules("double_blocks", "transformer_blocks", _FLUX_DOUBLE),
             BlockRules("single_blocks", "single_transformer_blocks", _FLUX_SINGLE)),
    "sd3": (BlockRules("joint_blocks", "transformer_blocks", _SD3_JOINT),),
}


class Lora(NamedTuple):  # the shape of lora.LoraTensors (kept apart so this module imports nothing of ours)
    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def _block_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")


def native_name(family: str, name: str) -> tuple[str, int, int] | None:
    """diffusers module -> (native module, slot, number of slots), or None when the rules lack it."""
    for rules in RULES[family]:
        m = _block_pattern(rules.diffusers).match(name)
        if not m:
            continue
        for native, parts in rules.modules.items():
            if m.group(2) in parts:
                return f"{rules.native}.{m.group(1)}.{native}", parts.index(m.group(2)), len(parts)
    return None


def diffusers_names(family: str, name: str) -> tuple[str, ...] | None:
    """native module -> the diffusers modules it stacks by rows, or None when the rules lack it."""
    for rules in RULES[family]:
        m = _block_pattern(rules.native).match(name)
        if m and m.group(2) in rules.modules:
            return tuple(f"{rules.diffusers}.{m.group(1)}.{p}" for p in rules.modules[m.group(2)])
    return None


def naming_of(names) -> tuple[str | None, str | None]:
    """(family, naming) a set of module names is written in, from their block lists; (None, None)
    when they are neither FLUX nor SD3 (our own default model, Sana, or another ComfyUI model)."""
    names = list(names)
    heads = {n.split(".", 1)[0] for n in names}
    if heads & {"double_blocks", "single_blocks"}:
        return "flux", "native"
    if "joint_blocks" in heads:
        return "sd3", "native"
    if heads & {"single_transformer_blocks", "x_embedder"}:
        return "flux", "diffusers"
    if "transformer_blocks" in heads and "context_embedder" in heads:  # a whole model's Linears: SD3 has no x_embedder
        return "sd3", "diffusers"
    if "transformer_blocks" in heads and any(re.search(r"\.(?:attn2?\.(?:add_[qkv]_proj|to_add_out)|ff_context\.)", n) for n in names):
        return None, "diffusers"  # FLUX with double blocks only, or SD3: the caller must say which (family=)
    return None, None


def unmapped(names, family: str, naming: str) -> list[str]:
    """The module names of `naming` that the family's rules cannot carry to the other naming."""
    find = native_name if naming == "diffusers" else diffusers_names
    return [n for n in names if find(family, n) is None]


def to_native(tensors: dict, family: str) -> dict[str, Lora]:
    """diffusers-named LoRA -> native-named LoRA; fused modules get the exact block-diagonal LoRA.

    Raises ValueError naming the modules the rules lack, and fused modules whose parts the LoRA
    covers only partly (their missing rows have no size to take from the file)."""
    missing = unmapped(tensors, family, "diffusers")
    if missing:
        raise ValueError(f"{len(missing)} LoRA module(s) have no {family} native name in ComfyUI's / kohya's "
                         f"mapping: {', '.join(missing[:8])}")
    groups: dict[str, list] = {}
    for name, t in tensors.items():
        native, slot, count = native_name(family, name)
        groups.setdefault(native, [None] * count)[slot] = (name, t)
    out: dict[str, Lora] = {}
    for native, parts in groups.items():
        if any(p is None for p in parts):
            have = [p[0] for p in parts if p is not None]
            need = diffusers_names(family, native)
            raise ValueError(f"{native} fuses {', '.join(need)} but the LoRA covers only {', '.join(have)}: train all "
                             "of them (lora.target_modules) or export this LoRA as 'peft'")
        out[native] = _fuse([t for _, t in parts])
    return out


def _fuse(parts: list) -> Lora:
    if len(parts) == 1:
        t = parts[0]
        return Lora(t.down, t.up, float(t.alpha))
    scale = parts[0].alpha / parts[0].down.shape[0]
    down = torch.cat([p.down.to(torch.float32) for p in parts], 0)
    rows = sum(p.up.shape[0] for p in parts)
    up = torch.zeros(rows, down.shape[0], dtype=torch.float32)
    r0 = c0 = 0
    for p in parts:
        ratio = (p.alpha / p.down.shape[0]) / scale  # 1.0 unless the parts were scaled differently
        up[r0:r0 + p.up.shape[0], c0:c0 + p.down.shape[0]] = p.up.to(torch.float32) * ratio if ratio != 1.0 else p.up
        r0, c0 = r0 + p.up.shape[0], c0 + p.down.shape[0]
    return Lora(down, up, scale * down.shape[0])  # same alpha / rank as the parts


def to_diffusers(tensors: dict, family: str) -> dict[str, Lora]:
    """native-named LoRA -> diffusers-named LoRA; a fused module's rows go to its parts (same down)."""
    missing = unmapped(tensors, family, "native")
    if missing:
        raise ValueError(f"{len(missing)} LoRA module(s) have no diffusers name in diffusers' / ComfyUI's {family} "
                         f"mapping: {', '.join(missing[:8])}")
    out: dict[str, Lora] = {}
    for native, t in tensors.items():
        parts = diffusers_names(family, native)
        slices = _row_slices(native, t, len(parts))
        rank = t.down.shape[0]
        per = rank // len(parts)
        cols = [slice(i * per, (i + 1) * per) for i in range(len(parts))]
        block_diagonal = len(parts) > 1 and rank % len(parts) == 0 and all(
            not t.up[rows][:, c].any() for i, rows in enumerate(slices) for j, c in enumerate(cols) if i != j)
        for i, (name, rows) in enumerate(zip(parts, slices)):
            if block_diagonal:  # what _fuse wrote: each part's own rank and alpha back, nothing approximated
                out[name] = Lora(t.down[cols[i]].clone(), t.up[rows][:, cols[i]].clone(), float(t.alpha) * per / rank)
            else:
                out[name] = Lora(t.down.clone(), t.up[rows].clone(), float(t.alpha))  # own storage: files refuse shared tensors
    return out


def _row_slices(native: str, t, count: int) -> list[slice]:
    """Rows of each part: q, k and v have hidden-size rows (= the input width), proj_mlp the rest."""
    out_rows, in_cols = t.up.shape[0], t.down.shape[1]
    if count == 1:
        return [slice(0, out_rows)]
    if count == 3 and out_rows % 3 == 0:
        h = out_rows // 3
    elif count == 4 and out_rows > 3 * in_cols:
        h = in_cols
    else:
        raise ValueError(f"{native}: a LoRA with {out_rows} output rows cannot be split into {count} parts")
    cuts = [i * h for i in range(count)] + [out_rows]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]
