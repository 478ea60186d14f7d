"""Full-size model architectures from their published configs, with random weights: nothing downloaded.

Each model is built on the meta device (no memory), given its storage plan (compute dtype, then the
blocks' Linear layers in the storage dtype, egrpo_backend/policies/weight_storage.py), and only then
materialised directly on the target device, parameter by parameter, in its final dtype: there is
never a full-precision copy, on the host or the device. `depth` keeps N blocks of each kind at full
width (the CPU smoke run and the per-block memory measurements use it).

The configs are the `config.json` files of the published repositories (black-forest-labs/FLUX.1-dev
transformer, stabilityai/stable-diffusion-3.5-medium and -large transformers, Qwen/Qwen-Image
transformer, the FLUX/SD3 16-channel VAE, laion/CLIP-ViT-H-14), written out here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# --- published configs ------------------------------------------------------------------------------
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
VAE_16CH = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False)
CLIP_H_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                     image_size=224, patch_size=14, hidden_act="gelu", projection_dim=1024)


@dataclass(frozen=True)
class ModelCard:
    """One benchmarked model: its transformer, which config keys count blocks, its conds and its VAE."""

    name: str
    cls: str  # diffusers transformer class
    config: dict
    depth_keys: tuple[str, ...]  # config keys that are block counts (cut by --depth)
    family: str  # DiffusersPolicy family (call convention)
    text_tokens: int  # encoder_hidden_states length of a real prompt
    text_dim: int
    pooled_dim: int  # 0 = no pooled projection
    vae_scaling: float
    vae_shift: float
    guidance: float | None = None  # distilled guidance input
    notes: str = ""
    extra: dict = field(default_factory=dict)


MODELS: dict[str, ModelCard] = {
    "flux-dev": ModelCard("flux-dev", "FluxTransformer2DModel", FLUX_DEV, ("num_layers", "num_single_layers"), "flux",
                          text_tokens=512, text_dim=4096, pooled_dim=768, vae_scaling=0.3611, vae_shift=0.1159,
                          guidance=3.5, notes="T5 512 tokens x 4096 + CLIP pooled 768"),
    "sd3.5-large": ModelCard("sd3.5-large", "SD3Transformer2DModel", SD35_LARGE, ("num_layers",), "sd3",
                             text_tokens=333, text_dim=4096, pooled_dim=2048, vae_scaling=1.5305, vae_shift=0.0609,
                             notes="CLIP 77 + T5 256 tokens x 4096 + pooled 2048"),
    "sd3.5-medium": ModelCard("sd3.5-medium", "SD3Transformer2DModel", SD35_MEDIUM, ("num_layers",), "sd3",
                              text_tokens=333, text_dim=4096, pooled_dim=2048, vae_scaling=1.5305, vae_shift=0.0609,
                              notes="CLIP 77 + T5 256 tokens x 4096 + pooled 2048"),
    "qwen-image": ModelCard("qwen-image", "QwenImageTransformer2DModel", QWEN_IMAGE, ("num_layers",), "qwenimage",
                            text_tokens=256, text_dim=3584, pooled_dim=0, vae_scaling=1.0, vae_shift=0.0,
                            notes="Qwen2.5-VL 256 tokens x 3584 (+ mask); decoded by the 16-channel 2D VAE "
                                  "(Qwen-Image's own VAE is a 3D video VAE of the same latent size)"),
}


def available(card: ModelCard) -> bool:
    import diffusers

    return hasattr(diffusers, card.cls)


def scaled_config(card: ModelCard, depth: int | None) -> dict:
    """The card's config with at most `depth` blocks of each kind (None = the published depth)."""
    config = dict(card.config)
    if depth:
        for key in card.depth_keys:
            config[key] = min(depth, config[key])
        if "dual_attention_layers" in config:
            config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < config["num_layers"])
    return config


# --- building on meta, materialising on the device --------------------------------------------------
def on_meta(build):
    """Run build() with parameters on the meta device; buffers and plain tensors are real (CPU) values."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _fill(param: torch.Tensor, module: torch.nn.Module, name: str, gen: torch.Generator, rows: int = 4096) -> None:
    """Small random values, computed in float32 a few rows at a time and cast into place (fp8 included)."""
    norm = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()
    if name == "bias" or (norm and name != "weight"):
        param.zero_()
        return
    if norm or name == "logit_scale":
        param.fill_(1.0 if norm else math.log(100.0))
        return
    fan_in = param[0].numel() if param.ndim > 1 else param.numel()
    std = 0.5 / math.sqrt(max(1, fan_in)) if param.ndim > 1 else 0.02  # shrinking residual updates: no NaN at any depth
    flat = param.view(param.shape[0], -1) if param.ndim > 1 else param.view(1, -1)
    for i in range(0, flat.shape[0], rows):
        chunk = flat[i : i + rows]
        chunk.copy_(torch.randn(chunk.shape, generator=gen, device=param.device, dtype=torch.float32) * std)


@torch.no_grad()
def materialise(model: torch.nn.Module, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Give every meta parameter real storage on `device` in its own dtype, filled with small random values."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            real = torch.empty(p.shape, dtype=p.dtype, device=device)
            _fill(real, module, name, gen)
            module._parameters[name] = torch.nn.Parameter(real, requires_grad=p.requires_grad)
    return model.to(device)  # buffers


def transformer_on_meta(card: ModelCard, depth: int | None, compute: torch.dtype, storage: torch.dtype):
    """The card's transformer on meta, in its storage plan (blocks in `storage`, the rest in `compute`)."""
    import diffusers

    from egrpo_backend.policies.weight_storage import store_weights

    model = on_meta(lambda: getattr(diffusers, card.cls)(**scaled_config(card, depth)))
    model.to(dtype=compute)
    store_weights(model, storage, compute)
    return model


def build_transformer(card: ModelCard, depth: int | None, device, compute: torch.dtype, storage: torch.dtype, seed=0):
    return materialise(transformer_on_meta(card, depth, compute, storage), torch.device(device), seed)


def build_vae(card: ModelCard, device, dtype: torch.dtype, seed: int = 1):
    from diffusers import AutoencoderKL

    vae = on_meta(lambda: AutoencoderKL(**VAE_16CH, scaling_factor=card.vae_scaling, shift_factor=card.vae_shift))
    return materialise(vae.to(dtype=dtype), torch.device(device), seed).eval()


def clip_h_on_meta(depth: int | None):
    from transformers import CLIPConfig, CLIPModel

    text, vision = dict(CLIP_H_TEXT), dict(CLIP_H_VISION)
    if depth:
        text["num_hidden_layers"] = min(depth, text["num_hidden_layers"])
        vision["num_hidden_layers"] = min(depth, vision["num_hidden_layers"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)
    return on_meta(lambda: CLIPModel(config))


class ByteTokenizer:
    """Prompt bytes as CLIP ids (BOS, bytes, EOS, padding): a stand-in for CLIP's BPE, same shapes and cost."""

    def __call__(self, prompts: list[str], context_length: int = 77) -> torch.Tensor:
        bos, eos = CLIP_H_TEXT["bos_token_id"], CLIP_H_TEXT["eos_token_id"]
        ids = torch.full((len(prompts), context_length), eos, dtype=torch.long)
        for i, p in enumerate(prompts):
            row = [bos, *list(p.encode())[: context_length - 2], eos]
            ids[i, : len(row)] = torch.tensor(row)
        return ids


def build_clip_h_reward(device, dtype: torch.dtype, depth: int | None = None, offload: bool = True, batch_size: int = 8):
    """A CLIP-score reward on a random-weight CLIP ViT-H/14 (laion's architecture): real size, real cost."""
    from egrpo_backend.rewards.models.clip_similarity import ClipSimilarity

    model = materialise(clip_h_on_meta(depth).to(dtype=dtype), torch.device(device), seed=2)
    return ClipSimilarity("clip_h_random", model, ByteTokenizer(), factor=1.0, fit="crop", device=device, dtype=dtype,
                          offload=offload, batch_size=batch_size)


class RandomConds:
    """Text conds of a real prompt's shapes (seeded per prompt), in place of the text encoders."""

    def __init__(self, card: ModelCard, dtype: torch.dtype, text_tokens: int | None = None):
        self.card, self.dtype, self.tokens = card, dtype, text_tokens or card.text_tokens

    def __call__(self, prompts: list[str]) -> dict:
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(p.encode()) + 7 * len(p))
            row = {"encoder_hidden_states": torch.randn(1, self.tokens, self.card.text_dim, generator=g) * 0.5}
            if self.card.pooled_dim:
                row["pooled_projections"] = torch.randn(1, self.card.pooled_dim, generator=g) * 0.5
            if self.card.family == "qwenimage":
                row["encoder_attention_mask"] = torch.ones(1, self.tokens, dtype=torch.long)
            rows.append(row)
        return {k: torch.cat([r[k] for r in rows]).to(self.dtype if rows[0][k].is_floating_point() else torch.long)
                for k in rows[0]}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- families the memory table models with block swap (bench/memory_estimate.py, "swap" rows) -----------
# Transformer configs: the `transformer/config.json` of each published diffusers repository (equal to
# these diffusers classes' defaults where noted). Text-encoder sizes: the published parameter counts of
# the encoders those pipelines load. Token counts: the pipeline's latent packing at the given shape.
@dataclass(frozen=True)
class LargeFamily:
    """A model the estimator sizes exactly (weights, blocks, LoRA on meta) and whose activations it models
    from the traced families (tokens x hidden x blocks; memory_estimate.modelled_activations)."""

    name: str
    cls: str
    config: dict
    source: str  # where the config and sizes come from
    shapes: dict  # label -> (image/video tokens per sample, text tokens joined into the sequence, frames, height, width)
    text_encoder_params: float  # published parameter count of the text encoder(s), loaded in bf16
    text_encoder: str
    published_params: float  # the transformer's published parameter count (a check on the config)


WAN22_5B = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
                text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN22_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FLUX2_DEV = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                 num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
                 axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True)
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                     rope_theta=256.0, rope_axes_dim=(16, 56, 56))
Z_IMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
               n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
               t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])


def _video_tokens(frames: int, height: int, width: int, spatial: int, temporal: int = 4) -> int:
    """Latent frames (1 + (frames - 1) / temporal) x (height / spatial) x (width / spatial): the sequence length."""
    return (1 + (frames - 1) // temporal) * (height // spatial) * (width // spatial)


def _image_tokens(px: int) -> int:  # 8x VAE, 2x2 patches (FLUX.2 packs 2x2 into its 128 channels; same count)
    return (px // 16) ** 2


LARGE_FAMILIES: dict[str, LargeFamily] = {f.name: f for f in [
    LargeFamily("wan2.2-5b", "WanTransformer3DModel", WAN22_5B, "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                # Wan2.2 VAE: 16x16 spatial, 4x temporal, then 1x2x2 patches: 32 px per token side
                {"480p x 33": (_video_tokens(33, 480, 832, 32), 0, 33, 480, 832)},
                5.7e9, "umT5-XXL encoder (cross-attention, 512 tokens)", 5.0e9),
    LargeFamily("wan2.2-14b", "WanTransformer3DModel", WAN22_14B, "Wan-AI/Wan2.2-T2V-A14B-Diffusers (one of its two experts)",
                {"480p x 33": (_video_tokens(33, 480, 832, 16), 0, 33, 480, 832)},  # Wan2.1 VAE 8x, 1x2x2 patches
                5.7e9, "umT5-XXL encoder (cross-attention, 512 tokens)", 14.0e9),
    LargeFamily("hunyuanvideo", "HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO, "hunyuanvideo-community/HunyuanVideo",
                {"480p x 33": (_video_tokens(33, 480, 832, 16), 256, 33, 480, 832)},
                8.0e9 + 0.12e9, "LLaVA-Llama-3-8B + CLIP-L (256 joint text tokens)", 13.0e9),
    LargeFamily("flux2-dev", "Flux2Transformer2DModel", FLUX2_DEV, "black-forest-labs/FLUX.2-dev (= diffusers defaults)",
                {"512": (_image_tokens(512), 512, 1, 512, 512), "1024": (_image_tokens(1024), 512, 1, 1024, 1024)},
                24.0e9, "Mistral-Small-3.1-24B (512 joint text tokens)", 32.0e9),
    LargeFamily("z-image", "ZImageTransformer2DModel", Z_IMAGE, "Tongyi-MAI/Z-Image-Turbo (= diffusers defaults)",
                {"512": (_image_tokens(512), 256, 1, 512, 512), "1024": (_image_tokens(1024), 256, 1, 1024, 1024)},
                4.0e9, "Qwen3-4B (about 256 joint text tokens)", 6.0e9),
]}


def large_family_on_meta(family: LargeFamily, compute: torch.dtype, storage: torch.dtype):
    """The family's transformer on meta in its storage plan (blocks in `storage`, the rest in `compute`)."""
    import diffusers

    from egrpo_backend.policies.weight_storage import store_weights

    model = on_meta(lambda: getattr(diffusers, family.cls)(**family.config))
    model.to(dtype=compute)
    store_weights(model, storage, compute)
    return model


# --- tiny widths: the same classes and code paths at a size a CPU test runs in seconds (bench/scale_gpu.py --tiny)
TINY_WIDTH = {"num_attention_heads": 2, "attention_head_dim": 16, "joint_attention_dim": 32, "pooled_projection_dim": 32,
              "caption_projection_dim": 32, "text_dim": 32, "ffn_dim": 32}


def tiny_config(config: dict, depth: int = 1, depth_keys=("num_layers", "num_single_layers")) -> dict:
    """`config` at TINY_WIDTH and `depth` blocks of each kind (rope axes shrunk to the head size)."""
    out = {**config, **{k: v for k, v in TINY_WIDTH.items() if k in config}}
    for k in depth_keys:
        if k in out:
            out[k] = min(depth, out[k])
    if "axes_dims_rope" in out:
        out["axes_dims_rope"] = (4, 6, 6) if len(out["axes_dims_rope"]) == 3 else (4, 4, 4, 4)
    if "dual_attention_layers" in out:
        out["dual_attention_layers"] = ()
    return out


def tiny_card(card: ModelCard) -> ModelCard:
    """The card at tiny width and depth 1, with conds of its tiny text width."""
    return ModelCard(**{**card.__dict__, "name": card.name, "config": tiny_config(card.config, 1, card.depth_keys),
                        "text_dim": TINY_WIDTH["joint_attention_dim"],
                        "pooled_dim": TINY_WIDTH["pooled_projection_dim"] if card.pooled_dim else 0, "text_tokens": 8})


def tiny_comfy_flux_card() -> ModelCard:
    """FLUX.1-dev at tiny width for ComfyUI's loader, which reads a diffusers-format file's heads as hidden / 128:
    one head of 128 (rope axes 16 + 56 + 56, as FLUX's own)."""
    card = tiny_card(MODELS["flux-dev"])
    return ModelCard(**{**card.__dict__, "config": {**card.config, "num_attention_heads": 1, "attention_head_dim": 128,
                                                    "axes_dims_rope": (16, 56, 56)}})
