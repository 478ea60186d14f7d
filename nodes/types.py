"""The pack's own ComfyUI socket types (values are plain Python objects, documented here)."""

from __future__ import annotations

from comfy_api.latest import io

# An egrpo_backend.method.schedule.EntropyPlan (frozen dataclass): sigmas, eta, tau, per-step kind/merge.
Plan = io.Custom("EGRPO_PLAN")
# A list of prompt strings (non-empty, stripped).
Prompts = io.Custom("EGRPO_PROMPTS")
# A list of reward specs as the job spec takes them: [{"name": ..., "weight": ...}, ...].
Reward = io.Custom("EGRPO_REWARD")
# A job id (str): the name of a folder in the jobs folder (see job_manager.py).
Job = io.Custom("EGRPO_JOB")

CATEGORY = "E-GRPO"
