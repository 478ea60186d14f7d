"""Scale benchmark: E-GRPO iterations on full-size FLUX.1-dev / SD3.5 / Qwen-Image architectures.

Random weights from the published configs (bench/scale_models.py), materialised in their storage
dtype on the device; a full-size 16-channel VAE and a random CLIP ViT-H/14 reward (offloaded to the
CPU between scores); random conds of a real prompt's shapes in place of the text encoders. Each
configuration (model, preset, resolution) runs `--iterations` E-GRPO iterations through the real
Trainer (egrpo_backend.jobs.build.build_trainer) and records, per phase (rollout, decode, reward, update),
seconds and peak device memory, plus seconds per iteration, NFE per second, the first-step ratio
deviation, and the overhead ratio: wall time over the pure model cost of the iteration's own calls,
where every sample through a no-grad forward costs one measured forward (per sample, at the rollout
batch) and every sample through a forward with grad (the update) costs its measured forward + backward
(`update_cost_forwards` forwards: about 3-4 with gradient checkpointing; `overhead_ratio`). Samples are
counted by wrapping policy.velocity, so reference forwards without grad count as forwards. The old
accounting, which counted an update sample as one forward, is kept as `overhead_ratio_update_as_one`.

    python bench/scale.py                                   # the GPU run: see bench/scale_gpu.sh
    python bench/scale.py --depth 1 --resolutions 128 --group-size 2 --steps 4 --iterations 1   # CPU smoke

Configurations run most important first (FLUX.1-dev fp8: egrpo_fast 1024, egrpo 512, egrpo 1024;
then SD3.5-large, SD3.5-medium, Qwen-Image; the comfy path last). Results are rewritten after every
configuration (`--out`: scale_<device>.json and .md); `--budget-seconds` skips what would not finish
in time (predicted from a measured forward, then from the previous iteration) and stops cleanly.
"""

from __future__ import annotations

import argparse
import gc
import json
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

from scale_models import (  # noqa: E402
    MODELS, RandomConds, available, build_clip_h_reward, build_transformer, build_vae, tiny_card, tiny_comfy_flux_card)

PRESETS = ("egrpo_fast", "egrpo")
RESOLUTIONS = (1024, 512)
# Within a model: what matters most first (the paper's preset at 512 is the cheap reference point).
ORDER_IN_MODEL = [("egrpo_fast", 1024), ("egrpo", 512), ("egrpo", 1024), ("egrpo_fast", 512)]
PHASES = ("rollout", "decode", "reward", "update")
PROMPT = "a photograph of a red fox in a snowy forest at dawn"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="flux-dev,sd3.5-large,sd3.5-medium,qwen-image,comfy",
                    help=f"comma list of {', '.join(MODELS)}, comfy (ComfyUI's loader on --comfy-model; skipped without ComfyUI)")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)), help="image sides in pixels (multiples of 16)")
    ap.add_argument("--depth", type=int, default=0, help="blocks of each kind (0 = the published depth), at full width")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8, help="G")
    ap.add_argument("--granularities", default="1", help="ODE finish grids (1 = the paper's E-GRPO, 672 NFE per prompt; "
                    "the authors' code adds 2, about twice the rollout cost)")
    ap.add_argument("--steps", type=int, default=16, help="sampling steps T (active steps: the first half, as the paper)")
    ap.add_argument("--weight-dtype", default="float8_e4m3fn", help="storage dtype of the transformer's blocks")
    ap.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"), help="auto: on for CUDA")
    ap.add_argument("--micro-batch", type=int, default=4, help="train.micro_batch (units per forward with grad)")
    ap.add_argument("--rollout-batch", type=int, default=8, help="train.rollout_batch")
    ap.add_argument("--decode-batch", type=int, default=4, help="train.decode_batch (images per VAE decode / reward call)")
    ap.add_argument("--text-tokens", type=int, default=0, help="text cond length (0 = a real prompt's, e.g. 512 for FLUX)")
    ap.add_argument("--budget-seconds", type=float, default=0, help="stop before this much wall time (0 = no limit)")
    ap.add_argument("--offload-blocks", default="0", help="model.offload_blocks: blocks kept on the host (block swap), or auto")
    ap.add_argument("--reward-offload", default="on", choices=("on", "off", "auto"),
                    help="CLIP-H reward between scores: on the host (on), on the device (off), or decided after the "
                         "first iteration from the measured peaks (auto; egrpo_backend/jobs/memory_plan.py)")
    ap.add_argument("--adapt-decode", action="store_true", help="after the first iteration, raise train.decode_batch "
                    "to what the measured decode peak allows (memory_plan.chunk_size)")
    ap.add_argument("--memory-cap-gb", type=float, default=0, help="CUDA: cap this process's device memory at this "
                    "many GiB (torch.cuda.set_per_process_memory_fraction), to show a configuration fits a smaller card")
    ap.add_argument("--tiny", action="store_true", help="every model at tiny width and depth 1 (CPU tests of this script)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--comfy-root", default="", help="ComfyUI folder for the comfy configuration")
    ap.add_argument("--comfy-model", default="", help="a diffusion model file (e.g. flux1-dev-fp8.safetensors) for the comfy configuration")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return ap.parse_args(argv)


def configurations(args) -> list[tuple[str, str, int]]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    for m in models:
        if m not in MODELS and m != "comfy":
            raise SystemExit(f"--models: unknown model {m!r}; valid: {', '.join(MODELS)}, comfy")
    for r in resolutions:
        if r % 16:
            raise SystemExit(f"--resolutions: {r} is not a multiple of 16 (8-px latents in 2x2 patches)")

    def rank(cfg):
        model, preset, res = cfg
        within = ORDER_IN_MODEL.index((preset, res)) if (preset, res) in ORDER_IN_MODEL else len(ORDER_IN_MODEL)
        return models.index(model) + (len(models) if model == "comfy" else 0), within, -res
    return sorted([(m, p, r) for m in models for p in presets for r in resolutions], key=rank)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip().replace(" ", "_")
    return "cpu"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def spec_for(args, card_family: str, preset: str, device: torch.device):
    from egrpo_backend.config import JobSpec

    return JobSpec.from_dict({
        "model": {"source": "diffusers", "path": "(random weights: bench/scale.py)", "family": card_family},
        "prompts": [PROMPT], "rewards": [{"name": "jpeg_compressibility"}],  # the bench passes its own reward
        "algorithm": {"preset": preset, "group_size": args.group_size, "steps": args.steps, "active": "first_half",
                      "granularities": [int(g) for g in args.granularities.split(",")]},
        "train": {"iterations": args.iterations, "prompts_per_iteration": 1, "device": str(device), "evaluate": False,
                  "micro_batch": args.micro_batch, "rollout_batch": args.rollout_batch, "decode_batch": args.decode_batch},
    })


def forward_seconds(policy, batch: int, repeats: int = 2) -> float:
    """Seconds of one no-grad forward of `batch` samples (best of `repeats`, after a warm-up)."""
    x = torch.randn(batch, *policy.latent_shape, device=policy.device)
    sigma = torch.full((batch,), 0.5, device=policy.device)
    cond = policy.encode([PROMPT] * batch)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            sync(policy.device)
            t0 = time.perf_counter()
            policy.velocity(x, sigma, cond)
            sync(policy.device)
            if i:
                best = min(best, time.perf_counter() - t0)
    return best


def update_seconds_per_sample(policy, batch: int, repeats: int = 2) -> float:
    """Seconds per sample of one forward + backward with grad (the update's call), best of `repeats`."""
    x = torch.randn(batch, *policy.latent_shape, device=policy.device)
    sigma = torch.full((batch,), 0.5, device=policy.device)
    cond = policy.encode([PROMPT] * batch)
    params = policy.trainable_parameters()
    best = float("inf")
    for i in range(repeats + 1):
        sync(policy.device)
        t0 = time.perf_counter()
        policy.velocity(x, sigma, cond).float().square().mean().backward()
        sync(policy.device)
        if i:
            best = min(best, time.perf_counter() - t0)
    for p in params:
        p.grad = None
    return best / batch


def overhead_ratio(seconds: float, samples_no_grad: int, samples_grad: int, forward_per_sample: float,
                   update_cost_forwards: float) -> float:
    """Wall time over the pure model cost: a no-grad sample costs one forward, a sample with grad costs
    `update_cost_forwards` forwards (its measured forward + backward). 1.0 = nothing but model calls."""
    return seconds / (forward_per_sample * (samples_no_grad + update_cost_forwards * samples_grad))


class CallCounter:
    """Counts samples through policy.velocity with and without grad (installed on the policy instance)."""

    def __init__(self, policy):
        self.no_grad = self.grad = 0
        inner = policy.velocity

        def counted(x, sigma, cond):
            if torch.is_grad_enabled():
                self.grad += x.shape[0]
            else:
                self.no_grad += x.shape[0]
            return inner(x, sigma, cond)
        policy.velocity = counted

    def take(self) -> tuple[int, int]:
        out = (self.no_grad, self.grad)
        self.no_grad = self.grad = 0
        return out


def predicted_iteration_seconds(trainer, per_sample: float) -> float:
    """One iteration from the measured forward: rollout NFE + 4x the update's (forward, recompute, backward)."""
    from egrpo_backend.method.algorithms import branch_starts
    from egrpo_backend.method.randomness import stream_generator
    from egrpo_backend.method.rollout import expected_nfe

    algo = trainer.algo
    starts = branch_starts(algo, trainer.plan, 0, stream_generator(0, "branch", 0))
    rollout = expected_nfe(trainer.plan, starts, algo.group_size, algo.granularities, algo.sde_window,
                           algo.shared_initial_noise, algo.guidance_scale, algo.granularity_grid,
                           trainer.plan.active[-1] if algo.window_within_active else None)
    update = algo.group_size * len(starts) * max(1, algo.sde_window)
    return per_sample * (rollout + 4 * update) * 1.15  # + decode, reward, SDE and optimizer


def bench_policy(card, args, device, compute, storage, res):
    from egrpo_backend.policies.diffusers_policy import DiffusersPolicy

    ckpt = args.checkpointing == "on" or (args.checkpointing == "auto" and device.type == "cuda")
    transformer = build_transformer(card, args.depth or None, device, compute, storage)
    latent = (16, res // 8, res // 8)
    offload = args.offload_blocks if args.offload_blocks == "auto" else int(args.offload_blocks)
    return DiffusersPolicy(transformer, RandomConds(card, compute, args.text_tokens or None), latent, vae=None,
                           family=card.family, device=device, dtype=compute, weight_dtype=storage,
                           gradient_checkpointing=ckpt or offload != 0, offload_blocks=offload)


def comfy_skip_reason(args) -> str | None:
    if not args.comfy_root:
        return "ComfyUI is not available here (give --comfy-root and --comfy-model to run the comfy path)"
    try:
        sys.path.insert(0, args.comfy_root)
        import comfy  # noqa: F401
    except ImportError as e:
        return f"cannot import comfy from --comfy-root {args.comfy_root!r}: {e}"
    if not Path(args.comfy_model).is_file():
        return f"--comfy-model {args.comfy_model!r} is not a file (a FLUX diffusion model file, e.g. flux1-dev-fp8.safetensors)"
    return None


def comfy_policy(args, device, compute, res, out_dir: Path):
    """The comfy path on a real model file: ComfyUI's loader and casting ops, random conds in the node's cache format."""
    from egrpo_backend.atomic import atomic_save_safetensors
    from egrpo_backend.config import ComfySpec, ModelSpec
    from egrpo_backend.policies.comfy_policy import load_comfy_policy

    cache = out_dir / "comfy_conds.safetensors"
    card = tiny_comfy_flux_card() if args.tiny else MODELS["flux-dev"]
    prompts = [PROMPT, ""]  # the trainer also encodes the (empty) negative prompt
    conds = RandomConds(card, torch.float32, args.text_tokens or None)(prompts)
    tensors = {}
    for i in range(len(prompts)):  # [1, tokens, dim] per prompt, as the Train node writes them
        tensors[f"cond.{i}"] = conds["encoder_hidden_states"][i : i + 1]
        tensors[f"pooled.{i}"] = conds["pooled_projections"][i : i + 1]
    atomic_save_safetensors(tensors, cache, {"prompts": json.dumps(prompts)})
    spec = ModelSpec(source="comfy", path=args.comfy_model, weight_dtype="auto",
                     comfy=ComfySpec(comfy_root=args.comfy_root, cond_cache=str(cache), width=res, height=res))
    return load_comfy_policy(spec, device, compute, gradient_checkpointing=True)


def run_config(args, model: str, preset: str, res: int, device, compute, storage, shared: dict, deadline: float | None,
               out_dir: Path) -> dict:
    from egrpo_backend.jobs.build import build_trainer
    from egrpo_backend.policies.weight_storage import bytes_by_dtype
    from egrpo_backend.rewards import WeightedRewards

    record = {"model": model, "preset": preset, "resolution": res, "group_size": args.group_size, "steps": args.steps,
              "depth": args.depth or "full", "storage_dtype": str(storage).removeprefix("torch."),
              "compute_dtype": str(compute).removeprefix("torch."), "micro_batch": args.micro_batch,
              "rollout_batch": args.rollout_batch, "decode_batch": args.decode_batch, "iterations_requested": args.iterations}
    card = MODELS.get(model)
    if model == "comfy":
        reason = comfy_skip_reason(args)
        if reason:
            return {**record, "skipped": reason}
        card = MODELS["flux-dev"]
    elif not available(card):
        return {**record, "skipped": f"this diffusers has no {card.cls}"}
    card = tiny_card(card) if args.tiny else card
    t0 = time.perf_counter()
    if args.memory_cap_gb and device.type == "cuda":  # an allocation past the cap raises out of memory, as on that card
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), device)
        record["memory_cap_gb"] = args.memory_cap_gb
    if "vae" not in shared or shared["vae_card"] != card.name:
        shared.pop("vae", None)
        free(device)
        shared["vae"], shared["vae_card"] = build_vae(card, device, compute), card.name
    if "reward" not in shared:
        shared["reward"] = build_clip_h_reward(device, compute, args.depth or (1 if args.tiny else None),
                                               offload=device.type == "cuda" and args.reward_offload != "off")
    if args.reward_offload == "auto" and device.type == "cuda":  # every configuration decides afresh
        shared["reward"].offload = True
        shared["reward"].model.to("cpu")
    policy = comfy_policy(args, device, compute, res, out_dir) if model == "comfy" else bench_policy(card, args, device, compute, storage, res)
    if model != "comfy":
        policy.vae = shared["vae"]
    sync(device)
    record.update(setup_seconds=time.perf_counter() - t0, text_cond=[args.text_tokens or card.text_tokens, card.text_dim],
                  pooled_cond=card.pooled_dim)
    base = policy.lora_model()
    record["params"] = sum(p.numel() for p in base.parameters())
    record["weight_bytes_by_dtype"] = bytes_by_dtype(base)
    record["weights_gb"] = sum(record["weight_bytes_by_dtype"].values()) / 2**30
    swap = getattr(policy, "block_swap", None)
    record["offload_blocks"] = len(swap.names) if swap is not None else 0
    record["host_blocks_gb"] = swap.host_bytes / 2**30 if swap is not None else 0.0
    batch = min(args.rollout_batch, args.group_size)
    per_sample = forward_seconds(policy, batch) / batch
    record.update(forward_batch=batch, forward_seconds_per_sample=per_sample)
    trainer = build_trainer(spec_for(args, card.family, preset, device), policy=policy,
                            reward=WeightedRewards([shared["reward"]], [1.0]))
    record["lora_params"] = sum(p.numel() for p in trainer.policy.trainable_parameters())
    update_batch = min(args.micro_batch, args.group_size)
    record["update_seconds_per_sample"] = update_seconds_per_sample(trainer.policy, update_batch)
    record.update(update_batch=update_batch, update_cost_forwards=record["update_seconds_per_sample"] / per_sample)
    calls = CallCounter(trainer.policy)
    if device.type == "cuda":
        record["device_allocated_gb_before_training"] = torch.cuda.memory_allocated(device) / 2**30
    predicted = predicted_iteration_seconds(trainer, per_sample)
    record["predicted_iteration_seconds"] = predicted
    iterations = []
    for i in range(args.iterations):
        need = iterations[-1]["seconds"] if iterations else predicted
        if deadline is not None and time.perf_counter() + need > deadline:
            record["stopped"] = f"budget: iteration {i + 1} needs ~{need:.0f} s, {deadline - time.perf_counter():.0f} s left"
            break
        t_it = time.perf_counter()
        calls.take()
        metrics = trainer.step().metrics
        sync(device)
        no_grad, grad = calls.take()
        if i == 0 and device.type == "cuda":
            record["adapted"] = adapt_memory(args, trainer, shared["reward"], metrics["phases"], device,
                                             record["device_allocated_gb_before_training"])
        iterations.append({"seconds": time.perf_counter() - t_it, "nfe": metrics["nfe"] + metrics["nfe_update"],
                           "samples_no_grad": no_grad, "samples_grad": grad,
                           "nfe_rollout": metrics["nfe"], "nfe_update": metrics["nfe_update"],
                           "ratio_first_dev": metrics["ratio_first_dev"], "clip_frac": metrics["clip_frac"],
                           "reward_mean": metrics["reward_mean"], "phases": metrics["phases"]})
        print(f"  {model} {preset} {res}px iteration {i + 1}: {iterations[-1]['seconds']:.1f} s, "
              f"NFE {iterations[-1]['nfe']}, phases " + ", ".join(
                  f"{k} {v['seconds']:.1f}s/{_gb(v['peak_mem_gb'])}" for k, v in metrics["phases"].items()), flush=True)
    del trainer, policy, base
    free(device)
    return {**record, **summarise(iterations, per_sample, record["update_cost_forwards"])}


def adapt_memory(args, trainer, reward, phases: dict, device, resident_gb: float) -> dict:
    """After the first iteration: keep the reward on the device if it fits beside the other phases' peaks
    (--reward-offload auto), and raise the decode chunk to what the measured decode peak allows
    (--adapt-decode). egrpo_backend/jobs/memory_plan.py decides from the measured bytes."""
    from egrpo_backend.jobs.memory_plan import chunk_size, reward_stays_on_device

    gib, out = 2**30, {}
    total = int(args.memory_cap_gb * gib) if args.memory_cap_gb else torch.cuda.get_device_properties(device).total_memory
    peak = {k: (v["peak_mem_gb"] or 0.0) * gib for k, v in phases.items()}
    if args.reward_offload == "auto" and reward.offload:
        reward_bytes = sum(p.numel() * p.element_size() for p in reward.model.parameters())
        other = max(v for k, v in peak.items() if k != "reward")
        if reward_stays_on_device(reward_bytes, total, int(other)):
            reward.offload = False
            reward.model.to(reward.device)
        out["reward_on_device"] = not reward.offload
    if args.adapt_decode and "decode" in peak:
        current = trainer.cfg.decode_batch
        per_image = (peak["decode"] - resident_gb * gib) / current
        limit = trainer.algo.group_size * len(trainer.algo.granularities)
        trainer.cfg.decode_batch = chunk_size(per_image, resident_gb * gib, total, current, limit)
        out["decode_batch"] = trainer.cfg.decode_batch
    return out


def _gb(x) -> str:
    return "-" if x is None else f"{x:.1f}GB"


def summarise(iterations: list[dict], per_sample: float, update_cost_forwards: float = 1.0) -> dict:
    if not iterations:
        return {"iterations_done": 0}
    seconds = sum(it["seconds"] for it in iterations)
    nfe = sum(it["nfe"] for it in iterations)
    phases = {}
    for name in PHASES:
        entries = [it["phases"][name] for it in iterations if name in it["phases"]]
        peaks = [e["peak_mem_gb"] for e in entries if e["peak_mem_gb"] is not None]
        phases[name] = {"seconds": sum(e["seconds"] for e in entries) / len(iterations),
                        "peak_mem_gb": max(peaks) if peaks else None}
    return {"iterations_done": len(iterations), "seconds_per_iteration": seconds / len(iterations),
            "nfe_per_iteration": nfe / len(iterations), "nfe_per_second": nfe / seconds,
            "overhead_ratio": overhead_ratio(seconds, sum(it["samples_no_grad"] for it in iterations),
                                             sum(it["samples_grad"] for it in iterations), per_sample, update_cost_forwards),
            "overhead_ratio_update_as_one": seconds / (nfe * per_sample), "ratio_first_dev": max(it["ratio_first_dev"] for it in iterations),
            "phases": phases, "iterations": iterations}


def write_results(out_dir: Path, device: torch.device, results: list[dict], meta: dict) -> Path:
    from egrpo_backend.atomic import atomic_write_json, atomic_write_text

    stem = f"scale_{device_name(device)}"
    atomic_write_json(out_dir / f"{stem}.json", {"meta": meta, "results": results})
    atomic_write_text(out_dir / f"{stem}.md", markdown(results, meta))
    return out_dir / f"{stem}.json"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Scale benchmark on {meta['device']}", "",
             f"torch {meta['torch']}, diffusers {meta['diffusers']}, depth {meta['depth']}, G {meta['group_size']}, "
             f"{meta['steps']} steps, micro_batch {meta['micro_batch']}; random weights (bench/scale.py). "
             "Peak memory is torch.cuda.max_memory_allocated per phase (weights included).", "",
             "Overhead: wall / pure model cost, an update sample counted as its measured forward + backward "
             "(update = that cost in forwards); in brackets the old ratio that counted it as one forward.", "",
             "| model | preset | px | params | storage | weights GB | s/iter | NFE/iter | NFE/s | overhead (update as one) "
             "| update = fwd | ratio_first_dev | rollout s / GB | decode s / GB | reward s / GB | update s / GB | est. peak GB |",
             "|" + " --- |" * 17]
    for r in results:
        if "skipped" in r or not r.get("iterations_done"):
            why = r.get("skipped") or r.get("stopped") or r.get("error", "not run")
            lines.append(f"| {r['model']} | {r['preset']} | {r['resolution']} | | | | | | | | | | | | | | skipped: {why} |")
            continue
        ph = r["phases"]
        cells = [f"{ph[p]['seconds']:.1f} / {_gb(ph[p]['peak_mem_gb'])}" for p in PHASES]
        est = r.get("estimate", {}).get("peak_gb")
        lines.append(f"| {r['model']} | {r['preset']} | {r['resolution']} | {r['params'] / 1e9:.2f}B | {r['storage_dtype']} "
                     f"| {r['weights_gb']:.1f} | {r['seconds_per_iteration']:.1f} | {r['nfe_per_iteration']:.0f} "
                     f"| {r['nfe_per_second']:.1f} | {r['overhead_ratio']:.2f} ({r.get('overhead_ratio_update_as_one', 0):.2f}) "
                     f"| {r.get('update_cost_forwards', 0):.1f} | {r['ratio_first_dev']:.2e} | "
                     + " | ".join(cells) + f" | {'' if est is None else f'{est:.1f} (estimated)'} |")
    return "\n".join(lines) + "\n"


def attach_estimate(record: dict) -> None:
    """The memory estimate of the same configuration (bench/memory_estimate.py's committed results)."""
    path = ROOT / "bench" / "results" / "memory_estimates.json"
    if not path.is_file() or record.get("depth") != "full":
        return
    for row in json.loads(path.read_text()).get("rows", []):
        keys = ("model", "resolution", "micro_batch", "rollout_batch", "decode_batch")
        if all(row.get(k) == record.get(k) for k in keys):
            record["estimate"] = {"peak_gb": row["peak_gb"], "phases_gb": row["phases_gb"], "estimated": True}


def main(argv=None, shared: dict | None = None) -> dict:
    """shared: the VAE and reward built so far, kept across calls (bench/scale_gpu.py runs several)."""
    args = parse_args(argv)
    from egrpo_backend.dtypes import resolve_compute_dtype, resolve_storage_dtype
    from egrpo_backend.policies import resolve_device

    device = resolve_device(args.device)
    compute = resolve_compute_dtype("auto", device)
    storage = resolve_storage_dtype(args.weight_dtype, compute)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = START + args.budget_seconds if args.budget_seconds else None
    import diffusers

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "depth": args.depth or "full",
            "group_size": args.group_size, "steps": args.steps, "micro_batch": args.micro_batch,
            "budget_seconds": args.budget_seconds, "argv": list(argv) if argv is not None else sys.argv[1:]}
    results, shared = [], {} if shared is None else shared
    for model, preset, res in configurations(args):
        left = None if deadline is None else deadline - time.perf_counter()
        print(f"== {model} {preset} {res}px" + ("" if left is None else f" ({left:.0f} s of budget left)"), flush=True)
        if left is not None and left < 30:
            record = {"model": model, "preset": preset, "resolution": res, "skipped": f"budget: {left:.0f} s left"}
        else:
            try:
                record = run_config(args, model, preset, res, device, compute, storage, shared, deadline, out_dir)
            except torch.cuda.OutOfMemoryError as e:
                record = {"model": model, "preset": preset, "resolution": res, "error": f"out of memory: {e}"[:500]}
                free(device)
            except Exception as e:  # one configuration failing must not lose the others' results
                record = {"model": model, "preset": preset, "resolution": res, "error": f"{type(e).__name__}: {e}"[:500],
                          "traceback": traceback.format_exc()[-3000:]}
                free(device)
        if args.memory_cap_gb and device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        attach_estimate(record)
        if "skipped" in record or "error" in record:
            print(f"  skipped: {record.get('skipped') or record.get('error')}", flush=True)
        results.append(record)
        path = write_results(out_dir, device, results, meta)
    print((out_dir / f"scale_{device_name(device)}.md").read_text())
    print(f"wrote {path}")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
