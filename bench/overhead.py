"""Cost of one E-GRPO iteration on the embedded default: measured NFE against the formula, and wall
time against the pure model cost (NFE x forward time + forward/backward time of the trained steps).

    python bench/overhead.py [--repeats 3]

Writes bench/results/overhead.json. Target: wall / pure model cost < 1.25.
"""

import argparse
import json
import time

from common import RESULTS, spec_for


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from egrpo_backend import lora
    from egrpo_backend.atomic import atomic_write_json
    from egrpo_backend.config import JobSpec
    from egrpo_backend.default_model.policy import default_job_inputs, load_default_policy
    from egrpo_backend.rewards import WeightedRewards, build_reward
    from egrpo_backend.rollout import expected_nfe
    from egrpo_backend.trainer import Trainer

    spec = JobSpec.from_dict(spec_for("egrpo", 0))
    policy = load_default_policy()
    lora.add_lora(policy.lora_model(), lora.LoraSettings(rank=8, alpha=8.0))
    trainer = Trainer(policy, spec, WeightedRewards([build_reward("digit_probability")], [1.0]), default_job_inputs()["prompts"])
    P, G = spec.train.prompts_per_iteration, spec.algorithm.group_size
    formula = P * expected_nfe(trainer.plan, trainer.plan.active, G, spec.algorithm.granularities)
    trainer.step()  # warm-up

    # Pure model cost, measured at the batch sizes the iteration uses.
    cond = policy.encode(default_job_inputs()["prompts"][:1])
    def fwd_time(batch, grad):
        x = torch.randn(batch, *policy.latent_shape)
        s = torch.full((batch,), 0.5)
        c = {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            if grad:
                policy.velocity(x, s, c).square().mean().backward()
            else:
                with torch.no_grad():
                    policy.velocity(x, s, c)
            best = min(best, time.perf_counter() - t0)
        return best

    chunk = max(spec.train.micro_batch, 16)
    t_fwd = fwd_time(64, False) / 64  # per sample, rollout batches
    units = P * len(trainer.plan.active)
    per_mb = max(1, units // spec.train.minibatches)
    t_bwd = fwd_time(per_mb, True) / per_mb  # per unit, update micro-batches
    rows = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        m = trainer.step()
        wall = time.perf_counter() - t0
        pure = m["nfe"] * t_fwd + units * t_bwd
        rows.append({"wall_s": wall, "pure_model_s": pure, "ratio": wall / pure, "nfe_measured": m["nfe"]})
    ratio = min(r["ratio"] for r in rows)
    out = {"nfe_formula": formula, "nfe_measured": rows[-1]["nfe_measured"], "forward_s_per_sample": t_fwd,
           "fwd_bwd_s_per_unit": t_bwd, "update_units": units, "runs": rows, "best_ratio": ratio,
           "threads": a.threads, "chunk": chunk}
    print(f"NFE per iteration: measured {out['nfe_measured']}  formula {formula}  "
          f"({'equal' if out['nfe_measured'] == formula else 'DIFFERENT'})")
    print(f"{'wall s':>8} {'model s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['wall_s']:8.3f} {r['pure_model_s']:8.3f} {r['ratio']:6.2f}")
    print(f"best ratio {ratio:.2f} (target < 1.25)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "overhead.json", out)


if __name__ == "__main__":
    main()
