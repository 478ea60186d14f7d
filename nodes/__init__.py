"""ComfyUI nodes of the E-GRPO pack (V3 schema). Thin: validate inputs, call egrpo_backend, format outputs.

Only `comfy_api` is imported at module level; ComfyUI's other modules are reached through
comfy_glue.py, so these modules import (and their tests run) with comfy_api faked.
"""

from __future__ import annotations


def all_nodes() -> list:
    from . import plan_nodes, prompt_nodes, reward_nodes, train_nodes

    return [*plan_nodes.NODES, *prompt_nodes.NODES, *reward_nodes.reward_nodes(), *train_nodes.NODES]
