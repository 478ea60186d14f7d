"""Issue 12, defect 2: prompts are stored once in the job folder (prompts-<sha256>.json) and job.json
refers to them, so the largest allowed prompt list bloats neither job.json nor any checkpoint or LoRA
header (the header carries a count and the same hash)."""

import json

import pytest

from safetensors import safe_open

from egrpo_backend.jobs.checkpoint import latest_checkpoint
from egrpo_backend.config import MAX_PROMPTS
from egrpo_backend.jobs.run import create_job, export_job, load_spec, run_job
from egrpo_backend.provenance import HEADER_LIMIT_BYTES, prompt_digest
from test_jobs import tiny_spec

PROMPTS = [f"a handwritten digit {'three' if i % 2 else 'seven'} no {i:06d}" for i in range(MAX_PROMPTS)]


def header_bytes(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return len(json.dumps(f.metadata()))


def test_a_huge_prompt_list_is_stored_once_in_the_job_folder(tmp_path):
    spec = tiny_spec(iterations=1)
    spec["prompts"] = PROMPTS
    job = create_job(spec, tmp_path / "job")
    saved = json.loads((job / "job.json").read_text())
    assert saved["prompts"] == {"file": f"prompts-{prompt_digest(PROMPTS)['sha256']}.json"}
    assert (job / "job.json").stat().st_size < 8 * 1024
    assert json.loads((job / saved["prompts"]["file"]).read_text()) == PROMPTS
    assert load_spec(job).prompt_list() == PROMPTS


def test_checkpoint_and_lora_headers_stay_small_with_a_huge_prompt_list(tmp_path):
    """A trained job whose spec then holds the largest allowed list (training on it is too slow for CI):
    its checkpoint header and every export (the same lora_metadata path) carry a count and a hash."""
    job = create_job(tiny_spec(iterations=1), tmp_path / "job")
    run_job(job, progress=False)
    name = f"prompts-{prompt_digest(PROMPTS)['sha256']}.json"
    (job / name).write_text(json.dumps(PROMPTS))
    data = json.loads((job / "job.json").read_text())
    (job / "job.json").write_text(json.dumps({**data, "prompts": {"file": name}}))
    files = [export_job(job, fmt) for fmt in ("peft", "kohya", "comfy")] + [latest_checkpoint(job) / "lora.safetensors"]
    for path in files:
        assert header_bytes(path) < HEADER_LIMIT_BYTES, path
    for path in files[:3]:
        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["egrpo.spec"])["prompts"] == prompt_digest(PROMPTS)


def test_a_prompt_file_is_recorded_by_hash_not_copied_and_a_changed_file_is_refused(tmp_path):
    (tmp_path / "prompts.txt").write_text("a handwritten digit three\n# a comment\na handwritten digit seven\n")
    spec = {**tiny_spec(iterations=1), "prompts": {"file": "prompts.txt"}, "eval_prompts": {"file": "prompts.txt"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    from egrpo_backend.config import JobSpec, SpecError

    job = create_job(JobSpec.from_file(tmp_path / "spec.json"), tmp_path / "job")
    assert not list(job.glob("prompts-*.json"))  # a file set stays where it is (streamed, docs/prompts.md)
    saved = json.loads((job / "job.json").read_text())["prompts"]
    assert saved["file"] == str((tmp_path / "prompts.txt").resolve()) and saved["count"] == 2
    moved = job.rename(tmp_path / "moved")
    assert load_spec(moved).prompt_list(eval=True) == ["a handwritten digit three", "a handwritten digit seven"]
    (tmp_path / "prompts.txt").write_text("a handwritten digit four\n")
    with pytest.raises(SpecError, match="prompts.txt changed since the job was created"):
        load_spec(moved)
