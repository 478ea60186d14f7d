"""What an exported LoRA's header says: the spec without prompts or private paths, bounded in size,
kohya keys only on kohya files, and the base model named the way other UIs read it."""

import json

from safetensors import safe_open

from egrpo_backend.config import JobSpec
from egrpo_backend.jobs.run import create_job, run_job
from egrpo_backend.provenance import HEADER_LIMIT_BYTES, lora_metadata, prompt_digest, shareable_spec
from test_jobs import tiny_spec


def header(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_exported_headers_carry_no_prompts_and_no_local_paths(tmp_path):
    spec = tiny_spec(iterations=1)
    spec["output"]["copy_to"] = str(tmp_path / "ComfyUI" / "models" / "loras")
    job = create_job(spec, tmp_path / "job")
    run_job(job, progress=False)
    files = sorted((job / "lora").glob("*.safetensors")) + sorted((tmp_path / "ComfyUI").rglob("*.safetensors"))
    files += sorted((job / "checkpoints").rglob("lora.safetensors"))
    assert len(files) == 5
    for path in files:
        meta = header(path)
        blob = json.dumps(meta)
        assert str(tmp_path) not in blob and "handwritten digit" not in blob, path
        spec_meta = json.loads(meta["egrpo.spec"])
        assert spec_meta["prompts"] == prompt_digest(["a handwritten digit three", "a handwritten digit seven"])
        assert "copy_to" not in spec_meta["output"] and "base_dir" not in spec_meta
        assert meta["modelspec.architecture"] == "egrpo-digits-16px/lora"  # never mistaken for a Flux LoRA
        fmt = meta["egrpo.lora_format"]
        assert ("ss_network_module" in meta) == (fmt == "kohya"), (path.name, fmt)


def test_header_stays_small_with_a_huge_prompt_list():
    prompts = [f"a photo of object number {i} on a table" for i in range(100_000)]
    spec = JobSpec.from_dict({"model": {"source": "diffusers", "path": "/home/alice/models/flux-dev", "family": "flux"},
                              "prompts": prompts})
    meta = lora_metadata(spec, {"reward_mean": 0.5})
    assert sum(len(v) for v in meta.values()) < HEADER_LIMIT_BYTES
    data = json.loads(meta["egrpo.spec"])
    assert data["prompts"]["count"] == 100_000 and data["model"]["path"] == "flux-dev"
    assert meta["modelspec.architecture"] == "flux-1/lora" and meta["egrpo.base_model_file"] == "flux-dev"
    assert "/home/alice" not in json.dumps(meta)


def test_comfy_private_folders_are_dropped():
    spec = JobSpec.from_dict({"model": {"source": "comfy", "path": "/srv/ComfyUI/models/unet/flux1-dev-fp8.safetensors",
                                        "comfy": {"comfy_root": "/srv/ComfyUI", "vae": "/srv/ComfyUI/models/vae/ae.safetensors",
                                                  "cond_cache": "/srv/ComfyUI/output/egrpo_jobs/x/conds.safetensors"}},
                              "prompts": ["a cat"]})
    data = shareable_spec(spec)
    assert data["model"]["path"] == "flux1-dev-fp8.safetensors" and data["model"]["comfy"]["vae"] == "ae.safetensors"
    assert "comfy_root" not in data["model"]["comfy"] and "cond_cache" not in data["model"]["comfy"]


def test_comfy_graph_lora_stack_is_recorded_by_relative_name_without_folders():
    """The LoRAs the graph patched onto the MODEL (trained on top of) are named relative to the loras
    folder, sub-folder included; the folders themselves (local paths) are not in the header."""
    spec = JobSpec.from_dict({"model": {"source": "comfy", "path": "/srv/ComfyUI/models/unet/wan.safetensors",
                                        "comfy": {"loras": [{"name": "styles/ink.safetensors", "strength": 0.8}],
                                                  "lora_dirs": ["/srv/ComfyUI/models/loras"],
                                                  "model_sampling": {"kind": "discrete_flow", "shift": 5.0,
                                                                     "multiplier": 1000.0}}},
                              "prompts": ["a"], "rewards": [{"name": "jpeg_compressibility"}]})
    comfy = shareable_spec(spec)["model"]["comfy"]
    assert comfy["loras"] == [{"name": "styles/ink.safetensors", "strength": 0.8}]
    assert "lora_dirs" not in comfy and comfy["model_sampling"]["shift"] == 5.0
