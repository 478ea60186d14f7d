"""Issue 21: prompt sets as data (streamed, indexed, no cap for files), encoded as needed in bounded
space (an LRU cond store), the model's prompt rule checked before anything is encoded, and encode
progress apart from training (docs/prompts.md)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from egrpo_backend.config import MAX_PROMPTS, JobSpec, SpecError
from egrpo_backend.policies.cond_store import CondStore, trim, untrim
from egrpo_backend.prompt_sets import PromptSet, open_prompts
from test_jobs import tiny_spec

ROOT = Path(__file__).resolve().parents[1]


def test_txt_jsonl_csv_and_a_folder_read_as_streamed_sets(tmp_path):
    (tmp_path / "a.txt").write_text("a cat\n\n# comment\n  padded dog  \r\nlast line without newline")
    (tmp_path / "b.jsonl").write_text('{"prompt": "from jsonl", "id": 1}\n"a bare string"\n')
    (tmp_path / "c.csv").write_text('id,caption\n1,"a quoted, comma"\n2,plain\n')
    txt = open_prompts({"file": "a.txt"}, "prompts", str(tmp_path))
    assert isinstance(txt, PromptSet) and list(txt) == ["a cat", "padded dog", "last line without newline"]
    assert txt[2] == "last line without newline" and len(txt) == 3
    assert list(open_prompts({"file": "b.jsonl"}, "prompts", str(tmp_path))) == ["from jsonl", "a bare string"]
    csv_set = open_prompts({"file": "c.csv", "column": "caption"}, "prompts", str(tmp_path))
    assert list(csv_set) == ["a quoted, comma", "plain"]
    with pytest.raises(SpecError, match="b.jsonl: a line has no string 'caption' field"):
        open_prompts({"file": str(tmp_path), "column": "caption"}, "prompts")  # checked while indexing
    with pytest.raises(SpecError, match="CSV header has no 'prompt' column"):
        open_prompts({"file": "c.csv"}, "prompts", str(tmp_path))
    (tmp_path / "b.jsonl").unlink()
    (tmp_path / "c.csv").unlink()
    (tmp_path / "d.txt").write_text("from d\n")
    assert list(open_prompts({"file": str(tmp_path)}, "prompts")) == ["a cat", "padded dog", "last line without newline", "from d"]


def test_the_hpdv2_layout_needs_a_split_and_keeps_train_and_test_apart(tmp_path):
    (tmp_path / "hpd").mkdir()
    (tmp_path / "hpd" / "train.txt").write_text("train one\ntrain two\n")
    (tmp_path / "hpd" / "test.txt").write_text("test one\n")
    with pytest.raises(SpecError, match="holds train and test sets; say which with prompts.split"):
        open_prompts({"file": "hpd"}, "prompts", str(tmp_path))
    assert list(open_prompts({"file": "hpd", "split": "train"}, "prompts", str(tmp_path))) == ["train one", "train two"]
    assert list(open_prompts({"file": "hpd", "split": "test"}, "eval_prompts", str(tmp_path))) == ["test one"]


def test_files_have_no_cap_but_an_inline_list_points_to_a_prompt_file(tmp_path):
    (tmp_path / "big.txt").write_text("".join(f"a handwritten digit three no {i:07d}\n" for i in range(MAX_PROMPTS + 5)))
    assert len(open_prompts({"file": "big.txt"}, "prompts", str(tmp_path))) == MAX_PROMPTS + 5
    with pytest.raises(SpecError, match=r"a list holds at most 100000: give a prompt file instead"):
        open_prompts(["a"] * (MAX_PROMPTS + 1), "prompts")


def test_the_index_is_built_once_and_read_again_by_hash(tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    first = open_prompts({"file": "p.txt"}, "prompts", str(tmp_path))
    from egrpo_backend import prompt_sets

    monkeypatch.setattr(prompt_sets, "_index_txt", lambda *a: pytest.fail("the index must come from the cache"))
    again = open_prompts({"file": "p.txt"}, "prompts", str(tmp_path))
    assert again.digest() == first.digest() and list(again) == ["one", "two"]


def test_a_set_that_breaks_the_models_prompt_rule_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    """100,000 prompts that name no single digit: refused in one streamed pass, before a job folder or
    a text encoder exists (it used to spend 868 s encoding before the error)."""
    (tmp_path / "p.txt").write_text("".join(f"digit {62351 + i}\n" for i in range(100_000)))
    from egrpo_backend.default_model import text
    from egrpo_backend.jobs.run import create_job

    monkeypatch.setattr(text, "get_text_encoder", lambda: pytest.fail("nothing may be encoded"))
    spec = JobSpec.from_dict({**tiny_spec(1), "prompts": {"file": "p.txt"}}, base_dir=str(tmp_path))
    with pytest.raises(SpecError, match=r"prompts: prompt 'digit 62351' names no digit.*\(p.txt prompt 1; the embedded digits model"):
        create_job(spec, tmp_path / "job")
    assert not (tmp_path / "job").exists()


# --- the cond store ---------------------------------------------------------------------------------------
def counting_encoder(calls):
    def encode_one(prompt):
        calls[prompt] = calls.get(prompt, 0) + 1
        n = 1 + len(prompt) % 5
        hidden = torch.zeros(1, 8, 4)
        hidden[0, :n] = float(len(prompt))
        return {"encoder_hidden_states": hidden, "pooled_projections": torch.full((1, 4), float(len(prompt)))}
    return encode_one


def test_padding_is_stripped_on_store_and_restored_exactly():
    cond = counting_encoder({})("abc")
    row = trim(cond)
    assert row[0]["encoder_hidden_states"].shape == (4, 4) and row[1] == {"encoder_hidden_states": 8}
    assert all(torch.equal(untrim(row)[k], cond[k]) for k in cond)


def test_a_store_bounded_at_n_entries_never_holds_more(tmp_path):
    calls = {}
    store = CondStore(counting_encoder(calls), "sd3", folder=tmp_path / "conds", disk_bytes=1e9,
                      max_memory_entries=5, max_disk_entries=7)
    for i in range(40):
        store.get(f"prompt {i}")
        assert len(store.memory) <= 5 and len(store.disk) <= 7 and store.files_on_disk() <= 7
    assert store.files_on_disk() == 7 and store.encoded == 40


def test_a_trained_job_encodes_each_prompt_at_most_once_per_cache_lifetime(tmp_path, monkeypatch):
    """Three epochs over a 40-prompt file, encoded ahead in chunks (ENCODE_CHUNK lowered to 6) through a
    memory bound of ~0 bytes: each prompt reaches the encoder once (its disk copy serves every later draw),
    and a resumed run re-encodes exactly the prompts whose disk copies were lost."""
    from egrpo_backend.method import trainer as trainer_mod
    from egrpo_backend.default_model import text
    from egrpo_backend.jobs.run import create_job, read_events, run_job

    monkeypatch.setattr(trainer_mod, "ENCODE_CHUNK", 6)
    monkeypatch.setattr("egrpo_backend.jobs.build.ENCODE_CHUNK", 6)
    calls = {}
    real = text.get_text_encoder()

    class Counting:
        def encode(self, prompts, device="cpu"):
            for p in prompts:
                calls[p] = calls.get(p, 0) + 1
            return real.encode(prompts, device)

    monkeypatch.setattr(text, "get_text_encoder", lambda: Counting())
    (tmp_path / "p.txt").write_text("".join(f"a handwritten digit {'three' if i % 2 else 'seven'} v{i:03d}\n" for i in range(40)))
    train = {"prompts_per_iteration": 2, "checkpoint_every": 100, "cond_memory_gb": 1e-9}
    spec = {**tiny_spec(60, **train), "prompts": {"file": "p.txt"}, "algorithm": {"steps": 2, "active": "0", "group_size": 2}}
    spec["lora"], spec["output"]["formats"] = {"rank": 1}, ["peft"]
    job = create_job(JobSpec.from_dict(spec, base_dir=str(tmp_path)), tmp_path / "job")
    run_job(job, until=30, progress=False)  # 60 prompts drawn = 1.5 epochs
    assert calls.pop("") == 1  # the negative prompt, encoded at the start
    assert len(calls) == 40 and set(calls.values()) == {1}
    lost = [f"a handwritten digit three v{i:03d}" for i in (1, 3, 5)]
    for p in lost:  # the disk copies of three prompts are lost before the resume
        store = CondStore(None, "sd3", folder=job / "conds", disk_bytes=1e12)
        store._file(store._hash(p)).unlink()
    run_job(job, progress=False)  # resumed: 60 more prompts, every prompt drawn again
    assert {p for p, n in calls.items() if n == 2} == set(lost) and max(calls.values()) == 2 and "" not in calls
    events = read_events(job)[0]
    encode_events = [e for e in events if e["type"] == "encode"]
    assert encode_events[0]["set_size"] == 40 and encode_events[0]["total"] == 6  # a chunk: 3 iterations of 2 prompts
    assert encode_events[-1]["encoded"] == len(lost)  # the resumed run encoded only what it lost
    metrics = [e for e in events if e["type"] == "metrics"]
    assert all("encode" in m["phases"] for m in metrics)


def test_next_prompts_keep_todays_order_semantics():
    """One randperm per epoch from stream 'prompt_order' (as before the store): the slots a list and a
    streamed set give are the same, and upcoming() does not consume them."""
    from egrpo_backend.method.randomness import stream_generator

    class T:  # the two Trainer methods, without a model
        from egrpo_backend.method.trainer import Trainer

        next_prompts, _order, upcoming = Trainer.next_prompts, Trainer._order, Trainer.upcoming

    t = T()
    t.prompts, t.rank, t.world, t._orders = [f"p{i}" for i in range(7)], 0, 1, {}
    t.cfg = type("C", (), {"prompts_per_iteration": 3, "seed": 5})()
    t.state = type("S", (), {"cursor": 0})()
    ahead = t.upcoming(4)
    drawn = [p for _ in range(4) for p in t.next_prompts()[0]]
    assert ahead == drawn
    expected = [t.prompts[int(torch.randperm(7, generator=stream_generator(5, "prompt_order", c // 7))[c % 7])]
                for c in range(12)]
    assert drawn == expected


# --- scale ------------------------------------------------------------------------------------------------
RSS_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    from egrpo_backend.jobs.run import create_job, read_events, run_job
    from egrpo_backend.config import JobSpec
    spec = json.loads(sys.argv[1])
    t0, t_wall = time.perf_counter(), time.time()
    job = create_job(JobSpec.from_dict(spec, base_dir=sys.argv[2]), sys.argv[3])
    run_job(job, progress=False)
    events = read_events(job)[0]
    first = next(e for e in events if e["type"] == "metrics")
    start = next(e for e in events if e["type"] == "start")
    saved = json.loads((job / "job.json").read_text())["prompts"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"peak_rss_mb": usage.ru_maxrss / 1024, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "seconds_to_iteration_1": start["time"] - t_wall, "seconds": time.perf_counter() - t0,
                      "iteration_seconds": first["seconds"], "count": saved["count"],
                      "first_prompt_read": bool(JobSpec.from_dict(json.loads((job / "job.json").read_text())).prompt_set()[0])}))
""")


def _probe(tmp_path, name, prompts_file):
    spec = {**tiny_spec(1), "prompts": {"file": prompts_file}}
    spec["algorithm"] = {"steps": 2, "active": "0", "group_size": 2}
    spec["lora"], spec["output"]["formats"] = {"rank": 1}, ["peft"]
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, json.dumps(spec), str(tmp_path), str(tmp_path / name)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_numbered_prompts(path, n, prefix=b"a handwritten digit three no "):
    """n distinct prompts naming one digit ('... no 00000042'), written with numpy in blocks (10M in seconds)."""
    width = len(prefix) + 9
    with open(path, "wb") as f:
        for lo in range(0, n, 1_000_000):
            i = np.arange(lo, min(n, lo + 1_000_000), dtype=np.int64)
            rows = np.empty((i.size, width), np.uint8)
            rows[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
            for k in range(8):
                rows[:, len(prefix) + k] = 48 + (i // 10 ** (7 - k)) % 10
            rows[:, -1] = 10
            rows.tofile(f)


def test_a_10m_line_prompt_file_starts_training_in_bounded_memory(tmp_path):
    """10,000,000 prompts (generated here, 370 MB): indexed, hashed and checked against the digits model's
    rule in streamed passes, and trained on without the set in memory; the peak RSS stays within 200 MB
    of a 100-prompt run. Timings are printed, not asserted (bench/prompt_sets.py measures the bars)."""
    write_numbered_prompts(tmp_path / "big.txt", 10_000_000)
    write_numbered_prompts(tmp_path / "small.txt", 100)
    small = _probe(tmp_path, "small", "small.txt")
    big = _probe(tmp_path, "big", "big.txt")
    print(f"\n100 prompts: {small}\n10M prompts: {big}\nload average {os.getloadavg()[0]:.1f}")
    assert big["count"] == 10_000_000 and big["first_prompt_read"]
    assert big["peak_rss_mb"] - small["peak_rss_mb"] < 200


def test_a_lora_trained_on_a_prompt_file_names_its_hash_and_no_path(tmp_path):
    (tmp_path / "data").mkdir()
    write_numbered_prompts(tmp_path / "data" / "train.txt", 5000)
    spec = {**tiny_spec(1), "prompts": {"file": "data/train.txt"}}
    spec["algorithm"], spec["lora"] = {"steps": 2, "active": "0", "group_size": 2}, {"rank": 1}
    from egrpo_backend.jobs.run import create_job, run_job

    job = create_job(JobSpec.from_dict(spec, base_dir=str(tmp_path)), tmp_path / "job")
    for path in run_job(job, progress=False)["lora"]:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        text = json.dumps(meta)
        assert len(text) < 64 * 1024 and str(tmp_path) not in text and "train.txt" not in text
        digest = json.loads(meta["egrpo.spec"])["prompts"]
        assert digest == {"count": 5000, "sha256": __import__("hashlib").sha256((tmp_path / "data" / "train.txt").read_bytes()).hexdigest()}


def test_the_vectorized_digit_rule_gives_the_answers_of_digit_of_prompt():
    import random

    from egrpo_backend.default_model.digits import digit_of_prompt, first_without_one_digit

    def ok(p):
        try:
            digit_of_prompt(p)
            return True
        except ValueError:
            return False

    pieces = list("ab3 7xne,.-0TwO") + ["one", "seven", "Eight", "nine ", "12", "zero", "threes", "٣"]
    rng = random.Random(0)
    for _ in range(2000):
        block = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 12))]
        assert first_without_one_digit(block) == next((i for i, p in enumerate(block) if not ok(p)), None), block
