"""Job manager lifecycle with REAL child processes (`python -m egrpo_backend run DIR`) on the embedded
default model (CPU): start, progress events, cancel -> a usable LoRA, resume to the end, a crash inside
the child surfaced with its message, one job at a time; and what must stay true across a restart of the
manager (a child that outlives it, the queue), cancels (forced, at start, of a job that is not running)
and reused pids. ComfyUI is absent: the websocket sender is a list. A "restart" is a second JobManager
on the same folder after the first stopped watching (its child keeps running, as when ComfyUI exits).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from egrpo_backend import job_process  # noqa: E402
from egrpo_backend.checkpoint import latest_checkpoint, read_checkpoint  # noqa: E402
from egrpo_backend.jobs import create_job, read_status, request_cancel, write_status  # noqa: E402
from nodes.job_manager import JobError, JobManager  # noqa: E402

FAST = {
    "model": {"source": "default"},
    "rewards": [{"name": "jpeg_compressibility"}],
    "algorithm": {"steps": 6, "active": "0-1", "group_size": 2, "clip_range": 0.2},
    "train": {"prompts_per_iteration": 1, "threads": 1, "evaluate": False, "checkpoint_every": 1, "sample_every": 1, "device": "cpu"},
    "lora": {"rank": 2, "alpha": 2.0},
    "output": {"name": "lifecycle", "formats": ["peft", "kohya"]},
}


def spec(iterations, **over):
    s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in FAST.items()}
    s["train"] = {**s["train"], "iterations": iterations, **over.pop("train", {})}
    s.update(over)
    return s


def make_manager(tmp_path):
    events = []
    m = JobManager(tmp_path / "jobs", tmp_path / "loras" / "egrpo", send=lambda name, data: events.append((name, data)),
                   poll_seconds=0.2)
    m.sent = events
    return m


@pytest.fixture
def manager(tmp_path):
    m = make_manager(tmp_path)
    yield m
    m.shutdown(kill=True)
    for path in (tmp_path / "jobs").iterdir():  # children adopted by a second manager: end them too
        job_process.signal_owner(path, signal.SIGKILL)


def wait_for(pred, timeout=90.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def types_of(manager, job):
    return [d["type"] for name, d in manager.sent if d["job"] == job]


def sent(manager, job, type_):
    return [d for _, d in manager.sent if d["job"] == job and d["type"] == type_]


def restart(manager, tmp_path):
    """ComfyUI restarts: the old manager stops watching (its child runs on), a new one scans the folder."""
    manager.shutdown()
    new = make_manager(tmp_path)
    new.scan()
    return new


def test_start_cancel_resume_and_queue(manager, tmp_path):
    """A long job is cancelled after its first iteration (LoRA written and copied), resumed to the end;
    a second job waits in the queue meanwhile and a duplicate submit does not start anything."""
    job = manager.submit(spec(12), "long")
    assert manager.submit(spec(12), "long") == "long"  # same id: no duplicate
    other = manager.submit(spec(1, output={"name": "other"}), "other")
    assert manager.get(other)["status"] == "queued"

    wait_for(lambda: "metrics" in types_of(manager, job), what="first metrics event")
    manager.cancel(job)
    wait_for(lambda: manager.get(job)["status"] == "cancelled", what="cancelled status")
    info = manager.get(job)
    assert 1 <= info["iteration"] < 12
    # the embedded digits model's LoRA stays in its job folder: no ComfyUI model can load it, so it is
    # kept out of the core LoraLoader's list
    assert Path(info["lora"]).is_file() and Path(info["lora"]).parent == manager.root / job / "lora"
    assert info["lora_name"] is None and not (tmp_path / "loras").exists()
    seen = types_of(manager, job)
    assert seen[:2] == ["queued", "process"] and "start" in seen and "done" in seen and seen[-1] == "exit"

    # the queued job runs next; resume the first one behind it
    manager.resume(job)
    with pytest.raises(JobError):
        manager.resume(job)  # already queued
    wait_for(lambda: manager.get(job)["status"] == "finished", timeout=90, what="resumed job to finish")
    assert manager.get(other)["status"] == "finished"
    assert manager.get(job)["iteration"] == 12
    m = manager.metrics(job)
    assert sorted({t["iteration"] for t in m["train"]}) == list(range(1, 13))
    assert manager.file(job, "reward_curve.png").is_file() and manager.file(job, "plan.png").is_file()
    manager.delete(other)
    assert all(j["id"] != other for j in manager.list())


def test_crash_in_child_is_surfaced(manager, tmp_path):
    """A spec that fails inside the child (a diffusers folder whose model_index.json names a transformer
    that is not there; a missing folder is refused before the job exists): the job is failed with the
    child's message, and the manager keeps working."""
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                          "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    bad = spec(1, model={"source": "diffusers", "path": str(broken)}, prompts=["a red cube"])
    job = manager.submit(bad, "crash")
    wait_for(lambda: manager.get(job)["status"] == "failed", timeout=60, what="failed status")
    info = manager.get(job)
    assert "broken_model" in info["message"]
    errors = [d for _, d in manager.sent if d["job"] == job and d["type"] == "error"]
    assert errors and "broken_model" in errors[0]["message"]
    assert info["resumable"]
    # a real model's LoRA is copied into ComfyUI's loras folder (the core LoraLoader lists it)
    assert json.loads((manager.root / job / "job.json").read_text())["output"]["copy_to"] == str(tmp_path / "loras" / "egrpo")


def test_killed_child_without_report_is_failed(manager):
    """A child that dies by SIGKILL (as under the OOM killer) is reported failed with its exit code."""
    job = manager.submit(spec(50), "killed")
    wait_for(lambda: manager._running is not None and manager._running.job_id == job, what="child start")
    os.kill(manager._running.proc.pid, 9)
    wait_for(lambda: manager.get(job)["status"] == "failed", what="failed status")
    assert "exited with code -9" in manager.get(job)["message"]


# --- issue: the truth across restarts, reused pids and cancels -------------------------------------------
def test_a_restarted_manager_reports_the_childs_own_end(manager, tmp_path):
    """ComfyUI restarts while a job trains: the child runs on, the new manager adopts it and, when it ends,
    reports the status the child wrote ("finished", its LoRA), not a guess from an exit code it cannot read."""
    job = manager.submit(spec(5), "survivor")
    wait_for(lambda: "metrics" in types_of(manager, job), what="first metrics event")
    new = restart(manager, tmp_path)
    assert new._running is not None and new._running.job_id == job and new._running.proc is None  # adopted
    assert new.get(job)["status"] == "running"
    wait_for(lambda: new.get(job)["status"] != "running", what="adopted job to end")
    info = new.get(job)
    assert info["status"] == "finished", info
    assert info["iteration"] == 5 and Path(info["lora"]).is_file() and info["message"] == ""
    exits = sent(new, job, "exit")
    assert exits == [{**exits[0], "returncode": None, "status": "finished"}]
    assert not sent(new, job, "error")
    assert "done" in types_of(new, job)  # the child's own events reached the new manager


def _bystander(tmp_path):
    """An unrelated live process that records any SIGTERM it receives."""
    flag = tmp_path / "bystander_signalled"
    code = ("import signal, sys, time\n"
            f"signal.signal(signal.SIGTERM, lambda *a: (open({str(flag)!r}, 'w').write('TERM'), sys.exit(0)))\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)  # its handler is installed
    return proc, flag


def test_a_live_unrelated_process_with_the_saved_pid_is_never_signalled(manager, tmp_path):
    """After a host or container restart the pid in status.json (and in the lock file) belongs to another
    program: the job shows as not running, and neither the manager nor `cancel` signals that program."""
    proc, flag = _bystander(tmp_path)
    try:
        job = create_job(spec(3), manager.root / "reused")
        write_status(job, status="running", pid=proc.pid, iteration=1)
        (job / job_process.LOCK_FILE).write_text(json.dumps({"pid": proc.pid, "start_ticks": 1, "boot_id": "x"}))
        assert manager.get("reused")["status"] == "failed"  # shown honestly even before the scan
        assert manager.scan() == ["reused"]  # resumable, not adopted
        assert manager._running is None
        info = manager.get("reused")
        assert info["status"] == "failed" and info["resumable"] and info["message"].startswith("process ended")
        assert read_status(job)["status"] == "failed"
        for force in (False, True):
            with pytest.raises(JobError, match="not running"):
                manager.cancel("reused", force=force)
        with pytest.raises(RuntimeError, match="not running"):
            request_cancel(job)
        cli = subprocess.run([sys.executable, "-m", "egrpo_backend", "cancel", str(job)], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert cli.returncode == 2 and "not running" in cli.stderr
        assert not (job / "cancel").exists()  # no request left behind for the next run
        assert job_process.job_owner(job) is None and not job_process.signal_owner(job, signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None and not flag.exists(), "the unrelated process was signalled"
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_holder_counts_only_while_its_start_time_matches(tmp_path):
    """job_owner needs the lock held AND the recorded start time: a pid written by anyone else is not proof."""
    job = create_job(spec(3), tmp_path / "job")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from egrpo_backend import job_process; "
                               "job_process.claim(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(job)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc, flag = _bystander(tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert job_process.job_running(job) and job_process.job_owner(job) == holder.pid
        with pytest.raises(job_process.JobBusy, match=f"pid {holder.pid}"):
            job_process.claim(job, wait=0.2)  # a second runner is refused, naming the first
        forged = {**job_process.identity(proc.pid), "start_ticks": job_process.identity(proc.pid)["start_ticks"] + 1}
        (job / job_process.LOCK_FILE).write_text(json.dumps(forged))  # same pid, another start time
        assert job_process.job_running(job) and job_process.job_owner(job) is None
        assert not job_process.signal_owner(job) and proc.poll() is None and not flag.exists()
    finally:
        for p in (holder, proc):
            p.kill()
            p.wait()
    assert not job_process.job_running(job)  # the kernel dropped the lock with the process


def test_force_cancel_reads_cancelled_at_the_checkpoint_its_lora_comes_from(manager):
    """Force cancel kills the child: the job reads "cancelled" (never "failed (exited with code -9)") at the
    iteration of the last checkpoint, whose LoRA is exported."""
    job = manager.submit(spec(50, train={"checkpoint_every": 3}), "forced")
    wait_for(lambda: any(d.get("iteration", 0) >= 4 for d in sent(manager, job, "metrics")), what="iteration 4")
    manager.cancel(job, force=True)
    wait_for(lambda: manager.get(job)["status"] != "running", what="end of the killed job")
    info = manager.get(job)
    assert info["status"] == "cancelled", info
    ckpt = read_checkpoint(latest_checkpoint(manager.root / job))["trainer"]["iteration"]
    assert ckpt % 3 == 0 and ckpt >= 3 and info["iteration"] == ckpt
    assert Path(info["lora"]).is_file() and f"iteration {ckpt}" in info["message"]
    done = sent(manager, job, "done")
    assert done and done[-1]["status"] == "cancelled" and done[-1]["iteration"] == ckpt
    assert sent(manager, job, "exit")[-1]["status"] == "cancelled" and not sent(manager, job, "error")
    assert not (manager.root / job / "cancel").exists()


def test_cancel_right_after_start_reads_cancelled(manager):
    """A cancel before the child has even started Python: no SIGTERM can kill it early (it is signalled only
    once it holds its lock, after catching SIGTERM); it stops at once (no LoRA: nothing learned) or after its first iteration (a LoRA)."""
    job = manager.submit(spec(50), "early")
    manager.cancel(job)
    wait_for(lambda: manager.get(job)["status"] != "running", what="end of the cancelled job")
    info = manager.get(job)
    assert info["status"] == "cancelled", info
    assert info["iteration"] in (0, 1)  # 0 when the signal beats the first step: nothing learned, so no LoRA
    assert Path(info["lora"]).is_file() if info["iteration"] else info["lora"] is None, info
    assert sent(manager, job, "exit")[-1]["returncode"] == 0


def test_cancel_of_a_job_that_is_not_running_leaves_nothing_behind(manager):
    """Nothing to cancel: refused, and no `cancel` file that would stop the next run after one iteration."""
    job = create_job(spec(3), manager.root / "idle")
    with pytest.raises(JobError, match="not running"):
        manager.cancel("idle")
    with pytest.raises(RuntimeError, match="not running"):
        request_cancel(job)
    assert not (job / "cancel").exists()


def test_queued_jobs_survive_a_manager_restart_in_order(manager, tmp_path):
    """The queue is saved: after a restart the waiting jobs are queued again, in order, say why they wait,
    and run once the adopted job ends (here by a force cancel of the adopted child)."""
    long = manager.submit(spec(40), "long")
    first = manager.submit(spec(1, output={"name": "first"}), "first")
    second = manager.submit(spec(1, output={"name": "second"}), "second")
    wait_for(lambda: "metrics" in types_of(manager, long), what="first metrics event")
    new = restart(manager, tmp_path)
    assert [new.get(j)["status"] for j in (long, first, second)] == ["running", "queued", "queued"]
    msg = new.get(second)["message"]
    assert "number 2 in the queue" in msg and "long" in msg and "one job trains at a time" in msg
    assert json.loads((new.root / "queue.json").read_text())["queue"] == [
        {"job": "first", "command": "run"}, {"job": "second", "command": "run"}]
    new.cancel(long, force=True)  # the adopted child: killed only because its lock and start time prove it
    wait_for(lambda: new.get(second)["status"] == "finished", timeout=120, what="queued jobs to run")
    assert new.get(long)["status"] == "cancelled" and "killed on cancel" in new.get(long)["message"]
    assert new.get(first)["status"] == "finished"
    starts = [d["job"] for _, d in new.sent if d["type"] == "process"]
    assert starts == ["first", "second"]
    assert json.loads((new.root / "queue.json").read_text())["queue"] == []
