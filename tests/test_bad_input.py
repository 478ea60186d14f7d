"""Bad input gives a clear error naming the problem and the fix, and leaves nothing half-written."""

import json
import os

import pytest
import torch

from egrpo_backend.config import JobSpec, SpecError
from egrpo_backend.jobs.run import create_job, export_job
from egrpo_backend.rewards import build_reward, check_scores


def spec(**over):
    base = {"model": {"source": "default"}, "prompts": ["a digit three"]}
    base.update(over)
    return base


@pytest.mark.parametrize("data,needle", [
    (spec(algorithm={"tua": 2.2}), "unknown key 'algorithm.tua'"),  # 1 typo in a key
    (spec(trian={}), "unknown key 'trian'"),  # 2 unknown section
    (spec(algorithm={"group_size": 1}), "algorithm.group_size = 1 is out of range"),  # 3 out of range
    (spec(algorithm={"update_mode": "sum"}), "valid values: 'averaged', 'per_step'"),  # 4 bad choice
    (spec(algorithm={"preset": "ppo"}), "valid values: 'egrpo'"),  # 5 unknown preset
    (spec(algorithm={"sigmas": [1.0, 0.6, 0.8, 0.0]}), "strictly decreasing"),  # 6 bad grid
    (spec(algorithm={"active": "0-40"}), "outside 0..15"),  # 7 active steps out of range
    (spec(train={"lr": float("nan")}), "train.lr must be a finite number"),  # 8 NaN value
    (spec(train={"iterations": "ten"}), "train.iterations must be an integer"),  # 9 wrong type
    (spec(rewards=[{"name": "hps_v9"}]), "rewards[0].name = 'hps_v9' is not allowed"),  # 10 unknown reward
    (spec(rewards=[]), "rewards must be a non-empty list"),  # 11 no reward
    (spec(output={"name": "../../evil"}), "not allowed"),  # 12 path traversal in the LoRA name
    (spec(output={"formats": ["ckpt"]}), "valid values: 'kohya', 'peft', 'comfy'"),  # 13 bad export format
    ({"model": {"source": "diffusers", "path": "/x"}, "prompts": []}, "prompts is empty"),  # 14 empty prompt list
    (spec(prompts=["ok", "  "]), "empty prompt"),  # 15 empty prompt
    (spec(prompts={"file": "missing.txt"}), "prompt file not found"),  # 16 missing file
    ({"model": {"source": "diffusers"}, "prompts": ["x"]}, "model.path is required"),  # 17 missing model path
    (spec(train={"device": "tpu"}), "train.device = 'tpu'"),  # 18 bad device
    # Gaps a hostile or careless spec found (each once gave a traceback, an endless job or silent nonsense):
    (spec(algorithm={"preset": ["egrpo"]}), "algorithm.preset must be a string"),
    (spec(prompts={"file": 3}), "prompts.file must be the path"),
    (spec(algorithm={"active": 3.5}), "algorithm.active must be a string"),
    (spec(algorithm={"active": None}), "algorithm.active must be a string"),
    (spec(train={"threads": 100000}), "train.threads = 100000 is out of range"),
    (spec(train={"prompts_per_iteration": 1e9}), "train.prompts_per_iteration = 1000000000 is out of range"),
    (spec(algorithm={"granularities": [True]}), "algorithm.granularities must be"),
    (spec(train={"warmup_iterations": 1e18}), "train.warmup_iterations"),
    (spec(train={"seed": 2**70}), "train.seed"),
    (spec(lora={"init_seed": 2**70}), "lora.init_seed"),
    (spec(eval_seeds=["a"]), "eval_seeds must be a list of integers"),
    (spec(rewards=[{"name": "jpeg_compressibility", "colour": True}]), "unknown option 'rewards[0].colour'"),
    (spec(prompts=[f"p{i}" for i in range(100_001)]), "at most 100000"),
    (spec(train={"device": "cuda:x"}), "train.device = 'cuda:x'"),
])
def test_bad_specs_are_rejected_with_the_key_and_the_allowed_values(data, needle):
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(data)
    assert needle in str(e.value)


def test_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        JobSpec.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        JobSpec.from_file(bad)


def test_prompt_file_is_resolved_next_to_the_spec(tmp_path):
    (tmp_path / "prompts.txt").write_text("# comment\na cat\n\na dog\n")
    (tmp_path / "spec.json").write_text(json.dumps(spec(prompts={"file": "prompts.txt"})))
    assert JobSpec.from_file(tmp_path / "spec.json").prompt_list() == ["a cat", "a dog"]


def test_nan_reward_is_an_error_that_says_what_to_do():
    with pytest.raises(FloatingPointError, match="NaN/inf scores") as e:
        check_scores(torch.tensor([1.0, float("nan")]), 2, "hps")
    assert "learning rate" in str(e.value)
    with pytest.raises(ValueError, match="returned 1 scores for 2 images"):
        check_scores(torch.tensor([1.0]), 2, "hps")


def test_unknown_reward_and_bad_reward_options():
    with pytest.raises(ValueError, match="valid rewards: .*jpeg_compressibility"):
        build_reward("nope")
    with pytest.raises(ValueError, match="JPEG quality must be in 1..100"):
        build_reward("jpeg_compressibility", quality=0)
    with pytest.raises(ValueError, match="bad options for reward"):
        build_reward("jpeg_compressibility", colour=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere, so an unwritable folder cannot be made")
def test_unwritable_output_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(PermissionError, match="cannot write the job directory"):
        create_job(spec(), ro / "job")
    assert list(ro.iterdir()) == []


def test_output_path_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="choose a writable --out"):
        create_job(spec(), blocker / "job")
    assert blocker.read_text() == "x"


def test_existing_job_and_missing_checkpoint(tmp_path):
    job = create_job(spec(), tmp_path / "job")
    with pytest.raises(FileExistsError, match="already holds a job"):
        create_job(spec(), job)
    with pytest.raises(FileNotFoundError, match="no checkpoint yet"):
        export_job(job, "peft")
    with pytest.raises(ValueError, match="unknown LoRA format"):
        export_job(job, "ckpt")


def test_cuda_requested_without_cuda():
    from egrpo_backend.policies import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


def test_a_duplicated_key_is_refused(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"model": {"source": "default"}, "train": {"lr": 0.1, "lr": 0.2}}')
    with pytest.raises(SpecError, match="the key 'lr' appears twice"):
        JobSpec.from_file(path)


def test_bad_specs_create_nothing(tmp_path):
    for i, data in enumerate([spec(train={"threads": 100000}), spec(algorithm={"active": None})]):
        with pytest.raises(SpecError):
            create_job(data, tmp_path / f"job{i}")
        assert not (tmp_path / f"job{i}").exists()
