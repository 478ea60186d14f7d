"""Fuzz: a few hundred hostile specs (fixed seed, bounded). Through the CLI, none escapes as a
traceback, every refusal names the key that was broken, and a refused spec creates no folder."""

import contextlib
import io
import json
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
