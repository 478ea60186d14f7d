"""The reward-hacking guard (docs/algorithm.md, "Reward hacking").

A hacked policy raises its reward by collapsing (each prompt gives one shape: held-out diversity
falls) or by drifting away from real images (models that can measure it report a held-out drift,
e.g. the distance to the nearest real digit). When held-out diversity falls below
`diversity_factor` x the base model's, or drift rises above `drift_factor` x the base model's, the
guard restores the last LoRA that passed and tells the job to stop.
"""

from __future__ import annotations

from .. import lora as lora_lib


class HackingGuard:
    def __init__(self, diversity_factor: float, drift_factor: float, lora_model, base: dict | None, iteration: int):
        self.diversity_factor, self.drift_factor, self.model = diversity_factor, drift_factor, lora_model
        self.base = base or {}
        self.good_iteration, self.good_lora = iteration, lora_lib.lora_tensors(lora_model)

    def _failures(self, entry: dict) -> list[str]:
        out = []
        base_div, div = self.base.get("diversity"), entry.get("diversity")
        if self.diversity_factor and base_div and div is not None and div < self.diversity_factor * base_div:
            out.append(f"held-out diversity {div:.3f} fell below {self.diversity_factor:g} x base ({base_div:.3f})")
        base_drift, drift = self.base.get("drift"), entry.get("drift")
        if self.drift_factor and base_drift and drift is not None and drift > self.drift_factor * base_drift:
            out.append(f"held-out drift {drift:.3f} rose above {self.drift_factor:g} x base ({base_drift:.3f})")
        return out

    def check(self, iteration: int, entry: dict) -> dict | None:
        """None if the LoRA passed (it becomes the one to restore), else the guard event's fields."""
        failures = self._failures(entry)
        if not failures:
            self.good_iteration, self.good_lora = iteration, lora_lib.lora_tensors(self.model)
            return None
        lora_lib.set_lora_tensors(self.model, self.good_lora)
        return {"iteration": iteration, "diversity": entry.get("diversity"), "base_diversity": self.base.get("diversity"),
                "drift": entry.get("drift"), "base_drift": self.base.get("drift"), "restored": self.good_iteration,
                "message": f"{' and '.join(failures)}: stopped and restored the LoRA of iteration {self.good_iteration}"}
