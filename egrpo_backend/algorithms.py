"""E-GRPO and the baselines as named presets of one engine (SPEC 7).

A preset is only a set of AlgorithmSpec values; the rollout, advantage and loss code never asks
which preset it runs. Fields a preset does not set keep AlgorithmSpec's defaults, which are the
paper's E-GRPO (tau 2.2, first 8 of 16 steps, one merged SDE step per group, clip 1e-4).
"""

from __future__ import annotations

import torch

PRESETS: dict[str, dict] = {
    # The paper: one group per active step, consolidated SDE step, ODE elsewhere.
    "egrpo": {},
    # Ours: E-GRPO's plan and merged steps, but each iteration branches at a sample of the active
    # steps (uniform or weighted by merged entropy), so a rollout costs a fraction of full E-GRPO's.
    "egrpo_fast": {"branch": "sample_active", "branches_per_prompt": 2, "branch_weighting": "uniform"},
    # Granular-GRPO: E-GRPO with single steps (tau = 0) plus multi-granularity ODE finishes.
    "granular": {"tau": 0.0, "granularities": [1, 2]},
    # DanceGRPO: every step SDE with constant diffusion (eta 0.3), trains a random subset of steps.
    "dance": {
        "tau": 0.0, "diffusion": "constant", "eta": 0.3, "active": "all", "branch": "first",
        "sde_window": 0, "train_fraction": 0.6,
    },
    # Flow-GRPO: every step SDE, independent initial noise per member, per-prompt mean / batch std.
    "flowgrpo": {
        "tau": 0.0, "active": "all", "branch": "first", "sde_window": 0,
        "shared_initial_noise": False, "advantage": "prompt_mean_batch_std",
    },
    # Flow-GRPO-Fast: ODE except 2 SDE steps starting at a random step of the active range.
    "flowgrpo_fast": {"tau": 0.0, "branch": "random", "sde_window": 2},
    # MixGRPO: a window of 4 SDE steps that slides one step per iteration, ODE outside it.
    "mixgrpo": {"tau": 0.0, "branch": "sliding", "sde_window": 4, "slide_every": 1},
}


BRANCH_KINDS = ("active", "sample_active", "random", "sliding", "first")
BRANCH_WEIGHTINGS = ("uniform", "entropy")


def branch_starts(spec, plan, iteration: int, gen: torch.Generator) -> list[int]:
    """Where this iteration's groups branch (AlgorithmSpec.branch, one of BRANCH_KINDS)."""
    active = plan.active
    k = min(spec.branches_per_prompt, len(active))
    if spec.branch == "active":
        return active
    if spec.branch == "first":
        return [active[0]]
    if spec.branch == "sliding":
        return [active[(iteration // spec.slide_every) % len(active)]]
    if spec.branch == "random":
        pick = torch.randperm(len(active), generator=gen)[:k]
    else:  # sample_active
        if spec.branch_weighting == "entropy":
            w = torch.tensor([plan.steps[i].merged_entropy for i in active], dtype=torch.float64)
        else:
            w = torch.ones(len(active), dtype=torch.float64)
        pick = torch.multinomial(w, k, replacement=False, generator=gen)
    return sorted(active[i] for i in pick.tolist())
