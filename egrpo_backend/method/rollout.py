"""Grouped rollouts (docs/algorithm.md, "Rollouts"): shared noise, shared ODE anchor, branch, ODE finish.

For each prompt p and each branch step n chosen this iteration (E-GRPO: every active step):
  1. one initial noise per prompt, shared by all groups and members (option: one per member);
  2. a deterministic ODE anchor from sigma_0, computed ONCE per prompt; its state x_n and its
     velocity v_n are the input of every member of the group of step n;
  3. G members take the consolidated SDE step n -> n + l_n with independent noise. The anchor
     already evaluated v_n, so the branch costs no model evaluation; later window steps
     (baselines with several SDE steps) evaluate each member;
  4. every member is finished by ODE to sigma = 0, on every granularity grid.
Rollout samples only: it returns clean latents and which prompt each came from; the trainer
decodes and scores them (data flows one way: sample -> score -> update).

Randomness: every draw for prompt p (its initial noise, its members' SDE noise) comes from
generators[p], which the caller derives from (seed, iteration, prompt). So a prompt's rollout does
not depend on which other prompts share its batch, its process or its rank.

Model evaluations (NFE) per prompt, E-GRPO with shared noise and a window of one step:
  NFE = c * [ (n_max + 1) + G * sum_{n in branches} sum_{g in granularities} K(n, g) ]
  where c = 2 with CFG (else 1), n_max = the largest branch step, and K(n, g) = the number of
  steps of the coarse grid that keeps every g-th sigma of sigma_{n+l_n} .. sigma_T and ends at 0.
  Paper setting (T 16, shift 3, eta 0.7, tau 2.2, active 0-7, G 8): 8 + 8 * 83 = 672.
`expected_nfe` computes the general count; tests prove it equals what the policy was asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .guidance import GuidedVelocity, evaluations_per_call
from .schedule import EntropyPlan, merge_width
from .sde import ode_step, sde_step


def coarse_grid(sigmas: list[float], granularity: int) -> list[float]:
    """Keep every g-th sigma; always end exactly at sigma = 0."""
    out = list(sigmas[::granularity])
    if out[-1] != sigmas[-1]:
        out.append(sigmas[-1])
    return out


def coarse_grid_authors(sigmas: list[float], granularity: int) -> list[float]:
    """The E-GRPO authors' granularity grid from the branch's end: one fine step, then every g-th.

    `sigmas` runs from the sigma the SDE step reached to 0. The authors concatenate the fine prefix
    with every g-th sigma after the first fine step and return the x0-prediction of the last model
    call, so when the stride does not land on 0 the last kept sigma is replaced by 0 (the final
    step jumps to 0 from the sigma before it). docs/baselines.md (E-GRPO, granularities) works an
    example; g = 1 gives the fine grid unchanged. VisualGRPO fastvideo/workers/sampler/
    flux_sampler.py:551-554 (grid), :386-410 (ODE loop and its x0-prediction).
    """
    out = [sigmas[0], *sigmas[1::granularity]]
    if out[-1] != sigmas[-1]:
        out[-1] = sigmas[-1]
    return out


GRANULARITY_GRIDS = {"authors": coarse_grid_authors, "strided": coarse_grid}  # AlgorithmSpec.granularity_grid


def finish_grid(sigmas: list[float], granularity: int, kind: str = "authors") -> list[float]:
    """The ODE finish grid from a member's SDE end (`sigmas` runs to 0) for one granularity."""
    if kind not in GRANULARITY_GRIDS:
        raise ValueError(f"unknown granularity grid {kind!r}; valid: {', '.join(GRANULARITY_GRIDS)}")
    return GRANULARITY_GRIDS[kind](sigmas, granularity)


def window_steps(plan: EntropyPlan, start: int, sde_window: int, last_step: int | None = None) -> list[tuple[int, int]]:
    """Consecutive consolidated SDE steps (k, k + l_k) from `start`; sde_window 0 = until sigma = 0.

    `last_step` cuts the window after that step (MixGRPO cuts at its last active step, T - 3).
    """
    steps, k, T = [], start, plan.num_steps if last_step is None else min(plan.num_steps, last_step + 1)
    while k < T and (sde_window == 0 or len(steps) < sde_window):
        l = plan.steps[k].merge if plan.steps[k].kind == "sde" else merge_width(plan.sigmas, plan.g, k, plan.tau)
        steps.append((k, k + l))
        k += l
    return steps


def expected_nfe(plan: EntropyPlan, starts: list[int], group_size: int, granularities: list[int],
                 sde_window: int = 1, shared_initial_noise: bool = True, guidance_scale: float = 1.0,
                 granularity_grid: str = "authors", window_last_step: int | None = None) -> int:
    """Model evaluations per prompt of one rollout (see the module docstring)."""
    G, total = group_size, 0
    if shared_initial_noise:
        total += max(starts) + 1  # the anchor, up to and including v at the last branch step
    for n in starts:
        steps = window_steps(plan, n, sde_window, window_last_step)
        if not shared_initial_noise:
            total += G * (n + 1)  # each member's own ODE prefix plus v at the branch step
        total += G * (len(steps) - 1)  # window steps after the first see diverged inputs
        end = steps[-1][1]
        for g in granularities:
            total += G * (len(finish_grid(list(plan.sigmas[end:]), g, granularity_grid)) - 1)
    return total * evaluations_per_call(guidance_scale)


@dataclass
class Rollout:
    """What one iteration sampled. U unique update inputs, N transitions, R = groups * G members."""

    # Unique model inputs of the update: members of a group that branch from the same anchor
    # state share one input, so one forward with gradients serves all G of them.
    input_x: torch.Tensor  # [U, *latent]
    input_sigma: torch.Tensor  # [U]
    input_prompt: torch.Tensor  # [U] prompt row in the iteration's cond
    input_step: torch.Tensor  # [U] grid index of the step (for per-step updates)
    # Recorded transitions (one per member per SDE step).
    input_id: torch.Tensor  # [N] which unique input
    x_next: torch.Tensor  # [N, *latent]
    sigma_next: torch.Tensor  # [N]
    g: torch.Tensor  # [N] diffusion coefficient at the step
    log_prob: torch.Tensor  # [N] old log-prob (behaviour policy)
    member: torch.Tensor  # [N] row in the member table (group * G + m)
    window_pos: torch.Tensor  # [N] position of the step inside the member's window
    # Groups, members and their clean samples.
    group_prompt: torch.Tensor  # [NG] prompt row of each group
    group_start: torch.Tensor  # [NG] branch step of each group
    member_prompt: torch.Tensor  # [R] prompt row of each member
    final: torch.Tensor  # [R, n_gran, *latent] clean latents (sigma = 0) per granularity, on the CPU
    nfe: int  # model evaluations spent


class TransitionRecorder:
    """Collects update inputs and transitions step by step; `stack()` once at the end."""

    INPUTS = ("input_x", "input_sigma", "input_prompt", "input_step")
    TRANSITIONS = ("input_id", "x_next", "sigma_next", "g", "log_prob", "member", "window_pos")

    def __init__(self):
        self.parts = {k: [] for k in self.INPUTS + self.TRANSITIONS}
        self.n_inputs = 0

    def add_inputs(self, x, sigma, prompt, step) -> torch.Tensor:
        """Register unique update inputs; returns their ids."""
        for key, value in zip(self.INPUTS, (x, sigma, prompt, step)):
            self.parts[key].append(value.cpu())
        ids = torch.arange(self.n_inputs, self.n_inputs + x.shape[0])
        self.n_inputs += x.shape[0]
        return ids

    def add_transitions(self, **values) -> None:
        for key in self.TRANSITIONS:
            self.parts[key].append(values[key].cpu())

    def stack(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in self.parts.items()}


def _per_prompt_noise(generators, prompt_rows: torch.Tensor, shape) -> torch.Tensor:
    """Standard normal noise for rows (sorted by prompt), each prompt's rows from its own generator."""
    parts = [torch.randn((int((prompt_rows == p).sum()), *shape), generator=gen) for p, gen in enumerate(generators)]
    return torch.cat(parts)


def _integrate(velocity: GuidedVelocity, x, grids: list[list[float]], prompt_rows: torch.Tensor):
    """ODE along per-row sigma grids (rows may have different lengths), batched across rows."""
    x = x.clone()
    for j in range(max(len(gr) for gr in grids) - 1):
        rows = torch.tensor([r for r, gr in enumerate(grids) if len(gr) - 1 > j], dtype=torch.long)
        if rows.numel() == 0:
            break
        s = torch.tensor([grids[r][j] for r in rows.tolist()], dtype=torch.float32, device=x.device)
        sn = torch.tensor([grids[r][j + 1] for r in rows.tolist()], dtype=torch.float32, device=x.device)
        xr = x[rows.to(x.device)]
        x[rows.to(x.device)] = ode_step(xr, velocity(xr, s, prompt_rows[rows]), s, sn)
    return x


def _branch_inputs(velocity, plan, generators, starts, member_prompt, member_start, G, shared_initial_noise):
    """Every member's state x_n and velocity v_n at its branch step n: [R, *latent] each."""
    sig, dev, shape = list(plan.sigmas), velocity.policy.device, tuple(velocity.policy.latent_shape)
    if not shared_initial_noise:  # each member runs its own ODE prefix from its own noise
        z = _per_prompt_noise(generators, member_prompt, shape).to(dev)
        X = _integrate(velocity, z, [sig[: n + 1] for n in member_start.tolist()], member_prompt)
        s = torch.tensor([sig[n] for n in member_start.tolist()], device=dev)
        return X, velocity(X, s, member_prompt)
    P = len(generators)
    prow = torch.arange(P)
    x = _per_prompt_noise(generators, prow, shape).to(dev)
    anchor_x, anchor_v = {}, {}
    for k in range(max(starts) + 1):  # the anchor: ONE ODE trajectory per prompt
        s = torch.full((P,), sig[k], device=dev)
        v = velocity(x, s, prow)
        if k in starts:
            anchor_x[k], anchor_v[k] = x.clone(), v
        x = ode_step(x, v, s, torch.full((P,), sig[k + 1], device=dev))
    pairs = list(zip(member_prompt[::G].tolist(), member_start[::G].tolist()))  # one per group
    X = torch.stack([anchor_x[n][p] for p, n in pairs]).repeat_interleave(G, 0)
    V = torch.stack([anchor_v[n][p] for p, n in pairs]).repeat_interleave(G, 0)
    return X, V


def _sde_window(velocity, plan, generators, X, V, member_prompt, member_start, G, windows, shared_initial_noise,
                recorder: TransitionRecorder) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's SDE steps (`windows`: branch step -> window_steps) from its branch step; returns the
    states after them and where they end."""
    sig, dev, R = list(plan.sigmas), X.device, X.shape[0]
    end_index = torch.zeros(R, dtype=torch.long)
    for pos in range(max(len(w) for w in windows.values())):
        rows = torch.tensor([r for r in range(R) if len(windows[member_start[r].item()]) > pos], dtype=torch.long)
        ks = [windows[member_start[r].item()][pos] for r in rows.tolist()]
        s = torch.tensor([sig[a] for a, _ in ks], dtype=torch.float32, device=dev)
        sn = torch.tensor([sig[b] for _, b in ks], dtype=torch.float32, device=dev)
        g = torch.tensor([plan.g[a] for a, _ in ks], dtype=torch.float32, device=dev)
        step = torch.tensor([a for a, _ in ks])
        xr = X[rows.to(dev)]
        if pos == 0 and shared_initial_noise:  # members of a group share this input: register it once
            v = V[rows.to(dev)]
            ids = recorder.add_inputs(xr[::G], s[::G], member_prompt[rows[::G]], step[::G]).repeat_interleave(G)
        else:
            v = V[rows.to(dev)] if pos == 0 else velocity(xr, s, member_prompt[rows])
            ids = recorder.add_inputs(xr, s, member_prompt[rows], step)
        out = sde_step(xr, v, s, sn, g, noise=_per_prompt_noise(generators, member_prompt[rows], xr.shape[1:]).to(dev))
        X[rows.to(dev)] = out.x_next.to(X.dtype)
        end_index[rows] = torch.tensor([b for _, b in ks])
        recorder.add_transitions(input_id=ids, x_next=out.x_next, sigma_next=sn, g=g, log_prob=out.log_prob,
                                 member=rows, window_pos=torch.full((len(rows),), pos, dtype=torch.long))
    return X, end_index


@torch.no_grad()
def rollout(
    velocity: GuidedVelocity,
    plan: EntropyPlan,
    starts: list[int],
    generators: list[torch.Generator],
    *,
    group_size: int,
    granularities: list[int] = (1,),
    sde_window: int = 1,
    shared_initial_noise: bool = True,
    granularity_grid: str = "authors",
    window_last_step: int | None = None,
) -> Rollout:
    """G members per (prompt, branch step). Prompt p is row p of velocity.cond and draws from generators[p]."""
    P, G = len(generators), group_size
    assert P >= 1 and G >= 2 and starts, "need prompts, G >= 2 and at least one branch step"
    nfe_before = velocity.nfe
    # Groups are (prompt, branch step), prompt-major; members are G consecutive rows of a group.
    group_prompt = torch.arange(P).repeat_interleave(len(starts))  # [NG]
    group_start = torch.tensor(starts, dtype=torch.long).repeat(P)  # [NG]
    member_prompt, member_start = group_prompt.repeat_interleave(G), group_start.repeat_interleave(G)  # [R]

    # 1-2. Shared noise and the ODE anchor give every member its branch input.
    X, V = _branch_inputs(velocity, plan, generators, starts, member_prompt, member_start, G, shared_initial_noise)
    # 3. The SDE window, recorded for the update.
    recorder = TransitionRecorder()
    windows = {n: window_steps(plan, n, sde_window, window_last_step) for n in starts}
    X, end_index = _sde_window(velocity, plan, generators, X, V, member_prompt, member_start, G, windows,
                               shared_initial_noise, recorder)
    # 4. ODE finish on every granularity grid.
    sig = list(plan.sigmas)
    finals = [_integrate(velocity, X, [finish_grid(sig[e:], g, granularity_grid) for e in end_index.tolist()],
                         member_prompt).cpu()
              for g in granularities]
    return Rollout(**recorder.stack(), group_prompt=group_prompt, group_start=group_start, member_prompt=member_prompt,
                   final=torch.stack(finals, 1), nfe=velocity.nfe - nfe_before)
