"""The contract check, run with ComfyUI's interpreter (tests/comfy_integration/test_comfy_contract.py).

`python comfy_contract.py COMFY_ROOT WORK_DIR FAMILY [FAMILY ...]` prints one `RESULT {json}` line per
family. For each family it builds a tiny random model from ComfyUI's own classes (comfy.supported_models
at the widths its detection requires), saves it as .safetensors, loads it with comfy.sd.load_diffusion_model
(detection must pick the family back: same class, same keys and shapes), builds CONDITIONING as ComfyUI's
nodes do, writes the cond cache with the Train node's own encode function, and compares:
  ref: x0 from ComfyUI's own sampler path (CFGGuider.sample at cfg 1 with a one-step sampler that records
       the denoised output at (x, sigma)), turned into v = (x - x0) / sigma;
  ours: the comfy FlowPolicy's velocity at (x, sigma), loaded from the files as a training job loads them.
A family may add graph patches (a LoRA through LoraLoaderModelOnly's call, a ModelSampling node) and
conditioning nodes (FluxGuidance); they are recorded with the node's own code (nodes/graph_patches.py).
"""

import json
import os
import sys
from pathlib import Path

ROOT, WORK, FAMILIES = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
REPO = str(Path(__file__).resolve().parents[2])
sys.path.insert(0, ROOT)
sys.path.insert(1, REPO)
sys.argv = [sys.argv[0], "--cpu"]

import torch  # noqa: E402

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management  # noqa: E402,F401
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import node_helpers  # noqa: E402

TOK = 5  # text tokens


def pack_nodes():
    """The pack's `nodes` package under another name: ComfyUI's own nodes.py owns the name `nodes` here."""
    import importlib.util

    if "egrpo_pack_nodes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("egrpo_pack_nodes", os.path.join(REPO, "nodes", "__init__.py"),
                                                      submodule_search_locations=[os.path.join(REPO, "nodes")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["egrpo_pack_nodes"] = module
        spec.loader.exec_module(module)
    import importlib

    return importlib.import_module("egrpo_pack_nodes.graph_patches"), importlib.import_module("egrpo_pack_nodes.train_nodes")


def t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# family -> (supported_models class, unet_config, latent [C, (F,) H, W] with its pixel size, conditioning)
def families():
    flux = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
            "context_in_dim": 32, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "patch_size": 2,
            "txt_ids_dims": [], "yak_mlp": False, "txt_norm": False}
    flux2 = {"image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 1, "mlp_ratio": 3.0, "theta": 2000,
             "out_channels": 128, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False,
             "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3], "patch_size": 1,
             "in_channels": 128, "hidden_size": 128, "context_in_dim": 32, "vec_in_dim": None, "depth": 1,
             "depth_single_blocks": 1, "guidance_embed": True, "yak_mlp": False, "txt_norm": False}
    chroma = {"image_model": "chroma", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
              "out_channels": 64, "qkv_bias": True, "txt_ids_dims": [], "patch_size": 2, "in_channels": 64,
              "hidden_size": 3072, "context_in_dim": 32, "vec_in_dim": None, "depth": 1, "depth_single_blocks": 0,
              "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5}
    sd3 = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
           "adm_in_channels": 32, "pos_embed_scaling_factor": None, "num_patches": 256, "pos_embed_max_size": 16,
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
           "x_block_self_attn_layers": []}
    hyv = {"image_model": "hunyuan_video", "in_channels": 16, "patch_size": [1, 2, 2], "out_channels": 16,
           "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False, "context_in_dim": 32, "hidden_size": 128,
           "mlp_ratio": 4.0, "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True,
           "byt5": False, "guidance_embed": True, "use_cond_type_embedding": False, "vision_in_dim": None,
           "meanflow_sum": False}
    hyi = {**hyv, "patch_size": [1, 1], "in_channels": 64, "out_channels": 64, "vec_in_dim": None, "axes_dim": [64, 64],
           "byt5": True, "guidance_embed": False}
    wan = {"image_model": "wan2.1", "dim": 128, "out_dim": 16, "num_heads": 1, "ffn_dim": 256, "num_layers": 1,
           "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
           "eps": 1e-6, "in_dim": 16, "model_type": "t2v"}
    wan22 = {**wan, "out_dim": 48, "in_dim": 48}
    qwen = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1}
    lumina = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304, "cap_feat_dim": 32,
              "n_layers": 1, "qk_norm": True, "n_heads": 24, "n_kv_heads": 8, "axes_dims": [32, 32, 32],
              "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}
    zimage = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 32,
              "n_layers": 1, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
              "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
              "z_image_modulation": True, "time_scale": 1000.0}
    ltxv = {"image_model": "ltxv", "num_layers": 1, "attention_head_dim": 4, "cross_attention_dim": 128,
            "use_keyframes_abs_pos_embedding": False}
    kandinsky = {"image_model": "kandinsky5", "model_dim": 128, "time_dim": 64, "ff_dim": 256, "visual_embed_dim": 132,
                 "num_text_blocks": 1, "num_visual_blocks": 1}
    mask = {"attention_mask": torch.ones(1, TOK, dtype=torch.long)}
    return {
        "flux": ("Flux", flux, (16, 8, 8), 64, {"pooled_output": t(1, 32, seed=2)}),
        "flux2": ("Flux2", flux2, (128, 4, 4), 64, {}),
        "chroma": ("Chroma", chroma, (16, 8, 8), 64, {}),
        "sd3": ("SD3", sd3, (16, 8, 8), 64, {"pooled_output": t(1, 32, seed=2)}),
        "qwen_image": ("QwenImage", qwen, (16, 1, 8, 8), 64, dict(mask)),
        "lumina2": ("Lumina2", lumina, (16, 8, 8), 64, dict(mask)),
        "zimage": ("ZImage", zimage, (16, 8, 8), 64, dict(mask)),
        "hunyuan_image21": ("HunyuanImage21", hyi, (64, 2, 2), 64, {"conditioning_byt5small": t(1, 3, 1472, seed=4)}),
        "wan21": ("WAN21_T2V", wan, (16, 2, 8, 8), 64, {}),
        "wan22": ("WAN22_T2V", wan22, (48, 2, 4, 4), 64, {}),
        "hunyuan_video": ("HunyuanVideo", hyv, (16, 2, 8, 8), 64, {"pooled_output": t(1, 768, seed=2)}),
        "kandinsky5": ("Kandinsky5", kandinsky, (16, 2, 8, 8), 64, {"pooled_output": t(1, 768, seed=2)}),
        "ltxv": ("LTXV", ltxv, (128, 2, 2, 2), 64, dict(mask)),  # its T5 encoder always returns a mask
    }


CONTEXT = {"qwen_image": 3584, "wan21": 4096, "wan22": 4096, "ltxv": 4096, "kandinsky5": 3584}  # text widths the detection does not read
TEMPORAL = {"ltxv": 8}
# Families whose attention layers the default LoRA targets do not name (the job says so and lists its Linears):
# the user sets lora.target_modules in spec_overrides, as here.
LORA_TARGETS = {"kandinsky5": {"target_modules": ["to_query", "to_key", "to_value"]}}  # pixel frames per latent frame after the first (4 for the others)


def pixel_length(family, latent):
    """The `length` whose empty latent has this latent's frames (1 for image latents)."""
    if len(latent) == 3 or latent[1] == 1:
        return 1
    return (latent[1] - 1) * TEMPORAL.get(family, 4) + 1


def make_model(family, cls_name, config, path):
    mc = getattr(comfy.supported_models, cls_name)(config)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, device="cpu")
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.05).to(v.dtype).contiguous()
          for k, v in model.diffusion_model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return sd


def make_lora(patcher, path, rank=2):
    """A kohya LoRA for every Linear weight of the first block keys ComfyUI maps (random, like a trained one)."""
    import comfy.lora
    from safetensors.torch import save_file

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    sd = patcher.model.state_dict()
    out, g = {}, torch.Generator().manual_seed(5)
    for lora_key, model_key in sorted(key_map.items()):
        if not lora_key.startswith("lora_unet_") or not isinstance(model_key, str) or model_key not in sd:
            continue
        w = sd[model_key]
        if w.ndim != 2:
            continue
        out[f"{lora_key}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
        out[f"{lora_key}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
        out[f"{lora_key}.alpha"] = torch.tensor(float(rank))
        if len(out) >= 3 * 6:
            break
    save_file(out, str(path))
    return len(out) // 3


class StandInClip:
    """A CLIP whose encode_from_tokens_scheduled returns a fixed CONDITIONING (no text encoder weights here)."""

    def __init__(self, conditioning):
        self.conditioning = conditioning

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return [[c, dict(o)] for c, o in self.conditioning[tokens]]


def reference_v(patcher, conditioning, x, sigma):
    """v from ComfyUI's own sampler path: CFGGuider at cfg 1, one step that records the denoised x0."""
    seen = {}

    def one_step(model, noise, sigmas, extra_args=None, callback=None, disable=None):
        seen["x0"] = model(x, sigmas[0] * torch.ones(x.shape[0]), **(extra_args or {})).detach().clone()
        return noise

    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(conditioning, [])
    guider.set_cfg(1.0)
    sigmas = torch.tensor([sigma, 0.0])
    guider.sample(torch.zeros_like(x), torch.zeros_like(x), comfy.samplers.KSAMPLER(one_step), sigmas, seed=0)
    return (x - seen["x0"]) / sigma


def model_file(family):
    """The family's tiny settings and its model file (made once per work folder)."""
    cls_name, config, latent, px, options = families()[family]
    folder = WORK / family
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{family}.safetensors"
    if not path.exists():
        make_model(family, cls_name, config, path)
    return cls_name, config, latent, px, options, path


def check(family, variant="plain"):
    from egrpo_backend.config import ComfySpec, ModelSpec
    from egrpo_backend.policies.comfy_policy import load_comfy_policy
    graph_patches, train_nodes = pack_nodes()
    record_graph_patches, encode_prompts = graph_patches.record_graph_patches, train_nodes.encode_prompts

    cls_name, config, latent, px, options, path = model_file(family)
    folder = path.parent
    patcher = comfy.sd.load_diffusion_model(str(path))
    detected = type(patcher.model.model_config).__name__
    saved = comfy.utils.load_torch_file(str(path))
    loaded = patcher.model.diffusion_model.state_dict()
    same = set(saved) == set(loaded) and all(saved[k].shape == loaded[k].shape for k in saved)
    ctx = CONTEXT.get(family, 32)
    conditioning = [[t(1, TOK, ctx, seed=1), dict(options)]]
    if variant == "flux_guidance":
        conditioning = node_helpers.conditioning_set_values(conditioning, {"guidance": 2.0})

    graph = patcher
    lora_name = None
    if variant == "lora":
        import folder_paths

        loras = WORK / "loras"
        loras.mkdir(exist_ok=True)
        folder_paths.folder_names_and_paths["loras"] = ([str(loras)], {".safetensors"})
        lora_name = f"{family}_graph.safetensors"
        make_lora(patcher, loras / lora_name)
        lora = comfy.utils.load_torch_file(str(loras / lora_name), safe_load=True)
        graph = comfy.sd.load_lora_for_models(patcher, None, lora, 0.8, 0)[0]  # what LoraLoaderModelOnly calls
    if variant == "shift":
        from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

        graph = ModelSamplingAuraFlow().patch_aura(patcher, 2.5)[0]  # multiplier 1 instead of SD3's 1000
    keys = record_graph_patches(graph)

    x = t(2, *latent, seed=3)
    sigma = 0.6
    ref = reference_v(graph, conditioning, x, sigma)
    del graph, patcher
    comfy.model_management.unload_all_models()

    cache = folder / f"conds_{variant}.safetensors"
    encode_prompts(StandInClip({"p": conditioning}), ["p"], cache)
    length = pixel_length(family, latent)
    spec = ModelSpec(source="comfy", path=str(path), comfy=ComfySpec(
        comfy_root=ROOT, kind="diffusion_model", vae="", cond_cache=str(cache), width=px, height=px,
        length=length, **keys))
    spec.validate()
    policy = load_comfy_policy(spec, torch.device("cpu"), torch.float32, gradient_checkpointing=True)
    with torch.no_grad():
        ours = policy.velocity(x, torch.full((2,), sigma), policy.encode(["p", "p"]))
    diff = (ours - ref).abs().max().item()
    shape = list(policy.latent_shape)
    del policy
    control = None
    if variant != "plain" or family == "chroma":
        # negative control: what training saw before the contract (bare file, no FluxGuidance, Chroma at 3.5)
        plain_cache = folder / "conds_control.safetensors"
        encode_prompts(StandInClip({"p": [[conditioning[0][0], dict(options)]]}), ["p"], plain_cache)
        spec.comfy.cond_cache, spec.comfy.loras, spec.comfy.lora_dirs, spec.comfy.model_sampling = str(plain_cache), [], [], {}
        spec.comfy.guidance = 3.5 if family == "chroma" else -1.0
        policy = load_comfy_policy(spec, torch.device("cpu"), torch.float32, gradient_checkpointing=False)
        with torch.no_grad():
            control = (policy.velocity(x, torch.full((2,), sigma), policy.encode(["p", "p"])) - ref).abs().max().item()
        del policy
    return {"control_diff": control, "family": family, "variant": variant, "class": detected, "keys_match": same,
            "latent_shape": shape, "expected_latent": list(latent), "max_abs_diff": diff,
            "scale": ref.abs().max().item(), "finite": bool(torch.isfinite(ours).all()), "graph": keys,
            "params": sum(v.numel() for v in saved.values())}


def train(family):
    """A 2-iteration job (CPU, tiny) through the comfy policy, then its LoRA loaded by ComfyUI's own loader:
    every key must load ("lora key not loaded" counted from ComfyUI's log) and patch a weight."""
    import io
    import logging

    from egrpo_backend.jobs.run import create_job, run_job

    cls_name, config, latent, px, options, path = model_file(family)
    folder = path.parent
    _, train_nodes = pack_nodes()
    ctx = CONTEXT.get(family, 32)
    prompts = ["a red cube", "a blue ball"]
    cache = folder / "conds_train.safetensors"
    length = pixel_length(family, latent)  # video: 2 latent frames (5 or 9 pixel frames), clips scored per frame
    job = folder / "job"
    spec = {"model": {"source": "comfy", "path": str(path),
                      "comfy": {"comfy_root": ROOT, "kind": "diffusion_model", "vae": "", "cond_cache": str(cache),
                                "width": px, "height": px, "length": length}},
            "prompts": prompts, "rewards": [{"name": "jpeg_compressibility"}],
            "algorithm": {"steps": 4, "active": "0-1", "group_size": 2, "clip_range": 0.2},
            "lora": {"rank": 2, "alpha": 2.0, **LORA_TARGETS.get(family, {})},
            "train": {"iterations": 2, "prompts_per_iteration": 1, "lr": 1e-2, "device": "cpu", "threads": 2,
                      "sample_every": 100, "checkpoint_every": 100},
            "output": {"name": f"tiny_{family}", "formats": ["kohya"]}}
    from egrpo_backend.jobs.build import texts_to_encode
    from egrpo_backend.config import JobSpec

    texts = texts_to_encode(JobSpec.from_dict(spec))  # what the Train node encodes: prompts and the empty one
    train_nodes.encode_prompts(StandInClip({p: [[t(1, TOK, ctx, seed=i), dict(options)]] for i, p in enumerate(texts)}),
                               texts, cache)
    if not (job / "job.json").exists():
        create_job(spec, job)
    status = run_job(job, progress=False)
    loras = sorted((job / "lora").glob("*.safetensors"))
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    patcher = comfy.sd.load_diffusion_model(str(path))
    lora = comfy.utils.load_torch_file(str(loras[0]), safe_load=True)
    patched = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0]
    logging.getLogger().removeHandler(handler)
    text = buf.getvalue()
    return {"family": family, "variant": "train", "status": status.get("status"), "iteration": status.get("iteration"),
            "lora": loras[0].name if loras else None, "lora_tensors": len(lora),
            "modules": sum(k.endswith(".lora_down.weight") for k in lora),
            "patched_weights": len(patched.patches),
            "unloaded": text.count("lora key not loaded") + text.count("NOT LOADED")}


def refusals():
    """Patches the child cannot carry give a node error that names them (nodes/graph_patches.py)."""
    from comfy_extras.nodes_model_advanced import RescaleCFG

    graph_patches, train_nodes = pack_nodes()
    path = WORK / "flux" / "flux.safetensors"
    if not path.exists():
        make_model("flux", "Flux", families()["flux"][1], path)
    patcher = comfy.sd.load_diffusion_model(str(path))
    out = {}

    def message(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    out["rescale_cfg"] = message(lambda: graph_patches.record_graph_patches(RescaleCFG().patch(patcher, 0.7)[0]))
    wrapped = patcher.clone()
    wrapped.set_model_unet_function_wrapper(lambda apply, args: apply(args["input"], args["timestep"], **args["c"]))
    out["unet_wrapper"] = message(lambda: graph_patches.record_graph_patches(wrapped))
    stray = WORK / "stray_lora.safetensors"  # a LoRA file outside ComfyUI's loras folders
    import folder_paths

    folder_paths.folder_names_and_paths["loras"] = ([str(WORK / "loras_empty")], {".safetensors"})
    make_lora(patcher, stray)
    foreign = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(stray)), 1.0, 0)[0]
    out["foreign_lora"] = message(lambda: graph_patches.record_graph_patches(foreign))
    fill = dict(families()["flux"][1], in_channels=96)  # a Flux Fill-style model: 16 latent + 80 concat channels
    fill_path = WORK / "flux_fill.safetensors"
    make_model("flux", "Flux", fill, fill_path)
    fill_patcher = comfy.sd.load_diffusion_model(str(fill_path))
    out["concat_model"] = message(lambda: train_nodes.comfy_graph_keys(fill_patcher, 3.0, None))
    shifted = __import__("comfy_extras.nodes_model_advanced", fromlist=["x"]).ModelSamplingSD3().patch(patcher, 5.0)[0]
    out["shift_mismatch"] = message(lambda: train_nodes.comfy_graph_keys(shifted, 3.0, None))
    out["shift_match"] = message(lambda: train_nodes.comfy_graph_keys(shifted, 5.0, None))
    return {"family": "refusals", "variant": "refusals", "messages": out}


for item in FAMILIES:
    family, _, variant = item.partition(":")
    try:
        res = refusals() if family == "refusals" else train(family) if variant == "train" else check(family, variant or "plain")
    except Exception as e:  # one family's failure is reported, the others still run
        import traceback

        res = {"family": family, "variant": variant or "plain", "error": f"{type(e).__name__}: {e}",
               "trace": traceback.format_exc()[-2000:]}
    print("RESULT " + json.dumps(res), flush=True)
    comfy.model_management.unload_all_models()
