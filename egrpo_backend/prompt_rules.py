"""Rules a model or a reward puts on prompts, checked on the whole set, streamed, before anything is
encoded or created (docs/prompts.md): a set of 100,000 prompts that name no digit is refused in
about a second, not after the encoding of all of them."""

from __future__ import annotations

from typing import Callable, Iterator

from .config import JobSpec, SpecError


def _digit_rule() -> Callable[[str], object]:
    from .default_model.digits import digit_of_prompt

    return digit_of_prompt


def prompt_rules(spec: JobSpec) -> Iterator[tuple[str, Callable[[str], object]]]:
    """(who asks, rule) pairs; a rule raises ValueError naming what is wrong with a prompt."""
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
        for i, prompt in enumerate(prompts):
            for who, rule in rules:
                try:
                    rule(prompt)
                except ValueError as e:
                    where = prompts.where(i) if hasattr(prompts, "where") else f"prompt {i + 1}"
                    raise SpecError(f"{key} ({where}): {e} ({who} reads the digit from the prompt)") from None
