"""Rules a model or a reward puts on prompts, checked on the whole set, streamed, before anything is
encoded or created (docs/prompts.md): a set of 100,000 prompts that name no digit is refused in
about a second, not after the encoding of all of them."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Callable, Iterator

from .config import JobSpec, SpecError


BLOCK = 65536  # prompts checked at once by a rule's vectorized form


def _digit_rule() -> Callable[[str], object]:
    from .default_model.digits import digit_of_prompt, first_without_one_digit

    digit_of_prompt.first_failure = first_without_one_digit  # the same rule over a block of prompts, vectorized
    return digit_of_prompt


def prompt_rules(spec: JobSpec) -> Iterator[tuple[str, Callable[[str], object]]]:
    """(who asks, rule) pairs; a rule raises ValueError naming what is wrong with a prompt, and may offer
    rule.first_failure(prompts) -> index or None, the same answers over a block (much faster)."""
    if spec.model.source == "default":
        yield "the embedded digits model", _digit_rule()
    elif any(r.get("name") == "digit_probability" for r in spec.rewards):
        yield "the digit_probability reward", _digit_rule()


def check_prompt_rules(spec: JobSpec) -> None:
    """Every training and held-out prompt through every rule, in one streamed pass per set."""
    rules = list(prompt_rules(spec))
    if not rules:
        return
    sets = [("prompts", spec.prompt_set())] + ([("eval_prompts", spec.prompt_set(eval=True))] if spec.eval_prompts else [])
    for key, prompts in sets:
        passed = _passed_marker(prompts, [who for who, _ in rules])
        if passed is not None and passed.is_file():
            continue  # this file (by hash) passed these rules before: a job's start does not read it again
        for start, block in _blocks(prompts):
            for who, rule in rules:
                fast = getattr(rule, "first_failure", None)
                bad = fast(block) if fast else next((j for j, p in enumerate(block) if _fails(rule, p)), None)
                if bad is None:
                    continue
                try:
                    rule(block[bad])
                except ValueError as e:
                    i = start + bad
                    where = prompts.where(i) if hasattr(prompts, "where") else f"prompt {i + 1}"
                    raise SpecError(f"{key}: {e} ({where}; {who} reads the digit from the prompt)") from None
        if passed is not None:
            with contextlib.suppress(OSError):
                passed.write_text("")


def _fails(rule, prompt: str) -> bool:
    try:
        rule(prompt)
        return False
    except ValueError:
        return True


def _blocks(prompts):
    """(index of the first, list of up to BLOCK prompts), streamed."""
    block, start = [], 0
    for i, p in enumerate(prompts):
        block.append(p)
        if len(block) == BLOCK:
            yield start, block
            block, start = [], i + 1
    if block:
        yield start, block


def _passed_marker(prompts, rules: list[str]) -> Path | None:
    """Where a streamed set's pass of these rules is remembered (beside its index, named by its hash)."""
    from .prompt_sets import PromptSet, index_dir

    if not isinstance(prompts, PromptSet) or not index_dir().is_dir():
        return None
    return index_dir() / f"passed-{prompts.sha256}-{hashlib.sha256(chr(10).join(rules).encode()).hexdigest()[:16]}"
