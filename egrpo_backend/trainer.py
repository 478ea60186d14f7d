"""The training loop: rollout -> reward -> advantage -> clipped update (SPEC 4-6).

Every random choice of iteration i comes from a generator seeded with (seed, i), so a run resumed
from a checkpoint at iteration k repeats iterations k.. exactly as a straight run would.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from .advantage import advantages
from .algorithms import branch_starts
from .config import JobSpec
from .guidance import guided_velocity
from .objective import clipped_objective
from .policies.base import FlowPolicy, cond_select
from .rollout import Rollout, rollout
from .rewards.combine import WeightedRewards
from .sde import gaussian_kl, sde_step

log = logging.getLogger(__name__)
UPDATE_MODES = ("averaged", "per_step")  # averaged: one loss over all active steps (paper); per_step: an optimizer step each (authors' code)


def lr_at(iteration: int, base_lr: float, total: int, schedule: str, warmup: int) -> float:
    """Learning rate for an iteration: 1) linear warm-up, 2) constant / cosine / linear decay."""
    if warmup and iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (iteration - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr * (1 - progress)


def iteration_generator(seed: int, iteration: int, stream: int = 0) -> torch.Generator:
    """Independent, reproducible randomness per (seed, iteration, stream).

    Offset by 2**40 so training never draws from the small seeds held-out evaluations use."""
    return torch.Generator().manual_seed(2**40 + (seed * 1_000_003 + iteration) * 7 + stream)


@dataclass
class TrainerState:
    iteration: int = 0  # iterations completed
    cursor: int = 0  # prompts consumed from the (epoch-shuffled) prompt stream
    nfe: int = 0  # model evaluations so far (rollouts and updates)
    history: list = field(default_factory=list)  # per-iteration metrics


class Trainer:
    def __init__(self, policy: FlowPolicy, spec: JobSpec, reward: WeightedRewards, prompts: list[str]):
        if not prompts:
            raise ValueError("no training prompts; give at least one prompt")
        self.policy, self.spec, self.reward, self.prompts = policy, spec, reward, list(prompts)
        self.algo, self.cfg = spec.algorithm, spec.train
        self.plan = self.algo.plan()
        params = policy.trainable_parameters()
        if not params:
            raise ValueError("the policy has no trainable (LoRA) parameters; call lora.add_lora first")
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.state = TrainerState()
        self.uncond = policy.encode([self.algo.negative_prompt]) if self.algo.guidance_scale != 1.0 else None

    # --- data ----------------------------------------------------------------------------------
    def next_prompts(self) -> list[str]:
        """The next prompts of a stream that reshuffles every epoch (seeded), from the saved cursor."""
        n, out = len(self.prompts), []
        for _ in range(self.cfg.prompts_per_iteration):
            epoch, pos = divmod(self.state.cursor, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
            out.append(self.prompts[order[pos]])
            self.state.cursor += 1
        return out

    def reward_fn(self, images, prompts):
        comps = self.reward.components(images, prompts)
        return self.reward.combine(comps), comps

    # --- one iteration ---------------------------------------------------------------------------
    def step(self) -> dict:
        it, t0 = self.state.iteration, time.perf_counter()
        gen = iteration_generator(self.cfg.seed, it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(it, self.cfg.lr, self.cfg.iterations, self.cfg.lr_schedule, self.cfg.warmup_iterations)

        # 1. Rollout: groups of G members per (prompt, branch step).
        prompts = self.next_prompts()
        cond = self.policy.encode(prompts)
        starts = branch_starts(self.algo, self.plan, it, gen)
        ro = rollout(self.policy, self.plan, cond, prompts, starts, self.reward_fn, group_size=self.algo.group_size,
                     generator=gen, granularities=self.algo.granularities, window=self.algo.sde_window,
                     shared_noise=self.algo.shared_initial_noise, uncond=self.uncond,
                     guidance_scale=self.algo.guidance_scale, chunk=self.cfg.rollout_batch)
        # 2. Advantages within each group: [NG, n_gran, G] -> [NG, G].
        per_reward = self.algo.reward_mode == "per_reward" and len(ro.components) > 1
        adv = advantages(ro.rewards, mode=self.algo.advantage, clip=self.algo.advantage_clip, group_prompt=ro.group_prompt,
                         components=ro.components if per_reward else None,
                         weights=dict(zip([r.name for r in self.reward.rewards], self.reward.weights)))
        # 3. Clipped policy-gradient update.
        upd = self.update(ro, adv, cond, gen)
        self.state.iteration += 1
        self.state.nfe += ro.nfe + upd.pop("nfe")
        r = ro.rewards[:, 0]  # finest granularity [NG, G]
        metrics = {
            "iteration": self.state.iteration, "reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(),
            "adv_mean": adv.mean().item(), "adv_std": adv.std(unbiased=False).item(), "adv_abs_max": adv.abs().max().item(),
            "branch_steps": starts, "nfe": ro.nfe, "nfe_total": self.state.nfe,
            "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0, **upd,
        }
        for name, comp in ro.components.items():
            if len(ro.components) > 1:
                metrics[f"reward/{name}"] = comp[:, 0].mean().item()
        self.state.history.append(metrics)
        self.last_rollout = ro
        return metrics

    def _chunks(self, units: torch.Tensor, steps: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        if self.algo.update_mode == "per_step":  # the authors' code: one optimizer step per active step
            return [units[steps == s] for s in steps.unique(sorted=True)]
        perm = units[torch.randperm(units.numel(), generator=gen)]
        return [c for c in perm.tensor_split(min(self.cfg.minibatches, perm.numel())) if c.numel()]

    def update(self, ro: Rollout, adv: torch.Tensor, cond, gen: torch.Generator) -> dict:
        G, dev = self.algo.group_size, self.policy.device
        adv_t = adv.flatten()[ro.member]  # [N] each transition inherits its member's advantage
        keep = torch.ones(ro.member.numel(), dtype=torch.bool)
        if self.algo.train_fraction < 1.0:  # DanceGRPO: train a random subset of each group's steps
            n_pos = int(ro.window_pos.max()) + 1
            n_keep = max(1, round(self.algo.train_fraction * n_pos))
            group = ro.member // G
            for gid in group.unique().tolist():
                chosen = torch.randperm(n_pos, generator=gen)[:n_keep]
                sel = group == gid
                keep[sel] &= torch.isin(ro.window_pos[sel], chosen)
        units = ro.input_id[keep].unique()
        ratios, clipfrac, losses, norms, kls, first_dev, nfe = [], [], [], [], [], None, 0
        self.policy.set_lora_enabled(True)
        for _ in range(self.cfg.inner_epochs):
            for chunk in self._chunks(units, ro.input_step[units], gen):
                n_trans = int((torch.isin(ro.input_id, chunk) & keep).sum())
                self.optimizer.zero_grad(set_to_none=True)
                for micro in chunk.split(self.cfg.micro_batch):
                    micro = micro.sort().values  # searchsorted below needs sorted ids
                    t = torch.nonzero(torch.isin(ro.input_id, micro) & keep).squeeze(1)  # [n] transitions
                    x_in = ro.input_x[micro].to(dev)
                    sigma = ro.input_sigma[micro].to(dev)
                    c = cond_select(cond, ro.input_prompt[micro])
                    # One forward with gradients per unique input; its G members reuse it.
                    v = guided_velocity(self.policy, x_in, sigma, c, self.uncond, self.algo.guidance_scale)
                    nfe += micro.numel() * (1 if self.uncond is None else 2)
                    row = torch.searchsorted(micro, ro.input_id[t]).to(dev)  # transition -> row of micro
                    out = sde_step(x_in[row], v[row], sigma[row], ro.sigma_next[t].to(dev), ro.g[t].to(dev),
                                   x_next=ro.x_next[t].to(dev))
                    terms = clipped_objective(out.log_prob, ro.log_prob[t].to(dev), adv_t[t].to(dev), self.algo.clip_range)
                    loss = terms.loss.sum() / n_trans
                    if self.algo.kl_beta > 0:
                        with torch.no_grad():  # reference = the base model (LoRA off)
                            self.policy.set_lora_enabled(False)
                            v_ref = guided_velocity(self.policy, x_in, sigma, c, self.uncond, self.algo.guidance_scale)
                            self.policy.set_lora_enabled(True)
                            ref = sde_step(x_in[row], v_ref[row], sigma[row], ro.sigma_next[t].to(dev), ro.g[t].to(dev),
                                           x_next=ro.x_next[t].to(dev))
                        kl = gaussian_kl(out.mean, ref.mean, out.scale)
                        loss = loss + self.algo.kl_beta * kl.sum() / n_trans
                        kls.append(kl.detach().cpu())
                    loss.backward()
                    if first_dev is None or len(norms) == 0:  # on-policy check: before the first optimizer step
                        dev_now = (terms.ratio - 1).abs().max().item()
                        first_dev = dev_now if first_dev is None else max(first_dev, dev_now)
                    ratios.append(terms.ratio.cpu())
                    clipfrac.append(terms.clipped.float().cpu())
                    losses.append(loss.item())
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                if not torch.isfinite(norm):
                    raise FloatingPointError("gradient norm is NaN/inf; lower train.lr or check the reward for extreme values")
                norms.append(norm.item())
                self.optimizer.step()
        ratio = torch.cat(ratios)
        out = {"ratio_mean": ratio.mean().item(), "ratio_max_dev": (ratio - 1).abs().max().item(),
               "ratio_first_dev": first_dev, "clip_frac": torch.cat(clipfrac).mean().item(),
               "loss": sum(losses), "grad_norm": sum(norms) / len(norms), "optimizer_steps": len(norms),
               "trained_transitions": int(keep.sum()), "nfe": nfe}
        if kls:
            out["kl"] = torch.cat(kls).mean().item()
        return out

    # --- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "iteration": self.state.iteration, "cursor": self.state.cursor,
                "nfe": self.state.nfe, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.state.iteration, self.state.cursor, self.state.nfe = int(sd["iteration"]), int(sd["cursor"]), int(sd["nfe"])
        torch.set_rng_state(sd["torch_rng"])
