"""Training jobs as directories: run, resume, export (jobs/folder.py: create, status, events, cancel).

A job directory holds
  job.json          the full spec (JobSpec.to_dict()), its inline prompt lists as {"file": "prompts-<sha256>.json"},
                    its prompt files as {"file": ABSOLUTE PATH, "sha256", "count"} (docs/prompts.md)
  prompts-<sha256>.json  an inline prompt list (JSON), stored once; the sha256 is the one LoRA headers name
  conds/            encoded prompts, at most train.cond_cache_gb, least recently used dropped first
  node_conds/       source = comfy: the prompts the Train node encoded (held-out ones; all when the job cannot reload the CLIP)
  status.json       {"status", "iteration", "total", "pid", "updated", "message", "lora"}
  events.jsonl      one JSON object per line (see EVENT TYPES below), appended and flushed
  checkpoints/      iter_NNNNNN/{lora.safetensors, state.pt} + latest.json (checkpoint.py)
  lora/             NAME.safetensors (first format) and NAME.<fmt>.safetensors (other formats)
  plan.png, reward_curve.png, before_after.png, samples/iter_NNNNNN.png (.webp, animated, for video), metrics.json
  cancel            present = stop at the next safe point between phases (also SIGTERM / SIGINT)
  cancel_ack        the running process saw the cancel signal (the manager then waits for the safe point)

EVENT TYPES (every event has "type" and "time"):
  start       iteration, total, resumed, plan (the plan's JSON), device, family (the model's, or "auto")
  encode      iteration, done, total (prompts of this chunk), set_size, encoded (so far in this run),
              seconds: prompts encoded ahead of use, apart from training (encode_progress.py)
  metrics     iteration, total, reward_mean, reward_std, adv_*, ratio_*, clip_frac, grad_norm, nfe,
              nfe_update, nfe_total, seconds, phases {encode|rollout|decode|reward|update: seconds,
              peak_mem_gb}, loss, lr, eta_seconds; with algorithm.loss "nft" instead of ratio_*, clip_frac
              and loss: nft_loss, r_mean, positive_loss, negative_loss, old_policy_decay (nft_update.py)
  eval        iteration, reward_mean, reward_ci [lo, hi], diversity and drift (when measurable)
  before_after  iteration, path (before_after.png), prompts, seeds: the fixed-seed grid, base vs LoRA
              (before_after.py), redrawn at every held-out evaluation
  checkpoint  iteration, path
  cancel      iteration, message (a cancel stopped the run between two phases of an iteration: the
              checkpoint and LoRA are those of `iteration`, the last finished one)
  sample      iteration, path (.png; an animated .webp and frames F for a video model)
  export      format, path, consumer, mapped, total (the file's keys its consumer maps: all, or it
              is not written; docs/lora_formats.md)
  done        status ("finished" | "cancelled" | "stopped"), iteration, lora (absolute path)
  guard       iteration, diversity, base_diversity, drift, base_drift, restored, message (the
              reward-hacking guard stopped the run)
  error       message, traceback
  notice      message (written by the ComfyUI Train node: why it encoded every prompt itself, docs/prompts.md)
Everything is written atomically; a SIGKILL loses at most the iteration in flight.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path

import torch

from .. import distributed
from .. import lora as lora_lib
from ..atomic import atomic_write_bytes
from .build import build_trainer, eval_pairs
from .cancel import CancelFlag
from .checkpoint import (clean_leftovers, latest_checkpoint, load_checkpoint, read_checkpoint, read_checkpoint_lora,
                         save_checkpoint)
from ..config import JobSpec, SpecError
from .before_after import BeforeAfter
from .encode_progress import EncodeProgress
from .evaluation import HeldOut
from ..export_formats import spec_family, spec_naming
from .guard import HackingGuard
from .files import DiskFull, job_subdir
from .folder import (PROCESS_ENDED, STATUSES, EventLog, create_job, current_status, load_spec, read_events,
                         read_json, read_status, request_cancel, write_status)
from ..paths import check_name
from ..policies import source_defaults
from ..provenance import lora_metadata
from .reports import write_reports, write_sample_grid
from ..method.trainer import IterationAbandoned

log = logging.getLogger(__name__)


# --- export ------------------------------------------------------------------------------------------
def export_job(job_dir, fmt: str, out=None, spec: JobSpec | None = None) -> Path:
    """Write the LoRA of the job's latest checkpoint in `fmt` (kohya | peft | comfy).

    The main format also goes to output.copy_to when the spec sets it (and `out` is not given);
    the path returned is then that copy, the file a user loads."""
    job_dir = Path(job_dir)
    spec = spec or load_spec(job_dir)
    if fmt not in lora_lib.FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; valid: {', '.join(lora_lib.FORMATS)}")
    ckpt = latest_checkpoint(job_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{job_dir} has no checkpoint yet; run the job first (`run {job_dir}`)")
    tensors = read_checkpoint_lora(ckpt)
    record = read_checkpoint(ckpt)
    history = record["trainer"]["history"]
    metrics = {k: v for k, v in (history[-1] if history else {}).items() if isinstance(v, (int, float))}
    if record["runner"].get("eval_history"):
        metrics["eval"] = record["runner"]["eval_history"]
    target = Path(out) if out else job_subdir(job_dir, "lora") / _lora_file_name(spec, fmt)
    path = lora_lib.export_lora(tensors, target, fmt, metadata=lora_metadata(spec, metrics, record.get("architecture")),
                                family=spec_family(spec) or record.get("architecture"), naming=spec_naming(spec))
    if spec.output.copy_to and out is None and fmt == spec.output.formats[0]:
        dest = Path(spec.output.copy_to) / path.name
        atomic_write_bytes(dest, path.read_bytes())  # makes the folder too (a full disk named as DiskFull)
        return dest
    return path


def _lora_file_name(spec: JobSpec, fmt: str) -> str:
    name = check_name(spec.output.name, "output.name")
    return f"{name}.safetensors" if fmt == spec.output.formats[0] else f"{name}.{fmt}.safetensors"


# --- running ---------------------------------------------------------------------------------------
class _SilentLog:
    """The event log of ranks other than 0: rank 0 alone writes (docs/scale_out.md)."""

    def emit(self, type: str, **data) -> dict:
        return {"type": type, **data}


def _writer_status(job_dir: Path, **fields) -> None:
    if distributed.is_writer():
        write_status(job_dir, **fields)


def run_job(job_dir, until: int | None = None, progress: bool = True) -> dict:
    """Run (or continue from the last checkpoint) until the spec's iterations, `until`, or a cancel.
    Under torchrun every rank calls this; rank 0 alone writes the job folder."""
    from ..policies import resolve_device

    job_dir = Path(job_dir)
    spec = load_spec(job_dir)
    distributed.init(distributed.rank_device(resolve_device(spec.train.device)), spec.train.dist_timeout)
    events = EventLog(job_dir) if distributed.is_writer() else _SilentLog()
    cancel = CancelFlag(job_dir)
    threads = torch.get_num_threads()
    ended_cleanly = False
    try:
        _writer_status(job_dir, status="running", pid=os.getpid(), message="", world_size=distributed.world_size())
        if spec.train.threads:  # the thread count changes float reduction order: part of a run's identity
            torch.set_num_threads(spec.train.threads)
        result = _run(job_dir, spec, events, cancel, until, progress and distributed.is_writer())
        ended_cleanly = True
        return result
    except BaseException as e:
        _record_failure(job_dir, events, e)
        raise
    finally:
        cancel.restore()
        torch.set_num_threads(threads)
        distributed.teardown(together=ended_cleanly)


def _record_failure(job_dir: Path, events: EventLog, error: BaseException) -> None:
    """The error event and the failed status, as far as the disk allows: when it is full, these writes
    fail too, and the status still reads failed ("process ended", job_folder.current_status)."""
    msg = str(error) if isinstance(error, DiskFull) else f"{type(error).__name__}: {error}"  # "failed: disk full: ..."
    msg += f" (rank {distributed.rank()})" if distributed.world_size() > 1 else ""
    # The status first: on a full disk it can still be written in place, the event line may not fit.
    for record in (lambda: _writer_status(job_dir, status="failed", message=msg, pid=None),
                   lambda: events.emit("error", message=msg, traceback=traceback.format_exc())):
        try:
            record()
        except OSError as e:
            log.warning("could not record the failure of %s: %s", job_dir, e)


def _run(job_dir: Path, spec: JobSpec, events: EventLog, cancel: CancelFlag, until, progress) -> dict:
    from tqdm.auto import tqdm

    cfg = spec.train
    writer = distributed.is_writer()
    if writer:
        clean_leftovers(job_dir)
    trainer = build_trainer(spec, job_dir=job_dir)
    trainer.on_encode = EncodeProgress(events, trainer, progress)
    if writer:
        trainer.plan.save_png(job_dir / "plan.png")
    ckpt = latest_checkpoint(job_dir)
    runner = load_checkpoint(ckpt, trainer) if ckpt else {}
    defaults = source_defaults(spec.model)
    held_out = HeldOut(trainer, eval_pairs(spec), defaults.get("group_key"), defaults.get("drift_fn"), runner.get("eval_history"))
    total = cfg.iterations if until is None else min(cfg.iterations, until)
    events.emit("start", iteration=trainer.state.iteration, total=cfg.iterations, resumed=ckpt is not None,
                plan=trainer.plan.to_json(), device=str(trainer.policy.device),
                family=getattr(trainer.policy, "architecture", None) or spec.model.family)
    grid = BeforeAfter(held_out, job_dir) if held_out else None  # every rank: a base sample may need them all

    def evaluate() -> dict:
        entry = held_out.run()
        events.emit("eval", **entry)
        if grid is not None and held_out.last_images is not None:
            events.emit("before_after", **grid.update(held_out.last_images, entry["iteration"]))
        return entry

    if held_out and not held_out.history:
        evaluate()  # the base model's numbers, the guard's reference
    guard = HackingGuard(cfg.diversity_guard, cfg.drift_guard, trainer.policy.lora_model(), held_out.base, trainer.state.iteration)

    bar = tqdm(total=cfg.iterations, initial=trainer.state.iteration, disable=not progress, desc="E-GRPO", unit="it")
    status, t_start, done_at_start = "finished", time.perf_counter(), trainer.state.iteration
    # Rank 0 reads the cancel file and its decision goes to every rank: all stop at the same point. A cancel
    # is also asked between the phases of an iteration (trainer.safe_point): however long an iteration is,
    # the job stops soon and checkpoints the last finished iteration (docs/comfyui.md, "Jobs").
    trainer.stop_requested = lambda: distributed.broadcast_decision(bool(cancel))
    while trainer.state.iteration < total and not distributed.broadcast_decision(bool(cancel)):
        try:
            result = trainer.step()
        except IterationAbandoned as e:
            events.emit("cancel", iteration=trainer.state.iteration, message=f"{e}; the checkpoint and LoRA are "
                        f"iteration {trainer.state.iteration}'s")
            path = save_checkpoint(job_dir, trainer, spec, {"eval_history": held_out.history})
            if writer:
                events.emit("checkpoint", iteration=trainer.state.iteration, path=str(path.relative_to(job_dir)))
            status = "cancelled"
            break
        it, m = trainer.state.iteration, result.metrics
        rate = (time.perf_counter() - t_start) / max(1, it - done_at_start)
        events.emit("metrics", total=cfg.iterations, eta_seconds=rate * (cfg.iterations - it), **m)
        _writer_status(job_dir, iteration=it, total=cfg.iterations)
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward_mean']:.3f}", **({"clip": f"{m['clip_frac']:.2f}"} if "clip_frac" in m
                                                           else {"nft_loss": f"{m['nft_loss']:.4f}"}))
        tripped = None
        if held_out.due(it):
            entry = evaluate()
            tripped = guard.check(it, entry)
            if tripped:
                events.emit("guard", **tripped)
        if writer and cfg.sample_every and it % cfg.sample_every == 0:
            events.emit("sample", iteration=it, path=write_sample_grid(job_dir, it, result.images, spec.algorithm.group_size),
                        **({"frames": result.images.shape[1]} if result.images.ndim == 5 else {}))  # video: animated WebP
        cancelled = distributed.broadcast_decision(bool(cancel))
        stop = cancelled or bool(tripped)
        if it % cfg.checkpoint_every == 0 or it == total or stop:  # every rank: FSDP2 gathers shards for it
            path = save_checkpoint(job_dir, trainer, spec, {"eval_history": held_out.history})
            if writer:
                events.emit("checkpoint", iteration=it, path=str(path.relative_to(job_dir)))
        if stop:
            status = "cancelled" if cancelled else "stopped"
            break
    bar.close()
    if status == "finished" and distributed.broadcast_decision(bool(cancel)):  # cancelled before its first iteration
        status = "cancelled"
    if not distributed.broadcast_decision(latest_checkpoint(job_dir) is not None):  # nothing trained yet
        save_checkpoint(job_dir, trainer, spec, {"eval_history": held_out.history})
    if not writer:
        return {"status": status, "iteration": trainer.state.iteration, "lora": [], "history": trainer.state.history,
                "eval": held_out.history}
    return _finish(job_dir, spec, trainer, held_out, status, events, trained=trainer.state.iteration > done_at_start)


def _exported(job_dir: Path, spec: JobSpec) -> list[Path] | None:
    """The LoRA files an earlier end of this run wrote (the copy in output.copy_to first), or None if one is missing."""
    paths = [job_dir / "lora" / _lora_file_name(spec, fmt) for fmt in spec.output.formats]
    if spec.output.copy_to:
        paths[0] = Path(spec.output.copy_to) / paths[0].name
    return paths if all(p.is_file() for p in paths) else None


def _finish(job_dir: Path, spec: JobSpec, trainer, held_out: HeldOut, status: str, events: EventLog,
            trained: bool = True) -> dict:
    """Export the LoRA in every format, write the reports and the final status. A run that trained no
    iteration (`resume` of a finished job) keeps the files already exported: same tensors, same bytes."""
    it = trainer.state.iteration
    if it < spec.train.iterations and status == "finished":
        status = "stopped"  # `until` reached: resumable
    # A run cancelled before any iteration finished has learned nothing: no LoRA (its checkpoint stays, to resume).
    # A run that trained nothing more (`resume` of a finished job) keeps the files it exported: same bytes.
    kept = None if trained else _exported(job_dir, spec)
    if kept is not None:
        paths = kept
    else:
        paths = [] if status == "cancelled" and it == 0 else [export_job(job_dir, fmt, spec=spec) for fmt in spec.output.formats]
        for fmt, path in zip(spec.output.formats, paths):
            events.emit("export", format=fmt, path=str(path.resolve()), **lora_lib.keys_mapped_of(path))
    write_reports(job_dir, trainer.state.history, held_out.history)
    (job_dir / "cancel").unlink(missing_ok=True)
    lora = str(paths[0].resolve()) if paths else None
    message = "" if paths or status != "cancelled" else "cancelled before its first iteration finished: no LoRA"
    write_status(job_dir, status=status, iteration=it, pid=None, lora=lora, message=message)
    events.emit("done", status=status, iteration=it, lora=lora, **({"message": message} if message else {}))
    return {"status": status, "iteration": it, "lora": [str(p) for p in paths], "history": trainer.state.history,
            "eval": held_out.history}


def resume_job(job_dir, until: int | None = None, progress: bool = True) -> dict:
    """Continue a stopped, cancelled or killed job from its last checkpoint. A job another process
    runs is refused by its lock (jobs/process.py); a stale cancel request is dropped by the lock too."""
    return run_job(job_dir, until=until, progress=progress)


__all__ = ["PROCESS_ENDED", "STATUSES", "current_status", "EventLog", "SpecError", "create_job", "export_job", "latest_checkpoint", "load_spec",
           "read_events", "read_json", "read_status", "request_cancel", "resume_job", "run_job", "write_status"]
