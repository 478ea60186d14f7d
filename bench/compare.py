"""Every method on the embedded default at equal cost AND at equal wall time, several seeds.

    nice -n 5 python bench/compare.py [--budget-nfe 20000] [--budget-seconds 24] [--clock wall|cpu] [--seeds 3] [--workers 2]
                                      [--methods egrpo,mixgrpo,...]

Each run trains until it has spent BOTH budgets and is evaluated (200 held-out prompt/seed pairs)
right after the iterations that cross 25/50/75/100% of the cost budget and 100% of the wall budget.
Cost = model evaluations weighted by what they do: a forward without gradients (rollout, KL
reference) counts 1, a forward with backward counts 3; for the GRPO presets that is rollout NFE +
3 x update forwards (bench/common.py). Time = seconds inside trainer.step() on this machine, held-out
evaluation excluded: wall seconds by default, or the process's CPU seconds (--clock cpu), which
equal wall seconds on an idle core and stay fair when other jobs share the cores. Every reference
preset runs by default (METHODS: the seven GRPO presets and DiffusionNFT); --methods picks others.
--report-only redraws compare.md and the plots from compare.json without training.

Writes bench/results/compare.{json,md,png} and compare_frontier.png (held-out reward against
within-digit diversity at 25/50/75/100% of the cost budget). Judge: an RBF SVC on real digits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


# Every preset except nft_multi_reward (nft with the beta of its multi-reward configs; one reward here).
METHODS = ["egrpo", "egrpo_fast", "granular", "dance", "flowgrpo", "flowgrpo_fast", "mixgrpo", "nft"]


def main(argv=None, out=common.RESULTS) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-nfe", type=int, default=20000, help="weighted model evaluations per run")
    ap.add_argument("--budget-seconds", type=float, default=24.0, help="training seconds per run")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what the time budget counts: wall seconds, or CPU seconds (robust when other jobs share the cores)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="parallel runs, one CPU thread each")
    ap.add_argument("--methods", default=None, help="comma-separated presets (default: METHODS)")
    ap.add_argument("--report-only", action="store_true", help="redraw compare.md and the plots from compare.json")
    a = ap.parse_args(argv)
    if a.report_only:
        data = json.loads((out / "compare.json").read_text())
        write_report(data, out)
        return data
    methods = a.methods.split(",") if a.methods else METHODS
    tasks = [{"name": m, "preset": m, "seed": s, "budget_nfe": a.budget_nfe, "budget_wall": a.budget_seconds,
              "nfe_fractions": FRACTIONS, "wall_fractions": (1.0,), "clock": a.clock} for s in range(a.seeds) for m in methods]
    print(f"{len(tasks)} runs of >= {a.budget_nfe} cost and >= {a.budget_seconds:g} s on {a.workers} workers", flush=True)
    t0 = time.time()
    base, real = common.base_eval(), common.real_reference()
    runs = common.run_all(tasks, a.workers)
    data = {"settings": {"budget_nfe": a.budget_nfe, "budget_seconds": a.budget_seconds, "seeds": a.seeds,
                         "clock": a.clock, "workers": a.workers, "methods": methods, "grad_weight": common.GRAD_WEIGHT,
                         "wall_minutes": (time.time() - t0) / 60},
            "judge": {**common.JUDGE, "test_accuracy": common.judge_test_accuracy()}, "base": base, "real": real,
            "equal_nfe": common.summarise(runs, "nfe@1", base), "equal_wall": common.summarise(runs, "wall@1", base),
            "frontier": common.frontier(runs, FRACTIONS, base),
            "curves": {x: common.curves(runs, base, x) for x in ("cost", "cpu_seconds" if a.clock == "cpu" else "seconds")}, "runs": runs}
    common.write_json("compare", data, out)
    write_report(data, out)
    return data


def write_report(data: dict, out: Path = common.RESULTS) -> None:
    """compare.md and the two plots from the results (`--report-only` redraws them from compare.json)."""
    s, base, real = data["settings"], data["base"], data["real"]
    common.plot_curves(data, out / "compare.png", f"Held-out reward, {s['seeds']} seeds")
    common.plot_frontier(data, out / "compare_frontier.png",
                         "Reward vs diversity at 25/50/75/100% of the cost budget (big dot: 100%)")
    run = (f"--budget-nfe {s['budget_nfe']} --budget-seconds {s['budget_seconds']:g} --clock {s['clock']} "
           f"--seeds {s['seeds']} --workers {s['workers']}")
    common.write_md("compare", [
        f"# Every method at equal cost ({s['budget_nfe']} NFE) and equal time ({s['budget_seconds']:g} {s['clock']} s), {s['seeds']} seeds", "",
        common.cost_note(), common.clock_note(s["workers"], s["clock"]), common.judge_note(data["judge"]["test_accuracy"]),
        "Reward: p(named digit) from the reward CNN, mean over seeds; 95% CI: bootstrap over all seeds' per-sample scores.",
        f"Whole benchmark: {s['wall_minutes']:.1f} min. Reproduce: `nice -n 5 python bench/compare.py {run}`.", "",
        f"## At equal cost: the first iteration with cost >= {s['budget_nfe']}", "",
        *common.table_md(data["equal_nfe"], base, real), "",
        f"## At equal wall time: the first iteration with >= {s['budget_seconds']:g} training seconds ({s['clock']} clock)", "",
        *common.table_md(data["equal_wall"], base, real), "",
        "Curves: compare.png; reward against diversity along the budget: compare_frontier.png.",
    ], out)


if __name__ == "__main__":
    main()
