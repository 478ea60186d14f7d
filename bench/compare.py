"""Every method on the embedded default at an equal budget of model evaluations (NFE), several seeds.

    python bench/compare.py [--budget 30000] [--seeds 3] [--workers 2]

Writes bench/results/compare.{json,png,md}: {"base": {...}, "methods": {NAME: {"reward_mean",
"reward_ci", "nfe", "seconds", "curve": [[nfe, reward], ...], ...}}}. NFE counts every model
evaluation of rollouts and updates (CFG would count twice); held-out evaluation is not counted.
"""

import argparse

from common import base_reward, run_all, summarise, write_results

METHODS = ["egrpo", "egrpo_fast", "granular", "dance", "flowgrpo", "flowgrpo_fast", "mixgrpo"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=30000, help="NFE per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="parallel runs, one CPU thread each")
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    methods = a.methods.split(",")
    every = max(1, a.budget // 5)
    tasks = [(m, m, {}, s, a.budget, every) for s in range(a.seeds) for m in methods]
    print(f"{len(tasks)} runs of {a.budget} NFE on {a.workers} workers")
    data = {"base": base_reward(), "methods": summarise(run_all(tasks, a.workers)),
            "settings": {"budget_nfe": a.budget, "seeds": a.seeds}}
    write_results("compare", data, f"Held-out reward at equal NFE ({a.budget}), {a.seeds} seeds")


if __name__ == "__main__":
    main()
