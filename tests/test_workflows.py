"""Every workflow in workflows/ is UI-format JSON whose node types exist (ours, with comfy_api FAKED,
or the ComfyUI core types listed here) and whose links agree with both ends."""

import json
import sys
from pathlib import Path

import pytest

import comfy_fakes

comfy_fakes.install()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodes import all_nodes  # noqa: E402

# ComfyUI core node types the workflows use (all in ComfyUI 0.33's nodes.py / comfy_extras).
CORE = {"UNETLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance", "EmptySD3LatentImage",
        "BasicScheduler", "KSamplerSelect", "SamplerCustom", "LoraLoaderModelOnly", "LoraLoader", "KSampler",
        "VAEDecode", "SaveImage", "PreviewImage", "PreviewAny", "ConditioningZeroOut"}
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
OURS = {s.node_id: s for s in (n.define_schema() for n in all_nodes())}


def test_the_promised_workflows_exist():
    names = {p.stem for p in WORKFLOWS}
    assert {"egrpo_train_default_cpu", "egrpo_train_flux_lora", "egrpo_sample_with_lora", "egrpo_sampler_vs_euler",
            "egrpo_entropy_plan"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_consistent(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    for n in nodes.values():
        assert n["type"] in OURS or n["type"] in CORE, f"unknown node type {n['type']}"
        if n["type"] in OURS:  # our sockets exist in the schema with the same type
            schema = {i.id: i.io_type for i in OURS[n["type"]].inputs}
            for i in n["inputs"]:
                assert schema.get(i["name"]) == i["type"], (n["type"], i["name"])
            assert [o["type"] for o in n["outputs"]] == [o.io_type for o in OURS[n["type"]].outputs]
    ids = [link[0] for link in wf["links"]]
    assert len(ids) == len(set(ids)) and wf["last_link_id"] >= max(ids, default=0)
    for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert lid in out["links"] and inp["link"] == lid
        assert out["type"] == typ and inp["type"] in (typ, "*"), (path.stem, lid, out["type"], inp["type"])
    linked_in = {(n["id"], i["link"]) for n in nodes.values() for i in n["inputs"] if i["link"] is not None}
    assert linked_in == {(dst, lid) for lid, _, _, dst, _, _ in wf["links"]}  # no dangling input links
    for n in nodes.values():
        for o in n["outputs"]:
            for lid in o["links"] or []:
                assert lid in ids


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "COMBO", "BOOLEAN"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_line_up_with_the_schema(path):
    """The frontend adds a control_after_generate widget after every INT named seed / noise_seed, so
    widgets_values holds one extra entry there; a missing one shifts every later value."""
    for n in json.loads(path.read_text())["nodes"]:
        if n["type"] not in OURS:
            continue
        inputs = OURS[n["type"]].inputs
        expected = sum(i.io_type in WIDGET_TYPES for i in inputs)
        expected += sum(i.io_type == "INT" and i.id in ("seed", "noise_seed") for i in inputs)
        assert len(n.get("widgets_values", [])) == expected, (path.stem, n["type"])


def _widget_value_fits(port, value) -> bool:
    if port.io_type == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if port.io_type == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if port.io_type == "STRING":
        return isinstance(value, str)
    if port.io_type == "BOOLEAN":
        return isinstance(value, bool)
    return value in port.kwargs.get("options", [value])  # COMBO


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_widget_value_fits_its_widget(path):
    """Position by position (the seed's control value skipped): a value inserted or dropped in the middle,
    e.g. the Train node's gpus after device, shows as a value of the wrong type or an unknown option."""
    for n in json.loads(path.read_text())["nodes"]:
        if n["type"] not in OURS:
            continue
        values = list(n.get("widgets_values", []))
        for port in (i for i in OURS[n["type"]].inputs if i.io_type in WIDGET_TYPES):
            value = values.pop(0)
            assert _widget_value_fits(port, value), (path.stem, n["type"], port.id, value)
            if port.io_type == "INT" and port.id in ("seed", "noise_seed"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), (path.stem, port.id)
