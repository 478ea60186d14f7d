"""Training jobs as directories: create, run, resume, cancel, export.

A job directory holds
  job.json          the full spec (JobSpec.to_dict())
  status.json       {"status", "iteration", "total", "pid", "updated", "message", "lora"}
  events.jsonl      one JSON object per line (see EVENT TYPES below), appended and flushed
  checkpoints/      iter_NNNNNN/{lora.safetensors, trainer.pt, state.json} + latest.json
  lora/             NAME.safetensors (first format) and NAME.<fmt>.safetensors (other formats)
  plan.png, reward_curve.png, samples/iter_NNNNNN.png, metrics.json
  cancel            present = stop after the current iteration (also SIGTERM / SIGINT)

EVENT TYPES (every event has "type" and "time"):
  start       iteration, total, resumed, plan (the plan's JSON), device
  metrics     iteration, total, reward_mean, reward_std, adv_*, ratio_*, clip_frac, grad_norm, nfe,
              nfe_total, seconds, loss, lr, eta_seconds
  eval        iteration, reward_mean, reward_ci [lo, hi], diversity (when measurable)
  checkpoint  iteration, path
  sample      iteration, path
  done        status ("finished" | "cancelled" | "stopped"), iteration, lora (absolute path)
  guard       iteration, diversity, base_diversity, restored (the reward-hacking guard stopped the run)
  error       message, traceback
Everything is written atomically; a SIGKILL loses at most the iteration in flight.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path

import torch

from . import lora as lora_lib
from .atomic import atomic_write_json
from .cancel import CancelFlag
from .config import JobSpec, SpecError
from .job_folder import (STATUSES, EventLog, create_job, load_spec, pid_alive, read_events, read_json, read_status,
                         request_cancel, write_status)
from .paths import check_name

log = logging.getLogger(__name__)
KEEP_CHECKPOINTS = 2


# --- checkpoints ---------------------------------------------------------------------------------
def latest_checkpoint(job_dir) -> Path | None:
    info = read_json(Path(job_dir) / "checkpoints" / "latest.json")
    if not info:
        return None
    path = Path(job_dir) / "checkpoints" / info["name"]
    return path if (path / "state.json").exists() else None


def save_checkpoint(job_dir, trainer, spec: JobSpec, extra: dict) -> Path:
    """checkpoints/iter_N written in a temp folder, renamed whole, then latest.json points at it."""
    root = Path(job_dir) / "checkpoints"
    root.mkdir(exist_ok=True)
    name = f"iter_{trainer.state.iteration:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lora_lib.export_lora(trainer.policy.lora_model(), tmp / "lora.safetensors", "comfy",
                         metadata={"egrpo.spec": json.dumps(spec.to_dict())})
    torch.save(trainer.state_dict(), tmp / "trainer.pt")
    atomic_write_json(tmp / "state.json", {"iteration": trainer.state.iteration, "history": trainer.state.history, **extra})
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_json(root / "latest.json", {"name": name, "iteration": trainer.state.iteration})
    for old in sorted(p for p in root.glob("iter_*") if p.name != name)[:-(KEEP_CHECKPOINTS - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, trainer) -> dict:
    tensors, _, _ = lora_lib.read_lora(path / "lora.safetensors", model=trainer.policy.lora_model())
    lora_lib.set_lora_tensors(trainer.policy.lora_model(), tensors)
    # Our own file, and still loaded without arbitrary unpickling.
    trainer.load_state_dict(torch.load(path / "trainer.pt", weights_only=True))
    state = read_json(path / "state.json")
    trainer.state.history = state.get("history", [])
    return state


# --- export ------------------------------------------------------------------------------------------
def export_job(job_dir, fmt: str, out=None, spec: JobSpec | None = None) -> Path:
    """Write the LoRA of the job's latest checkpoint in `fmt` (kohya | peft | comfy)."""
    job_dir = Path(job_dir)
    spec = spec or load_spec(job_dir)
    if fmt not in lora_lib.FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; valid: {', '.join(lora_lib.FORMATS)}")
    ckpt = latest_checkpoint(job_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{job_dir} has no checkpoint yet; run the job first (`run {job_dir}`)")
    tensors, _, meta = lora_lib.read_lora(ckpt / "lora.safetensors")
    state = read_json(ckpt / "state.json")
    last = state["history"][-1] if state.get("history") else {}
    metrics = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    metrics.update({k: state[k] for k in ("eval",) if k in state})
    out = Path(out) if out else job_dir / "lora" / _lora_file_name(spec, fmt)
    return lora_lib.export_lora(tensors, out, fmt, metadata={"egrpo.spec": json.dumps(spec.to_dict()),
                                                           "egrpo.metrics": json.dumps(metrics, default=float)})


def _lora_file_name(spec: JobSpec, fmt: str) -> str:
    name = check_name(spec.output.name, "output.name")
    return f"{name}.safetensors" if fmt == spec.output.formats[0] else f"{name}.{fmt}.safetensors"


# --- running ---------------------------------------------------------------------------------------
def run_job(job_dir, until: int | None = None, progress: bool = True) -> dict:
    """Run (or continue from the last checkpoint) until the spec's iterations, `until`, or a cancel."""
    job_dir = Path(job_dir)
    spec = load_spec(job_dir)
    events = EventLog(job_dir)
    cancel = CancelFlag(job_dir)
    write_status(job_dir, status="running", pid=os.getpid(), message="")
    threads = torch.get_num_threads()
    try:
        if spec.train.threads:  # the thread count changes float reduction order: part of a run's identity
            torch.set_num_threads(spec.train.threads)
        result = _run(job_dir, spec, events, cancel, until, progress)
    except BaseException as e:
        msg = f"{type(e).__name__}: {e}"
        events.emit("error", message=msg, traceback=traceback.format_exc())
        write_status(job_dir, status="failed", message=msg, pid=None)
        raise
    finally:
        cancel.restore()
        torch.set_num_threads(threads)
    return result


def _run(job_dir: Path, spec: JobSpec, events: EventLog, cancel, until, progress) -> dict:
    from .policies import build_policy, resolve_device, resolve_dtype, source_defaults
    from .rewards import WeightedRewards, build_reward
    from .trainer import Trainer

    cfg = spec.train
    device = resolve_device(cfg.device)
    policy = build_policy(spec.model, device, resolve_dtype(spec.model.dtype, device))
    lora_lib.add_lora(policy.lora_model(), lora_lib.LoraSettings(rank=spec.lora.rank, alpha=spec.lora.alpha,
                      target_modules=spec.lora.target_modules or None), seed=spec.lora.init_seed)
    defaults = source_defaults(spec.model)
    prompts = spec.prompt_list() or defaults.get("prompts", [])
    eval_pairs = ([(p, s) for p in spec.prompt_list(eval=True) for s in (spec.eval_seeds or range(10000, 10010))]
                  if spec.eval_prompts else defaults.get("eval_pairs", [])) if cfg.evaluate else []
    rewards = [build_reward(r["name"], **{k: v for k, v in r.items() if k not in ("name", "weight")}) for r in spec.rewards]
    reward = WeightedRewards(rewards, [float(r.get("weight", 1.0)) for r in spec.rewards])
    # Encode every prompt once; text encoders can then leave memory.
    policy.encode(list(dict.fromkeys(prompts + [p for p, _ in eval_pairs] + [spec.algorithm.negative_prompt])))
    if hasattr(policy, "release_text_encoder"):
        policy.release_text_encoder()
    trainer = Trainer(policy, spec, reward, prompts)
    plan = trainer.plan
    plan.save_png(job_dir / "plan.png")

    ckpt = latest_checkpoint(job_dir)
    state = load_checkpoint(ckpt, trainer) if ckpt else {}
    eval_history = state.get("eval_history", [])
    total = cfg.iterations if until is None else min(cfg.iterations, until)
    events.emit("start", iteration=trainer.state.iteration, total=cfg.iterations, resumed=ckpt is not None,
                plan=plan.to_json(), device=str(device))

    def run_eval():
        from .evaluation import evaluate

        res = evaluate(policy, reward, eval_pairs, list(plan.sigmas), guidance_scale=spec.algorithm.guidance_scale,
                       uncond=trainer.uncond, group_key=defaults.get("group_key"), batch=cfg.rollout_batch)
        entry = {"iteration": trainer.state.iteration, **{k: res[k] for k in ("reward_mean", "reward_ci", "diversity") if k in res}}
        eval_history.append(entry)
        events.emit("eval", **entry)
        return res

    base_div = eval_history[0].get("diversity") if eval_history else None
    if eval_pairs and not eval_history:
        base_div = run_eval().get("diversity")
    # Reward-hacking guard: the last LoRA whose held-out diversity stayed above the bound.
    good = {"iteration": trainer.state.iteration, "lora": lora_lib.lora_tensors(policy.lora_model())}

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.iterations, initial=trainer.state.iteration, disable=not progress, desc="E-GRPO", unit="it")
    status, t_start, done_at_start = "finished", time.perf_counter(), trainer.state.iteration
    while trainer.state.iteration < total:
        m = trainer.step()
        it = trainer.state.iteration
        rate = (time.perf_counter() - t_start) / max(1, it - done_at_start)
        events.emit("metrics", total=cfg.iterations, eta_seconds=rate * (cfg.iterations - it),
                    **{k: v for k, v in m.items()})
        write_status(job_dir, iteration=it, total=cfg.iterations)
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward_mean']:.3f}", clip=f"{m['clip_frac']:.2f}")
        guard_hit = False
        last = it == cfg.iterations
        if eval_pairs and ((cfg.eval_every and it % cfg.eval_every == 0) or last):
            res = run_eval()
            div = res.get("diversity")
            guard_hit = bool(cfg.diversity_guard and base_div and div is not None and div < cfg.diversity_guard * base_div)
            if guard_hit:
                # Roll back to the last LoRA that passed: collapse is what reward hacking looks like.
                lora_lib.set_lora_tensors(policy.lora_model(), good["lora"])
                events.emit("guard", iteration=it, diversity=div, base_diversity=base_div, restored=good["iteration"],
                            message=f"held-out diversity {div:.3f} fell below {cfg.diversity_guard:g} x base "
                                    f"({base_div:.3f}): stopped and restored the LoRA of iteration {good['iteration']}")
            else:
                good = {"iteration": it, "lora": lora_lib.lora_tensors(policy.lora_model())}
        if cfg.sample_every and it % cfg.sample_every == 0 and trainer.last_rollout.images is not None:
            from .plots import image_grid

            path = job_dir / "samples" / f"iter_{it:06d}.png"
            path.parent.mkdir(exist_ok=True)
            imgs = trainer.last_rollout.images
            image_grid([imgs[i : i + spec.algorithm.group_size] for i in range(0, min(len(imgs), 4 * spec.algorithm.group_size),
                                                                                  spec.algorithm.group_size)], path)
            events.emit("sample", iteration=it, path=str(path.relative_to(job_dir)))
        stop = bool(cancel) or guard_hit
        if it % cfg.checkpoint_every == 0 or it == total or stop:
            path = save_checkpoint(job_dir, trainer, spec, {"eval_history": eval_history})
            events.emit("checkpoint", iteration=it, path=str(path.relative_to(job_dir)))
        if stop:
            status = "cancelled" if cancel else "stopped"
            break
    bar.close()
    if trainer.state.iteration < cfg.iterations and status == "finished":
        status = "stopped"  # `until` reached: resumable
    if latest_checkpoint(job_dir) is None:  # nothing trained (e.g. cancelled before the first iteration)
        save_checkpoint(job_dir, trainer, spec, {"eval_history": eval_history})
    paths = [export_job(job_dir, fmt, spec=spec) for fmt in spec.output.formats]
    if spec.output.copy_to:
        dest = Path(spec.output.copy_to) / paths[0].name
        dest.parent.mkdir(parents=True, exist_ok=True)
        from .atomic import atomic_write_bytes

        atomic_write_bytes(dest, paths[0].read_bytes())
        paths[0] = dest
    _write_reports(job_dir, trainer.state.history, eval_history)
    (job_dir / "cancel").unlink(missing_ok=True)
    write_status(job_dir, status=status, iteration=trainer.state.iteration, pid=None, lora=str(paths[0].resolve()))
    events.emit("done", status=status, iteration=trainer.state.iteration, lora=str(paths[0].resolve()))
    return {"status": status, "iteration": trainer.state.iteration, "lora": [str(p) for p in paths],
            "history": trainer.state.history, "eval": eval_history}


def _write_reports(job_dir: Path, history: list, eval_history: list) -> None:
    from .plots import plot_reward_curves

    atomic_write_json(job_dir / "metrics.json", {"train": history, "eval": eval_history})
    curves = {"train (rollout mean)": [(h["iteration"], h["reward_mean"]) for h in history]}
    bands = {}
    if eval_history:
        curves["held-out"] = [(e["iteration"], e["reward_mean"]) for e in eval_history]
        bands["held-out"] = [(e["iteration"], *e["reward_ci"]) for e in eval_history]
    plot_reward_curves(curves, job_dir / "reward_curve.png", bands=bands, title="E-GRPO reward")


def resume_job(job_dir, until: int | None = None, progress: bool = True) -> dict:
    job_dir = Path(job_dir)
    status = read_status(job_dir)
    if status.get("status") == "running" and pid_alive(status.get("pid")):
        raise RuntimeError(f"job {job_dir} is already running (pid {status['pid']}); cancel it first")
    (job_dir / "cancel").unlink(missing_ok=True)
    return run_job(job_dir, until=until, progress=progress)


__all__ = ["STATUSES", "EventLog", "SpecError", "create_job", "export_job", "latest_checkpoint", "load_spec", "read_events",
           "read_status", "request_cancel", "resume_job", "run_job"]
