"""The entropy ablation on the embedded default: tau in {0, 1.8, 2.2, 2.6} x active steps
{first half, all}, at an equal NFE budget. Same file format as compare.json.

    python bench/ablation.py [--budget 20000] [--seeds 2] [--workers 2]
"""

import argparse

from common import base_reward, run_all, summarise, write_results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=20000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    every = max(1, a.budget // 4)
    tasks = []
    for active, label in (("first_half", "first8"), ("all", "all16")):
        for tau in (0.0, 1.8, 2.2, 2.6):
            for s in range(a.seeds):
                tasks.append((f"tau{tau:g}_{label}", "egrpo", {"tau": tau, "active": active}, s, a.budget, every))
    data = {"base": base_reward(), "methods": summarise(run_all(tasks, a.workers)),
            "settings": {"budget_nfe": a.budget, "seeds": a.seeds}}
    write_results("ablation", data, f"Entropy ablation: tau x active steps ({a.budget} NFE, {a.seeds} seeds)")


if __name__ == "__main__":
    main()
