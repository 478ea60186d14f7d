"""The training loop (docs/algorithm.md): rollout -> score -> advantage -> clipped update.

Data flows one way: `rollout` samples clean latents, `Trainer.score` decodes and rewards them in
chunks of train.decode_batch, `advantages` normalises within groups, `Trainer.update` takes the
clipped policy-gradient steps. Every random choice comes from randomness.stream_generator, so a
run resumed from a checkpoint at iteration k repeats iterations k.. exactly as a straight run would.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .. import distributed
from .advantage import advantages
from .algorithms import branch_starts, train_mask
from ..config import JobSpec
from .gradient_sync import GradientSum, pad_to, wrap_for_data_parallel
from .guidance import GuidedVelocity, prompt_chunks
from ..lora import like, whole
from .nft_update import NFTUpdate
from .objective import clipped_objective
from ..policies.base import FlowPolicy
from .randomness import stream_generator
from .results import StepResult
from ..rewards.combine import WeightedRewards
from .rollout import Rollout, rollout
from .sde import flow_grpo_kl, gaussian_kl, sde_step
from .telemetry import PhaseTimer
from .unit_ids import global_unit_ids

log = logging.getLogger(__name__)
SAMPLE_GROUPS = 4  # groups whose images a step returns for sample grids
ENCODE_CHUNK = 256  # prompts encoded ahead at once (whole iterations, at least one; docs/prompts.md)


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


class IterationAbandoned(Exception):
    """A stop asked for at a safe point inside an iteration (between rollout, reward and update): the
    iteration's partial work is dropped and the state is the last finished iteration's, checkpointable."""


@dataclass
class TrainerState:
    iteration: int = 0  # iterations completed
    cursor: int = 0  # prompts consumed from the (epoch-shuffled) prompt stream
    nfe: int = 0  # model evaluations so far (rollouts and updates)
    history: list = field(default_factory=list)  # per-iteration metrics


@dataclass
class Scores:
    rewards: torch.Tensor  # [NG, n_gran, G] weighted reward
    components: dict[str, torch.Tensor]  # reward name -> [NG, n_gran, G] unweighted
    images: torch.Tensor  # [k, C, H, W] finest-granularity images of the first SAMPLE_GROUPS groups


def _gathered_stats(stats: dict) -> dict:
    """Update statistics of every rank (rank order); grad norms are already equal on all ranks."""
    if distributed.world_size() == 1:
        return stats
    merged = defaultdict(list, norms=stats["norms"])
    for part in distributed.all_objects({k: v for k, v in stats.items() if k != "norms"}):
        for key, values in part.items():
            merged[key].extend(values)
    return merged


class Trainer:
    def __init__(self, policy: FlowPolicy, spec: JobSpec, reward: WeightedRewards, prompts):
        """prompts: a list, or any sequence with len() and [i] (a streamed prompt_sets.PromptSet)."""
        if not len(prompts):
            raise ValueError("no training prompts; give at least one prompt")
        self.policy, self.spec, self.reward = policy, spec, reward
        self.prompts = prompts if hasattr(prompts, "__getitem__") else list(prompts)
        self.algo, self.cfg = spec.algorithm, spec.train
        self.plan = self.algo.plan()
        if not policy.trainable_parameters():
            raise ValueError("the policy has no trainable (LoRA) parameters; call lora.add_lora first")
        # Data parallel (docs/scale_out.md): each rank rolls out whole prompts; one process is rank 0 of 1.
        self.rank, self.world = distributed.rank(), distributed.world_size()
        distributed.check_divisible(self.cfg.prompts_per_iteration, self.world)
        mode = "single" if self.world == 1 else self.cfg.parallel
        wrap_for_data_parallel(policy.lora_model(), mode, policy.device)  # before the optimizer sees the parameters
        params = policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.grads = GradientSum(params, policy.lora_model(), mode)
        if policy.device.type == "cuda":
            # cuDNN's attention backward faults (illegal memory access) on H100/H200 with torch 2.11 at
            # FLUX / SD3.5 sizes (bench/results/scale_h200.md); flash / memory-efficient attention do not.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.state = TrainerState()
        self._orders: dict[int, torch.Tensor] = {}  # epoch -> its prompt order (the current and the next)
        self.on_encode = None  # callable(done, total): progress of the prompts encoded ahead
        self.uncond = policy.encode([self.algo.negative_prompt]) if self.algo.guidance_scale != 1.0 else None
        self.nft = NFTUpdate(self) if self.algo.loss == "nft" else None  # DiffusionNFT's iteration and old policy
        self.stop_requested = lambda: False  # asked at each safe point between phases (jobs/run.py: a graceful cancel)
        self._at_start = None

    # --- data ----------------------------------------------------------------------------------
    def next_prompts(self) -> tuple[list[str], list[int]]:
        """The next prompts of a stream that reshuffles every epoch, and their slots in that stream."""
        n, prompts, slots = len(self.prompts), [], []
        for _ in range(self.cfg.prompts_per_iteration):
            epoch, pos = divmod(self.state.cursor, n)
            prompts.append(self.prompts[int(self._order(epoch)[pos])])
            slots.append(self.state.cursor)
            self.state.cursor += 1
        return prompts, slots

    def _order(self, epoch: int) -> torch.Tensor:
        """The epoch's shuffle (seed semantics unchanged: one randperm per epoch), computed once."""
        if epoch not in self._orders:
            n = len(self.prompts)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            # int32 halves the memory of a 10M-prompt order; randperm draws the same permutation in either dtype
            dtype = torch.int32 if n < 2**31 else torch.int64
            self._orders[epoch] = torch.randperm(n, dtype=dtype, generator=stream_generator(self.cfg.seed, "prompt_order", epoch))
        return self._orders[epoch]

    def upcoming(self, iterations: int) -> list[str]:
        """This rank's prompts of the next `iterations` iterations, without consuming them."""
        cursor, out = self.state.cursor, []
        try:
            for _ in range(iterations):
                out += distributed.local_share(*self.next_prompts(), self.rank, self.world)[0]
        finally:
            self.state.cursor = cursor
        return out

    def encode_ahead(self) -> int:
        """When the next iteration's prompts are not all encoded, encode them and those of the iterations
        after, ENCODE_CHUNK prompts in all, in one session of the text encoders. Returns how many."""
        ahead = getattr(self.policy, "encode_ahead", None)
        if ahead is None or not self.policy.uncached(self.upcoming(1)):
            return 0
        iterations = max(1, ENCODE_CHUNK // max(1, self.cfg.prompts_per_iteration // self.world))
        iterations = min(iterations, max(1, self.cfg.iterations - self.state.iteration))
        return ahead(self.upcoming(iterations), self.on_encode)

    def velocity_for(self, prompts: list[str]) -> GuidedVelocity:
        return GuidedVelocity(self.policy, self.policy.encode(prompts), uncond=self.uncond,
                              guidance_scale=self.algo.guidance_scale, batch=self.cfg.rollout_batch)

    # --- one iteration ---------------------------------------------------------------------------
    def step(self) -> StepResult:
        it, seed, algo = self.state.iteration, self.cfg.seed, self.algo
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(it, self.cfg.lr, self.cfg.iterations, self.cfg.lr_schedule, self.cfg.warmup_iterations)
        phases = PhaseTimer(self.policy.device)
        self._at_start = (self.state.cursor, torch.get_rng_state())  # what a safe point restores when it stops
        with phases("encode"):  # the prompts of the next iterations, ahead of use (docs/prompts.md)
            self.encode_ahead()
        if self.nft:  # DiffusionNFT: ODE rollouts of the old policy, the negative-aware loss (nft_update.py)
            return self.nft.step(it, phases)

        # 1. Rollout: groups of G members per (prompt, branch step); noise per (seed, iteration, prompt slot).
        prompts, slots = distributed.local_share(*self.next_prompts(), self.rank, self.world)  # GLOBAL slots
        velocity = self.velocity_for(prompts)
        starts = branch_starts(algo, self.plan, it, stream_generator(seed, "branch", it))
        with phases("rollout"):
            ro = rollout(velocity, self.plan, starts, [stream_generator(seed, "rollout", it, s) for s in slots],
                         group_size=algo.group_size, granularities=algo.granularities, sde_window=algo.sde_window,
                         shared_initial_noise=algo.shared_initial_noise, granularity_grid=algo.granularity_grid,
                         window_last_step=self.plan.active[-1] if algo.window_within_active else None)
        self.safe_point()
        # 2. Score: decode and reward in bounded chunks -> [NG, n_gran, G].
        scores = self.score(ro, prompts, phases)
        self.safe_point()
        # 3. Advantages within each group: [NG, n_gran, G] -> [NG, G].
        per_reward = algo.reward_mode == "per_reward" and len(scores.components) > 1
        adv = advantages(scores.rewards, advantage=algo.advantage, clip=algo.advantage_clip, group_prompt=ro.group_prompt,
                         components=scores.components if per_reward else None, weights=self.reward.weights)
        # 4. Clipped policy-gradient update.
        with phases("update"):
            upd = self.update(ro, adv, velocity, it)
        self.state.iteration += 1
        rollout_nfe = int(distributed.all_sum(ro.nfe))
        self.state.nfe += rollout_nfe + upd["nfe"]
        metrics = self._metrics(self._gathered(scores), distributed.all_concat(adv), starts, rollout_nfe, upd, phases)
        self.state.history.append(metrics)
        return StepResult(metrics, scores.images, prompts)

    def safe_point(self) -> None:
        """Between two phases: when a stop is requested, drop this iteration (nothing was updated yet:
        the prompt cursor and RNG go back to its start) and raise IterationAbandoned."""
        if self.stop_requested():
            self.state.cursor, rng = self._at_start
            torch.set_rng_state(rng)
            raise IterationAbandoned(f"stopped between phases of iteration {self.state.iteration + 1}")

    def score(self, ro: Rollout, prompts: list[str], phases: PhaseTimer) -> Scores:
        """Decode and reward every member's clean latents, at most train.decode_batch images of ONE
        prompt at a time (so a prompt's scores do not depend on the prompts beside it, see GuidedVelocity)."""
        R, n_gran, G = ro.final.shape[0], ro.final.shape[1], self.algo.group_size
        latents = ro.final.flatten(0, 1)  # [R * n_gran, *latent], member-major
        row_prompt = ro.member_prompt.repeat_interleave(n_gran)
        combined, components = torch.empty(latents.shape[0]), defaultdict(lambda: torch.empty(latents.shape[0]))
        keep = torch.arange(min(R, SAMPLE_GROUPS * G)) * n_gran  # finest-granularity rows of the first groups
        kept = torch.empty(0)
        for rows in prompt_chunks(row_prompt, self.cfg.decode_batch):
            with phases("decode"):
                images = self.policy.decode(latents[rows].to(self.policy.device))
            with phases("reward"):
                total, parts = self.reward.score(images, [prompts[p] for p in row_prompt[rows].tolist()])
            combined[rows] = total.detach().float().cpu()
            for name, value in parts.items():
                components[name][rows] = value.detach().float().cpu()
            hit = torch.isin(rows, keep)
            if hit.any():
                if not kept.numel():
                    kept = torch.empty(keep.numel(), *images.shape[1:])
                kept[torch.searchsorted(keep, rows[hit])] = images[hit.to(images.device)].detach().float().cpu()

        def to_groups(t):  # [R * n_gran] -> [NG, n_gran, G]
            return t.reshape(R // G, G, n_gran).transpose(1, 2).contiguous()

        return Scores(to_groups(combined), {k: to_groups(v) for k, v in components.items()}, kept)

    def _gathered(self, scores: Scores) -> Scores:
        """Every rank's rewards in one-process order (ranks hold consecutive prompts), for the metrics."""
        if self.world == 1:
            return scores
        return Scores(distributed.all_concat(scores.rewards),
                      {k: distributed.all_concat(v) for k, v in scores.components.items()}, scores.images)

    def _metrics(self, scores: Scores, adv: torch.Tensor, starts, rollout_nfe: int, upd: dict, phases) -> dict:
        r = scores.rewards[:, 0]  # finest granularity [NG, G]
        metrics = {
            "iteration": self.state.iteration, "reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(),
            "adv_mean": adv.mean().item(), "adv_std": adv.std(unbiased=False).item(), "adv_abs_max": adv.abs().max().item(),
            "branch_steps": starts, "nfe": rollout_nfe, "nfe_update": upd["nfe"], "nfe_total": self.state.nfe,
            "lr": self.optimizer.param_groups[0]["lr"], **{k: v for k, v in upd.items() if k != "nfe"},
            "seconds": sum(p["seconds"] for p in phases.phases.values()), "phases": phases.phases,
        }
        if self.world > 1:  # time in collectives (gradients, gathers), inside the phases above
            metrics["comm_seconds"] = distributed.take_comm_seconds()
        if len(scores.components) > 1:
            metrics.update({f"reward/{name}": comp[:, 0].mean().item() for name, comp in scores.components.items()})
        return metrics

    # --- the update --------------------------------------------------------------------------------
    def _trained_transitions(self, ro: Rollout, gen: torch.Generator) -> torch.Tensor:
        """[N] bool: the transitions the update trains (algorithms.train_mask: last step, subset)."""
        a = self.algo
        per_rank = ro.group_prompt.numel() * (a.group_size if a.train_subset == "per_sample" else 1)
        return train_mask(ro.window_pos, ro.member, ro.sigma_next, group_size=a.group_size, fraction=a.train_fraction,
                          train_last_step=a.train_last_step, subset=a.train_subset, gen=gen,
                          unit_offset=self.rank * per_rank, total_units=self.world * per_rank if self.world > 1 else None)

    def _minibatches(self, units: torch.Tensor, steps: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        if self.algo.update_mode == "per_step":  # the authors' code: one optimizer step per active step
            return [units[steps == s] for s in steps.unique(sorted=True)]
        perm = units[torch.randperm(units.numel(), generator=gen)]
        return [c for c in perm.tensor_split(min(self.cfg.minibatches, perm.numel())) if c.numel()]

    def _global_minibatches(self, ro: Rollout, units: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """The one-process minibatches, each cut to this rank's inputs (local ids): the same shuffle on every rank."""
        if self.world == 1:
            return self._minibatches(units, ro.input_step[units], gen)
        to_global = global_unit_ids(ro.input_id, ro.window_pos, ro.input_x.shape[0], self.rank, self.world)
        pairs = [torch.stack(p) for p in distributed.all_objects((to_global[units], ro.input_step[units]))]
        ids, steps = torch.cat(pairs, 1)
        order = ids.argsort()  # the one-process units are sorted ids
        local_of = {g: i for i, g in enumerate(to_global.tolist())}
        chunks = self._minibatches(ids[order], steps[order], gen)
        return [torch.tensor([local_of[g] for g in c.tolist() if g in local_of], dtype=torch.long) for c in chunks]

    def update(self, ro: Rollout, adv: torch.Tensor, velocity: GuidedVelocity, iteration: int) -> dict:
        seed, nfe_before = self.cfg.seed, velocity.nfe
        keep = self._trained_transitions(ro, stream_generator(seed, "subset", iteration))
        adv_t = adv.flatten()[ro.member]  # [N] each transition inherits its member's advantage
        units = ro.input_id[keep].unique()
        stats = defaultdict(list)
        for _ in range(self.cfg.inner_epochs):
            for chunk in self._global_minibatches(ro, units, stream_generator(seed, "shuffle", iteration)):
                n_trans = int(distributed.all_sum(int((torch.isin(ro.input_id, chunk) & keep).sum())))  # global count
                self.optimizer.zero_grad(set_to_none=True)
                self.accumulate(self._pieces(ro, chunk),
                                lambda piece: self._backward(ro, adv_t, keep, piece, n_trans, velocity, stats),
                                lambda: self._padding_backward(ro, adv_t, keep, n_trans, velocity))
                self.optimizer_step(stats)
        stats = _gathered_stats(stats)
        ratio = torch.cat(stats["ratios"])
        out = {"ratio_mean": ratio.mean().item(), "ratio_max_dev": (ratio - 1).abs().max().item(),
               "ratio_first_dev": max(stats["first_dev"]), "clip_frac": torch.cat(stats["clipped"]).mean().item(),
               "loss": sum(stats["losses"]), "grad_norm": sum(stats["norms"]) / len(stats["norms"]),
               "optimizer_steps": len(stats["norms"]), "trained_transitions": int(distributed.all_sum(int(keep.sum()))),
               "nfe": int(distributed.all_sum(velocity.nfe - nfe_before))}
        if stats["kls"]:
            out["kl"] = torch.cat(stats["kls"]).mean().item()
        return out

    def accumulate(self, pieces: list, backward, padding) -> None:
        """One optimizer step's gradient: backward(piece) for every piece, summed by GradientSum. Under DDP /
        FSDP every rank runs as many pieces (the collectives must match): padding() runs a zero-weighted one."""
        runs = pad_to(len(pieces))
        for i in range(runs):
            with self.grads.piece(last=i == runs - 1):
                backward(pieces[i]) if i < len(pieces) else padding()

    def optimizer_step(self, stats) -> None:
        """Clip the gradient norm (recorded in stats["norms"]), refuse a NaN/inf one, step."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        if not torch.isfinite(norm):
            raise FloatingPointError("gradient norm is NaN/inf; lower train.lr or check the reward for extreme values")
        stats["norms"].append(norm.item())
        self.optimizer.step()

    def _pieces(self, ro: Rollout, chunk: torch.Tensor) -> list[torch.Tensor]:
        """A minibatch's local inputs as backward pieces: one prompt's inputs in id order, at most
        train.micro_batch (gradient_sync explains why a piece never mixes prompts)."""
        units = chunk.sort().values
        return [units[rows] for rows in prompt_chunks(ro.input_prompt[units], self.cfg.micro_batch)]

    def _padding_backward(self, ro: Rollout, adv_t, keep, n_trans: int, velocity: GuidedVelocity) -> None:
        """A zero-weighted backward for a rank with fewer pieces than the others (the collectives
        must match); neither its NFE nor its statistics count."""
        nfe = velocity.nfe
        self._backward(ro, adv_t, keep, ro.input_id[:1], n_trans, velocity, defaultdict(list), weight=0.0)
        velocity.nfe = nfe

    def _backward(self, ro: Rollout, adv_t, keep, micro: torch.Tensor, n_trans: int, velocity: GuidedVelocity, stats,
                  weight: float = 1.0):
        """Loss of the transitions whose input is in `micro` (sorted unique input ids), backpropagated."""
        dev = self.policy.device
        t = torch.nonzero(torch.isin(ro.input_id, micro) & keep).squeeze(1)  # [n] transitions
        x_in, sigma = ro.input_x[micro].to(dev), ro.input_sigma[micro].to(dev)
        row = torch.searchsorted(micro, ro.input_id[t]).to(dev)  # transition -> its input's row in micro
        sigma_next, g, x_next = ro.sigma_next[t].to(dev), ro.g[t].to(dev), ro.x_next[t].to(dev)
        # One forward with gradients per unique input; its G members reuse it.
        v = velocity(x_in, sigma, ro.input_prompt[micro])
        out = sde_step(x_in[row], v[row], sigma[row], sigma_next, g, x_next=x_next)
        terms = clipped_objective(out.log_prob, ro.log_prob[t].to(dev), adv_t[t].to(dev), self.algo.clip_range)
        loss = weight * terms.loss.sum() / n_trans
        if self.algo.kl_beta > 0:  # reference = the base model (LoRA off)
            with torch.no_grad(), self.policy.lora_disabled():
                v_ref = velocity(x_in, sigma, ro.input_prompt[micro])
            ref = sde_step(x_in[row], v_ref[row], sigma[row], sigma_next, g, x_next=x_next)
            kl = gaussian_kl(out.mean, ref.mean, out.scale) if self.algo.kl_form == "gaussian" \
                else flow_grpo_kl(out.mean, ref.mean, g)
            loss = loss + weight * self.algo.kl_beta * kl.sum() / n_trans
            stats["kls"].append(kl.detach().cpu())
        loss.backward()
        if not stats["norms"]:  # on-policy check: every ratio before the first optimizer step is 1
            stats["first_dev"].append((terms.ratio - 1).abs().max().item())
        stats["ratios"].append(terms.ratio.cpu())
        stats["clipped"].append(terms.clipped.float().cpu())
        stats["losses"].append(loss.item())

    # --- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Whole tensors whatever the world size and mode, so a checkpoint resumes on any (under FSDP2
        the optimizer's shards are gathered: every rank calls this)."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: whole(v) for k, v in st.items()} for i, st in optimizer["state"].items()}
        return {"optimizer": optimizer, "iteration": self.state.iteration, "cursor": self.state.cursor,
                "nfe": self.state.nfe, "history": self.state.history, "torch_rng": torch.get_rng_state(),
                **({"nft": self.nft.state_dict()} if self.nft else {})}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        for p, st in self.optimizer.state.items():  # FSDP2: each rank keeps the shard of its parameters
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    st[k] = like(p, v)
        self.state.iteration, self.state.cursor, self.state.nfe = int(sd["iteration"]), int(sd["cursor"]), int(sd["nfe"])
        self.state.history = list(sd["history"])
        torch.set_rng_state(sd["torch_rng"])
        if self.nft:
            self.nft.load_state_dict(sd.get("nft"))
