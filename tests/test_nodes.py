"""Node-layer tests with ComfyUI's modules FAKED (tests/comfy_fakes.py): no ComfyUI is installed in CI.

The nodes' `execute` is called directly, as ComfyUI's own node tests do; the sampler function is
driven with a fake flow model that returns a fixed x0, so its arithmetic is checked exactly.
"""

import re
import sys
from pathlib import Path

import pytest
import torch

import comfy_fakes

comfy_fakes.install()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nodes import all_nodes, plan_nodes, prompt_nodes, reward_nodes, sampling, train_nodes  # noqa: E402
from egrpo_backend.method.schedule import shifted_sigmas  # noqa: E402


def test_every_node_has_category_description_and_tooltips():
    """Faked comfy_api: every schema sits under E-GRPO, says what it is for, and every input and output
    carries a tooltip."""
    schemas = [n.define_schema() for n in all_nodes()]
    ids = [s.node_id for s in schemas]
    assert len(ids) == len(set(ids))
    for s in schemas:
        assert s.category.startswith("E-GRPO"), s.node_id
        assert s.description, f"{s.node_id} has no description"
        for i in s.inputs:
            assert i.tooltip, f"{s.node_id}.{i.id} has no tooltip"
        for k, o in enumerate(s.outputs):
            assert o.tooltip, f"{s.node_id} output {o.display_name or k} has no tooltip"
    assert {"EGRPOSampler", "EGRPOEntropyPlan", "EGRPOGroupPreview", "EGRPOPromptList", "EGRPOTrainLora",
            "EGRPOJob", "EGRPOCombineRewards", "EGRPOReward_digit_probability"} <= set(ids)


def test_entropy_plan_node_outputs_chart_table_and_plan():
    """Faked comfy_api: a shifted 16-step grid gives an RGB chart, the backend's table and the plan."""
    sigmas = torch.tensor(shifted_sigmas(16, 3.0))
    out = plan_nodes.EntropyPlanNode.execute(sigmas, 0.7, 2.2, "0-7")
    chart, table, plan = out.args
    assert chart.ndim == 4 and chart.shape[0] == 1 and chart.shape[-1] == 3 and 0 <= chart.min() <= chart.max() <= 1
    assert table == plan.table() and plan.active == list(range(8))


def test_entropy_plan_node_rejects_non_flow_sigmas():
    """Faked comfy_api: SD1.5-style sigmas (> 1) raise a message naming the fix."""
    with pytest.raises(ValueError, match="flow-matching"):
        plan_nodes.EntropyPlanNode.execute(torch.tensor([14.6, 3.0, 0.0]), 0.7, 2.2, "0")


def test_sampler_node_returns_ksampler_with_options():
    """Faked comfy.samplers.KSAMPLER: the node wraps sample_egrpo with the widget values."""
    sampler = plan_nodes.SamplerNode.execute(0.5, 1.0, "0-2", "flow_grpo", 7).args[0]
    assert sampler.sampler_function is sampling.sample_egrpo
    assert sampler.extra_options == {"eta": 0.5, "tau": 1.0, "active": "0-2", "diffusion": "flow_grpo", "seed": 7}
    with pytest.raises(ValueError, match="active"):
        plan_nodes.SamplerNode.execute(0.5, 1.0, "zero", "flow_grpo", 7)


class FixedX0Model:
    """A fake denoiser: always predicts the same x0; records the sigmas it was called at."""

    def __init__(self, x0):
        self.x0, self.calls = x0, []

    def __call__(self, x, sigma, **kw):
        self.calls.append(float(sigma[0]))
        return self.x0.expand_as(x)


def test_sample_egrpo_all_ode_reaches_x0_exactly():
    """With no SDE steps active, Euler on v = (x - x0) / sigma lands on x0 (flow ODE of a fixed x0)."""
    x0 = torch.full((1, 4, 8, 8), 0.3)
    sigmas = torch.tensor(shifted_sigmas(6, 3.0))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = FixedX0Model(x0)
    # Only the last step is "active"; it lands on sigma = 0, so it returns x0 and adds no noise.
    out = sampling.sample_egrpo(model, noise * sigmas[0], sigmas, eta=0.7, tau=0.0, active="5", seed=0)
    assert torch.allclose(out, x0, atol=1e-6)
    assert len(model.calls) == 6


def test_sample_egrpo_merges_steps_and_is_seeded():
    """A merged SDE step skips the grid points it spans; the same seed gives the same sample."""
    x0 = torch.zeros(2, 1, 4, 4)
    sigmas = torch.tensor(shifted_sigmas(8, 3.0))
    plan = sampling.plan_for(sigmas, 0.7, 2.2, "0-3")
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    m1, m2 = FixedX0Model(x0), FixedX0Model(x0)
    a = sampling.sample_egrpo(m1, x.clone(), sigmas, eta=0.7, tau=2.2, active="0-3", seed=5)
    b = sampling.sample_egrpo(m2, x.clone(), sigmas, eta=0.7, tau=2.2, active="0-3", seed=5)
    assert torch.equal(a, b)
    expected_calls, i = [], 0
    while i < plan.num_steps:
        expected_calls.append(plan.sigmas[i])
        i = plan.target(i) if plan.steps[i].kind == "sde" else i + 1
    assert m1.calls == pytest.approx(expected_calls)


def test_group_preview_branch_shares_prefix():
    """branch_step: members start from member 0's noise and differ only through the branch noise."""
    sigmas = torch.tensor(shifted_sigmas(6, 3.0))
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))

    def model(x, sigma, **kw):  # x0 depends on the state, so a branch changes the result
        return 0.5 * x

    out = sampling.sample_egrpo(model, x, sigmas, eta=0.7, tau=0.0, seed=0, branch_step=5)  # branch on the last step
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0], out[2])  # lands on sigma 0: no branch noise
    out = sampling.sample_egrpo(model, x, sigmas, eta=0.7, tau=0.0, seed=0, branch_step=0)
    assert not torch.allclose(out[0], out[1])


def fake_folder_paths(monkeypatch, tmp_path):
    """A faked folder_paths whose input folder is tmp_path/input (what ComfyUI's module offers the pack)."""
    import types as pytypes

    fp = pytypes.ModuleType("folder_paths")
    (tmp_path / "input").mkdir(exist_ok=True)
    fp.get_input_directory = lambda: str(tmp_path / "input")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return tmp_path / "input"


def test_prompt_list_parses_text_and_a_file_chosen_from_the_input_folder(tmp_path, monkeypatch):
    """Faked comfy_api and folder_paths: the file is a choice among input/*.txt; other paths are refused."""
    inp = fake_folder_paths(monkeypatch, tmp_path)
    (inp / "sub").mkdir()
    (inp / "sub" / "p.txt").write_text("a handwritten digit one\n# comment\n\na handwritten digit two\n")
    (inp / "image.png").write_bytes(b"not a prompt file")
    (tmp_path / "secret.txt").write_text("outside the input folder")
    schema = prompt_nodes.PromptListNode.define_schema()
    file_input = next(i for i in schema.inputs if i.id == "file")
    assert file_input.io_type == "COMBO" and file_input.kwargs["options"] == ["(none)", "sub/p.txt"]
    out = prompt_nodes.PromptListNode.execute("a handwritten digit three\n\n", "sub/p.txt")
    assert out.args == (["a handwritten digit three", "a handwritten digit one", "a handwritten digit two"], 3)
    assert prompt_nodes.PromptListNode.execute("x", "(none)").args == (["x"], 1)
    with pytest.raises(ValueError, match="empty"):
        prompt_nodes.PromptListNode.execute("  \n# only a comment", "(none)")
    for bad in (str(tmp_path / "secret.txt"), "../secret.txt", "image.png", "missing.txt"):
        with pytest.raises(ValueError, match="not allowed|not a .txt file|outside ComfyUI's input folder"):
            prompt_nodes.PromptListNode.execute("x", bad)


def test_reward_nodes_and_combine():
    """Faked comfy_api: reward nodes emit spec entries; combine concatenates and refuses duplicates."""
    nodes = {n.define_schema().node_id: n for n in reward_nodes.reward_nodes()}
    a = nodes["EGRPOReward_jpeg_compressibility"].execute(0.5).args[0]
    b = nodes["EGRPOReward_digit_probability"].execute(1.0).args[0]
    combined = reward_nodes.CombineRewardsNode.execute(a, b).args[0]
    assert combined == [{"name": "jpeg_compressibility", "weight": 0.5}, {"name": "digit_probability", "weight": 1.0}]
    with pytest.raises(ValueError, match="twice"):
        reward_nodes.CombineRewardsNode.execute(a, a)


def test_model_reward_node_points_at_the_registered_reward_folder(tmp_path, monkeypatch):
    """Faked comfy_api and a faked folder_paths: a model-based reward node registers
    models/egrpo_rewards and passes it to the job spec as reward_dir; built-in rewards get none."""
    import types as pytypes

    fp = pytypes.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {}
    fp.add_model_folder_path = lambda name, path: fp.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    nodes = {n.define_schema().node_id: n for n in reward_nodes.reward_nodes()}
    entry = nodes["EGRPOReward_hpsv2"].execute(0.5).args[0][0]
    assert entry == {"name": "hpsv2", "weight": 0.5, "reward_dir": [str(tmp_path / "models" / "egrpo_rewards")]}
    assert "reward_dir" not in nodes["EGRPOReward_jpeg_compressibility"].execute(1.0).args[0][0]
    # The entry is a valid job-spec reward: the spec validates it.
    from egrpo_backend.config import JobSpec

    JobSpec.from_dict({"model": {"source": "default"}, "rewards": [entry]})


def test_score_images_node():
    """Faked comfy_api: the JPEG reward scores a flat image above a noisy one."""
    flat = torch.full((1, 32, 32, 3), 0.5)
    noisy = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    text = reward_nodes.ScoreImagesNode.execute(torch.cat([flat, noisy]), [{"name": "jpeg_compressibility"}], "").args[0]
    s0, s1 = (float(line.split(": ")[1]) for line in text.splitlines())
    assert s0 > s1


def test_train_node_offers_the_nft_presets_and_their_spec_validates():
    """The preset combo is algorithms.PRESETS, DiffusionNFT included; the node's widgets (tau, eta,
    active, clip_range) are accepted and ignored by loss 'nft'."""
    from egrpo_backend.config import JobSpec

    preset = next(i for i in train_nodes.TrainLoraNode.define_schema().inputs if i.id == "preset")
    assert {"nft", "nft_multi_reward"} <= set(preset.kwargs["options"])
    spec = train_nodes.build_spec(source="default", prompts=None, **{**TRAIN, "preset": "nft"})
    assert JobSpec.from_dict(spec).algorithm.loss == "nft"


def test_train_spec_and_job_id_are_deterministic():
    """The job id hashes the spec: same inputs, same id; a new seed, a new id."""
    kw = dict(source="default", name="t", reward=[{"name": "digit_probability", "weight": 1.0}], prompts=None,
              preset="egrpo", iterations=2, group_size=2, prompts_per_iteration=1, steps=6, shift=3.0, eta=0.7,
              tau=2.2, active="0-1", lr=1e-3, clip_range=0.2, lora_rank=4, seed=0)
    s1, s2, s3 = train_nodes.build_spec(**kw), train_nodes.build_spec(**kw), train_nodes.build_spec(**{**kw, "seed": 1})
    assert train_nodes.job_id_for("t", s1, {}) == train_nodes.job_id_for("t", s2, {})
    assert train_nodes.job_id_for("t", s1, {}) != train_nodes.job_id_for("t", s3, {})
    over = train_nodes.build_spec(**kw, overrides='{"train": {"minibatches": 4}}')
    assert over["train"]["minibatches"] == 4 and over["train"]["iterations"] == 2
    with pytest.raises(ValueError, match="JSON"):
        train_nodes.build_spec(**kw, overrides="{nope")


# --- E-GRPO Train LoRA: everything checkable is checked in the node, before a job folder exists ---------
class RecordingManager:
    """Stands in for the job manager: the real job_dir rules, and submit records the spec (no child)."""

    def __init__(self, root):
        from nodes.job_manager import JobManager

        self._real = JobManager(root)
        self.root, self.poll_seconds, self.submitted = self._real.root, 0.01, []

    def job_dir(self, job_id):
        return self._real.job_dir(job_id)

    def submit(self, spec, job_id, gpus=1):
        self.submitted.append((job_id, spec))
        self.gpus = gpus
        return job_id


@pytest.fixture
def recording_manager(tmp_path):
    from nodes import job_manager

    m = RecordingManager(tmp_path / "jobs")
    job_manager.set_manager(m)
    yield m
    job_manager.set_manager(None)


class Recorded:
    """A MODEL / VAE as a core loader returns it: the call is recorded as cached_patcher_init."""

    def __init__(self, loader, path):
        def fn(*a):
            pass

        fn.__name__ = loader
        self.cached_patcher_init = (fn, (str(path),))


class FakeClip:
    """encode_from_tokens_scheduled as ComfyUI's CLIP returns it: [[cond, {"pooled_output": ...}]]."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        g = torch.Generator().manual_seed(len(tokens))
        return [[torch.randn(1, 4, 8, generator=g), {"pooled_output": torch.randn(1, 8, generator=g)}]]


TRAIN = dict(reward=[{"name": "jpeg_compressibility", "weight": 1.0}], name="t", preset="egrpo", iterations=2,
             group_size=2, prompts_per_iteration=1, steps=6, shift=3.0, eta=0.7, tau=2.2, active="0-1", lr=1e-3,
             clip_range=0.2, lora_rank=4, seed=0)


def comfy_inputs(tmp_path):
    (tmp_path / "flux.safetensors").write_bytes(b"x")
    (tmp_path / "ae.safetensors").write_bytes(b"x")
    return dict(source="comfy", prompts=["a red fox", "a lighthouse"], clip=FakeClip(),
                model=Recorded("load_diffusion_model", tmp_path / "flux.safetensors"),
                vae=Recorded("load_vae", tmp_path / "ae.safetensors"))


def no_job_folder(manager):
    return not manager.root.exists() or not any(manager.root.iterdir())


def test_train_node_comfy_spec_uses_width_height_inputs_and_checkpoints_by_default(recording_manager, tmp_path):
    """source = comfy: width/height are inputs that land in model.comfy, and the spec the node writes
    for a ComfyUI model resolves gradient checkpointing ON on the CPU too (Flux cannot backpropagate
    without it: in-place residual adds)."""
    from egrpo_backend.config import JobSpec

    job_id = train_nodes.TrainLoraNode.execute(**TRAIN, **comfy_inputs(tmp_path), width=256, height=384).args[1]
    (submitted_id, spec), = recording_manager.submitted
    assert submitted_id == job_id and (recording_manager.root / job_id / "node_conds").is_dir()
    comfy = spec["model"]["comfy"]
    assert (comfy["width"], comfy["height"], comfy["kind"]) == (256, 384, "diffusion_model")
    model = JobSpec.from_dict(spec).model
    assert model.gradient_checkpointing == "auto" and model.gradient_checkpointing_on(torch.device("cpu")) is True


@pytest.mark.parametrize("overrides,needle", [
    ('{"model": {"comfy": {"width": 1024}}}', "model.comfy.width, which the node sets from its width input"),
    ('{"model": {"comfy": {"height": 640, "guidance": 1}}}', "model.comfy.height, which the node sets from its height"),
    ('{"model": {"comfy": {"widht": 1024}}}', "unknown key 'model.comfy.widht'"),  # a typo is named, not dropped
    ('{"model": {"path": "/other.safetensors"}}', "model.path, which the node sets from its model input"),
    ('{"train": {"iterations": 5}}', "train.iterations, which the node sets from its iterations input"),
    ('{"model": {"family": "flux"}}', "model.family, which applies to model.source = 'diffusers' only"),
    ('{"train": {"minibatchs": 4}}', "unknown key 'train.minibatchs'"),
    ('{"train": {"minibatches": 0}}', "train.minibatches = 0 is out of range"),
    ("[1, 2]", "must be a JSON object"),
])
def test_train_node_refuses_a_bad_override_before_a_job_folder_exists(recording_manager, tmp_path, overrides, needle):
    """Every spec_overrides key is applied or refused by name in the node; nothing is written first."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        train_nodes.TrainLoraNode.execute(**TRAIN, **comfy_inputs(tmp_path), spec_overrides=overrides)
    assert no_job_folder(recording_manager) and not recording_manager.submitted


def test_train_node_applies_an_override_it_has_no_input_for(recording_manager, tmp_path):
    train_nodes.TrainLoraNode.execute(**TRAIN, **comfy_inputs(tmp_path),
                                      spec_overrides='{"model": {"gradient_checkpointing": "off"}, "train": {"minibatches": 2}}')
    (_, spec), = recording_manager.submitted
    assert spec["model"]["gradient_checkpointing"] == "off" and spec["train"]["minibatches"] == 2


@pytest.mark.parametrize("source,prompts,reward,needle", [
    ("default", ["a handwritten digit three", "a red cube"], "jpeg_compressibility", "'a red cube' names no digit"),
    ("default", ["digit 3 or 4"], "digit_probability", "names several digits"),
    ("comfy", ["a red fox"], "digit_probability", "'a red fox' names no digit"),
])
def test_train_node_refuses_prompts_the_job_cannot_use_before_a_job_folder_exists(recording_manager, tmp_path, source,
                                                                                 prompts, reward, needle):
    """The embedded digits model (and the digit reward) need one digit per prompt: refused in the node,
    with the fix, not later in the child."""
    inputs = comfy_inputs(tmp_path) if source == "comfy" else {"source": "default"}
    inputs["prompts"] = prompts
    with pytest.raises(ValueError, match=needle) as e:
        train_nodes.TrainLoraNode.execute(**{**TRAIN, "reward": [{"name": reward, "weight": 1.0}]}, **inputs)
    assert "exactly one digit" in str(e.value)
    assert no_job_folder(recording_manager) and not recording_manager.submitted


def test_train_node_refuses_eval_prompts_without_a_digit_and_a_missing_cuda(recording_manager):
    with pytest.raises(ValueError, match="eval_prompts: prompt 'a cat'"):
        train_nodes.TrainLoraNode.execute(**TRAIN, source="default", spec_overrides='{"eval_prompts": ["a cat"]}')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train_nodes.TrainLoraNode.execute(**TRAIN, source="default", device="cuda")
    assert no_job_folder(recording_manager) and not recording_manager.submitted


def test_train_node_gpus_input_validates_early_and_reaches_the_manager(recording_manager, monkeypatch):
    """gpus > 1: prompts_per_iteration must divide, CUDA needs that many devices (CPU gloo ranks need none);
    the manager gets gpus, and the id differs from the one-process job's (gpus = 1 keeps today's id)."""
    port = next(i for i in train_nodes.TrainLoraNode.define_schema().inputs if i.id == "gpus")
    assert port.io_type == "INT" and port.kwargs["default"] == 1 and port.kwargs["min"] == 1 and port.optional
    assert "torchrun" in port.tooltip and "prompts_per_iteration" in port.tooltip
    with pytest.raises(ValueError, match=r"gpus = 2 needs prompts_per_iteration divisible by 2.*got 3; set prompts_per_iteration to 4"):
        train_nodes.TrainLoraNode.execute(**{**TRAIN, "prompts_per_iteration": 3}, source="default", device="cpu", gpus=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"gpus = 2 needs 2 CUDA devices .* has 1; set gpus to 1 or less, or device to 'cpu'"):
        train_nodes.TrainLoraNode.execute(**{**TRAIN, "prompts_per_iteration": 2}, source="default", device="cuda", gpus=2)
    assert no_job_folder(recording_manager) and not recording_manager.submitted
    monkeypatch.undo()
    one = train_nodes.TrainLoraNode.execute(**{**TRAIN, "prompts_per_iteration": 2}, source="default", device="cpu")
    assert recording_manager.gpus == 1
    two = train_nodes.TrainLoraNode.execute(**{**TRAIN, "prompts_per_iteration": 2}, source="default", device="cpu", gpus=2)
    assert recording_manager.gpus == 2 and one[0] != two[0]
    (_, s1), (_, s2) = recording_manager.submitted
    assert one[0] == train_nodes.job_id_for("t", s1, {}) and s1 == s2


def test_train_node_refuses_a_model_reward_without_its_weight_files(recording_manager, tmp_path, monkeypatch):
    monkeypatch.delenv("EGRPO_REWARD_DIR", raising=False)
    reward = [{"name": "hpsv2", "weight": 1.0, "reward_dir": [str(tmp_path / "rewards")]}]
    with pytest.raises(ValueError, match="reward 'hpsv2' needs .* not found in"):
        train_nodes.TrainLoraNode.execute(**{**TRAIN, "reward": reward}, source="default")
    assert no_job_folder(recording_manager)


@pytest.mark.parametrize("tau,active", [(0.0, "0-7"), (2.2, "0-7"), (0.0, "all")])
def test_plan_chart_legend_covers_no_bar_and_no_label_is_clipped(tau, active):
    """The Entropy Plan node's chart: the legend sits outside the axes (at tau = 0 it used to cover bars)
    and every `l=` label lies inside the axes (the tallest one used to be cut by the top edge)."""
    from egrpo_backend.plots import entropy_plan_figure
    from egrpo_backend.method.schedule import build_plan

    plt, fig = entropy_plan_figure(build_plan(shifted_sigmas(16, 3.0), 0.7, tau, active))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        box = ax.get_window_extent(renderer)
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.y1 < box.y0, "the legend overlaps the plot"
        labels = [t for t in ax.texts if t.get_text().startswith("l=")]
        assert labels
        for t in labels:
            e = t.get_window_extent(renderer)
            assert box.y0 <= e.y0 and e.y1 <= box.y1, f"label {t.get_text()} at step {t.xy[0]} is clipped"
    finally:
        plt.close(fig)


def test_the_nodes_cond_cache_holds_exactly_the_texts_the_job_encodes(recording_manager, tmp_path, monkeypatch):
    """source = comfy with file-based eval prompts and a CLIP the job cannot reload (ComfyUI faked; the
    input folder is $EGRPO_INPUT_DIR): the prompts in the node's cache (node_conds) equal
    build.texts_to_encode of the job the node submits, so the child never meets a text the node did not
    encode (it once encoded the word "file")."""
    from egrpo_backend.jobs.build import texts_to_encode
    from egrpo_backend.config import JobSpec
    from egrpo_backend.policies.comfy_conds import COMFY_FAMILY
    from egrpo_backend.policies.cond_store import CondStore

    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / "held_out.txt").write_text("a snowy cabin\n# a comment\na blue bicycle\n")
    monkeypatch.setenv("EGRPO_INPUT_DIR", str(inputs))
    overrides = '{"eval_prompts": {"file": "held_out.txt"}, "eval_seeds": [7]}'
    job_id = train_nodes.TrainLoraNode.execute(**TRAIN, **comfy_inputs(tmp_path), spec_overrides=overrides).args[1]
    (_, spec), = recording_manager.submitted
    store = CondStore(lambda p: None, COMFY_FAMILY, folder=recording_manager.root / job_id / "node_conds",
                      disk_bytes=float("inf"))
    expected = texts_to_encode(JobSpec.from_dict(spec))
    assert store.files_on_disk() == len(expected) and not store.missing(expected)
    assert {"a snowy cabin", "a blue bicycle", "a red fox", "a lighthouse"} <= set(expected) and "file" not in expected
