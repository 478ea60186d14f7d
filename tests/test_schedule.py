"""SPEC 1 and 3: the shifted grid, entropy scores and the adaptive merge, against SPEC's numbers."""

import json
import math

import pytest

from egrpo_backend.method.schedule import (SQRT_2PI_E, build_plan, diffusion_coefficients, merge_width,
                                    parse_active_steps, shifted_sigmas, validate_sigmas)


def test_shifted_grid_hand_values():
    s = shifted_sigmas(16, 3.0)
    assert len(s) == 17 and s[0] == 1.0 and s[-1] == 0.0
    assert s[1] == pytest.approx(3 * (15 / 16) / (1 + 2 * (15 / 16)))  # 0.978261
    assert s[8] == pytest.approx(0.75)  # t_hat = 0.5 -> 1.5 / 2


def test_entropy_scores_match_spec():
    plan = build_plan(shifted_sigmas(16, 3.0), eta=0.7, tau=2.2, active="0-7")
    assert [round(p.entropy, 3) for p in plan.steps[:5]] == [2.893, 2.989, 2.137, 1.763, 1.542]
    # Step 0 by hand: g_0 = 0.7 sqrt(1 / (1 - sigma_1)) and |dt| = 1 - sigma_1, so the std is exactly 0.7.
    assert plan.steps[0].std == pytest.approx(0.7)
    assert plan.steps[0].entropy == pytest.approx(0.7 * math.sqrt(2 * math.pi * math.e))
    # exp(h) of the Gaussian transition: h = 0.5 log(2 pi e var).
    var = plan.steps[3].std ** 2
    assert plan.steps[3].entropy == pytest.approx(math.exp(0.5 * math.log(2 * math.pi * math.e * var)))
    # Entropy falls along the trajectory after step 1.
    ent = [p.entropy for p in plan.steps]
    assert all(a > b for a, b in zip(ent[1:], ent[2:]))


@pytest.mark.parametrize("tau,widths", [
    (0.0, [1] * 8),
    (1.8, [1, 1, 1, 2, 2, 2, 2, 3]),
    (2.0, [1, 1, 1, 2, 2, 2, 3, 3]),
    (2.2, [1, 1, 2, 2, 2, 3, 3, 3]),
    (2.6, [1, 1, 2, 3, 3, 4, 4, 4]),
])
def test_merge_widths_match_spec(tau, widths):
    plan = build_plan(shifted_sigmas(16, 3.0), eta=0.7, tau=tau, active="0-7")
    assert [p.merge for p in plan.steps[:8]] == widths
    assert all(p.merge == 1 and p.kind == "ode" for p in plan.steps[8:])
    # Each chosen width is the smallest whose merged score reaches tau.
    for p in plan.steps[:8]:
        if tau > 0:
            assert p.merged_entropy >= tau - 1e-12
            if p.merge > 1:
                s, g = plan.sigmas, plan.g
                assert SQRT_2PI_E * g[p.index] * math.sqrt(s[p.index] - s[p.index + p.merge - 1]) < tau


def test_merge_runs_to_the_end_when_tau_unreachable():
    s = shifted_sigmas(4, 3.0)
    g = diffusion_coefficients(s, 0.01)
    assert merge_width(s, g, 1, tau=100.0) == 3


def test_arbitrary_monotone_grid_like_comfy_sigmas():
    grid = [1.0, 0.9, 0.7, 0.4, 0.1, 0.0]
    plan = build_plan(grid, eta=0.7, tau=0.0, active="all")
    assert [p.kind for p in plan.steps] == ["sde"] * 5
    # sigma_0 = 1: the denominator uses 1 - sigma_1 (SPEC 2).
    assert plan.g[0] == pytest.approx(0.7 * math.sqrt(1.0 / 0.1))
    assert plan.g[2] == pytest.approx(0.7 * math.sqrt(0.7 / 0.3))
    # A grid that does not start at 1 works too.
    assert build_plan([0.8, 0.5, 0.0], 0.7, 2.2, "all").steps[0].sigma == 0.8


def test_constant_diffusion_for_dancegrpo():
    assert diffusion_coefficients([1.0, 0.5, 0.0], 0.3, "constant") == [0.3, 0.3]


@pytest.mark.parametrize("grid,msg", [
    ([1.0], "at least 2"),
    ([1.0, 0.5, 0.6, 0.0], "strictly decreasing"),
    ([1.0, 0.5], "end at 0"),
    ([1.5, 0.5, 0.0], "[0, 1]"),
    ([1.0, float("nan"), 0.0], "NaN"),
])
def test_bad_grids_are_rejected(grid, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        validate_sigmas(grid)


def test_active_step_parsing():
    assert parse_active_steps("0-3,6", 8) == [0, 1, 2, 3, 6]
    assert parse_active_steps("first_half", 16) == list(range(8))
    assert parse_active_steps("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="outside 0..15"):
        parse_active_steps("0-16", 16)
    with pytest.raises(ValueError, match="bad active"):
        parse_active_steps("a-b", 16)


def test_plan_json_contract_and_table():
    plan = build_plan(shifted_sigmas(16, 3.0), 0.7, 2.2, "0-7")
    data = json.loads(json.dumps(plan.to_json()))
    assert len(data["steps"]) == 16
    for step in data["steps"]:
        assert set(step) == {"index", "sigma", "sigma_next", "std", "entropy", "merge", "kind"}
        assert step["kind"] in ("sde", "ode")
    assert [s["merge"] for s in data["steps"][:8]] == [1, 1, 2, 2, 2, 3, 3, 3]
    table = plan.table()
    assert "tau=2.2" in table and table.count("sde") == 8


def test_plan_png(tmp_path):
    plan = build_plan(shifted_sigmas(16, 3.0), 0.7, 2.2, "0-7")
    out = tmp_path / "plan.png"
    plan.save_png(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_fixed_merge_width_ignores_tau_and_is_cut_at_the_grid_end():
    from egrpo_backend.config import AlgorithmSpec, SpecError

    adaptive = build_plan(shifted_sigmas(16, 3.0), eta=0.7, tau=2.2, active="0-7")
    assert adaptive == build_plan(shifted_sigmas(16, 3.0), eta=0.7, tau=2.2, active="0-7", merge="adaptive")
    for width in (2, 4, 6):
        plan = build_plan(shifted_sigmas(16, 3.0), eta=0.7, tau=2.2, active="0-7", merge=width)
        assert [s.merge for s in plan.steps] == [width] * 8 + [1] * 8
    assert [s.merge for s in build_plan(shifted_sigmas(16, 3.0), active="12-15", merge=6).steps[12:]] == [4, 3, 2, 1]
    assert AlgorithmSpec().merge == "adaptive" and AlgorithmSpec().plan() == AlgorithmSpec(merge="adaptive").plan()
    assert [s.merge for s in AlgorithmSpec(merge=4).plan().steps[:8]] == [4] * 8
    for bad in (0, -1, 2.5, True, "fixed"):
        with pytest.raises(SpecError, match="algorithm.merge"):
            AlgorithmSpec(merge=bad).validate()
