"""Workflows in API form, and ComfyUI's input validation of them, for the old-graphs tests.

`to_api(workflow, object_info)` turns a UI-format workflow (workflows/*.json) into the API form the
frontend posts (graphToPrompt): each node's widget values, in its inputs' order (required, then
optional), named; links as [source id, slot]; the frontend's extra `control_after_generate` value after
an INT seed skipped. `object_info` is the server's /api/object_info (tests/comfy_integration) or, with
ComfyUI faked (CI), `object_info_from_schemas(...)` built from the pack's own schemas.

`validation_errors(prompt, object_info, classes)` repeats what ComfyUI's execution.validate_inputs
checks for one node's values (a required input present, a combo value in its list, a number in its
range, a link to a node that exists), including its rule that an input named in the node's own
`validate_inputs` skips the list / range check and is judged by that function instead.
"""

from __future__ import annotations

import inspect

WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend adds a control_after_generate widget after these


def _kind(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def object_info_from_schemas(schemas) -> dict:
    """/api/object_info's input part for V3 schemas (ComfyUI faked: comfy_fakes records their arguments)."""
    info = {}
    for s in schemas:
        req, opt = {}, {}
        for i in s.inputs:
            extra = {k: v for k, v in i.kwargs.items() if k in ("min", "max", "default", "options", "control_after_generate")}
            spec = [list(extra.pop("options")) if i.io_type == "COMBO" else i.io_type, extra]
            (opt if i.optional else req)[i.id] = spec
        info[s.node_id] = {"input": {"required": req, "optional": opt},
                           "input_order": {"required": list(req), "optional": list(opt)}}
    return info


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API form of a UI-format workflow; node types missing from object_info keep no inputs."""
    prompt = {}
    links = {lk[0]: lk for lk in workflow.get("links", [])}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        inputs = {}
        if info is not None:
            linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
            values = list(node.get("widgets_values") or [])
            order = info["input_order"]
            specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
            for name in order.get("required", []) + order.get("optional", []):
                spec = specs[name]
                if _kind(spec) in WIDGET_KINDS and values:
                    inputs[name] = values.pop(0)
                    if _kind(spec) == "INT" and (name in SEED_NAMES or _options(spec).get("control_after_generate")):
                        values.pop(0) if values and values[0] in ("fixed", "increment", "decrement", "randomize") else None
                if name in linked:
                    _, src, slot, *_ = linked[name]
                    inputs[name] = [str(src), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def validation_errors(prompt: dict, object_info: dict, classes: dict, only=lambda class_type: True) -> list[str]:
    """ComfyUI's per-input checks for the nodes `only` selects; classes: node id -> class (its validate_inputs)."""
    errors = []
    for nid, node in prompt.items():
        ct = node["class_type"]
        if not only(ct):
            continue
        if ct not in object_info:
            errors.append(f"node {nid}: unknown node type {ct}")
            continue
        info = object_info[ct]["input"]
        cls = classes.get(ct)
        custom = getattr(cls, "validate_inputs", None) if cls is not None else None
        custom_args = set(inspect.getfullargspec(custom).args) if custom is not None else set()
        for name, spec in {**info.get("required", {}), **info.get("optional", {})}.items():
            where = f"node {nid} {ct}.{name}"
            if name not in node["inputs"]:
                if name in info.get("required", {}):
                    errors.append(f"{where}: required input is missing")
                continue
            value = node["inputs"][name]
            if isinstance(value, list):
                if str(value[0]) not in prompt:
                    errors.append(f"{where}: links to node {value[0]}, which is not in the graph")
                continue
            if name in custom_args:
                continue  # judged by the node's validate_inputs below, as ComfyUI does
            kind, opts = _kind(spec), _options(spec)
            if kind == "COMBO":
                options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
                if value not in options:
                    errors.append(f"{where}: {value!r} not in {options}")
            elif kind in ("INT", "FLOAT"):
                if ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                    errors.append(f"{where}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
        if custom_args:
            args = {a: node["inputs"][a] for a in custom_args if a in node["inputs"] and a != "cls"}
            verdict = custom(**args)
            if verdict is not True:
                errors.append(f"node {nid} {ct}: validate_inputs: {verdict}")
    return errors
