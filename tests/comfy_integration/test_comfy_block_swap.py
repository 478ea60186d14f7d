"""Block swap on the comfy path against a real ComfyUI (skipped without COMFYUI_PATH): a Flux model loaded by
ComfyUI's own loader, placed by block_swap.place in comfy_policy (in place of base.to(device)), then wrapped by
comfy_policy's checkpointing: the velocity and the LoRA gradients are bit-identical with and without swap, and
each swapped block is copied once per forward and once per recompute."""

from __future__ import annotations

import json

from comfy_itest import _MAKE_TINY_FLUX, COMFY, REPO, TINY_FLUX_CONFIG, run_comfy_python

_SWAP_CHECK = r"""
import json, sys
repo, model_path, cache = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, repo)
import torch
from egrpo_backend import lora
from egrpo_backend.config import ComfySpec, ModelSpec
from egrpo_backend.policies import block_swap
from egrpo_backend.policies.comfy_policy import load_comfy_policy

placed = []
place = block_swap.place
block_swap.place = lambda *a, **k: placed.append(place(*a, **k)) or placed[-1]  # see what comfy_policy's one call made

results = {}
for offload in (0, 2):
    spec = ModelSpec(source="comfy", path=model_path, offload_blocks=offload,
                     comfy=ComfySpec(comfy_root=sys.argv[4], cond_cache=cache, vae="", width=32, height=32))
    policy = load_comfy_policy(spec, torch.device("cpu"), torch.float32, gradient_checkpointing=True)
    params = lora.add_lora(policy.lora_model(), lora.LoraSettings(rank=2), seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *policy.latent_shape, generator=g)
    sigma = torch.tensor([0.7, 0.4])
    cond = policy.encode(["a red cube", "a blue ball"])
    v = policy.velocity(x, sigma, cond)
    v.square().mean().backward()
    results[offload] = {"v": v.detach(), "g": [p.grad.clone() if p.grad is not None else None for p in params]}
swap = placed[-1]
plain, swapped = results[0], results[2]
same_v = torch.equal(plain["v"], swapped["v"])
same_g = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(plain["g"], swapped["g"]))
print(json.dumps({"same_velocity": same_v, "same_grads": same_g, "grads": sum(g is not None for g in swapped["g"]),
                  "none_placed": placed[0] is None, "names": swap.names, "moves": dict(swap.moves)}))
"""


def test_comfy_flux_block_swap_is_exact(tmp_path):
    import sys

    import torch

    model_path = tmp_path / "tiny_flux.safetensors"
    made = run_comfy_python(_MAKE_TINY_FLUX, COMFY, model_path, json.dumps(TINY_FLUX_CONFIG))
    assert made.returncode == 0, made.stderr[-3000:]
    g = torch.Generator().manual_seed(0)
    prompts = ["a red cube", "a blue ball"]
    sys.path.insert(0, str(REPO))
    from egrpo_backend.policies.comfy_conds import write_comfy_conds  # the Train node's cond cache format

    write_comfy_conds({p: [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
                       for p in prompts}, tmp_path / "conds.safetensors")
    run = run_comfy_python(_SWAP_CHECK, REPO, model_path, tmp_path / "conds.safetensors", COMFY)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["none_placed"] and out["names"] == ["double_blocks.0", "single_blocks.0"]  # ComfyUI's Flux lists
    assert out["grads"] > 0 and out["same_velocity"] and out["same_grads"], out
    # a velocity call is one forward per prompt row group here (2 prompts: 2 forwards), plus one recompute each
    assert out["moves"] == {n: 4 for n in out["names"]}, out
