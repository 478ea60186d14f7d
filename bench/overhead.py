"""Cost of one E-GRPO iteration on the embedded default: measured NFE against the formula, and wall
time against the pure model cost of the same calls.

    python bench/overhead.py [--repeats 3] [--threads 1]

The pure model cost replays the iteration's own model calls: every no-grad forward at the batch size
it had, and every forward+backward of the update at its micro-batch size, each timed alone (best of
several). What is left of the wall time is the engine's own work: SDE arithmetic, rewards, advantage,
optimizer, bookkeeping. Writes bench/results/overhead.json. Target: wall / pure model cost < 1.25.
"""

import argparse
import time
from collections import Counter

from common import RESULTS, spec_for


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from egrpo_backend.atomic import atomic_write_json
    from egrpo_backend.jobs.build import build_trainer
    from egrpo_backend.config import JobSpec
    from egrpo_backend.default_model.policy import default_job_inputs
    from egrpo_backend.method.rollout import expected_nfe

    spec = JobSpec.from_dict(spec_for("egrpo", 0))
    trainer = build_trainer(spec)
    policy = trainer.policy
    P, G = spec.train.prompts_per_iteration, spec.algorithm.group_size
    formula = P * expected_nfe(trainer.plan, trainer.plan.active, G, spec.algorithm.granularities)

    calls = Counter()  # (batch, with_grad) -> number of calls in one iteration
    inner = policy.velocity

    def recording_velocity(x, sigma, cond):
        calls[(x.shape[0], torch.is_grad_enabled())] += 1
        return inner(x, sigma, cond)

    policy.velocity = recording_velocity
    trainer.step()  # warm-up, and records the calls of an iteration
    policy.velocity = inner
    cond = policy.encode(default_job_inputs()["prompts"][:1])

    def call_time(batch, grad):
        x, s = torch.randn(batch, *policy.latent_shape), torch.full((batch,), 0.5)
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

    pure = sum(n * call_time(b, g) for (b, g), n in calls.items())
    rows = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        m = trainer.step().metrics
        wall = time.perf_counter() - t0
        rows.append({"wall_s": wall, "pure_model_s": pure, "ratio": wall / pure, "nfe_measured": m["nfe"]})
    ratio = min(r["ratio"] for r in rows)
    out = {"nfe_formula": formula, "nfe_measured": rows[-1]["nfe_measured"], "model_calls":
           [{"batch": b, "grad": g, "calls": n} for (b, g), n in sorted(calls.items())], "runs": rows,
           "best_ratio": ratio, "threads": a.threads}
    print(f"NFE per iteration: measured {out['nfe_measured']}  formula {formula}  "
          f"({'equal' if out['nfe_measured'] == formula else 'DIFFERENT'})")
    kinds = ", ".join(f"{n}x batch {b}{' grad' if g else ''}" for (b, g), n in sorted(calls.items()))
    print(f"model calls per iteration: {sum(calls.values())} ({kinds})")
    print(f"{'wall s':>8} {'model s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['wall_s']:8.3f} {r['pure_model_s']:8.3f} {r['ratio']:6.2f}")
    print(f"best ratio {ratio:.2f} (target < 1.25)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "overhead.json", out)


if __name__ == "__main__":
    main()
