"""Background training jobs inside ComfyUI's process: start, queue, tail, cancel, resume, delete.

Each job is a folder under the jobs root (see egrpo_backend/jobs/run.py for its layout) and runs as a
child process `python -m egrpo_backend run|resume JOB_DIR`, so the ComfyUI queue is never blocked,
a crash or OOM cannot take ComfyUI down, and cancelling frees all of the child's memory. One job
runs at a time (they share the GPU); the others wait in a FIFO queue that is saved in the jobs root
(job_queue.py), so a restart resumes the line in order. A monitor thread tails the running job's
events.jsonl and forwards every event to the browsers as the websocket event "egrpo.event" with
data {"job": id, **event}. Events the manager adds itself: "queued" (with position), "process"
(child started, with pid), "exit" (child ended, with returncode, None when unknown), "cancel" (the
child answered a graceful cancel: it stops at its next safe point) and, when a child dies without
writing its end (SIGKILL, OOM killer), an "error" with the tail of its log.

What is true about a job comes from its folder, never from a guess:
- A job runs exactly while a process holds its process.lock (egrpo_backend/jobs/process.py). A pid
  alone proves nothing (pids are reused after a restart), so a pid is signalled only when it is this
  manager's own unreaped child, or the lock holder proven by its start time.
- When the process ends, a final status the folder holds (the child's own "finished", "cancelled",
  "stopped" or "failed", or the "cancelled" written on a kill) is the result; only a run that ended
  without writing one is reported failed (with its exit code when this manager started it).
- A child that outlives ComfyUI is adopted by the next ComfyUI (`scan`) and reported the same way.

Nothing here imports ComfyUI; `send` is injected (comfy_glue.send_event inside ComfyUI).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from egrpo_backend.jobs import process as job_process
from egrpo_backend.jobs import run as backend_jobs
from egrpo_backend.jobs.cancel import ACK_FILE
from egrpo_backend.jobs.checkpoint import read_checkpoint
from egrpo_backend.paths import check_name, safe_join

from . import job_view
from .job_queue import JobQueue

log = logging.getLogger("egrpo")

REPO_ROOT = Path(__file__).resolve().parent.parent  # the pack's folder: holds egrpo_backend/
EVENT = "egrpo.event"
FINAL = ("finished", "cancelled", "stopped", "failed")
LOG_FILE = "child.log"
QUEUE_FILE = "queue.json"
LAUNCH_FILE = "launch.json"  # how the manager starts the job: {"gpus": N} (N > 1: torchrun, one rank per GPU)
KILL_AFTER_ENV = "EGRPO_CANCEL_ANSWER_SECONDS"  # seconds a child has to answer a graceful cancel (default 60)
RUN_ENV = "EGRPO_MANAGED_JOB"  # set to the job folder in the child's environment; torchrun's ranks inherit it


class JobError(ValueError):
    """A request the manager refuses (unknown job, wrong state); the message says why."""


class _Running:
    """The job this manager watches: a child it started (proc) or one it adopted after a restart."""

    def __init__(self, job_id: str, path: Path, proc: subprocess.Popen | None = None, log_file=None):
        self.job_id, self.path, self.proc, self.log_file = job_id, path, proc, log_file
        self.offset = 0
        self.kill_at: float | None = None
        self.cancel_requested = self.signalled = self.forced = False

    def ended(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        return not job_process.job_running(self.path)  # adopted: the kernel drops the lock when it ends

    def exit_code(self) -> int | None:
        """The child's exit status; None for an adopted child (only its parent, gone, could read it)."""
        return self.proc.returncode if self.proc is not None else None

    def signal(self, sig: int) -> bool:
        """Signal the job's process if it is provably the job's: our own child while not yet reaped (its
        pid cannot be reused before that), else the lock holder proven by its start time."""
        if self.proc is not None:
            if self.proc.poll() is not None:
                return False
            try:
                if sig == signal.SIGKILL:
                    os.killpg(self.proc.pid, sig)  # its own session (start_new_session): the whole group
                    kill_job_processes(self.path)  # and torchrun's ranks, each in a session of its own
                else:
                    self.proc.send_signal(sig)
                return True
            except (ProcessLookupError, PermissionError):
                return False
        sent = job_process.signal_owner(self.path, sig)
        if sent and sig == signal.SIGKILL:
            kill_job_processes(self.path)
        return sent


class JobManager:
    def __init__(self, root, loras_dir=None, send: Callable[[str, dict], None] | None = None,
                 python: str = sys.executable, env: dict | None = None, poll_seconds: float = 0.5,
                 kill_after: float | None = None):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.loras_dir = Path(loras_dir).resolve() if loras_dir else None
        self.send = send or (lambda event, data: None)
        self.python, self.extra_env = python, dict(env or {})
        # A graceful cancel kills only a child that does not answer it (cancel.ACK_FILE) within kill_after seconds;
        # one that answers is waited for until its next safe point, however long its phase takes.
        self.poll_seconds = poll_seconds
        self.kill_after = float(os.environ.get(KILL_AFTER_ENV, 60.0)) if kill_after is None else kill_after
        self._lock = threading.RLock()
        self._queue = JobQueue(self.root / QUEUE_FILE)
        self._running: _Running | None = None
        self._last: dict[str, dict] = {}  # job id -> last metrics event (progress, ETA)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- ids and folders ---------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        """The folder of a job id; refuses names that are not plain folder names (HTTP 400)."""
        check_name(job_id, "job id")
        return safe_join(self.root, job_id)

    def _existing(self, job_id: str) -> Path:
        path = self.job_dir(job_id)
        if not (path / "job.json").is_file():
            raise FileNotFoundError(f"no job {job_id!r} in {self.root}")
        return path

    def file(self, job_id: str, rel: str) -> Path:
        """A file inside a job folder by relative path ('plan.png', 'samples/iter_000002.png')."""
        parts = [p for p in rel.split("/")]
        for p in parts:
            check_name(p, "file name")
        path = safe_join(self._existing(job_id), *parts)
        if not path.is_file():
            raise FileNotFoundError(f"job {job_id!r} has no file {rel!r}")
        return path

    # --- create / queue ------------------------------------------------------------------------
    def submit(self, spec: dict, job_id: str, gpus: int = 1) -> str:
        """Create the job (if this id is new) and queue it; an existing id is returned untouched.

        This is what makes re-queuing an unchanged graph safe: the node derives the id from a
        hash of its inputs, so the same inputs find the same job, whatever its state.
        gpus > 1 runs it as `run JOB --nproc-per-node gpus` (torchrun, one rank per GPU), also when resumed.
        """
        gpus = int(gpus)
        if gpus < 1:
            raise ValueError(f"gpus = {gpus}; it must be 1 or more")
        path = self.job_dir(job_id)
        with self._lock:
            if (path / "job.json").is_file():
                return job_id
            if self.loras_dir and not spec.get("output", {}).get("copy_to") and _lists_in_comfyui(spec):
                spec = {**spec, "output": {**spec.get("output", {}), "copy_to": str(self.loras_dir)}}
            _check_copy_to(spec.get("output", {}).get("copy_to"), self.loras_dir)
            position = self._queue.append(job_id, "run")  # saved first: a restart then finds it or no job at all
            try:
                backend_jobs.create_job(spec, path)
                if gpus > 1:
                    from egrpo_backend.atomic import atomic_write_json

                    atomic_write_json(path / LAUNCH_FILE, {"gpus": gpus})
            except BaseException:
                self._queue.remove(job_id)
                raise
            self._queued(job_id, position)
        return job_id

    def resume(self, job_id: str) -> str:
        path = self._existing(job_id)
        with self._lock:
            if self._is_active(job_id):
                raise JobError(f"job {job_id!r} is already {self._state(job_id)}")
            if job_process.job_running(path):
                raise JobError(f"job {job_id!r} is running in another process (pid "
                               f"{(job_process.read_identity(path) or {}).get('pid', '?')}); wait for it to end")
            status = backend_jobs.read_status(path)
            if status.get("status") == "finished":
                raise JobError(f"job {job_id!r} has finished; there is nothing to resume")
            self._queued(job_id, self._queue.append(job_id, "resume"))
        return job_id

    def _queued(self, job_id: str, position: int, **extra) -> None:
        self._emit(job_id, {"type": "queued", "position": position, **extra})
        self._ensure_thread()
        self._pump()

    def _is_active(self, job_id: str) -> bool:
        return (self._running is not None and self._running.job_id == job_id) or job_id in self._queue

    def _state(self, job_id: str) -> str:
        if self._running is not None and self._running.job_id == job_id:
            return "running"
        return "queued" if job_id in self._queue else ""

    def _waiting_message(self, job_id: str) -> str:
        """Why a queued job waits, for the panel and the Job node."""
        pos = self._queue.position(job_id) or 0
        ahead = [j for j, _ in self._queue.items[: max(0, pos - 1)]]
        parts = [f"waiting: number {pos} in the queue"]
        if self._running is not None:
            parts.append(f"{self._running.job_id} is training now")
        if ahead:
            parts.append(f"{', '.join(ahead)} {'starts' if len(ahead) == 1 else 'start'} first")
        return "; ".join(parts) + " (one job trains at a time)"

    # --- cancel / delete -------------------------------------------------------------------------
    def cancel(self, job_id: str, force: bool = False) -> dict:
        """Queued: dropped. Running: stops at its next safe point between phases and writes its checkpoint
        and LoRA (the last finished iteration's), however long that takes once the child has answered;
        force (or no answer within kill_after seconds): killed at once, the last checkpoint's LoRA exported."""
        path = self._existing(job_id)
        with self._lock:
            if self._queue.remove(job_id):
                backend_jobs.write_status(path, status="cancelled", pid=None, message="cancelled while queued")
                self._emit(job_id, {"type": "done", "status": "cancelled", "iteration":
                                    backend_jobs.read_status(path).get("iteration", 0), "lora": None})
                return self.get(job_id)
            run = self._running
            if run is None or run.job_id != job_id:
                if job_process.job_running(path) and not force:  # run by another process (e.g. the CLI)
                    try:
                        backend_jobs.request_cancel(path)
                    except RuntimeError as e:  # it ended meanwhile
                        raise JobError(str(e)) from None
                    return self.get(job_id)
                raise JobError(f"job {job_id!r} is not running or queued" if not job_process.job_running(path) else
                               f"job {job_id!r} runs in another process, not started by this ComfyUI: it can be "
                               "cancelled (at its next safe point) but not killed from here")
            first = not run.cancel_requested  # a repeated graceful cancel changes nothing (an answer stands)
            run.cancel_requested, run.forced = True, run.forced or force
            if first:
                (path / ACK_FILE).unlink(missing_ok=True)  # an answer counts only when it comes after this request
                (path / job_process.CANCEL_FILE).write_text(str(time.time()))
            self._signal_cancel(run)
            if force or first:
                run.kill_at = time.time() + (0 if force else self.kill_after)
            if force:
                self.tick()
        return self.get(job_id)

    def _signal_cancel(self, run: _Running) -> None:
        """SIGTERM once the child holds its lock: it takes the lock only after it catches SIGTERM, so
        the signal can never kill a child that is still starting (the cancel file reaches it anyway)."""
        if run.cancel_requested and not run.signalled and job_process.job_running(run.path):
            run.signalled = run.signal(signal.SIGTERM)

    def delete(self, job_id: str) -> None:
        path = self._existing(job_id)
        with self._lock:
            if self._is_active(job_id) or job_process.job_running(path):
                raise JobError(f"job {job_id!r} is {self._state(job_id) or 'running'}; cancel it before deleting")
            shutil.rmtree(path)
            self._last.pop(job_id, None)

    # --- reading ---------------------------------------------------------------------------------
    def list(self) -> list[dict]:
        """Every job, newest first; a damaged folder (or a link in the jobs folder) shows as "damaged"."""
        out = []
        for path in sorted(self.root.iterdir(), key=_mtime, reverse=True):
            try:
                check_name(path.name)
            except ValueError:
                continue
            if path.is_symlink():
                out.append(_damaged(path.name, "a symbolic link in the jobs folder, not a job folder (links are not "
                                               "followed); remove it"))
            elif (path / "job.json").is_file():
                try:
                    out.append(self.get(path.name))
                except FileNotFoundError:  # deleted meanwhile
                    continue
        return out

    def get(self, job_id: str) -> dict:
        path = self._existing(job_id)
        try:
            return self._summary(job_id, path)
        except (ValueError, TypeError, AttributeError, KeyError, OSError) as e:
            return _damaged(job_id, f"{type(e).__name__}: {e}; delete the job or fix its files")

    def _summary(self, job_id: str, path: Path) -> dict:
        status = backend_jobs.read_status(path)
        spec = backend_jobs.read_json(path / "job.json", {})
        state = self._state(job_id)
        saved, message = status.get("status"), status.get("message", "")
        if state == "queued":
            shown, message = "queued", self._waiting_message(job_id)
        elif state == "running" or job_process.job_running(path):  # ours, or another process's (the CLI)
            shown = "running"
        elif saved == "running":  # nobody runs it: the folder's word is stale (scan() corrects the file)
            shown, message = "failed", backend_jobs.PROCESS_ENDED
        else:
            shown = saved
        events, _ = backend_jobs.read_events(path)
        last = self._last.get(job_id) or next((e for e in reversed(events) if e["type"] == "metrics"), {})
        total = status.get("total") or spec.get("train", {}).get("iterations") or 0
        lora = status.get("lora")
        if lora and not Path(lora).is_file():  # a cancelled or failed job whose LoRA was never written shows none
            lora = None
        timing = job_view.eta(events, total - status.get("iteration", 0)) if shown == "running" else {}
        world = status.get("world_size") if shown == "running" or not state else None
        return {
            "id": job_id, "name": spec.get("output", {}).get("name", job_id), "status": shown,
            "iteration": status.get("iteration", 0), "total": total,
            "progress": (status.get("iteration", 0) / total) if total else 0.0,
            "eta_seconds": timing.get("eta_seconds"), "eta_low": timing.get("eta_low"),
            "eta_high": timing.get("eta_high"), "eta_stable": timing.get("eta_stable", False),
            **job_view.identity(job_id, spec, events), "folder": str(path),
            "reward_mean": last.get("reward_mean"), "message": message,
            "lora": lora, "lora_name": self.lora_name(lora), "model": spec.get("model", {}).get("source"),
            "gpus": launch_gpus(path), "world_size": int(world or launch_gpus(path)),
            "created": (path / "job.json").stat().st_mtime, "updated": status.get("updated"),
            "resumable": shown in ("stopped", "cancelled", "failed", "created") and not state,
            "files": [f for f in ("plan.png", "reward_curve.png", "before_after.png", "before_after.webp") if (path / f).is_file()],
            "samples": sorted(p.name for p in (path / "samples").glob("iter_*.*") if p.suffix in (".png", ".webp"))[-4:]
            if (path / "samples").is_dir() else [],  # .webp: a video model's animated samples
        }

    def lora_name(self, lora: str | None) -> str | None:
        """The name the core LoraLoader lists for a LoRA file (relative to its loras folder); None for a
        LoRA that is not in ComfyUI's loras folder (the embedded default's stays in its job folder)."""
        if not lora:
            return None
        p = Path(lora)
        if self.loras_dir and self.loras_dir in p.parents:
            return p.relative_to(self.loras_dir.parent).as_posix()
        return None

    def events(self, job_id: str, offset: int = 0) -> tuple[list[dict], int]:
        return backend_jobs.read_events(self._existing(job_id), max(0, int(offset)))

    def metrics(self, job_id: str) -> dict:
        """The panel's charts (job_view.curves): train, eval, components, before_after, plan, errors."""
        events, _ = self.events(job_id)
        return job_view.curves(events)

    # --- start-up: what a previous ComfyUI left ---------------------------------------------------
    def scan(self) -> list[str]:
        """At start-up: adopt the job a previous ComfyUI's child still runs (its lock is held), mark jobs
        whose process is gone failed ("process ended", resumable), and restart the saved queue in order.

        Returns the ids that can be resumed by hand (stopped or never queued)."""
        resumable = []
        with self._lock:
            for path in sorted(self.root.iterdir()):
                if not (path / "job.json").is_file():
                    continue
                try:
                    check_name(path.name)
                except ValueError:
                    continue
                if job_process.job_running(path):
                    if self._running is None:  # a child that outlived the previous ComfyUI: watch it to its end
                        self._running = _Running(path.name, path)
                        events = path / "events.jsonl"
                        self._running.offset = events.stat().st_size if events.exists() else 0
                    continue  # else another process (the CLI) runs it: get() shows it running
                ended = backend_jobs.read_status(path).get("status") == "running"
                if ended:
                    try:
                        backend_jobs.write_status(path, status="failed", pid=None, message=backend_jobs.PROCESS_ENDED)
                        (path / job_process.CANCEL_FILE).unlink(missing_ok=True)
                    except (ValueError, OSError) as e:  # a linked status.json, a full disk: get() still reads failed
                        log.warning("E-GRPO: cannot mark job %s failed: %s", path.name, e)
                if ended or backend_jobs.read_status(path).get("status") in ("stopped", "created"):
                    resumable.append(path.name)
            line = []
            for job_id, command in self._queue.load():
                path = self.root / job_id
                try:
                    check_name(job_id)
                except ValueError:
                    continue
                if (not (path / "job.json").is_file() or self._is_active(job_id) or job_id in (j for j, _ in line)
                        or backend_jobs.read_status(path).get("status") == "finished"):
                    continue
                line.append((job_id, command))
                if job_id in resumable:
                    resumable.remove(job_id)
            self._queue.replace(line)
            for pos, (job_id, _) in enumerate(self._queue.items, 1):
                self._emit(job_id, {"type": "queued", "position": pos, "restored": True})
            if self._running is not None or self._queue.items:
                self._ensure_thread()
            self._pump()
        return resumable

    def status_line(self) -> str:
        """What runs and waits now, for the start-up log ('' when nothing)."""
        parts = []
        if self._running is not None:
            parts.append(f"job {self._running.job_id} is running" + (" (adopted from the previous ComfyUI)"
                                                                        if self._running.proc is None else ""))
        if len(self._queue):
            parts.append(f"{len(self._queue)} job(s) queued: {', '.join(j for j, _ in self._queue.items)}")
        return "; ".join(parts)

    # --- the monitor -----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="egrpo-jobs", daemon=True)
            self._thread.start()

    def shutdown(self, kill: bool = False) -> None:
        """Stop watching (the child keeps running, as when ComfyUI exits); kill = also kill our own child."""
        self._stop.set()
        if kill and self._running is not None and self._running.proc is not None:
            self._running.signal(signal.SIGKILL)
            self._running.proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the monitor must survive anything a job folder does
                log.exception("E-GRPO job monitor")
            self._stop.wait(self.poll_seconds)

    def tick(self) -> None:
        """One monitor pass: forward new events, deliver a cancel, notice an end, start the next queued job."""
        with self._lock:
            run = self._running
            if run is None:
                self._pump()
                return
            self._forward(run)
            self._signal_cancel(run)
            if run.kill_at is not None and not run.forced and (run.path / ACK_FILE).exists():
                run.kill_at = None  # it answered: it stops at its next safe point, however long the phase in flight
                self._emit(run.job_id, {"type": "cancel", "message": "stopping at the next safe point between phases; "
                                        "the checkpoint and LoRA of the last finished iteration are kept"})
            if not run.ended() and run.kill_at is not None and time.time() >= run.kill_at:
                self._kill(run)
            if not run.ended():
                return
            self._forward(run)
            self._finish(run)
            self._running = None
            self._pump()

    def _forward(self, run: _Running) -> None:
        events, run.offset = backend_jobs.read_events(run.path, run.offset)
        for e in events:
            if e["type"] == "metrics":
                self._last[run.job_id] = e
            self._emit(run.job_id, e)

    def _emit(self, job_id: str, event: dict) -> None:
        try:
            self.send(EVENT, {"job": job_id, "time": time.time(), **event})
        except Exception:  # noqa: BLE001 - a closed websocket must not stop a job
            log.exception("E-GRPO: sending an event failed")

    def _kill(self, run: _Running) -> None:
        """Hard stop (force cancel, or a cancel not done within kill_after): SIGKILL, then the job reads
        "cancelled" at its last checkpoint's iteration, with that checkpoint's LoRA."""
        run.kill_at = None
        path = run.path
        if not run.signal(signal.SIGKILL):
            if not run.ended():
                msg = ("cannot prove which process runs this job on this system, so it is not killed; it stops "
                       "at its next safe point between phases (cancel file)")
                log.warning("E-GRPO job %s: %s", run.job_id, msg)
                self._emit(run.job_id, {"type": "cancel", "message": msg})
                return
        if run.proc is not None:
            run.proc.wait()
        else:
            deadline = time.time() + 10
            while not run.ended() and time.time() < deadline:
                time.sleep(0.05)
        if backend_jobs.read_status(path).get("status") in FINAL:
            return  # the child wrote its own end before the kill landed: that stands
        lora, iteration = None, 0
        try:
            ckpt = backend_jobs.latest_checkpoint(path)
            if ckpt is not None:
                iteration = int(read_checkpoint(ckpt)["trainer"]["iteration"])
            if iteration > 0:  # a checkpoint before any iteration holds an untrained LoRA: none is shown
                spec = backend_jobs.load_spec(path)
                lora = backend_jobs.export_job(path, spec.output.formats[0], spec=spec)  # (and its copy_to copy)
        except Exception as e:  # noqa: BLE001
            log.warning("E-GRPO: exporting the last checkpoint of %s failed: %s", run.job_id, e)
        (path / job_process.CANCEL_FILE).unlink(missing_ok=True)
        reached = backend_jobs.read_status(path).get("iteration", 0)
        msg = (f"killed on cancel after iteration {reached}; " +
               (f"the LoRA is the last checkpoint's (iteration {iteration}); resume continues from there" if lora else
                "no checkpoint after iteration 0 existed, so there is no LoRA; resume starts from the beginning"))
        backend_jobs.write_status(path, status="cancelled", pid=None, iteration=iteration,
                                  lora=str(lora.resolve()) if lora else None, message=msg)
        backend_jobs.EventLog(path).emit("done", status="cancelled", iteration=iteration,
                                         lora=str(lora.resolve()) if lora else None, message=msg)

    def _finish(self, run: _Running) -> None:
        """The process ended: a final status in the folder is the result; otherwise it died without one."""
        path = run.path
        if run.log_file is not None:
            run.log_file.close()
        (path / job_process.CANCEL_FILE).unlink(missing_ok=True)  # addressed to a run that is over
        (path / ACK_FILE).unlink(missing_ok=True)
        rc = run.exit_code()
        status = backend_jobs.read_status(path).get("status")
        if status in FINAL:
            pass  # the child's own end (or the kill's "cancelled"): whatever the exit code says
        elif rc == 0:
            backend_jobs.write_status(path, status="stopped", pid=None,
                                      message="the training process exited without writing its end; resume it")
        else:
            # Died without reporting (SIGKILL, OOM killer, an import error before run_job): say so.
            how = (f"exited with code {rc}" if rc is not None else
                   "ended (it was started by an earlier ComfyUI, so its exit code is unknown)")
            tail = _tail(path / LOG_FILE)
            msg = f"the training process {how} without reporting an error" + (f": {tail}" if tail else "")
            backend_jobs.write_status(path, status="failed", pid=None, message=msg)
            backend_jobs.EventLog(path).emit("error", message=msg, traceback="")
            self._forward(run)
        self._emit(run.job_id, {"type": "exit", "returncode": rc, "status": backend_jobs.read_status(path).get("status")})

    def _pump(self) -> None:
        """Start the next queued job when none runs."""
        while self._running is None and len(self._queue):
            job_id, command = self._queue.popleft()
            path = self.root / job_id
            if not (path / "job.json").is_file():
                continue
            if job_process.job_running(path):
                self._emit(job_id, {"type": "error", "traceback": "", "message":
                                    f"job {job_id} is already running in another process; not started again"})
                continue
            self._start(job_id, command, path)

    def _start(self, job_id: str, command: str, path: Path) -> None:
        env = {**os.environ, **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("HF_HUB_OFFLINE", "1")
        env[RUN_ENV] = str(path.resolve())  # marks every process of this run, torchrun's ranks included
        gpus = launch_gpus(path)
        (path / job_process.CANCEL_FILE).unlink(missing_ok=True)
        (path / ACK_FILE).unlink(missing_ok=True)
        log_file = open(path / LOG_FILE, "ab")
        offset = (path / "events.jsonl").stat().st_size if (path / "events.jsonl").exists() else 0
        argv = [self.python, "-m", "egrpo_backend", command, str(path), "--quiet"]
        argv += ["--nproc-per-node", str(gpus)] if gpus > 1 else []  # the command line's own torchrun launch
        proc = subprocess.Popen(argv, cwd=str(REPO_ROOT),
                                env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        # A stale end from an earlier run must not be taken for this run's: from now on the folder says running.
        backend_jobs.write_status(path, status="running", pid=proc.pid, message="", world_size=gpus)
        self._running = _Running(job_id, path, proc, log_file)
        self._running.offset = offset
        self._emit(job_id, {"type": "process", "pid": proc.pid, "command": command, "gpus": gpus})


def launch_gpus(path: Path) -> int:
    """The gpus a job was submitted with (launch.json; 1 without it)."""
    try:
        return max(1, int(backend_jobs.read_json(path / LAUNCH_FILE, {}).get("gpus", 1)))
    except (ValueError, TypeError, AttributeError):
        return 1


def job_processes(path: Path) -> list[int]:
    """Live processes (Linux /proc) this manager started for the job folder, found by the RUN_ENV mark in
    their environment: the child, torchrun and every rank, whatever session or parent they have now."""
    mark = f"{RUN_ENV}={Path(path).resolve()}".encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if mark in env:  # a zombie's environ reads empty: only live processes match
            found.append(int(entry))
    return found


def kill_job_processes(path: Path, wait: float = 10.0) -> list[int]:
    """SIGKILL every process of the job (job_processes) until none is left or `wait` seconds pass; the
    pids that were still alive at the end (normally none)."""
    deadline = time.time() + wait
    while True:
        pids = job_processes(path)
        if not pids or time.time() >= deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def _mtime(path: Path) -> float:
    """For sorting: a dangling link or a folder deleted meanwhile sorts last instead of raising."""
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _damaged(job_id: str, reason: str) -> dict:
    """The summary of a job whose folder cannot be read: shown, never hiding the other jobs."""
    return {"id": job_id, "name": job_id, "status": "damaged", "message": reason, "iteration": 0, "total": 0,
            "progress": 0.0, "eta_seconds": None, "eta_low": None, "eta_high": None, "eta_stable": False, "reward_mean": None,
            "lora": None, "lora_name": None, "model": None, "short_id": job_id[:8], "family": None, "preset": None,
            "started": None, "folder": None,
            "gpus": 1, "world_size": 1,
            "created": None, "updated": None, "resumable": False, "files": [], "samples": []}


def _check_copy_to(copy_to, loras_dir: Path | None) -> None:
    """A LoRA copy goes only into the loras folder the server registered (comfy_glue.loras_dir)."""
    if not copy_to:
        return
    dest = Path(copy_to).resolve()
    if loras_dir is None or (dest != loras_dir and loras_dir not in dest.parents):
        raise ValueError(f"output.copy_to {copy_to!r} is refused: LoRAs are copied only into ComfyUI's loras "
                         f"folder ({loras_dir or 'none registered'}); remove output.copy_to")


def _lists_in_comfyui(spec: dict) -> bool:
    """Whether a job's LoRA belongs in ComfyUI's LoRA list: not the embedded digits model's, which no
    ComfyUI model can load (it stays in the job folder)."""
    return spec.get("model", {}).get("source", "default") != "default"


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text[-lines:] if ln.strip())[-800:]


_MANAGER: JobManager | None = None


def get_manager() -> JobManager:
    """The process-wide manager (jobs under ComfyUI's output/egrpo_jobs, LoRAs into loras/egrpo)."""
    global _MANAGER
    if _MANAGER is None:
        from . import comfy_glue

        _MANAGER = JobManager(comfy_glue.jobs_root(), comfy_glue.loras_dir(), send=comfy_glue.send_event)
    return _MANAGER


def set_manager(manager: JobManager | None) -> None:
    """Tests: replace the process-wide manager."""
    global _MANAGER
    _MANAGER = manager


__all__ = ["EVENT", "JobError", "JobManager", "get_manager", "set_manager"]
