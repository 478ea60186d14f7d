"""`make demo`: E-GRPO on the embedded digits model, offline on a CPU, in a few minutes.

Runs a normal job (the same engine, spec and job directory as any other run), then measures the
result on the held-out (prompt, seed) set for the base model and the LoRA: reward with a bootstrap
95% interval, within-digit diversity and the distance to the nearest real digit (reward hacking
shows up as collapse and drift, not as a lower reward), and writes pictures of all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Settings measured on this model (bench/results): the paper's clip 1e-4 under-trains a
# small LoRA, 8 minibatches per rollout batch and 2 prompts per iteration learn fastest per NFE.
# Granularities [1]: the paper's E-GRPO (the authors' code adds a second, coarser ODE finish).
# kl_beta 1.0: a KL anchor to the base model. Without it this run drifts from real digits (nearest-real
# distance +6% by iteration 7) before its reward gain is clear; with it the gain is larger and the
# digits stay as realistic as the base's. One thread: the thread count is part of a run's identity.
DEMO_JOB = {
    "model": {"source": "default"},
    "rewards": [{"name": "digit_probability", "weight": 1.0}],
    "algorithm": {"preset": "egrpo", "steps": 16, "shift": 3.0, "eta": 0.7, "tau": 2.2, "active": "0-7",
                  "group_size": 8, "granularities": [1], "clip_range": 0.2, "kl_beta": 1.0},
    "lora": {"rank": 8, "alpha": 8.0},
    "train": {"iterations": 30, "prompts_per_iteration": 2, "lr": 1e-3, "minibatches": 8, "checkpoint_every": 2,
              "eval_every": 1, "diversity_guard": 0.955, "drift_guard": 1.05, "sample_every": 10, "seed": 0, "device": "cpu",
              "threads": 1},
    "output": {"name": "digits_egrpo", "formats": ["peft", "kohya", "comfy"]},
}
# Reward hacking shows as collapse (less diversity) and drift (farther from real digits): neither may
# get more than 5% worse than the base model's. Improvements (cleaner, more realistic digits) are fine.
DRIFT_LIMIT = 0.05


def heldout_report(policy, reward, pairs, sigmas) -> tuple[dict, "torch.Tensor"]:
    from .default_model.digits import digit_of_prompt
    from .default_model.metrics import nearest_real_distance
    from .jobs.evaluation import evaluate

    res = evaluate(policy, reward, pairs, sigmas, group_key=digit_of_prompt)
    images = res.pop("images")
    res.pop("scores")
    res["nearest_real"] = nearest_real_distance(images)
    return res, images


def before_after_grid(base_images, lora_images, pairs, path, per_digit: int = 6) -> None:
    from .default_model.digits import digit_of_prompt
    from .plots import image_grid

    rows, labels = [], []
    for d in range(10):
        idx = [i for i, (p, _) in enumerate(pairs) if digit_of_prompt(p) == d][:per_digit]
        rows += [base_images[idx], lora_images[idx]]
        labels += [f"{d} base", f"{d} LoRA"]
    image_grid(rows, path, row_labels=labels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m egrpo_backend.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_output", help="output folder (replaced if it holds an earlier demo)")
    ap.add_argument("--iterations", type=int, default=DEMO_JOB["train"]["iterations"], help="training iterations")
    ap.add_argument("--preset", default="egrpo", help="algorithm preset (egrpo, egrpo_fast, granular, ...)")
    args = ap.parse_args(argv)

    import torch

    from . import lora
    from .config import JobSpec
    from .jobs.run import create_job, run_job
    from .policies import source_defaults
    from .default_model.policy import load_default_policy
    from .rewards import build_reward

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(args.out)
    if (out / "demo_summary.json").exists() or (out / "job").exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    spec_dict = json.loads(json.dumps(DEMO_JOB))
    spec_dict["train"]["iterations"] = args.iterations
    spec_dict["algorithm"]["preset"] = args.preset
    spec = JobSpec.from_dict(spec_dict)
    (out / "spec.json").write_text(json.dumps(spec_dict, indent=2))

    t0 = time.perf_counter()
    print(f"E-GRPO demo: {args.iterations} iterations on the embedded digits model (CPU), reward p(named digit)")
    print(spec.algorithm.plan().table())
    job = create_job(spec, out / "job")
    result = run_job(job)
    train_seconds = time.perf_counter() - t0

    # Held-out comparison: the same prompts and seeds, LoRA off (base) and on.
    pairs = source_defaults(spec.model)["eval_pairs"]
    print(f"evaluating base and LoRA on the held-out set ({len(pairs)} prompt x seed pairs, ODE sampling)...")
    policy = load_default_policy()
    lora.load_lora_file(policy.lora_model(), Path(result["lora"][0]))
    reward = build_reward("digit_probability")
    sigmas = list(spec.algorithm.plan().sigmas)
    policy.set_lora_enabled(False)
    base, base_images = heldout_report(policy, reward, pairs, sigmas)
    policy.set_lora_enabled(True)
    tuned, tuned_images = heldout_report(policy, reward, pairs, sigmas)

    for name in ("plan.png", "reward_curve.png"):
        shutil.copy(job / name, out / name)
    (out / "lora").mkdir(exist_ok=True)
    for path in result["lora"]:
        shutil.copy(path, out / "lora" / Path(path).name)
    before_after_grid(base_images, tuned_images, pairs, out / "before_after.png")

    from .jobs.run import read_events

    guard = next((e for e in read_events(job)[0] if e["type"] == "guard"), None)
    kept = guard["restored"] if guard else result["iteration"]
    gain = tuned["reward_mean"] - base["reward_mean"]
    checks = {
        "gain >= 0.10": gain >= 0.10,
        "95% intervals do not overlap": tuned["reward_ci"][0] > base["reward_ci"][1],
        "diversity at least 95% of base": tuned["diversity"] >= (1 - DRIFT_LIMIT) * base["diversity"],
        "nearest-real distance at most 105% of base": tuned["nearest_real"] <= (1 + DRIFT_LIMIT) * base["nearest_real"],
    }
    history = result["history"]
    summary = {"base": base, "lora": tuned, "gain": gain, "checks": checks, "iterations": result["iteration"],
               "lora_iteration": kept, "guard": guard,
               "status": result["status"], "nfe": history[-1]["nfe_total"] if history else 0,
               "seconds": time.perf_counter() - t0, "train_seconds": train_seconds, "spec": spec_dict,
               "eval_during_training": result["eval"]}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))

    def fmt(r):
        return (f"reward {r['reward_mean']:.3f} [{r['reward_ci'][0]:.3f}, {r['reward_ci'][1]:.3f}]  "
                f"diversity {r['diversity']:.3f} ({r['diversity'] / base['diversity'] - 1:+.1%})  "
                f"nearest-real {r['nearest_real']:.3f} ({r['nearest_real'] / base['nearest_real'] - 1:+.1%})")

    print("\n=== E-GRPO demo summary ===")
    print(f"held-out base : {fmt(base)}")
    print(f"held-out LoRA : {fmt(tuned)}")
    print(f"gain {gain:+.3f}: LoRA of iteration {kept} ({summary['nfe']} model evaluations in {result['iteration']} "
          f"iterations, {summary['seconds']:.0f} s)")
    if guard:
        print(f"reward-hacking guard: {guard['message']}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print(f"\noutputs in {out.resolve()}:")
    for name in ("lora/digits_egrpo.safetensors", "before_after.png", "reward_curve.png", "plan.png",
                 "demo_summary.json", "job/"):
        print(f"  {out / name}")
    print(f"other formats: {out / 'lora'} (kohya, comfy); re-export with "
          f"`python -m egrpo_backend export {job} --format kohya|peft|comfy`")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
