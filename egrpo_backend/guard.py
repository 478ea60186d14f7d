"""The reward-hacking guard: collapse of held-out diversity is what reward hacking looks like.

When held-out diversity falls below `factor` x the base model's, the guard restores the last LoRA
that passed and tells the job to stop (docs/algorithm.md, "Reward hacking").
"""

from __future__ import annotations

from . import lora as lora_lib


class DiversityGuard:
    def __init__(self, factor: float, lora_model, base_diversity: float | None, iteration: int):
        self.factor, self.model, self.base = factor, lora_model, base_diversity
        self.good_iteration, self.good_lora = iteration, lora_lib.lora_tensors(lora_model)

    @property
    def active(self) -> bool:
        return bool(self.factor and self.base)

    def check(self, iteration: int, diversity: float | None) -> dict | None:
        """None if the LoRA passed (it becomes the one to restore), else the guard event's fields."""
        if not self.active or diversity is None or diversity >= self.factor * self.base:
            self.good_iteration, self.good_lora = iteration, lora_lib.lora_tensors(self.model)
            return None
        lora_lib.set_lora_tensors(self.model, self.good_lora)
        return {"iteration": iteration, "diversity": diversity, "base_diversity": self.base,
                "restored": self.good_iteration,
                "message": f"held-out diversity {diversity:.3f} fell below {self.factor:g} x base ({self.base:.3f}): "
                           f"stopped and restored the LoRA of iteration {self.good_iteration}"}
