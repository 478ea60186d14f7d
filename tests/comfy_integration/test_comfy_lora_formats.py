"""Each LoRA format in the REAL consumer it is named for, from both training paths (docs/lora_formats.md).

- The name rules the project keeps (egrpo_backend/lora_names.py, lora_consumers.py) equal ComfyUI's own
  flux_to_diffusers / mmdit_to_diffusers and model_lora_keys_unet.
- comfy path: the tiny_flux fixture's LoRA, trained through the comfy policy, exported as kohya / comfy and
  loaded by ComfyUI's load_lora_for_models (100% of the keys, output = our own LoRA on the same model within
  1e-5), and exported as peft and loaded by diffusers' load_lora_weights into the same weights in diffusers'
  FLUX (converted by ComfyUI's own map): output = the merged model's within 1e-5.
- comfy path on FLUX and SD3: our LoRA on ComfyUI's own model of tiny diffusers weights (default targets, the
  same weights as the diffusers path's default), kohya / comfy in ComfyUI (output = our own LoRA's), peft in
  diffusers (output = the diffusers weights with the update merged by ComfyUI's own map).
- diffusers path: a LoRA on a tiny diffusers FLUX and SD3, exported as kohya / comfy, loaded by ComfyUI into
  the model ComfyUI builds from the same diffusers weights: 100% of the keys, output = ComfyUI's model of the
  diffusers weights with the LoRA merged (by diffusers names, converted by ComfyUI itself) within 1e-5.
Everything that imports ComfyUI runs in a child process with ComfyUI's interpreter.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from comfy_itest import COMFY, REPO, run_comfy_python

TOL = 1e-5

_CHILD = r"""
import json, sys
root, repo, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, root); sys.path.insert(0, repo); sys.argv = [sys.argv[0], "--cpu"]
import torch
import comfy.options; comfy.options.enable_args_parsing()
import comfy.sd, comfy.utils, comfy.lora, comfy.lora_convert
from egrpo_backend import lora as ours

def forward(patcher, family):
    m = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx, y = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return m(x, torch.tensor([0.5]), ctx, y=y).float()

def comfy_load(patcher, path, family):
    sd = comfy.utils.load_torch_file(path)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    used = set()
    for x in key_map:
        for part in ("lora_up.weight", "lora_down.weight", "alpha"):
            if f"{x}.{part}" in sd:
                used.add(f"{x}.{part}")
    new, _ = comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0)
    new.patch_model()
    out = forward(new, family)
    new.unpatch_model()
    return len(used), len(sd), out

result = {}
if args["kind"] == "rules":
    flux = comfy.utils.flux_to_diffusers({"depth": 2, "depth_single_blocks": 2, "hidden_size": 128})
    sd3 = comfy.utils.mmdit_to_diffusers({"depth": 2, "num_blocks": 2})
    def simple(m):
        out = {}
        for k, v in m.items():
            if not k.endswith(".weight"):
                continue
            if isinstance(v, str):
                out[k[:-7]] = [v[:-7], None, None]
            elif v[1] is not None:
                out[k[:-7]] = [v[0][:-7], v[1][1], v[1][2]]
        return out
    result = {"flux": simple(flux), "sd3": simple(sd3)}
    patcher = comfy.sd.load_diffusion_model(args["model"])
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    result["key_map"] = {k: v for k, v in key_map.items() if isinstance(v, str)}
elif args["kind"] == "comfy_trained":
    base = comfy.sd.load_diffusion_model(args["model"])
    for fmt, path in args["files"].items():
        own = comfy.sd.load_diffusion_model(args["model"])
        ours.load_lora_file(own.model.diffusion_model, path)
        expected = forward(own, "flux")
        used, total, out = comfy_load(base, path, "flux")
        result[fmt] = {"mapped": used, "total": total, "diff": float((out - expected).abs().max()),
                       "effect": float((expected - forward(base, "flux")).abs().max())}
    # diffusers: the same weights in diffusers' FLUX, converted with ComfyUI's own map
    from diffusers import FluxTransformer2DModel, FluxPipeline, FlowMatchEulerDiscreteScheduler
    native = comfy.utils.load_torch_file(args["model"])
    tensors, _, _ = ours.read_lora(args["files"]["comfy"])
    merged_native = dict(native)
    for name, t in tensors.items():
        merged_native[name + ".weight"] = native[name + ".weight"] + (t.alpha / t.rank) * t.up @ t.down
    cfg = args["diffusers_config"]
    def to_diffusers(sd):
        m = comfy.utils.flux_to_diffusers({"depth": cfg["num_layers"], "depth_single_blocks": cfg["num_single_layers"],
                                           "hidden_size": cfg["attention_head_dim"] * cfg["num_attention_heads"]})
        out = {}
        for k, v in m.items():
            if isinstance(v, str):
                if v in sd:
                    out[k] = sd[v]
            elif v[0] in sd:
                w = sd[v[0]]
                if v[1] is not None:
                    w = w.narrow(*v[1])
                if len(v) > 2:
                    w = v[2](w)
                out[k] = w.clone()
        return out
    def diffusers_model(sd):
        model = FluxTransformer2DModel(**cfg)
        names = set(model.state_dict())  # ComfyUI's map also lists aliases (LyCORIS, Flux 2) of the same weights
        model.load_state_dict({k: v for k, v in to_diffusers(sd).items() if k in names}, strict=True)
        return model.eval()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, 64, generator=g)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)
    inputs = dict(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), img_ids=ids,
                  txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        expected = diffusers_model(merged_native)(**inputs)[0]
        pipe = FluxPipeline(transformer=diffusers_model(native), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        pipe.load_lora_weights(args["peft"])
        got = pipe.transformer(**inputs)[0]
    peft_total = len(comfy.utils.load_torch_file(args["peft"]))
    layers = sum(1 for _, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A)
    result["peft"] = {"mapped": 2 * layers, "total": peft_total, "diff": float((got - expected).abs().max())}
elif args["kind"] == "comfy_path":
    # our LoRA on ComfyUI's own model of the diffusers weights (what the comfy policy trains), every format out
    import diffusers
    from safetensors.torch import load_file
    family, out_dir = args["family"], args["out"]
    base = comfy.sd.load_diffusion_model(args["base"])
    own = comfy.sd.load_diffusion_model(args["base"])
    dm = own.model.diffusion_model
    ours.add_lora(dm, ours.LoraSettings(rank=2, alpha=4.0), seed=0)
    result["default_targets"] = sorted(ours.lora_tensors(dm))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.lora_parameters(dm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    expected = forward(own, family)
    tensors = ours.lora_tensors(dm)
    files = {fmt: str(ours.export_lora(dm, f"{out_dir}/{fmt}.safetensors", fmt, family=family, naming="native"))
             for fmt in ("kohya", "comfy", "peft")}
    for fmt in ("kohya", "comfy"):
        used, total, out = comfy_load(base, files[fmt], family)
        result[fmt] = {"mapped": used, "total": total, "diff": float((out - expected).abs().max()),
                       "effect": float((expected - forward(base, family)).abs().max())}
    # peft in diffusers: the base diffusers weights + diffusers' loader vs the same weights with our update merged,
    # the update carried to diffusers names by ComfyUI's own map (rows of the fused weight)
    dsd = load_file(args["base"])
    cfg = args["diffusers_config"]
    if family == "flux":
        m = comfy.utils.flux_to_diffusers({"depth": cfg["num_layers"], "depth_single_blocks": cfg["num_single_layers"],
                                           "hidden_size": cfg["attention_head_dim"] * cfg["num_attention_heads"]}, "")
        cls, pipe_cls = diffusers.FluxTransformer2DModel, diffusers.FluxPipeline
    else:
        m = comfy.utils.mmdit_to_diffusers({"depth": cfg["attention_head_dim"] * cfg["num_attention_heads"] // 64,
                                            "num_blocks": cfg["num_layers"]}, "")
        cls, pipe_cls = diffusers.SD3Transformer2DModel, diffusers.StableDiffusion3Pipeline
    merged = dict(dsd)
    for dkey, v in m.items():
        if dkey not in dsd or not dkey.endswith(".weight"):
            continue
        target, offset = (v, None) if isinstance(v, str) else (v[0], v[1])
        name = target[:-len(".weight")]
        if name in tensors:
            t = tensors[name]
            delta = (t.alpha / t.rank) * t.up @ t.down
            merged[dkey] = dsd[dkey] + (delta.narrow(*offset) if offset else delta)
    def dmodel(sd):
        model = cls(**cfg)
        model.load_state_dict(sd, strict=True)
        return model.eval()
    g = torch.Generator().manual_seed(0)
    if family == "flux":
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)
        inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                      pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), img_ids=ids,
                      txt_ids=torch.zeros(5, 3), return_dict=False)
        pipe = pipe_cls(transformer=dmodel(dsd), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    else:
        inputs = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                      pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([500.0]), return_dict=False)
        pipe = pipe_cls(transformer=dmodel(dsd), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                        tokenizer_3=None)
    with torch.no_grad():
        want = dmodel(merged)(**inputs)[0]
        pipe.load_lora_weights(files["peft"])
        got = pipe.transformer(**inputs)[0]
    layers = sum(1 for _, mod in pipe.transformer.named_modules() if hasattr(mod, "lora_A") and "default_0" in mod.lora_A)
    result["peft"] = {"mapped": 2 * layers, "total": len(load_file(files["peft"])), "diff": float((got - want).abs().max()),
                      "effect": float((want - dmodel(dsd)(**inputs)[0]).abs().max())}
else:  # diffusers-trained: ComfyUI builds its model from the diffusers weights itself
    base = comfy.sd.load_diffusion_model(args["base"])
    merged = forward(comfy.sd.load_diffusion_model(args["merged"]), args["family"])
    for fmt, path in args["files"].items():
        used, total, out = comfy_load(base, path, args["family"])
        result[fmt] = {"mapped": used, "total": total, "diff": float((out - merged).abs().max()),
                       "effect": float((merged - forward(base, args["family"])).abs().max())}
print("RESULT" + json.dumps(result))
"""


def _child(args: dict) -> dict:
    run = run_comfy_python(_CHILD, COMFY, REPO, json.dumps(args), timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_kept_key_rules_equal_comfyui(tiny_flux):
    from egrpo_backend import lora_names
    from egrpo_backend.lora_consumers import comfy_key_map

    got = _child({"kind": "rules", "model": str(tiny_flux["model"])})
    for family, hidden in (("flux", 128), ("sd3", 128)):
        theirs = got[family]
        checked = 0
        for rules in lora_names.RULES[family]:
            for block in range(2):
                for native, parts in rules.modules.items():
                    for slot, part in enumerate(parts):
                        name = f"{rules.diffusers}.{block}.{part}"
                        target, offset, size = theirs[name]
                        assert target == f"{rules.native}.{block}.{native}", (name, target)
                        if len(parts) > 1:  # ComfyUI's rows of this part inside the fused weight
                            assert offset == slot * hidden and (size == hidden or part == "proj_mlp"), (name, offset, size)
                        checked += 1
        print(f"{family}: {checked} diffusers module names map as ComfyUI maps them")
    # model_lora_keys_unet on the real tiny Flux: our copy of its two rules gives the same keys
    model_keys = got["key_map"]
    linears = {k[len("diffusion_model."):] for k, v in model_keys.items()
               if k.startswith("diffusion_model.") and v == k + ".weight"}  # the model's own weights
    ours = comfy_key_map(linears)
    assert all(model_keys[k] == f"diffusion_model.{v}.weight" for k, v in ours.items())


def test_comfy_trained_flux_loads_fully_in_comfyui_and_diffusers(tiny_flux, tmp_path):
    from egrpo_backend.jobs import export_job

    job = tiny_flux["job"]
    files = {fmt: str(export_job(job, fmt, out=tmp_path / f"tinyflux.{fmt}.safetensors")) for fmt in ("kohya", "comfy")}
    peft = str(export_job(job, "peft", out=tmp_path / "tinyflux.peft.safetensors"))
    cfg = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
           "num_attention_heads": 1, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": False,
           "axes_dims_rope": [16, 56, 56]}
    got = _child({"kind": "comfy_trained", "model": str(tiny_flux["model"]), "files": files, "peft": peft,
                  "diffusers_config": cfg})
    print("comfy-trained FLUX:", got)
    for fmt, r in got.items():
        assert r["mapped"] == r["total"] > 0, (fmt, r)
        assert r["diff"] < TOL, (fmt, r)
    assert got["kohya"]["effect"] > 1e-4  # the trained LoRA changes the output: equality above means something


def _random_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


CONFIGS = {  # ComfyUI reads SD3's width as 64 x depth: one 64-wide head per block
    "flux": {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
             "num_attention_heads": 1, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": False},
    "sd3": {"sample_size": 8, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": 64,
            "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 128, "pooled_projection_dim": 32,
            "out_channels": 16, "pos_embed_max_size": 16},
}


def _tiny_diffusers(family):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    base = (FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel)(**CONFIGS[family])
    _random_(base, 1)
    return base, CONFIGS[family]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_comfy_path_lora_loads_fully_in_comfyui_and_diffusers(family, tmp_path):
    """Our LoRA on ComfyUI's own model of a tiny FLUX / SD3 (the comfy path's LoRA, default targets), in every format:
    kohya / comfy in ComfyUI, peft in diffusers; and the same modules as the diffusers path's default."""
    from safetensors.torch import save_file

    from egrpo_backend import lora, lora_names

    base, cfg = _tiny_diffusers(family)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    got = _child({"kind": "comfy_path", "family": family, "base": str(tmp_path / "base.safetensors"),
                  "diffusers_config": cfg, "out": str(tmp_path)})
    targets = got.pop("default_targets")
    diffusers_default = lora.default_target_modules(base)
    fused = sorted({lora_names.native_name(family, n)[0] for n in diffusers_default})
    assert targets == fused  # the same weights by default on both paths
    print(f"comfy-path {family}:", got)
    for fmt, r in got.items():
        assert r["mapped"] == r["total"] > 0, (fmt, r)
        assert r["diff"] < TOL and r["effect"] > 1e-4, (fmt, r)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_trained_loads_fully_in_comfyui(family, tmp_path):
    from safetensors.torch import save_file

    from egrpo_backend import lora
    from egrpo_backend.lora import LoraSettings

    base, _ = _tiny_diffusers(family)
    model = copy.deepcopy(base)
    lora.add_lora(model, LoraSettings(rank=2, alpha=4.0), seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    tensors = lora.lora_tensors(model)
    merged = {k: v.clone() for k, v in base.state_dict().items()}
    for name, t in tensors.items():
        merged[name + ".weight"] += (t.alpha / t.rank) * t.up @ t.down
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp_path / "merged.safetensors"))
    files = {fmt: str(lora.export_lora(model, tmp_path / f"{fmt}.safetensors", fmt, family=family)) for fmt in ("kohya", "comfy")}
    got = _child({"kind": "diffusers_trained", "family": family, "base": str(tmp_path / "base.safetensors"),
                  "merged": str(tmp_path / "merged.safetensors"), "files": files})
    print(f"diffusers-trained {family}:", got)
    for fmt, r in got.items():
        assert r["mapped"] == r["total"] > 0, (fmt, r)
        assert r["diff"] < TOL and r["effect"] > 1e-4, (fmt, r)
