"""FlowPolicy for diffusers flow transformers: SD3 / SD3.5, FLUX, Sana (and the embedded default).

Only the call convention differs per family (how latents, timesteps and text features enter the
transformer); that lives in the small FAMILIES table below, never in the algorithm. Every family
here predicts the rectified-flow velocity v = eps - x0, which is what the engine wants.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import torch

from .. import lora as lora_lib
from . import FAMILY_NAMES
from .base import Cond, lora_disabled

log = logging.getLogger(__name__)


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


FAMILIES: dict[str, Callable] = {"sd3": _sd3_forward, "flux": _flux_forward, "sana": _sana_forward}
assert tuple(FAMILIES) == FAMILY_NAMES, "policies.FAMILY_NAMES (used by spec validation) must list FAMILIES"


def detect_family(transformer) -> str:
    name = type(transformer).__name__
    for family, cls in (("sd3", "SD3Transformer2DModel"), ("flux", "FluxTransformer2DModel"), ("sana", "SanaTransformer2DModel")):
        if name == cls:
            return family
    raise ValueError(f"unsupported transformer class {name}; supported: SD3Transformer2DModel, FluxTransformer2DModel, "
                     "SanaTransformer2DModel (set model.family explicitly for a compatible subclass)")


class DiffusersPolicy:
    """A diffusers flow transformer + a text encoder + an optional VAE, behind FlowPolicy.

    encoder: callable(list[str]) -> Cond (batch-first dict of the transformer's text inputs).
    vae: an AutoencoderKL (decode: latents / scaling + shift -> [-1, 1] images), or None for
         pixel-space models whose latents are images in [-1, 1] (the embedded default).
    """

    def __init__(self, transformer, encoder: Callable[[list[str]], Cond], latent_shape, *, vae=None,
                 family: str = "auto", device="cpu", dtype: torch.dtype = torch.float32,
                 gradient_checkpointing: bool = False):
        self.family = detect_family(transformer) if family == "auto" else family
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; valid: {', '.join(FAMILIES)}")
        self.device = torch.device(device)
        self.dtype = dtype
        if next(transformer.parameters()).dtype != dtype:
            transformer = transformer.to(dtype=dtype)
        self.transformer = transformer.to(self.device).requires_grad_(False).eval()
        self.vae = vae.to(self.device).requires_grad_(False).eval() if vae is not None else None
        self.encoder = encoder
        self.latent_shape = tuple(latent_shape)
        self._cache: dict[str, Cond] = {}
        if gradient_checkpointing and hasattr(self.transformer, "enable_gradient_checkpointing"):
            self.transformer.enable_gradient_checkpointing()

    # --- FlowPolicy -------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Cond:
        """Text features, cached per prompt on the CPU (encoders can be released afterwards)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            if self.encoder is None:
                raise RuntimeError(f"text encoder was released; prompt not cached: {missing[0]!r}")
            with torch.no_grad():
                feats = self.encoder(missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: v[i : i + 1].detach().float().cpu() for k, v in feats.items()}
        return {k: torch.cat([self._cache[p][k] for p in prompts]).to(self.device) for k in self._cache[prompts[0]]}

    def release_text_encoder(self) -> None:
        self.encoder = None

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        cond = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in cond.items()}
        with self._autocast():
            v = FAMILIES[self.family](self.transformer, x.to(self.device, self.dtype), sigma.to(self.device, self.dtype), cond)
        return v.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return ((latents.float() + 1) / 2).clamp(0, 1)
        cfg = self.vae.config
        z = latents.to(self.device, self.vae.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with torch.no_grad():
            img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    def lora_model(self) -> torch.nn.Module:
        return self.transformer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return lora_lib.lora_parameters(self.transformer)

    def set_lora_enabled(self, enabled: bool) -> None:
        lora_lib.set_lora_enabled(self.transformer, enabled)

    def lora_disabled(self):
        return lora_disabled(self)

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


class PipelineTextEncoder:
    """Text features from a local diffusers pipeline's own encode_prompt (SD3, FLUX, Sana)."""

    def __init__(self, pipe, family: str, max_sequence_length: int | None = None):
        self.pipe, self.family, self.max_len = pipe, family, max_sequence_length

    def __call__(self, prompts: list[str]) -> Cond:
        kw = {"max_sequence_length": self.max_len} if self.max_len else {}
        if self.family == "sd3":
            emb, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False, **kw)
            return {"encoder_hidden_states": emb, "pooled_projections": pooled}
        if self.family == "flux":
            emb, pooled, _ = self.pipe.encode_prompt(prompts, prompts, **kw)
            return {"encoder_hidden_states": emb, "pooled_projections": pooled}
        emb, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, **kw)
        return {"encoder_hidden_states": emb, "encoder_attention_mask": mask}


def load_diffusers_policy(path: str, family: str = "auto", device="cpu", dtype=torch.float32,
                          resolution: int = 0, gradient_checkpointing: bool = False) -> DiffusersPolicy:
    """A policy from a local diffusers pipeline folder (model_index.json). Never downloads."""
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no diffusers pipeline at {folder}: expected {folder / 'model_index.json'} (a folder saved with "
            "save_pretrained or downloaded beforehand, e.g. stabilityai/stable-diffusion-3.5-medium); models load from local files only")
    from diffusers import DiffusionPipeline

    import json

    # Components saved as null (e.g. SD3 without its T5 encoder) must be passed as None explicitly.
    index = json.loads((folder / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, **absent)
    transformer = pipe.transformer
    fam = detect_family(transformer) if family == "auto" else family
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    res = resolution or int(transformer.config.sample_size) * vae_factor
    if res % (vae_factor * 2):
        raise ValueError(f"resolution {res} must be a multiple of {vae_factor * 2} for this model")
    latent = (pipe.vae.config.latent_channels, res // vae_factor, res // vae_factor)
    for m in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, m, None) is not None:
            getattr(pipe, m).to(device)
    enc = PipelineTextEncoder(pipe, fam)
    log.info("loaded %s pipeline from %s (latent %s)", fam, folder, latent)
    return DiffusersPolicy(transformer, enc, latent, vae=pipe.vae, family=fam, device=device, dtype=dtype,
                           gradient_checkpointing=gradient_checkpointing)
