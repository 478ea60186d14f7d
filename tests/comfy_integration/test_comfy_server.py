"""Against a REAL ComfyUI server (runs only when COMFYUI_PATH points at a ComfyUI checkout; skipped
with the reason otherwise). COMFYUI_PYTHON is the interpreter of ComfyUI's venv (default: this one).

Starts `main.py --cpu` with this pack linked into a temporary custom_nodes folder, checks that the
pack imports without errors and its routes answer, then queues a training workflow (embedded
default model) through POST /prompt: the prompt returns at once, the background job finishes, and
its LoRA appears in the core LoraLoader's list.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH")
if not COMFY:
    print("tests/comfy_integration: skipped, COMFYUI_PATH is not set (point it at a ComfyUI checkout)", file=sys.stderr)
pytestmark = pytest.mark.skipif(not COMFY, reason="COMFYUI_PATH is not set: no real ComfyUI to test against")
REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, data=None, method=None, timeout=30):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy")
    (tmp / "custom_nodes").mkdir()
    (tmp / "custom_nodes" / "ComfyUI-EGRPO").symlink_to(REPO)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EGRPO_JOBS_DIR": str(tmp / "jobs")}
    (tmp / "extra.yaml").write_text(f"egrpo_test:\n  custom_nodes: {tmp / 'custom_nodes'}\n")
    port = _port()
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
                             "--port", str(port), "--disable-api-nodes", "--disable-all-custom-nodes",
                             "--whitelist-custom-nodes", "ComfyUI-EGRPO", "--extra-model-paths-config",
                             str(tmp / "extra.yaml"), "--output-directory", str(tmp / "output")],
                            cwd=COMFY, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            http(f"{url}/api/system_stats", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((tmp / "server.log").read_text()[-3000:])
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("ComfyUI did not start in 120 s: " + (tmp / "server.log").read_text()[-3000:])
    yield {"url": url, "log": tmp / "server.log", "tmp": tmp}
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def test_pack_loads_without_import_errors(server):
    text = server["log"].read_text(errors="replace")
    assert "IMPORT FAILED" not in text, text[-3000:]
    info = http(f"{server['url']}/api/object_info")
    ours = sorted(k for k in info if k.startswith("EGRPO"))
    print("E-GRPO nodes registered:", ours)
    assert {"EGRPOSampler", "EGRPOEntropyPlan", "EGRPOTrainLora", "EGRPOJob", "EGRPOGroupPreview"} <= set(ours)
    assert all(info[k]["category"].startswith("E-GRPO") for k in ours)
    assert http(f"{server['url']}/api/egrpo/jobs")["jobs"] == []


def test_training_workflow_queues_at_once_and_lora_is_listed(server):
    url, name = server["url"], f"itest_{uuid.uuid4().hex[:6]}"
    overrides = {"eval_prompts": ["a handwritten digit one"], "eval_seeds": [10000],
                 "train": {"threads": 1, "device": "cpu", "checkpoint_every": 1}}
    prompt = {
        "1": {"class_type": "EGRPOReward_jpeg_compressibility", "inputs": {"weight": 1.0}},
        "2": {"class_type": "EGRPOTrainLora", "inputs": {
            "source": "default", "reward": ["1", 0], "name": name, "preset": "egrpo", "iterations": 2, "group_size": 2,
            "prompts_per_iteration": 1, "steps": 6, "shift": 3.0, "eta": 0.7, "tau": 2.2, "active": "0-1", "lr": 1e-3,
            "clip_range": 0.2, "lora_rank": 2, "seed": 1, "spec_overrides": json.dumps(overrides)}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    t0 = time.time()
    res = http(f"{url}/api/prompt", {"prompt": prompt, "client_id": "itest"})
    assert "prompt_id" in res, res
    for _ in range(120):  # the prompt (not the job) finishes within seconds
        hist = http(f"{url}/api/history/{res['prompt_id']}")
        if hist:
            break
        time.sleep(0.25)
    queued_in = time.time() - t0
    entry = hist[res["prompt_id"]]
    assert entry["status"]["status_str"] == "success", entry["status"]
    job_id = entry["outputs"]["3"]["text"][0]
    print(f"prompt executed in {queued_in:.1f} s; job {job_id}")
    assert queued_in < 20
    for _ in range(600):
        job = http(f"{url}/api/egrpo/jobs/{job_id}")
        if job["status"] not in ("queued", "running", "created"):
            break
        time.sleep(0.5)
    assert job["status"] == "finished", job
    print("job:", {k: job[k] for k in ("status", "iteration", "total", "lora", "lora_name")})
    loras = http(f"{url}/api/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"]
    options = loras[0] if isinstance(loras[0], list) else loras[1].get("options", [])
    assert job["lora_name"] in options, (job["lora_name"], options)
    # re-queuing the same graph finds the same job instead of starting another
    res2 = http(f"{url}/api/prompt", {"prompt": prompt, "client_id": "itest"})
    time.sleep(2)
    assert len(http(f"{url}/api/egrpo/jobs")["jobs"]) == 1
    Path(job["lora"]).unlink(missing_ok=True)
