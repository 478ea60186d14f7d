"""Stand-ins for ComfyUI's modules, for node tests that run without ComfyUI (CI).

Like ComfyUI's own unit tests (tests-unit/comfy_extras_test/*), the node modules are imported with
ComfyUI's modules replaced in sys.modules and the nodes' `execute` is called directly. The fakes
model only what the pack uses: the V3 schema classes record their arguments (so tests can check
ids, tooltips and categories), KSAMPLER keeps its function and options.
"""

from __future__ import annotations

import sys
import types


class _Port:
    def __init__(self, io_type, id=None, display_name=None, optional=False, tooltip=None, **kwargs):
        self.io_type, self.id, self.display_name, self.optional, self.tooltip = io_type, id, display_name, optional, tooltip
        self.kwargs = kwargs


def _make_type(io_type: str):
    class Input(_Port):
        def __init__(self, id, **kw):
            super().__init__(io_type, id, **kw)

    class Output(_Port):
        def __init__(self, id=None, **kw):
            super().__init__(io_type, id, **kw)

    return type(io_type, (), {"io_type": io_type, "Input": Input, "Output": Output})


class Schema:
    def __init__(self, node_id, display_name=None, category="", inputs=(), outputs=(), description="", **kw):
        self.node_id, self.display_name, self.category = node_id, display_name, category
        self.inputs, self.outputs, self.description, self.kwargs = list(inputs), list(outputs), description, kw


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    def __getitem__(self, i):
        return self.args[i]


class ComfyNode:
    @classmethod
    def define_schema(cls):  # pragma: no cover
        raise NotImplementedError


class ComfyExtension:
    async def on_load(self):
        pass


class KSAMPLER:
    def __init__(self, sampler_function, extra_options=None, inpaint_options=None):
        self.sampler_function, self.extra_options = sampler_function, dict(extra_options or {})


class ProgressBar:
    def __init__(self, total):
        self.total, self.values = total, []

    def update_absolute(self, value, total=None, preview=None):
        self.values.append(value)


def install() -> None:
    """Put the fakes into sys.modules (idempotent); returns nothing. Real modules are never replaced."""
    if "comfy_api.latest" in sys.modules and not getattr(sys.modules["comfy_api.latest"], "FAKE", False):
        return
    io = types.SimpleNamespace(
        ComfyNode=ComfyNode, Schema=Schema, NodeOutput=NodeOutput, Custom=_make_type,
        **{n: _make_type(t) for n, t in [
            ("Float", "FLOAT"), ("Int", "INT"), ("String", "STRING"), ("Boolean", "BOOLEAN"), ("Combo", "COMBO"),
            ("Sigmas", "SIGMAS"), ("Sampler", "SAMPLER"), ("Image", "IMAGE"), ("Model", "MODEL"), ("Clip", "CLIP"),
            ("Vae", "VAE"), ("Conditioning", "CONDITIONING"), ("Latent", "LATENT")]},
    )
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension, latest.FAKE = io, ComfyExtension, True
    api = types.ModuleType("comfy_api")
    api.latest = latest
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSAMPLER = KSAMPLER
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.interrupted = False

    def throw():
        if mm.interrupted:
            raise InterruptedError("interrupted")

    mm.throw_exception_if_processing_interrupted = throw
    comfy.samplers, comfy.utils, comfy.model_management = samplers, utils, mm
    sys.modules.update({"comfy_api": api, "comfy_api.latest": latest, "comfy": comfy, "comfy.samplers": samplers,
                        "comfy.utils": utils, "comfy.model_management": mm})


TINY_JOB = {"model": {"source": "default"}, "rewards": [{"name": "jpeg_compressibility"}],
            "algorithm": {"steps": 6, "active": "0-1", "group_size": 2}, "train": {"iterations": 3}}


def route_get(manager, path: str) -> tuple[int, bytes]:
    """GET `path` from the pack's real aiohttp routes (nodes.routes.make_app) over a test server."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from nodes.routes import make_app

    async def go():
        async with TestClient(TestServer(make_app(manager))) as client:
            resp = await client.get(path)
            return resp.status, await resp.read()

    return asyncio.run(go())
