"""The memory estimator's block-swap model (bench/memory_estimate.py, method steps 4 and 5): swapping N blocks
takes their bytes off every phase and adds two block buffers; the fewest N that fits is what the tables show;
the modelled families have their published sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def row(blocks, phases, batches=(8, 4, 4)):
    import memory_estimate as m

    peak = max(v for k, v in phases.items() if k != "encode")
    return {"model": "x", "resolution": 1024, "rollout_batch": batches[0], "micro_batch": batches[1],
            "decode_batch": batches[2], "blocks_gb": blocks, "phases_gb": phases, "peak_gb": peak,
            "fits": {str(c): m.fits(peak, c) for c in m.CARDS_GB},
            "encode_fits": {str(c): m.fits(phases["encode"], c) for c in m.CARDS_GB}}


def test_swap_takes_the_blocks_off_and_adds_two_buffers():
    import memory_estimate as m

    r = row([0.5] * 40, {"encode": 30.0, "rollout": 24.0, "update": 26.0, "decode": 22.0, "reward": 21.0})
    assert m.swap_phases(r, 0) == r["phases_gb"]
    ten = m.swap_phases(r, 10)  # 10 x 0.5 off, 2 x 0.5 on
    assert ten == pytest.approx({k: v - 4.0 for k, v in r["phases_gb"].items()})
    # 24 GB fits 1.1 x peak + 1 <= 24, i.e. peak <= 20.9: 26 - 0.5 n + 1 <= 20.9 -> n >= 12.2
    n, peak = m.swap_fit(r, 24)
    assert n == 13 and peak == pytest.approx(26.0 - 6.5 + 1.0)
    assert m.swap_fit(r, 16)[0] == 27  # peak <= 13.6: 27 - 0.5 n <= 13.6
    assert m.swap_fit(row([0.5] * 40, {"encode": 30.0, "update": 40.0}), 16) is None  # activations alone too big


def test_best_on_card_prefers_no_swap_then_the_largest_batches():
    import memory_estimate as m

    small = row([1.0] * 20, {"encode": 10.0, "update": 20.0}, batches=(2, 1, 1))
    large = row([1.0] * 20, {"encode": 10.0, "update": 25.0})
    best = m.best_on_card([large, small], 24)
    assert best["swap"] == 0 and best["row"] is small  # smaller batches without swap win over swapping
    best = m.best_on_card([large, small], 16)  # neither fits plainly: the large batches, fewest blocks
    assert best["row"] is large and best["swap"] == 14 and best["host_gb"] == pytest.approx(14.0)  # 25 - n + 2 <= 13.6
    assert "swap 14/20" in m.readme_table([large, small]).splitlines()[2]


def test_activation_fit_recovers_its_own_model():
    import memory_estimate as m

    rows = []
    for model, (hidden, text) in m.TRACED_TOKENS.items():
        blocks = {"flux-dev": 57, "qwen-image": 60, "sd3.5-large": 38, "sd3.5-medium": 24}[model]
        unit = (64 * 64 + text) * hidden * 2 / m.GIB
        for b in (1, 2, 4):
            rows.append({"model": model, "resolution": 1024, "rollout_batch": 2 * b, "micro_batch": b, "blocks_gb": [0] * blocks,
                         "activations_gb": {"rollout": 17 * 2 * b * unit, "update": (1.5 * blocks + 30) * b * unit}})
    fit = m.fit_activation_model(rows)
    assert fit["c_rollout"] == pytest.approx(17) and fit["a_update_per_block"] == pytest.approx(1.5)
    assert fit["b_update"] == pytest.approx(30) and fit["max_rel_error_update"] < 1e-9
    # the modelled value errs high by the fit's worst error
    fit["max_rel_error_rollout"] = 0.25
    assert m.modelled_activations(fit, 1000, 1000, 10, 2, grad=False) == pytest.approx(2 * 1e6 * 2 / m.GIB * 17 * 1.25)


@pytest.mark.parametrize("name", ["wan2.2-5b", "wan2.2-14b", "hunyuanvideo", "flux2-dev", "z-image"])
def test_large_families_have_their_published_sizes(name):
    import diffusers
    from scale_models import LARGE_FAMILIES, large_family_on_meta

    from egrpo_backend.policies.block_swap import swappable_blocks

    family = LARGE_FAMILIES[name]
    if not hasattr(diffusers, family.cls):
        pytest.skip(f"this diffusers has no {family.cls}")
    model = large_family_on_meta(family, torch.bfloat16, torch.float8_e4m3fn)  # meta: nothing allocated
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / family.published_params - 1) < 0.05, params
    assert len(swappable_blocks(model)) >= 30


def test_reward_stays_on_the_device_only_when_it_fits_beside_the_other_phases():
    from egrpo_backend.jobs.memory_plan import GIB, reward_stays_on_device

    assert reward_stays_on_device(2 * GIB, total_bytes=24 * GIB, peak_other_bytes=18 * GIB)  # 18 + 2 + 2 <= 24
    assert not reward_stays_on_device(2 * GIB, total_bytes=24 * GIB, peak_other_bytes=21 * GIB)


def test_chunk_size_grows_with_free_memory_within_its_limits():
    from egrpo_backend.jobs.memory_plan import GIB, chunk_size

    # decode: 12 GiB resident, 1.5 GiB per image, 80 GB card, 2 GiB margin: (80 - 2 - 12) / 1.5 = 44 -> limit 16
    assert chunk_size(1.5 * GIB, 12 * GIB, 80 * GIB, current=4, limit=16) == 16
    assert chunk_size(1.5 * GIB, 12 * GIB, 24 * GIB, current=4, limit=16) == 6  # (24 - 2 - 12) / 1.5
    assert chunk_size(1.5 * GIB, 12 * GIB, 16 * GIB, current=4, limit=16) == 4  # never below what already ran
    assert chunk_size(0, 12 * GIB, 16 * GIB, current=4, limit=16) == 4
