"""Encoded prompts on disk: a resumed or repeated job needs no text encoder (docs/memory.md).

One safetensors file: tensor `<cond key>.<i>` is prompt i's row of that cond entry (e.g.
`encoder_hidden_states.3`, `pooled_projections.3`, without the batch dimension), metadata "prompts"
is the JSON list of prompts and "family" the model family the conds were made for. Written
atomically, so a crash mid-write leaves the previous file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_save_safetensors
from .base import Cond


def read_cond_cache(path: str | Path, family: str) -> dict[str, Cond]:
    """prompt -> Cond of batch 1 (CPU tensors). A file made for another model family raises."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if "prompts" not in meta:
            raise ValueError(f"{path} is not a cond cache (its metadata has no 'prompts'); delete it or point "
                             "cond_cache at another file")
        if meta.get("family", family) != family:
            raise ValueError(f"cond cache {path} holds {meta['family']} conds but the model is {family}; delete it, "
                             "or give this job its own cond cache file")
        prompts = json.loads(meta["prompts"])
        rows: dict[int, Cond] = {}
        for key in f.keys():
            name, _, index = key.rpartition(".")
            rows.setdefault(int(index), {})[name] = f.get_tensor(key).unsqueeze(0)
    return {p: rows[i] for i, p in enumerate(prompts)}


def write_cond_cache(path: str | Path, conds: dict[str, Cond], family: str) -> Path:
    """Write every prompt's Cond (batch 1 each) to `path`, atomically."""
    prompts = list(conds)
    tensors = {f"{name}.{i}": value[0].contiguous() for i, p in enumerate(prompts) for name, value in conds[p].items()}
    return atomic_save_safetensors(tensors, path, {"prompts": json.dumps(prompts), "family": family})
