"""The prepared GPU measurement (issue: one GPU, any model): every step in one process, most important first,
under one wall-clock budget, one printed table at the end.

    python bench/scale_gpu.py --budget-seconds 510           # what bench/scale_gpu.sh runs on a GPU machine
    python bench/scale_gpu.py --tiny --device cpu --out DIR   # the same steps at tiny width (tests/test_scale_bench.py)

Steps (random weights at the published sizes, bench/scale_models.py; nothing downloaded):
  1. FLUX.1-dev fp8, 1024 px, egrpo_fast, diffusers path (bench/scale.py);
  2. Qwen-Image fp8, 1024 px, egrpo_fast, block swap: the blocks and batches the memory estimate fits on a
     24 GB card, run under a 24 GiB cap (torch.cuda.set_per_process_memory_fraction);
  3. FLUX.1-dev fp8, 1024 px, egrpo_fast, comfy path: the same random transformer saved as a diffusers-format
     file that ComfyUI's loader converts (needs COMFYUI_PATH; skipped with the reason otherwise);
  4. Wan 2.2 5B, 480 x 832 x 33 frames: the transformer alone (no-grad forward and forward + backward with
     gradient checkpointing and a LoRA; the trainer has no video family here), peak memory and seconds;
  5. FLUX.1-dev fp8, 1024 px, egrpo (the paper's plan), diffusers then comfy path;
  6. with 2+ GPUs: DDP and FSDP2 s/iteration at 1 and 2 ranks (bench/scale_out.py's jobs, on CUDA).
Each step gets what is left of the budget; bench/scale.py stops a configuration cleanly before the deadline,
and a step that does not start says so. Results: scale_gpu_<device>.json and .md in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import scale  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-seconds", type=float, default=510, help="all steps together (the bench stops before it)")
    ap.add_argument("--tiny", action="store_true", help="tiny widths, 64 px, 5 frames: a CPU check of every step")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--comfy-root", default=os.environ.get("COMFYUI_PATH", ""))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return ap.parse_args(argv)


def left(deadline: float) -> float:
    return deadline - time.perf_counter()


def scale_args(a, models: str, preset: str, res: int, out: Path, deadline: float, extra=()) -> list[str]:
    """bench/scale.py's arguments for one step; its budget is measured from its own START (the same import)."""
    args = ["--models", models, "--presets", preset, "--resolutions", str(res), "--iterations", "1",
            "--device", a.device, "--out", str(out), "--budget-seconds", f"{deadline - scale.START:.0f}",
            "--reward-offload", "auto", "--adapt-decode", *extra]
    if a.tiny:
        args += ["--tiny", "--group-size", "2", "--steps", "4", "--weight-dtype", "auto", "--micro-batch", "2",
                 "--rollout-batch", "2", "--decode-batch", "2"]
    return args


def write_comfy_file(a, device, out: Path) -> Path:
    """The random FLUX.1-dev transformer (fp8 blocks) as a diffusers-format safetensors file: ComfyUI's
    load_diffusion_model converts diffusers keys (comfy/model_detection.convert_diffusers_mmdit)."""
    from safetensors.torch import save_file
    from scale_models import MODELS, build_transformer, tiny_comfy_flux_card

    from egrpo_backend.dtypes import resolve_compute_dtype

    card = tiny_comfy_flux_card() if a.tiny else MODELS["flux-dev"]
    compute = resolve_compute_dtype("auto", device)
    storage = compute if a.tiny else torch.float8_e4m3fn
    model = build_transformer(card, None, device, compute, storage)
    path = out / "flux_random.safetensors"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, str(path))
    del model
    scale.free(device)
    return path


def video_transformer(a, device, deadline: float) -> dict:
    """Wan 2.2 5B at 480 x 832 x 33 frames (tiny: 64 x 64 x 5): the transformer's forward and update cost."""
    from scale_models import LARGE_FAMILIES, LargeFamily, materialise, tiny_config

    from egrpo_backend import lora
    from egrpo_backend.dtypes import resolve_compute_dtype

    family = LARGE_FAMILIES["wan2.2-5b"]
    frames, height, width = (5, 64, 64) if a.tiny else (33, 480, 832)
    if a.tiny:
        family = LargeFamily(**{**family.__dict__, "config": {**tiny_config(family.config, 1), "in_channels": 48, "out_channels": 48}})
    compute = resolve_compute_dtype("auto", device)
    storage = compute if a.tiny else torch.float8_e4m3fn
    from scale_models import large_family_on_meta

    model = materialise(large_family_on_meta(family, compute, storage), device).requires_grad_(False).eval()
    model.enable_gradient_checkpointing()
    lora.add_lora(model, lora.LoraSettings(rank=8), seed=0)
    latent = (1, 48, 1 + (frames - 1) // 4, height // 16, width // 16)  # Wan 2.2 VAE: 16x spatial, 4x temporal
    x = torch.randn(latent, device=device, dtype=compute)
    text = torch.randn(1, 8 if a.tiny else 512, family.config["text_dim"], device=device, dtype=compute)
    t = torch.full((1,), 500.0, device=device)
    record = {"model": "wan2.2-5b", "path": "transformer only", "preset": "-", "resolution": f"{height}x{width}x{frames}",
              "tokens": latent[2] * (latent[3] // 2) * (latent[4] // 2), "params": sum(p.numel() for p in model.parameters())}

    def timed(grad: bool) -> tuple[float, float | None]:
        best, peak = float("inf"), None
        for i in range(3):
            if left(deadline) < 20:
                break
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            scale.sync(device)
            t0 = time.perf_counter()
            with torch.set_grad_enabled(grad):
                v = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
                if grad:
                    v.float().square().mean().backward()
            scale.sync(device)
            if i:
                best = min(best, time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**30
        return best, peak

    record["forward_seconds"], record["forward_peak_gb"] = timed(False)
    record["update_seconds"], record["update_peak_gb"] = timed(True)
    if record["forward_seconds"] < float("inf") and record["update_seconds"] < float("inf"):
        record["update_cost_forwards"] = record["update_seconds"] / record["forward_seconds"]
    else:
        record["stopped"] = "budget"
    del model, x
    scale.free(device)
    return record


def qwen_24gb_args() -> list[str]:
    """Qwen-Image 1024 px as the memory estimate fits it on a 24 GB card (blocks to swap and batches, from
    bench/results/memory_estimates.json), run under a 24 GiB cap so that fitting is measured, not assumed."""
    import memory_estimate

    rows = memory_estimate.load_rows(ROOT / "bench" / "results" / "memory_estimates.json")
    best = memory_estimate.best_on_card([r for r in rows if (r["model"], r["resolution"]) == ("qwen-image", 1024)], 24)
    r = best["row"]
    return ["--offload-blocks", str(best["swap"]), "--memory-cap-gb", "24", "--rollout-batch", str(r["rollout_batch"]),
            "--micro-batch", str(r["micro_batch"]), "--decode-batch", str(r["decode_batch"])]


def multi_gpu(a, deadline: float) -> list[dict]:
    """DDP and FSDP2 at 1 and 2 ranks (bench/scale_out.py's job on CUDA) when 2+ GPUs are present."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return [{"model": "default (scale_out)", "path": "ddp / fsdp", "preset": "egrpo", "resolution": "-",
                 "skipped": f"{n} GPU(s): DDP / FSDP2 need 2+"}]
    import scale_out

    rows = []
    for ranks, parallel in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        if left(deadline) < 60:
            rows.append({"model": "default (scale_out)", "path": parallel, "ranks": ranks, "skipped": "budget"})
            continue
        r = scale_out.timing(ranks, 4, parallel, device="cuda")
        rows.append({"model": "default (scale_out)", "path": r["parallel"], "preset": "egrpo", "resolution": "-", **r})
    return rows


SHARED: dict = {}  # the VAE and the CLIP-H reward, built once for all steps


def run_scale(argv: list[str], tag: str) -> list[dict]:
    out = scale.main(argv, SHARED)["results"]
    for r in out:
        r["path"] = "comfy" if r["model"] == "comfy" else "diffusers"
        r["step"] = tag
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    from egrpo_backend.atomic import atomic_write_json, atomic_write_text
    from egrpo_backend.policies import resolve_device

    device = resolve_device(a.device)
    a.device = str(device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "scale_gpu_steps"
    work.mkdir(exist_ok=True)
    deadline = START + a.budget_seconds
    res = 64 if a.tiny else 1024
    results: list[dict] = []

    def step(name: str, fn):
        print(f"=== {name} ({left(deadline):.0f} s left)", flush=True)
        if left(deadline) < 30:
            results.append({"step": name, "model": name, "skipped": f"budget: {left(deadline):.0f} s left"})
            return
        try:
            got = fn()
            got = got if isinstance(got, list) else [got]
            results.extend({"step": name, **r} for r in got)
        except Exception as e:  # one step failing must not lose the others
            results.append({"step": name, "model": name, "error": f"{type(e).__name__}: {e}"[:500],
                            "traceback": traceback.format_exc()[-2000:]})
            scale.free(device)

    comfy_file: dict = {}

    def comfy(preset):
        extra = ["--comfy-root", a.comfy_root, "--comfy-model", str(comfy_file.get("path", ""))]
        if a.comfy_root and "path" not in comfy_file:
            comfy_file["path"] = write_comfy_file(a, device, work)
            extra[-1] = str(comfy_file["path"])
        return run_scale(scale_args(a, "comfy", preset, res, work / f"comfy_{preset}", deadline, extra), f"comfy {preset}")

    step("flux-dev egrpo_fast", lambda: run_scale(scale_args(a, "flux-dev", "egrpo_fast", res, work / "flux_fast", deadline), "flux egrpo_fast"))
    step("qwen-image swap", lambda: run_scale(scale_args(a, "qwen-image", "egrpo_fast", res, work / "qwen_swap", deadline,
                                                         ["--offload-blocks", "1"] if a.tiny else qwen_24gb_args()), "qwen swap"))
    step("comfy egrpo_fast", lambda: comfy("egrpo_fast"))
    step("wan2.2-5b", lambda: video_transformer(a, device, deadline))
    if a.tiny:  # the same code path as egrpo_fast with another preset: not worth a CPU test's time
        results += [{"step": n, "model": n, "skipped": "tiny: the same path as egrpo_fast"} for n in ("flux-dev egrpo", "comfy egrpo")]
    else:
        step("flux-dev egrpo", lambda: run_scale(scale_args(a, "flux-dev", "egrpo", res, work / "flux_egrpo", deadline), "flux egrpo"))
        step("comfy egrpo", lambda: comfy("egrpo"))
    SHARED.clear()
    scale.free(device)
    step("ddp / fsdp", lambda: multi_gpu(a, deadline))

    name = scale.device_name(device)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0, "tiny": a.tiny,
            "budget_seconds": a.budget_seconds, "wall_seconds": time.perf_counter() - START, "torch": torch.__version__}
    atomic_write_json(out / f"scale_gpu_{name}.json", {"meta": meta, "results": results})
    table = markdown(results, meta)
    atomic_write_text(out / f"scale_gpu_{name}.md", table)
    print(table)
    return {"meta": meta, "results": results}


def _f(x, fmt=".1f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# bench/scale_gpu.py on {meta['device']} ({meta['gpus']} GPU(s){', tiny widths' if meta['tiny'] else ''})", "",
             "Random weights at the published sizes. Peak GB per phase: torch.cuda.max_memory_allocated. Overhead: wall "
             "over the pure model cost with an update sample at its measured forward + backward (old accounting in brackets).", "",
             "| model | path | preset | shape | swap (host GB) | s / iter | overhead | update = fwd | rollout GB | decode GB "
             "| reward GB | update GB | note |", "|" + " --- |" * 13]
    for r in results:
        note = r.get("skipped") or r.get("error") or r.get("stopped") or ""
        ph = r.get("phases", {})
        peak = lambda k: _f(ph.get(k, {}).get("peak_mem_gb")) if ph else "-"  # noqa: E731
        if r.get("path") == "transformer only":
            lines.append(f"| {r['model']} | transformer only | - | {r['resolution']} ({r['tokens']} tokens) | - | "
                         f"fwd {_f(r.get('forward_seconds'), '.2f')} s, fwd+bwd {_f(r.get('update_seconds'), '.2f')} s | - | "
                         f"{_f(r.get('update_cost_forwards'))} | {_f(r.get('forward_peak_gb'))} | - | - | {_f(r.get('update_peak_gb'))} | {note} |")
            continue
        if "ranks" in r and "seconds_per_iteration" in r:
            lines.append(f"| {r['model']} | {r['path']} x {r['ranks']} | egrpo | - | - | {r['seconds_per_iteration']:.2f} | - | - "
                         f"| - | - | - | - | comm share {_f(r.get('comm_share'), '.2f')} |")
            continue
        swap = f"{r.get('offload_blocks', 0)} ({r.get('host_blocks_gb', 0):.1f})" if r.get("offload_blocks") else "0"
        if not r.get("iterations_done"):
            lines.append(f"| {r.get('model')} | {r.get('path', '-')} | {r.get('preset', '-')} | {r.get('resolution', '-')} | | | | | | | | | "
                         f"{note or 'not run'} |")
            continue
        lines.append(f"| {r['model']} | {r['path']} | {r['preset']} | {r['resolution']} | {swap} | {r['seconds_per_iteration']:.1f} "
                     f"| {r['overhead_ratio']:.2f} ({r['overhead_ratio_update_as_one']:.2f}) | {r['update_cost_forwards']:.1f} "
                     f"| {peak('rollout')} | {peak('decode')} | {peak('reward')} | {peak('update')} | "
                     f"{json.dumps(r.get('adapted')) if r.get('adapted') else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
