"""Block swap (egrpo_backend/policies/block_swap.py, docs/memory.md "Block swap"), on the CPU: the same code
path as on CUDA with a no-op copy stream. Swapping changes where weights live, never a number: outputs and
LoRA gradients are bit-identical with and without it; each swapped block is copied once per run of its
forward (once per forward pass, once more per recompute under gradient checkpointing); the copy of the
next block is requested before the current one runs; the LoRA is never swapped."""

from __future__ import annotations

import pytest
import torch

from egrpo_backend import lora
from egrpo_backend.config import JobSpec, SpecError
from egrpo_backend.policies import block_swap
from egrpo_backend.policies.diffusers_policy import DiffusersPolicy
from test_diffusers_pipeline import sd3_folder  # noqa: F401  (fixture: a real tiny SD3 pipeline folder)
from tiny_models import ByteTextEncoder

LATENT = (4, 8, 8)
FP8 = torch.float8_e4m3fn


def tiny_flux(seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                  axes_dims_rope=(4, 6, 6))


def tiny_qwen(seed=0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                                 axes_dims_rope=(4, 6, 6))


def policy(build, offload, weight_dtype=None):
    p = DiffusersPolicy(build(), ByteTextEncoder(), LATENT, dtype=torch.float32, weight_dtype=weight_dtype,
                        gradient_checkpointing=True, offload_blocks=offload)
    lora.add_lora(p.lora_model(), lora.LoraSettings(rank=2), seed=0)
    with torch.no_grad():  # a LoRA that is not zero, so its gradients reach every layer
        for q in p.trainable_parameters():
            q.add_(0.01 * torch.arange(q.numel(), dtype=q.dtype).reshape(q.shape).sin())
    return p


def run(p, grad: bool):
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, *LATENT, generator=g), torch.rand(2, generator=g) * 0.8 + 0.1
    cond = p.encode(["a cat", "a dog"])
    with torch.set_grad_enabled(grad):
        v = p.velocity(x, sigma, cond)
        if grad:
            v.square().mean().backward()
    grads = [None if q.grad is None else q.grad.clone() for q in p.trainable_parameters()] if grad else []
    for q in p.trainable_parameters():
        q.grad = None
    return v.detach(), grads


@pytest.mark.parametrize("build,weight_dtype,offload", [(tiny_flux, None, 3), (tiny_qwen, FP8, 2)],
                         ids=["flux-3-of-4", "qwen-fp8-2-of-3"])
def test_swap_changes_no_number(build, weight_dtype, offload):
    if build is tiny_qwen:
        import diffusers

        if not hasattr(diffusers, "QwenImageTransformer2DModel"):
            pytest.skip("this diffusers has no QwenImageTransformer2DModel")
    plain, swapped = policy(build, 0, weight_dtype), policy(build, offload, weight_dtype)
    assert plain.block_swap is None and len(swapped.block_swap.names) == offload
    for grad in (False, True):
        (v0, g0), (v1, g1) = run(plain, grad), run(swapped, grad)
        assert torch.equal(v0, v1), f"velocity differs (grad={grad})"
        assert len(g0) == len(g1) and all(a is b is None or torch.equal(a, b) for a, b in zip(g0, g1)), "LoRA gradients differ"
    assert sum(g is not None and g.abs().sum() > 0 for g in g1[-8:]) >= 4  # the swapped (last) blocks' LoRA did get gradients


def test_each_swapped_block_moves_once_per_forward_and_once_per_recompute():
    p = policy(tiny_flux, 3)
    swap = p.block_swap
    assert swap.names == ["transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    run(p, grad=False)
    assert dict(swap.moves) == {n: 1 for n in swap.names}  # rollout: one forward, one copy each
    run(p, grad=False)
    assert dict(swap.moves) == {n: 2 for n in swap.names}
    swap.moves.clear()
    run(p, grad=True)  # forward (1) + checkpointing's recompute in backward (1)
    assert dict(swap.moves) == {n: 2 for n in swap.names}
    assert not swap.in_flight  # nothing requested that did not run


def test_the_next_block_is_requested_before_the_current_one_runs():
    p = policy(tiny_flux, 3)
    swap = p.block_swap
    swap.trace = []
    run(p, grad=False)
    names, trace = swap.names, swap.trace
    assert trace[0] == ("request", names[0])  # by the last resident block, before it runs
    assert [e for e in trace if e[0] == "run"] == [("run", n) for n in names]
    for current, following in zip(names, names[1:]):
        assert trace.index(("request", following)) < trace.index(("run", current))

    swap.trace = []
    run(p, grad=True)
    runs = [n for kind, n in swap.trace if kind == "run"]
    assert runs == names + names[::-1]  # the forward pass, then backward recomputes last to first
    backward = swap.trace[2 * len(names):]  # after the forward's requests and runs
    for current, previous in zip(names[::-1], names[::-1][1:]):  # in backward the "next" block is the one before
        assert backward.index(("request", previous)) < backward.index(("run", current))


def test_lora_stays_on_the_device_and_base_weights_return_to_the_host():
    p = policy(tiny_flux, 2)
    swap = p.block_swap
    lora_params = p.trainable_parameters()
    pointers = [q.data_ptr() for q in lora_params]
    owned = {id(q) for pairs in swap.host.values() for q, _ in pairs}
    assert not owned & {id(q) for q in lora_params}  # the swap never owns a LoRA parameter
    for _ in range(2):
        run(p, grad=True)
    assert [q.data_ptr() for q in lora_params] == pointers  # never moved, never copied
    for pairs in swap.host.values():
        assert pairs and all(q.data_ptr() == host.data_ptr() for q, host in pairs)  # between runs: the host copy
    resident = [q for n, q in p.transformer.named_parameters() if id(q) not in owned]
    assert all(q.device == p.device for q in resident)


def test_auto_picks_the_fewest_blocks_that_fit():
    gib = 2**30
    blocks = [1 * gib] * 10
    auto = block_swap.auto_offload_blocks
    assert auto(blocks, other_bytes=2 * gib, free_bytes=20 * gib, reserve_bytes=4 * gib) == 0  # 2 + 10 + 4 <= 20
    # 2 + (10 - n) + 2 prefetch buffers + 4 <= 15  ->  n >= 3
    assert auto(blocks, other_bytes=2 * gib, free_bytes=15 * gib, reserve_bytes=4 * gib) == 3
    assert auto(blocks, other_bytes=2 * gib, free_bytes=8 * gib, reserve_bytes=4 * gib) == 10
    # uneven blocks: the two prefetch buffers are sized by the largest swapped block (here the last, 4 GiB)
    assert auto([gib] * 8 + [4 * gib], other_bytes=0, free_bytes=10 * gib, reserve_bytes=0) == 7  # 2 x 1 resident + 2 x 4 buffers
    assert auto([4 * gib] + [gib] * 8, other_bytes=0, free_bytes=10 * gib, reserve_bytes=0) == 4  # 4 + 4 x 1 resident + 2 x 1 buffers
    with pytest.raises(ValueError, match="even with all 10 blocks on the host.*7.0 GiB free"):
        auto(blocks, other_bytes=2 * gib, free_bytes=7 * gib, reserve_bytes=4 * gib)


def test_auto_off_cuda_swaps_nothing_and_counts_are_checked():
    p = DiffusersPolicy(tiny_flux(), ByteTextEncoder(), LATENT, offload_blocks="auto")
    assert p.block_swap is None  # host memory is device memory on the CPU
    with pytest.raises(ValueError, match=r"model.offload_blocks = 5, but this model has 4 blocks .*use 0..4 or 'auto'"):
        DiffusersPolicy(tiny_flux(), ByteTextEncoder(), LATENT, offload_blocks=5)


@pytest.mark.parametrize("value,match", [(-1, "is not allowed"), (2.5, "is not allowed"), ("all", "is not allowed"),
                                         (True, "is not allowed")])
def test_spec_refuses_bad_offload_blocks(value, match):
    with pytest.raises(SpecError, match=match):
        JobSpec.from_dict({"model": {"source": "diffusers", "path": "/x", "offload_blocks": value}, "prompts": ["a"]})


def test_spec_refuses_swap_without_checkpointing_and_turns_it_on():
    with pytest.raises(SpecError, match="offload_blocks needs gradient checkpointing"):
        JobSpec.from_dict({"model": {"source": "diffusers", "path": "/x", "offload_blocks": 2,
                                     "gradient_checkpointing": "off"}, "prompts": ["a"]})
    with pytest.raises(SpecError, match="default model .* nothing to swap"):
        JobSpec.from_dict({"model": {"offload_blocks": "auto"}, "prompts": ["a"]})
    with pytest.raises(SpecError, match="offload_blocks with train.parallel 'fsdp'"):
        JobSpec.from_dict({"model": {"source": "diffusers", "path": "/x", "offload_blocks": 4}, "prompts": ["a"],
                           "train": {"parallel": "fsdp"}})
    spec = JobSpec.from_dict({"model": {"source": "diffusers", "path": "/x", "offload_blocks": "auto"}, "prompts": ["a"]})
    assert spec.model.gradient_checkpointing_on(torch.device("cpu"))


# ------------------------------------------------------------------ the comfy path's hook


class ComfyLikeFlux(torch.nn.Module):
    """Double and single blocks that add residuals in place, as ComfyUI's Flux does (why comfy_policy
    clones inputs in its checkpointing)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img_in = torch.nn.Linear(8, 8)
        self.double_blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(2))
        self.single_blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(2))

    def forward(self, x):
        x = self.img_in(x)
        for block in [*self.double_blocks, *self.single_blocks]:
            x = x + block(x)
        return x


def comfy_like(offload):
    from egrpo_backend.policies.comfy_policy import _checkpoint_blocks

    base = torch.nn.Module()  # a ComfyUI BaseModel's shape: the blocks are its diffusion_model's
    base.diffusion_model = ComfyLikeFlux()
    base.requires_grad_(False)
    swap = block_swap.place(base, "cpu", offload)  # comfy_policy's one line, in place of base.to(device)
    _checkpoint_blocks(base.diffusion_model)  # after the swap: its recompute must run our load
    params = lora.add_lora(base.diffusion_model, lora.LoraSettings(rank=2, target_modules=["0"]), seed=0)
    with torch.no_grad():
        for q in params:
            q.add_(0.1)
    return base.diffusion_model, swap, params


def test_comfy_blocks_swap_through_comfy_checkpointing():
    x = torch.randn(3, 8)
    outs = []
    for offload in (0, 3):
        model, swap, params = comfy_like(offload)
        out = model(x.clone().requires_grad_(True))
        out.square().sum().backward()
        outs.append((out.detach(), [q.grad for q in params]))
        if offload:
            assert swap.names == ["double_blocks.1", "single_blocks.0", "single_blocks.1"]
            assert dict(swap.moves) == {n: 2 for n in swap.names}  # forward + recompute inside comfy's checkpoint
    (v0, g0), (v1, g1) = outs
    assert torch.equal(v0, v1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_a_job_with_block_swap_trains_the_same_lora(sd3_folder, tmp_path):  # noqa: F811
    """The spec field end to end: build_trainer -> policy with swap -> one E-GRPO iteration -> the same LoRA."""
    from egrpo_backend.jobs.build import build_trainer

    def train(offload):
        job = tmp_path / f"job{offload}"
        job.mkdir()
        spec = JobSpec.from_dict({"model": {"source": "diffusers", "path": str(sd3_folder), "offload_blocks": offload,
                                            "gradient_checkpointing": "on"},
                                  "prompts": ["a red cat"], "rewards": [{"name": "jpeg_compressibility"}],
                                  "algorithm": {"steps": 4, "active": "0-1", "group_size": 2},
                                  "train": {"device": "cpu", "evaluate": False, "iterations": 1}})
        trainer = build_trainer(spec, job_dir=job)
        trainer.step()
        return trainer.policy

    plain, swapped = train(0), train(1)
    assert plain.block_swap is None and swapped.block_swap.names == ["transformer_blocks.1"]
    assert swapped.block_swap.moves["transformer_blocks.1"] > 2  # rollout forwards, update forward and recompute
    after = [lora.lora_parameters(p.lora_model()) for p in (plain, swapped)]
    assert all(torch.equal(a, b) for a, b in zip(*after)) and len(after[0]) == len(after[1]) > 0
    ups = [q for n, q in swapped.lora_model().named_parameters() if "lora_B" in n]
    assert ups and any(q.abs().sum() > 0 for q in ups)  # lora_B starts at zero: the iteration did train
