"""Issue 12, defect 1: a graph cannot make the server read or write files outside ComfyUI's folders.

The Train node's spec_overrides may name prompt files only inside ComfyUI's input folder and may not
set output.copy_to; the files route serves an allow-list (never job.json, which holds the prompts)."""

import json
import sys
from pathlib import Path

import pytest

import comfy_fakes

comfy_fakes.install()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from egrpo_backend.jobs.run import create_job  # noqa: E402
from nodes import train_nodes  # noqa: E402
from nodes.job_manager import JobManager  # noqa: E402

KW = dict(source="default", name="t", reward=[{"name": "digit_probability", "weight": 1.0}], prompts=None,
          preset="egrpo", iterations=2, group_size=2, prompts_per_iteration=1, steps=6, shift=3.0, eta=0.7,
          tau=2.2, active="0-1", lr=1e-3, clip_range=0.2, lora_rank=4, seed=0)
SPEC = comfy_fakes.TINY_JOB


def get(manager, path):
    return comfy_fakes.route_get(manager, path)


@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.txt", "sub/../../secret.txt"])
def test_prompt_files_outside_the_input_folder_are_refused(tmp_path, name):
    (tmp_path / "input").mkdir()
    (tmp_path / "secret.txt").write_text("a photo of 1\n")
    over = json.dumps({"eval_prompts": {"file": name}})
    with pytest.raises(ValueError, match=r"eval_prompts\.file .*input folder"):
        train_nodes.build_spec(**KW, overrides=over, input_dir=tmp_path / "input")


def test_a_prompt_file_inside_the_input_folder_is_used(tmp_path):
    (tmp_path / "prompts.txt").write_text("a photo of 1\n")
    spec = train_nodes.build_spec(**KW, overrides='{"eval_prompts": {"file": "prompts.txt"}}', input_dir=tmp_path)
    assert spec["eval_prompts"] == {"file": str((tmp_path / "prompts.txt").resolve())}


def test_copy_to_cannot_be_set_from_a_graph(tmp_path):
    with pytest.raises(ValueError, match="output.copy_to.*may not set"):
        train_nodes.build_spec(**KW, overrides=json.dumps({"output": {"copy_to": str(tmp_path)}}), input_dir=tmp_path)


def test_submit_copies_loras_only_into_the_loras_folder(tmp_path):
    manager = JobManager(tmp_path / "jobs", loras_dir=tmp_path / "loras" / "egrpo")
    spec = {**SPEC, "output": {"copy_to": str(tmp_path / "elsewhere")}}
    with pytest.raises(ValueError, match="copy_to .* refused"):
        manager.submit(spec, "job-1")
    assert not (manager.root / "job-1").exists()


def test_routes_serve_no_job_json_nor_prompt_copies(tmp_path):
    """The leaking spec of the issue: eval prompts from a private file, then GET files/job.json."""
    secret = tmp_path / "private.txt"
    secret.write_text("a photo of 7 SECRET-LINE\n")
    manager = JobManager(tmp_path / "jobs")
    job = create_job({**SPEC, "eval_prompts": {"file": str(secret)}}, manager.root / "job-1")
    (job / "plan.png").write_bytes(b"\x89PNG")
    assert get(manager, "/egrpo/jobs/job-1/files/plan.png") == (200, b"\x89PNG")
    for rel in ["job.json", "status.json", "events.jsonl"] + [p.name for p in job.glob("prompts*")]:
        status, body = get(manager, f"/egrpo/jobs/job-1/files/{rel}")
        assert status == 404 and b"SECRET-LINE" not in body, (rel, status)
    for route in ("/egrpo/jobs", "/egrpo/jobs/job-1", "/egrpo/jobs/job-1/metrics"):
        assert b"SECRET-LINE" not in get(manager, route)[1], route
