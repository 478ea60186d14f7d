"""DiffusionNFT as a preset of the engine (algorithm.loss = "nft", nft_update.py): spec validation,
only LoRA parameters change, the trainer's loss is nft.py's, v_old runs the old-policy copy, and a
resumed job equals a straight one (LoRA and old policy, bit for bit)."""

import pytest
import torch

from test_jobs import assert_same_lora, lora_of, tiny_spec
from test_trainer import PROMPTS, make_trainer, two_steps_change_only_lora
from egrpo_backend.jobs.checkpoint import latest_checkpoint, read_checkpoint
from egrpo_backend.config import JobSpec, SpecError
from egrpo_backend.jobs.run import create_job, resume_job, run_job
from egrpo_backend.method.nft import forward_noise, nft_loss, old_policy_decay
from egrpo_backend.method.nft_update import NFTUpdate


def nft_trainer(kind="sd3", **algo):
    return make_trainer(kind, preset="nft", **algo)


@pytest.mark.parametrize("bad, key", [
    ({"loss": "dpo"}, "algorithm.loss"),
    ({"nft_beta": 0.0}, "algorithm.nft_beta"),
    ({"nft_decay": 3}, "algorithm.nft_decay"),
    ({"nft_decay": True}, "algorithm.nft_decay"),
    ({"nft_timestep_fraction": 0.0}, "algorithm.nft_timestep_fraction"),
    ({"nft_timestep_fraction": 1.5}, "algorithm.nft_timestep_fraction"),
    ({"nft_timestep_fraction": 0.1, "steps": 6}, r"algorithm.nft_timestep_fraction = 0.1 trains no sigma.*at least 0.1667"),
    ({"guidance_scale": 4.5}, r"algorithm.guidance_scale = 4.5 is not allowed with loss 'nft'.*set algorithm.guidance_scale = 1.0"),
    ({"reward_mode": "per_reward"}, "algorithm.reward_mode = 'per_reward' is not allowed with loss 'nft'"),
])
def test_nft_fields_are_validated_with_the_key_and_the_fix(bad, key):
    with pytest.raises(SpecError, match=key):
        JobSpec.from_dict({"model": {"source": "default"}, "algorithm": {"preset": "nft", **bad}})


def test_nft_presets_mirror_the_reference_defaults():
    a = JobSpec.from_dict({"model": {"source": "default"}, "algorithm": {"preset": "nft"}}).algorithm
    assert (a.loss, a.nft_beta, a.nft_decay, a.nft_timestep_fraction) == ("nft", 1.0, 1, 0.99)
    assert (a.guidance_scale, a.kl_beta, a.advantage, a.shared_initial_noise) == (1.0, 1e-4, "prompt_mean_batch_std", False)
    multi = JobSpec.from_dict({"model": {"source": "default"}, "algorithm": {"preset": "nft_multi_reward"}}).algorithm
    assert (multi.loss, multi.nft_beta) == ("nft", 0.1)
    assert JobSpec.from_dict({"model": {"source": "default"}}).algorithm.loss == "grpo"  # every other preset


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_nft_training_changes_only_lora_parameters(kind):
    policy, trainer = nft_trainer(kind)
    start = {n: t.clone() for n, t in trainer.nft.old.tensors.items()}
    metrics = two_steps_change_only_lora(policy, trainer)
    # The old policy followed: after 2 steps (decay 0.002) it is no longer the zero-B start.
    assert any(not torch.equal(t, start[n]) for n, t in trainer.nft.old.tensors.items())
    P, G, T, K = 2, 4, 6, 5  # small_spec: 2 prompts, G 4, T 6 -> K = int(6 x 0.99) = 5
    for m in metrics:
        assert m["nfe"] == P * G * T  # ODE rollout, no CFG
        assert m["nfe_update"] == P * G * K * 3  # v_old, v and v_ref (kl_beta 1e-4) per pair
        assert m["optimizer_steps"] == 2 and m["trained_pairs"] == P * G * K
        assert torch.isfinite(torch.tensor(m["nft_loss"])) and 0 <= m["r_mean"] <= 1
    assert [m["old_policy_decay"] for m in metrics] == [old_policy_decay(2), old_policy_decay(4)]


def _perturb(params, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_trainer_loss_of_a_hand_set_batch_equals_nft_loss():
    """_backward on every pair of a hand-set batch = nft.nft_loss computed by hand with the old copy
    set into the LoRA for v_old, the LoRA off for v_ref: loss and gradients."""
    policy, trainer = nft_trainer("sd3")
    nft: NFTUpdate = trainer.nft
    params = nft.old.params
    _perturb([nft.old.tensors[n] for n in nft.old.names], 0.05, 1)  # old != trained != base
    _perturb(params, 0.05, 2)
    g = torch.Generator().manual_seed(0)
    R, K = 4, 2
    x0 = torch.randn(R, *policy.latent_shape, generator=g)
    seeds = torch.arange(R * K).reshape(R, K) + 100  # the forward noise of pair (i, k) is randn(seed [i, k])
    sigmas = torch.tensor([[0.9, 0.3], [0.5, 0.7], [0.2, 0.95], [0.6, 0.4]])
    r = torch.tensor([0.1, 0.9, 0.5, 0.7])
    member_prompt = torch.tensor([0, 0, 1, 1])
    velocity = trainer.velocity_for(PROMPTS[:2])
    pairs = torch.stack(torch.meshgrid(torch.arange(K), torch.arange(R), indexing="ij"), -1).reshape(-1, 2)
    stats = {k: [] for k in ("pairs", "r_mean", "positive_loss", "negative_loss", "old_deviate", "kl")}
    ours = nft._backward(x0, r, member_prompt, sigmas, seeds, pairs, len(pairs), velocity, stats, policy.device)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    k, i = pairs[:, 0], pairs[:, 1]
    eps = torch.stack([torch.randn(policy.latent_shape, generator=torch.Generator().manual_seed(int(s)))
                       for s in seeds[i, k]])
    x_t, t = forward_noise(x0[i], eps, sigmas[i, k]), sigmas[i, k]
    trained = [p.detach().clone() for p in params]
    with torch.no_grad():
        for n, p in zip(nft.old.names, params):
            p.copy_(nft.old.tensors[n])
        v_old = velocity(x_t, t, member_prompt[i])
        for p, w in zip(params, trained):
            p.copy_(w)
        with policy.lora_disabled():
            v_ref = velocity(x_t, t, member_prompt[i])
    v = velocity(x_t, t, member_prompt[i])
    assert not torch.allclose(v, v_old) and not torch.allclose(v, v_ref) and not torch.allclose(v_old, v_ref)
    loss, _ = nft_loss(v, v_old, x_t, x0[i], t, r[i], 1.0, v_ref=v_ref, kl_beta=1e-4, adv_clip=5.0)
    loss.backward()
    assert ours == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(grads, [p.grad for p in params]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert all(torch.equal(p, w) for p, w in zip(params, trained))  # the swap restored the trained LoRA


def test_v_old_runs_the_old_copy_which_follows_the_ema():
    policy, trainer = nft_trainer("sd3")
    nft = trainer.nft
    old_before = {n: t.clone() for n, t in nft.old.tensors.items()}
    trainer.step()
    decay = trainer.state.history[-1]["old_policy_decay"]
    assert decay == old_policy_decay(2) > 0
    for n, p in zip(nft.old.names, nft.old.params):  # old <- d old + (1 - d) trained
        torch.testing.assert_close(nft.old.tensors[n], decay * old_before[n] + (1 - decay) * p.detach())
    velocity = trainer.velocity_for(PROMPTS[:1])
    x, s, rows = torch.randn(2, *policy.latent_shape), torch.tensor([0.7, 0.3]), torch.tensor([0, 0])
    with torch.no_grad():
        v = velocity(x, s, rows)
        with nft.old.swapped_in():
            v_old = velocity(x, s, rows)
        with policy.lora_disabled():
            v_base = velocity(x, s, rows)
    assert not torch.equal(v_old, v) and not torch.equal(v_old, v_base)
    assert torch.equal(velocity(x, s, rows), v)  # the trained LoRA is back after the swap


def nft_job_spec(iterations=4):
    spec = tiny_spec(iterations=iterations)
    spec["algorithm"].update(preset="nft")
    return spec


def test_nft_resume_is_bit_identical(tmp_path):
    straight = create_job(nft_job_spec(), tmp_path / "straight")
    run_job(straight, progress=False)
    split = create_job(nft_job_spec(), tmp_path / "split")
    assert run_job(split, until=2, progress=False)["status"] == "stopped"
    assert resume_job(split, progress=False)["iteration"] == 4
    assert_same_lora(lora_of(straight), lora_of(split))
    a, b = (read_checkpoint(latest_checkpoint(j))["trainer"]["nft"] for j in (straight, split))
    assert a["optimizer_steps"] == b["optimizer_steps"] == 4 * 2
    assert a["old_policy"].keys() == b["old_policy"].keys() and a["old_policy"]
    for n in a["old_policy"]:
        assert torch.equal(a["old_policy"][n], b["old_policy"][n]), n


def test_a_checkpoint_without_the_old_policy_is_refused_by_nft_and_loads_for_grpo():
    _, grpo = make_trainer("sd3")
    sd = grpo.state_dict()
    assert "nft" not in sd
    _, other = make_trainer("sd3")
    other.load_state_dict(sd)  # a GRPO checkpoint (no old policy) loads as before
    _, nft = nft_trainer("sd3")
    with pytest.raises(ValueError, match="no DiffusionNFT old-policy copy"):
        nft.load_state_dict(sd)


def test_cli_trains_a_job_with_preset_nft(tmp_path):
    import json

    from egrpo_backend.__main__ import main
    from egrpo_backend.jobs.run import read_events

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(nft_job_spec(iterations=1)))
    assert main(["train", str(path), "--out", str(tmp_path / "job"), "--quiet"]) == 0
    events, _ = read_events(tmp_path / "job")
    m = next(e for e in events if e["type"] == "metrics")
    assert {"nft_loss", "r_mean", "old_policy_decay", "reward_mean"} <= set(m) and "clip_frac" not in m


def _nft_run(rank: int, world: int, port: int, out: dict) -> None:
    from test_distributed import Brightness, join_gloo
    from egrpo_backend import distributed
    from egrpo_backend.lora import LoraSettings, add_lora
    from egrpo_backend.rewards import WeightedRewards
    from egrpo_backend.method.trainer import Trainer
    from test_trainer import small_spec
    from tiny_models import make_policy

    join_gloo(rank, world, port)
    try:
        policy = make_policy("sd3")
        add_lora(policy.lora_model(), LoraSettings(rank=4, alpha=4.0), seed=0)
        trainer = Trainer(policy, small_spec(preset="nft"), WeightedRewards([Brightness()], [1.0]), PROMPTS)
        metrics = [trainer.step().metrics for _ in range(2)]
        out[rank] = (metrics, {n: p.detach().clone() for n, p in zip(trainer.nft.old.names, trainer.nft.old.params)},
                     trainer.nft.old.state_dict())
    finally:
        distributed.teardown()


def test_two_ranks_train_nft_like_one_process():
    """Each rank rolls out and trains its share of the prompts; r uses every rank's rewards, the
    loss is divided by the global pair count, so 2 gloo ranks compute what one process does."""
    import torch.multiprocessing as mp

    from test_distributed import _comparable, _free_port

    with mp.Manager() as manager:
        out = manager.dict()
        _nft_run(0, 1, 0, out)
        single = out[0]
        mp.spawn(_nft_run, args=(2, _free_port(), out), nprocs=2, join=True)
        ranks = [out[0], out[1]]
    for metrics, lora, old in ranks:
        for a, b in zip(metrics, single[0]):
            a, b = _comparable(a), _comparable(b)
            assert a.keys() == b.keys()
            for k in ("nfe", "nfe_update", "optimizer_steps", "trained_pairs", "lr", "old_policy_decay",
                      "reward_mean", "reward_std"):
                assert a[k] == b[k], k
            for k, v in b.items():  # sums gathered in another order
                if isinstance(v, float):
                    assert a[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        for name in lora:  # pieces of one prompt, float64 sums (gradient_sync.py): measured bit-equal
            assert (lora[name] - single[1][name]).abs().max() < 1e-6, name
            assert (old[name] - single[2][name]).abs().max() < 1e-6, name
