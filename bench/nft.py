"""DiffusionNFT (preset nft) on the embedded default: held-out reward of the base and of the trained
LoRA at an NFE budget, several seeds, the same COMMON settings as bench/compare.py.

    python bench/nft.py [--budget 20000] [--seeds 3] [--workers 2] [--algorithm '{"nft_beta": 1.0}']

Writes bench/results/nft.{json,png,md} (the same layout as compare.*).
"""

import argparse
import json

from common import base_reward, run_all, summarise, write_results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=20000, help="NFE per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="parallel runs, one CPU thread each")
    ap.add_argument("--algorithm", default="{}", help="JSON overrides of the nft preset's algorithm values")
    a = ap.parse_args()
    overrides = json.loads(a.algorithm)
    every = max(1, a.budget // 5)
    tasks = [("nft", "nft", overrides, s, a.budget, every) for s in range(a.seeds)]
    print(f"{len(tasks)} runs of {a.budget} NFE on {a.workers} workers")
    data = {"base": base_reward(), "methods": summarise(run_all(tasks, a.workers)),
            "settings": {"budget_nfe": a.budget, "seeds": a.seeds, "algorithm": overrides}}
    write_results("nft", data, f"DiffusionNFT held-out reward at {a.budget} NFE, {a.seeds} seeds")


if __name__ == "__main__":
    main()
