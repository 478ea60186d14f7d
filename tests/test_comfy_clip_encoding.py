"""The comfy path encodes training prompts in the job, not in the Train node (docs/prompts.md, "The comfy path").

ComfyUI is faked here (tests/comfy_fakes.py for the node API, a stand-in `folder_paths` module and a
stand-in CLIP that counts its encodes and records its loader the way comfy.sd.load_clip does). The same
flow against a real ComfyUI, with a real CLIPLoader file: tests/comfy_integration/test_comfy_server.py.
"""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tests import comfy_fakes

comfy_fakes.install()

from nodes import train_nodes  # noqa: E402
from tests.test_nodes import TRAIN, Recorded, recording_manager  # noqa: E402,F401 (a fixture)


class CountingClip:
    """A CLIP as ComfyUI's returns it: [[cond, {"pooled_output", "attention_mask", a scalar}]], counting encodes;
    `files` given: recorded as comfy.sd.load_clip records its CLIP (cached_patcher_init on the patcher)."""

    def __init__(self, files=None, clip_type="FLUX"):
        self.encoded: list[str] = []
        self.layer_idx, self.tokenizer_options, self.use_clip_schedule, self.apply_hooks_to_conds = None, {}, False, None
        self.patcher = SimpleNamespace(patches={}, object_patches={})
        if files:
            def load_clip_model_patcher(*a):
                pass

            self.patcher.cached_patcher_init = (load_clip_model_patcher, ([str(f) for f in files], [],
                                                                          SimpleNamespace(name=clip_type), {}))

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        self.encoded.append(tokens)
        g = torch.Generator().manual_seed(sum(tokens.encode()))
        cross = torch.cat([torch.randn(1, 3, 8, generator=g), torch.zeros(1, 2, 8)], 1)  # zero padding: trimmed, restored
        return [[cross, {"pooled_output": torch.randn(1, 8, generator=g), "attention_mask": torch.ones(1, 5),
                         "num_tokens": 3}]]


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """A stand-in ComfyUI folder_paths: models/text_encoders holds the CLIP's file."""
    te = tmp_path / "models" / "text_encoders"
    te.mkdir(parents=True)
    (te / "t5_tiny.safetensors").write_bytes(b"x")
    fp = types.ModuleType("folder_paths")
    fp.__file__ = str(tmp_path / "folder_paths.py")
    fp.get_folder_paths = lambda kind: [str(te)] if kind in ("text_encoders", "clip") else []
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setenv("EGRPO_INPUT_DIR", str(tmp_path))
    return te


TRAINING = [f"training prompt {i}" for i in range(12)]
HELD_OUT = ["a held-out cabin", "a held-out bicycle"]
OVERRIDES = json.dumps({"eval_prompts": HELD_OUT, "eval_seeds": [3], "algorithm": {"guidance_scale": 2.0,
                                                                                   "negative_prompt": "blurry"}})


def comfy_inputs(tmp_path, clip):
    (tmp_path / "flux.safetensors").write_bytes(b"x")
    (tmp_path / "ae.safetensors").write_bytes(b"x")
    return dict(source="comfy", prompts=TRAINING, clip=clip, spec_overrides=OVERRIDES,
                model=Recorded("load_diffusion_model", tmp_path / "flux.safetensors"),
                vae=Recorded("load_vae", tmp_path / "ae.safetensors"))


def test_node_records_the_clip_files_and_encodes_only_held_out_and_negative(recording_manager, comfy_folders, tmp_path):
    from egrpo_backend.config import JobSpec

    clip = CountingClip([comfy_folders / "t5_tiny.safetensors"])
    job_id = train_nodes.TrainLoraNode.execute(**TRAIN, **comfy_inputs(tmp_path, clip)).args[1]
    (_, spec), = recording_manager.submitted
    record = spec["model"]["comfy"]["clip"]
    assert record == {"loader": "clip", "paths": [str(comfy_folders / "t5_tiny.safetensors")], "type": "flux",
                      "embeddings": [], "device": "default", "layer_idx": None, "tokenizer_options": {},
                      "use_clip_schedule": False}
    JobSpec.from_dict(spec)  # the record passes the spec's own check
    assert sorted(clip.encoded) == sorted(HELD_OUT + ["blurry"])  # no training prompt encoded in the node
    assert not (recording_manager.root / job_id / "events.jsonl").exists()  # nothing to say


def test_clip_without_a_loader_record_falls_back_and_says_so(recording_manager, comfy_folders, tmp_path, caplog, monkeypatch):
    from nodes import comfy_glue

    sent = []
    monkeypatch.setattr(comfy_glue, "send_event", lambda event, data: sent.append(data))
    clip = CountingClip()  # a custom loader: no cached_patcher_init
    job_id = train_nodes.TrainLoraNode.execute(**TRAIN, **comfy_inputs(tmp_path, clip)).args[1]
    (_, spec), = recording_manager.submitted
    assert "clip" not in spec["model"]["comfy"]
    assert sorted(clip.encoded) == sorted(TRAINING + HELD_OUT + ["blurry"])  # each once
    assert any("this node encodes every training prompt itself" in r.getMessage() for r in caplog.records)
    events = [json.loads(line) for line in (recording_manager.root / job_id / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events] == ["notice"] and "custom CLIP loader" in events[0]["message"]
    # the browsers hear it too: the notice, then the node's encoding progress (the panel's encoding bar)
    assert sent[0]["type"] == "notice" and sent[-1] == {"job": job_id, "type": "encode", "done": 15, "total": 15,
                                                        "set_size": 15, "by": "node"}


def test_a_clip_file_outside_comfyuis_folders_or_a_patched_clip_is_not_reloaded(comfy_folders, tmp_path):
    from nodes.clip_files import clip_record

    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    assert clip_record(CountingClip([outside]))[0] is None
    patched = CountingClip([comfy_folders / "t5_tiny.safetensors"])
    patched.patcher.patches = {"w": [1]}  # a LoraLoader's CLIP half
    record, why = clip_record(patched)
    assert record is None and "LoraLoader" in why


def test_the_job_encodes_as_the_node_would_each_prompt_once(recording_manager, comfy_folders, tmp_path, monkeypatch):
    """The child side (egrpo_backend/policies/comfy_policy.PromptConds) with the CLIP 'reloaded' (the stand-in):
    the node's held-out conds are read, not encoded again; training prompts are encoded once each, into the
    job's bounded store, and equal what the node-side encoder stores for the same prompt."""
    from egrpo_backend.policies import comfy_clip
    from egrpo_backend.policies.comfy_policy import PromptConds

    node_clip = CountingClip([comfy_folders / "t5_tiny.safetensors"])
    job_id = train_nodes.TrainLoraNode.execute(**TRAIN, **comfy_inputs(tmp_path, node_clip)).args[1]
    (_, spec), = recording_manager.submitted
    child_clip = CountingClip()
    monkeypatch.setattr(comfy_clip, "load_clip", lambda rec: child_clip)
    conds = PromptConds(spec["model"]["comfy"]["cond_cache"], spec["model"]["comfy"]["clip"],
                        folder=tmp_path / "conds", disk_bytes=2**30, memory_bytes=2**20)
    assert conds.uncached(HELD_OUT + ["blurry"]) == [] and conds.uncached(TRAINING[:3]) == TRAINING[:3]
    progress = []
    assert conds.encode_ahead(TRAINING[:3] + HELD_OUT, lambda d, t: progress.append((d, t))) == 3
    assert child_clip.encoded == TRAINING[:3] and progress[-1] == (3, 3)
    for p in TRAINING[:3] + HELD_OUT:
        conds.get(p)
    assert child_clip.encoded == TRAINING[:3]  # read back, never encoded twice
    reference = CountingClip().encode_from_tokens_scheduled(TRAINING[0])
    (cross, options), = conds.get(TRAINING[0])
    assert torch.equal(cross, reference[0][0]) and options.keys() == reference[0][1].keys()
    assert torch.equal(options["pooled_output"], reference[0][1]["pooled_output"]) and options["num_tokens"] == 3
    conds.release()
    assert conds.encoder.clip is None


def test_the_loaders_own_object_patch_does_not_stop_a_reload(comfy_folders):
    """ComfyUI's CLIP loading itself sets the object patch manual_cast_dtype (seen on a real CLIPLoader);
    the reload sets it again, so it is no reason to encode in the node. Any other object patch is."""
    from nodes.clip_files import clip_record

    clip = CountingClip([comfy_folders / "t5_tiny.safetensors"])
    clip.patcher.object_patches = {"manual_cast_dtype": torch.float32}
    assert clip_record(clip)[0] is not None
    clip.patcher.object_patches["forward"] = object()
    assert clip_record(clip)[0] is None


def test_a_large_prompt_file_is_passed_on_as_a_reference_and_streamed_by_the_job(recording_manager, tmp_path, monkeypatch):
    """E-GRPO Prompt List with a file above STREAM_ABOVE_BYTES (lowered here to keep the test small) outputs
    {"file": path} (indexed for its count, never read whole), the Train node puts that reference in the spec
    and its hash in the job id; typed prompts beside a large file are refused, not dropped."""
    from nodes import prompt_nodes
    from tests.test_nodes import fake_folder_paths

    inp = fake_folder_paths(monkeypatch, tmp_path)
    monkeypatch.setattr(prompt_nodes, "STREAM_ABOVE_BYTES", 64)
    big = inp / "big.txt"
    big.write_text("".join(f"a handwritten digit {i % 10}\n" for i in range(50)))
    out = prompt_nodes.PromptListNode.execute("", "big.txt")
    assert out.args == ({"file": str(big)}, 50)
    with pytest.raises(ValueError, match="clear the typed prompts"):
        prompt_nodes.PromptListNode.execute("a handwritten digit three", "big.txt")
    train = {**TRAIN, "reward": [{"name": "digit_probability", "weight": 1.0}]}
    job_id = train_nodes.TrainLoraNode.execute(**train, source="default", prompts=out.args[0]).args[1]
    (_, spec), = recording_manager.submitted
    assert spec["prompts"] == {"file": str(big)}
    big.write_text("".join(f"a handwritten digit {i % 10}\n" for i in range(51)))  # changed file: another job
    assert train_nodes.TrainLoraNode.execute(**train, source="default", prompts={"file": str(big)}).args[1] != job_id


def test_a_loader_with_other_model_options_is_not_reloaded(comfy_folders):
    """A loader that passed load_clip other model options (custom operations, a dtype: e.g. a quantized-file
    node pack) would be loaded differently in the job: the node encodes instead, naming the options."""
    from nodes.clip_files import clip_record

    clip = CountingClip([comfy_folders / "t5_tiny.safetensors"])
    fn, args = clip.patcher.cached_patcher_init
    clip.patcher.cached_patcher_init = (fn, (*args[:3], {"custom_operations": object(), "load_device": "cpu"}))
    record, why = clip_record(clip)
    assert record is None and "custom_operations" in why
    clip.patcher.cached_patcher_init = (fn, (*args[:3], {"load_device": torch.device("cpu"),
                                                         "offload_device": torch.device("cpu")}))
    assert clip_record(clip)[0]["device"] == "cpu"
