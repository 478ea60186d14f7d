"""`python -m egrpo_backend`: the plan's JSON contract, --help for every subcommand, clean errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from egrpo_backend.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["plan", "train", "run", "resume", "cancel", "export", "status", "rewards"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "egrpo_backend", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_plan_json_is_the_documented_contract():
    out = cli("plan", "--steps", "16", "--shift", "3.0", "--eta", "0.7", "--tau", "2.2", "--active", "0-7", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [s["merge"] for s in data["steps"][:8]] == [1, 1, 2, 2, 2, 3, 3, 3]
    assert [round(s["entropy"], 3) for s in data["steps"][:5]] == [2.893, 2.989, 2.137, 1.763, 1.542]
    assert {s["kind"] for s in data["steps"][:8]} == {"sde"} and {s["kind"] for s in data["steps"][8:]} == {"ode"}
    assert set(data["steps"][0]) == {"index", "sigma", "sigma_next", "std", "entropy", "merge", "kind"}


def test_plan_table_and_png(tmp_path, capsys):
    assert main(["plan", "--tau", "2.6", "--png", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "tau=2.6" in out and (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_bad_plan_arguments_give_a_clean_error(capsys):
    assert main(["plan", "--active", "0-99"]) == 2
    assert "outside 0..15" in capsys.readouterr().err
    assert main(["plan", "--sigmas", "1,0.5,0.7,0"]) == 2
    assert "strictly decreasing" in capsys.readouterr().err


def test_train_rejects_a_bad_spec_without_creating_the_job(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"algorithm": {"tua": 2.2}}))
    assert main(["train", str(spec), "--out", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'algorithm.tua'" in err and "tau" in err
    assert not (tmp_path / "job").exists()


def test_rewards_lists_the_registry(capsys):
    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    assert "jpeg_compressibility" in out and "digit_probability" in out


def test_backend_imports_without_comfyui():
    """egrpo_backend never imports ComfyUI at import time (only the comfy policy does, in a job's child)."""
    code = ("import sys, egrpo_backend.jobs.run, egrpo_backend.method.trainer, egrpo_backend.policies, egrpo_backend.rewards, "
            "egrpo_backend.lora, egrpo_backend.__main__; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'server', 'nodes')]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("reading, merges, entropy0", [
    ("ours", [1, 1, 2, 2, 2, 3, 3, 3], 2.893),  # sqrt(2 pi e) * 0.7 * sqrt(1.0)
    ("variance", [1, 1, 1, 1, 1, 2, 2, 2], 8.369),  # 2 pi e * 0.49 * 1.0
    # sigma_1 = 2.8125 / 2.875 = 45/46; step 0 (sigma = 1 convention): 1/(1 - 45/46) * (1 - 45/46) = 1
    ("eq11", [3, 2, 4, 5, 6, 7, 8, 8], 1.0),
])
def test_plan_readings_of_the_entropy_score(reading, merges, entropy0, capsys):
    assert main(["plan", "--tau", "2.2", "--reading", reading, "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert [s["merge"] for s in steps[:8]] == merges and round(steps[0]["entropy"], 3) == entropy0
