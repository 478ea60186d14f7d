"""A real local diffusers pipeline folder (tiny SD3: two CLIP text encoders with their tokenizers, a
VAE, the transformer) saved with save_pretrained, loaded by `model.source = diffusers` through the
pipeline's own encode_prompt, and trained end to end from a job spec. No network: everything is
built from config and written to a temporary folder."""

import json

import pytest
import torch

from egrpo_backend.jobs.run import create_job, run_job
from test_rewards_models import tiny_clip_vocab, write_clip_tokenizer
from tiny_models import make_tiny_sd3, make_tiny_vae


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sd3")
    vocab, merges = tiny_clip_vocab()
    eos = vocab["<|endoftext|>"]

    def encoder(seed):
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=77, projection_dim=8,
                             eos_token_id=eos, bos_token_id=eos - 1, pad_token_id=eos)
        return CLIPTextModelWithProjection(cfg).eval()

    def tokenizer():
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # as every CLIP tokenizer

    # pooled: two CLIP projections of 8 = 16 = pooled_projection_dim; CLIP hidden 8 + 8 <= joint_attention_dim 16.
    pipe = StableDiffusion3Pipeline(transformer=make_tiny_sd3(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=make_tiny_vae(), text_encoder=encoder(1), tokenizer=tokenizer(),
                                    text_encoder_2=encoder(2), tokenizer_2=tokenizer(), text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.save_pretrained(root)
    return root


def test_local_pipeline_loads_and_encodes_text(sd3_folder):
    from egrpo_backend.policies.diffusers_policy import load_diffusers_policy

    policy = load_diffusers_policy(str(sd3_folder), resolution=16)
    assert policy.family == "sd3" and policy.latent_shape == (4, 8, 8)
    cond = policy.encode(["a red cat", "a dog", "a red cat"])
    assert cond["pooled_projections"].shape == (3, 16)
    assert torch.equal(cond["pooled_projections"][0], cond["pooled_projections"][2])  # cached per prompt
    assert not torch.equal(cond["pooled_projections"][0], cond["pooled_projections"][1])  # text matters
    v = policy.velocity(torch.randn(3, 4, 8, 8), torch.full((3,), 0.5), cond)
    assert v.shape == (3, 4, 8, 8) and torch.isfinite(v).all()
    assert policy.decode(torch.randn(1, 4, 8, 8)).shape == (1, 3, 16, 16)


def test_job_trains_a_local_pipeline(sd3_folder, tmp_path):
    spec = {
        "model": {"source": "diffusers", "path": str(sd3_folder)},
        "prompts": ["a red cat", "a dog"], "rewards": [{"name": "jpeg_compressibility"}],
        "algorithm": {"steps": 4, "active": "0-1", "group_size": 2, "clip_range": 0.2, "guidance_scale": 2.0},
        "lora": {"rank": 2, "alpha": 2.0},
        "train": {"iterations": 2, "prompts_per_iteration": 1, "device": "cpu", "threads": 1},
        "output": {"name": "tiny_sd3", "formats": ["peft", "kohya"]},
    }
    job = create_job(spec, tmp_path / "job")
    result = run_job(job, progress=False)
    assert result["status"] == "finished" and result["iteration"] == 2
    history = json.loads((job / "metrics.json").read_text())["train"]
    assert all(h["ratio_first_dev"] < 1e-5 for h in history)
    assert (job / "lora" / "tiny_sd3.safetensors").is_file()
    # The PEFT export loads back into the pipeline with diffusers' own loader.
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_folder), local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None)
    args = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 5, 16), pooled_projections=torch.randn(1, 16), return_dict=False)
    with torch.no_grad():
        before = pipe.transformer(**args)[0]
        pipe.load_lora_weights(str(job / "lora" / "tiny_sd3.safetensors"))
        after = pipe.transformer(**args)[0]
    assert not torch.allclose(before, after)  # the trained adapter is applied


def test_missing_pipeline_folder_says_what_is_expected(tmp_path):
    from egrpo_backend.policies.diffusers_policy import load_diffusers_policy

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_diffusers_policy(str(tmp_path))
