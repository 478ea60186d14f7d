"""Which files the graph's CLIP came from, so the job's child reloads it and encodes the training prompts
itself (egrpo_backend/policies/comfy_clip.py); or why it cannot, so the node encodes them and says so.

A CLIP can be reloaded when a core loader recorded it (CLIPLoader / DualCLIPLoader / TripleCLIPLoader /
QuadrupleCLIPLoader: comfy.sd.load_clip; Load Checkpoint: the checkpoint's CLIP), its files lie in
ComfyUI's own text_encoders / clip / checkpoints folders, and nothing was patched onto it after loading
(a LoraLoader's CLIP half, hooks): those would be lost on reload. CLIPSetLastLayer and tokenizer
options are plain values and are recorded.
"""

from __future__ import annotations

import os

from . import comfy_glue

LOADERS = {"load_clip_model_patcher": "clip", "load_checkpoint_clip_patcher": "checkpoint"}
FOLDERS = {"clip": ("text_encoders", "clip"), "checkpoint": ("checkpoints",)}
LOADER_OBJECT_PATCHES = {"manual_cast_dtype"}  # set by ComfyUI's own loading (the reload sets it again)


def _in_folders(path: str, kinds) -> bool:
    try:
        import folder_paths
    except ImportError:
        return False
    real = os.path.realpath(path)
    for kind in kinds:
        try:
            roots = folder_paths.get_folder_paths(kind)
        except KeyError:
            continue
        for root in roots:
            root = os.path.realpath(root)
            if os.path.commonpath([root, real]) == root:
                return True
    return False


def _device(options) -> str:
    load = (options or {}).get("load_device")
    return "cpu" if load is not None and str(load) == "cpu" else "default"


def clip_record(clip) -> tuple[dict | None, str]:
    """(model.comfy.clip record, "") when the job can reload this CLIP, else (None, why not)."""
    src = comfy_glue.patcher_source(clip)
    loader = LOADERS.get(src.get("loader", ""))
    if loader is None:
        return None, ("its loader recorded no files (a custom CLIP loader)" if not src
                      else f"it was loaded by {src['loader']}, which the job cannot repeat")
    paths = src["paths"]
    if not paths or not all(_in_folders(p, FOLDERS[loader]) for p in paths):
        return None, "its files are not in ComfyUI's text_encoders / checkpoints folders"
    patcher = getattr(clip, "patcher", None)
    added = set(getattr(patcher, "object_patches", None) or {}) - LOADER_OBJECT_PATCHES
    if getattr(patcher, "patches", None) or added:
        return None, "it carries patches added after loading (e.g. the CLIP half of a LoraLoader)"
    if getattr(clip, "apply_hooks_to_conds", None):
        return None, "it carries hooks (CLIP hook nodes)"
    options = dict(getattr(clip, "tokenizer_options", {}) or {})
    if not all(isinstance(v, (int, float, str, bool, type(None))) for v in options.values()):
        return None, "its tokenizer options are not plain values"
    args = src["args"]
    options_at = 3  # load_clip(ckpt_paths, embedding_directory, clip_type, model_options); checkpoint: te_model_options
    extra = sorted(set((args[options_at] if len(args) > options_at else None) or {}) - {"load_device", "offload_device"})
    if extra or (loader == "checkpoint" and (args[2] if len(args) > 2 else None)):
        return None, f"its loader passed model options the job does not repeat ({', '.join(extra) or 'model_options'})"
    if loader == "clip":  # load_clip(ckpt_paths, embedding_directory, clip_type, model_options)
        embeddings, clip_type, device = args[1], getattr(args[2], "name", str(args[2])), _device(args[3] if len(args) > 3 else {})
    else:  # load_checkpoint_clip_patcher(ckpt_path, embedding_directory, model_options, te_model_options)
        embeddings, clip_type, device = args[1], "", _device(args[3] if len(args) > 3 else {})
    if isinstance(embeddings, str):
        embeddings = [embeddings]
    layer = getattr(clip, "layer_idx", None)
    return {"loader": loader, "paths": list(paths), "type": clip_type.lower(), "embeddings": list(embeddings or []),
            "device": device, "layer_idx": layer if isinstance(layer, int) else None, "tokenizer_options": options,
            "use_clip_schedule": bool(getattr(clip, "use_clip_schedule", False))}, ""
