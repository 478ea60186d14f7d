"""A job folder's own files: spec, status, event log, cancel request (see jobs/run.py for the layout;
process.lock, held by the process that runs the job, is jobs/process.py's).

These are what other processes read while a job runs (the CLI's `status`, ComfyUI's job manager,
the routes), so everything here is small, synchronous and safe to call from any process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

from . import process as job_process
from ..atomic import atomic_write_bytes, atomic_write_json
from ..config import JobSpec, SpecError
from .files import DiskFull, append_line, is_disk_full, open_job_file, refuse_link
from ..provenance import prompt_digest

STATUSES = ("created", "running", "stopped", "finished", "cancelled", "failed")


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def _status_problem(status) -> str | None:
    """What is wrong with a status.json's content, or None when it is usable."""
    if not isinstance(status, dict):
        return f"status.json holds a {type(status).__name__}, not an object"
    if status.get("status") not in STATUSES:
        return f"status.json has status {status.get('status')!r}, not one of {', '.join(STATUSES)}"
    for key in ("iteration", "total"):
        value = status.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"status.json has {key} {value!r}, not a whole number"
    return None


def read_status(job_dir) -> dict:
    """status.json as saved; a damaged one reads as {"status": "damaged", "message": why} (never raises
    for its content, so one damaged folder cannot break a job list)."""
    try:
        status = read_json(Path(job_dir) / "status.json", {"status": "created"})
    except (ValueError, OSError) as e:
        return {"status": "damaged", "message": f"status.json cannot be read ({e}); delete the job or fix the file"}
    problem = _status_problem(status)
    if problem:
        return {"status": "damaged", "message": f"{problem}; delete the job or fix the file"}
    return status


def current_status(job_dir) -> dict:
    """read_status, corrected by the job's lock (jobs/process.py): a job saved as running that no process
    runs any more (killed, crashed, a full disk that stopped even its last status write) failed."""
    status = read_status(job_dir)
    if status.get("status") == "running" and not job_process.job_running(job_dir):
        status = {**status, "status": "failed", "pid": None, "message": PROCESS_ENDED}
    return status


def settle_status(job_dir) -> dict:
    """current_status, and made true on disk: a status.json saying "running" that no process runs is
    rewritten as failed (`status`, `cancel` and `resume` call this, so the file agrees with what they say).

    A shared lock on process.lock is held while it is rewritten, so a run that starts meanwhile waits in
    job_process.claim and its "running" is never overwritten. A disk too full for it changes nothing."""
    status = current_status(job_dir)
    if status.get("status") != "failed" or status.get("message") != PROCESS_ENDED:
        return status
    with _runs_held_off(job_dir) as free:
        if free and read_status(job_dir).get("status") == "running":
            try:
                return write_status(job_dir, status="failed", pid=None, message=PROCESS_ENDED)
            except (OSError, ValueError):  # a full disk or a link: the answer stands, the file stays
                pass
    return current_status(job_dir)


@contextlib.contextmanager
def _runs_held_off(job_dir):
    """Yields True while a shared lock on the job's process.lock is held (no run can start), False when a
    run holds it now."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    try:
        fd = open_job_file(Path(job_dir) / job_process.LOCK_FILE, os.O_RDONLY)
    except OSError:
        yield True  # no lock file: no run ever took the lock
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


PROCESS_ENDED = ("process ended: the job's process is gone without writing an end (killed, crashed, a full disk, "
                 "or ComfyUI or the machine stopped); resume it from its last checkpoint")


def write_status(job_dir, **fields) -> dict:
    saved = read_status(job_dir)
    status = {**({} if saved.get("status") == "damaged" else saved), **fields, "updated": time.time()}
    path = refuse_link(Path(job_dir) / "status.json")
    try:
        atomic_write_json(path, status)  # replaced, never written through a link
    except DiskFull:
        if not _overwrite_in_place(path, status):
            raise
    return status


def _overwrite_in_place(path: Path, status: dict) -> bool:
    """The last resort of a full disk, where even a small temp file cannot be made: write the status over
    the old one inside the space it already holds (a block, never less than 4 KiB on disk), padded with
    spaces (valid JSON). Not atomic, so only when the atomic write failed; False when it does not fit."""
    data = (json.dumps(status, indent=2, sort_keys=True) + "\n").encode("utf-8")
    try:
        fd = open_job_file(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if len(data) > max(st.st_size, st.st_blocks * 512):
            return False
        os.pwrite(fd, data.ljust(st.st_size, b" "), 0)
        os.fsync(fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def read_events(job_dir, offset: int = 0) -> tuple[list[dict], int]:
    """Events from byte `offset` on, and the offset after the last complete line (for tailing)."""
    path = Path(job_dir) / "events.jsonl"
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line cut by a crash is left for later (or forever)
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events, offset + end


class EventLog:
    """events.jsonl: each event one whole line or nothing (job_files.append_line); the first append
    cuts a half line a crash left, so the next event is not glued onto it and lost."""

    def __init__(self, job_dir):
        self.path = Path(job_dir) / "events.jsonl"
        self._repaired = False

    def emit(self, type: str, **data) -> dict:
        event = {"type": type, "time": time.time(), **data}
        append_line(self.path, (json.dumps(event, default=float) + "\n").encode("utf-8"), repair=not self._repaired)
        self._repaired = True
        return event


PROMPTS_FILE = re.compile(r"prompts-[0-9a-f]{64}\.json\Z")  # a prompt list stored once in the job folder


def load_spec(job_dir) -> JobSpec:
    path = Path(job_dir) / "job.json"
    if not path.is_file():
        raise FileNotFoundError(f"{job_dir} is not a job directory (no job.json); create one with `train spec.json --out DIR`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpecError(f"spec file {path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("base_dir"), str):
        del data["base_dir"]  # written by older versions (no longer a spec key); the job folder takes its place
    for key in ("prompts", "eval_prompts"):  # the job's own prompt files live beside job.json, wherever it moved
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, dict) and PROMPTS_FILE.match(str(value.get("file", ""))):
            data[key] = {**value, "file": str(Path(job_dir).resolve() / value["file"])}
    return JobSpec.from_dict(data, base_dir=str(path.resolve().parent))


def _store_prompts(job_dir: Path, prompts: list[str]):
    """The prompt list as prompts-<sha256>.json in the job folder (the hash the LoRA header names,
    provenance.prompt_digest); job.json refers to it, so a huge list is stored once and bloats nothing."""
    if not prompts:
        return []
    name = f"prompts-{prompt_digest(prompts)['sha256']}.json"
    if not (job_dir / name).is_file():
        atomic_write_bytes(refuse_link(job_dir / name), json.dumps(prompts).encode("utf-8"))
    return {"file": name}


def _job_prompts(job_dir: Path, spec: JobSpec, value, prompts):
    """An inline list is stored once in the job folder and referred to by hash; a prompt file or folder
    (docs/prompts.md) stays where it is, recorded by absolute path, sha256 and count (checked at every start)."""
    from ..prompt_sets import PromptSet, recorded

    if isinstance(prompts, PromptSet):
        return recorded(value, prompts, spec.base_dir)
    return _store_prompts(job_dir, list(prompts))


def create_job(spec: JobSpec | dict, job_dir) -> Path:
    """Validate the spec and write job.json into a new (or empty) directory."""
    job_dir = Path(job_dir)
    if isinstance(spec, dict):
        spec = JobSpec.from_dict(spec)
    if (job_dir / "job.json").exists():
        raise FileExistsError(f"{job_dir} already holds a job; use `resume {job_dir}` or choose another --out")
    from .preflight import preflight

    preflight(spec)  # device, model files, copy_to, prompt rules (streamed), reward files: before the folder exists
    made = not job_dir.exists()
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        probe = job_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(job_dir, 4096, "the job folder") from None
        raise PermissionError(f"cannot write the job directory {job_dir}: {e.strerror}; choose a writable --out") from None
    data = {}
    try:
        data = spec.to_dict()
        data["prompts"] = _job_prompts(job_dir, spec, spec.prompts, spec.prompt_set())
        data["eval_prompts"] = _job_prompts(job_dir, spec, spec.eval_prompts, spec.prompt_set(eval=True) if spec.eval_prompts else [])
        atomic_write_json(job_dir / "job.json", data)
        write_status(job_dir, status="created", iteration=0, total=spec.train.iterations, pid=None, message="", lora=None)
    except BaseException:  # a full disk half way: no job folder that cannot run
        stored = [d["file"] for d in (data.get("prompts"), data.get("eval_prompts"))  # never a user's prompt file
                  if isinstance(d, dict) and PROMPTS_FILE.match(str(d.get("file", "")))]
        for name in ("job.json", "status.json", *stored):
            (job_dir / name).unlink(missing_ok=True)
        if made:
            shutil.rmtree(job_dir, ignore_errors=True)
        raise
    return job_dir


def request_cancel(job_dir) -> bool:
    """Ask the job's running process to stop at its next safe point between phases (it writes a usable LoRA).

    Refused when no process runs the job (jobs/process.py): a request left behind would stop the next
    run after one iteration. SIGTERM goes only to a process provably the job's (Linux); the `cancel`
    file reaches it everywhere. Returns whether a signal was sent."""
    job_dir = Path(job_dir)
    if not (job_dir / "job.json").exists():
        raise FileNotFoundError(f"{job_dir} is not a job directory (no job.json)")
    if not job_process.job_running(job_dir):
        raise RuntimeError(f"job {job_dir} is not running (no process holds {job_process.LOCK_FILE}): there is "
                           f"nothing to cancel; its status is {settle_status(job_dir).get('status')!r}")
    try:
        fd = open_job_file(job_dir / job_process.CANCEL_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # never via a link
        try:
            os.write(fd, str(time.time()).encode())
        finally:
            os.close(fd)
    except OSError as e:
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise DiskFull(job_dir, 4096, job_process.CANCEL_FILE) from e
        raise
    return job_process.signal_owner(job_dir, signal.SIGTERM)


def pid_alive(pid) -> bool:
    """Whether some process has this pid. It says nothing about WHOSE process it is (pids are reused):
    use job_process.job_running / job_owner for jobs."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, PermissionError, ValueError):
        return False
