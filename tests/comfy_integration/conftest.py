"""Shared helpers for the tests against a REAL ComfyUI (tests/comfy_integration).

They run only when COMFYUI_PATH points at a ComfyUI checkout; otherwise every test here is skipped with
that reason (and a line on stderr). COMFYUI_PYTHON is the interpreter of ComfyUI's venv (default: this
one); it runs the server, and the child processes that import `comfy`.

Fixtures
  comfy_server   (module scope) `main.py --cpu` with this pack linked into a temporary custom_nodes
                 folder, its own jobs folder and output folder; yields a ComfyServer (url, log, tmp, http).
  tiny_flux      (session scope) a tiny Flux model file made from ComfyUI's own classes (random weights),
                 loaded by ComfyUI's loaders in a job child process and trained 2 iterations through the
                 `comfy` policy with the DEFAULT model settings (gradient checkpointing "auto", 512 x 512) on
                 the CPU; yields the paths of the model, the job folder and its kohya LoRA.
Helpers: the test modules here import them as `from comfy_itest import ...` (this conftest registers
itself under that name: plain `import conftest` would be ambiguous beside tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

COMFY = os.environ.get("COMFYUI_PATH")
COMFY_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.modules.setdefault("comfy_itest", sys.modules[__name__])
SKIP_REASON = "COMFYUI_PATH is not set: no real ComfyUI to test against"


def pytest_collection_modifyitems(config, items):
    if COMFY:
        return
    mine = [it for it in items if HERE in Path(str(it.fspath)).resolve().parents]
    if mine:
        print(f"tests/comfy_integration: skipped, {SKIP_REASON} (point it at a ComfyUI checkout)", file=sys.stderr)
    for it in mine:
        it.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, data=None, method=None, timeout=30):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def training_prompt(name: str, iterations: int = 2, reward: str = "jpeg_compressibility", seed: int = 1,
                    overrides: dict | None = None) -> dict:
    """API-format prompt: reward -> E-GRPO Train LoRA (embedded default model, CPU) -> PreviewAny(job id)."""
    spec = {"eval_prompts": ["a handwritten digit one"], "eval_seeds": [10000],
            "train": {"threads": 1, "checkpoint_every": 1}}
    for k, v in (overrides or {}).items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    return {
        "1": {"class_type": f"EGRPOReward_{reward}", "inputs": {"weight": 1.0}},
        "2": {"class_type": "EGRPOTrainLora", "inputs": {
            "source": "default", "reward": ["1", 0], "name": name, "preset": "egrpo", "iterations": iterations,
            "group_size": 2, "prompts_per_iteration": 1, "steps": 6, "shift": 3.0, "eta": 0.7, "tau": 2.2,
            "active": "0-1", "lr": 1e-3, "clip_range": 0.2, "lora_rank": 2, "seed": seed, "device": "cpu",
            "spec_overrides": json.dumps(spec)}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


def wait_history(url: str, prompt_id: str, timeout: float = 60) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        hist = http(f"{url}/api/history/{prompt_id}")
        if hist:
            return hist[prompt_id]
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


def wait_job(url: str, job_id: str, until=lambda j: j["status"] not in ("queued", "running", "created"),
             timeout: float = 300) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = http(f"{url}/api/egrpo/jobs/{job_id}")
        if until(job):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id}: {job}")


@dataclass
class ComfyServer:
    url: str
    log: Path
    tmp: Path
    proc: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def http(self, path, data=None, method=None, timeout=30):
        return http(self.url + path, data, method, timeout)


def start_server(tmp: Path, extra_yaml: dict | None = None, env: dict | None = None) -> ComfyServer:
    """ComfyUI `main.py --cpu` on a free port, loading only this pack (linked into tmp/custom_nodes)."""
    (tmp / "custom_nodes").mkdir(exist_ok=True)
    (tmp / "user").mkdir(exist_ok=True)  # a fresh user folder: settings as on a first start
    link = tmp / "custom_nodes" / "ComfyUI-EGRPO"
    if not link.exists():
        link.symlink_to(REPO)
    entries = {"custom_nodes": str(tmp / "custom_nodes"), **{k: v.format(tmp=tmp) for k, v in (extra_yaml or {}).items()}}
    for k, v in entries.items():
        Path(v).mkdir(parents=True, exist_ok=True)
    (tmp / "extra.yaml").write_text("egrpo_test:\n" + "".join(f"  {k}: {v}\n" for k, v in entries.items()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EGRPO_JOBS_DIR": str(tmp / "jobs"), **(env or {})}
    port = free_port()
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([COMFY_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--disable-api-nodes", "--disable-all-custom-nodes", "--whitelist-custom-nodes",
                                 "ComfyUI-EGRPO", "--extra-model-paths-config", str(tmp / "extra.yaml"),
                                 "--output-directory", str(tmp / "output"),
                                 "--user-directory", str(tmp / "user")],
                                cwd=COMFY, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 180
    while True:
        try:
            http(f"{url}/api/system_stats", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("ComfyUI exited: " + log_path.read_text(errors="replace")[-3000:])
            if time.time() > end:
                proc.kill()
                raise RuntimeError("ComfyUI did not start in 180 s: " + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
    return ComfyServer(url, log_path, tmp, proc)


def stop_server(server: ComfyServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory, request):
    """A ComfyUI server with the pack. A module may set COMFY_EXTRA_YAML ({category: folder}, "{tmp}" = the
    server's temporary folder) to register extra model folders."""
    tmp = tmp_path_factory.mktemp("comfy")
    server = start_server(tmp, getattr(request.module, "COMFY_EXTRA_YAML", None))
    yield server
    stop_server(server)


# ---- a tiny Flux model, made with ComfyUI's own classes, trained through the `comfy` policy ----

TINY_FLUX_CONFIG = {"image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16,
                    "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1,
                    "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000,
                    "qkv_bias": True, "patch_size": 2, "txt_ids_dims": []}

_MAKE_TINY_FLUX = r"""
import json, sys
sys.path.insert(0, sys.argv[1]); out = sys.argv[2]; config = json.loads(sys.argv[3]); sys.argv = [sys.argv[0], "--cpu"]
import torch
import comfy.options; comfy.options.enable_args_parsing()
import comfy.supported_models
from safetensors.torch import save_file
mc = comfy.supported_models.Flux(config); mc.set_inference_dtype(torch.float32, None)
model = mc.get_model({}, device="cpu")
torch.manual_seed(0)
sd = {k: (torch.randn_like(v) * 0.02).contiguous() for k, v in model.diffusion_model.state_dict().items()}
save_file(sd, out)
print(json.dumps({"params": sum(v.numel() for v in sd.values()), "tensors": len(sd)}))
"""


def run_comfy_python(code: str, *args, timeout: float = 600, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run `code` with ComfyUI's interpreter (the process imports comfy itself)."""
    return subprocess.run([COMFY_PYTHON, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or COMFY, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """Make a tiny Flux file, then train its LoRA 2 iterations through the comfy policy (child process)."""
    import torch

    tmp = tmp_path_factory.mktemp("tinyflux")
    model_path = tmp / "diffusion_models" / "tiny_flux.safetensors"
    model_path.parent.mkdir()
    made = run_comfy_python(_MAKE_TINY_FLUX, COMFY, model_path, json.dumps(TINY_FLUX_CONFIG))
    assert made.returncode == 0, made.stderr[-3000:]
    print("tiny Flux:", made.stdout.strip().splitlines()[-1])

    # The conds a real run would encode with ComfyUI's CLIP in the server process (random here: no text
    # encoders are needed by the child; written with the function nodes/train_nodes.py uses).
    sys.path.insert(0, str(REPO))
    from egrpo_backend.policies.comfy_conds import write_comfy_conds

    job = tmp / "job"
    job.mkdir()
    prompts = ["a red cube", "a blue ball", ""]
    g = torch.Generator().manual_seed(0)
    write_comfy_conds({p: [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
                       for p in prompts}, tmp / "conds.safetensors")
    # model settings as E-GRPO Train LoRA writes them, nothing forced: gradient checkpointing stays "auto"
    # (which must resolve to on for a comfy model even on the CPU: Flux blocks add residuals in place)
    spec = {"model": {"source": "comfy", "path": str(model_path),
                      "comfy": {"comfy_root": COMFY, "kind": "diffusion_model", "vae": "",
                                "cond_cache": str(tmp / "conds.safetensors")}},
            "prompts": prompts[:2], "rewards": [{"name": "jpeg_compressibility"}],
            "algorithm": {"steps": 6, "active": "0-1", "group_size": 2, "clip_range": 0.2},
            "train": {"iterations": 2, "prompts_per_iteration": 1, "lr": 1e-2, "device": "cpu", "threads": 2},
            "output": {"name": "tinyflux", "formats": ["kohya"]}}
    sys.path.insert(0, str(REPO))
    from egrpo_backend.jobs.run import create_job

    create_job(spec, job)
    t0 = time.time()
    run = subprocess.run([COMFY_PYTHON, "-m", "egrpo_backend", "run", str(job), "--quiet"], cwd=REPO,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    status = json.loads((job / "status.json").read_text())
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:], status)
    loras = sorted((job / "lora").glob("*.safetensors"))
    print(f"tiny Flux job: {status.get('status')} in {time.time() - t0:.0f} s; LoRA files {[p.name for p in loras]}")
    yield {"model": model_path, "job": job, "status": status, "lora": loras[0] if loras else None, "tmp": tmp}
