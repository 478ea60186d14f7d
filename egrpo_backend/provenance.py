"""What a LoRA file says about how it was made: true, bounded, and free of private paths.

LoRA files travel (users post them publicly), so the header holds the training spec with file
names only (no absolute paths, no ComfyUI root, no cond-cache or copy_to folder) and the prompt
lists as a count and a SHA-256, never the prompts themselves. It also names the base model the way
other UIs read it (modelspec.architecture, kohya's ss_base_model_version), only where we know it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: config imports this module
    from .config import JobSpec

HEADER_LIMIT_BYTES = 32 * 1024  # the spec without prompt lists is a few KB; refuse anything odd rather than bloat headers
# What each diffusers family / source is called in the modelspec convention (architecture "<name>/lora").
BASE_MODEL_NAMES = {"default": "egrpo-digits-16px", "flux": "flux-1", "sd3": "stable-diffusion-v3", "sana": "sana"}
_PRIVATE_KEYS = {("model", "comfy", "comfy_root"), ("model", "comfy", "cond_cache"), ("model", "comfy", "lora_dirs"),
                 ("model", "comfy", "clip"),
                 ("output", "copy_to")}
# Names relative to a ComfyUI models folder (never absolute: the node writes them, comfy_graph refuses others):
# kept whole, so the header says which LoRA stack (sub-folders included) the training stacked on.
_RELATIVE_KEYS = {("model", "comfy", "loras", "name")}


def prompt_digest(prompts: list[str]) -> dict:
    """A list of prompts as {"count", "sha256"} (of the prompts joined by newlines)."""
    return {"count": len(prompts), "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


def _strip_paths(value, where=()):
    if isinstance(value, dict):
        return {k: _strip_paths(v, (*where, k)) for k, v in value.items() if (*where, k) not in _PRIVATE_KEYS}
    if isinstance(value, list):
        return [_strip_paths(v, where) for v in value]
    if isinstance(value, str) and where in _RELATIVE_KEYS and not os.path.isabs(value) and ".." not in value.split("/"):
        return value
    if isinstance(value, str) and (os.path.isabs(value) or os.sep in value or "/" in value):
        return os.path.basename(value.rstrip("/" + os.sep))  # a file name says which model; a path says whose disk
    return value


def shareable_spec(spec: JobSpec) -> dict:
    """The spec as a LoRA header may carry it: prompts as digests, file names instead of paths."""
    prompts = spec.prompt_set().digest()  # a set file: the sha256 of its bytes (docs/prompts.md)
    evals = spec.prompt_set(eval=True).digest() if spec.eval_prompts else prompt_digest([])
    data = _header_spec(spec, prompts, evals)
    _refuse_large_header(data)
    return data


def _header_spec(spec: JobSpec, prompts: dict, eval_prompts: dict) -> dict:
    data = spec.to_dict()
    data["prompts"], data["eval_prompts"] = prompts, eval_prompts
    return _strip_paths(data)


def check_header_size(spec: JobSpec) -> None:
    """Refuse, while the spec is validated, a spec whose LoRA header (every checkpoint writes one) would be
    over the limit: the prompt digests are sized for the largest count, so no prompt list is read here."""
    widest = {"count": 10**15, "sha256": "0" * 64}
    _refuse_large_header(_header_spec(spec, widest, widest))


def _refuse_large_header(data: dict) -> None:
    from .spec_limits import SpecError

    size = len(json.dumps(data, sort_keys=True))
    if size > HEADER_LIMIT_BYTES:
        key, biggest = max(_leaf_sizes(data), key=lambda kv: kv[1])
        raise SpecError(f"{key}: the training spec is {size} bytes without its prompts (limit {HEADER_LIMIT_BYTES}, "
                        f"what each LoRA header carries); {key} alone takes {biggest} bytes: shorten it")


def _leaf_sizes(value, where: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaf_sizes(v, f"{where}.{k}" if where else k)
    else:
        yield where, len(json.dumps(value))


def base_model_name(spec: JobSpec, architecture: str | None = None) -> str | None:
    """The base model's architecture in modelspec's naming, when it is known."""
    if spec.model.source == "default":
        return BASE_MODEL_NAMES["default"]
    family = architecture or (spec.model.family if spec.model.family != "auto" else None)
    return BASE_MODEL_NAMES.get(family, family)


def lora_metadata(spec: JobSpec, metrics: dict | None = None, architecture: str | None = None) -> dict:
    """The egrpo.* and modelspec.* header keys of an exported LoRA (lora.py adds the format's own keys)."""
    meta = {"egrpo.spec": json.dumps(shareable_spec(spec), sort_keys=True),
            "egrpo.base_model_file": os.path.basename(spec.model.path) if spec.model.path else "",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.title": spec.output.name}
    arch = base_model_name(spec, architecture)
    if arch:
        meta["modelspec.architecture"] = f"{arch}/lora"
        meta["ss_base_model_version"] = arch
    if metrics is not None:
        meta["egrpo.metrics"] = json.dumps(metrics, default=float, sort_keys=True)
    return meta
