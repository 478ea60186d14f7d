"""Background training jobs inside ComfyUI's process: start, queue, tail, cancel, resume, delete.

Each job is a folder under the jobs root (see egrpo_backend/jobs.py for its layout) and runs as a
child process `python -m egrpo_backend run|resume JOB_DIR`, so the ComfyUI queue is never blocked,
a crash or OOM cannot take ComfyUI down, and cancelling frees all of the child's memory. One job
runs at a time (they share the GPU); the others wait in a FIFO queue. A monitor thread tails each
running job's events.jsonl and forwards every event to the browsers as the websocket event
"egrpo.event" with data {"job": id, **event}. Events the manager adds itself: "queued",
"process" (child started, with pid), "exit" (child ended, with returncode) and, when a child dies
without writing one (SIGKILL, OOM killer), an "error" with the tail of its log.

Nothing here imports ComfyUI; `send` is injected (comfy_glue.send_event inside ComfyUI).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from egrpo_backend import jobs as backend_jobs
from egrpo_backend.paths import check_name, safe_join

log = logging.getLogger("egrpo")

REPO_ROOT = Path(__file__).resolve().parent.parent  # the pack's folder: holds egrpo_backend/
EVENT = "egrpo.event"
FINAL = ("finished", "cancelled", "stopped", "failed")
LOG_FILE = "child.log"


class JobError(ValueError):
    """A request the manager refuses (unknown job, wrong state); the message says why."""


class _Running:
    def __init__(self, job_id: str, proc: subprocess.Popen | None, pid: int, log_file=None):
        self.job_id, self.proc, self.pid, self.log_file = job_id, proc, pid, log_file
        self.offset = 0
        self.kill_at: float | None = None

    def returncode(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        return None if backend_jobs.pid_alive(self.pid) else -1  # adopted: exit status unknown


class JobManager:
    def __init__(self, root, loras_dir=None, send: Callable[[str, dict], None] | None = None,
                 python: str = sys.executable, env: dict | None = None, poll_seconds: float = 0.5,
                 kill_after: float = 60.0):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.loras_dir = Path(loras_dir).resolve() if loras_dir else None
        self.send = send or (lambda event, data: None)
        self.python, self.extra_env = python, dict(env or {})
        self.poll_seconds, self.kill_after = poll_seconds, kill_after
        self._lock = threading.RLock()
        self._queue: deque[tuple[str, str]] = deque()  # (job id, "run" | "resume")
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
    def submit(self, spec: dict, job_id: str) -> str:
        """Create the job (if this id is new) and queue it; an existing id is returned untouched.

        This is what makes re-queuing an unchanged graph safe: the node derives the id from a
        hash of its inputs, so the same inputs find the same job, whatever its state.
        """
        path = self.job_dir(job_id)
        with self._lock:
            if (path / "job.json").is_file():
                return job_id
            if self.loras_dir and not spec.get("output", {}).get("copy_to"):
                spec = {**spec, "output": {**spec.get("output", {}), "copy_to": str(self.loras_dir)}}
            backend_jobs.create_job(spec, path)
            self._enqueue(job_id, "run")
        return job_id

    def resume(self, job_id: str) -> str:
        path = self._existing(job_id)
        with self._lock:
            if self._is_active(job_id):
                raise JobError(f"job {job_id!r} is already {self._state(job_id)}")
            status = backend_jobs.read_status(path)
            if status.get("status") == "finished":
                raise JobError(f"job {job_id!r} has finished; there is nothing to resume")
            self._enqueue(job_id, "resume")
        return job_id

    def _enqueue(self, job_id: str, command: str) -> None:
        self._queue.append((job_id, command))
        self._emit(job_id, {"type": "queued", "position": len(self._queue)})
        self._ensure_thread()
        self._pump()

    def _is_active(self, job_id: str) -> bool:
        return (self._running is not None and self._running.job_id == job_id) or any(j == job_id for j, _ in self._queue)

    def _state(self, job_id: str) -> str:
        if self._running is not None and self._running.job_id == job_id:
            return "running"
        return "queued" if any(j == job_id for j, _ in self._queue) else ""

    # --- cancel / delete -------------------------------------------------------------------------
    def cancel(self, job_id: str, force: bool = False) -> dict:
        """Queued: dropped. Running: stops after its current iteration and writes its LoRA;
        force (or no exit within kill_after seconds): killed at once, the last checkpoint's LoRA exported."""
        path = self._existing(job_id)
        with self._lock:
            if any(j == job_id for j, _ in self._queue):
                self._queue = deque((j, c) for j, c in self._queue if j != job_id)
                backend_jobs.write_status(path, status="cancelled", message="cancelled while queued")
                self._emit(job_id, {"type": "done", "status": "cancelled", "iteration": 0, "lora": None})
                return self.get(job_id)
            run = self._running
            if run is None or run.job_id != job_id:
                raise JobError(f"job {job_id!r} is not running or queued")
            backend_jobs.request_cancel(path)
            try:
                os.kill(run.pid, signal.SIGTERM)  # also when status.json does not say running yet
            except (ProcessLookupError, PermissionError):
                pass
            run.kill_at = time.time() + (0 if force else self.kill_after)
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        path = self._existing(job_id)
        with self._lock:
            if self._is_active(job_id):
                raise JobError(f"job {job_id!r} is {self._state(job_id)}; cancel it before deleting")
            shutil.rmtree(path)
            self._last.pop(job_id, None)

    # --- reading ---------------------------------------------------------------------------------
    def list(self) -> list[dict]:
        out = []
        for path in sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            if (path / "job.json").is_file():
                try:
                    out.append(self.get(path.name))
                except (ValueError, OSError):
                    continue
        return out

    def get(self, job_id: str) -> dict:
        path = self._existing(job_id)
        status = backend_jobs.read_status(path)
        spec = backend_jobs.read_json(path / "job.json", {})
        state = self._state(job_id)
        last = self._last.get(job_id) or self._last_metrics(path)
        total = status.get("total") or spec.get("train", {}).get("iterations") or 0
        lora = status.get("lora")
        return {
            "id": job_id, "name": spec.get("output", {}).get("name", job_id),
            "status": state if state == "queued" else ("running" if state == "running" else status.get("status")),
            "iteration": status.get("iteration", 0), "total": total,
            "progress": (status.get("iteration", 0) / total) if total else 0.0,
            "eta_seconds": last.get("eta_seconds") if state == "running" else None,
            "reward_mean": last.get("reward_mean"), "message": status.get("message", ""),
            "lora": lora, "lora_name": self.lora_name(lora), "model": spec.get("model", {}).get("source"),
            "created": (path / "job.json").stat().st_mtime, "updated": status.get("updated"),
            "resumable": state == "" and status.get("status") in ("stopped", "cancelled", "failed", "created"),
            "files": [f for f in ("plan.png", "reward_curve.png") if (path / f).is_file()],
            "samples": sorted(p.name for p in (path / "samples").glob("*.png"))[-4:] if (path / "samples").is_dir() else [],
        }

    def lora_name(self, lora: str | None) -> str | None:
        """The name the core LoraLoader lists for a LoRA file (relative to its loras folder)."""
        if not lora:
            return None
        p = Path(lora)
        if self.loras_dir and self.loras_dir in p.parents:
            return p.relative_to(self.loras_dir.parent).as_posix()
        return p.name

    def events(self, job_id: str, offset: int = 0) -> tuple[list[dict], int]:
        return backend_jobs.read_events(self._existing(job_id), max(0, int(offset)))

    def metrics(self, job_id: str) -> dict:
        events, _ = self.events(job_id)
        train = [{k: e.get(k) for k in ("iteration", "reward_mean", "reward_std", "clip_frac", "nfe_total", "seconds")}
                 for e in events if e["type"] == "metrics"]
        evals = [{k: e.get(k) for k in ("iteration", "reward_mean", "reward_ci", "diversity")}
                 for e in events if e["type"] == "eval"]
        errors = [e.get("message") for e in events if e["type"] == "error"]
        plan = next((e.get("plan") for e in reversed(events) if e["type"] == "start"), None)
        return {"train": train, "eval": evals, "plan": plan, "errors": errors}

    def _last_metrics(self, path: Path) -> dict:
        events, _ = backend_jobs.read_events(path)
        return next((e for e in reversed(events) if e["type"] == "metrics"), {})

    def wait(self, job_id: str, timeout: float | None = None, on_poll: Callable[[dict], None] | None = None) -> dict:
        """Block until the job is neither queued nor running (or timeout); returns get(job_id)."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            info = self.get(job_id)
            if on_poll:
                on_poll(info)
            if info["status"] not in ("queued", "running", "created") or (info["status"] == "created" and not self._is_active(job_id)):
                return info
            if deadline is not None and time.time() > deadline:
                return info
            time.sleep(self.poll_seconds)

    # --- start-up: unfinished jobs ---------------------------------------------------------------
    def scan(self) -> list[str]:
        """Find jobs left unfinished by a previous ComfyUI: adopt live children, mark dead ones stopped.

        Returns the ids that can be resumed (the panel offers Resume for them)."""
        resumable = []
        for path in self.root.iterdir():
            if not (path / "job.json").is_file():
                continue
            try:
                check_name(path.name)
            except ValueError:
                continue
            status = backend_jobs.read_status(path)
            if status.get("status") == "running":
                pid = status.get("pid")
                if backend_jobs.pid_alive(pid) and self._running is None:
                    with self._lock:
                        self._running = _Running(path.name, None, int(pid))
                        self._running.offset = path.joinpath("events.jsonl").stat().st_size if (path / "events.jsonl").exists() else 0
                    self._ensure_thread()
                    continue
                backend_jobs.write_status(path, status="stopped", pid=None,
                                          message="ComfyUI stopped while this job ran; resume it from its last checkpoint")
            if backend_jobs.read_status(path).get("status") in ("stopped", "created"):
                resumable.append(path.name)
        return resumable

    # --- the monitor -----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="egrpo-jobs", daemon=True)
            self._thread.start()

    def shutdown(self, kill: bool = False) -> None:
        self._stop.set()
        if kill and self._running is not None and self._running.proc is not None:
            self._running.proc.kill()
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
        """One monitor pass: forward new events, notice an exit, start the next queued job."""
        with self._lock:
            run = self._running
            if run is None:
                self._pump()
                return
            path = self.root / run.job_id
            self._forward(run, path)
            rc = run.returncode()
            if rc is None and run.kill_at is not None and time.time() >= run.kill_at:
                self._kill(run, path)
                rc = run.returncode()
            if rc is None:
                return
            self._forward(run, path)
            self._finish(run, path, rc)
            self._running = None
            self._pump()

    def _forward(self, run: _Running, path: Path) -> None:
        events, run.offset = backend_jobs.read_events(path, run.offset)
        for e in events:
            if e["type"] == "metrics":
                self._last[run.job_id] = e
            self._emit(run.job_id, e)

    def _emit(self, job_id: str, event: dict) -> None:
        try:
            self.send(EVENT, {"job": job_id, "time": time.time(), **event})
        except Exception:  # noqa: BLE001 - a closed websocket must not stop a job
            log.exception("E-GRPO: sending an event failed")

    def _kill(self, run: _Running, path: Path) -> None:
        """Hard stop (cancel that did not finish in time): SIGKILL, then export the last checkpoint."""
        try:
            os.killpg(run.pid, signal.SIGKILL) if run.proc is not None else os.kill(run.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if run.proc is not None:
            run.proc.wait()
        lora = None
        try:
            if backend_jobs.latest_checkpoint(path) is not None:
                spec = backend_jobs.load_spec(path)
                lora = backend_jobs.export_job(path, spec.output.formats[0], spec=spec)
                if spec.output.copy_to:
                    from egrpo_backend.atomic import atomic_write_bytes

                    dest = Path(spec.output.copy_to) / lora.name
                    atomic_write_bytes(dest, lora.read_bytes())
                    lora = dest
        except Exception as e:  # noqa: BLE001
            log.warning("E-GRPO: exporting the last checkpoint of %s failed: %s", run.job_id, e)
        (path / "cancel").unlink(missing_ok=True)
        status = backend_jobs.read_status(path)
        backend_jobs.write_status(path, status="cancelled", pid=None, lora=str(lora) if lora else status.get("lora"),
                                  message="killed on cancel; the LoRA is the last checkpoint's")
        backend_jobs.EventLog(path).emit("done", status="cancelled", iteration=status.get("iteration", 0),
                                         lora=str(lora) if lora else None)

    def _finish(self, run: _Running, path: Path, rc: int) -> None:
        if run.log_file is not None:
            run.log_file.close()
        status = backend_jobs.read_status(path)
        if rc != 0 and status.get("status") != "failed":
            # Died without reporting (SIGKILL, OOM killer, an import error before run_job): say so.
            tail = _tail(path / LOG_FILE)
            msg = f"the training process exited with code {rc} without reporting an error" + (f": {tail}" if tail else "")
            backend_jobs.write_status(path, status="failed", pid=None, message=msg)
            backend_jobs.EventLog(path).emit("error", message=msg, traceback="")
            self._forward(run, path)
        elif status.get("status") == "running":  # exited 0 but never wrote its end (should not happen)
            backend_jobs.write_status(path, status="stopped", pid=None)
        self._emit(run.job_id, {"type": "exit", "returncode": rc, "status": backend_jobs.read_status(path).get("status")})

    def _pump(self) -> None:
        """Start the next queued job when none runs."""
        while self._running is None and self._queue:
            job_id, command = self._queue.popleft()
            path = self.root / job_id
            if not (path / "job.json").is_file():
                continue
            self._start(job_id, command, path)

    def _start(self, job_id: str, command: str, path: Path) -> None:
        env = {**os.environ, **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("HF_HUB_OFFLINE", "1")
        (path / "cancel").unlink(missing_ok=True)
        log_file = open(path / LOG_FILE, "ab")
        offset = (path / "events.jsonl").stat().st_size if (path / "events.jsonl").exists() else 0
        proc = subprocess.Popen([self.python, "-m", "egrpo_backend", command, str(path), "--quiet"], cwd=str(REPO_ROOT),
                                env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self._running = _Running(job_id, proc, proc.pid, log_file)
        self._running.offset = offset
        self._emit(job_id, {"type": "process", "pid": proc.pid, "command": command})


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
