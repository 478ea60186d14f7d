"""The training loop on tiny random SD3 and FLUX transformers (CPU): it runs end to end, only LoRA
parameters change, the first inner update is on-policy (ratio = 1), and every preset trains."""

import pytest
import torch

from tiny_models import make_policy
from egrpo_backend.config import JobSpec
from egrpo_backend.lora import LoraSettings, add_lora
from egrpo_backend.rewards import WeightedRewards, build_reward
from egrpo_backend.method.trainer import Trainer, lr_at

PROMPTS = ["a red cube", "a blue sphere", "a green cone"]


def small_spec(**algo):
    algorithm = {"steps": 6, "active": "0-2", "group_size": 4, "clip_range": 0.2, **algo}
    return JobSpec.from_dict({
        "model": {"source": "default"}, "prompts": PROMPTS, "algorithm": algorithm,
        "train": {"iterations": 2, "prompts_per_iteration": 2, "lr": 5e-3, "minibatches": 2},
    })


def make_trainer(kind="sd3", **algo):
    policy = make_policy(kind)
    add_lora(policy.lora_model(), LoraSettings(rank=4, alpha=4.0), seed=0)
    reward = WeightedRewards([build_reward("jpeg_compressibility")], [1.0])
    return policy, Trainer(policy, small_spec(**algo), reward, PROMPTS)


def two_steps_change_only_lora(policy, trainer) -> list[dict]:
    """Train 2 iterations; assert that some LoRA B matrices and no other parameters changed."""
    model = policy.lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = [trainer.step().metrics for _ in range(2)]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "no parameter changed"
    assert all("lora_" in n for n in changed), f"non-LoRA parameters changed: {sorted(changed)[:3]}"
    assert any("lora_B" in n for n in changed)
    return metrics


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_training_changes_only_lora_parameters(kind):
    policy, trainer = make_trainer(kind)
    metrics = two_steps_change_only_lora(policy, trainer)
    for m in metrics:
        assert m["ratio_first_dev"] < 1e-5  # on-policy: the first inner update sees ratio = 1
        assert m["nfe"] > 0 and m["optimizer_steps"] == 2 and torch.isfinite(torch.tensor(m["loss"]))
    assert trainer.state.iteration == 2


def test_ratio_is_exactly_one_before_any_update():
    policy, trainer = make_trainer("sd3", update_mode="per_step")
    m = trainer.step().metrics
    assert m["ratio_first_dev"] < 1e-5
    assert m["optimizer_steps"] == 3  # per_step: one optimizer step per active step


@pytest.mark.parametrize("preset", ["egrpo", "egrpo_fast", "granular", "dance", "flowgrpo", "flowgrpo_fast", "mixgrpo"])
def test_every_preset_trains(preset):
    policy, trainer = make_trainer("sd3", preset=preset, **({"active": "0-2"} if preset not in ("dance", "flowgrpo") else {"active": "all"}))
    m = trainer.step().metrics
    assert m["ratio_first_dev"] < 1e-5 and m["trained_transitions"] > 0


def test_kl_to_base_model_is_logged_and_zero_at_start():
    policy, trainer = make_trainer("sd3", kl_beta=0.1)
    m = trainer.step().metrics
    assert m["kl"] >= 0 and m["kl"] < 1e-3  # LoRA starts at zero, so policy == base before the first step


def test_cfg_rollouts_and_updates():
    policy, trainer = make_trainer("sd3", guidance_scale=3.0, negative_prompt="blurry")
    m = trainer.step().metrics
    assert m["ratio_first_dev"] < 1e-5


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, "constant", 0) == 1.0
    assert lr_at(0, 1.0, 10, "linear", 2) == 0.5  # warm-up
    assert lr_at(2, 1.0, 10, "linear", 2) == 1.0
    assert lr_at(10, 1.0, 10, "cosine", 0) == pytest.approx(0.0)


def test_sana_transformer_trains():
    from diffusers import SanaTransformer2DModel

    from tiny_models import ByteTextEncoder, make_tiny_vae
    from egrpo_backend.policies.diffusers_policy import DiffusersPolicy

    torch.manual_seed(0)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)
    policy = DiffusersPolicy(model, ByteTextEncoder(), (4, 8, 8), vae=make_tiny_vae())
    assert policy.family == "sana"
    add_lora(policy.lora_model(), LoraSettings(rank=2, alpha=2.0), seed=0)
    trainer = Trainer(policy, small_spec(), WeightedRewards([build_reward("jpeg_compressibility")], [1.0]), PROMPTS)
    m = trainer.step().metrics
    assert m["ratio_first_dev"] < 1e-5 and any(p.grad is not None for p in policy.trainable_parameters())


def test_decode_and_reward_never_see_more_than_decode_batch():
    """Scoring is chunked: a counting VAE decode and a counting reward see at most train.decode_batch
    images per call, and every phase reports its seconds (peak memory is None on a CPU device)."""
    policy = make_policy("sd3")
    add_lora(policy.lora_model(), LoraSettings(rank=2, alpha=2.0), seed=0)
    decode_sizes, reward_sizes = [], []
    decode = policy.decode

    def counting_decode(latents):
        decode_sizes.append(latents.shape[0])
        return decode(latents)

    class CountingReward:
        name = "counting"

        def __call__(self, images, prompts):
            reward_sizes.append(images.shape[0])
            return images.mean((1, 2, 3))

    policy.decode = counting_decode
    spec = small_spec(granularities=[1, 2])
    spec.train.decode_batch = 5
    trainer = Trainer(policy, spec, WeightedRewards([CountingReward()], [1.0]), PROMPTS)
    m = trainer.step().metrics
    rows = 2 * 3 * 4 * 2  # prompts x branch steps x G x granularities
    assert sum(decode_sizes) == sum(reward_sizes) == rows
    assert max(decode_sizes) == max(reward_sizes) == 5
    assert set(m["phases"]) == {"encode", "rollout", "decode", "reward", "update"}  # encode: prompts encoded ahead
    assert all(p["seconds"] > 0 and p["peak_mem_gb"] is None for p in m["phases"].values())


def test_step_returns_sample_images_of_the_first_groups():
    policy, trainer = make_trainer("sd3")
    result = trainer.step()
    assert result.images.shape == (4 * 4, 3, 16, 16)  # SAMPLE_GROUPS groups of G = 4, finest granularity
    assert len(result.prompts) == 2 and set(result.prompts) <= set(PROMPTS)


def test_dance_trains_int_0_6_of_the_steps_before_the_last_per_member():
    # T = 6, every step SDE: 5 candidates before the last, int(5 * 0.6) = 3 per member, 2 x 4 members.
    policy, trainer = make_trainer("sd3", preset="dance", active="all")
    assert trainer.step().metrics["trained_transitions"] == 8 * 3
    _, kept_last = make_trainer("sd3", preset="dance", active="all", train_last_step=True, train_subset="per_group")
    assert kept_last.step().metrics["trained_transitions"] == 8 * 3  # round-free: int(6 * 0.6) = 3 per group


def test_flowgrpo_samples_the_last_step_but_never_trains_it_and_uses_its_kl():
    policy, trainer = make_trainer("sd3", preset="flowgrpo", active="all", kl_beta=0.1)
    m = trainer.step().metrics
    assert m["trained_transitions"] == 8 * 5  # 6 SDE steps per member, the last one (to sigma = 0) dropped
    assert trainer.algo.kl_form == "flow_grpo" and 0 <= m["kl"] < 1e-3 and m["ratio_first_dev"] < 1e-5
