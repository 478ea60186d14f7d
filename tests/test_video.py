"""Video end to end on the CPU: latents [B, C, F, H, W], log-probs over every latent dimension,
frame-averaged and temporal rewards with their `frames` option, a 2-iteration job through the job
machinery, and samples as animated WebP (docs/rewards.md, "Video"; README, "Video models")."""

import asyncio
import io
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from egrpo_backend.jobs import build, run as jobs  # noqa: E402
from egrpo_backend.config import JobSpec, SpecError  # noqa: E402
from egrpo_backend.jobs.run import create_job, read_events, run_job  # noqa: E402
from egrpo_backend.plots import VIDEO_FPS, image_grid  # noqa: E402
from egrpo_backend.rewards import WeightedRewards, build_reward, frames as reward_frames  # noqa: E402
from egrpo_backend.rewards.frames import score_frames  # noqa: E402
from egrpo_backend.rewards.jpeg import jpeg_size_kb  # noqa: E402
from egrpo_backend.method.sde import gaussian_log_prob, sde_step  # noqa: E402
from video_policy import make_video_policy  # noqa: E402

FRAMES = 3
PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]


def clips(b=2, f=5, seed=0):
    """[b, f, 3, 16, 16] random clips in [0, 1]."""
    return torch.rand(b, f, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# --- log-probs and rollouts on video latents -----------------------------------------------------------
def test_log_prob_is_the_mean_over_every_latent_dimension_of_a_video_latent():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)  # [B, C, F, H, W]
    scale = torch.tensor([0.4, 1.3]).view(2, 1, 1, 1, 1)
    by_hand = (-((x - mean) ** 2) / (2 * scale**2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, scale), by_hand)
    # the frames axis is one more dimension: folding it into the channels changes nothing
    v = torch.randn_like(x)
    video = sde_step(x, v, 0.8, 0.6, 0.5, x_next=mean)
    folded = sde_step(x.flatten(1, 2), v.flatten(1, 2), 0.8, 0.6, 0.5, x_next=mean.flatten(1, 2))
    torch.testing.assert_close(video.log_prob, folded.log_prob)


@pytest.mark.parametrize("preset", ["egrpo", "nft"])
def test_rollout_builds_video_latents_from_the_policy_latent_shape(preset):
    from egrpo_backend.lora import LoraSettings, add_lora
    from egrpo_backend.method.trainer import Trainer

    policy = make_video_policy(FRAMES)
    add_lora(policy.lora_model(), LoraSettings(rank=2, alpha=2.0), seed=0)
    spec = JobSpec.from_dict({"model": {"source": "default"}, "prompts": PROMPTS,
                              "algorithm": {"preset": preset, "steps": 4, "active": "0-1", "group_size": 2},
                              "train": {"iterations": 1, "prompts_per_iteration": 1, "device": "cpu"}})
    trainer = Trainer(policy, spec, WeightedRewards([build_reward("digit_probability")], [1.0]), PROMPTS)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    result = trainer.step()
    assert result.images.shape[1:] == (FRAMES, 1, 16, 16)  # samples are clips [k, F, C, H, W]
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))
    if preset == "egrpo":
        assert result.metrics["ratio_first_dev"] < 1e-5 and math.isfinite(result.metrics["loss"])
    else:
        assert math.isfinite(result.metrics["nft_loss"])


# --- rewards on video ------------------------------------------------------------------------------
def test_an_image_reward_on_video_is_the_mean_of_its_frames_scores():
    videos = clips()
    got = WeightedRewards([build_reward("jpeg_compressibility")], [1.0])(videos, ["a", "b"])  # as jobs score
    by_hand = torch.stack([-jpeg_size_kb(videos[b]).mean() for b in range(2)])  # every frame scored as an image
    torch.testing.assert_close(got, by_hand)
    two = score_frames(build_reward("jpeg_compressibility", frames=2), videos, ["a", "b"])  # frames 0 and 4 of 5
    torch.testing.assert_close(two, torch.stack([-jpeg_size_kb(videos[b, [0, 4]]).mean() for b in range(2)]))


def test_frames_k_picks_k_evenly_spaced_frames():
    assert reward_frames.frame_indices(5, 3).tolist() == [0, 2, 4]
    assert reward_frames.frame_indices(16, 4).tolist() == [0, 5, 10, 15]
    assert reward_frames.frame_indices(7, 1).tolist() == [0]
    assert reward_frames.frame_indices(4, "all").tolist() == [0, 1, 2, 3]
    assert reward_frames.frame_indices(6, 6).tolist() == list(range(6))
    seen = []

    class Recorder:  # an image reward that reports which frames (their pixel value = index / 10) it got
        name, frames = "recorder", 4

        def __call__(self, images, prompts):
            seen.append((images[:, 0, 0, 0] * 10).round().long().tolist())
            return torch.zeros(images.shape[0])

    video = torch.arange(9.0).div(10).view(1, 9, 1, 1, 1).expand(1, 9, 3, 4, 4)
    score_frames(Recorder(), video, ["p"])
    assert seen == [[0, 2, 5, 8]]


def test_temporal_consistency_ranks_a_still_clip_above_a_flickering_one():
    still = clips(1, 4, seed=1)[:, :1].expand(1, 4, 3, 16, 16)
    noisy = clips(1, 4, seed=2)
    slow = still + 0.02 * torch.arange(4.0).view(1, 4, 1, 1, 1)  # a slow brightening
    tc = build_reward("temporal_consistency")
    s = score_frames(tc, torch.cat([still, slow.clamp(0, 1), noisy]), ["a", "a", "a"])
    assert s[0] == 1.0 and s[0] > s[1] > s[2]
    change = (noisy[:, 1:] - noisy[:, :-1]).abs().mean()
    assert s[2].item() == pytest.approx(1 - change.item(), rel=1e-6)  # 1 - mean |x_{f+1} - x_f|
    # frames k: the consecutive differences of the picked frames only
    torch.testing.assert_close(score_frames(build_reward("temporal_consistency", frames=2), noisy, ["a"]),
                               1 - (noisy[:, 3] - noisy[:, 0]).abs().mean().view(1))


def test_reward_combinations_score_videos():
    videos = clips(3, 4)
    combo = WeightedRewards([build_reward("jpeg_compressibility", frames=2), build_reward("temporal_consistency")],
                            [1.0, 0.5])
    total, parts = combo.score(videos, ["a"] * 3)
    assert set(parts) == {"jpeg_compressibility", "temporal_consistency"} and total.shape == (3,)
    torch.testing.assert_close(total, parts["jpeg_compressibility"] + 0.5 * parts["temporal_consistency"])


def test_frames_errors_name_the_option_and_the_fix():
    with pytest.raises(ValueError, match="frames must be \"all\" or an integer >= 1"):
        build_reward("jpeg_compressibility", frames=0)
    with pytest.raises(ValueError, match="frames must be"):
        build_reward("jpeg_compressibility", frames="middle")
    with pytest.raises(ValueError, match="frames = 6 but the videos have 5 frames"):
        score_frames(build_reward("jpeg_compressibility", frames=6), clips(), ["a", "b"])
    with pytest.raises(ValueError, match="made images"):
        score_frames(build_reward("jpeg_compressibility", frames=2), torch.rand(2, 3, 16, 16), ["a", "b"])
    with pytest.raises(ValueError, match="scores videos"):
        score_frames(build_reward("temporal_consistency"), torch.rand(2, 3, 16, 16), ["a", "b"])
    assert score_frames(build_reward("jpeg_compressibility", frames=1), torch.rand(2, 3, 16, 16), ["a", "b"]).shape == (2,)


def spec_with(rewards):
    return {"model": {"source": "default"}, "prompts": PROMPTS, "rewards": rewards}


@pytest.mark.parametrize("rewards,message", [
    ([{"name": "digit_probability", "frames": "some"}], "frames must be"),
    ([{"name": "digit_probability", "frames": 2}], r"rewards\[0\].frames = 2 but the model makes 1 frame"),
    ([{"name": "digit_probability"}, {"name": "temporal_consistency"}], "needs at least 2 per sample"),
])
def test_the_spec_refuses_frames_the_model_cannot_give(rewards, message):
    with pytest.raises(SpecError, match=message):
        JobSpec.from_dict(spec_with(rewards))


def test_the_spec_checks_frames_against_the_models_frames(monkeypatch):
    monkeypatch.setattr(reward_frames, "model_frames", lambda model: 5)  # as model.comfy.length = 5 will say
    JobSpec.from_dict(spec_with([{"name": "digit_probability", "frames": 5}, {"name": "temporal_consistency"}]))
    with pytest.raises(SpecError, match="at most 5"):
        JobSpec.from_dict(spec_with([{"name": "digit_probability", "frames": 6}]))
    with pytest.raises(SpecError, match="set frames to at least 2"):
        JobSpec.from_dict(spec_with([{"name": "temporal_consistency", "frames": 1}]))


# --- animated WebP ------------------------------------------------------------------------------------
def test_video_grids_are_animated_webp_with_every_frame(tmp_path):
    videos = clips(4, 5)
    image_grid([videos[:2], videos[2:]], tmp_path / "grid.webp")
    with Image.open(tmp_path / "grid.webp") as im:
        assert im.format == "WEBP" and im.is_animated and im.n_frames == 5 and im.info["loop"] == 0
        im.seek(2)
        im.load()
        assert im.info["duration"] == round(1000 / VIDEO_FPS)
    # libwebp stores a repeated frame once and adds its time to the previous one: the clip keeps its length
    paused = videos[:, [0, 1, 1, 1, 2]]
    image_grid([paused], tmp_path / "paused.webp")
    with Image.open(tmp_path / "paused.webp") as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()
            durations.append(im.info["duration"])
    assert len(durations) == 3 and sum(durations) == 5 * round(1000 / VIDEO_FPS)
    with pytest.raises(ValueError, match="webp"):
        image_grid([videos], tmp_path / "grid.png")


# --- a job ----------------------------------------------------------------------------------------
def test_a_video_job_trains_and_writes_animated_webp_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "build_policy", lambda *a, **k: make_video_policy(FRAMES))
    monkeypatch.setattr(reward_frames, "model_frames", lambda model: FRAMES)  # the stand-in makes 3 frames
    monkeypatch.setattr(jobs, "source_defaults", lambda model: {})  # the digits model's drift measure is for images
    spec = {
        "model": {"source": "default"}, "prompts": PROMPTS,
        "eval_prompts": [PROMPTS[0]], "eval_seeds": [1, 2],
        "rewards": [{"name": "digit_probability", "frames": 2}, {"name": "temporal_consistency", "weight": 0.5}],
        "algorithm": {"steps": 4, "active": "0-1", "group_size": 2, "clip_range": 0.2},
        "lora": {"rank": 2, "alpha": 2.0},
        "train": {"iterations": 2, "prompts_per_iteration": 1, "lr": 3e-3, "checkpoint_every": 1, "evaluate": True,
                  "sample_every": 1, "device": "cpu", "threads": 1},
        "output": {"name": "video", "formats": ["comfy"]},
    }
    job = create_job(spec, tmp_path / "jobs" / "video-1")
    result = run_job(job, progress=False)
    assert result["status"] == "finished" and result["iteration"] == 2
    assert (job / "lora" / "video.safetensors").is_file()
    events, _ = read_events(job)
    metrics = [e for e in events if e["type"] == "metrics"]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["ratio_first_dev"] < 1e-5 for m in metrics)  # on-policy: ratio 1 before the first optimizer step
    assert {"reward/digit_probability", "reward/temporal_consistency"} <= set(metrics[0])
    evals = [e for e in events if e["type"] == "eval"]
    assert len(evals) == 2 and all("diversity" in e for e in evals)  # held-out clips, scored and compared
    samples = [e for e in events if e["type"] == "sample"]
    assert [s["path"] for s in samples] == ["samples/iter_000001.webp", "samples/iter_000002.webp"]
    assert all(s["frames"] == FRAMES for s in samples)
    with Image.open(job / samples[-1]["path"]) as im:
        assert im.is_animated and im.n_frames == FRAMES

    # the panel's routes list and serve them
    from aiohttp.test_utils import TestClient, TestServer

    from nodes.job_manager import JobManager
    from nodes.routes import make_app

    async def fetch():
        async with TestClient(TestServer(make_app(JobManager(tmp_path / "jobs")))) as client:
            info = await (await client.get("/egrpo/jobs/video-1")).json()
            resp = await client.get("/egrpo/jobs/video-1/files/samples/iter_000002.webp")
            return info, resp.status, resp.content_type, await resp.read()

    info, status, kind, body = asyncio.run(fetch())
    assert info["samples"] == ["iter_000001.webp", "iter_000002.webp"]
    assert status == 200 and kind == "image/webp"
    assert Image.open(io.BytesIO(body)).n_frames == FRAMES


def test_reward_nodes_pass_frames_to_the_spec():
    import comfy_fakes

    comfy_fakes.install()
    from nodes import reward_nodes

    node = {n.define_schema().node_id: n for n in reward_nodes.reward_nodes()}["EGRPOReward_digit_probability"]
    assert node.execute(1.0, " 4 ").args[0] == [{"name": "digit_probability", "weight": 1.0, "frames": 4}]
    assert node.execute(1.0, "all").args[0] == [{"name": "digit_probability", "weight": 1.0}]
    with pytest.raises(ValueError, match="frames must be 'all' or a whole number >= 1"):
        node.execute(1.0, "0")
