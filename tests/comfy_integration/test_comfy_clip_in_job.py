"""Against a REAL ComfyUI server (skipped without COMFYUI_PATH): the comfy-path Train node returns without
encoding the training prompts; the job's child reloads the graph's CLIP from its file and encodes them.

Made here with ComfyUI's own classes (random weights, nothing downloaded): a tiny Flux (context and pooled
width 768, to take CLIP-L's conditioning), a TAESD-format VAE with 16 latent channels, and a CLIP-L text
encoder (transformers' CLIPTextModelWithProjection, CLIP-L's published config; ~250 MB in fp16, the smallest
text encoder ComfyUI's load_clip accepts). The graph: UNETLoader, CLIPLoader (type stable_diffusion),
VAELoader, an E-GRPO Prompt List of 300 prompts and E-GRPO Train LoRA, 1 iteration of 1 prompt on the CPU.
"""

import json
import time
import urllib.error

from comfy_itest import COMFY, run_comfy_python, start_server, stop_server, wait_history, wait_job

_MAKE_FILES = r"""
import json, sys
sys.path.insert(0, sys.argv[1]); root = sys.argv[2]; sys.argv = [sys.argv[0], "--cpu"]
import torch
import comfy.options; comfy.options.enable_args_parsing()
import comfy.supported_models, comfy.taesd.taesd
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
torch.manual_seed(0)
config = {"image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
          "context_in_dim": 768, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1,
          "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "patch_size": 2,
          "txt_ids_dims": []}
mc = comfy.supported_models.Flux(config); mc.set_inference_dtype(torch.float32, None)
model = mc.get_model({}, device="cpu")
save_file({k: (torch.randn_like(v) * 0.02).contiguous() for k, v in model.diffusion_model.state_dict().items()},
          root + "/diffusion_models/clip_itest_flux.safetensors")
tae = comfy.taesd.taesd.TAESD(latent_channels=16)
save_file({k: v.contiguous() for k, v in tae.state_dict().items()}, root + "/vae/clip_itest_tae.safetensors")
te = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                                projection_dim=768, hidden_act="quick_gelu"))
save_file({k: v.half().contiguous() for k, v in te.state_dict().items() if "position_ids" not in k},
          root + "/text_encoders/clip_itest_l.safetensors")
print("made")
"""

PROMPTS = "\n".join(f"a small red house number {i}" for i in range(300))


def _graph(name: str) -> dict:
    spec = {"eval_prompts": ["a held-out blue door"], "eval_seeds": [5], "train": {"threads": 2}}
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "clip_itest_flux.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_itest_l.safetensors", "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "clip_itest_tae.safetensors"}},
        "4": {"class_type": "EGRPOPromptList", "inputs": {"prompts": PROMPTS, "file": "(none)"}},
        "5": {"class_type": "EGRPOReward_jpeg_compressibility", "inputs": {"weight": 1.0}},
        "6": {"class_type": "EGRPOTrainLora", "inputs": {
            "source": "comfy", "reward": ["5", 0], "name": name, "preset": "egrpo", "iterations": 1, "group_size": 2,
            "prompts_per_iteration": 1, "steps": 4, "shift": 3.0, "eta": 0.7, "tau": 2.2, "active": "0-1",
            "lr": 1e-3, "clip_range": 0.2, "lora_rank": 2, "seed": 0, "prompts": ["4", 0], "model": ["1", 0],
            "clip": ["2", 0], "vae": ["3", 0], "width": 64, "height": 64, "device": "cpu",
            "spec_overrides": json.dumps(spec)}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 1]}},
    }


def test_comfy_node_returns_without_encoding_training_prompts_and_the_job_encodes_them(tmp_path):
    models = tmp_path / "models"
    for sub in ("diffusion_models", "vae", "text_encoders"):
        (models / sub).mkdir(parents=True)
    made = run_comfy_python(_MAKE_FILES, COMFY, models)
    assert made.returncode == 0, made.stderr[-3000:]
    server = start_server(tmp_path, {k: f"{{tmp}}/models/{k}" for k in ("diffusion_models", "vae", "text_encoders")})
    try:
        t0 = time.time()
        try:
            res = server.http("/api/prompt", {"prompt": _graph("clip_itest"), "client_id": "itest"})
        except urllib.error.HTTPError as e:  # the server's validation errors, named
            raise AssertionError(e.read().decode(errors="replace")[-3000:]) from None
        assert "prompt_id" in res, res
        entry = wait_history(server.url, res["prompt_id"], timeout=120)
        node_seconds = time.time() - t0
        assert entry["status"]["status_str"] == "success", entry["status"]
        job_id = entry["outputs"]["7"]["text"][0]
        job_dir = tmp_path / "jobs" / job_id
        # the node encoded the held-out prompt only (no negative: no CFG), never a training prompt
        node_conds = sorted(job_dir.glob("node_conds/*/*.safetensors"))
        print(f"prompt executed in {node_seconds:.1f} s (CLIP, model and VAE loading included); "
              f"node encoded {len(node_conds)} prompt(s)")
        assert len(node_conds) == 1
        spec = json.loads((job_dir / "job.json").read_text())
        assert spec["model"]["comfy"]["clip"]["paths"] == [str(models / "text_encoders" / "clip_itest_l.safetensors")]
        assert spec["model"]["comfy"]["clip"]["type"] == "stable_diffusion"
        job = wait_job(server.url, job_id, timeout=600)
        events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
        assert job["status"] == "finished", (job, [e for e in events if e["type"] == "error"], server.log_text()[-3000:])
        encode = [e for e in events if e["type"] == "encode"]
        print("encode events (written by the job's child):", encode)
        assert encode and all(e["set_size"] == 300 for e in encode) and encode[-1]["encoded"] >= 1
        assert not any(e["type"] == "notice" for e in events)  # the CLIP was reloadable: nothing to warn about
        from safetensors import safe_open

        child = {}  # what the child encoded: the training prompt(s) it drew (and the empty negative prompt)
        for path in job_dir.glob("conds/*/*.safetensors"):
            with safe_open(str(path), "pt") as f:
                child[f.metadata()["prompt"]] = f.get_tensor("e0.cross_attn").shape
        trained = [p for p in child if p.startswith("a small red house number")]
        assert len(trained) == encode[-1]["encoded"] and all(child[p][-1] == 768 for p in trained), child
        assert "a held-out blue door" not in child  # read from the node's cache, not encoded again
    finally:
        stop_server(server)
