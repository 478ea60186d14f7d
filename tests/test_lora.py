"""LoRA injection, toggling, export in three formats and loading back (ours and diffusers').

Tiny random SD3 and Flux transformers built from config on CPU; "trained" LoRAs are random B
weights, so a LoRA that is lost or mis-scaled on the way through a file changes the output.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from egrpo_backend import lora
from egrpo_backend.lora import LoraSettings, LoraTensors

TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Tiny models and their inputs


def make_sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    ).eval()


def make_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    # rotary embedding needs sum(axes_dims_rope) == attention_head_dim
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()


def sd3_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
        pooled_projections=torch.randn(2, 16, generator=g),
        timestep=torch.tensor([100.0, 700.0]),
    )


def flux_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 16, 16, generator=g),  # packed latents: [B, 4x4 tokens, 16 channels]
        encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
        pooled_projections=torch.randn(2, 16, generator=g),
        timestep=torch.tensor([0.1, 0.7]),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3),
        txt_ids=torch.zeros(5, 3),
    )


MODELS = {"sd3": (make_sd3, sd3_inputs), "flux": (make_flux, flux_inputs)}


def run(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**MODELS[kind][1](), return_dict=False)[0]


def randomize_lora(model: nn.Module, seed: int = 7) -> None:
    """Stand-in for training: random, non-zero B (and A) weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def trained(request):
    """(kind, base model, model with a 'trained' rank-4 alpha-8 LoRA, its output)."""
    kind = request.param
    base = MODELS[kind][0]()
    model = copy.deepcopy(base)
    lora.add_lora(model, LoraSettings(rank=4, alpha=8.0), seed=0)  # alpha != rank: scale 2 exercises folding
    randomize_lora(model)
    out = run(model, kind)
    assert (out - run(base, kind)).abs().max() > 1e-3  # the LoRA must matter, or round trips prove nothing
    return kind, base, model, out


# ---------------------------------------------------------------------------------------------
# Injection and toggling


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_init_leaves_output_unchanged_and_freezes_base(kind):
    base = MODELS[kind][0]()
    model = copy.deepcopy(base)
    params = lora.add_lora(model, LoraSettings(rank=4), seed=0)

    assert torch.allclose(run(model, kind), run(base, kind), atol=0, rtol=0)  # lora_B starts at 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * len(lora.lora_tensors(model)) > 0
    assert {id(p) for p in trainable} == {id(p) for p in params}


def test_init_is_deterministic_and_keeps_global_rng():
    a, b, c = make_sd3(), make_sd3(), make_sd3()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    lora.add_lora(a, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    lora.add_lora(b, seed=5)
    lora.add_lora(c, seed=6)
    ta, tb, tc = lora.lora_tensors(a), lora.lora_tensors(b), lora.lora_tensors(c)
    assert all(torch.equal(ta[k].down, tb[k].down) for k in ta)
    assert not all(torch.equal(ta[k].down, tc[k].down) for k in ta)


def test_default_targets_are_attention_and_mlp_projections():
    sd3 = lora.default_target_modules(make_sd3())
    assert "transformer_blocks.0.attn.add_q_proj" in sd3
    assert "transformer_blocks.0.attn.to_add_out" in sd3
    assert "transformer_blocks.1.attn.to_out.0" in sd3
    assert {"transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2"} <= set(sd3)
    assert not any("norm" in n or "embed" in n or n == "proj_out" for n in sd3)
    flux = lora.default_target_modules(make_flux())
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
            "transformer_blocks.0.ff_context.net.0.proj"} <= set(flux)
    assert "proj_out" not in flux and not any("norm" in n for n in flux)

    # ComfyUI / BFL Flux names; "proj" only counts inside attention, never an MLP's proj.
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(4, 12), nn.Linear(4, 4)

    class Double(nn.Module):
        def __init__(self):
            super().__init__()
            self.img_attn, self.txt_attn = Attn(), Attn()
            self.img_mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
            self.proj = nn.Linear(4, 4)

    class Single(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.linear2, self.modulation = nn.Linear(4, 20), nn.Linear(12, 4), nn.Linear(4, 12)

    class ComfyFlux(nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = nn.ModuleList([Double()])
            self.single_blocks = nn.ModuleList([Single()])

    assert lora.default_target_modules(ComfyFlux()) == [
        "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
        "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
        "single_blocks.0.linear1", "single_blocks.0.linear2",
    ]


def test_no_target_found_lists_linear_layers():
    with pytest.raises(ValueError, match=r"target_modules=.*fc1"):
        lora.add_lora(_named_mlp())
    with pytest.raises(ValueError, match="matches no Linear layer.*fc1"):
        lora.add_lora(_named_mlp(), LoraSettings(target_modules=["to_q"]))


def _named_mlp() -> nn.Module:
    model = nn.Module()
    model.fc1 = nn.Linear(3, 3)
    return model


def test_settings_validation():
    for bad in (dict(rank=0), dict(alpha=0.0), dict(alpha=float("nan")), dict(dropout=1.0), dict(target_modules=[])):
        with pytest.raises(ValueError):
            LoraSettings(**bad)
    assert lora.add_lora(_named_mlp(), LoraSettings(rank=2, target_modules=["fc1"]))


def test_add_twice_raises():
    model = make_sd3()
    lora.add_lora(model)
    with pytest.raises(ValueError, match="already has"):
        lora.add_lora(model)


def test_set_lora_enabled_gives_base_output(trained):
    kind, base, model, out = trained
    flags = [p.requires_grad for p in lora.lora_parameters(model)]
    lora.set_lora_enabled(model, False)
    try:
        assert torch.allclose(run(model, kind), run(base, kind), atol=0, rtol=0)
        assert [p.requires_grad for p in lora.lora_parameters(model)] == flags  # peft would unset them
    finally:
        lora.set_lora_enabled(model, True)
    assert torch.allclose(run(model, kind), out, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Files: round trips


@pytest.mark.parametrize("fmt", lora.FORMATS)
def test_export_then_own_loader_reproduces_outputs(trained, fmt, tmp_path):
    kind, base, model, out = trained
    path = lora.export_lora(model, tmp_path / f"l_{fmt}.safetensors", fmt)

    fresh = copy.deepcopy(base)
    lora.load_lora_file(fresh, path)
    assert (run(fresh, kind) - out).abs().max() < TOL
    assert lora.read_lora(path, model=fresh)[1] == fmt


def test_load_into_existing_adapter_folds_other_alpha(trained, tmp_path):
    """A peft file (alpha folded, scale 1) into an adapter with alpha 8: the scale is folded into up."""
    kind, base, model, out = trained
    path = lora.export_lora(model, tmp_path / "l.safetensors", "peft")
    fresh = copy.deepcopy(base)
    lora.add_lora(fresh, LoraSettings(rank=4, alpha=8.0), seed=3)
    lora.load_lora_file(fresh, path)
    assert (run(fresh, kind) - out).abs().max() < TOL


def test_export_keys_per_format(tmp_path):
    from safetensors import safe_open

    model = make_sd3()
    lora.add_lora(model, LoraSettings(rank=4, alpha=8.0, target_modules=["add_q_proj", "add_k_proj", "add_v_proj"]))
    randomize_lora(model)
    t = lora.lora_tensors(model)["transformer_blocks.0.attn.add_q_proj"]
    # kohya and comfy: SAI's MMDiT names, the three projections fused into one qkv LoRA of rank 3 x 4
    expected = {
        "kohya": {"lora_unet_joint_blocks_0_context_block_attn_qkv." + s for s in ("lora_down.weight", "lora_up.weight", "alpha")},
        "comfy": {"diffusion_model.joint_blocks.0.context_block.attn.qkv." + s for s in ("lora_down.weight", "lora_up.weight", "alpha")},
        "peft": {f"transformer.transformer_blocks.0.attn.add_{c}_proj.{s}" for c in "qkv" for s in ("lora_A.weight", "lora_B.weight")},
    }
    for fmt, keys in expected.items():
        path = lora.export_lora(model, tmp_path / f"{fmt}.safetensors", fmt)
        with safe_open(str(path), "pt") as f:
            got = {k for k in f.keys() if "blocks.0" in k or "blocks_0" in k}
            assert got == keys
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            assert lora.json.loads(f.metadata()["egrpo.keys_mapped"])["mapped"] == len(tensors)
        for k, v in tensors.items():
            assert v.dtype == torch.float32 and v.is_contiguous()
            if k.endswith(".alpha"):
                assert v.ndim == 0 and v.item() == 24.0  # rank 12, scale alpha / rank = 2 as before
        if fmt == "peft":  # B carries alpha / r = 2
            b = tensors["transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight"]
            assert torch.allclose(b, t.up * 2.0)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_export_half_precision(trained, dtype, torch_dtype, tmp_path):
    from safetensors import safe_open

    kind, base, model, out = trained
    path = lora.export_lora(model, tmp_path / "l.safetensors", "kohya", dtype=dtype)
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch_dtype}
    fresh = copy.deepcopy(base)
    lora.load_lora_file(fresh, path)
    assert (run(fresh, kind) - out).abs().max() < 1e-2  # rounded weights: close, not exact


def test_export_accepts_canonical_tensors(trained, tmp_path):
    kind, base, model, out = trained
    path = lora.export_lora(lora.lora_tensors(model), tmp_path / "l.safetensors", "comfy", family=kind)
    fresh = copy.deepcopy(base)
    lora.load_lora_file(fresh, path)
    assert (run(fresh, kind) - out).abs().max() < TOL


def test_metadata_round_trips(tmp_path):
    model = make_sd3()
    lora.add_lora(model, LoraSettings(rank=4, alpha=2.0))
    spec = {"lora": {"rank": 4, "alpha": 2.0}, "algorithm": {"preset": "egrpo"}}
    metrics = {"reward_mean": [0.4, 0.6], "step": 12}
    path = lora.export_lora(
        model, tmp_path / "l.safetensors", "kohya", metadata={"egrpo.spec": spec, "egrpo.metrics": metrics, "note": "hi"}
    )
    tensors, fmt, meta = lora.read_lora(path, model=model)
    assert fmt == "kohya"
    assert meta["egrpo.spec"] == spec and meta["egrpo.metrics"] == metrics and meta["note"] == "hi"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0 and meta["format"] == "pt"
    assert all(t.rank == 4 and t.alpha == 2.0 for t in tensors.values())


# ---------------------------------------------------------------------------------------------
# diffusers' own loader on the peft format


def test_diffusers_load_lora_weights_reproduces_outputs(trained, tmp_path):
    """The peft format through diffusers' pipeline loader (StableDiffusion3Pipeline / FluxPipeline)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    kind, base, model, out = trained
    path = lora.export_lora(model, tmp_path / "l.safetensors", "peft")

    # A pipeline needs only the transformer and a scheduler to load a transformer LoRA.
    transformer = copy.deepcopy(base)
    others = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if kind == "sd3":
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_3=None, tokenizer_3=None, **others
        )
    else:
        pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), **others)
    pipe.load_lora_weights(str(path))
    assert (run(pipe.transformer, kind) - out).abs().max() < TOL


# ---------------------------------------------------------------------------------------------
# Errors


def test_mismatched_rank_raises(tmp_path):
    model = make_sd3()
    lora.add_lora(model, LoraSettings(rank=4))
    path = lora.export_lora(model, tmp_path / "r4.safetensors", "comfy")
    other = make_sd3()
    lora.add_lora(other, LoraSettings(rank=8))
    with pytest.raises(ValueError, match=r"mismatched LoRA file: transformer_blocks\.0\.attn\.\w+: expected down \[8, 16\]"):
        lora.load_lora_file(other, path)


def test_file_for_another_model_raises(tmp_path):
    sd3 = make_sd3()
    lora.add_lora(sd3)
    for fmt in lora.FORMATS:
        path = lora.export_lora(sd3, tmp_path / f"{fmt}.safetensors", fmt)
        with pytest.raises(ValueError, match="mismatched LoRA file: .*(transformer_blocks.1|sd3 LoRA cannot load into a flux|joint_blocks_0.*names no Linear)"):
            lora.load_lora_file(make_flux(), path)  # flux has one double block: block 1 does not exist


def test_missing_module_in_file_raises(tmp_path):
    model = make_sd3()
    lora.add_lora(model, LoraSettings(target_modules=["to_q"]))
    path = lora.export_lora(model, tmp_path / "q.safetensors", "peft")
    other = make_sd3()
    lora.add_lora(other, LoraSettings(target_modules=["to_q", "to_k"]))
    with pytest.raises(ValueError, match="mismatched LoRA file: transformer_blocks.0.attn.to_k: .*file has none"):
        lora.load_lora_file(other, path)


def test_refuses_non_safetensors(tmp_path):
    (tmp_path / "evil.pt").write_bytes(b"not a pickle you want")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        lora.read_lora(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        lora.export_lora({}, tmp_path / "out.ckpt", "kohya")
    with pytest.raises(ValueError, match="valid formats"):
        lora.export_lora({}, tmp_path / "out.safetensors", "a1111")


def test_atomic_write_keeps_old_file_when_serialising_fails(tmp_path, monkeypatch):
    import safetensors.torch

    model = make_sd3()
    lora.add_lora(model, LoraSettings(rank=2))
    path = lora.export_lora(model, tmp_path / "l.safetensors", "kohya")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    randomize_lora(model)
    with pytest.raises(OSError, match="disk full"):
        lora.export_lora(model, path, "kohya")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors"]


def test_atomic_text_and_json(tmp_path):
    from egrpo_backend.atomic import atomic_write_json, atomic_write_text

    atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    assert (tmp_path / "a" / "b.txt").read_text() == "hello"
    atomic_write_json(tmp_path / "c.json", {"x": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "c.json", {"x": object()})  # fails before writing anything
    assert (tmp_path / "c.json").read_text().strip() == '{\n  "x": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c.json"]


# ---------------------------------------------------------------------------------------------
# Kohya names: '_'-joined, resolved against the model


def test_kohya_names_with_underscores_resolve_on_flux(tmp_path):
    model = make_flux()
    lora.add_lora(model, LoraSettings(rank=2))
    randomize_lora(model)
    path = lora.export_lora(model, tmp_path / "k.safetensors", "kohya")

    stems, fmt, _ = lora.read_lora(path)  # without a model: '_'-joined stems of BFL names
    assert fmt == "kohya" and "double_blocks_0_txt_attn_qkv" in stems and "single_blocks_0_linear1" in stems

    resolved, _, _ = lora.read_lora(path, model=make_flux())  # back to the diffusers model's names, split exactly
    assert set(resolved) == set(lora.lora_tensors(model))
    assert "transformer_blocks.0.attn.add_q_proj" in resolved
    assert "single_transformer_blocks.0.attn.to_k" in resolved
    ours = lora.lora_tensors(model)
    assert all(torch.equal(resolved[k].down, ours[k].down) and torch.equal(resolved[k].up, ours[k].up) for k in ours)

    with pytest.raises(ValueError, match="read_lora\\(path, model=model\\)"):
        lora.set_lora_tensors(model, stems)  # unresolved stems get a hint, not a silent no-op


def test_kohya_key_matching_no_module_raises(tmp_path):
    down, up = torch.zeros(2, 16), torch.zeros(16, 2)
    path = lora.export_lora({"transformer_blocks.0.attn.to_qq": LoraTensors(down, up, 2.0)}, tmp_path / "k.safetensors", "kohya")
    with pytest.raises(ValueError, match="lora_unet_transformer_blocks_0_attn_to_qq.*names no Linear layer"):
        lora.read_lora(path, model=make_flux())


def test_file_with_mixed_ranks_and_alphas_loads(tmp_path):
    """Files from other tools may give modules different ranks; our loader injects each as written."""
    base = make_sd3()
    g = torch.Generator().manual_seed(2)
    tensors = {
        "transformer_blocks.0.attn.to_q": LoraTensors(torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 1.0),
        "transformer_blocks.1.attn.to_v": LoraTensors(torch.randn(5, 16, generator=g), torch.randn(16, 5, generator=g), 10.0),
    }
    path = lora.export_lora(tensors, tmp_path / "mixed.safetensors", "comfy")
    model = copy.deepcopy(base)
    lora.load_lora_file(model, path)
    got = lora.lora_tensors(model)
    assert {k: (t.rank, t.alpha) for k, t in got.items()} == {k: (t.rank, t.alpha) for k, t in tensors.items()}
    assert (run(model, "sd3") - run(base, "sd3")).abs().max() > 1e-3
