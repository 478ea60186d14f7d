"""A tiny Flux-class model trains through the `comfy` policy and its LoRA loads in ComfyUI (real ComfyUI).

The `tiny_flux` fixture (conftest.py) builds the model file from ComfyUI's own classes
(comfy.supported_models.Flux, random weights) and trains 2 iterations, with the default model settings, in
a job child process run by COMFYUI_PYTHON (`python -m egrpo_backend run JOB_DIR`) that loads it with
ComfyUI's loaders on the CPU. Here the kohya LoRA it exported is loaded with
ComfyUI's own LoRA loading (comfy.sd.load_lora_for_models, what LoraLoaderModelOnly calls): every key
maps (no "lora key not loaded" warning), one weight patch per LoRA module, and the patched model's
output differs from the base model's.
"""

import json

from comfy_itest import COMFY, run_comfy_python

APPLY = r"""
import io, json, logging, sys
root, model_path, lora_path = sys.argv[1:4]
sys.path.insert(0, root); sys.argv = [sys.argv[0], "--cpu"]
import torch
import comfy.options; comfy.options.enable_args_parsing()
import comfy.model_management, comfy.sd, comfy.utils
buf = io.StringIO(); handler = logging.StreamHandler(buf); handler.setLevel(logging.DEBUG)
logging.getLogger().addHandler(handler); logging.getLogger().setLevel(logging.INFO)
base = comfy.sd.load_diffusion_model(model_path)
lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
warnings = buf.getvalue().count("lora key not loaded")
# negative control: bare BFL names load nothing in ComfyUI, so the warning must show for them
bare = {k.replace("lora_unet_", "bare_"): v for k, v in lora.items()}
buf.truncate(0); buf.seek(0)
comfy.sd.load_lora_for_models(base, None, bare, 1.0, 0.0)
control_warnings = buf.getvalue().count("lora key not loaded")
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 16, 8, 8, generator=g); sigma = torch.tensor([0.7])
kw = dict(c_crossattn=torch.randn(1, 5, 32, generator=g), y=torch.randn(1, 32, generator=g))
def run(mp):
    comfy.model_management.load_models_gpu([mp], force_full_load=True)
    with torch.no_grad():
        return mp.model.apply_model(x, sigma, **kw).clone()
y0 = run(base); y1 = run(patched); y0_again = run(base)
print("RESULT " + json.dumps({
    "keys": sorted(lora), "modules": sum(k.endswith(".lora_down.weight") for k in lora),
    "patched_weights": len(patched.patches), "warnings": warnings, "control_warnings": control_warnings,
    "diff": (y1 - y0).abs().max().item(), "base_repeat_diff": (y0_again - y0).abs().max().item(),
    "finite": bool(torch.isfinite(y1).all())}))
"""


def test_tiny_flux_trains_through_comfy_policy(tiny_flux):
    """With the default model settings: gradient checkpointing "auto" (on for comfy models, also on the CPU;
    without it Flux's in-place residual adds break the backward pass) and the default 512 x 512 size."""
    model = json.loads((tiny_flux["job"] / "job.json").read_text())["model"]
    assert model["gradient_checkpointing"] == "auto" and (model["comfy"]["width"], model["comfy"]["height"]) == (512, 512)
    status = tiny_flux["status"]
    assert status["status"] == "finished", status
    assert status.get("iteration") == 2, status
    metrics = json.loads((tiny_flux["job"] / "metrics.json").read_text())
    train = metrics["train"] if isinstance(metrics, dict) else metrics
    assert len(train) == 2, metrics
    assert tiny_flux["lora"] is not None and tiny_flux["lora"].name == "tinyflux.safetensors"


def test_tiny_flux_lora_loads_in_comfyui_and_changes_the_output(tiny_flux):
    res = run_comfy_python(APPLY, COMFY, tiny_flux["model"], tiny_flux["lora"])
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    print({k: v for k, v in r.items() if k != "keys"})
    assert all(k.startswith("lora_unet_") for k in r["keys"]), r["keys"]
    assert r["warnings"] == 0, res.stderr[-3000:]
    assert r["control_warnings"] > 0  # the check above can see the warning at all
    assert r["modules"] > 0 and r["patched_weights"] == r["modules"], r
    assert r["finite"] and r["base_repeat_diff"] == 0.0
    assert r["diff"] > 1e-6, r
