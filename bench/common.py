"""Shared harness of the benchmarks: train a preset on the embedded default for an NFE budget,
evaluating held-out reward along the way, in worker processes of one thread each."""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One setting for every method (only the preset changes): LoRA r 8, lr 1e-3, PPO clip 0.2 with 8
# minibatches per rollout batch (the paper's 1e-4 under-trains a small LoRA on the embedded default), 2 prompts
# per iteration, G = 8.
COMMON = {
    "model": {"source": "default"},
    "rewards": [{"name": "digit_probability"}],
    "algorithm": {"group_size": 8, "clip_range": 0.2},
    "lora": {"rank": 8, "alpha": 8.0},
    "train": {"prompts_per_iteration": 2, "lr": 1e-3, "minibatches": 8, "iterations": 100000, "device": "cpu"},
}


def spec_for(preset: str, seed: int, algorithm: dict | None = None) -> dict:
    spec = json.loads(json.dumps(COMMON))
    spec["algorithm"].update({"preset": preset, **(algorithm or {})})
    spec["train"]["seed"] = seed
    spec["lora"]["init_seed"] = seed
    return spec


def run_one(args: tuple) -> dict:
    """Train one (name, preset, overrides, seed) until `budget` NFE; held-out reward every `every` NFE."""
    name, preset, overrides, seed, budget, every = args
    import torch

    torch.set_num_threads(1)
    from egrpo_backend.build import build_trainer
    from egrpo_backend.config import JobSpec
    from egrpo_backend.default_model.digits import digit_of_prompt
    from egrpo_backend.default_model.policy import default_job_inputs
    from egrpo_backend.evaluation import evaluate

    spec = JobSpec.from_dict(spec_for(preset, seed, overrides))
    trainer = build_trainer(spec)
    policy, reward, inputs = trainer.policy, trainer.reward, default_job_inputs()
    eval_sigmas = list(JobSpec.from_dict(spec_for("egrpo", 0)).algorithm.plan().sigmas)  # one eval grid for all

    def held_out():
        res = evaluate(policy, reward, inputs["eval_pairs"], eval_sigmas, group_key=digit_of_prompt)
        return res["reward_mean"], res["scores"], res.get("diversity")

    mean, scores, div = held_out()
    curve, t_train, next_eval = [[0, mean]], 0.0, every
    while trainer.state.nfe < budget:
        t0 = time.perf_counter()
        trainer.step()
        t_train += time.perf_counter() - t0
        if trainer.state.nfe >= next_eval or trainer.state.nfe >= budget:
            mean, scores, div = held_out()
            curve.append([trainer.state.nfe, mean])
            next_eval += every
    return {"name": name, "seed": seed, "nfe": trainer.state.nfe, "seconds": t_train, "curve": curve,
            "final_scores": scores, "final_diversity": div, "iterations": trainer.state.iteration}


def run_all(tasks: list[tuple], workers: int) -> list[dict]:
    import multiprocessing as mp

    out = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        for res in pool.map(run_one, tasks):
            print(f"  {res['name']:14s} seed {res['seed']}: held-out {res['curve'][0][1]:.3f} -> {res['curve'][-1][1]:.3f}"
                  f" at {res['nfe']} NFE ({res['seconds']:.0f} s, {res['iterations']} it)", flush=True)
            out.append(res)
    return out


def base_reward() -> dict:
    import torch

    torch.set_num_threads(1)
    from egrpo_backend.config import JobSpec
    from egrpo_backend.default_model.policy import default_job_inputs, load_default_policy
    from egrpo_backend.evaluation import bootstrap_ci, evaluate
    from egrpo_backend.rewards import build_reward

    sig = list(JobSpec.from_dict(spec_for("egrpo", 0)).algorithm.plan().sigmas)
    res = evaluate(load_default_policy(), build_reward("digit_probability"), default_job_inputs()["eval_pairs"], sig)
    return {"reward_mean": res["reward_mean"], "reward_ci": list(bootstrap_ci(res["scores"]))}


def summarise(runs: list[dict]) -> dict:
    """Per method: mean over seeds of the final held-out reward, a bootstrap CI over all seeds'
    per-sample scores, mean NFE and seconds, and the seed-averaged curve (interpolated on a common grid)."""
    import numpy as np

    from egrpo_backend.evaluation import bootstrap_ci

    methods = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        grid = sorted({p[0] for r in rs for p in r["curve"]})
        curve = [[int(x), float(np.mean([np.interp(x, *zip(*r["curve"])) for r in rs]))] for x in grid]
        scores = [s for r in rs for s in r["final_scores"]]
        methods[name] = {
            "reward_mean": float(np.mean([r["curve"][-1][1] for r in rs])),
            "reward_ci": list(bootstrap_ci(scores)),
            "per_seed": [r["curve"][-1][1] for r in rs],
            "nfe": int(np.mean([r["nfe"] for r in rs])),
            "seconds": float(np.mean([r["seconds"] for r in rs])),
            "diversity": float(np.mean([r["final_diversity"] for r in rs])),
            "curve": curve,
        }
    return methods


def write_results(name: str, data: dict, title: str) -> None:
    sys.path.insert(0, str(ROOT))
    from egrpo_backend.atomic import atomic_write_json, atomic_write_text
    from egrpo_backend.plots import plot_reward_curves

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{name}.json", data)
    curves = {m: [tuple(p) for p in v["curve"]] for m, v in data["methods"].items()}
    plot_reward_curves(curves, RESULTS / f"{name}.png", xlabel="model evaluations (NFE)",
                       ylabel="held-out p(named digit)", title=title)
    lines = [f"# {title}", "", f"base model: {data['base']['reward_mean']:.3f} "
             f"[{data['base']['reward_ci'][0]:.3f}, {data['base']['reward_ci'][1]:.3f}]", "",
             "| method | held-out reward | 95% CI | per seed | NFE | seconds | diversity |", "|---|---|---|---|---|---|---|"]
    for m, v in sorted(data["methods"].items(), key=lambda kv: -kv[1]["reward_mean"]):
        lines.append(f"| {m} | {v['reward_mean']:.3f} | [{v['reward_ci'][0]:.3f}, {v['reward_ci'][1]:.3f}] | "
                     f"{', '.join(f'{x:.3f}' for x in v['per_seed'])} | {v['nfe']} | {v['seconds']:.0f} | {v['diversity']:.3f} |")
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
