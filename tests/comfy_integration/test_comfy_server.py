"""Against a REAL ComfyUI server (runs only when COMFYUI_PATH points at a ComfyUI checkout; skipped
with the reason otherwise). COMFYUI_PYTHON is the interpreter of ComfyUI's venv (default: this one).

Starts `main.py --cpu` with this pack linked into a temporary custom_nodes folder (conftest.py), checks
that the pack imports without errors, its nodes are described (descriptions, input and output tooltips, the
Prompt List's file a choice from the input folder) and its routes answer, then queues a training workflow
(embedded default model) through POST /prompt: the prompt returns at once, the background job finishes, and
its LoRA stays in the job folder, out of the core LoraLoader's list (no ComfyUI model can load it). Last, a LoRA trained through the `comfy` policy (tiny Flux,
conftest.py) is applied by the server's core UNETLoader -> LoraLoaderModelOnly with no
"lora key not loaded" in the server log.
"""

import json
import shutil
import time
import uuid
from pathlib import Path

from comfy_itest import training_prompt, wait_history, wait_job


def test_pack_loads_without_import_errors(comfy_server):
    text = comfy_server.log_text()
    assert "IMPORT FAILED" not in text, text[-3000:]
    info = comfy_server.http("/api/object_info")
    ours = sorted(k for k in info if k.startswith("EGRPO"))
    print("E-GRPO nodes registered:", ours)
    assert {"EGRPOSampler", "EGRPOEntropyPlan", "EGRPOTrainLora", "EGRPOJob", "EGRPOGroupPreview"} <= set(ours)
    assert all(info[k]["category"].startswith("E-GRPO") for k in ours)
    for k in ours:
        assert info[k]["description"], k
        assert all(info[k]["output_tooltips"]), (k, info[k]["output_tooltips"])
    file_input = info["EGRPOPromptList"]["input"]["required"]["file"]
    assert file_input[0] == "COMBO" and file_input[1]["options"][0] == "(none)", file_input
    train = {**info["EGRPOTrainLora"]["input"]["required"], **info["EGRPOTrainLora"]["input"]["optional"]}
    assert train["width"][0] == "INT" and train["height"][1]["default"] == 512
    assert comfy_server.http("/api/egrpo/jobs")["jobs"] == []


def _lora_options(server):
    loras = server.http("/api/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"]
    return loras[0] if isinstance(loras[0], list) else loras[1].get("options", [])


def test_training_workflow_queues_at_once_and_digits_lora_stays_out_of_the_lora_list(comfy_server):
    url, name = comfy_server.url, f"itest_{uuid.uuid4().hex[:6]}"
    prompt = training_prompt(name, iterations=2)
    t0 = time.time()
    res = comfy_server.http("/api/prompt", {"prompt": prompt, "client_id": "itest"})
    assert "prompt_id" in res, res
    entry = wait_history(url, res["prompt_id"], timeout=30)  # the prompt (not the job) finishes within seconds
    queued_in = time.time() - t0
    assert entry["status"]["status_str"] == "success", entry["status"]
    job_id = entry["outputs"]["3"]["text"][0]
    print(f"prompt executed in {queued_in:.1f} s; job {job_id}")
    assert queued_in < 20
    job = wait_job(url, job_id, timeout=300)
    assert job["status"] == "finished", job
    print("job:", {k: job[k] for k in ("status", "iteration", "total", "lora", "lora_name")})
    assert Path(job["lora"]).is_file() and job["lora_name"] is None, job
    assert not any(name in option for option in _lora_options(comfy_server)), _lora_options(comfy_server)
    # re-queuing the same graph finds the same job instead of starting another
    comfy_server.http("/api/prompt", {"prompt": prompt, "client_id": "itest"})
    time.sleep(2)
    assert len(comfy_server.http("/api/egrpo/jobs")["jobs"]) == 1


def _apply_lora(server, unet_name, lora_name):
    """UNETLoader -> LoraLoaderModelOnly -> PreviewAny; returns (history entry, the server log it wrote)."""
    before = len(server.log_text())
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                               "strength_model": 1.0}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    res = server.http("/api/prompt", {"prompt": prompt, "client_id": "itest"})
    assert "prompt_id" in res, res
    entry = wait_history(server.url, res["prompt_id"], timeout=120)
    time.sleep(0.5)  # let the log catch up
    return entry, server.log_text()[before:]


def test_comfy_policy_lora_applies_in_server_without_unloaded_keys(comfy_server, tiny_flux):
    """The kohya LoRA of a comfy-policy job, through the server's own UNETLoader + LoraLoaderModelOnly."""
    models = comfy_server.tmp / "models"
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (models / "loras" / "itest").mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_flux["model"], models / "diffusion_models" / "egrpo_tiny_flux.safetensors")
    shutil.copy(tiny_flux["lora"], models / "loras" / "itest" / "tinyflux.safetensors")
    # the server was started with these folders registered (COMFY_EXTRA_YAML below)
    assert "itest/tinyflux.safetensors" in _lora_options(comfy_server)
    entry, log = _apply_lora(comfy_server, "egrpo_tiny_flux.safetensors", "itest/tinyflux.safetensors")
    assert entry["status"]["status_str"] == "success", entry["status"]
    print("server log while applying the LoRA:\n" + log.strip()[-1500:])
    assert "lora key not loaded" not in log, log[-3000:]

    # control: the same LoRA with bare names loads nothing, and the server log says so (so the check sees it)
    from safetensors.torch import load_file, save_file

    bare = {k.replace("lora_unet_", ""): v for k, v in load_file(str(tiny_flux["lora"])).items()}
    save_file(bare, str(models / "loras" / "itest" / "bare.safetensors"))
    entry, log = _apply_lora(comfy_server, "egrpo_tiny_flux.safetensors", "itest/bare.safetensors")
    assert "lora key not loaded" in log, log[-3000:]


# extra model folders for the server of this module (conftest's comfy_server reads this)
COMFY_EXTRA_YAML = {"diffusion_models": "{tmp}/models/diffusion_models", "loras": "{tmp}/models/loras"}


def _queue_error(server, prompt) -> str:
    """Queue a prompt that must fail in our node; returns the execution error's message."""
    res = server.http("/api/prompt", {"prompt": prompt, "client_id": "itest"})
    assert "prompt_id" in res, res
    entry = wait_history(server.url, res["prompt_id"], timeout=60)
    assert entry["status"]["status_str"] == "error", entry["status"]
    return json.dumps(entry["status"]["messages"])


def test_node_refuses_bad_prompts_and_overrides_before_a_job_exists(comfy_server):
    """In the real server: a prompt the embedded digits model cannot use, and an override of a key the node
    sets from an input, fail in the node (execution error naming the fix); no job folder appears."""
    before = {j["id"] for j in comfy_server.http("/api/egrpo/jobs")["jobs"]}
    prompt = training_prompt(f"itest_{uuid.uuid4().hex[:6]}", reward="digit_probability")
    prompt["4"] = {"class_type": "EGRPOPromptList", "inputs": {"prompts": "a red cube", "file": "(none)"}}
    prompt["2"]["inputs"]["prompts"] = ["4", 0]
    text = _queue_error(comfy_server, prompt)
    assert "names no digit" in text and "exactly one digit" in text, text
    prompt = training_prompt(f"itest_{uuid.uuid4().hex[:6]}", overrides={"train": {"iterations": 3}})
    text = _queue_error(comfy_server, prompt)
    assert "train.iterations, which the node sets from its iterations input" in text, text
    assert {j["id"] for j in comfy_server.http("/api/egrpo/jobs")["jobs"]} == before
