"""bench/scale.py runs end to end on the CPU at depth 1 (full width), and its full-size models build on
meta and materialise in their storage dtype. The GPU run (bench/scale_gpu.sh) is the same code at
full depth; on the CPU, weights stay float32 (torch converts fp8 to float32 at ~40M elements/s here,
so fp8 storage is tested on small models in tests/test_memory.py and once below without training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_scale_bench_depth_1_on_cpu(tmp_path):
    import scale

    out = scale.main(["--depth", "1", "--resolutions", "64", "--group-size", "2", "--steps", "4", "--iterations", "1",
                      "--models", "sd3.5-medium,comfy", "--presets", "egrpo_fast", "--text-tokens", "16",
                      "--weight-dtype", "auto", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "scale_cpu.json").read_text())
    assert data == json.loads(json.dumps(out))
    ran, comfy = data["results"]
    assert comfy["model"] == "comfy" and "ComfyUI is not available" in comfy["skipped"]  # skipped with a reason
    assert ran["iterations_done"] == 1 and ran["params"] > 50e6  # full width: a real SD3.5-medium block
    for phase in ("rollout", "decode", "reward", "update"):
        assert ran["phases"][phase]["seconds"] > 0, phase
        assert "peak_mem_gb" in ran["phases"][phase]  # None on the CPU (no per-phase allocator peak)
    assert ran["weights_gb"] > 0 and ran["nfe_per_second"] > 0 and ran["overhead_ratio"] > 0
    # an update sample counts as its measured forward + backward (no timing asserted: a CPU test)
    assert ran["update_cost_forwards"] > 0 and ran["overhead_ratio_update_as_one"] > 0
    it = ran["iterations"][0]
    assert it["samples_grad"] > 0 and it["samples_no_grad"] >= it["nfe_rollout"]
    assert ran["ratio_first_dev"] < 1e-4  # float32: rollout and update forwards agree
    assert "| sd3.5-medium | egrpo_fast | 64 |" in (tmp_path / "scale_cpu.md").read_text()


def test_budget_stops_cleanly_and_keeps_what_was_done(tmp_path):
    import scale

    scale.main(["--depth", "1", "--resolutions", "64", "--group-size", "2", "--steps", "4", "--iterations", "1",
                "--models", "sd3.5-medium", "--presets", "egrpo_fast", "--weight-dtype", "auto", "--device", "cpu",
                "--budget-seconds", "1", "--out", str(tmp_path)])
    (only,) = json.loads((tmp_path / "scale_cpu.json").read_text())["results"]
    assert "budget" in only["skipped"]


def test_configurations_run_most_important_first():
    import scale

    order = scale.configurations(scale.parse_args([]))
    assert order[:3] == [("flux-dev", "egrpo_fast", 1024), ("flux-dev", "egrpo", 512), ("flux-dev", "egrpo", 1024)]
    assert [m for m, _, _ in order][4] == "sd3.5-large" and order[-1][0] == "comfy"


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-large", "sd3.5-medium", "qwen-image"])
def test_full_size_configs_have_their_published_parameter_counts(name):
    from scale_models import MODELS, available, transformer_on_meta

    expected = {"flux-dev": 11.9e9, "sd3.5-large": 8.06e9, "sd3.5-medium": 2.24e9, "qwen-image": 20.4e9}
    card = MODELS[name]
    if not available(card):
        pytest.skip(f"this diffusers has no {card.cls}")
    model = transformer_on_meta(card, None, torch.bfloat16, torch.float8_e4m3fn)  # meta: no memory at all
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / expected[name] - 1) < 0.03, params


def test_materialise_puts_blocks_in_fp8_on_the_device_directly():
    from scale_models import MODELS, materialise, transformer_on_meta

    model = materialise(transformer_on_meta(MODELS["sd3.5-medium"], 1, torch.float32, torch.float8_e4m3fn), torch.device("cpu"))
    block = [p for p in model.transformer_blocks.parameters() if p.ndim == 2]
    assert block and all(p.dtype == torch.float8_e4m3fn and p.untyped_storage().nbytes() == p.numel() for p in block)
    assert all(p.device.type == "cpu" and torch.isfinite(p.float()).all() for p in model.parameters())
    assert model.pos_embed.pos_embed.abs().sum() > 0  # buffers are real values, not empty memory


def test_meta_trace_counts_live_bytes_and_keeps_weights_out():
    from memory_trace import trace_peak

    layer = torch.nn.Linear(256, 512, device="meta")
    x = torch.empty(16, 256, device="meta")
    out_bytes = 16 * 512 * 4

    def forward():
        with torch.no_grad():
            layer(x)
    assert trace_peak(forward, layer) == out_bytes  # the output, nothing for the (resident) weights

    def two_layers_no_grad():
        with torch.no_grad():
            h = layer(x).relu()  # relu's result replaces the first output, which then dies
            return h.sum()
    assert trace_peak(two_layers_no_grad, layer) == 2 * out_bytes  # the two were alive together once


def test_meta_attention_keeps_what_flash_attention_keeps():
    from memory_trace import trace_peak

    q = torch.empty(1, 2, 1024, 64, device="meta", dtype=torch.bfloat16)
    scores = 2 * 1024 * 1024 * 2  # what the math path would materialise

    def attend():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    peak = trace_peak(attend)
    assert peak < scores / 4 and peak >= q.numel() * 2  # output + a float32 logsumexp per row, never N x N


def test_overhead_counts_an_update_sample_at_its_measured_cost():
    import scale

    # 100 no-grad samples at 1 s each + 10 update samples at 3.5 forwards: 135 s of model time
    assert scale.overhead_ratio(135.0, 100, 10, 1.0, 3.5) == pytest.approx(1.0)
    assert scale.overhead_ratio(155.25, 100, 10, 1.0, 3.5) == pytest.approx(1.15)
    # the old accounting (an update sample as one forward) read the same run as 1.41
    assert 155.25 / (110 * 1.0) == pytest.approx(1.41, abs=0.01)


def test_call_counter_splits_samples_by_grad():
    import scale

    class Policy:
        def velocity(self, x, sigma, cond):
            return x * 2

    p = Policy()
    calls = scale.CallCounter(p)
    with torch.no_grad():
        p.velocity(torch.ones(3, 2), None, None)
    p.velocity(torch.ones(2, 2, requires_grad=True), None, None)
    assert calls.take() == (3, 2) and calls.take() == (0, 0)


def test_scale_gpu_script_runs_every_step_at_tiny_width(tmp_path, monkeypatch):
    """bench/scale_gpu.py --tiny on the CPU: the same steps as the GPU run, one table, JSON + md written."""
    import scale_gpu

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    out = scale_gpu.main(["--tiny", "--device", "cpu", "--comfy-root", "", "--out", str(tmp_path)])
    by_step = {}
    for r in out["results"]:
        by_step.setdefault(r.get("step") or r["model"], []).append(r)
    (flux,) = by_step["flux egrpo_fast"]
    assert flux["iterations_done"] == 1 and flux["update_cost_forwards"] > 0 and flux["path"] == "diffusers"
    (qwen,) = by_step["qwen swap"]
    assert qwen["iterations_done"] == 1 and qwen["offload_blocks"] == 1 and qwen["host_blocks_gb"] > 0  # block swap ran
    assert "tiny" in by_step["flux-dev egrpo"][0]["skipped"]  # the same path as egrpo_fast, another preset
    assert "ComfyUI is not available" in by_step["comfy egrpo_fast"][0]["skipped"]
    (wan,) = by_step["wan2.2-5b"]
    assert wan["forward_seconds"] > 0 and wan["update_cost_forwards"] > 0 and wan["tokens"] == 2 * 2 * 2
    assert "DDP / FSDP2 need 2+" in by_step["ddp / fsdp"][0]["skipped"]
    md = (tmp_path / "scale_gpu_cpu.md").read_text()
    assert "| qwen-image | diffusers | egrpo_fast | 64 | 1 (" in md and "| wan2.2-5b | transformer only |" in md
    assert json.loads((tmp_path / "scale_gpu_cpu.json").read_text())["meta"]["tiny"] is True
