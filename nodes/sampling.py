"""The E-GRPO sampler as a ComfyUI sampler function (pure PyTorch; ComfyUI calls it, no import).

ComfyUI's KSAMPLER calls `fn(model, x, sigmas, extra_args, callback, disable, **options)` where
`model(x, sigma * s_in, **extra_args)` returns the denoised x0 (after CFG) and x is already noised
to sigmas[0]. For flow models x_t = sigma * noise + (1 - sigma) * x0, so the velocity the engine
uses is v = (x_t - x0) / sigma. Each step follows the entropy plan of the grid it is given: an
active ("sde") step i takes one consolidated SDE step i -> i + l_i (egrpo_backend.method.sde.sde_step), every
other step is an Euler ODE step, and a step that lands on sigma = 0 returns x0 (no noise is added
to the clean image).
"""

from __future__ import annotations

import torch

from egrpo_backend.method.schedule import EntropyPlan, build_plan
from egrpo_backend.method.sde import ode_step, sde_step


def plan_for(sigmas, eta: float, tau: float, active, diffusion: str = "flow_grpo") -> EntropyPlan:
    """build_plan on a ComfyUI SIGMAS tensor, with a message that names the usual mistake."""
    values = [float(s) for s in torch.as_tensor(sigmas).flatten().tolist()]
    if values and values[0] > 1.0 + 1e-6:
        raise ValueError(
            f"the E-GRPO sampler needs a flow-matching model's sigmas (in [0, 1]); got sigmas[0] = {values[0]:.4g}. "
            "Use it with Flux / SD3 / Wan / Qwen-Image-style models (ModelSamplingFlux / ModelSamplingSD3), "
            "not SD1.5 / SDXL")
    return build_plan(values, eta, tau, active, diffusion)


@torch.no_grad()
def sample_egrpo(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 0.7, tau: float = 2.2,
                 active="0-7", diffusion: str = "flow_grpo", seed: int = 0, branch_step: int | None = None):
    """Sample along the entropy plan of `sigmas`; returns the final latent.

    branch_step: None = an SDE step at every active step (the sampler); an index = a training group
    preview: every batch member starts from member 0's noise, runs the shared ODE prefix, branches with
    its own noise at `branch_step` only, and is finished by ODE.
    """
    extra_args = {} if extra_args is None else extra_args
    if branch_step is not None:
        active = [int(branch_step)]
        x = x[:1].expand_as(x).clone()  # shared initial noise: one group = one prompt, one start
    plan = plan_for(sigmas, eta, tau, active, diffusion)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    s_in = x.new_ones([x.shape[0]])
    i, T = 0, plan.num_steps
    while i < T:
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        step = plan.steps[i]
        j = plan.target(i) if step.kind == "sde" else i + 1
        if plan.sigmas[j] == 0.0:
            x = denoised
        else:
            v = (x - denoised) / sigma
            if step.kind == "sde":
                noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device)
                x = sde_step(x, v, plan.sigmas[i], plan.sigmas[j], plan.g[i], noise=noise).x_next.to(x.dtype)
            else:
                x = ode_step(x, v, plan.sigmas[i], plan.sigmas[j]).to(x.dtype)
        i = j
    return x
