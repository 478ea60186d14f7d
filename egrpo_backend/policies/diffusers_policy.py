"""FlowPolicy for diffusers flow transformers: SD3 / SD3.5, FLUX, Sana (and the embedded default).

Only the call convention differs per family (how latents, timesteps and text features enter the
transformer); that lives in the small FAMILIES table below, never in the algorithm. Every family
here predicts the rectified-flow velocity v = eps - x0, which is what the engine wants.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from .. import lora as lora_lib
from . import block_swap, weight_storage
from .names import FAMILY_NAMES
from .base import Cond, lora_disabled
from .cond_store import CondStore
from .text_encoders import PipelineTextEncoder, encoder_names, free_device_memory

log = logging.getLogger(__name__)
TILE_ABOVE_PX = 1024  # decode images larger than this (either side) tile by tile: the VAE's peak grows with pixels


def _cache_row(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A cond row kept on the CPU: floats in the compute dtype (what velocity casts to anyway), masks as they are."""
    value = value.detach().to("cpu")
    return value.to(dtype) if value.is_floating_point() else value


GB = 2**30


def _sd3_forward(model, x, sigma, cond):
    return model(hidden_states=x, timestep=sigma * 1000.0, encoder_hidden_states=cond["encoder_hidden_states"],
                 pooled_projections=cond["pooled_projections"], return_dict=False)[0]


def _pack_flux(x):  # [B, C, H, W] -> [B, H/2 * W/2, C * 4], as FluxPipeline._pack_latents
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack_flux(x, c, h, w):
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _flux_forward(model, x, sigma, cond):
    b, c, h, w = x.shape
    ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
    ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
    txt = cond["encoder_hidden_states"]
    kwargs = {}
    if getattr(model.config, "guidance_embeds", False):  # FLUX.1-dev: distilled guidance as an input
        kwargs["guidance"] = cond.get("guidance", torch.full((b,), 3.5, device=x.device))
    out = model(hidden_states=_pack_flux(x), timestep=sigma, encoder_hidden_states=txt,
                pooled_projections=cond["pooled_projections"], img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(txt.shape[1], 3, device=x.device), return_dict=False, **kwargs)[0]
    return _unpack_flux(out, c, h, w)


def _sana_forward(model, x, sigma, cond):
    return model(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                 encoder_attention_mask=cond.get("encoder_attention_mask"), timestep=sigma * 1000.0,
                 return_dict=False)[0]


def _qwenimage_forward(model, x, sigma, cond):  # as QwenImagePipeline: FLUX's 2x2 packing, sigma as the timestep
    b, c, h, w = x.shape
    out = model(hidden_states=_pack_flux(x), timestep=sigma, encoder_hidden_states=cond["encoder_hidden_states"],
                encoder_hidden_states_mask=cond.get("encoder_attention_mask"), img_shapes=[[(1, h // 2, w // 2)]] * b,
                return_dict=False)[0]
    return _unpack_flux(out, c, h, w)


FAMILIES: dict[str, Callable] = {"sd3": _sd3_forward, "flux": _flux_forward, "sana": _sana_forward,
                                 "qwenimage": _qwenimage_forward}
assert tuple(FAMILIES) == FAMILY_NAMES, "policies.FAMILY_NAMES (used by spec validation) must list FAMILIES"


def detect_family(transformer) -> str:
    name = type(transformer).__name__
    classes = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "SanaTransformer2DModel": "sana",
               "QwenImageTransformer2DModel": "qwenimage"}
    if name in classes:
        return classes[name]
    raise ValueError(f"unsupported transformer class {name}; supported: {', '.join(classes)} "
                     "(set model.family explicitly for a compatible subclass)")


class DiffusersPolicy:
    """A diffusers flow transformer + a text encoder + an optional VAE, behind FlowPolicy.

    encoder: callable(list[str]) -> Cond (batch-first dict of the transformer's text inputs); if it
         has a `release()` method, release_text_encoder calls it.
    vae: an AutoencoderKL (decode: latents / scaling + shift -> [-1, 1] images), or None for
         pixel-space models whose latents are images in [-1, 1] (the embedded default).
    dtype: compute dtype; weight_dtype: storage dtype of the transformer's blocks (None = dtype;
         fp8 = stored in 1 byte, upcast per layer, see weight_storage.py). A transformer that already
         casts per layer (built in its storage dtype, e.g. by bench/scale.py) is used as it is.
    cond_cache: folder of encoded prompts (cond_store.py), bounded by cond_cache_gb, least recently
         used first out; cond_memory_gb bounds the copy in memory. A prompt is encoded (alone, so its
         features never depend on a batch) when neither holds it; encode_ahead does it for a chunk.
    offload_blocks: the last N transformer blocks (or "auto") stay in host memory and stream in as they
         run (block_swap.py); needs gradient checkpointing, which it turns on.
    """

    def __init__(self, transformer, encoder: Callable[[list[str]], Cond] | None, latent_shape, *, vae=None,
                 family: str = "auto", device="cpu", dtype: torch.dtype = torch.float32,
                 weight_dtype: torch.dtype | None = None, gradient_checkpointing: bool = False,
                 cond_cache: str | Path | None = None, cond_cache_gb: float = 20.0, cond_memory_gb: float = 2.0,
                 offload_blocks: int | str = 0):
        self.family = detect_family(transformer) if family == "auto" else family
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; valid: {', '.join(FAMILIES)}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.weight_dtype = weight_dtype or dtype
        if not weight_storage.has_cast_layers(transformer):
            if next(transformer.parameters()).dtype != dtype:
                transformer = transformer.to(dtype=dtype)  # before moving: the device never holds a wider copy
            weight_storage.store_weights(transformer, self.weight_dtype, dtype)
        self.vae = vae.to(self.device).requires_grad_(False).eval() if vae is not None else None
        self.block_swap = block_swap.place(transformer, self.device, offload_blocks)  # after the VAE: "auto" sees it
        self.transformer = transformer.requires_grad_(False).eval()
        gradient_checkpointing = gradient_checkpointing or self.block_swap is not None
        self.encoder = encoder
        self.latent_shape = tuple(latent_shape)
        self.cond_cache = Path(cond_cache) if cond_cache else None
        self.conds = CondStore(self._encode_one, self.family, folder=self.cond_cache, disk_bytes=cond_cache_gb * GB,
                               memory_bytes=cond_memory_gb * GB, session=self._encoder_session)
        if gradient_checkpointing and hasattr(self.transformer, "enable_gradient_checkpointing"):
            self.transformer.enable_gradient_checkpointing()

    # --- FlowPolicy -------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Cond:
        """Text features per prompt from the cond store (encoded there when missing), batched on the device."""
        rows = [self.conds.get(p) for p in prompts]
        return {k: torch.cat([r[k] for r in rows]).to(self.device) for k in rows[0]}

    def uncached(self, prompts) -> list[str]:
        return self.conds.missing(prompts)

    def encode_ahead(self, prompts, progress=None) -> int:
        """Encode the prompts the store lacks, with the text encoders on the device for the whole chunk."""
        return self.conds.ensure(prompts, progress)

    def _encode_one(self, prompt: str) -> Cond:
        if self.encoder is None:
            raise RuntimeError(f"this policy has no text encoder; prompt not cached: {prompt!r}")
        with torch.no_grad():  # one prompt per call: its features then never depend on the batch it came in
            feats = self.encoder([prompt])
        return {k: _cache_row(v, self.dtype) for k, v in feats.items()}

    def _encoder_session(self):
        session = getattr(self.encoder, "session", None)
        return session() if callable(session) else contextlib.nullcontext()

    def release_text_encoder(self) -> None:
        """Free the text encoders: every reference dropped, the device's cached blocks returned. They load
        again from their files if a prompt is ever missing from the cond store (an evicted one, say)."""
        release = getattr(self.encoder, "release", None)
        if callable(release):
            release()
        free_device_memory(self.device)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        cond = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in cond.items()}
        with self._autocast():
            v = FAMILIES[self.family](self.transformer, x.to(self.device, self.dtype), sigma.to(self.device, self.dtype), cond)
        return v.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images of exactly these latents (callers chunk by train.decode_batch); tiled above TILE_ABOVE_PX."""
        if self.vae is None:
            return ((latents.float() + 1) / 2).clamp(0, 1)
        cfg = self.vae.config
        if hasattr(self.vae, "enable_tiling"):
            factor = vae_factor(self.vae)
            tiled = max(latents.shape[-2:]) * factor > TILE_ABOVE_PX
            self.vae.enable_tiling() if tiled else self.vae.disable_tiling()
        z = latents.to(self.device, self.vae.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with torch.no_grad():
            img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    def lora_model(self) -> torch.nn.Module:
        return self.transformer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.block_swap is not None:  # a LoRA injected into swapped blocks went to the host with its base layer
            self.block_swap.adopt_new_parameters()
        return lora_lib.lora_parameters(self.transformer)

    def set_lora_enabled(self, enabled: bool) -> None:
        lora_lib.set_lora_enabled(self.transformer, enabled)

    def lora_disabled(self):
        return lora_disabled(self)

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


def vae_factor(vae) -> int:
    """Pixels per latent cell: AutoencoderKL's config names its levels block_out_channels, Sana's
    AutoencoderDC encoder_block_out_channels (as the pipelines read them)."""
    levels = vae.config.get("block_out_channels") or vae.config.get("encoder_block_out_channels")
    return 2 ** (len(levels) - 1)


# Families whose transformer DiffusersPolicy runs but whose pipeline folder this loader cannot use yet.
PIPELINE_UNSUPPORTED = {
    "qwenimage": "Qwen-Image pipeline folders are not supported by model.source 'diffusers' yet (its VAE is a 3D video "
                 "VAE and its prompts have varying lengths); train Qwen-Image through ComfyUI (model.source 'comfy')",
}


def load_diffusers_policy(path: str, family: str = "auto", device="cpu", dtype=torch.float32,
                          resolution: int = 0, gradient_checkpointing: bool = False,
                          weight_dtype: torch.dtype | None = None, cond_cache: str | Path | None = None,
                          cond_cache_gb: float = 20.0, cond_memory_gb: float = 2.0, offload_blocks: int | str = 0,
                          width: int = 0, height: int = 0) -> DiffusersPolicy:
    """A policy from a local diffusers pipeline folder (model_index.json). Never downloads.

    The transformer and VAE load now; the text encoders load only if a prompt is not in cond_cache
    (text_encoders.py), so a job resumed with its cond cache never loads them. The image size is
    width x height pixels (spec model.width / model.height; `resolution` sets both); 0 falls back to
    the transformer config's sample_size where the published config has one (SD3, Sana; FLUX.1 has
    none, so its jobs must say).
    """
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no diffusers pipeline at {folder}: expected {folder / 'model_index.json'} (a folder saved with "
            "save_pretrained or downloaded beforehand, e.g. stabilityai/stable-diffusion-3.5-medium); models load from local files only")
    from diffusers import DiffusionPipeline

    # Components saved as null (e.g. SD3 without its T5 encoder) must be passed as None explicitly.
    index = json.loads((folder / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    later = {k: None for k in encoder_names(index)}
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, **absent, **later)
    transformer, vae = pipe.transformer, pipe.vae
    del pipe  # the policy keeps the transformer and the VAE, nothing else
    fam = detect_family(transformer) if family == "auto" else family
    if fam in PIPELINE_UNSUPPORTED:
        raise ValueError(PIPELINE_UNSUPPORTED[fam])
    factor = vae_factor(vae)
    w, h = width or height or resolution, height or width or resolution  # one side given: square
    if not (w and h):
        sample = transformer.config.get("sample_size")  # absent from published FLUX.1 configs: never assumed
        if not sample:
            raise ValueError(f"{type(transformer).__name__}'s config has no sample_size to take an image size from; "
                             "set model.width and model.height (pixels) in the job spec")
        w, h = w or int(sample) * factor, h or int(sample) * factor
    for side, value in (("width", w), ("height", h)):
        if value % (factor * 2):
            raise ValueError(f"model.{side} {value} must be a multiple of {factor * 2} for this model")
    latent = (vae.config.latent_channels, h // factor, w // factor)
    policy = DiffusersPolicy(transformer, None, latent, vae=vae, family=fam, device=device, dtype=dtype,
                             weight_dtype=weight_dtype, gradient_checkpointing=gradient_checkpointing, cond_cache=cond_cache,
                             cond_cache_gb=cond_cache_gb, cond_memory_gb=cond_memory_gb, offload_blocks=offload_blocks)
    policy.encoder = PipelineTextEncoder(folder, fam, policy.transformer, policy.device, dtype, absent)
    log.info("loaded %s pipeline from %s (latent %s, weights stored in %s)", fam, folder, latent, policy.weight_dtype)
    return policy
