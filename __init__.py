"""ComfyUI-EGRPO: E-GRPO sampling, entropy plans and background LoRA training for flow models.

ComfyUI loads this file as the pack's entry point (V3 API: `comfy_entrypoint`); the browser
extension is everything under ./web. The training engine (egrpo_backend/) never imports ComfyUI.
"""

from __future__ import annotations

import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # `import egrpo_backend` from the nodes (ComfyUI does not add pack folders)
    sys.path.append(_HERE)

WEB_DIRECTORY = "./web"
log = logging.getLogger("egrpo")

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # imported outside ComfyUI (pytest collects this folder as a package): nothing to register
    ComfyExtension = None

if ComfyExtension is not None and __package__:  # no package: imported as a plain file (pytest, a folder name with "-")
    from .nodes import all_nodes
    from .nodes import comfy_glue

    class EGRPOExtension(ComfyExtension):
        async def on_load(self) -> None:
            """Register the /egrpo/ routes; watch a job a previous ComfyUI's child still runs, restart the
            saved queue, and list jobs that can be resumed by hand."""
            from .nodes.job_manager import get_manager
            from .nodes.routes import add_routes

            comfy_glue.reward_dirs()  # registers models/egrpo_rewards with ComfyUI's folder list
            routes = comfy_glue.prompt_server_routes()
            if routes is not None:
                add_routes(routes, get_manager)
            try:
                manager = get_manager()
                resumable = manager.scan()
                if manager.status_line():
                    log.info("E-GRPO: %s", manager.status_line())
                if resumable:
                    log.info("E-GRPO: %d unfinished job(s) can be resumed from the E-GRPO panel: %s",
                             len(resumable), ", ".join(resumable))
            except OSError as e:
                log.warning("E-GRPO: cannot read the jobs folder: %s", e)

        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return all_nodes()

    async def comfy_entrypoint() -> EGRPOExtension:
        return EGRPOExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
