"""bench/compare.py and bench/ablation.py end to end on a budget of one iteration per run, the cost
accounting (forward 1, forward + backward 3) and the independent SVC digit judge."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

ROW_KEYS = {"reward_mean", "reward_ci", "per_seed", "judge_accuracy", "diversity", "diversity_pct_base", "nearest_real",
            "cost", "seconds", "iterations"}


def test_svc_judge_reads_real_digits_and_not_noise():
    import common

    assert common.judge_test_accuracy() > 0.9  # real held-out digits it never saw
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert common.judge_accuracy(noise, [i % 10 for i in range(200)]) < 0.3  # about chance (0.1)


def test_cost_counts_backpropagated_forwards_three_times():
    import common

    assert common.weighted_cost(100, 0) == 100 and common.weighted_cost(100, 10) == 120  # 90 no-grad + 10 x 3
    assert common.marks_crossed([("nfe@0.5", 50), ("wall@1", 2.0)], 60, 1.0) == ["nfe@0.5"]
    assert common.marks_crossed([("nfe@0.5", 50), ("wall@1", 2.0)], 10, 2.0) == ["wall@1"]


def test_compare_reports_every_method_at_equal_cost_and_equal_wall_time(tmp_path):
    import compare

    data = compare.main(["--budget-nfe", "300", "--budget-seconds", "0.01", "--seeds", "1", "--workers", "2",
                         "--methods", "egrpo_fast,mixgrpo"], out=tmp_path)
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(json.dumps(data))
    assert {"settings", "judge", "base", "real", "equal_nfe", "equal_wall", "frontier", "curves", "runs"} <= set(data)
    for table in ("equal_nfe", "equal_wall"):
        assert set(data[table]) == {"egrpo_fast", "mixgrpo"}
        for row in data[table].values():
            assert ROW_KEYS <= set(row) and len(row["per_seed"]) == 1 and row["reward_ci"][0] <= row["reward_ci"][1]
    for run in data["runs"]:
        assert run["cost"] >= 300 and run["seconds"] >= 0.01
        # kl_beta 0: every update forward is backpropagated, so cost = rollout NFE + 3 x update forwards
        assert run["grad_rows"] == run["nfe_update"] > 0
        assert run["cost"] == run["nfe_rollout"] + 3 * run["nfe_update"]
    assert data["judge"]["test_accuracy"] > 0.9 and data["real"]["judge_accuracy"] > 0.9
    assert [p[0] for p in data["frontier"]["mixgrpo"]] == list(compare.FRACTIONS)
    md = (tmp_path / "compare.md").read_text()
    assert "## At equal cost" in md and "## At equal wall time" in md and "| mixgrpo |" in md and "judge acc." in md
    assert (tmp_path / "compare.png").stat().st_size > 0 and (tmp_path / "compare_frontier.png").stat().st_size > 0
    (tmp_path / "compare.md").unlink()
    assert compare.main(["--report-only"], out=tmp_path) == json.loads(json.dumps(data))
    assert (tmp_path / "compare.md").read_text() == md  # redrawn from compare.json alone


def test_nft_cost_counts_its_no_grad_forwards_once_and_its_trained_ones_three_times():
    """DiffusionNFT's update runs v_old and v_ref without gradients (1 each) and v with them (3):
    per trained pair 5, so its cost is rollout NFE + 5/3 of its update forwards, not 3 x."""
    import common

    run = common.run_one({"name": "nft", "preset": "nft", "seed": 0, "budget_nfe": 1, "budget_wall": 0.0,
                          "nfe_fractions": (1.0,), "wall_fractions": ()})
    assert run["iterations"] == 1 and run["nfe_update"] == 3 * run["grad_rows"] > 0  # v_old, v, v_ref per pair
    assert run["cost"] == run["nfe_rollout"] + run["nfe_update"] + 2 * run["grad_rows"]


def test_compare_runs_every_preset_but_the_multi_reward_variant():
    """A new preset joins the comparison by default, or this test names it."""
    import compare

    from egrpo_backend.method.algorithms import PRESETS

    assert set(compare.METHODS) == set(PRESETS) - {"nft_multi_reward"}


def test_ablation_runs_one_factor_at_a_time(tmp_path, monkeypatch):
    import ablation

    monkeypatch.setattr(ablation, "VARIANTS", {"merge": {"merge fixed 4": {"merge": 4}}})
    data = ablation.main(["--budget-nfe", "1000", "--seeds", "1", "--workers", "2"], out=tmp_path)
    assert set(data["equal_nfe"]) == {ablation.CENTRE, "merge fixed 4"}
    assert all(ROW_KEYS <= set(row) for row in data["equal_nfe"].values())
    assert "## merge" in (tmp_path / "ablation.md").read_text()


def test_ablation_variants_are_valid_specs():
    import ablation
    import common

    from egrpo_backend.config import JobSpec

    plans = {n: JobSpec.from_dict(common.spec_for("egrpo", 0, o)).algorithm.plan()
             for g in ablation.VARIANTS.values() for n, o in g.items()}
    assert plans["active 8-15"].active == list(range(8, 16)) and plans["active all"].active == list(range(16))
    assert [s.merge for s in plans["merge fixed 6"].steps[:8]] == [6] * 8
    assert all(s.merge == 1 for s in plans["tau 0"].steps)
