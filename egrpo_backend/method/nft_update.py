"""DiffusionNFT's iteration in the shared engine (algorithm.loss = "nft"; docs/baselines.md, DiffusionNFT).

The same FlowPolicy, LoRA, prompt stream, scoring, checkpoints and jobs as the GRPO presets; only the
iteration differs (the loss itself is nft.py's pure functions):
  1. rollout: the OLD policy samples G members per prompt by ODE on the sampling grid, without CFG,
     each member from its own initial noise (stream "rollout" of the prompt's slot);
  2. score: decode and reward the clean samples x0 (Trainer.score) -> rewards [P, G];
  3. r = nft.optimality_probability(rewards): per-prompt mean / batch std advantages, clipped at c;
  4. update: each x0 is noised again at K = int(T x nft_timestep_fraction) sigmas of the grid
     (stream "nft" of the prompt's slot) and trained with nft.nft_loss, v_old from the old policy
     (no gradient), v from the trained LoRA, v_ref from the base when kl_beta > 0;
  5. the old policy moves towards the trained one: old <- d old + (1 - d) trained, with
     d = nft.old_policy_decay(optimizer steps so far, nft_decay) (DiffusionNFT
     scripts/train_nft_sd3.py:1034-1039).
The old policy is a copy of the LoRA parameters (not the base model), swapped into the LoRA
layers for the rollout and for v_old (`OldPolicy.swapped_in`) and saved in every checkpoint, so a
resumed run continues exactly.

Model evaluations per prompt: rollout G T; update G K (2 + [kl_beta > 0]) per inner epoch.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch

from .. import distributed
from .guidance import GuidedVelocity, prompt_chunks
from ..lora import like, whole
from .nft import forward_noise, nft_loss, nft_timesteps, old_policy_decay, optimality_probability, update_old_policy
from .randomness import stream_generator
from .results import StepResult
from .rollout import _integrate, _per_prompt_noise


@dataclass
class ODESamples:
    """What the NFT rollout hands to Trainer.score: R = P G members, one granularity."""

    final: torch.Tensor  # [R, 1, *latent] clean latents (sigma = 0), on the CPU
    member_prompt: torch.Tensor  # [R] prompt row of each member (G consecutive rows per prompt)


@torch.no_grad()
def ode_rollout(velocity: GuidedVelocity, sigmas: list[float], generators: list[torch.Generator],
                group_size: int) -> ODESamples:
    """G members per prompt, each from its own noise drawn from generators[p], integrated by ODE to 0."""
    policy = velocity.policy
    member_prompt = torch.arange(len(generators)).repeat_interleave(group_size)  # [R]
    z = _per_prompt_noise(generators, member_prompt, tuple(policy.latent_shape)).to(policy.device)
    x0 = _integrate(velocity, z, [list(sigmas)] * z.shape[0], member_prompt)
    return ODESamples(x0.cpu()[:, None], member_prompt)


class OldPolicy:
    """The old (sampling) policy: a separate copy of the LoRA parameters, {name: tensor}.

    `swapped_in()` puts the copy into the LoRA layers (no gradient) and restores the trained
    values on exit, so the rollout and v_old run the old weights through the same model."""

    def __init__(self, params: list[torch.nn.Parameter], names: list[str]):
        self.params, self.names = list(params), list(names)
        self.tensors = {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}
        self._trained = [torch.empty_like(p) for p in self.params]  # the trained values while swapped out

    @contextlib.contextmanager
    def swapped_in(self):
        with torch.no_grad():
            for n, p, keep in zip(self.names, self.params, self._trained):
                keep.copy_(p)
                p.copy_(self.tensors[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, keep in zip(self.params, self._trained):
                    p.copy_(keep)

    def update(self, decay: float) -> None:
        update_old_policy([self.tensors[n] for n in self.names], self.params, decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: whole(t).detach().cpu().clone() for n, t in self.tensors.items()}  # FSDP2: every rank calls

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if set(sd) != set(self.tensors):
            missing = sorted(set(self.tensors) ^ set(sd))
            raise ValueError(f"the checkpoint's old-policy copy does not fit this LoRA (first mismatch: {missing[0]}); "
                             "resume with the job's own spec, or start a new job")
        with torch.no_grad():
            for n, t in self.tensors.items():
                t.copy_(like(t, sd[n].to(t.device)))


def _parameter_names(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[str]:
    """The model's names of `params` (their position where a wrapper hides them)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id.get(id(p), f"param_{i}") for i, p in enumerate(params)]


class NFTUpdate:
    """The DiffusionNFT iteration of one Trainer (Trainer.step dispatches here when algorithm.loss == "nft")."""

    def __init__(self, trainer):
        self.trainer = trainer
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        self.old = OldPolicy(params, _parameter_names(trainer.policy.lora_model(), params))
        self.optimizer_steps = 0  # the reference's global_step: the EMA schedule's clock

    # --- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"old_policy": self.old.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, sd: dict | None) -> None:
        if not sd or "old_policy" not in sd:
            raise ValueError("this checkpoint has no DiffusionNFT old-policy copy (it was not made with algorithm.loss "
                             "'nft'); resume with the job's own spec, or start a new job")
        self.old.load_state_dict(sd["old_policy"])
        self.optimizer_steps = int(sd["optimizer_steps"])

    # --- one iteration ---------------------------------------------------------------------------
    def step(self, it: int, phases):

        t, algo, cfg = self.trainer, self.trainer.algo, self.trainer.cfg
        # 1. Rollout with the old policy: P prompts x G members by ODE, CFG-free.
        prompts, slots = distributed.local_share(*t.next_prompts(), t.rank, t.world)  # GLOBAL slots
        velocity = GuidedVelocity(t.policy, t.policy.encode(prompts), batch=cfg.rollout_batch)
        with phases("rollout"), self.old.swapped_in():
            samples = ode_rollout(velocity, list(t.plan.sigmas), [stream_generator(cfg.seed, "rollout", it, s)
                                                                  for s in slots], algo.group_size)
        rollout_nfe = velocity.nfe
        t.safe_point()
        # 2. Score: [P, 1, G] rewards of this rank's prompts.
        scores = t.score(samples, prompts, phases)
        t.safe_point()
        # 3. Optimality probability over every rank's rewards (the batch std spans the whole batch): [P, G].
        all_rewards = distributed.all_concat(scores.rewards)[:, 0]  # [P_all, G]
        r_all = optimality_probability(all_rewards, clip=algo.advantage_clip, advantage=algo.advantage)
        P = len(prompts)
        r = r_all[t.rank * P : (t.rank + 1) * P].flatten()  # [P G], the members' order in samples
        # 4. The negative-aware update, then 5. the old policy's EMA step.
        with phases("update"):
            upd = self.update(samples.final[:, 0], r, samples.member_prompt, velocity, it, slots)
        decay = old_policy_decay(self.optimizer_steps, algo.nft_decay)
        self.old.update(decay)
        upd["old_policy_decay"] = decay
        t.state.iteration += 1
        rollout_nfe = int(distributed.all_sum(rollout_nfe))
        t.state.nfe += rollout_nfe + upd["nfe"]
        adv = (r_all - 0.5) * 2 * algo.advantage_clip  # the clipped advantages r was made from
        metrics = t._metrics(t._gathered(scores), adv, [], rollout_nfe, upd, phases)
        t.state.history.append(metrics)
        return StepResult(metrics, scores.images, prompts)

    def _draws(self, it: int, slots: list[int], K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training sigmas [P G, K] and the seeds of their forward noise [P G, K], from each prompt's own
        stream. One seed per (member, sigma): a micro-batch draws only its own noise (`_noise`), so memory
        does not grow with P G K and the draws do not depend on the micro-batch size."""
        t = self.trainer
        sig, seeds = [], []
        for s in slots:
            gen = stream_generator(t.cfg.seed, "nft", it, s)
            sig.append(nft_timesteps(list(t.plan.sigmas), t.algo.group_size, t.algo.nft_timestep_fraction, gen))
            seeds.append(torch.randint(0, 2**62, (t.algo.group_size, K), generator=gen))
        return torch.cat(sig), torch.cat(seeds)

    def _noise(self, seeds: torch.Tensor) -> torch.Tensor:
        """[n] seeds -> [n, *latent] standard normal forward noise eps."""
        shape = tuple(self.trainer.policy.latent_shape)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds.tolist()])

    def _chunks(self, n_local: int, it: int) -> list[tuple[torch.Tensor, int]]:
        """Optimizer-step chunks of this rank's samples (local ids) and each chunk's GLOBAL sample count:
        the one-process shuffle of every rank's samples, cut to this rank."""
        t = self.trainer
        n_global = n_local * t.world
        perm = torch.randperm(n_global, generator=stream_generator(t.cfg.seed, "shuffle", it))
        lo = t.rank * n_local
        return [(c[(c >= lo) & (c < lo + n_local)] - lo, c.numel())
                for c in perm.tensor_split(min(t.cfg.minibatches, n_global)) if c.numel()]

    def update(self, x0: torch.Tensor, r: torch.Tensor, member_prompt: torch.Tensor, velocity: GuidedVelocity,
               it: int, slots: list[int]) -> dict:
        """Accumulate the NFT loss over every (sample, sigma) pair of each chunk, one optimizer step per chunk."""
        t, algo, dev = self.trainer, self.trainer.algo, self.trainer.policy.device
        nfe_before = velocity.nfe
        K = int((len(t.plan.sigmas) - 1) * algo.nft_timestep_fraction)
        sigmas, noise_seeds = self._draws(it, slots, K)  # [R, K] each
        stats = defaultdict(list)
        for _ in range(t.cfg.inner_epochs):
            for chunk, n_samples in self._chunks(x0.shape[0], it):
                n_pairs = n_samples * K  # global: the loss is the mean over the chunk's (sample, sigma) pairs
                t.optimizer.zero_grad(set_to_none=True)
                pairs = torch.stack(torch.meshgrid(torch.arange(K), chunk, indexing="ij"), -1).reshape(-1, 2)  # [n, (k, i)]
                # Pieces of ONE prompt's pairs (at most micro_batch): the world size then changes no bit
                # (gradient_sync.py).
                pieces = [pairs[rows] for rows in prompt_chunks(member_prompt[pairs[:, 1]], t.cfg.micro_batch)]
                losses = []
                t.accumulate(pieces, lambda piece: losses.append(
                    self._backward(x0, r, member_prompt, sigmas, noise_seeds, piece, n_pairs, velocity, stats, dev)),
                             lambda: self._padding_backward(x0, r, member_prompt, sigmas, noise_seeds, n_pairs, velocity, dev))
                t.optimizer_step(stats)
                stats["step_losses"].append(distributed.all_sum(sum(losses)))
                self.optimizer_steps += 1
        steps = len(stats["norms"])
        out = {"nft_loss": sum(stats["step_losses"]) / steps, "grad_norm": sum(stats["norms"]) / steps,
               "optimizer_steps": steps, "trained_pairs": int(distributed.all_sum(x0.shape[0] * K)) * t.cfg.inner_epochs,
               "nfe": int(distributed.all_sum(velocity.nfe - nfe_before))}
        for key in ("r_mean", "positive_loss", "negative_loss", "old_deviate", "kl"):  # pair-weighted means
            if stats[key]:
                out[key if key != "old_deviate" else "nft_old_deviate"] = (
                    distributed.all_sum(sum(stats[key])) / distributed.all_sum(sum(stats["pairs"])))
        return out

    def _padding_backward(self, x0, r, member_prompt, sigmas, noise_seeds, n_pairs: int, velocity, dev) -> None:
        """A zero-weighted piece for a rank with fewer pieces (Trainer.accumulate); its NFE does not count."""
        nfe = velocity.nfe
        self._backward(x0, r, member_prompt, sigmas, noise_seeds, torch.zeros(1, 2, dtype=torch.long), n_pairs, velocity,
                       defaultdict(list), dev, weight=0.0)
        velocity.nfe = nfe

    def _backward(self, x0, r, member_prompt, sigmas, noise_seeds, micro: torch.Tensor, n_pairs: int, velocity, stats,
                  dev, weight: float = 1.0) -> float:
        """nft_loss of the pairs `micro` ([n, (k, sample)]), scaled to its share of the chunk's mean, backpropagated."""
        t, algo = self.trainer, self.trainer.algo
        k, i = micro[:, 0], micro[:, 1]
        x0_b = x0[i].to(dev)
        sig = sigmas[i, k].to(dev)  # [n]
        x_t = forward_noise(x0_b, self._noise(noise_seeds[i, k]).to(dev), sig)
        rows = member_prompt[i]
        with torch.no_grad(), self.old.swapped_in():  # v_old first: swapping after v's forward would break its graph
            v_old = velocity(x_t, sig, rows)
        v_ref = None
        if algo.kl_beta > 0:  # reference = the base model (LoRA off)
            with torch.no_grad(), t.policy.lora_disabled():
                v_ref = velocity(x_t, sig, rows)
        v = velocity(x_t, sig, rows)
        loss, m = nft_loss(v, v_old, x_t, x0_b, sig, r[i].to(dev), algo.nft_beta, v_ref=v_ref, kl_beta=algo.kl_beta,
                           adv_clip=algo.advantage_clip)
        scaled = weight * loss * (len(i) / n_pairs)
        scaled.backward()
        n = len(i)
        stats["pairs"].append(n)
        for key in ("r_mean", "positive_loss", "negative_loss", "old_deviate", "kl"):
            if key in m:
                stats[key].append(m[key] * n)
        return scaled.item()
