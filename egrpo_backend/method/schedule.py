"""Sigma grids, step entropy and the adaptive merge (docs/algorithm.md, "Step entropy", "Merging") -> EntropyPlan.

Pure arithmetic on the schedule: no model, no torch, microseconds. Notation (docs/algorithm.md / paper):
  sigma_i   noise level at step i (sigma_0 = 1 is pure noise, sigma_T = 0 is clean)
  g_i       diffusion coefficient of the SDE at step i (docs/algorithm.md, "The SDE step"):
              flow_grpo: g_i = a * sqrt(sigma_i / (1 - sigma_i))   (a = eta)
              constant : g_i = a                                   (DanceGRPO)
  step std  g_i * sqrt(sigma_i - sigma_{i+l})   (std of the Gaussian transition over l steps)
  score     exp(h) = sqrt(2 pi e) * step std     (our reading, docs/algorithm.md "Step entropy and its reading"; compared with tau)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

SQRT_2PI_E = math.sqrt(2.0 * math.pi * math.e)
DIFFUSION_KINDS = ("flow_grpo", "constant")


def shifted_sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """T + 1 sigmas from 1 to 0: t_hat = k / T shifted by t = s t_hat / (1 + (s - 1) t_hat)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    out = []
    for i in range(steps + 1):
        t_hat = 1.0 - i / steps
        out.append(shift * t_hat / (1.0 + (shift - 1.0) * t_hat))
    out[-1] = 0.0
    return out


def validate_sigmas(sigmas: Iterable[float]) -> list[float]:
    """Any strictly decreasing grid in [0, 1] ending at 0 (e.g. a ComfyUI SIGMAS tensor)."""
    s = [float(x) for x in sigmas]
    if len(s) < 2:
        raise ValueError(f"a sigma grid needs at least 2 values (got {len(s)}); pass T + 1 sigmas ending at 0")
    if any(not math.isfinite(x) for x in s):
        raise ValueError(f"sigma grid contains NaN/inf: {s}")
    if s[0] > 1.0 + 1e-6 or s[-1] < 0.0:
        raise ValueError(f"flow-matching sigmas must lie in [0, 1]; got first={s[0]:.4g}, last={s[-1]:.4g}")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError("sigma grid must be strictly decreasing (noise -> clean); got " + ", ".join(f"{x:.4g}" for x in s))
    if abs(s[-1]) > 1e-8:
        raise ValueError(f"sigma grid must end at 0 (got {s[-1]:.4g}); append a 0")
    s[-1] = 0.0
    return s


def diffusion_coefficients(sigmas: Sequence[float], eta: float, kind: str = "flow_grpo") -> list[float]:
    """g_i for i = 0..T-1. flow_grpo: at sigma_i = 1 the denominator uses 1 - sigma_{i+1} (docs/algorithm.md, "The sigma = 1 step")."""
    if kind not in DIFFUSION_KINDS:
        raise ValueError(f"unknown diffusion kind {kind!r}; valid: {', '.join(DIFFUSION_KINDS)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    out = []
    for i in range(len(sigmas) - 1):
        if kind == "constant":
            out.append(float(eta))
            continue
        s = sigmas[i]
        denom = 1.0 - s if s < 1.0 else 1.0 - sigmas[i + 1]
        out.append(eta * math.sqrt(s / denom))
    return out


def entropy_score(g: float, sigma: float, sigma_next: float) -> float:
    """exp(h) of the Gaussian transition sigma -> sigma_next (any width): sqrt(2 pi e) * g * sqrt(|dt|)."""
    return SQRT_2PI_E * g * math.sqrt(sigma - sigma_next)


def variance_score(g: float, sigma: float, sigma_next: float) -> float:
    """The variance reading: 2 pi e g^2 |dt| = 2 pi e a^2 sigma/(1 - sigma) |dt| (docs/algorithm.md)."""
    return entropy_score(g, sigma, sigma_next) ** 2


def eq11_score(eta: float):
    """Eq. 11 read literally, with no constant: sigma/(1 - sigma) |dt| = (g / a)^2 |dt| (docs/algorithm.md).

    Through g it keeps the sigma = 1 convention of `diffusion_coefficients`.
    """
    return lambda g, sigma, sigma_next: (g / eta) ** 2 * (sigma - sigma_next)


def reading_score(reading: str, eta: float):
    """The entropy score of one reading in ENTROPY_READINGS; `ours` is the one training uses."""
    scores = {"ours": entropy_score, "variance": variance_score, "eq11": eq11_score(eta)}
    if reading not in scores:
        raise ValueError(f"unknown entropy reading {reading!r}; valid: {', '.join(scores)}")
    return scores[reading]


ENTROPY_READINGS = ("ours", "variance", "eq11")


def merge_width(sigmas: Sequence[float], g: Sequence[float], i: int, tau: float, score=entropy_score) -> int:
    """Smallest l >= 1 (i + l <= T) whose merged score reaches tau; tau <= 0 disables merging.

    DECIDED: if no width reaches tau the step merges to the end (l = T - i), the most entropy available.
    """
    T = len(sigmas) - 1
    if tau <= 0:
        return 1
    for l in range(1, T - i + 1):
        if score(g[i], sigmas[i], sigmas[i + l]) >= tau:
            return l
    return T - i


def parse_active_steps(active: str | Sequence[int] | None, steps: int) -> list[int]:
    """'0-7', '0,2,4', 'all', 'first_half', a list of ints, or None (= first half, the paper's default)."""
    if active is None or active == "first_half":
        out = list(range(max(1, steps // 2)))
    elif active == "all":
        out = list(range(steps))
    elif isinstance(active, str):
        out = []
        for part in active.replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                if not (a.isdigit() and b.isdigit()) or int(a) > int(b):
                    raise ValueError(f"bad active-step range {part!r}; write e.g. '0-7' or '0,2,4' or 'all'")
                out.extend(range(int(a), int(b) + 1))
            elif part.isdigit():
                out.append(int(part))
            else:
                raise ValueError(f"bad active step {part!r}; write e.g. '0-7' or '0,2,4' or 'all'")
    else:
        out = [int(x) for x in active]
    out = sorted(set(out))
    if not out:
        raise ValueError("active steps are empty; give at least one step, e.g. '0-7'")
    bad = [i for i in out if i < 0 or i >= steps]
    if bad:
        raise ValueError(f"active steps {bad} are outside 0..{steps - 1} for a {steps}-step grid")
    return out


@dataclass(frozen=True)
class PlanStep:
    index: int
    sigma: float
    sigma_next: float  # sigma_{i+1}: the grid's next value (the merged target is sigma_{i+merge})
    std: float  # single-step transition std g_i * sqrt(sigma_i - sigma_{i+1})
    entropy: float  # single-step score exp(h) = sqrt(2 pi e) * std
    merge: int  # width l of the consolidated SDE step (1 for ODE steps)
    kind: str  # "sde" (active: a group branches here) or "ode"
    merged_entropy: float  # score of the consolidated step i -> i + merge


@dataclass(frozen=True)
class EntropyPlan:
    sigmas: tuple[float, ...]
    eta: float
    tau: float
    diffusion: str
    g: tuple[float, ...] = field(repr=False)
    steps: tuple[PlanStep, ...] = field(repr=False)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def active(self) -> list[int]:
        return [s.index for s in self.steps if s.kind == "sde"]

    def target(self, i: int) -> int:
        """Grid index reached by the consolidated step that starts at i."""
        return i + self.steps[i].merge

    def to_json(self) -> dict:
        keys = ("index", "sigma", "sigma_next", "std", "entropy", "merge", "kind")
        return {
            "steps": [{k: asdict(s)[k] for k in keys} for s in self.steps],
            "eta": self.eta,
            "tau": self.tau,
            "diffusion": self.diffusion,
        }

    def table(self) -> str:
        head = f"{'step':>4} {'sigma':>7} {'next':>7} {'std':>7} {'entropy':>8} {'':>4} {'merge':>5} {'merged':>7} kind"
        lines = [f"entropy plan: eta={self.eta:g} tau={self.tau:g} diffusion={self.diffusion} T={self.num_steps}", head]
        for s in self.steps:
            hi = "high" if s.entropy >= self.tau else "low"
            span = f"{s.merge}" if s.kind == "sde" else "-"
            merged = f"{s.merged_entropy:7.3f}" if s.kind == "sde" else f"{'-':>7}"
            lines.append(
                f"{s.index:>4} {s.sigma:7.4f} {s.sigma_next:7.4f} {s.std:7.4f} {s.entropy:8.3f} {hi:>4} {span:>5} {merged} {s.kind}"
            )
        return "\n".join(lines)

    def save_png(self, path) -> None:
        from ..plots import plot_entropy_plan

        plot_entropy_plan(self, path)


def check_merge(merge) -> None:
    """merge is "adaptive" (the entropy rule, `merge_width`) or a fixed width: an int >= 1."""
    fixed = isinstance(merge, int) and not isinstance(merge, bool)
    if merge != "adaptive" and not (fixed and merge >= 1):
        raise ValueError(f"merge must be 'adaptive' or a whole number of steps >= 1, got {merge!r}")


def build_plan(
    sigmas: Sequence[float],
    eta: float = 0.7,
    tau: float = 2.2,
    active: str | Sequence[int] | None = "first_half",
    diffusion: str = "flow_grpo",
    reading: str = "ours",
    merge: str | int = "adaptive",
) -> EntropyPlan:
    """The entropy plan of a grid: per-step score, merge width of each active step, SDE/ODE kind.

    `reading` picks the entropy score the merges use (ENTROPY_READINGS); training always uses ours,
    the others are for `plan --reading` (docs/algorithm.md, "Step entropy and its reading").
    `merge` "adaptive" merges by entropy and tau; an int l merges every active step over l steps
    (cut at the end of the grid) and ignores tau: the paper's fixed-merge ablation.
    """
    s = validate_sigmas(sigmas)
    if not (tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number >= 0 (0 disables merging), got {tau}")
    check_merge(merge)
    T = len(s) - 1
    g = diffusion_coefficients(s, eta, diffusion)
    score = reading_score(reading, eta)
    act = set(parse_active_steps(active, T))
    steps = []
    for i in range(T):
        sde = i in act
        if not sde:
            l = 1
        else:
            l = merge_width(s, g, i, tau, score) if merge == "adaptive" else min(merge, T - i)
        std = g[i] * math.sqrt(s[i] - s[i + 1])
        steps.append(
            PlanStep(i, s[i], s[i + 1], std, score(g[i], s[i], s[i + 1]), l, "sde" if sde else "ode", score(g[i], s[i], s[i + l]))
        )
    return EntropyPlan(tuple(s), float(eta), float(tau), diffusion, tuple(g), tuple(steps))
