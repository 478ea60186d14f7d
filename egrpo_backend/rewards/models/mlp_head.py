"""The MLP head shared by ImageReward and the LAION aesthetic predictor v2 (same code, same key names).

nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
Dropout(0.1), Linear(64, 16), Linear(16, 1)) with no activations (the authors left the ReLUs
commented out), so the Linear layers' keys are layers.{0,2,4,6,7}.{weight,bias}. Sizes are read from
the weights, so test checkpoints may be smaller.
"""

from __future__ import annotations

import torch
from torch import nn

LINEAR_INDICES = (0, 2, 4, 6, 7)


def mlp_head(weights: dict[str, torch.Tensor], prefix: str = "layers.") -> nn.Sequential:
    """The head with `weights` loaded strictly ({prefix}{i}.weight / .bias for i in LINEAR_INDICES)."""
    expected = {f"{prefix}{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias")}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"not the published MLP head: missing {missing[:6]}, unexpected {extra[:6]}")
    layers: list[nn.Module] = []
    for n, i in enumerate(LINEAR_INDICES):
        out_f, in_f = weights[f"{prefix}{i}.weight"].shape
        layers.append(nn.Linear(in_f, out_f))
        if n + 1 < len(LINEAR_INDICES) and LINEAR_INDICES[n + 1] == i + 2:
            layers.append(nn.Dropout(0.0))  # placeholder at the published index; dropout is off when scoring
    mlp = nn.Sequential(*layers)
    mlp.load_state_dict({k[len(prefix):]: v.float() for k, v in weights.items()}, strict=True)
    return mlp
