"""Fuzz: hostile specs (fixed seed, bounded). Through the CLI, none escapes as a traceback, every
refusal is one line naming the key that was broken, and a refused spec creates no folder.

The generator of issue 25 (`bad_specs`) makes specs that are wrong in one place, in classes: huge
integers, non-ASCII digits, trailing newlines, lone surrogates, NUL bytes, zero reward weights,
oversized strings in every string field, and values that were once clamped silently. Every one must
be refused (rc 2), none may start training. CI runs EGRPO_FUZZ_SPECS (default 200) of them; the
acceptance run used 1,000 (README, "Limits of a spec"). The disk-full class is a real full disk (a
small tmpfs at several fill levels) in tests/test_refused_up_front.py, simulated in test_disk_full.py.
"""

import contextlib
import io
import json
import os
import random

from egrpo_backend.__main__ import main
from egrpo_backend.config import JobSpec, SpecError

VALID = {
    "model": {"source": "default", "dtype": "auto", "gradient_checkpointing": "auto"},
    "prompts": ["a handwritten digit three"],
    "eval_seeds": [1, 2],
    "rewards": [{"name": "digit_probability", "weight": 1.0}],
    "algorithm": {"preset": "egrpo", "steps": 16, "shift": 3.0, "eta": 0.7, "tau": 2.2, "active": "0-7",
                  "group_size": 8, "granularities": [1], "clip_range": 0.2, "update_mode": "averaged"},
    "lora": {"rank": 8, "alpha": 8.0, "init_seed": 0, "target_modules": []},
    "train": {"iterations": 10, "prompts_per_iteration": 2, "lr": 1e-3, "warmup_iterations": 0, "seed": 0,
              "threads": 1, "device": "cpu", "micro_batch": 16, "decode_batch": 8},
    "output": {"name": "fuzz", "formats": ["peft"]},
}
HOSTILE = [None, True, False, -1, 0, 0.5, -1e18, 1e18, 2**70, "", "x", "../../etc/passwd", "/etc/passwd", [], {},
           [True], [None], ["a"], {"file": 3}, {"file": "/nonexistent"}, [2**70], "NaN", [1, "a"], {"a": 1}]


def leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, (*prefix, k))
        yield (*prefix, k)


def mutate(rng):
    data = json.loads(json.dumps(VALID))
    path = rng.choice(list(leaves(VALID)))
    if rng.random() < 0.1:  # an unknown key next to a real one
        path = (*path[:-1], path[-1] + "_typo")
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = rng.choice(HOSTILE)
    return data, path


def test_fuzzed_specs_are_refused_cleanly(tmp_path):
    rng = random.Random(1234)
    refused = 0
    for i in range(300):
        data, path = mutate(rng)
        spec_file = tmp_path / f"spec{i}.json"
        spec_file.write_text(json.dumps(data))
        try:
            JobSpec.from_file(spec_file)
            continue  # a hostile value that happens to be valid (e.g. seed 0): nothing to refuse
        except SpecError:
            pass
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["train", str(spec_file), "--out", str(tmp_path / f"job{i}"), "--quiet"])
        message = err.getvalue()
        assert rc == 2 and message.startswith("error: "), (path, data, message)
        assert "Traceback" not in message
        leaf = path[-1] if path[-1] != "rewards" else "rewards"
        assert leaf in message or ".".join(path) in message, (path, message)
        assert not (tmp_path / f"job{i}").exists(), path
        refused += 1
    assert refused > 150  # most hostile values must be refused


# --- issue 25: classes of bad specs, each wrong in exactly one (named) place -------------------------
INT_KEYS = [("train", "iterations"), ("train", "seed"), ("train", "prompts_per_iteration"), ("train", "minibatches"),
            ("train", "warmup_iterations"), ("train", "micro_batch"), ("train", "threads"), ("train", "checkpoint_every"),
            ("algorithm", "steps"), ("algorithm", "group_size"), ("algorithm", "branches_per_prompt"),
            ("algorithm", "sde_window"), ("algorithm", "slide_every"), ("lora", "rank"), ("lora", "init_seed")]
FLOAT_KEYS = [("train", "lr"), ("train", "weight_decay"), ("train", "grad_clip"), ("train", "dist_timeout"),
              ("algorithm", "shift"), ("algorithm", "eta"), ("algorithm", "tau"), ("algorithm", "clip_range"),
              ("algorithm", "kl_beta"), ("algorithm", "guidance_scale"), ("algorithm", "advantage_clip"),
              ("lora", "alpha")]
LIST_NUMBER_KEYS = [("eval_seeds", 0), ("algorithm", "granularities", 0), ("algorithm", "active", 0),
                    ("algorithm", "sigmas", 0), ("rewards", 0, "weight")]
# String fields and a valid value each (so the spec is valid but for the one change made to it).
STRING_KEYS = {("model", "source"): "default", ("model", "path"): None, ("model", "family"): "auto",
               ("model", "dtype"): "auto", ("model", "weight_dtype"): "auto", ("model", "gradient_checkpointing"): "auto",
               ("model", "comfy", "comfy_root"): None, ("model", "comfy", "kind"): None, ("model", "comfy", "vae"): None,
               ("algorithm", "preset"): "egrpo", ("algorithm", "diffusion"): "flow_grpo", ("algorithm", "active"): "0-7",
               ("algorithm", "merge"): "adaptive", ("algorithm", "granularity_grid"): "authors",
               ("algorithm", "branch"): "active", ("algorithm", "branch_weighting"): "uniform",
               ("algorithm", "train_subset"): "per_group", ("algorithm", "kl_form"): "gaussian",
               ("algorithm", "advantage"): "group", ("algorithm", "reward_mode"): "weighted_sum",
               ("algorithm", "update_mode"): "averaged", ("algorithm", "negative_prompt"): "",
               ("algorithm", "loss"): "grpo", ("lora", "target_modules", 0): None, ("lora", "dtype"): "float32",
               ("train", "lr_schedule"): "constant", ("train", "device"): "cpu", ("train", "parallel"): "ddp",
               ("output", "name"): "fuzz", ("output", "formats", 0): "peft", ("output", "copy_to"): None,
               ("prompts", 0): "a handwritten digit three", ("eval_prompts", 0): None, ("rewards", 0, "name"): "digit_probability"}
# Strings where a final newline is not the same value (names, choices, devices): refused, never trimmed.
NEWLINE_KEYS = [k for k, v in STRING_KEYS.items() if v not in (None, "", "a handwritten digit three")]
HUGE = "HUGE_NUMBER"  # replaced in the JSON text: 10**400 and a 5000-digit number (beyond int()'s limit)


def _set(data, path, value):
    node = data
    for k, following in zip(path[:-1], path[1:]):
        if isinstance(following, int) and not isinstance(node.get(k), list):
            node[k] = []  # e.g. algorithm.active "0-7" -> a list of steps
        elif isinstance(following, str) and k not in node:
            node[k] = {}
        node = node[k]
    if isinstance(node, list) and path[-1] >= len(node):
        node.append(value)
    else:
        node[path[-1]] = value


def _key_name(path) -> str:
    """The leaf a refusal must name: 'seed' for train.seed, 'weight' for rewards[0].weight."""
    named = [k for k in path if isinstance(k, str)]
    return named[-1]


def _huge(rng, path):
    digits = rng.choice(["1" + "0" * 400, "9" * 5000])
    return path, HUGE, ("-" if rng.random() < 0.3 else "") + digits


def _non_ascii_digits(rng, path):
    digit = rng.choice(["\u0663", "\u00b3", "\u0969", "\uff13"])  # Arabic-Indic 3, superscript 3, Devanagari 3, fullwidth 3
    path, value = rng.choice([(("train", "device"), "cuda:" + digit), (("algorithm", "active"), f"0-{digit}"),
                              (("algorithm", "active"), digit), (path, digit), (path, "1" + digit)])
    return path, value, None


def _trailing_newline(rng, _):
    path = rng.choice(NEWLINE_KEYS)
    return path, STRING_KEYS[path] + rng.choice(["\n", "\r\n", "\n\n", "\r"]), None


def _text_value(path, bad: str):
    """A value that would be valid but for `bad` inside it."""
    base = STRING_KEYS[path] or {("model", "path"): "model.safetensors", ("model", "comfy", "kind"): "checkpoint",
                                 ("lora", "target_modules", 0): "to_q", ("eval_prompts", 0): "a digit seven"}.get(path, "x")
    at = len(base) // 2
    return base[:at] + bad + base[at:]


def _surrogate(rng, _):
    path = rng.choice(list(STRING_KEYS))
    return path, _text_value(path, rng.choice(["\ud800", "\udfff", "\udc80"])), None


def _nul(rng, _):
    path = rng.choice(list(STRING_KEYS))
    return path, _text_value(path, "\x00"), None


def _oversized(rng, _):
    path = rng.choice(list(STRING_KEYS))
    size = rng.choice([10_001, 35_000, 100_000])
    return path, _text_value(path, "a" * size), None


def _zero_weights(rng, _):
    n = rng.randint(1, 3)
    rewards = [{"name": rng.choice(["digit_probability", "jpeg_compressibility"]), "weight": rng.choice([0, 0.0, -0.0])}
               for _ in range(n)]
    return ("rewards",), rewards, None


def _clamped(rng, _):
    return rng.choice([(("algorithm", "branches_per_prompt"), 10**9, None), (("train", "minibatches"), 65536, None),
                       (("algorithm", "branches_per_prompt"), 9, None), (("algorithm", "sde_window"), 10**6, None),
                       (("algorithm", "active"), "0-99999999999", None), (("algorithm", "merge"), 10**6, None)])


CLASSES = {"huge_integer": _huge, "non_ascii_digits": _non_ascii_digits, "trailing_newline": _trailing_newline,
           "surrogate": _surrogate, "nul_byte": _nul, "zero_weights": _zero_weights, "oversized_string": _oversized,
           "clamped_nonsense": _clamped}
VALID_BPP = dict(VALID, algorithm=dict(VALID["algorithm"], branch="sample_active", branches_per_prompt=2))


def bad_specs(n: int, seed: int = 25):
    """n (class, key path, JSON text) triples; every spec is invalid in exactly the one place named."""
    rng = random.Random(seed)
    for i in range(n):
        cls = list(CLASSES)[i % len(CLASSES)]
        number_path = rng.choice(INT_KEYS + FLOAT_KEYS + LIST_NUMBER_KEYS)
        path, value, huge = CLASSES[cls](rng, number_path)
        data = json.loads(json.dumps(VALID))
        _set(data, path, value)
        text = json.dumps(data)  # lone surrogates and NUL bytes travel as JSON escapes, as in a hand-written file
        if huge is not None:
            text = text.replace(json.dumps(HUGE), huge)
        yield cls, path, text


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def check_bad_specs(tmp_path, n: int) -> dict:
    """Run n generated bad specs through the CLI's entry function; returns counts per class."""
    import egrpo_backend.jobs as jobs

    def must_not_train(*a, **k):
        raise AssertionError("a bad spec was accepted and its job started")

    counts = {}
    real_run_job, jobs.run_job = jobs.run_job, must_not_train
    try:
        for i, (cls, path, text) in enumerate(bad_specs(n)):
            spec_file = tmp_path / f"bad{i}.json"
            spec_file.write_text(text, encoding="utf-8", errors="surrogatepass")
            job = tmp_path / f"job{i}"
            rc, err = run_cli(["train", str(spec_file), "--out", str(job), "--quiet"])
            where = (cls, path, err[:300])
            assert rc == 2, where
            assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, where
            assert _key_name(path) in err, where
            assert not job.exists(), where
            counts[cls] = counts.get(cls, 0) + 1
            spec_file.unlink()
    finally:
        jobs.run_job = real_run_job
    return counts


def test_every_generated_bad_spec_is_refused_in_one_line_naming_its_key(tmp_path):
    n = int(os.environ.get("EGRPO_FUZZ_SPECS", "200"))
    counts = check_bad_specs(tmp_path, n)
    assert sum(counts.values()) == n and set(counts) == set(CLASSES), counts


def test_the_valid_base_specs_are_accepted():
    """The generator's base specs are valid: each refusal above is the one change's doing."""
    for base in (VALID, VALID_BPP):
        JobSpec.from_dict(json.loads(json.dumps(base)))
