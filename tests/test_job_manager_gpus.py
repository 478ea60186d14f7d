"""The job manager runs a `gpus` > 1 job as `run JOB --nproc-per-node N` (torchrun, 2 gloo ranks on CPU here):
the panel's summary reports its world size, a cancel stops every rank after the same iteration with a usable
LoRA, and a forced stop kills torchrun and every rank (each rank is in a session of its own, so killing the
child's process group alone would leave them training)."""

import os
import time
from pathlib import Path

from safetensors.torch import load_file

from egrpo_backend.jobs.checkpoint import latest_checkpoint, read_checkpoint
from nodes.job_manager import RUN_ENV, job_processes
from test_job_manager import manager, sent, spec, wait_for  # noqa: F401 (manager is a fixture)


def two_rank_spec(iterations, **train):
    return spec(iterations, train={"prompts_per_iteration": 2, "checkpoint_every": 1, **train})


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def rank_pids(job_dir) -> dict[int, int]:
    """{rank: pid} of the live processes whose environment names this job run's ranks (as test_distributed)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"{RUN_ENV}={Path(job_dir).resolve()}".encode() not in env or b"EGRPO_LOCK_HELD=1" not in env:
            continue
        rank = next((e[5:] for e in env if e.startswith(b"RANK=")), None)
        if rank is not None and _alive(int(entry)):
            out[int(rank)] = int(entry)
    return out


def no_job_process_left(job_dir) -> bool:
    return not rank_pids(job_dir) and not [p for p in job_processes(job_dir) if _alive(p)]


def assert_lora_of_last_checkpoint(manager, job):
    info = manager.get(job)
    ckpt = read_checkpoint(latest_checkpoint(manager.root / job))["trainer"]["iteration"]
    assert info["status"] == "cancelled" and info["iteration"] == ckpt >= 1, info
    tensors = load_file(info["lora"])
    assert tensors and any("lora" in k for k in tensors)
    return info


def test_two_rank_job_reports_world_size_and_cancels_on_every_rank(manager):
    job = manager.submit(two_rank_spec(50), "ranks", gpus=2)
    assert manager.get(job)["world_size"] == 2 and manager.get(job)["gpus"] == 2
    wait_for(lambda: sent(manager, job, "metrics"), timeout=180, what="first metrics event")
    assert sorted(rank_pids(manager.root / job)) == [0, 1]
    assert manager.get(job)["world_size"] == 2  # rank 0's status.json
    assert "--nproc-per-node" in Path(f"/proc/{manager._running.proc.pid}/cmdline").read_text()
    manager.cancel(job)
    wait_for(lambda: manager.get(job)["status"] != "running", timeout=120, what="end of the cancelled job")
    info = assert_lora_of_last_checkpoint(manager, job)
    assert info["iteration"] < 50 and "killed" not in (info["message"] or "")  # stopped by itself, not killed
    assert sent(manager, job, "exit")[-1]["returncode"] == 0
    wait_for(lambda: no_job_process_left(manager.root / job), timeout=10, what="no rank left")


def test_forced_stop_of_a_two_rank_job_leaves_no_orphan_rank(manager):
    job = manager.submit(two_rank_spec(50), "ranks-kill", gpus=2)
    wait_for(lambda: any(d.get("iteration", 0) >= 2 for d in sent(manager, job, "metrics")), timeout=180,
             what="iteration 2")
    ranks = rank_pids(manager.root / job)
    assert sorted(ranks) == [0, 1]
    started = time.time()
    manager.cancel(job, force=True)
    wait_for(lambda: manager.get(job)["status"] != "running", timeout=30, what="end of the killed job")
    assert no_job_process_left(manager.root / job)  # at once: the kill waits for every rank to be gone
    assert not any(_alive(pid) for pid in ranks.values())
    assert time.time() - started < 30
    info = assert_lora_of_last_checkpoint(manager, job)
    assert "killed on cancel" in info["message"]
