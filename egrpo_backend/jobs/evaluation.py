"""Held-out evaluation: ODE samples for fixed (prompt, seed) pairs, reward with a bootstrap 95% CI,
and the within-prompt diversity that guards against reward hacking (collapse to one shape)."""

from __future__ import annotations

import torch

from ..method.guidance import GuidedVelocity
from ..policies.base import FlowPolicy
from ..method.sde import ode_step


@torch.no_grad()
def sample_ode(policy: FlowPolicy, sigmas: list[float], prompts: list[str], seeds: list[int], *,
               guidance_scale: float = 1.0, uncond=None, batch: int = 64) -> torch.Tensor:
    """Decoded images [B, C, H, W] in [0, 1]; the noise of sample i comes from Generator(seeds[i])."""
    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        x = torch.cat([torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in ss])
        x = x.to(policy.device)
        velocity = GuidedVelocity(policy, policy.encode(ps), uncond=uncond, guidance_scale=guidance_scale, batch=batch)
        rows = torch.arange(len(ps))
        for k in range(len(sigmas) - 1):
            s = torch.full((len(ps),), sigmas[k], device=policy.device)
            x = ode_step(x, velocity(x, s, rows), s, torch.full_like(s, sigmas[k + 1]))
        out.append(policy.decode(x).cpu())
    return torch.cat(out)


def bootstrap_ci(values: torch.Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded: the same scores give the same interval)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=torch.Generator().manual_seed(seed))
    means = v[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def within_prompt_diversity(images: torch.Tensor, groups: list) -> float:
    """Mean over groups of the mean pairwise L2 distance between images of one group (usually one
    prompt; flattened pixels in [0, 1]). Groups of one image are skipped."""
    flat = images.detach().flatten(1).double().cpu()
    if len(groups) != flat.shape[0]:
        raise ValueError(f"{flat.shape[0]} images but {len(groups)} group ids")
    dists = []
    for p in dict.fromkeys(groups):
        idx = torch.tensor([i for i, q in enumerate(groups) if q == p])
        if idx.numel() < 2:
            continue
        d = torch.cdist(flat[idx], flat[idx])
        n = idx.numel()
        dists.append(d.sum() / (n * (n - 1)))
    if not dists:
        raise ValueError("diversity needs at least two samples of one prompt")
    return float(torch.stack(dists).mean())


def evaluate(policy: FlowPolicy, reward, pairs: list[tuple[str, int]], sigmas: list[float], *,
             guidance_scale: float = 1.0, uncond=None, group_key=None, drift_fn=None, batch: int = 64) -> dict:
    """Held-out reward (mean, 95% CI), within-group diversity and (with drift_fn) drift of ODE samples.

    group_key(prompt) -> the group a sample's diversity is measured in (default: the prompt itself).
    drift_fn(images) -> how far the samples are from real data (lower is more realistic).
    """
    prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
    images = sample_ode(policy, sigmas, prompts, seeds, guidance_scale=guidance_scale, uncond=uncond, batch=batch)
    scores = reward(images, prompts)
    lo, hi = bootstrap_ci(scores)
    out = {"reward_mean": float(scores.mean()), "reward_ci": [lo, hi], "n": len(pairs), "scores": scores.tolist()}
    groups = [group_key(p) if group_key else p for p in prompts]
    if len(set(groups)) < len(groups):
        out["diversity"] = within_prompt_diversity(images, groups)
    if drift_fn is not None:
        out["drift"] = float(drift_fn(images))
    out["images"] = images
    return out


class HeldOut:
    """A job's held-out evaluation: the (prompt, seed) pairs, when it is due, and what it found so far."""

    def __init__(self, trainer, pairs: list[tuple[str, int]], group_key=None, drift_fn=None, history: list | None = None):
        self.trainer, self.pairs, self.group_key, self.drift_fn = trainer, pairs, group_key, drift_fn
        self.history = list(history or [])

    def __bool__(self) -> bool:
        return bool(self.pairs)

    @property
    def base(self) -> dict | None:
        """The base model's entry (the evaluation before the first iteration)."""
        return self.history[0] if self.history else None

    def due(self, iteration: int) -> bool:
        """After every train.eval_every iterations, and after the last."""
        cfg = self.trainer.cfg
        return bool(self.pairs) and ((cfg.eval_every and iteration % cfg.eval_every == 0) or iteration == cfg.iterations)

    def run(self) -> dict:
        t = self.trainer
        res = evaluate(t.policy, t.reward, self.pairs, list(t.plan.sigmas), guidance_scale=t.algo.guidance_scale,
                       uncond=t.uncond, group_key=self.group_key, drift_fn=self.drift_fn, batch=t.cfg.rollout_batch)
        keys = ("reward_mean", "reward_ci", "diversity", "drift")
        entry = {"iteration": t.state.iteration, **{k: res[k] for k in keys if k in res}}
        self.history.append(entry)
        self.last_images = res.get("images")  # for the before/after grid (before_after.py)
        return entry
