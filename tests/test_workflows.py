"""Every workflow in workflows/ is UI-format JSON whose node types exist (ours, with comfy_api FAKED,
or the ComfyUI core types listed here) and whose links agree with both ends."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import comfy_fakes

comfy_fakes.install()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodes import all_nodes  # noqa: E402

# ComfyUI core node types the workflows use (all in ComfyUI 0.33's nodes.py / comfy_extras).
CORE = {"UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance", "EmptySD3LatentImage",
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
# The Train node's `length` (frames) comes with the comfy video policy, as its last widget (so saved graphs
# keep their order). Until this schema has it, a workflow that names it in widgets_values_named keeps it last.
PENDING_LENGTH = SimpleNamespace(id="length", io_type="INT", kwargs={})


def widget_ports(n) -> list:
    """The widget inputs of our node n in the order the frontend fills them from widgets_values."""
    ports = [i for i in OURS[n["type"]].inputs if i.io_type in WIDGET_TYPES]
    ids = [p.id for p in ports]
    if n["type"] == "EGRPOTrainLora" and "length" in n.get("widgets_values_named", {}) and "length" not in ids:
        ports.append(PENDING_LENGTH)
    return ports


def widget_names(n) -> list[str]:
    """widgets_values' names, position by position (the seed's control value has its own widget)."""
    names = []
    for port in widget_ports(n):
        names.append(port.id)
        if port.io_type == "INT" and port.id in ("seed", "noise_seed"):
            names.append("control_after_generate")
    return names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_line_up_with_the_schema(path):
    """The frontend adds a control_after_generate widget after every INT named seed / noise_seed, so
    widgets_values holds one extra entry there; a missing one shifts every later value."""
    for n in json.loads(path.read_text())["nodes"]:
        if n["type"] not in OURS:
            continue
        assert len(n.get("widgets_values", [])) == len(widget_names(n)), (path.stem, n["type"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_named_widget_values_agree_with_their_positions(path):
    """widgets_values_named (what the frontend restores by name when "Restore widget values by name" is
    on) holds the same values as widgets_values read position by position."""
    for n in json.loads(path.read_text())["nodes"]:
        if n["type"] in OURS and "widgets_values_named" in n:
            assert dict(zip(widget_names(n), n["widgets_values"], strict=True)) == n["widgets_values_named"], n["type"]


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
        for port in widget_ports(n):
            value = values.pop(0)
            assert _widget_value_fits(port, value), (path.stem, n["type"], port.id, value)
            if port.io_type == "INT" and port.id in ("seed", "noise_seed"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), (path.stem, port.id)


VIDEO = {"egrpo_train_wan21_lora": ("CLIPLoader", "wan"), "egrpo_train_wan22_5b_lora": ("CLIPLoader", "wan"),
         "egrpo_train_hunyuan_video_lora": ("DualCLIPLoader", "hunyuan_video")}


@pytest.mark.parametrize("stem", sorted(VIDEO))
def test_video_workflows_load_their_text_encoder_and_score_frames(stem):
    """Wan 2.x and HunyuanVideo: core loaders with the text-encoder type ComfyUI needs, a length of
    4n + 1 frames (the video VAEs' temporal stride of 4), and rewards whose frames the clip has."""
    wf = json.loads((ROOT / "workflows" / f"{stem}.json").read_text())
    by_type = {n["type"]: n for n in wf["nodes"]}
    loader, clip_type = VIDEO[stem]
    assert by_type[loader]["widgets_values"][-2] == clip_type and "UNETLoader" in by_type and "VAELoader" in by_type
    train = by_type["EGRPOTrainLora"]["widgets_values_named"]
    assert train["source"] == "comfy" and train["length"] % 4 == 1 and train["length"] > 1
    from nodes.reward_nodes import frames_option

    rewards = [n for n in wf["nodes"] if n["type"].startswith("EGRPOReward_")]
    assert "EGRPOReward_temporal_consistency" in {n["type"] for n in rewards}
    for n in rewards:
        assert frames_option(n["type"], n["widgets_values"][1]).get("frames", 1) <= train["length"]
