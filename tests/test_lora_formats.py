"""Every LoRA format loads fully in the consumer it is named for, whichever path trained it
(docs/lora_formats.md). Tiny FLUX and SD3 built from diffusers' classes on the CPU.

The diffusers-named LoRA is what the diffusers path trains; the native-named one (BFL / SAI names,
q/k/v fused) is what the comfy path trains on ComfyUI's model. Here it is made by fusing and then
randomizing (a real fused LoRA: no block structure). The real ComfyUI loads them in
tests/comfy_integration/test_comfy_lora_formats.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from egrpo_backend import lora, lora_names
from egrpo_backend.lora import LoraSettings, LoraTensors
from egrpo_backend.lora_consumers import comfy_key_map
from test_lora import MODELS, randomize_lora, run

TOL = 1e-5


def _trained(kind):
    base = MODELS[kind][0]()
    model = copy.deepcopy(base)
    lora.add_lora(model, LoraSettings(rank=2, alpha=4.0), seed=0)
    randomize_lora(model)
    return base, model


def _merged(base, kind, diffusers_tensors):
    """The base with each module's update (alpha / r) * up @ down added to its weight: what any consumer must give."""
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, t in diffusers_tensors.items():
            modules[name].weight += (t.alpha / t.down.shape[0]) * t.up @ t.down
    return merged


def _file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _diffusers_pipe(kind, transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    others = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if kind == "sd3":
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                        text_encoder_3=None, tokenizer_3=None, **others)
    return FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), **others)


def _native_modules(base, kind):
    """The native names ComfyUI gives this model's Linears (its state dict after loading diffusers weights)."""
    names = []
    for n in lora._linear_names(base):
        hit = lora_names.native_name(kind, n)
        if hit and hit[0] not in names:
            names.append(hit[0])
    return names


def _comfy_patch(base, kind, file_tensors, fmt):
    """ComfyUI's patch of every mapped key (W += alpha / rank * up @ down), on the native weights, then read back
    as the diffusers model: the model ComfyUI would run."""
    key_map = comfy_key_map(_native_modules(base, kind))
    modules = dict(base.named_modules())
    natives = {}  # native module -> stacked weight of its diffusers parts
    for native in _native_modules(base, kind):
        natives[native] = torch.cat([modules[p].weight.detach() for p in lora_names.diffusers_names(kind, native)])
    stems = {k.rsplit(".lora_down.weight", 1)[0] for k in file_tensors if k.endswith(".lora_down.weight")}
    for stem in stems:
        native = key_map[stem]
        down, up = file_tensors[f"{stem}.lora_down.weight"], file_tensors[f"{stem}.lora_up.weight"]
        natives[native] = natives[native] + (file_tensors[f"{stem}.alpha"].item() / down.shape[0]) * up @ down
    patched = copy.deepcopy(base)
    pm = dict(patched.named_modules())
    with torch.no_grad():
        for native, weight in natives.items():
            r0 = 0
            for p in lora_names.diffusers_names(kind, native):
                rows = pm[p].weight.shape[0]
                pm[p].weight.copy_(weight[r0:r0 + rows])
                r0 += rows
    return patched


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_diffusers_trained_lora_loads_fully_in_every_consumer(kind, tmp_path):
    base, model = _trained(kind)
    ours = run(model, kind)
    merged = run(_merged(base, kind, lora.lora_tensors(model)), kind)
    assert (ours - merged).abs().max() < TOL and (ours - run(base, kind)).abs().max() > 1e-3
    report = {}
    for fmt in lora.FORMATS:
        path = lora.export_lora(model, tmp_path / f"{fmt}.safetensors", fmt)
        tensors, meta = _file(path)
        mapped = json.loads(meta["egrpo.keys_mapped"])
        assert mapped["mapped"] == mapped["total"] == len(tensors)
        if fmt == "peft":
            pipe = _diffusers_pipe(kind, copy.deepcopy(base))
            pipe.load_lora_weights(str(path))
            got = run(pipe.transformer, kind)
            loaded = sum(1 for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A)
            assert loaded == len(tensors) // 2  # every A/B pair became a LoRA layer
        else:
            stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
            key_map = comfy_key_map(_native_modules(base, kind))
            assert stems <= set(key_map), sorted(stems - set(key_map))  # 100% mapped by ComfyUI's rules
            got = run(_comfy_patch(base, kind, tensors, fmt), kind)
        report[fmt] = (mapped["mapped"], mapped["total"], float((got - ours).abs().max()))
        assert (got - ours).abs().max() < TOL, (fmt, report[fmt])
        own = copy.deepcopy(base)
        lora.load_lora_file(own, path)  # and our own loader reads every format back
        assert (run(own, kind) - ours).abs().max() < TOL
    print(f"{kind} diffusers-trained: keys mapped / total, max |consumer - ours|:", report)


def test_kohya_file_of_a_diffusers_flux_has_bfl_names_only(tmp_path):
    base, model = _trained("flux")
    tensors, meta = _file(lora.export_lora(model, tmp_path / "k.safetensors", "kohya"))
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in tensors)
    qkv = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert qkv.shape[0] == 3 * 2 and tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 4 * 2
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * 4.0  # alpha / rank unchanged
    assert meta["ss_network_module"] == "networks.lora"


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_fused_qkv_is_exact_against_merged_weights(kind):
    """The block-diagonal fused LoRA's update equals the stacked updates of q, k and v, row for row."""
    _, model = _trained(kind)
    split = lora.lora_tensors(model)
    fused = lora_names.to_native(split, kind)
    for native, t in fused.items():
        parts = lora_names.diffusers_names(kind, native)
        stacked = torch.cat([(split[p].alpha / split[p].down.shape[0]) * split[p].up @ split[p].down for p in parts])
        assert torch.allclose((t.alpha / t.down.shape[0]) * t.up @ t.down, stacked, atol=1e-6, rtol=0), native
    back = lora_names.to_diffusers(fused, kind)  # and split again: the original LoRA, rank and values
    assert all(torch.equal(back[k].down, split[k].down) and torch.equal(back[k].up, split[k].up)
               and back[k].alpha == split[k].alpha for k in split)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_native_trained_lora_loads_fully_in_diffusers(kind, tmp_path):
    """A LoRA on the native (fused) modules, as the comfy path trains it: peft splits it exactly, diffusers
    applies every key, and the output is the merged model's."""
    base, model = _trained(kind)
    g = torch.Generator().manual_seed(3)
    native = {n: LoraTensors(torch.randn(t.down.shape, generator=g) * 0.2, torch.randn(t.up.shape, generator=g) * 0.2, 4.0)
              for n, t in lora_names.to_native(lora.lora_tensors(model), kind).items()}
    split = {k: LoraTensors(*v) for k, v in lora_names.to_diffusers(native, kind).items()}
    merged = run(_merged(base, kind, split), kind)

    peft = lora.export_lora(native, tmp_path / "p.safetensors", "peft", family=kind, naming="native")
    tensors, meta = _file(peft)
    assert json.loads(meta["egrpo.keys_mapped"])["mapped"] == len(tensors)
    assert all(k.startswith("transformer.transformer_blocks.") or k.startswith("transformer.single_transformer_blocks.")
               for k in tensors)
    pipe = _diffusers_pipe(kind, copy.deepcopy(base))
    pipe.load_lora_weights(str(peft))
    assert (run(pipe.transformer, kind) - merged).abs().max() < TOL

    for fmt in ("kohya", "comfy"):  # native names kept as they are, read by ComfyUI's rules
        path = lora.export_lora(native, tmp_path / f"{fmt}.safetensors", fmt, family=kind, naming="native")
        tensors, _ = _file(path)
        assert (run(_comfy_patch(base, kind, tensors, fmt), kind) - merged).abs().max() < TOL
        own = copy.deepcopy(base)
        lora.load_lora_file(own, path)
        assert (run(own, kind) - merged).abs().max() < TOL


def test_flux_rules_agree_with_diffusers_kohya_converter():
    """Our FLUX name rules and row split against diffusers' own _convert_kohya_flux_lora_to_diffusers, at the
    published width (its single-block split is written for hidden size 3072)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    hidden, g = 3072, torch.Generator().manual_seed(0)
    rows = {"img_attn.qkv": 3 * hidden, "txt_attn.qkv": 3 * hidden, "img_attn.proj": hidden, "txt_attn.proj": hidden,
            "img_mlp.0": 4 * hidden, "img_mlp.2": hidden, "txt_mlp.0": 4 * hidden, "txt_mlp.2": hidden,
            "img_mod.lin": 6 * hidden, "txt_mod.lin": 6 * hidden, "linear1": 7 * hidden, "linear2": hidden,
            "modulation.lin": 3 * hidden}
    native = {}
    for rules in lora_names.RULES["flux"]:
        for module in rules.modules:
            cols = 4 * hidden if module in ("img_mlp.2", "txt_mlp.2") else (5 * hidden if module == "linear2" else hidden)
            native[f"{rules.native}.0.{module}"] = LoraTensors(torch.randn(1, cols, generator=g), torch.randn(rows[module], 1, generator=g), 1.0)
    kohya = {}
    for name, t in native.items():
        stem = "lora_unet_" + name.replace(".", "_")
        kohya.update({f"{stem}.lora_down.weight": t.down, f"{stem}.lora_up.weight": t.up, f"{stem}.alpha": torch.tensor(1.0)})
    theirs = _convert_kohya_flux_lora_to_diffusers(kohya)
    ours = lora_names.to_diffusers(native, "flux")
    assert {f"transformer.{k}.lora_A.weight" for k in ours} == {k for k in theirs if k.endswith("lora_A.weight")}
    for name, t in ours.items():
        a, b = theirs[f"transformer.{name}.lora_A.weight"], theirs[f"transformer.{name}.lora_B.weight"]
        assert torch.equal(b @ a, t.up @ t.down), name


def test_partly_covered_fused_module_is_refused_before_writing(tmp_path):
    model = MODELS["flux"][0]()
    lora.add_lora(model, LoraSettings(rank=2, target_modules=["to_q", "to_k"]))
    for fmt in ("kohya", "comfy"):
        with pytest.raises(ValueError, match=rf"'{fmt}'.*img_attn.qkv fuses .*attn.to_v.* export this LoRA as 'peft'"):
            lora.export_lora(model, tmp_path / f"{fmt}.safetensors", fmt)
    assert not list(tmp_path.iterdir())
    assert lora.export_lora(model, tmp_path / "p.safetensors", "peft").is_file()  # diffusers takes them split


def test_unmappable_family_format_refused_before_the_job_exists(tmp_path):
    from egrpo_backend.config import SpecError
    from egrpo_backend.jobs import create_job

    sana = tmp_path / "sana"
    (sana / "transformer").mkdir(parents=True)
    (sana / "model_index.json").write_text("{}")
    (sana / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel"}))
    spec = {"model": {"source": "diffusers", "path": str(sana)}, "prompts": ["a"],
            "output": {"formats": ["peft", "kohya"]}}
    with pytest.raises(SpecError, match="'kohya' cannot be exported.*sana has no published mapping.*use peft"):
        create_job(spec, tmp_path / "job")
    assert not (tmp_path / "job").exists()
    spec["output"]["formats"] = ["peft"]
    assert create_job(spec, tmp_path / "job2").is_dir()

    # a ComfyUI model that is neither FLUX nor SD3: no diffusers names to export 'peft' with
    from safetensors.torch import save_file

    wan = tmp_path / "wan.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(wan))
    comfy = {"model": {"source": "comfy", "path": str(wan), "comfy": {"comfy_root": str(tmp_path), "cond_cache": str(wan)}},
             "prompts": ["a"], "output": {"formats": ["comfy", "peft"]}}
    with pytest.raises(SpecError, match="'peft' cannot be exported.*not a FLUX or SD3"):
        create_job(comfy, tmp_path / "job3")
    assert not (tmp_path / "job3").exists()
