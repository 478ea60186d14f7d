"""Memory on one GPU (docs/memory.md): fp8 weight storage with a LoRA that trains through the cast
layers (diffusers hooks, and ComfyUI's cast-weights-on-forward ops via a stand-in module), text
encoders loaded lazily, cached on disk and freed, tiled decode, and rewards that score in chunks
and sit on the CPU between scores. CPU only: fp8 is storage only, so compute runs in float32 here.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from egrpo_backend import lora
from egrpo_backend.policies import build_policy
from egrpo_backend.policies.diffusers_policy import DiffusersPolicy, load_diffusers_policy
from egrpo_backend.policies.weight_storage import block_lists, count_cast_layers, store_weights
from test_diffusers_pipeline import sd3_folder  # noqa: F401  (fixture: a real tiny SD3 pipeline folder)
from tiny_models import ByteTextEncoder, make_tiny_flux, make_tiny_sd3, make_tiny_vae

FP8 = torch.float8_e4m3fn
LATENT = (4, 8, 8)


def fp8_policy(kind: str, **kw) -> DiffusersPolicy:
    model = make_tiny_sd3() if kind == "sd3" else make_tiny_flux()
    return DiffusersPolicy(model, ByteTextEncoder(), LATENT, dtype=torch.float32, weight_dtype=FP8, **kw)


def block_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Linear weights inside the model's blocks (the base layer's, not the adapter's)."""
    return {f"{name}.{n}": p for name, blocks in block_lists(model) for n, p in blocks.named_parameters()
            if n.endswith("weight") and "lora_" not in n and p.ndim == 2}


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *LATENT, generator=g), torch.rand(batch, generator=g) * 0.8 + 0.1


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fp8_storage_is_one_byte_per_parameter(kind):
    policy = fp8_policy(kind)
    weights = block_weights(policy.transformer)
    assert weights and count_cast_layers(policy.transformer) >= len(weights)
    for name, w in weights.items():
        assert w.dtype == FP8, name
        assert w.untyped_storage().nbytes() == w.numel(), name  # 1 byte per parameter, read from the storage
    outside = [p for n, p in policy.transformer.named_parameters() if not n.startswith(("transformer_blocks", "single_"))]
    assert outside and all(p.dtype == torch.float32 for p in outside)  # embedders and the final layer: compute dtype


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fp8_velocity_is_the_fp8_rounded_model_computed_in_float32(kind):
    policy = fp8_policy(kind)
    reference = make_tiny_sd3() if kind == "sd3" else make_tiny_flux()
    with torch.no_grad():
        for _, blocks in block_lists(reference):
            for mod in blocks.modules():
                if isinstance(mod, torch.nn.Linear):
                    for w in mod.parameters():
                        w.copy_(w.to(FP8).float())  # what storing in fp8 loses (weights and biases), and nothing else
    ref = DiffusersPolicy(reference, ByteTextEncoder(), LATENT, dtype=torch.float32)
    x, sigma = inputs()
    cond = policy.encode(["a cat", "a dog"])
    torch.testing.assert_close(policy.velocity(x, sigma, cond), ref.velocity(x, sigma, cond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_trains_through_cast_layers_and_only_lora_changes(checkpointing):
    policy = fp8_policy("flux", gradient_checkpointing=checkpointing)
    params = lora.add_lora(policy.lora_model(), lora.LoraSettings(rank=4), seed=0)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    for name, mod in policy.transformer.named_modules():  # casting hooks sit on base layers, never on the adapter
        if "lora_" in name:
            assert getattr(mod, "_diffusers_hook", None) is None, name
    before = {n: p.detach().clone() for n, p in policy.transformer.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, sigma = inputs()
    cond = policy.encode(["a cat", "a dog"])
    for _ in range(2):
        opt.zero_grad()
        policy.velocity(x, sigma, cond).pow(2).mean().backward()
        opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())  # optimizer state in the LoRA dtype
    changed = {n for n, p in policy.transformer.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    for name, w in block_weights(policy.transformer).items():
        assert w.dtype == FP8 and torch.equal(w.view(torch.uint8), before[name].view(torch.uint8)), name
    assert all(p.dtype == torch.float32 for p in params)  # a forward's casting left the adapter alone


def test_gradients_through_cast_layers_match_with_and_without_checkpointing():
    grads = []
    for checkpointing in (False, True):
        policy = fp8_policy("sd3", gradient_checkpointing=checkpointing)
        params = lora.add_lora(policy.lora_model(), lora.LoraSettings(rank=4), seed=0)
        with torch.no_grad():
            for p in params:
                p.add_(0.01)  # B = 0 would give A no gradient
        x, sigma = inputs()
        policy.velocity(x, sigma, policy.encode(["a cat", "a dog"])).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(grads[0], grads[1])


def test_casting_a_model_that_already_has_the_lora_leaves_the_adapter_alone():
    model = make_tiny_sd3()
    params = lora.add_lora(model, lora.LoraSettings(rank=4), seed=0)
    store_weights(model, FP8, torch.float32)
    assert all(p.dtype == torch.float32 for p in params)
    policy = DiffusersPolicy(model, ByteTextEncoder(), LATENT, dtype=torch.float32, weight_dtype=FP8)
    for p in params:
        p.requires_grad_(True)  # the policy freezes what it is given; jobs inject the LoRA after it
    x, sigma = inputs()
    policy.velocity(x, sigma, policy.encode(["a cat", "a dog"])).sum().backward()
    assert all(p.grad is not None and p.dtype == torch.float32 for p in params)


def test_lora_dtype_option():
    policy = fp8_policy("sd3")
    params = lora.add_lora(policy.lora_model(), lora.LoraSettings(rank=4, dtype="bfloat16"), seed=0)
    assert {p.dtype for p in params} == {torch.bfloat16}
    with pytest.raises(ValueError, match="LoRA dtype 'float8_e4m3fn' is not allowed"):
        lora.LoraSettings(dtype="float8_e4m3fn")


def test_storage_wider_than_compute_is_refused():
    with pytest.raises(ValueError, match="weight_dtype.*wider than the compute dtype"):
        DiffusersPolicy(make_tiny_sd3(), ByteTextEncoder(), LATENT, dtype=torch.bfloat16, weight_dtype=torch.float32)


# ---------------------------------------------------------------- ComfyUI's casting ops, stood in for


class CastLinear(torch.nn.Linear):
    """Stand-in for comfy.ops.manual_cast.Linear: weights stay in their storage dtype and are cast to the
    input's dtype inside forward when `comfy_cast_weights` is set (a class default an instance can override)."""

    comfy_cast_weights = False

    def forward(self, x):
        if self.comfy_cast_weights:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        return super().forward(x)


class ComfyLikeModel(torch.nn.Module):
    """Two blocks of cast Linears, named like ComfyUI's Flux (img_attn.qkv / proj)."""

    def __init__(self, storage: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        self.double_blocks = torch.nn.ModuleList()
        for _ in range(2):
            block = torch.nn.Module()
            block.img_attn = torch.nn.Module()
            block.img_attn.qkv, block.img_attn.proj = CastLinear(8, 8), CastLinear(8, 8)
            self.double_blocks.append(block)
        self.to(storage)  # what ComfyUI's loader does with model_options={"dtype": storage}

    def forward(self, x):
        for block in self.double_blocks:
            x = x + block.img_attn.proj(torch.tanh(block.img_attn.qkv(x)))
        return x


def test_comfy_casting_ops_store_fp8_and_a_lora_trains_through_them():
    from egrpo_backend.policies.comfy_policy import cast_per_layer

    model = ComfyLikeModel(FP8)
    assert cast_per_layer(model, torch.float32) == 4  # fp8 weights, float32 compute: every op casts
    weights = {n: p for n, p in model.named_parameters()}
    assert all(p.dtype == FP8 and p.untyped_storage().nbytes() == p.numel() for p in weights.values())
    assert CastLinear.comfy_cast_weights is False  # switched per instance, never on the shared class
    params = lora.add_lora(model, lora.LoraSettings(rank=2), seed=0)
    assert len(params) == 8 and all(p.dtype == torch.float32 for p in params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(4, 8)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(p.dtype == FP8 for n, p in model.named_parameters() if "lora_" not in n)


def test_comfy_ops_in_the_compute_dtype_are_left_as_they_are():
    from egrpo_backend.policies.comfy_policy import cast_per_layer

    assert cast_per_layer(ComfyLikeModel(torch.float32), torch.float32) == 0


def test_comfy_storage_dtype_comes_from_the_file_header(tmp_path):
    from safetensors.torch import save_file

    from egrpo_backend.policies.comfy_policy import comfy_model_options, file_storage_dtype

    fp8_file = tmp_path / "flux_fp8.safetensors"
    save_file({"a.weight": torch.zeros(64, 64).to(FP8), "a.bias": torch.zeros(64, dtype=torch.bfloat16)}, str(fp8_file))
    assert file_storage_dtype(str(fp8_file)) == FP8  # the bulk decides, not the small bf16 tensors
    assert comfy_model_options("auto", str(fp8_file)) == {"dtype": FP8}
    assert comfy_model_options("bfloat16", str(fp8_file)) == {"dtype": torch.bfloat16}
    scaled = tmp_path / "flux_scaled_fp8.safetensors"
    save_file({"a.weight": torch.zeros(8, 8).to(FP8), "scaled_fp8": torch.zeros(2)}, str(scaled))
    assert comfy_model_options("auto", str(scaled)) == {}  # ComfyUI's quantized ops type it
    assert comfy_model_options("auto", str(tmp_path / "model.ckpt")) == {}


# ---------------------------------------------------------------- decode


def test_decode_tiles_large_images(monkeypatch):
    from egrpo_backend.policies import diffusers_policy

    policy = DiffusersPolicy(make_tiny_sd3(), ByteTextEncoder(), LATENT, vae=make_tiny_vae())
    z = torch.randn(2, *LATENT)
    whole = policy.decode(z)
    assert not policy.vae.use_tiling and whole.shape == (2, 3, 16, 16)
    monkeypatch.setattr(diffusers_policy, "TILE_ABOVE_PX", 8)
    assert policy.decode(z).shape == whole.shape and policy.vae.use_tiling


def test_comfy_decode_tiles_large_images(monkeypatch):
    from types import SimpleNamespace

    from egrpo_backend.policies import comfy_policy

    calls = []

    class FakeVAE:  # ComfyUI's VAE: NHWC images from decode and decode_tiled
        downscale_ratio = 8

        def decode(self, z):
            calls.append("decode")
            return torch.zeros(z.shape[0], z.shape[2] * 8, z.shape[3] * 8, 3)

        def decode_tiled(self, z):
            calls.append("decode_tiled")
            return self.decode(z)

    base = SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1), process_latent_out=lambda z: z)
    policy = comfy_policy.ComfyPolicy(SimpleNamespace(model=base), FakeVAE(), None, (16, 64, 64), torch.device("cpu"))
    assert policy.decode(torch.zeros(1, 16, 64, 64)).shape == (1, 3, 512, 512) and calls == ["decode"]
    calls.clear()
    assert policy.decode(torch.zeros(1, 16, 160, 128)).shape == (1, 3, 1280, 1024) and calls[0] == "decode_tiled"


# ---------------------------------------------------------------- text encoders


def test_text_encoders_load_on_first_use_and_are_freed(sd3_folder, tmp_path):  # noqa: F811
    cache = tmp_path / "conds"
    policy = load_diffusers_policy(str(sd3_folder), resolution=16, cond_cache=cache)
    assert policy.encoder.pipe is None and not cache.exists()  # nothing loaded before a prompt needs it
    cond = policy.encode(["a red cat", "a dog"])
    encoder = weakref.ref(policy.encoder.pipe.text_encoder)
    params = weakref.ref(next(policy.encoder.pipe.text_encoder_2.parameters()))
    assert encoder() is not None
    policy.release_text_encoder()
    gc.collect()
    assert encoder() is None and params() is None  # every reference dropped
    assert torch.equal(policy.encode(["a dog"])["pooled_projections"], cond["pooled_projections"][1:])  # from the cache
    assert policy.encoder.pipe is None  # a cached prompt loads nothing

    assert policy.conds.files_on_disk() == 2 and policy.conds.encoded == 2
    resumed = load_diffusers_policy(str(sd3_folder), resolution=16, cond_cache=cache)
    resumed.encoder._load = lambda: pytest.fail("a resumed job with its cond cache must not load text encoders")
    again = resumed.encode(["a dog", "a red cat"])
    torch.testing.assert_close(again["pooled_projections"], cond["pooled_projections"].flip(0))
    torch.testing.assert_close(again["encoder_hidden_states"], cond["encoder_hidden_states"].flip(0))


def test_cond_cache_of_another_family_is_refused(sd3_folder, tmp_path):  # noqa: F811
    from egrpo_backend.policies.cond_cache import read_cond_cache, write_cond_cache

    cache = tmp_path / "conds.safetensors"  # the comfy node's cond cache file
    write_cond_cache(cache, {"a": {"encoder_hidden_states": torch.zeros(1, 2, 3)}}, "flux")
    with pytest.raises(ValueError, match="holds flux conds but the model is sd3"):
        read_cond_cache(cache, "sd3")


def test_build_policy_wires_storage_dtype_and_cond_cache(sd3_folder, tmp_path):  # noqa: F811
    from egrpo_backend.config import ModelSpec

    spec = ModelSpec(source="diffusers", path=str(sd3_folder), weight_dtype="float8_e4m3fn")
    policy = build_policy(spec, torch.device("cpu"), torch.float32, cond_cache=tmp_path / "c", cond_cache_gb=1.0)
    assert policy.weight_dtype == FP8 and all(w.dtype == FP8 for w in block_weights(policy.transformer).values())
    policy.encode(["a dog"])
    assert policy.conds.files_on_disk() == 1 and policy.conds.disk_bytes == 2**30


# ---------------------------------------------------------------- rewards


class CountingReward:
    """A tiny model reward (ModelReward) that records each forward's batch and where its model was."""

    def __new__(cls, **options):
        from egrpo_backend.rewards.models.scorer import ModelReward

        class Tiny(ModelReward):
            def score(self, images, prompts):
                self.seen.append((images.shape[0], next(self.model.parameters()).device.type))
                return self.model(images.mean((2, 3))).squeeze(1)

        reward = Tiny("tiny", torch.nn.Linear(3, 1), device="cpu", **options)
        reward.seen = []
        return reward


def test_reward_never_sees_a_batch_larger_than_its_chunk():
    reward = CountingReward(batch_size=3)
    images = torch.rand(10, 3, 8, 8)
    scores = reward(images, ["p"] * 10)
    assert [n for n, _ in reward.seen] == [3, 3, 3, 1]
    torch.testing.assert_close(scores, torch.cat([reward(images[i : i + 1], ["p"]) for i in range(10)]))


def test_reward_offload_returns_the_model_to_the_cpu():
    reward = CountingReward(offload=True, batch_size=4)
    moves = []
    to = reward.model.to
    reward.model.to = lambda *a, **k: (moves.append(str(a[0]) if a else str(k)), to(*a, **k))[1]
    reward(torch.rand(6, 3, 8, 8), ["p"] * 6)
    assert moves == [str(reward.device), "cpu"]  # onto the scoring device for the call, back after it
    assert next(reward.model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reward_offload_on_cuda():
    from egrpo_backend.rewards.models.scorer import ModelReward

    reward = CountingReward(offload=True, batch_size=4)
    ModelReward.to(reward, "cuda")
    reward(torch.rand(6, 3, 8, 8), ["p"] * 6)
    assert [d for _, d in reward.seen] == ["cuda", "cuda"]
    assert next(reward.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("option,value", [("offload", "yes"), ("batch_size", 0), ("batch_size", 2.5)])
def test_reward_memory_options_are_checked_before_anything_loads(option, value):
    from egrpo_backend.rewards import build_reward

    with pytest.raises(ValueError, match=f"reward 'pickscore': option {option} must be"):
        build_reward("pickscore", reward_dir="/nonexistent", **{option: value})  # no files needed to fail here


def test_a_job_caches_its_encoded_prompts_and_its_lora_dtype(sd3_folder, tmp_path):  # noqa: F811
    from egrpo_backend.jobs.build import COND_CACHE, build_trainer
    from egrpo_backend.config import JobSpec

    spec = JobSpec.from_dict({"model": {"source": "diffusers", "path": str(sd3_folder), "weight_dtype": "float8_e4m3fn"},
                              "prompts": ["a red cat"], "rewards": [{"name": "jpeg_compressibility"}],
                              "lora": {"rank": 2, "dtype": "bfloat16"}, "train": {"device": "cpu", "evaluate": False}})
    trainer = build_trainer(spec, job_dir=tmp_path)
    assert trainer.policy.conds.files_on_disk() == 2 and (tmp_path / COND_CACHE).is_dir()  # prompt and negative prompt
    assert trainer.policy.encoder.pipe is None  # a small set is encoded whole at the start, then the encoders go
    assert {p.dtype for p in trainer.policy.trainable_parameters()} == {torch.bfloat16}


def test_qwen_image_transformer_runs_with_fp8_weights_and_a_lora():
    import diffusers

    if not hasattr(diffusers, "QwenImageTransformer2DModel"):
        pytest.skip("this diffusers has no QwenImageTransformer2DModel")
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                                  axes_dims_rope=(4, 6, 6))
    policy = DiffusersPolicy(model, ByteTextEncoder(), LATENT, dtype=torch.float32, weight_dtype=FP8)
    assert policy.family == "qwenimage" and all(w.dtype == FP8 for w in block_weights(policy.transformer).values())
    params = lora.add_lora(policy.lora_model(), lora.LoraSettings(rank=2), seed=0)
    x, sigma = inputs()
    cond = policy.encode(["a cat", "a dog"])
    v = policy.velocity(x, sigma, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    v.square().mean().backward()
    assert sum(p.grad is not None for p in params) > len(params) // 2  # the last block's text stream feeds nothing
