"""ComfyUI restarts while a job trains and another waits (real ComfyUI; skipped without COMFYUI_PATH).

The first server queues two CPU training jobs through POST /prompt and is stopped while the first trains.
The job's child process runs on (its own session). A second server on the same folders adopts it (the
child holds its job's process.lock), reports the status the child itself writes ("finished", not
"failed (exited with code -1)"), and starts the job that was waiting, which it restored from the saved
queue and showed as queued with the reason.
"""

import sys
import time
import uuid

from comfy_itest import REPO, start_server, stop_server, training_prompt, wait_history, wait_job

sys.path.insert(0, str(REPO))

from egrpo_backend.jobs import process as job_process  # noqa: E402


def _queue(server, name, iterations):
    res = server.http("/api/prompt", {"prompt": training_prompt(name, iterations=iterations), "client_id": "itest"})
    entry = wait_history(server.url, res["prompt_id"], timeout=60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry["outputs"]["3"]["text"][0]


def test_a_restart_keeps_the_running_job_truthful_and_the_queue(tmp_path):
    server = start_server(tmp_path)
    try:
        tag = uuid.uuid4().hex[:6]
        first = _queue(server, f"restart_a_{tag}", iterations=150)
        second = _queue(server, f"restart_b_{tag}", iterations=1)
        wait_job(server.url, first, until=lambda j: j["status"] == "running" and j["iteration"] >= 1, timeout=300)
        assert server.http(f"/api/egrpo/jobs/{second}")["status"] == "queued"
    finally:
        stop_server(server)
    folder = tmp_path / "jobs" / first
    assert job_process.job_running(folder), "the training child did not outlive the server"

    server = start_server(tmp_path)
    try:
        a, b = (server.http(f"/api/egrpo/jobs/{j}") for j in (first, second))
        print("after the restart:", {k: a[k] for k in ("status", "iteration")}, {k: b[k] for k in ("status", "message")})
        assert a["status"] == "running"
        assert b["status"] == "queued" and first in b["message"] and "one job trains at a time" in b["message"]
        a = wait_job(server.url, first, timeout=400)
        assert a["status"] == "finished" and a["iteration"] == 150 and a["message"] == "", a
        b = wait_job(server.url, second, timeout=300)
        assert b["status"] == "finished", b
        assert "exited with code" not in server.log_text()
        time.sleep(0.5)
    finally:
        stop_server(server)
