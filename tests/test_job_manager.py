"""Job manager lifecycle with a REAL child process (`python -m egrpo_backend run DIR`) on the embedded
default model (CPU): start, progress events, cancel -> a usable LoRA, resume to the end, a crash
inside the child surfaced with its message, one job at a time. ComfyUI is absent: the websocket
sender is a list.
"""

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from egrpo_backend.jobs import read_status  # noqa: E402
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
    s["train"] = {**s["train"], "iterations": iterations}
    s.update(over)
    return s


@pytest.fixture
def manager(tmp_path):
    events = []
    m = JobManager(tmp_path / "jobs", tmp_path / "loras" / "egrpo", send=lambda name, data: events.append((name, data)),
                   poll_seconds=0.2)
    m.sent = events
    yield m
    m.shutdown(kill=True)


def wait_for(pred, timeout=60.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def types_of(manager, job):
    return [d["type"] for name, d in manager.sent if d["job"] == job]


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
    assert Path(info["lora"]).is_file() and Path(info["lora"]).parent == tmp_path / "loras" / "egrpo"
    assert info["lora_name"] == "egrpo/lifecycle.safetensors"
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
    """A spec that fails inside the child (a diffusers model folder that does not exist): the job is
    failed with the child's message, and the manager keeps working."""
    bad = spec(1, model={"source": "diffusers", "path": str(tmp_path / "no_such_model")}, prompts=["a red cube"])
    job = manager.submit(bad, "crash")
    wait_for(lambda: manager.get(job)["status"] == "failed", timeout=60, what="failed status")
    info = manager.get(job)
    assert "no_such_model" in info["message"]
    errors = [d for _, d in manager.sent if d["job"] == job and d["type"] == "error"]
    assert errors and "no_such_model" in errors[0]["message"]
    assert info["resumable"]


def test_killed_child_without_report_is_failed(manager):
    """A child that dies by SIGKILL (as under the OOM killer) is reported failed with its exit code."""
    job = manager.submit(spec(50), "killed")
    wait_for(lambda: manager._running is not None and manager._running.job_id == job, what="child start")
    os.kill(manager._running.pid, 9)
    wait_for(lambda: manager.get(job)["status"] == "failed", what="failed status")
    assert "exited with code -9" in manager.get(job)["message"]
