"""E-GRPO and the baselines as named presets of one engine (docs/baselines.md).

A preset is only a set of AlgorithmSpec values; the rollout, advantage and loss code never asks
which preset it runs. Fields a preset does not set keep AlgorithmSpec's defaults, which are the
paper's E-GRPO (tau 2.2, first 8 of 16 steps, one merged SDE step per group, clip 1e-4). Each
baseline mirrors its reference code by default; docs/baselines.md gives, per preset, what the
reference does (file:line), what the preset does, and every difference that is kept.

The trainer reads `train_mask` (train_last_step, train_subset, train_fraction) and `branch_starts`
(slide_rollback), and the rollout cuts windows at the last active step (window_within_active).
`loss` picks the update: "grpo" (every preset above) or "nft" (DiffusionNFT: nft_update.py runs the
whole iteration, ODE rollouts and the negative-aware loss). The granularity grids are in rollout.py
(GRANULARITY_GRIDS).
"""

from __future__ import annotations

import torch

from .rollout import coarse_grid_authors  # noqa: F401 (re-exported: the preset docs name it here)

PRESETS: dict[str, dict] = {
    # The paper: one group per active step, consolidated SDE step, ODE elsewhere; the authors'
    # released config finishes every member on the fine and the 2-strided grid.
    "egrpo": {"granularities": [1, 2]},
    # Ours: E-GRPO's plan and merged steps, but each iteration branches at a sample of the active
    # steps (uniform or weighted by merged entropy), so a rollout costs a fraction of full E-GRPO's.
    "egrpo_fast": {"branch": "sample_active", "branches_per_prompt": 2, "branch_weighting": "uniform"},
    # Granular-GRPO: E-GRPO with single steps (tau = 0) plus multi-granularity ODE finishes.
    "granular": {"tau": 0.0, "granularities": [1, 2]},
    # DanceGRPO: every step SDE with constant diffusion (eta 0.3), trains a random subset of steps:
    # int(0.6 * (T - 1)) of the steps before the last (9 of 15 at T = 16), drawn per member.
    "dance": {
        "tau": 0.0, "diffusion": "constant", "eta": 0.3, "active": "all", "branch": "first",
        "sde_window": 0, "train_fraction": 0.6, "train_last_step": False, "train_subset": "per_sample",
    },
    # Flow-GRPO: every step SDE, independent initial noise per member, per-prompt mean / batch std;
    # the last step is sampled but never trained; KL divided by g^2 (Flow-GRPO's std_dev_t^2).
    "flowgrpo": {
        "tau": 0.0, "active": "all", "branch": "first", "sde_window": 0,
        "shared_initial_noise": False, "advantage": "prompt_mean_batch_std",
        "train_last_step": False, "kl_form": "flow_grpo",
    },
    # Flow-GRPO-Fast: independent initial noise, ODE except a window of 2 SDE steps that starts at
    # a uniform step of 0..T-2 (0-14 at T = 16), per-prompt mean / batch std.
    "flowgrpo_fast": {
        "tau": 0.0, "active": "0-14", "branch": "random", "sde_window": 2,
        "shared_initial_noise": False, "advantage": "prompt_mean_batch_std", "kl_form": "flow_grpo",
    },
    # MixGRPO: a window of 4 SDE steps, ODE outside it, that moves one step every 25 iterations
    # over the steps 0..T-3 (0-13 at T = 16) and then starts again; advantages per reward.
    "mixgrpo": {
        "tau": 0.0, "active": "0-13", "branch": "sliding", "sde_window": 4, "slide_every": 25,
        "reward_mode": "per_reward", "slide_rollback": True, "window_within_active": True,
    },
    # DiffusionNFT, single reward (HPS / PickScore / GenEval configs): ODE rollouts of the old policy
    # from independent noise without CFG, r from per-prompt mean / batch std advantages clipped at 5,
    # beta 1, old-policy EMA schedule 1, trained at int(T x 0.99) sigmas per sample, velocity KL 1e-4.
    # DiffusionNFT config/nft.py:24 (kl 1e-4), :60-66 (decay 1, beta 1, guidance 1, deterministic),
    # config/base.py:57, :87 (global std, timestep_fraction 0.99), scripts/train_nft_sd3.py:910-970.
    "nft": {
        "loss": "nft", "nft_beta": 1.0, "nft_decay": 1, "nft_timestep_fraction": 0.99, "tau": 0.0,
        "shared_initial_noise": False, "advantage": "prompt_mean_batch_std", "advantage_clip": 5.0,
        "guidance_scale": 1.0, "kl_beta": 1e-4, "granularities": [1],
    },
    # DiffusionNFT, several rewards summed: beta 0.1 (config/nft.py:137; the OCR config :77 too).
    "nft_multi_reward": {
        "loss": "nft", "nft_beta": 0.1, "nft_decay": 1, "nft_timestep_fraction": 0.99, "tau": 0.0,
        "shared_initial_noise": False, "advantage": "prompt_mean_batch_std", "advantage_clip": 5.0,
        "guidance_scale": 1.0, "kl_beta": 1e-4, "granularities": [1],
    },
}

LOSSES = ("grpo", "nft")  # AlgorithmSpec.loss: grpo = Trainer.update (clipped ratio) | nft = nft_update.NFTUpdate

BRANCH_KINDS = ("active", "sample_active", "random", "sliding", "first")
BRANCH_WEIGHTINGS = ("uniform", "entropy")
TRAIN_SUBSETS = ("per_group", "per_sample")  # AlgorithmSpec.train_subset
KL_FORMS = ("gaussian", "flow_grpo")  # AlgorithmSpec.kl_form: sde.gaussian_kl | sde.flow_grpo_kl
UPDATE_MODES = ("averaged", "per_step")  # AlgorithmSpec.update_mode: averaged = one loss over all active steps (paper); per_step = an optimizer step each (authors' code)


def branch_starts(spec, plan, iteration: int, gen: torch.Generator) -> list[int]:
    """Where this iteration's groups branch (AlgorithmSpec.branch, one of BRANCH_KINDS)."""
    active = plan.active
    k = min(spec.branches_per_prompt, len(active))
    if spec.branch == "active":
        return active
    if spec.branch == "first":
        return [active[0]]
    if spec.branch == "sliding":
        return sliding_window(iteration, active, spec.sde_window, spec.slide_every,
                              rollback=spec.slide_rollback)[:1]
    if spec.branch == "random":
        pick = torch.randperm(len(active), generator=gen)[:k]
    else:  # sample_active
        if spec.branch_weighting == "entropy":
            w = torch.tensor([plan.steps[i].merged_entropy for i in active], dtype=torch.float64)
        else:
            w = torch.ones(len(active), dtype=torch.float64)
        pick = torch.multinomial(w, k, replacement=False, generator=gen)
    return sorted(active[i] for i in pick.tolist())


def sliding_window(iteration: int, active: list[int], window: int, slide_every: int, *,
                   rollback: bool = True, within_active: bool = True) -> list[int]:
    """MixGRPO's progressive window: the steps trained at `iteration`.

    The start moves one active step every `slide_every` iterations; after the last active step it
    starts again at the first (`rollback`) or stays there. With `within_active` the window is cut
    at the last active step, as MixGRPO cuts it at T-3 (docs/baselines.md, MixGRPO). Window 0
    (SDE to the end) runs to the last active step. MixGRPO fastvideo/utils/grpo_states.py:85-148,
    fastvideo/train_grpo_flux.py:915-947.
    """
    k = iteration // slide_every
    start = active[k % len(active)] if rollback else active[min(k, len(active) - 1)]
    steps = list(range(start, start + window if window > 0 else active[-1] + 1))
    if within_active:
        steps = [s for s in steps if s <= active[-1]]
    return steps


def trained_count(candidates: int, fraction: float) -> int:
    """How many of `candidates` steps a member trains: int(candidates * fraction), at least 1 (DanceGRPO)."""
    return candidates if fraction >= 1.0 else max(1, int(candidates * fraction))


def train_mask(window_pos: torch.Tensor, member: torch.Tensor, sigma_next: torch.Tensor, *, group_size: int,
               fraction: float, train_last_step: bool, subset: str, gen: torch.Generator,
               unit_offset: int = 0, total_units: int | None = None) -> torch.Tensor:
    """[N] bool: which recorded transitions the update trains.

    1. Without `train_last_step`, transitions that end at sigma = 0 are dropped (DanceGRPO and
       Flow-GRPO sample the last step but never train it).
    2. With fraction < 1, each unit (a group, or a member for `per_sample`) keeps
       trained_count(n, fraction) of its n remaining window positions, drawn at random.
    DanceGRPO at T = 16: 15 candidate steps, 9 trained, a fresh draw per member (DanceGRPO
    fastvideo/train_grpo_flux.py:512-519, :551-572; Flow-GRPO scripts/train_sd3.py:345, :869).
    """
    if subset not in TRAIN_SUBSETS:
        raise ValueError(f"unknown train subset {subset!r}; valid: {', '.join(TRAIN_SUBSETS)}")
    keep = torch.ones(member.numel(), dtype=torch.bool) if train_last_step else (sigma_next > 0).cpu()
    if fraction >= 1.0:
        return keep
    unit = (member if subset == "per_sample" else member // group_size) + unit_offset
    # Data parallel (docs/scale_out.md): every rank draws every rank's units in one order, keeps its own,
    # so the subsets equal one process's. Units hold the same window positions within an iteration.
    first = window_pos[(unit == unit.min()) & keep].unique()
    for u in (range(total_units) if total_units else unit.unique().tolist()):
        sel = unit == u
        pos = window_pos[sel & keep].unique() if bool(sel.any()) else first
        chosen = pos[torch.randperm(pos.numel(), generator=gen)[: trained_count(pos.numel(), fraction)]]
        keep[sel] &= torch.isin(window_pos[sel], chosen)
    return keep
