"""E-GRPO Entropy Plan, E-GRPO Sampler and E-GRPO Group Preview: look at and sample along a plan."""

from __future__ import annotations

from comfy_api.latest import io

from . import types
from .images import render_png
from .sampling import plan_for, sample_egrpo

DIFFUSIONS = ["flow_grpo", "constant"]


def plan_inputs():
    """eta / tau / active / diffusion, shared by the plan, sampler and preview nodes."""
    return [
        io.Float.Input("eta", default=0.7, min=0.0, max=10.0, step=0.01,
                       tooltip="SDE noise level a: higher explores more (paper 0.7)."),
        io.Float.Input("tau", default=2.2, min=0.0, max=100.0, step=0.01,
                       tooltip="Entropy threshold: low-entropy SDE steps merge with the following steps until "
                               "their entropy score reaches tau. 0 = never merge (Granular-GRPO)."),
        io.String.Input("active", default="0-7",
                        tooltip="Steps that take an SDE step (training branches there): '0-7', '0,2,4', 'all' or "
                                "'first_half'. Steps are counted from the noisy end (0)."),
        io.Combo.Input("diffusion", options=DIFFUSIONS, default="flow_grpo", advanced=True,
                       tooltip="Diffusion coefficient g(sigma): flow_grpo = a*sqrt(sigma/(1-sigma)); constant = a "
                               "(DanceGRPO)."),
    ]


class EntropyPlanNode(io.ComfyNode):
    """SIGMAS from any scheduler -> the entropy plan as a chart, a table and an EGRPO_PLAN value."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EGRPOEntropyPlan", display_name="E-GRPO Entropy Plan", category=types.CATEGORY,
            description="Per-step entropy of the SDE, which steps merge and which are SDE vs ODE.",
            inputs=[io.Sigmas.Input("sigmas", tooltip="A flow-matching schedule (e.g. BasicScheduler on a Flux "
                                                      "model), T + 1 values from ~1 down to 0."),
                    *plan_inputs()],
            outputs=[io.Image.Output(display_name="chart", tooltip="Entropy score per step, the tau line, merged "
                                                                   "spans, SDE (red) and ODE (grey) steps."),
                     io.String.Output(display_name="table", tooltip="The plan as text: per-step sigma, std, entropy "
                                                                    "score, merge width and kind."),
                     types.Plan.Output(display_name="plan", tooltip="The plan itself, for E-GRPO Sampler and E-GRPO "
                                                                    "Train LoRA (its grid and settings).")],
        )

    @classmethod
    def execute(cls, sigmas, eta, tau, active, diffusion="flow_grpo") -> io.NodeOutput:
        plan = plan_for(sigmas, eta, tau, active, diffusion)
        return io.NodeOutput(render_png(plan.save_png), plan.table(), plan)


class SamplerNode(io.ComfyNode):
    """A SAMPLER for SamplerCustom / SamplerCustomAdvanced: SDE at the plan's active steps, ODE elsewhere."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EGRPOSampler", display_name="E-GRPO Sampler", category=types.CATEGORY,
            description="Samples a flow model (v = (x - x0) / sigma) along an E-GRPO entropy plan.",
            inputs=[*plan_inputs(),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="Seed of the SDE noise (the initial noise comes from the Noise / "
                                         "SamplerCustom seed)."),
                    types.Plan.Input("plan", optional=True,
                                     tooltip="An EGRPO_PLAN from E-GRPO Entropy Plan: its eta, tau, diffusion and "
                                             "active steps replace the widgets (the grid is the SIGMAS sampled).")],
            outputs=[io.Sampler.Output(tooltip="For SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, eta, tau, active, diffusion="flow_grpo", seed=0, plan=None) -> io.NodeOutput:
        import comfy.samplers

        options = sampler_options(eta, tau, active, diffusion, plan)
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_egrpo, extra_options={**options, "seed": seed}))


def sampler_options(eta, tau, active, diffusion, plan=None) -> dict:
    """The sampler's options from the widgets, or from a plan; checks `active` now, not mid-sampling."""
    if plan is not None:
        return {"eta": plan.eta, "tau": plan.tau, "active": plan.active, "diffusion": plan.diffusion}
    from egrpo_backend.method.schedule import parse_active_steps

    parse_active_steps(active, 1000)  # syntax check; the range is checked against the real grid
    return {"eta": float(eta), "tau": float(tau), "active": active, "diffusion": diffusion}


class GroupPreviewNode(io.ComfyNode):
    """The G images one training group sees: shared noise and ODE prefix, branch at one step, ODE finish."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EGRPOGroupPreview", display_name="E-GRPO Group Preview", category=types.CATEGORY,
            description="Shows how much one SDE step explores before you train: G images from one start.",
            inputs=[io.Model.Input("model", tooltip="A flow-matching model (Flux, SD3, Wan, ...)."),
                    io.Conditioning.Input("positive", tooltip="The prompt's conditioning."),
                    io.Conditioning.Input("negative", tooltip="Negative conditioning (used when cfg > 1)."),
                    io.Vae.Input("vae", tooltip="Decodes the group's latents."),
                    io.Latent.Input("latent", tooltip="An empty latent; its size sets the image size (batch ignored)."),
                    io.Sigmas.Input("sigmas", tooltip="The schedule the group is sampled on."),
                    io.Int.Input("group_size", default=4, min=2, max=64, tooltip="G, images in the group."),
                    io.Int.Input("branch_step", default=0, min=0, max=999,
                                 tooltip="The step where the members branch (their only SDE step)."),
                    io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                                   tooltip="Classifier-free guidance scale (1 = off; Flux-dev uses guidance instead)."),
                    *plan_inputs()[:2], plan_inputs()[3],
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="Seed of the shared initial noise and of the branch noise."),
                    types.Reward.Input("reward", optional=True,
                                       tooltip="Optional reward: scores are written into the text output."),
                    io.String.Input("prompt", default="", optional=True,
                                    tooltip="The prompt's text, for rewards that read it (CLIP score, digit "
                                            "probability); the conditioning does not carry it.")],
            outputs=[io.Image.Output(display_name="images", tooltip="The G members of the group, decoded."),
                     io.String.Output(display_name="scores", tooltip="The group's settings and, with a reward, each "
                                                                     "member's score, mean and std.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, latent, sigmas, group_size, branch_step, cfg, eta, tau,
                diffusion="flow_grpo", seed=0, reward=None, prompt="") -> io.NodeOutput:
        import comfy.sample
        import comfy.samplers

        plan_for(sigmas, eta, tau, [branch_step], diffusion)  # a bad step or grid fails before sampling
        samples = latent["samples"][:1].repeat(group_size, *[1] * (latent["samples"].ndim - 1))
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        sampler = comfy.samplers.KSAMPLER(sample_egrpo, extra_options={
            "eta": eta, "tau": tau, "diffusion": diffusion, "seed": seed, "branch_step": branch_step, "active": None})
        noise = comfy.sample.prepare_noise(samples, seed)
        out = guider.sample(noise, samples, sampler, sigmas, seed=seed)
        images = vae.decode(out)
        if images.ndim == 5:  # video VAEs: [B, T, H, W, C] -> first frame
            images = images[:, 0]
        text = f"group of {group_size}, branch at step {branch_step}"
        if reward:
            from .reward_nodes import score_images

            scores = score_images(reward, images, [prompt] * images.shape[0])
            text += "\n" + "\n".join(f"member {i}: {s:.4f}" for i, s in enumerate(scores.tolist()))
            text += f"\nmean {scores.mean():.4f}  std {scores.std():.4f}"
        return io.NodeOutput(images, text)


NODES = [EntropyPlanNode, SamplerNode, GroupPreviewNode]
