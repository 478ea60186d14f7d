"""E-GRPO ablation on the embedded default, one factor at a time around the `egrpo` preset (adaptive
merge, tau 2.2, active steps 0-7), at equal cost (bench/common.py: forward 1, forward + backward 3).

    nice -n 5 python bench/ablation.py [--budget-nfe 15000] [--seeds 3] [--workers 2]

Factors: the merge (adaptive vs a fixed width of 2 / 4 / 6 steps, the paper's ablation), tau in
{0, 1.8, 2.0, 2.2, 2.6}, and the active steps (first 4, first 8, second 8, all 16). Writes
bench/results/ablation.{json,md,png}, the same table format as compare.
"""

from __future__ import annotations

import argparse
import time

import common

FRACTIONS = (0.5, 1.0)
CENTRE = "egrpo (adaptive, tau 2.2, 0-7)"
VARIANTS = {  # name -> AlgorithmSpec overrides of the egrpo preset, grouped by factor
    "merge": {"merge fixed 2": {"merge": 2}, "merge fixed 4": {"merge": 4}, "merge fixed 6": {"merge": 6}},
    "tau": {f"tau {t:g}": {"tau": t} for t in (0.0, 1.8, 2.0, 2.6)},
    "active": {"active 0-3": {"active": "0-3"}, "active 8-15": {"active": "8-15"}, "active all": {"active": "all"}},
}


def main(argv=None, out=common.RESULTS) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-nfe", type=int, default=15000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    configs = {CENTRE: {}, **{name: o for group in VARIANTS.values() for name, o in group.items()}}
    tasks = [{"name": n, "preset": "egrpo", "overrides": o, "seed": s, "budget_nfe": a.budget_nfe, "budget_wall": 0,
              "nfe_fractions": FRACTIONS, "wall_fractions": ()} for s in range(a.seeds) for n, o in configs.items()]
    print(f"{len(tasks)} runs of >= {a.budget_nfe} cost on {a.workers} workers", flush=True)
    t0 = time.time()
    base, real = common.base_eval(), common.real_reference()
    runs = common.run_all(tasks, a.workers)
    table = common.summarise(runs, "nfe@1", base)
    data = {"settings": {"budget_nfe": a.budget_nfe, "seeds": a.seeds, "workers": a.workers, "configs": configs,
                         "grad_weight": common.GRAD_WEIGHT, "wall_minutes": (time.time() - t0) / 60},
            "judge": {**common.JUDGE, "test_accuracy": common.judge_test_accuracy()}, "base": base, "real": real,
            "equal_nfe": table, "frontier": common.frontier(runs, FRACTIONS, base),
            "curves": {x: common.curves(runs, base, x) for x in ("cost", "cpu_seconds")}, "runs": runs}
    common.write_json("ablation", data, out)
    common.plot_curves(data, out / "ablation.png", f"E-GRPO ablation, {a.seeds} seeds")
    lines = [f"# E-GRPO ablation, one factor at a time ({a.budget_nfe} NFE, {a.seeds} seeds)", "",
             common.cost_note(), common.judge_note(data["judge"]["test_accuracy"]),
             "wall s / CPU s: elapsed / CPU seconds inside trainer.step() (evaluation excluded; no time budget here).",
             f"Whole ablation: {data['settings']['wall_minutes']:.1f} min on {a.workers} workers. Reproduce: "
             f"`nice -n 5 python bench/ablation.py --budget-nfe {a.budget_nfe} --seeds {a.seeds} --workers {a.workers}`."]
    for factor, group in VARIANTS.items():
        rows = {n: table[n] for n in (CENTRE, *group)}
        lines += ["", f"## {factor}", "", *common.table_md(rows, base, real)]
    common.write_md("ablation", lines, out)
    return data


if __name__ == "__main__":
    main()
