"""What the Train node cannot carry from the graph is refused by name, before any job folder exists.

ComfyUI is FAKED here (tests/comfy_fakes.py; the MODEL is a stand-in with ModelPatcher's attribute names:
model_options, object_patches, patches, model.model_config.unet_config): these tests check the node's
decisions, not ComfyUI. The real patches (RescaleCFG, a model_function_wrapper, LoRAs, ModelSampling nodes)
are checked against a real ComfyUI in tests/comfy_integration/test_comfy_contract.py.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import comfy_fakes

comfy_fakes.install()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes import train_nodes  # noqa: E402
from egrpo_backend.config import JobSpec, SpecError  # noqa: E402
from egrpo_backend.policies.comfy_conds import read_comfy_conds, write_comfy_conds  # noqa: E402
from test_nodes import TRAIN, FakeClip, comfy_inputs, no_job_folder, recording_manager  # noqa: E402,F401


def patched(tmp_path, base=None, **attrs):
    """comfy_inputs' MODEL with ModelPatcher attributes set (a patch a node would add)."""
    inputs = comfy_inputs(tmp_path)
    model = inputs["model"]
    model.model_options = {"transformer_options": {}}
    model.object_patches, model.patches = {}, {}
    model.model = base
    for k, v in attrs.items():
        setattr(model, k, v)
    return inputs


@pytest.mark.parametrize("attrs, needle", [
    (dict(model_options={"transformer_options": {}, "model_function_wrapper": lambda f, a: f}), "model_function_wrapper"),
    (dict(model_options={"transformer_options": {}, "sampler_cfg_function": lambda a: a}), "sampler_cfg_function"),
    (dict(model_options={"transformer_options": {"patches": {"attn1_patch": [print]}}}), "transformer_options['patches']"),
    (dict(object_patches={"diffusion_model.final_layer": object()}), "object patch on 'diffusion_model.final_layer'"),
    (dict(patches={"diffusion_model.x.weight": [(1.0, (torch.zeros(1),), 1.0, None, None)]}), "not a LoRA file"),
])
def test_a_patch_the_child_cannot_carry_is_a_node_error(recording_manager, tmp_path, attrs, needle):
    with pytest.raises(ValueError, match="E-GRPO|not a LoRA") as e:
        train_nodes.TrainLoraNode.execute(**TRAIN, **patched(tmp_path, **attrs))
    assert needle in str(e.value)
    assert no_job_folder(recording_manager) and not recording_manager.submitted


def base_model(name, **unet):
    return type(name, (), {"model_config": SimpleNamespace(unet_config=unet)})()


@pytest.mark.parametrize("base, needle", [
    (base_model("QwenImage", in_channels=64, default_ref_method="index_timestep_zero"), "reference latents"),
    (base_model("Flux", in_channels=96, out_channels=16), "needs a concat image"),
    (base_model("WAN21", in_dim=36, out_dim=16, model_type="i2v"), "WAN21 (i2v) needs an image"),
])
def test_an_edit_or_image_conditioned_model_without_its_image_is_refused(recording_manager, tmp_path, base, needle):
    with pytest.raises(ValueError, match="trains on prompts only") as e:
        train_nodes.TrainLoraNode.execute(**TRAIN, **patched(tmp_path, base=base))
    assert needle in str(e.value)
    assert no_job_folder(recording_manager)


def test_text_to_image_models_pass_and_the_spec_records_the_graph(recording_manager, tmp_path):
    inputs = patched(tmp_path, base=base_model("WAN22", in_dim=48, out_dim=48, model_type="t2v"))
    train_nodes.TrainLoraNode.execute(**TRAIN, **inputs, length=33)
    (_, spec), = recording_manager.submitted
    comfy = JobSpec.from_dict(spec).model.comfy
    assert (comfy.length, comfy.loras, comfy.model_sampling, comfy.guidance) == (33, [], {}, -1.0)


class ClipWith(FakeClip):
    def __init__(self, **extra):
        self.extra = extra

    def encode_from_tokens_scheduled(self, tokens):
        (c, options), = super().encode_from_tokens_scheduled(tokens)
        return [[c, {**options, **self.extra}]]


def test_a_conditioning_value_that_cannot_be_stored_is_refused_by_name(recording_manager, tmp_path):
    inputs = {**comfy_inputs(tmp_path), "clip": ClipWith(hooks=object())}
    with pytest.raises(ValueError, match="carries 'hooks' = a object"):
        train_nodes.TrainLoraNode.execute(**TRAIN, **inputs)
    assert not recording_manager.submitted


def test_the_cond_cache_keeps_every_key_of_the_conditioning(tmp_path):
    g = torch.Generator().manual_seed(0)
    conditioning = [[torch.randn(1, 4, 8, generator=g),
                     {"pooled_output": torch.randn(1, 8, generator=g), "attention_mask": torch.ones(1, 4, dtype=torch.long),
                      "reference_latents": [torch.randn(1, 16, 2, 2, generator=g)], "guidance": 2.5,
                      "reference_latents_method": "index", "start_percent": 0.0, "area": None}],
                    [torch.randn(1, 3, 8, generator=g).to(torch.bfloat16), {"pooled_output": None}]]
    write_comfy_conds({"a fox": conditioning}, tmp_path / "c.safetensors")
    prompts, (back,) = read_comfy_conds(tmp_path / "c.safetensors")
    assert prompts == ["a fox"] and len(back) == 2
    for (c0, o0), (c1, o1) in zip(conditioning, back):
        assert torch.equal(c0, c1) and c0.dtype == c1.dtype and set(o0) == set(o1)
        for k, v in o0.items():
            if torch.is_tensor(v):
                assert torch.equal(v, o1[k]) and v.dtype == o1[k].dtype
            elif isinstance(v, list):
                assert all(torch.equal(a, b) for a, b in zip(v, o1[k]))
            else:
                assert o1[k] == v


@pytest.mark.parametrize("comfy, needle", [
    ({"length": 0}, "model.comfy.length = 0 is out of range"),
    ({"loras": [{"name": "a.safetensors"}]}, "model.comfy.loras[0]"),
    ({"model_sampling": {"kind": "eps", "shift": 1.0}}, "model.comfy.model_sampling"),
    ({"guidance": -2}, "model.comfy.guidance = -2.0 is out of range"),
])
def test_comfy_spec_fields_are_validated(comfy, needle):
    spec = {"model": {"source": "comfy", "path": "m.safetensors", "comfy": comfy},
            "rewards": [{"name": "jpeg_compressibility"}], "prompts": ["a"]}
    with pytest.raises(SpecError) as e:
        JobSpec.from_dict(spec)
    assert needle in str(e.value)


def test_frames_on_an_image_model_are_a_node_error(recording_manager, tmp_path):
    base = type("Flux", (), {"model_config": SimpleNamespace(unet_config={"in_channels": 16, "out_channels": 16}),
                             "latent_format": type("Flux", (), {"latent_channels": 16, "latent_dimensions": 2})()})()
    with pytest.raises(ValueError, match="length = 33 but this model makes images"):
        train_nodes.TrainLoraNode.execute(**TRAIN, **patched(tmp_path, base=base), length=33)
    assert no_job_folder(recording_manager)
