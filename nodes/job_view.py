"""What the panel shows of a job beyond its status: who it is (short id, model family, preset, start),
its ETA as a range, and its curves (docs/comfyui.md, "The panel").

All of it is read from the job folder's events (egrpo_backend/jobs/run.py lists them), never guessed:
- ETA: the wall-clock seconds between consecutive "metrics" events of the current run (so evaluations,
  sample grids and checkpoints count), averaged over the last ETA_WINDOW iterations. While fewer than
  ETA_STABLE_AFTER intervals are known, or they vary by more than ETA_STABLE_CV (coefficient of
  variation), the ETA is a range [low, high] (mean -/+ one standard deviation, at least +-ETA_STABLE_CV);
  after that one number.
- Curves: per iteration the train reward (and each component when several), clip fraction, KL, grad
  norm, learning rate, per-phase seconds and peak memory; the held-out evaluations; the latest
  before/after grid; the entropy plan.
"""

from __future__ import annotations

import math

ETA_WINDOW = 8
ETA_STABLE_AFTER = 4
ETA_STABLE_CV = 0.15
TRAIN_KEYS = ("iteration", "reward_mean", "reward_std", "clip_frac", "kl", "grad_norm", "lr", "loss", "nft_loss",
              "seconds", "phases", "nfe_total")


def current_run(events: list[dict]) -> list[dict]:
    """The events since the last "start" (a resumed run starts a new clock)."""
    starts = [i for i, e in enumerate(events) if e.get("type") == "start"]
    return events[starts[-1]:] if starts else events


def eta(events: list[dict], remaining: int) -> dict:
    """{"eta_seconds", "eta_low", "eta_high", "eta_stable"} for `remaining` iterations (None when unknown)."""
    times = [e["time"] for e in current_run(events) if e.get("type") == "metrics" and isinstance(e.get("time"), (int, float))]
    gaps = [b - a for a, b in zip(times, times[1:])][-ETA_WINDOW:]
    start = next((e["time"] for e in current_run(events) if e.get("type") == "start"), None)
    if not gaps and start is not None and times:
        gaps = [times[0] - start]  # one iteration (its first has model loading behind it: a range)
    if remaining <= 0:
        return {"eta_seconds": 0.0, "eta_low": 0.0, "eta_high": 0.0, "eta_stable": True}
    if not gaps:
        return {"eta_seconds": None, "eta_low": None, "eta_high": None, "eta_stable": False}
    mean = sum(gaps) / len(gaps)
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    cv = std / mean if mean > 0 else 0.0
    stable = len(gaps) >= ETA_STABLE_AFTER and cv <= ETA_STABLE_CV
    spread = 0.0 if stable else max(std, ETA_STABLE_CV * mean, mean if len(gaps) < 2 else 0.0)
    return {"eta_seconds": mean * remaining, "eta_low": max(0.0, mean - spread) * remaining,
            "eta_high": (mean + spread) * remaining, "eta_stable": stable}


def identity(job_id: str, spec: dict, events: list[dict]) -> dict:
    """Short id (the hash after the name), model family, preset and when the job first started."""
    name = spec.get("output", {}).get("name", job_id)
    short = job_id[len(name) + 1:] if job_id.startswith(name + "-") else job_id
    model = spec.get("model", {})
    start = next((e for e in reversed(events) if e.get("type") == "start"), {})
    family = start.get("family") or model.get("family", "auto")
    if family in (None, "auto"):
        family = "digits (embedded)" if model.get("source", "default") == "default" else f"{model.get('source')} (auto)"
    first = next((e.get("time") for e in events if e.get("type") == "start"), None)
    return {"short_id": short[:8], "family": family, "preset": spec.get("algorithm", {}).get("preset", "egrpo"),
            "started": first}


def curves(events: list[dict]) -> dict:
    """The panel's charts: train (with reward/<name> components), eval, before/after grid, plan."""
    train = []
    for e in events:
        if e.get("type") != "metrics":
            continue
        row = {k: e.get(k) for k in TRAIN_KEYS if k in e}
        row.update({k: v for k, v in e.items() if k.startswith("reward/")})
        train.append(row)
    by_iteration = {t["iteration"]: t for t in train}  # a resumed run repeats iterations: the last one counts
    evals = {e["iteration"]: {k: e.get(k) for k in ("iteration", "reward_mean", "reward_ci", "diversity", "drift")}
             for e in events if e.get("type") == "eval"}
    grid = next(({k: e.get(k) for k in ("iteration", "path", "prompts", "seeds", "time")}
                 for e in reversed(events) if e.get("type") == "before_after"), None)
    plan = next((e["plan"] for e in reversed(events) if e.get("type") == "start" and e.get("plan")), None)
    train = [by_iteration[k] for k in sorted(by_iteration)]
    components = sorted({k[len("reward/"):] for t in train for k in t if k.startswith("reward/")})
    return {"train": train, "eval": [evals[k] for k in sorted(evals)],
            "components": components, "before_after": grid, "plan": plan,
            "errors": [e.get("message") for e in events if e.get("type") == "error"]}
