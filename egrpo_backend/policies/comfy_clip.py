"""The graph's CLIP, reloaded in the job's child from its files, so the node encodes nothing but the
held-out prompts and training prompts are encoded as needed (docs/prompts.md, docs/comfyui.md).

The Train node records `model.comfy.clip` from the core loader's record (nodes/clip_files.py):
{"loader": "clip" (CLIPLoader, DualCLIPLoader, ...: comfy.sd.load_clip) | "checkpoint" (Load Checkpoint),
 "paths": [files in ComfyUI's text_encoders / checkpoints folders], "type": comfy.sd.CLIPType name,
 "embeddings": [embedding folders], "device": "default" | "cpu", "layer_idx": CLIPSetLastLayer's value or
 null, "tokenizer_options": {...}, "use_clip_schedule": bool}.
The child loads the same files with ComfyUI's own loaders and sets the same options, and both sides
encode a prompt with `encode_conditioning` and store it with comfy_conds.conditioning_to_cond: the
stored conditioning is the same whichever side encoded it.
"""

from __future__ import annotations

import contextlib

RECORD_KEYS = {"loader", "paths", "type", "embeddings", "device", "layer_idx", "tokenizer_options", "use_clip_schedule"}
SCALARS = (int, float, str, bool, type(None))


def check_clip_record(rec: dict) -> None:
    """Refuse a model.comfy.clip that is not what the node writes, naming the key."""
    from ..spec_limits import SpecError

    if not isinstance(rec, dict) or set(rec) != RECORD_KEYS:
        raise SpecError(f"model.comfy.clip must have exactly the keys {sorted(RECORD_KEYS)} (the Train node writes it); "
                        f"got {sorted(rec) if isinstance(rec, dict) else rec!r}")
    if rec["loader"] not in ("clip", "checkpoint"):
        raise SpecError(f"model.comfy.clip.loader = {rec['loader']!r}: expected 'clip' or 'checkpoint'")
    if not rec["paths"] or not all(isinstance(p, str) and p for p in rec["paths"]):
        raise SpecError("model.comfy.clip.paths must be a non-empty list of text encoder files")
    if rec["device"] not in ("default", "cpu"):
        raise SpecError(f"model.comfy.clip.device = {rec['device']!r}: expected 'default' or 'cpu'")
    if rec["layer_idx"] is not None and not isinstance(rec["layer_idx"], int):
        raise SpecError(f"model.comfy.clip.layer_idx = {rec['layer_idx']!r} must be a whole number or null")
    if not isinstance(rec["tokenizer_options"], dict) or not all(isinstance(v, SCALARS) for v in rec["tokenizer_options"].values()):
        raise SpecError("model.comfy.clip.tokenizer_options must map names to plain values")


def encode_conditioning(clip, prompt: str) -> list:
    """One prompt's whole CONDITIONING, as CLIPTextEncode makes it (node and child call this same function)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


def load_clip(rec: dict):
    """The CLIP the record describes, loaded with ComfyUI's own loaders (ComfyUI already imported)."""
    import comfy.sd
    import torch

    model_options = {"load_device": torch.device("cpu"), "offload_device": torch.device("cpu")} if rec["device"] == "cpu" else {}
    embeddings = rec["embeddings"] or None
    if rec["loader"] == "checkpoint":
        clip = comfy.sd.load_checkpoint_guess_config(rec["paths"][0], output_vae=False, output_clip=True,
                                                     output_model=False, embedding_directory=embeddings,
                                                     te_model_options=model_options)[1]
    else:
        clip_type = getattr(comfy.sd.CLIPType, rec["type"].upper())
        clip = comfy.sd.load_clip(ckpt_paths=list(rec["paths"]), embedding_directory=embeddings, clip_type=clip_type,
                                  model_options=model_options)
    if rec["layer_idx"] is not None:
        clip.clip_layer(rec["layer_idx"])
    for name, value in rec["tokenizer_options"].items():
        clip.set_tokenizer_option(name, value)
    clip.use_clip_schedule = bool(rec["use_clip_schedule"])
    return clip


class ClipEncoder:
    """encode_one / session / release for policies/cond_store.py: the CLIP loads on first use, sits off
    the device between chunks (ComfyUI moves it on for an encode; the session moves it off after), and
    release() frees it (it loads again from its files if an evicted prompt is needed)."""

    def __init__(self, rec: dict):
        self.rec, self.clip, self.loads = rec, None, 0

    def encode_one(self, prompt: str) -> dict:
        from .comfy_conds import conditioning_to_cond

        if self.clip is None:
            self.clip = load_clip(self.rec)
            self.loads += 1
        return conditioning_to_cond(prompt, encode_conditioning(self.clip, prompt))

    @contextlib.contextmanager
    def session(self):
        try:
            yield
        finally:
            self.offload()

    def offload(self) -> None:
        if self.clip is None:
            return
        try:
            import comfy.model_management as mm
        except ImportError:  # outside ComfyUI (tests with a stand-in CLIP): nothing is on a device
            return
        unload = getattr(mm, "unload_model_and_clones", None)  # an older ComfyUI keeps its own placement
        if unload is not None and getattr(self.clip, "patcher", None) is not None:
            unload(self.clip.patcher)

    def release(self) -> None:
        self.offload()
        self.clip = None
