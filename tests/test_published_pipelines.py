"""Diffusers pipeline folders laid out as published (model_index.json + transformer/ + vae/ + scheduler/
+ text encoders), whose transformer config.json holds EXACTLY the keys of the published file, at tiny
values: nothing the loader reads may be a field that published configs lack (FLUX.1-dev's has no
sample_size, so its jobs give model.width / model.height).

Key sets, as in the published transformer/config.json files:
  black-forest-labs/FLUX.1-dev, stabilityai/stable-diffusion-3.5-medium,
  Efficient-Large-Model/Sana_1600M_1024px_diffusers.
A FLUX folder (CLIP + T5 text encoders with their tokenizers) trains 2 iterations through the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_rewards_models import tiny_clip_vocab

REPO = Path(__file__).resolve().parents[1]

# The published key sets (plus the "_class_name" / "_diffusers_version" every config.json has), tiny values.
FLUX_DEV_KEYS = {"attention_head_dim": 128, "guidance_embeds": True, "in_channels": 16, "joint_attention_dim": 32,
                 "num_attention_heads": 1, "num_layers": 1, "num_single_layers": 1, "patch_size": 1,
                 "pooled_projection_dim": 32}  # rotary axes default (16, 56, 56): head dim 128 as published
SD35_MEDIUM_KEYS = {"attention_head_dim": 8, "caption_projection_dim": 16, "dual_attention_layers": [0],
                    "in_channels": 4, "joint_attention_dim": 16, "num_attention_heads": 2, "num_layers": 2,
                    "out_channels": 4, "patch_size": 2, "pooled_projection_dim": 16, "pos_embed_max_size": 16,
                    "qk_norm": "rms_norm", "sample_size": 8}
SANA_KEYS = {"attention_bias": False, "attention_head_dim": 8, "caption_channels": 16, "cross_attention_dim": 16,
             "cross_attention_head_dim": 8, "dropout": 0.0, "in_channels": 4, "mlp_ratio": 2.5,
             "norm_elementwise_affine": False, "norm_eps": 1e-06, "num_attention_heads": 2,
             "num_cross_attention_heads": 2, "num_layers": 1, "out_channels": 4, "patch_size": 1, "sample_size": 8}


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def _tiny_dc_vae():
    """Sana's AutoencoderDC, two levels (x2): 4x8x8 latents <-> 3x16x16 images."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
                         decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16),
                         decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                         decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                         decoder_qkv_multiscales=((), ()), scaling_factor=0.41)


def _published_config(folder: Path, class_name: str, keys: dict) -> None:
    """Rewrite transformer/config.json with exactly the published keys (save_pretrained writes every default)."""
    path = folder / "transformer" / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({"_class_name": class_name, "_diffusers_version": saved["_diffusers_version"], **keys}, indent=2))


def _save_parts(folder: Path, pipeline: str, transformer, class_name: str, keys: dict, **components) -> Path:
    """A pipeline folder: model_index.json naming each part, every part saved with save_pretrained."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = {"transformer": transformer, "vae": components.pop("vae", None) or _tiny_vae(), "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
             **components}
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, part in parts.items():
        if part is None:
            index[name] = [None, None]
            continue
        library = "diffusers" if type(part).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(part).__name__]
        part.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    _published_config(folder, class_name, keys)
    return folder


def _t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(32, 127)] + [("▁", -1.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=16), len(pieces)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    vocab, merges = tiny_clip_vocab()
    eos = vocab["<|endoftext|>"]
    torch.manual_seed(1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos,
                                        bos_token_id=eos - 1, pad_token_id=eos)).eval()
    t5_tok, t5_vocab = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**FLUX_DEV_KEYS)
    return _save_parts(tmp_path_factory.mktemp("flux-dev-layout"), "FluxPipeline", transformer, "FluxTransformer2DModel",
                       FLUX_DEV_KEYS, text_encoder=clip, tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
                       text_encoder_2=t5, tokenizer_2=t5_tok)


def test_flux_config_has_the_published_keys_only(flux_folder):
    config = json.loads((flux_folder / "transformer" / "config.json").read_text())
    assert set(config) - {"_class_name", "_diffusers_version"} == set(FLUX_DEV_KEYS)
    assert "sample_size" not in config and "axes_dims_rope" not in config


def test_flux_without_a_size_says_which_fields_to_set(flux_folder):
    from egrpo_backend.policies.diffusers_policy import load_diffusers_policy

    with pytest.raises(ValueError, match="model.width and model.height"):
        load_diffusers_policy(str(flux_folder))


def test_flux_pipeline_folder_trains_two_iterations_through_the_cli(flux_folder, tmp_path):
    spec = {"model": {"source": "diffusers", "path": str(flux_folder), "width": 32, "height": 16},
            "prompts": ["a red cat", "a dog"], "rewards": [{"name": "jpeg_compressibility"}],
            "algorithm": {"steps": 3, "active": "0-1", "group_size": 2, "clip_range": 0.2},
            "lora": {"rank": 2, "alpha": 2.0},
            "train": {"iterations": 2, "prompts_per_iteration": 1, "device": "cpu", "threads": 1},
            "output": {"name": "tiny_flux", "formats": ["peft", "kohya", "comfy"]}}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    job = tmp_path / "job"
    run = subprocess.run([sys.executable, "-m", "egrpo_backend", "train", str(spec_path), "--out", str(job)], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    status = json.loads((job / "status.json").read_text())
    assert status["status"] == "finished" and status["iteration"] == 2
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    exports = {e["format"]: e for e in events if e["type"] == "export"}
    assert set(exports) == {"peft", "kohya", "comfy"}
    assert all(e["mapped"] == e["total"] > 0 for e in exports.values()), exports
    print("keys mapped per format:", {f: f"{e['mapped']}/{e['total']} in {e['consumer']}" for f, e in exports.items()})

    from safetensors import safe_open

    with safe_open(str(job / "lora" / "tiny_flux.kohya.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys), keys
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys)  # q, k, v fused as kohya names it
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in keys)

    # the latent is width x height as asked (packed 2 x 2 by FLUX): 4 channels, 16/2 x 32/2
    from egrpo_backend.policies.diffusers_policy import load_diffusers_policy

    assert load_diffusers_policy(str(flux_folder), width=32, height=16).latent_shape == (4, 8, 16)


def test_sd35_medium_layout_loads_and_runs(tmp_path):
    from diffusers import SD3Transformer2DModel

    from egrpo_backend.policies.diffusers_policy import load_diffusers_policy

    torch.manual_seed(0)
    folder = _save_parts(tmp_path / "sd35", "StableDiffusion3Pipeline", SD3Transformer2DModel(**SD35_MEDIUM_KEYS),
                         "SD3Transformer2DModel", SD35_MEDIUM_KEYS, text_encoder=None, tokenizer=None,
                         text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    policy = load_diffusers_policy(str(folder))  # SD3.5 publishes sample_size: the size comes from it
    assert policy.family == "sd3" and policy.latent_shape == (4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(1, 5, 16), "pooled_projections": torch.randn(1, 16)}
    assert torch.isfinite(policy.velocity(torch.randn(1, 4, 8, 8), torch.full((1,), 0.5), cond)).all()
    assert policy.decode(torch.randn(1, 4, 8, 8)).shape[-2:] == (16, 16)
    assert any(".attn2." in n for n in __import__("egrpo_backend.lora", fromlist=["x"]).default_target_modules(policy.transformer))


def test_sana_layout_loads_and_runs(tmp_path):
    from diffusers import SanaTransformer2DModel

    from egrpo_backend.policies.diffusers_policy import load_diffusers_policy

    torch.manual_seed(0)
    folder = _save_parts(tmp_path / "sana", "SanaPipeline", SanaTransformer2DModel(**SANA_KEYS), "SanaTransformer2DModel",
                         SANA_KEYS, text_encoder=None, tokenizer=None, vae=_tiny_dc_vae())
    policy = load_diffusers_policy(str(folder), width=16, height=16)
    assert policy.family == "sana" and policy.latent_shape == (4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(1, 5, 16), "encoder_attention_mask": torch.ones(1, 5)}
    assert torch.isfinite(policy.velocity(torch.randn(1, 4, 8, 8), torch.full((1,), 0.5), cond)).all()
    assert policy.decode(torch.randn(1, 4, 8, 8)).shape[-2:] == (16, 16)
