"""Old graphs keep loading in a REAL ComfyUI (docs/comfyui.md, "Old graphs"): every workflow in workflows/
in its API form (tests/workflow_api.py with the server's /api/object_info) and every graph an earlier
release saved (tests/fixtures/old_graphs/) is posted to /api/prompt. ComfyUI's own validation must find
nothing wrong with the pack's nodes (the only errors allowed are core loaders naming model files this
test server lacks, e.g. flux1-dev.safetensors). The first release's CPU training graph, with the Prompt
List's old `"file": ""`, then runs to its end. Also: every node of the pack has a description and a
tooltip on every output, as the server reports them.
"""

import json
import sys
import time
from pathlib import Path

from comfy_itest import http, wait_history, wait_job

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from workflow_api import to_api  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "old_graphs"
RUNNABLE = FIXTURES / "0814b65" / "prompt_list_cpu_training.api.json"


def _post(url, prompt):
    try:
        return 200, http(f"{url}/api/prompt", {"prompt": prompt, "client_id": "egrpo-old-graphs"})
    except Exception as e:  # urllib's HTTPError carries the validation report
        body = getattr(e, "read", lambda: b"{}")()
        return getattr(e, "code", 0), json.loads(body or b"{}")


def _stop_everything(server):
    """A graph that validated is queued: take it off and end any job it started (this test only validates)."""
    server.http("/api/queue", {"clear": True})
    server.http("/api/interrupt", {})
    end = time.time() + 60
    while time.time() < end:
        for job in server.http("/api/egrpo/jobs")["jobs"]:
            if job["status"] in ("running", "queued"):
                try:
                    server.http(f"/api/egrpo/jobs/{job['id']}/cancel?force=1", {})
                except Exception:  # noqa: BLE001 - it ended meanwhile
                    pass
        queue = server.http("/api/queue")
        busy = [j for j in server.http("/api/egrpo/jobs")["jobs"] if j["status"] in ("running", "queued")]
        if not queue["queue_running"] and not queue["queue_pending"] and not busy:
            return
        time.sleep(0.5)


def test_every_workflow_and_old_graph_passes_comfyuis_validation(comfy_server):
    info = comfy_server.http("/api/object_info")
    graphs = {f"workflows/{p.name}": to_api(json.loads(p.read_text()), info) for p in sorted((REPO / "workflows").glob("*.json"))}
    graphs.update({f"{p.parent.name}/{p.name}": json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*/*.api.json"))
                   if p != RUNNABLE})
    problems = []
    for name, prompt in graphs.items():
        status, body = _post(comfy_server.url, prompt)
        errors = body.get("node_errors", {}) if status != 200 else {}
        for nid, err in errors.items():
            ct = prompt[nid]["class_type"]
            for e in err["errors"]:
                missing_model_file = not ct.startswith("EGRPO") and e["type"] == "value_not_in_list"
                if not missing_model_file:
                    problems.append(f"{name}: node {nid} {ct}: {e['type']}: {e.get('details')}")
        if status != 200 and not errors:
            problems.append(f"{name}: HTTP {status}: {body.get('error')}")
        print(f"{name}: HTTP {status}, node errors on {sorted(prompt[n]['class_type'] for n in errors)}")
        if status == 200:
            _stop_everything(comfy_server)
    assert not problems, "\n".join(problems)


def test_the_first_releases_graph_with_an_empty_prompt_file_runs(comfy_server):
    prompt = json.loads(RUNNABLE.read_text())
    assert prompt["1"]["inputs"]["file"] == ""  # the value that was refused ("'' not in ['(none)']")
    status, body = _post(comfy_server.url, prompt)
    assert status == 200, body
    hist = wait_history(comfy_server.url, body["prompt_id"], timeout=400)
    failure = [m[1].get("exception_message") for m in hist["status"]["messages"] if m[0] == "execution_error"]
    assert hist["status"]["status_str"] == "success", failure
    jobs = [j for j in comfy_server.http("/api/egrpo/jobs")["jobs"] if j["name"] == "old_form_prompt_list"]
    assert jobs, comfy_server.http("/api/egrpo/jobs")
    job = wait_job(comfy_server.url, jobs[0]["id"], timeout=60)
    print("old-form job:", {k: job.get(k) for k in ("status", "iteration", "total")})
    assert job["status"] == "finished" and job["iteration"] == 2, job


def test_every_node_has_a_description_and_output_tooltips(comfy_server):
    info = comfy_server.http("/api/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("EGRPO")}
    assert len(ours) >= 10
    missing = [k for k, v in ours.items() if not v.get("description")]
    missing += [f"{k} output {n}" for k, v in ours.items()
                for n, t in zip(v["output_name"], (v.get("output_tooltips") or []) + [None] * len(v["output_name"])) if not t]
    assert not missing, missing
