"""Grouped rollouts (SPEC 4): shared noise, shared ODE anchor, branch, ODE finish.

For each prompt p and each branch step n chosen this iteration (E-GRPO: every active step):
  1. one initial noise per prompt, shared by all groups and members (option: one per member);
  2. a deterministic ODE anchor from sigma_0, computed ONCE per prompt; its state x_n and its
     velocity v_n are the input of every member of the group of step n;
  3. G members take the consolidated SDE step n -> n + l_n with independent noise. The anchor
     already evaluated v_n, so the branch costs no model evaluation; later window steps
     (baselines with several SDE steps) evaluate each member;
  4. every member is finished by ODE to sigma = 0, on every granularity grid (SPEC 4.5), decoded
     and rewarded.

Model evaluations (NFE) per prompt, E-GRPO with shared noise and a window of one step:
  NFE = c * [ (n_max + 1) + G * sum_{n in branches} sum_{g in granularities} K(n, g) ]
  where c = 2 with CFG (else 1), n_max = the largest branch step, and K(n, g) = the number of
  steps of the coarse grid that keeps every g-th sigma of sigma_{n+l_n} .. sigma_T and ends at 0.
  Paper setting (T 16, shift 3, eta 0.7, tau 2.2, active 0-7, G 8): 8 + 8 * 83 = 672.
`expected_nfe` computes the general count; tests prove it equals what the policy was asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .guidance import evaluations_per_call, guided_velocity
from .policies.base import Cond, FlowPolicy, cond_select
from .schedule import EntropyPlan, merge_width
from .sde import ode_step, sde_step


def coarse_grid(sigmas: list[float], granularity: int) -> list[float]:
    """Keep every g-th sigma; always end exactly at sigma = 0."""
    out = list(sigmas[::granularity])
    if out[-1] != sigmas[-1]:
        out.append(sigmas[-1])
    return out


def window_steps(plan: EntropyPlan, start: int, window: int) -> list[tuple[int, int]]:
    """Consecutive consolidated SDE steps (k, k + l_k) from `start`; window 0 = until sigma = 0."""
    steps, k, T = [], start, plan.num_steps
    while k < T and (window == 0 or len(steps) < window):
        l = plan.steps[k].merge if plan.steps[k].kind == "sde" else merge_width(plan.sigmas, plan.g, k, plan.tau)
        steps.append((k, k + l))
        k += l
    return steps


def expected_nfe(plan: EntropyPlan, starts: list[int], group_size: int, granularities: list[int],
                 window: int = 1, shared_noise: bool = True, guidance_scale: float = 1.0) -> int:
    """Model evaluations per prompt of one rollout (see the module docstring)."""
    G, total = group_size, 0
    if shared_noise:
        total += max(starts) + 1  # the anchor, up to and including v at the last branch step
    for n in starts:
        steps = window_steps(plan, n, window)
        if not shared_noise:
            total += G * (n + 1)  # each member's own ODE prefix plus v at the branch step
        total += G * (len(steps) - 1)  # window steps after the first see diverged inputs
        end = steps[-1][1]
        for g in granularities:
            total += G * (len(coarse_grid(list(plan.sigmas[end:]), g)) - 1)
    return total * evaluations_per_call(guidance_scale)


@dataclass
class Rollout:
    """Everything the update needs. U unique inputs, N transitions, R = groups * G members."""

    # Unique model inputs of the update: members of a group that branch from the same anchor
    # state share one input, so one forward with gradients serves all G of them.
    input_x: torch.Tensor  # [U, *latent]
    input_sigma: torch.Tensor  # [U]
    input_prompt: torch.Tensor  # [U] prompt row in `cond`
    input_step: torch.Tensor  # [U] grid index of the step (for per-step updates)
    # Recorded transitions (one per member per SDE step).
    input_id: torch.Tensor  # [N] which unique input
    x_next: torch.Tensor  # [N, *latent]
    sigma_next: torch.Tensor  # [N]
    g: torch.Tensor  # [N] diffusion coefficient at the step
    log_prob: torch.Tensor  # [N] old log-prob (behaviour policy)
    member: torch.Tensor  # [N] row in the member table (group * G + m)
    window_pos: torch.Tensor  # [N] position of the step inside the member's window
    # Groups and rewards.
    group_prompt: torch.Tensor  # [NG] prompt of each group
    group_start: torch.Tensor  # [NG] branch step of each group
    rewards: torch.Tensor  # [NG, n_gran, G] combined reward
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [NG, n_gran, G]
    images: torch.Tensor | None = None  # [NG * G, C, H, W] finest-granularity images (logging)
    nfe: int = 0


class Counter:
    """Counts model evaluations per sample (CFG counts twice)."""

    def __init__(self, scale: float):
        self.per_row, self.count = evaluations_per_call(scale), 0

    def add(self, rows: int) -> None:
        self.count += rows * self.per_row


def _velocity_chunked(policy, x, sigma, cond, prompt_rows, uncond, scale, chunk, counter):
    out = []
    for i in range(0, x.shape[0], chunk):
        rows = prompt_rows[i : i + chunk]
        out.append(guided_velocity(policy, x[i : i + chunk], sigma[i : i + chunk], cond_select(cond, rows), uncond, scale).float())
        counter.add(rows.numel())
    return torch.cat(out)


def _integrate(policy, x, grids, cond, prompt_rows, uncond, scale, chunk, counter):
    """ODE along per-row sigma grids (rows may have different lengths), batched across rows."""
    x = x.clone()
    longest = max(len(gr) for gr in grids)
    for j in range(longest - 1):
        rows = torch.tensor([r for r, gr in enumerate(grids) if len(gr) - 1 > j], dtype=torch.long)
        if rows.numel() == 0:
            break
        s = torch.tensor([grids[r][j] for r in rows.tolist()], dtype=torch.float32, device=x.device)
        sn = torch.tensor([grids[r][j + 1] for r in rows.tolist()], dtype=torch.float32, device=x.device)
        xr = x[rows.to(x.device)]
        v = _velocity_chunked(policy, xr, s, cond, prompt_rows[rows], uncond, scale, chunk, counter)
        x[rows.to(x.device)] = ode_step(xr, v, s, sn)
    return x


@torch.no_grad()
def rollout(
    policy: FlowPolicy,
    plan: EntropyPlan,
    cond: Cond,
    prompts: list[str],
    starts: list[int],
    reward_fn,
    *,
    group_size: int,
    generator: torch.Generator,
    granularities: list[int] = (1,),
    window: int = 1,
    shared_noise: bool = True,
    uncond: Cond | None = None,
    guidance_scale: float = 1.0,
    chunk: int = 64,
) -> Rollout:
    """Roll out G members per (prompt, branch step); reward_fn(images, prompts) -> (combined, components)."""
    P, G, dev = len(prompts), group_size, policy.device
    assert P >= 1 and G >= 2 and starts, "need prompts, G >= 2 and at least one branch step"
    sig = list(plan.sigmas)
    counter = Counter(guidance_scale)
    shape = tuple(policy.latent_shape)
    prow = torch.arange(P)

    # 1-2. Shared noise and the ODE anchor (states and velocities at every branch step).
    n_groups = P * len(starts)
    group_prompt = prow.repeat_interleave(len(starts))  # [NG]
    group_start = torch.tensor(starts, dtype=torch.long).repeat(P)  # [NG]
    member_prompt = group_prompt.repeat_interleave(G)  # [R]
    member_start = group_start.repeat_interleave(G)  # [R]
    if shared_noise:
        x = torch.randn((P, *shape), generator=generator).to(dev)
        anchor_x, anchor_v = {}, {}
        for k in range(max(starts) + 1):
            s = torch.full((P,), sig[k], device=dev)
            v = _velocity_chunked(policy, x, s, cond, prow, uncond, guidance_scale, chunk, counter)
            if k in starts:
                anchor_x[k], anchor_v[k] = x.clone(), v
            x = ode_step(x, v, s, torch.full((P,), sig[k + 1], device=dev))
        # Every member of group (p, n) starts from the anchor's x_n with the anchor's v_n.
        X = torch.stack([anchor_x[n][p] for p, n in zip(group_prompt.tolist(), group_start.tolist())])
        V = torch.stack([anchor_v[n][p] for p, n in zip(group_prompt.tolist(), group_start.tolist())])
        X, V = X.repeat_interleave(G, 0), V.repeat_interleave(G, 0)  # [R, *latent]
    else:
        z = torch.randn((n_groups * G, *shape), generator=generator).to(dev)
        grids = [sig[: n + 1] for n in member_start.tolist()]
        X = _integrate(policy, z, grids, cond, member_prompt, uncond, guidance_scale, chunk, counter)
        s = torch.tensor([sig[n] for n in member_start.tolist()], device=dev)
        V = _velocity_chunked(policy, X, s, cond, member_prompt, uncond, guidance_scale, chunk, counter)

    # 3. The SDE window: first step from the shared input, later steps from each member's state.
    windows = {n: window_steps(plan, n, window) for n in set(starts)}
    R = n_groups * G
    inputs_x, inputs_sigma, inputs_prompt, inputs_step = [], [], [], []
    t_input, t_next, t_snext, t_g, t_lp, t_member, t_pos = [], [], [], [], [], [], []
    end_index = torch.zeros(R, dtype=torch.long)
    longest = max(len(w) for w in windows.values())
    for pos in range(longest):
        rows = [r for r in range(R) if len(windows[member_start[r].item()]) > pos]
        rows_t = torch.tensor(rows, dtype=torch.long)
        ks = [windows[member_start[r].item()][pos] for r in rows]
        s = torch.tensor([sig[a] for a, _ in ks], dtype=torch.float32, device=dev)
        sn = torch.tensor([sig[b] for _, b in ks], dtype=torch.float32, device=dev)
        gg = torch.tensor([plan.g[a] for a, _ in ks], dtype=torch.float32, device=dev)
        xr = X[rows_t.to(dev)]
        if pos == 0 and shared_noise:
            v = V[rows_t.to(dev)]
            # Members of one group share this input: register it once per group.
            ids = sum(t.shape[0] for t in inputs_x) + torch.arange(len(rows)) // G
            inputs_x.append(xr[::G])
            inputs_prompt.append(member_prompt[rows_t[::G]])
            inputs_sigma.append(s[::G].cpu())
            inputs_step.append(torch.tensor([a for a, _ in ks[::G]]))
        else:
            v = V[rows_t.to(dev)] if pos == 0 else _velocity_chunked(
                policy, xr, s, cond, member_prompt[rows_t], uncond, guidance_scale, chunk, counter)
            ids = sum(t.shape[0] for t in inputs_x) + torch.arange(len(rows))
            inputs_x.append(xr)
            inputs_prompt.append(member_prompt[rows_t])
            inputs_sigma.append(s.cpu())
            inputs_step.append(torch.tensor([a for a, _ in ks]))
        noise = torch.randn(xr.shape, generator=generator).to(dev)
        out = sde_step(xr, v, s, sn, gg, noise=noise)
        X[rows_t.to(dev)] = out.x_next.to(X.dtype)
        end_index[rows_t] = torch.tensor([b for _, b in ks])
        t_input.append(ids)
        t_next.append(out.x_next)
        t_snext.append(sn.cpu())
        t_g.append(gg.cpu())
        t_lp.append(out.log_prob.cpu())
        t_member.append(rows_t)
        t_pos.append(torch.full((len(rows),), pos, dtype=torch.long))

    # 4. ODE finish on every granularity grid, decode, reward.
    finals = []
    for gran in granularities:
        grids = [coarse_grid(sig[e:], gran) for e in end_index.tolist()]
        finals.append(_integrate(policy, X, grids, cond, member_prompt, uncond, guidance_scale, chunk, counter))
    final = torch.stack(finals, 1)  # [R, n_gran, *latent]
    images = policy.decode(final.flatten(0, 1))  # [R * n_gran, C, H, W]
    row_prompts = [prompts[p] for p in member_prompt.repeat_interleave(len(granularities)).tolist()]
    combined, components = reward_fn(images, row_prompts)

    def to_groups(t):  # [R * n_gran] -> [NG, n_gran, G]
        return t.reshape(n_groups, G, len(granularities)).transpose(1, 2).contiguous()

    return Rollout(
        input_x=torch.cat(inputs_x),
        input_sigma=torch.cat(inputs_sigma),
        input_prompt=torch.cat(inputs_prompt),
        input_step=torch.cat(inputs_step),
        input_id=torch.cat(t_input),
        x_next=torch.cat(t_next),
        sigma_next=torch.cat(t_snext),
        g=torch.cat(t_g),
        log_prob=torch.cat(t_lp),
        member=torch.cat(t_member),
        window_pos=torch.cat(t_pos),
        group_prompt=group_prompt,
        group_start=group_start,
        rewards=to_groups(combined),
        components={k: to_groups(v) for k, v in components.items()},
        images=images.reshape(R, len(granularities), *images.shape[1:])[:, 0].cpu(),
        nfe=counter.count,
    )
