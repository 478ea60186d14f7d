"""LoRA on any torch module: inject, toggle, read out, export in three key formats, load back.

Works on a diffusers transformer (SD3 / Flux / Sana ...) or a ComfyUI diffusion model alike, through
peft's generic `inject_adapter_in_model` (no diffusers mixins), on Linear layers only. The adapter
is always named "egrpo", so a model can carry other peft adapters beside ours.

Canonical form (what the trainer checkpoints and every format converts to and from):
    {module path: LoraTensors(down [r, in], up [out, r], alpha)}
    delta W = (alpha / r) * up @ down
where the module path is the model's own dotted name (e.g. "transformer_blocks.0.attn.to_q").

File formats, each named for its consumer whichever path trained the LoRA (docs/lora_formats.md):
    peft   transformer.<diffusers module>.lora_A.weight / .lora_B.weight, alpha / r folded into lora_B
           and no alpha keys (diffusers' SD3 loader rejects them); for diffusers' load_lora_weights
    kohya  lora_unet_<native module, . -> _>.lora_down.weight / .lora_up.weight / .alpha: the names
           kohya sd-scripts and Forge use (FLUX: BFL names, q/k/v fused into qkv), read by ComfyUI too
    comfy  diffusion_model.<native module>.lora_down.weight / .lora_up.weight / .alpha (ComfyUI)
A LoRA is converted between diffusers and native (BFL / SAI) module names exactly (lora_names.py),
and every file is read back through its consumer's key mapping before it is written
(lora_consumers.py): a format that would not map all its keys is refused, never written.
For a ComfyUI model, pass its `diffusion_model` (not the BaseModel around it), so that paths are
the native names ComfyUI's LoRA loader maps.

Files are safetensors only (never pickle), written atomically, with the training spec and metrics
in the header. A file that does not fit the model raises a ValueError that names the first
offending key and what the model expected.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import lora_names
from .atomic import atomic_save_safetensors
from .lora_consumers import keys_mapped, refusal

ADAPTER = "egrpo"  # peft adapter name of our LoRA
FORMATS = ("kohya", "peft", "comfy")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
JSON_METADATA_KEYS = ("egrpo.spec", "egrpo.metrics", "egrpo.keys_mapped")  # header values that read_lora decodes from JSON

_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")  # the second: kohya-style files with diffusers names
_PEFT_PREFIXES = ("transformer.", "base_model.model.", "")  # diffusers, peft's own save, bare
_COMFY_PREFIX = "diffusion_model."
_PEFT_WRAPPER = "base_model.model."  # what peft.get_peft_model puts in front of module names

# Default targets: the attention and MLP projections of every block, as kohya sd-scripts trains them
# (its modulation layers aside), so that both paths put the same LoRA on the same model
# (docs/lora_formats.md). Matched on the end of a Linear module's full name.
_DEFAULT_TARGETS = (
    # diffusers (SD3 / Flux / Sana / Qwen-Image ...): q, k, v, out, and the joint-attention context stream
    r"(?:^|\.)(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
    # diffusers MLPs: SD3 / Flux feed-forwards (image and context streams), Flux single blocks' mlp-in and
    # the single block's out projection (attention out + mlp-out, BFL's linear2)
    r"(?:^|\.)ff(?:_context)?\.net\.(?:0\.proj|2)$",
    r"(?:^|\.)single_transformer_blocks\.\d+\.(?:proj_mlp|proj_out)$",
    # ComfyUI / BFL names: Flux img_attn/txt_attn, SD3 MMDiT attn, Wan self_attn/cross_attn, Lumina attention
    r"(?:^|\.)\w*(?:attn|attention)\w*\.(?:qkv|proj|q|k|v|o|out)$",
    # ComfyUI MLPs: Flux img_mlp / txt_mlp, SD3 MMDiT x_block / context_block mlp
    r"(?:^|\.)(?:img|txt)_mlp\.(?:0|2)$",
    r"(?:^|\.)(?:x_block|context_block)\.mlp\.(?:fc1|fc2)$",
    # ComfyUI Flux single blocks: linear1 = fused qkv + mlp-in, linear2 = attention out + mlp-out
    r"(?:^|\.)(?:linear1|linear2)$",
)


@dataclass
class LoraSettings:
    """What LoRA to inject. Mirrors config.LoraSpec (the job spec) minus the seed."""

    rank: int = 8  # r, the inner dimension of each low-rank update
    alpha: float = 8.0  # scale of the update is alpha / rank (alpha = rank: scale 1)
    target_modules: list[str] | None = None  # Linear module names or name suffixes ("to_q", "attn.to_out.0"); None = default_target_modules(model)
    dropout: float = 0.0  # dropout on the LoRA input during training (0 keeps rollouts and updates consistent)
    dtype: str = "float32"  # LoRA weights (and so their AdamW state): float32 | bfloat16, whatever the base's dtype

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r} (alpha = rank gives scale 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"LoRA target_modules must be a list of module names, got {self.target_modules!r} "
                    "(e.g. ['to_q', 'to_k', 'to_v', 'to_out.0']; None picks the attention projections)"
                )
            if not self.target_modules:
                raise ValueError("LoRA target_modules is empty; use None for the default attention projections")
        from .dtypes import LORA_DTYPES

        if self.dtype not in LORA_DTYPES:
            raise ValueError(f"LoRA dtype {self.dtype!r} is not allowed; valid values: {', '.join(map(repr, LORA_DTYPES))}")


class LoraTensors(NamedTuple):
    """One module's LoRA: delta W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # [r, in] (peft lora_A)
    up: torch.Tensor  # [out, r] (peft lora_B)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# ----------------------------------------------------------------------------------------------
# Finding modules


def _own_name(name: str) -> str:
    """The model's own dotted name, without peft's wrapper prefix."""
    return name[len(_PEFT_WRAPPER) :] if name.startswith(_PEFT_WRAPPER) else name


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> peft LoRA layer that carries our adapter."""
    from peft.tuners.lora import LoraLayer

    return {
        _own_name(name): mod
        for name, mod in model.named_modules()
        if isinstance(mod, LoraLayer) and ADAPTER in mod.lora_A
    }


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the model's own Linear layers, in module order (a peft-wrapped Linear counts once)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: list[str] = []
    inside: tuple[str, ...] = ()  # a wrapper's base_layer and the adapters' own Linears live in here
    for name, mod in model.named_modules():  # pre-order: a wrapper comes before its children
        if inside and name.startswith(inside):
            continue
        if isinstance(mod, BaseTunerLayer):
            inside += (name + ".",)
            if isinstance(mod.get_base_layer(), nn.Linear):
                names.append(_own_name(name))
        elif isinstance(mod, nn.Linear):
            names.append(_own_name(name))
    return names


def _name_examples(names: list[str], n: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def default_target_modules(model: nn.Module) -> list[str]:
    """Full names of the model's attention and MLP projection Linear layers (the default LoRA targets).

    Covers diffusers names (to_q/k/v, to_out.0, add_*_proj, to_add_out, ff.net.0.proj / ff.net.2 and
    their ff_context twins, single blocks' proj_mlp / proj_out) and ComfyUI / BFL / SAI names
    (img_attn.qkv, txt_attn.proj, img_mlp.0/2, single-block linear1/linear2, attn.qkv/proj,
    mlp.fc1/fc2, self_attn.q/k/v/o): the same weights of a FLUX or SD3 on both paths.
    """
    pattern = re.compile("|".join(_DEFAULT_TARGETS))
    linears = _linear_names(model)
    found = [n for n in linears if pattern.search(n)]
    if not found:
        raise ValueError(
            f"no attention projections found for a default LoRA in {type(model).__name__}; pass "
            f"LoraSettings(target_modules=[...]) with names or name suffixes of its Linear layers, "
            f"for example: {_name_examples(linears) or '(the model has no Linear layers)'}"
        )
    return found


def _resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full Linear names matched by `targets` (exact names or suffixes after a '.')."""
    linears = _linear_names(model)
    found: list[str] = []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(
                f"LoRA target {target!r} matches no Linear layer of {type(model).__name__} (LoRA only "
                f"goes on Linear layers); Linear layers are: {_name_examples(linears)}"
            )
        found += [h for h in hits if h not in found]
    return found


# ----------------------------------------------------------------------------------------------
# Injecting and toggling


def has_lora(model: nn.Module) -> bool:
    """True if `model` carries our adapter."""
    return bool(_lora_layers(model))


def add_lora(model: nn.Module, settings: LoraSettings | None = None, seed: int = 0) -> list[nn.Parameter]:
    """Inject our LoRA into `model` in place, freeze everything else, return the LoRA parameters.

    Down (lora_A) is drawn from `seed` (kaiming-uniform, as peft does) and up (lora_B) is zero, so
    the model's output is unchanged until training moves it. The global RNG is left untouched.
    """
    settings = settings or LoraSettings()
    return _inject(model, settings, seed, ranks={}, alphas={})


def _inject(
    model: nn.Module, settings: LoraSettings, seed: int, ranks: dict[str, int], alphas: dict[str, float]
) -> list[nn.Parameter]:
    """add_lora, with optional per-module ranks / alphas (for files whose modules differ)."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(model):
        raise ValueError(
            f"{type(model).__name__} already has an '{ADAPTER}' LoRA; use set_lora_tensors to load new "
            "weights into it, or build a fresh model to add a second one"
        )
    if settings.target_modules is None:
        targets = default_target_modules(model)
    else:
        targets = _resolve_targets(model, settings.target_modules)

    # peft matches a target when a name equals it or ends with "." + it: full names pick exactly these.
    # Per-module patterns are regexes matched on the end of the name, hence re.escape.
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        rank_pattern={re.escape(k): v for k, v in ranks.items()},
        alpha_pattern={re.escape(k): v for k, v in alphas.items()},
    )
    with torch.random.fork_rng(devices=[]):  # peft's own init draws from the global RNG
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    # peft gives the adapter its base layer's dtype: fp8 for a base stored in fp8 (docs/memory.md).
    # The adapter trains in its own dtype instead; the base layer's casting never touches it.
    from .dtypes import LORA_DTYPES

    for layer in _lora_layers(model).values():
        layer.lora_A[ADAPTER].to(LORA_DTYPES[settings.dtype])
        layer.lora_B[ADAPTER].to(LORA_DTYPES[settings.dtype])

    # Our own init from a private generator, in module order: same seed -> same LoRA on any device.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _lora_layers(model).values():
            down = layer.lora_A[ADAPTER].weight
            init = torch.empty(down.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=gen)
            down.copy_(init)
            layer.lora_B[ADAPTER].weight.zero_()

    params = lora_parameters(model)
    lora_ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_ids)
    return params


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Our adapter's parameters (down then up, per module, in module order)."""
    params = []
    for layer in _lora_layers(model).values():
        params += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
    return params


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch our adapter on or off (off = the base model, the KL reference).

    peft's toggle also flips requires_grad on the adapter weights; we keep the caller's flags so
    that computing a reference output mid-training does not silently freeze the LoRA.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no '{ADAPTER}' LoRA to toggle; call add_lora first")
    flags = [(p, p.requires_grad) for p in lora_parameters(model)]
    for layer in layers.values():
        layer.enable_adapters(enabled)
    for p, flag in flags:
        p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# Canonical tensors in and out


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; a collective: every rank calls it), else t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor every rank holds) laid out as `param`: this rank's shard under FSDP2."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)  # slices, no traffic


def lora_tensors(model: nn.Module) -> dict[str, LoraTensors]:
    """The adapter's weights in canonical form: float32 CPU copies, keyed by module path (whole
    tensors under FSDP2: then every rank must call it)."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no '{ADAPTER}' LoRA; call add_lora or load_lora_file first")
    out = {}
    for name, layer in layers.items():
        down = whole(layer.lora_A[ADAPTER].weight).detach().to("cpu", torch.float32).clone()
        up = whole(layer.lora_B[ADAPTER].weight).detach().to("cpu", torch.float32).clone()
        alpha = float(layer.lora_alpha[ADAPTER])
        out[name] = LoraTensors(down, up, alpha)
    return out


def _mismatch(key: str, problem: str) -> ValueError:
    return ValueError(
        f"mismatched LoRA file: {key}: {problem}. The LoRA was made for another model or with other "
        "LoRA settings; load it into the model it was trained on (same family, size and rank)"
    )


def set_lora_tensors(model: nn.Module, tensors: dict[str, LoraTensors]) -> None:
    """Load canonical tensors into the injected adapter in place (the set of modules must match).

    A different alpha is folded into `up`, so the effective update is the file's exactly.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no '{ADAPTER}' LoRA; call add_lora or load_lora_file first")
    for key in tensors:
        if key not in layers:
            hint = ""
            if "." not in key and "_" in key:
                hint = " (kohya names are '_'-joined: read them with read_lora(path, model=model))"
            raise _mismatch(
                key, f"the model has no LoRA on such a module{hint}; it has LoRA on {_name_examples(list(layers), 6)}"
            )
    for key, layer in layers.items():
        if key not in tensors:
            raise _mismatch(key, "the model has a LoRA here but the file has none")
        t = tensors[key]
        down_w, up_w = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if tuple(t.down.shape) != tuple(down_w.shape) or tuple(t.up.shape) != tuple(up_w.shape):
            raise _mismatch(
                key,
                f"expected down {list(down_w.shape)} and up {list(up_w.shape)} (rank {layer.r[ADAPTER]}), "
                f"got down {list(t.down.shape)} and up {list(t.up.shape)} (rank {t.down.shape[0]})",
            )
    with torch.no_grad():
        for key, layer in layers.items():
            t = tensors[key]
            model_alpha = float(layer.lora_alpha[ADAPTER])
            up = t.up.to(torch.float32) * (t.alpha / model_alpha) if t.alpha != model_alpha else t.up
            for weight, value in ((layer.lora_A[ADAPTER].weight, t.down), (layer.lora_B[ADAPTER].weight, up)):
                weight.copy_(like(weight, value.to(weight.device)))


# ----------------------------------------------------------------------------------------------
# Files


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"LoRA files must be .safetensors (never pickled .pt/.ckpt/.bin, which can run code); got {str(path)!r}"
        )
    return path


def _kohya_stem(module_path: str) -> str:
    return module_path.replace(".", "_")


def _header(tensors: dict[str, LoraTensors], fmt: str, metadata: dict | None) -> dict[str, str]:
    """String-only safetensors header: our metadata (JSON for non-strings) plus kohya's keys."""
    ranks = Counter(t.rank for t in tensors.values())
    alphas = Counter(t.alpha for t in tensors.values())
    rank = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0] if fmt != "peft" else rank  # peft: alpha folded, scale 1
    header = {"format": "pt", "egrpo.lora_format": fmt}  # "format": the safetensors / transformers convention
    if fmt == "kohya":  # kohya's own keys, only on the file that is laid out as kohya's networks.lora writes it
        header.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                       "ss_network_alpha": str(float(alpha))})
    for key, value in (metadata or {}).items():
        header[str(key)] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return header


def export_lora(
    model_or_tensors: nn.Module | dict[str, LoraTensors],
    path: str | os.PathLike,
    fmt: str,
    metadata: dict | None = None,
    dtype: str = "fp32",
    family: str | None = None,
    naming: str | None = None,
) -> Path:
    """Write the LoRA to `path` (.safetensors) in `fmt` ("kohya", "peft" or "comfy"), atomically.

    `metadata` goes into the header; non-string values are stored as JSON (pass the training spec
    and metrics as "egrpo.spec" / "egrpo.metrics"). `dtype` is "fp32" (default), "bf16" or "fp16".
    `naming` says whose module names the LoRA is keyed by: "diffusers" (a diffusers model),
    "native" (a ComfyUI model), "own" (a model only this project loads: names kept, any format);
    None detects FLUX / SD3 namings from the names and keeps others as they are. `family` ("flux",
    "sd3", ...) is detected from the names when None. The file's keys are those its consumer reads
    (docs/lora_formats.md); the number it maps is in the header as "egrpo.keys_mapped". Raises
    ValueError, writing nothing, when the consumer would not map every key.
    """
    path = _check_path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown LoRA dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    tensors = model_or_tensors if isinstance(model_or_tensors, dict) else lora_tensors(model_or_tensors)
    if not tensors:
        raise ValueError("no LoRA tensors to export")
    if family is None and not isinstance(model_or_tensors, dict):  # a whole model names its family unambiguously
        family = lora_names.naming_of(_linear_names(model_or_tensors))[0]
    tensors, family, own = _for_consumer(tensors, fmt, family, naming)
    to = DTYPES[dtype]

    def w(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).to(to).contiguous()

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if fmt == "peft":
            # Fold alpha / r into B (in float32, before any down-cast): diffusers then loads it at scale 1.
            out[f"transformer.{name}.lora_A.weight"] = w(t.down)
            out[f"transformer.{name}.lora_B.weight"] = w(t.up.to(torch.float32) * (t.alpha / t.rank))
            continue
        prefix = f"lora_unet_{_kohya_stem(name)}" if fmt == "kohya" else f"{_COMFY_PREFIX}{name}"
        out[f"{prefix}.lora_down.weight"] = w(t.down)
        out[f"{prefix}.lora_up.weight"] = w(t.up)
        out[f"{prefix}.alpha"] = torch.tensor(float(t.alpha), dtype=torch.float32)  # 0-d; loaders call .item()
    mapped = keys_mapped(out, fmt, list(tensors), family, own=own)
    if mapped.mapped < mapped.total:
        raise ValueError(refusal(fmt, mapped, family))
    header = _header(tensors, fmt, metadata)
    header["egrpo.keys_mapped"] = json.dumps(mapped.header(), sort_keys=True)
    return atomic_save_safetensors(out, path, header)


CONSUMER_NAMING = {"peft": "diffusers", "kohya": "native", "comfy": "native"}


def _for_consumer(tensors: dict, fmt: str, family: str | None, naming: str | None):
    """(tensors keyed by the consumer's module names, family, own-loader-only) for `fmt`."""
    if naming == "own":
        return tensors, family, True
    detected_family, detected_naming = lora_names.naming_of(tensors)
    family = family or detected_family
    naming = naming or detected_naming
    want = CONSUMER_NAMING[fmt]
    if naming is None or naming == want:
        return tensors, family, False
    if family not in lora_names.RULES:
        names = list(tensors)
        raise ValueError(
            f"LoRA format {fmt!r} needs {want} module names, and there is no published mapping from {naming} names "
            f"for {family or 'this model family'} (only for {', '.join(lora_names.RULES)}); unmapped: "
            f"{_name_examples(names, 8)}. Nothing was written; export it as "
            f"{'peft' if naming == 'diffusers' else 'kohya or comfy'} (docs/lora_formats.md)"
        )
    convert = lora_names.to_native if want == "native" else lora_names.to_diffusers
    try:
        converted = convert(tensors, family)
    except ValueError as e:
        raise ValueError(f"LoRA format {fmt!r}: {e}. Nothing was written") from None
    return {k: LoraTensors(*v) for k, v in converted.items()}, family, False


def _detect_format(keys: list[str]) -> str:
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "peft"
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(_COMFY_PREFIX) for k in keys):
        return "comfy"
    raise ValueError(
        f"not a LoRA file in a format we read (kohya lora_unet_*, peft/diffusers *.lora_A.weight, "
        f"ComfyUI diffusion_model.*); its first keys are: {', '.join(keys[:5]) or '(none)'}"
    )


def _split_key(key: str, fmt: str) -> tuple[str, str]:
    """(module name as written in the file, part) with part in down / up / alpha."""
    suffixes = (
        {".lora_A.weight": "down", ".lora_B.weight": "up"}
        if fmt == "peft"
        else {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
    )
    for suffix, part in suffixes.items():
        if key.endswith(suffix):
            name = key[: -len(suffix)]
            break
    else:
        raise ValueError(f"unexpected key {key!r} in a {fmt} LoRA file (expected {', '.join(suffixes)})")
    if fmt == "kohya":
        prefix = next((p for p in _KOHYA_PREFIXES if name.startswith(p)), None)
    elif fmt == "comfy":
        prefix = _COMFY_PREFIX if name.startswith(_COMFY_PREFIX) else None
    else:
        prefix = next(p for p in _PEFT_PREFIXES if name.startswith(p))
    if prefix is None:
        raise ValueError(
            f"unexpected key {key!r} in a {fmt} LoRA file: only the diffusion model's LoRA is supported "
            "(text-encoder LoRA keys such as lora_te_* are not)"
        )
    return name[len(prefix) :], part


def _other_naming(model: nn.Module) -> tuple[str | None, str | None, list[str]]:
    """(family, naming, the model's Linears in the other naming) for FLUX / SD3 models, so that a file
    in either naming loads (a ComfyUI FLUX's LoRA into a diffusers FLUX and back)."""
    linears = _linear_names(model)
    family, naming = lora_names.naming_of(linears)
    if family not in lora_names.RULES:
        return family, naming, []
    other: list[str] = []
    for name in linears:
        if naming == "diffusers":
            hit = lora_names.native_name(family, name)
            names = [hit[0]] if hit else []
        else:
            names = list(lora_names.diffusers_names(family, name) or ())
        other += [n for n in names if n not in other]
    return family, naming, other


def _to_model_naming(tensors: dict[str, LoraTensors], model: nn.Module) -> dict[str, LoraTensors]:
    family, naming, _ = _other_naming(model)
    file_family, file_naming = lora_names.naming_of(tensors)
    if family and file_family and family != file_family:
        raise _mismatch(next(iter(tensors)), f"a {file_family} LoRA cannot load into a {family} model")
    if naming is None or file_naming is None or file_naming == naming or (family or file_family) not in lora_names.RULES:
        return tensors
    convert = lora_names.to_native if naming == "native" else lora_names.to_diffusers
    return {k: LoraTensors(*v) for k, v in convert(tensors, family or file_family).items()}


def _kohya_resolver(model: nn.Module):
    """Map a kohya '_'-joined stem to the model's module path (names contain '_', so match, not split)."""
    by_stem: dict[str, list[str]] = {}
    linears = _linear_names(model)
    for name in linears + _other_naming(model)[2]:
        by_stem.setdefault(_kohya_stem(name), []).append(name)

    def resolve(stem: str) -> str:
        hits = by_stem.get(stem, [])
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ValueError(f"kohya LoRA key {stem!r} is ambiguous in this model: it matches {', '.join(hits)}")
        raise _mismatch(
            f"lora_unet_{stem}",
            f"it names no Linear layer of {type(model).__name__}; its Linear layers are {_name_examples(linears, 6)}",
        )

    return resolve


def read_lora(
    path: str | os.PathLike, model: nn.Module | None = None
) -> tuple[dict[str, LoraTensors], str, dict]:
    """Read a LoRA file -> (canonical tensors, format, metadata).

    The format is detected from the keys. Kohya names are '_'-joined and module names contain '_',
    so pass `model` to map them back to module paths; without it kohya modules are keyed by their
    '_'-joined stem. Peft files carry no alpha (folded), so their alpha is the rank (scale 1).
    Metadata is the header's string dict, with "egrpo.spec" / "egrpo.metrics" decoded from JSON.
    With `model`, a FLUX / SD3 file in the other naming (native vs diffusers) is converted to the
    model's (lora_names.py).
    """
    from safetensors import safe_open

    path = _check_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {str(path)!r}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        header = dict(f.metadata() or {})
        raw = {k: f.get_tensor(k) for k in f.keys()}

    fmt = _detect_format(list(raw))
    resolve = _kohya_resolver(model) if fmt == "kohya" and model is not None else None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        name, part = _split_key(key, fmt)
        if resolve is not None:
            name = resolve(name)
        parts.setdefault(name, {})[part] = tensor

    tensors = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "up" if "down" in p else "down"
            raise ValueError(f"broken LoRA file {str(path)!r}: module {name!r} lacks its {missing} weight")
        down, up = p["down"].to(torch.float32), p["up"].to(torch.float32)
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{name}: LoRA weights down {list(down.shape)} / up {list(up.shape)} are not a Linear LoRA "
                "([r, in] and [out, r]); only Linear layers are supported"
            )
        alpha = float(p["alpha"].item()) if "alpha" in p else float(down.shape[0])
        tensors[name] = LoraTensors(down, up, alpha)
    if model is not None:
        tensors = _to_model_naming(tensors, model)

    metadata: dict = dict(header)
    for key in JSON_METADATA_KEYS:
        if key in metadata:
            try:
                metadata[key] = json.loads(metadata[key])
            except json.JSONDecodeError:
                pass  # a plain string written by another tool: keep it as is
    return tensors, fmt, metadata


def keys_mapped_of(path: str | os.PathLike) -> dict:
    """{"consumer", "mapped", "total"} as export_lora recorded it in the file's header ({} if absent)."""
    from safetensors import safe_open

    with safe_open(str(_check_path(path)), framework="pt", device="cpu") as f:
        value = (f.metadata() or {}).get("egrpo.keys_mapped")
    try:
        return json.loads(value) if value else {}
    except json.JSONDecodeError:
        return {}


def load_lora_file(model: nn.Module, path: str | os.PathLike) -> dict:
    """The project's own loader: apply a LoRA file (any of our formats) to `model` in place.

    Injects an adapter shaped like the file (its modules, ranks and alphas) if the model has none,
    else loads into the existing one (which must have the same modules and ranks). Returns the
    file's metadata.
    """
    tensors, fmt, metadata = read_lora(path, model=model)
    if not has_lora(model):
        linears = _linear_names(model)
        for name in tensors:
            if name not in linears:
                examples = _name_examples(linears, 6)
                raise _mismatch(name, f"{type(model).__name__} has no Linear layer of that name (it has {examples})")
        ranks = Counter(t.rank for t in tensors.values())
        alphas = Counter(t.alpha for t in tensors.values())
        rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
        settings = LoraSettings(rank=rank, alpha=alpha, target_modules=list(tensors))
        _inject(
            model,
            settings,
            seed=0,
            ranks={n: t.rank for n, t in tensors.items() if t.rank != rank},
            alphas={n: t.alpha for n, t in tensors.items() if t.alpha != alpha},
        )
    set_lora_tensors(model, tensors)
    return metadata
