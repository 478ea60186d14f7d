"""Old graphs keep loading (docs/comfyui.md, "Old graphs"), with ComfyUI faked (CI).

Every value a released version of a node accepted still validates and means today's choice. The only
input whose accepted values narrowed in the nodes' history (`git log -p -- nodes/`) is the Prompt List's
`file`: free text in the first release (0814b65: a name in input/, an absolute path, "" = none), a choice
among input/*.txt since c1453ac. Inputs added since (Train LoRA's width, height, gpus) are optional with
defaults, so graphs without them load. Checked here: each workflow in workflows/ in its API form and the
API graphs of earlier releases (tests/fixtures/old_graphs/) pass ComfyUI's input checks
(tests/workflow_api.py) against today's schemas, and the old values run with today's meaning.
"""

import json
import os
import sys
from pathlib import Path

import pytest

import comfy_fakes

comfy_fakes.install()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodes import all_nodes, prompt_nodes  # noqa: E402
from test_nodes import fake_folder_paths  # noqa: E402
from workflow_api import object_info_from_schemas, to_api, validation_errors  # noqa: E402

CLASSES = {n.define_schema().node_id: n for n in all_nodes()}
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "old_graphs").glob("*/*.api.json"))
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
PromptList = prompt_nodes.PromptListNode


def ours(class_type: str) -> bool:
    return class_type.startswith("EGRPO")


def object_info():
    return object_info_from_schemas([c.define_schema() for c in CLASSES.values()])


def test_there_are_old_graphs_and_one_uses_the_old_empty_file():
    assert len(FIXTURES) >= 6
    files = [n["inputs"]["file"] for p in FIXTURES for n in json.loads(p.read_text()).values()
             if n["class_type"] == "EGRPOPromptList"]
    assert "" in files, files


@pytest.mark.parametrize("path", WORKFLOWS + FIXTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_api_graph_validates_against_todays_schemas(path, tmp_path, monkeypatch):
    fake_folder_paths(monkeypatch, tmp_path)
    info = object_info()
    graph = json.loads(path.read_text())
    prompt = graph if path.name.endswith(".api.json") else to_api(graph, info)
    errors = validation_errors(prompt, info, CLASSES, only=ours)
    assert not errors, "\n".join(errors)


def test_old_file_values_mean_todays_choice(tmp_path, monkeypatch):
    inp = fake_folder_paths(monkeypatch, tmp_path)
    (inp / "sub").mkdir()
    (inp / "sub" / "p.txt").write_text("a handwritten digit one\n")
    (tmp_path / "outside.txt").write_text("a handwritten digit two\n")
    for none in ("", "   ", None, "(none)"):  # "" was the first release's "no file"
        assert PromptList.validate_inputs(file=none) is True
        assert PromptList.execute("x", none).args == (["x"], 1)
    for same in ("sub/p.txt", " sub/p.txt ", str(inp / "sub" / "p.txt")):  # a name in input/, or its absolute path
        assert PromptList.validate_inputs(file=same) is True
        assert PromptList.execute("x", same).args == (["x", "a handwritten digit one"], 2)
    for bad in (str(tmp_path / "outside.txt"), "../outside.txt", "missing.txt"):
        verdict = PromptList.validate_inputs(file=bad)
        assert isinstance(verdict, str) and verdict, verdict
        with pytest.raises(ValueError):
            PromptList.execute("x", bad)
    assert "copy the file there" in PromptList.validate_inputs(file=str(tmp_path / "outside.txt"))


def test_the_validator_refuses_what_comfyui_refuses(tmp_path, monkeypatch):
    """The checker itself is not blind: a value outside a list or range, a missing input, a dangling link."""
    fake_folder_paths(monkeypatch, tmp_path)
    info = object_info()
    prompt = json.loads((ROOT / "tests/fixtures/old_graphs/0814b65/prompt_list_cpu_training.api.json").read_text())
    prompt["3"]["inputs"].update(preset="no_such_preset", iterations=0)
    del prompt["3"]["inputs"]["name"]
    prompt["4"]["inputs"]["job"] = ["99", 0]
    prompt["1"]["inputs"]["file"] = "/etc/passwd"
    errors = "\n".join(validation_errors(prompt, info, CLASSES, only=ours))
    for expected in ("preset: 'no_such_preset' not in", "iterations: 0 outside", "name: required input is missing",
                     "node 99", "outside ComfyUI's input folder"):
        assert expected in errors, errors


def test_a_link_leading_outside_the_input_folder_is_not_offered(tmp_path, monkeypatch):
    """A file the node would refuse is not in its dropdown: a link in input/ to a file outside it."""
    inp = fake_folder_paths(monkeypatch, tmp_path)
    (tmp_path / "secret.txt").write_text("outside\n")
    (inp / "real.txt").write_text("a handwritten digit one\n")
    (inp / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (inp / "alias.txt").symlink_to(inp / "real.txt")  # a link that stays inside is fine
    os.symlink(tmp_path, inp / "outdir")  # a linked folder that leads outside: none of its files
    options = next(i for i in PromptList.define_schema().inputs if i.id == "file").kwargs["options"]
    assert options == ["(none)", "alias.txt", "real.txt"], options
    with pytest.raises(ValueError):
        PromptList.execute("x", "escape.txt")
