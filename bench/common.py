"""Shared harness of the benchmarks (bench/compare.py, bench/ablation.py): train a preset on the embedded
default until a cost budget AND a wall-time budget are both spent, evaluating held-out reward, an
independent judge, diversity and drift at the budget crossings, in worker processes of one thread each.

Cost: model evaluations weighted by what they do. A forward without gradients (rollouts, the KL
reference, the old policy of DiffusionNFT) counts 1; a forward with gradients counts 3 (forward +
backward, the backward costing about two forwards). The trainer's `nfe` (rollout) and `nfe_update`
count every forward once; the harness also counts the rows evaluated with gradients enabled
(`count_grad_rows`), so cost = trainer NFE + 2 x gradient rows. For the GRPO presets without KL every
update forward has gradients, and cost = rollout NFE + 3 x nfe_update. Wall time: seconds inside
`trainer.step()` on this machine; held-out evaluation is excluded from both.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GRAD_WEIGHT = 3  # a forward with backward = 3 model evaluations; a forward without gradients = 1
COLLAPSE_FRACTION = 0.95  # diversity below 95% of the base model's counts as collapse
JUDGE = {"kernel": "rbf", "C": 10.0, "gamma": "scale"}  # sklearn SVC on raw 16x16 pixels of the real train split

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


def eval_sigmas() -> list[float]:
    """One held-out ODE grid for every method: the shared 16-step grid."""
    from egrpo_backend.config import JobSpec

    return list(JobSpec.from_dict(spec_for("egrpo", 0)).algorithm.plan().sigmas)


# --- cost -------------------------------------------------------------------------------------------
def count_grad_rows(policy) -> dict:
    """Wrap policy.velocity so that {"rows": n} counts the samples evaluated with gradients enabled."""
    import torch

    counter, inner = {"rows": 0}, policy.velocity

    def velocity(x, sigma, cond):
        if torch.is_grad_enabled():
            counter["rows"] += int(x.shape[0])
        return inner(x, sigma, cond)

    policy.velocity = velocity
    return counter


def weighted_cost(nfe: int, grad_rows: int) -> int:
    """Every forward counted once by the trainer, plus 2 more for each that was backpropagated."""
    return int(nfe + (GRAD_WEIGHT - 1) * grad_rows)


# --- the independent judge ------------------------------------------------------------------------
@lru_cache(maxsize=1)
def svc_judge():
    """An RBF SVC on the raw pixels of the real `train` digits: a different model family from the
    reward CNN, refitted in about a second, deterministic (no randomness in SVC's fit)."""
    from sklearn.svm import SVC

    from egrpo_backend.default_model.digits import real_digits

    x, y = real_digits("train")
    return SVC(**JUDGE).fit(x.flatten(1).double().numpy(), y.numpy())


def judge_accuracy(images, digits: list[int]) -> float:
    """Fraction of images the SVC labels as the digit they were asked for."""
    import numpy as np

    pred = svc_judge().predict(images.detach().flatten(1).double().cpu().numpy())
    return float(np.mean(pred == np.asarray(digits)))


def judge_test_accuracy() -> float:
    """The judge's accuracy on the real held-out digits (never seen by it)."""
    from egrpo_backend.default_model.digits import real_digits

    x, y = real_digits("heldout")
    return judge_accuracy(x, y.tolist())


# --- held-out evaluation ----------------------------------------------------------------------------
def held_out(policy, reward, sigmas: list[float]) -> dict:
    """Reward (mean and per-sample scores), judge accuracy, within-digit diversity and nearest-real
    distance of the 200 held-out (prompt, seed) ODE samples."""
    from egrpo_backend.default_model.digits import digit_of_prompt
    from egrpo_backend.default_model.policy import default_job_inputs
    from egrpo_backend.jobs.evaluation import evaluate

    inputs = default_job_inputs()
    res = evaluate(policy, reward, inputs["eval_pairs"], sigmas, group_key=digit_of_prompt, drift_fn=inputs["drift_fn"])
    digits = [digit_of_prompt(p) for p, _ in inputs["eval_pairs"]]
    return {"reward_mean": res["reward_mean"], "scores": [round(s, 5) for s in res["scores"]],
            "judge_accuracy": judge_accuracy(res["images"], digits), "diversity": res["diversity"],
            "nearest_real": res["drift"]}


def base_eval() -> dict:
    """The base model's held-out entry (LoRA B starts at 0, so every run starts here)."""
    import torch

    torch.set_num_threads(1)
    from egrpo_backend.default_model.policy import load_default_policy
    from egrpo_backend.jobs.evaluation import bootstrap_ci
    from egrpo_backend.rewards import build_reward

    res = held_out(load_default_policy(), build_reward("digit_probability"), eval_sigmas())
    return {**res, "reward_ci": list(bootstrap_ci(res.pop("scores")))}


def real_reference() -> dict:
    """The same measures on REAL held-out digits (their prompts named correctly); nearest-real of the
    real train split against the held-out split."""
    from egrpo_backend.default_model.digits import prompt_for, real_digits
    from egrpo_backend.default_model.metrics import nearest_real_distance
    from egrpo_backend.jobs.evaluation import within_prompt_diversity
    from egrpo_backend.rewards import build_reward

    x, y = real_digits("heldout")
    scores = build_reward("digit_probability")(x, [prompt_for(d) for d in y.tolist()])
    return {"reward_mean": float(scores.mean()), "judge_accuracy": judge_test_accuracy(),
            "diversity": within_prompt_diversity(x, y.tolist()), "nearest_real": nearest_real_distance(real_digits("train")[0])}


# --- one run ------------------------------------------------------------------------------------------
def marks_crossed(pending: list[tuple[str, float]], cost: int, seconds: float) -> list[str]:
    """Checkpoint names ("nfe@0.5", "wall@1") whose threshold this iteration reached."""
    return [name for name, at in pending if (cost if name.startswith("nfe") else seconds) >= at]


def checkpoints(budget_nfe: int, budget_wall: float, nfe_fractions, wall_fractions) -> list[tuple[str, float]]:
    out = [(f"nfe@{f:g}", f * budget_nfe) for f in nfe_fractions]
    return out + ([(f"wall@{f:g}", f * budget_wall) for f in wall_fractions] if budget_wall > 0 else [])


def run_one(task: dict) -> dict:
    """Train task["preset"] (+ overrides) for one seed until cost >= budget_nfe and seconds >= budget_wall;
    evaluate right after the iterations that cross each checkpoint (held-out time not counted)."""
    import torch

    torch.set_num_threads(1)
    from egrpo_backend.jobs.build import build_trainer
    from egrpo_backend.config import JobSpec

    trainer = build_trainer(JobSpec.from_dict(spec_for(task["preset"], task["seed"], task.get("overrides"))))
    grad = count_grad_rows(trainer.policy)
    sigmas, pending = eval_sigmas(), checkpoints(task["budget_nfe"], task["budget_wall"], task["nfe_fractions"],
                                                 task["wall_fractions"])
    evals, seconds, cpu, cost = [], 0.0, 0.0, 0
    while pending:
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.step()
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        cost = weighted_cost(trainer.state.nfe, grad["rows"])
        hit = marks_crossed(pending, cost, cpu if task.get("clock") == "cpu" else seconds)
        if hit:
            pending = [p for p in pending if p[0] not in hit]
            evals.append({"marks": hit, "cost": cost, "seconds": seconds, "cpu_seconds": cpu,
                          "iteration": trainer.state.iteration, **held_out(trainer.policy, trainer.reward, sigmas)})
    hist = trainer.state.history
    return {"name": task["name"], "seed": task["seed"], "cost": cost, "seconds": seconds, "cpu_seconds": cpu,
            "nfe": trainer.state.nfe,
            "nfe_rollout": sum(m["nfe"] for m in hist), "nfe_update": sum(m["nfe_update"] for m in hist),
            "grad_rows": grad["rows"], "iterations": trainer.state.iteration, "evals": evals}


def run_all(tasks: list[dict], workers: int) -> list[dict]:
    import multiprocessing as mp

    out = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(run_one, t) for t in tasks]):
            r = fut.result()
            print(f"  {r['name']:16s} seed {r['seed']}: held-out {r['evals'][-1]['reward_mean']:.3f} at cost {r['cost']}"
                  f" ({r['seconds']:.0f} s, {r['iterations']} it)", flush=True)
            out.append(r)
    order = {(t["name"], t["seed"]): i for i, t in enumerate(tasks)}
    return sorted(out, key=lambda r: order[(r["name"], r["seed"])])


# --- summaries ------------------------------------------------------------------------------------
def at_mark(run: dict, mark: str) -> dict:
    return next(e for e in run["evals"] if mark in e["marks"])


def summarise(runs: list[dict], mark: str, base: dict) -> dict:
    """Per method at one checkpoint: mean over seeds of the held-out reward, a bootstrap 95% CI over all
    seeds' per-sample scores, per-seed values, judge accuracy, diversity (and % of base), nearest real."""
    import numpy as np

    from egrpo_backend.jobs.evaluation import bootstrap_ci

    table = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        es = [at_mark(r, mark) for r in runs if r["name"] == name]
        div = float(np.mean([e["diversity"] for e in es]))
        table[name] = {
            "reward_mean": float(np.mean([e["reward_mean"] for e in es])),
            "reward_ci": list(bootstrap_ci([s for e in es for s in e["scores"]])),
            "per_seed": [e["reward_mean"] for e in es],
            "judge_accuracy": float(np.mean([e["judge_accuracy"] for e in es])),
            "diversity": div, "diversity_pct_base": 100 * div / base["diversity"],
            "nearest_real": float(np.mean([e["nearest_real"] for e in es])),
            "cost": float(np.mean([e["cost"] for e in es])), "seconds": float(np.mean([e["seconds"] for e in es])),
            "cpu_seconds": float(np.mean([e["cpu_seconds"] for e in es])),
            "iterations": float(np.mean([e["iteration"] for e in es])),
        }
    return table


def frontier(runs: list[dict], fractions, base: dict) -> dict:
    """Per method, [(fraction of the NFE budget, diversity, reward)] averaged over seeds."""
    return {name: [[f, row["diversity"], row["reward_mean"]] for f in fractions
                   for row in [summarise([r for r in runs if r["name"] == name], f"nfe@{f:g}", base)[name]]]
            for name in dict.fromkeys(r["name"] for r in runs)}


def curves(runs: list[dict], base: dict, x: str) -> dict:
    """Per method, the seed-averaged held-out reward against x ("cost", "seconds" or "cpu_seconds"), from the base at 0."""
    import numpy as np

    out = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        pts = [[(0.0, base["reward_mean"])] + [(e[x], e["reward_mean"]) for e in r["evals"]] for r in runs if r["name"] == name]
        grid = sorted({p[0] for c in pts for p in c})
        out[name] = [[float(g), float(np.mean([np.interp(g, *zip(*c)) for c in pts]))] for g in grid]
    return out


# --- output ---------------------------------------------------------------------------------------
def table_md(rows: dict, base: dict, real: dict) -> list[str]:
    """A markdown table, best reward first; base and real digits on top; collapse marked."""
    lines = ["| method | held-out reward | 95% CI | per seed | judge acc. | diversity (% of base) | nearest real | cost (NFE) | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| real digits | {real['reward_mean']:.3f} | | | {real['judge_accuracy']:.3f} | {real['diversity']:.2f} "
             f"({100 * real['diversity'] / base['diversity']:.0f}%) | {real['nearest_real']:.2f} | | | |",
             f"| base | {base['reward_mean']:.3f} | [{base['reward_ci'][0]:.3f}, {base['reward_ci'][1]:.3f}] | | "
             f"{base['judge_accuracy']:.3f} | {base['diversity']:.2f} (100%) | {base['nearest_real']:.2f} | 0 | 0 | 0 |"]
    for m, v in sorted(rows.items(), key=lambda kv: -kv[1]["reward_mean"]):
        flag = " collapsed" if v["diversity_pct_base"] < 100 * COLLAPSE_FRACTION else ""
        lines.append(f"| {m} | {v['reward_mean']:.3f} | [{v['reward_ci'][0]:.3f}, {v['reward_ci'][1]:.3f}] | "
                     f"{', '.join(f'{x:.3f}' for x in v['per_seed'])} | {v['judge_accuracy']:.3f} | {v['diversity']:.2f} "
                     f"({v['diversity_pct_base']:.1f}%{flag}) | {v['nearest_real']:.2f} | {v['cost']:.0f} | {v['seconds']:.0f} | {v['cpu_seconds']:.0f} |")
    return lines


def plot_curves(data: dict, path: Path, title: str) -> None:
    """Held-out reward against cost (left) and against training seconds (right), one line per method."""
    from egrpo_backend.plots import _figure, _save

    labels = {"cost": "cost: weighted model evaluations (NFE)", "seconds": "training wall seconds",
              "cpu_seconds": "training CPU seconds"}
    plt, fig = _figure(11, 4)
    for k, x in enumerate(data["curves"]):
        ax = fig.add_subplot(1, 2, k + 1)
        for i, (name, pts) in enumerate(data["curves"][x].items()):
            ax.plot(*zip(*pts), marker="o", ms=3, ls="-" if i < 10 else "--", label=name)
        label = labels[x]
        ax.set_xlabel(label)
        ax.set_ylabel("held-out p(named digit)")
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)


def plot_frontier(data: dict, path: Path, title: str) -> None:
    """Held-out reward against within-digit diversity at several budget fractions; base and real marked."""
    from egrpo_backend.plots import _figure, _save

    plt, fig = _figure(7, 5)
    ax = fig.add_subplot(111)
    base, real = data["base"], data["real"]
    for i, (name, pts) in enumerate(data["frontier"].items()):
        xs, ys = [base["diversity"]] + [p[1] for p in pts], [base["reward_mean"]] + [p[2] for p in pts]
        line, = ax.plot(xs, ys, marker="o", ms=3, ls="-" if i < 10 else "--", label=name)
        ax.plot(xs[-1], ys[-1], marker="o", ms=7, color=line.get_color())  # the full budget
    ax.plot(base["diversity"], base["reward_mean"], marker="*", ms=14, color="k", ls="", label="base model")
    ax.axvline(COLLAPSE_FRACTION * base["diversity"], color="gray", ls="--", lw=1, label="95% of base diversity")
    ax.axvline(real["diversity"], color="gray", ls=":", lw=1, label="real digits' diversity")
    ax.set_xlabel("within-digit diversity (mean pairwise L2)")
    ax.set_ylabel("held-out p(named digit)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def write_json(name: str, data: dict, out: Path = RESULTS) -> None:
    from egrpo_backend.atomic import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", data)


def write_md(name: str, lines: list[str], out: Path = RESULTS) -> None:
    from egrpo_backend.atomic import atomic_write_text

    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def clock_note(workers: int, clock: str) -> str:
    return (f"{workers} worker processes of one thread each, in parallel on this machine. Time is spent inside "
            "trainer.step() only (held-out evaluation excluded): wall s = elapsed seconds, CPU s = the process's CPU "
            "seconds (= wall s on an otherwise idle core; lower when other processes share the cores). "
            f"The time budget uses {'CPU' if clock == 'cpu' else 'wall'} seconds.")


def cost_note() -> str:
    return ("cost = model evaluations weighted: forward without gradients 1, forward + backward "
            f"{GRAD_WEIGHT} (= rollout NFE + {GRAD_WEIGHT} x update forwards for the GRPO presets).")


def judge_note(test_accuracy: float) -> str:
    return (f"judge: sklearn SVC ({JUDGE['kernel']}, C {JUDGE['C']:g}, gamma {JUDGE['gamma']}) fitted on the raw pixels "
            f"of the real train digits, independent of the reward CNN; accuracy on real held-out digits "
            f"{test_accuracy:.3f}. judge acc. = fraction of held-out samples it labels as the prompted digit.")
