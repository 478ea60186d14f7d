"""Video latents (docs/comfyui.md, "Latent shapes"): 5-D [B, C, F, H, W] rollouts, log-probabilities and the
latent shape a ComfyUI family samples. No ComfyUI here: the policy is a tiny 5-D stand-in and the latent
formats are stand-ins with ComfyUI's attribute names (latent_channels, latent_dimensions,
spacial_downscale_ratio); the real families are checked in tests/comfy_integration/test_comfy_contract.py."""

import pytest
import torch

from egrpo_backend.method.guidance import GuidedVelocity
from egrpo_backend.policies.comfy_latents import latent_shape
from egrpo_backend.method.rollout import rollout
from egrpo_backend.method.schedule import build_plan, shifted_sigmas
from egrpo_backend.method.sde import sde_step


class VideoPolicy:
    """A velocity field on [B, C, F, H, W] latents that mixes frames (so the frames axis matters)."""

    latent_shape = (4, 3, 4, 4)
    device = torch.device("cpu")

    def encode(self, prompts):
        return {"c": torch.tensor([[float(len(p))] for p in prompts])}

    def velocity(self, x, sigma, cond):
        assert x.ndim == 5
        mixed = x + 0.1 * x.roll(1, dims=2)
        return 0.5 * mixed - cond["c"].view(-1, 1, 1, 1, 1) * 0.01 * (1 - sigma.view(-1, 1, 1, 1, 1))

    def decode(self, latents):  # frames [B, F, C, H, W]
        return ((latents[:, :3].permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)


def test_rollout_runs_on_video_latents():
    policy = VideoPolicy()
    plan = build_plan(shifted_sigmas(6, 3.0), eta=0.7, tau=0.0, active="0-1")
    prompts = ["a", "bb"]
    gens = [torch.Generator().manual_seed(p) for p in range(2)]
    ro = rollout(GuidedVelocity(policy, policy.encode(prompts)), plan, [0, 1], gens, group_size=2,
                 granularities=[1], sde_window=1, shared_initial_noise=True)
    assert ro.final.shape[-4:] == policy.latent_shape and torch.isfinite(ro.final).all()
    frames = policy.decode(ro.final.flatten(0, 1))
    assert frames.shape[1:] == (3, 3, 4, 4)  # [B, F, C, H, W]


def test_log_prob_is_the_mean_over_every_latent_dimension():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(2, 4, 3, 4, 4, generator=g) for _ in range(3))
    five = sde_step(x, v, 0.8, 0.6, 0.5, noise=noise)
    flat = sde_step(x.flatten(1), v.flatten(1), 0.8, 0.6, 0.5, noise=noise.flatten(1))
    assert five.log_prob.shape == (2,)
    assert torch.allclose(five.log_prob, flat.log_prob, atol=1e-6)
    scored = sde_step(x, v, 0.8, 0.6, 0.5, x_next=five.x_next)
    assert torch.allclose(scored.log_prob, five.log_prob)


def fmt(name, channels, dims=2, ratio=8):
    return type(name, (), {"latent_channels": channels, "latent_dimensions": dims, "spacial_downscale_ratio": ratio})()


class VideoVae:
    downscale_ratio = (lambda a: max(0, (a + 3) // 4), 16, 16)  # what comfy.sd.VAE sets for Wan 2.2's VAE


@pytest.mark.parametrize("form, vae, size, length, shape", [
    (fmt("Flux", 16), None, (512, 256), 1, (16, 32, 64)),
    (fmt("Flux2", 128, ratio=16), None, (512, 512), 1, (128, 32, 32)),
    (fmt("HunyuanImage21", 64, ratio=32), None, (1024, 1024), 1, (64, 32, 32)),
    (fmt("Wan21", 16, dims=3), None, (832, 480), 81, (16, 21, 60, 104)),
    (fmt("Wan22", 48, dims=3, ratio=16), VideoVae(), (1280, 704), 121, (48, 31, 44, 80)),
    (fmt("HunyuanVideo", 16, dims=3), None, (512, 512), 1, (16, 1, 64, 64)),  # Qwen-Image's shape too
    (fmt("Mochi", 12, dims=3), None, (848, 480), 25, (12, 5, 60, 106)),
])
def test_latent_shape_is_what_the_empty_latent_node_makes(form, vae, size, length, shape):
    assert latent_shape(form, vae, *size, length) == shape


def test_frames_on_an_image_model_are_refused():
    with pytest.raises(ValueError, match="length = 5 but this model makes images"):
        latent_shape(fmt("Flux", 16), None, 512, 512, 5)
