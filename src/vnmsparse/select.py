"""Choosing V and M: mask diversity, the Pareto front against speed, and the best pattern for a target.

Mask diversity counts the choices a pattern leaves per V x M block: one set of 4 kept columns, C(M, 4)
ways, shared by all V rows, then 2 of those 4 in each row, C(4, 2) = 6 ways, independently:

    K(V, M) = C(M, 4) * 6**V  per block,  reported as log K / (V * M)  per weight.

The brief writes C(M, 4)**4; that would count four independent column choices per block, but the
column step picks a single set of 4 columns for the whole block, so the exponent is 1. Normalising per
weight makes patterns comparable whatever the layer shapes (the brief's observation).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .ops.limits import M_RANGE, SUPPORTED_V
from .ops.tuned import gpu_slug
from .pattern import KEPT_COLUMNS, KEPT_PER_ROW, VNMPattern

KERNEL_VS = SUPPORTED_V
KERNEL_MS = tuple(range(M_RANGE[0], M_RANGE[1] + 1))
ANALYTIC_SOURCE = "analytic estimate (weight-bytes ratio, the memory-bound ceiling; not a measurement)"


def candidate_patterns(vs: Iterable[int] = KERNEL_VS, ms: Iterable[int] = KERNEL_MS) -> list[VNMPattern]:
    """Every V:2:M the GPU kernels serve (V in 16..128, M in 4..32)."""
    return [VNMPattern(V=v, M=m) for v in vs for m in ms]


def mask_diversity(pattern: VNMPattern | str) -> float:
    """log K(V, M) per weight: (log C(M, 4) + V log C(4, 2)) / (V * M), natural log."""
    p = VNMPattern.parse(pattern)
    per_block = math.log(math.comb(p.M, KEPT_COLUMNS)) + p.V * math.log(math.comb(KEPT_COLUMNS, KEPT_PER_ROW))
    return per_block / (p.V * p.M)


def analytic_speedups(patterns: Iterable[VNMPattern | str] | None = None, value_bytes: float = 2.0) -> dict[VNMPattern, float]:
    """Dense bytes over compressed bytes per weight: what a perfectly memory-bound kernel could gain.

    An estimate only, used until a speed table measured on the GPU at hand exists.
    """
    pats = candidate_patterns() if patterns is None else [VNMPattern.parse(p) for p in patterns]
    return {p: value_bytes / p.bytes_per_weight(value_bytes) for p in pats}


@dataclass(frozen=True)
class SpeedTable:
    """Speedups over dense per pattern, and where they come from (a GPU name, or the analytic estimate)."""

    speedups: dict[VNMPattern, float]
    source: str

    @classmethod
    def analytic(cls) -> SpeedTable:
        return cls(analytic_speedups(), ANALYTIC_SOURCE)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpeedTable:
        """Read {"source" or "gpu": ..., "speedups": {"64:2:8": 2.1, ...}} from JSON."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"speed table {os.fspath(path)!r} is not valid JSON: {error}") from error
        if not isinstance(data, dict) or not isinstance(data.get("speedups"), dict):
            raise ValueError(f"speed table {os.fspath(path)!r} needs a 'speedups' object mapping 'V:2:M' to a number")
        source = str(data.get("source") or data.get("gpu") or os.fspath(path))
        return cls(_normalise(data["speedups"]), source)

    @classmethod
    def find(cls, gpu: str | None, n_tokens: int | None, roots: Iterable[str | os.PathLike]) -> SpeedTable:
        """The measured table for this GPU (token count nearest `n_tokens`), searched in `roots` in order;
        the analytic estimate when there is no GPU or no table for it."""
        if gpu is None:
            return cls.analytic()
        for root in roots:
            found = sorted(Path(root).glob(f"speed-{gpu_slug(gpu)}-n*.json"))
            if found:
                def distance(path: Path) -> float:
                    n = int(path.stem.rsplit("-n", 1)[1])
                    return 0.0 if n_tokens is None else abs(math.log(n / n_tokens))
                return cls.load(min(found, key=distance))
        return cls.analytic()


def _normalise(speedups: Mapping[VNMPattern | str, float]) -> dict[VNMPattern, float]:
    if not isinstance(speedups, Mapping) or not speedups:
        raise ValueError("speedups must be a non-empty mapping of pattern -> speedup")
    table = {}
    for key, value in speedups.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise ValueError(f"speedup for {key} must be a finite positive number, got {value!r}")
        table[VNMPattern.parse(key)] = float(value)
    return table


def pareto_patterns(speedups: Mapping[VNMPattern | str, float]) -> list[VNMPattern]:
    """Patterns no other beats on both speedup and diversity, fastest first."""
    table = _normalise(speedups)
    # exact ties on both axes keep the pattern select_pattern would pick: the smaller M, then the smaller V
    ranked = sorted(table, key=lambda p: (-table[p], -mask_diversity(p), p.M, p.V))
    front, best_diversity = [], -math.inf
    for p in ranked:
        if mask_diversity(p) > best_diversity:
            front.append(p)
            best_diversity = mask_diversity(p)
    return front


def select_pattern(target_speedup: float, speedups: Mapping[VNMPattern | str, float] | None = None) -> VNMPattern:
    """The most diverse pattern whose speedup meets the target (the brief's heuristic).

    `speedups` maps patterns to speedups over dense measured on the target GPU; without it the analytic
    estimate is used (see `analytic_speedups`). Raises ValueError when no pattern is fast enough.
    """
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or not target_speedup > 0:
        raise ValueError(f"target_speedup must be a positive number, got {target_speedup!r}")
    table = _normalise(speedups) if speedups is not None else analytic_speedups()
    fast_enough = [p for p, s in table.items() if s >= target_speedup]
    if not fast_enough:
        best = max(table.values())
        raise ValueError(f"no pattern reaches speedup {target_speedup}; the fastest in the table gives {best:.2f}")
    return max(fast_enough, key=lambda p: (mask_diversity(p), table[p], -p.M, -p.V))


@dataclass(frozen=True)
class LayerCost:
    """One linear layer in a per-layer choice: its weight count, its dense time, and its speedups."""

    name: str
    weights: int
    dense_time: float
    speedups: Mapping[VNMPattern | str, float]


@dataclass(frozen=True)
class LayerPlan:
    """A pattern per layer, the end-to-end speedup it gives, and its total log mask diversity."""

    patterns: dict[str, VNMPattern]
    speedup: float
    log_diversity: float


def select_layer_patterns(
    layers: list[LayerCost], target_speedup: float, other_time: float = 0.0, resolution: int = 4000
) -> LayerPlan:
    """The pattern per layer with the highest total diversity whose end-to-end time meets the target.

    A multiple-choice knapsack: each layer picks one pattern; its value is weights * log K per weight,
    its cost the layer's sparse time dense_time / speedup; the budget is (other_time + sum of dense
    times) / target - other_time, where other_time is what pruning does not touch (attention, norms).
    Solved exactly by dynamic programming over the budget cut into `resolution` steps, each layer's cost
    rounded up, so the plan never misses the target (it may, rarely, miss a plan that meets it by less
    than one step). Only each layer's Pareto-optimal patterns are considered: the others never help.
    """
    import numpy as np

    if not layers:
        raise ValueError("layers must be a non-empty list of LayerCost")
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or not target_speedup > 0:
        raise ValueError(f"target_speedup must be a positive number, got {target_speedup!r}")
    if other_time < 0 or resolution < 1:
        raise ValueError("other_time must be >= 0 and resolution >= 1")
    for layer in layers:
        if layer.weights < 1 or not layer.dense_time > 0:
            raise ValueError(f"layer {layer.name!r} needs weights >= 1 and dense_time > 0")
    dense_total = other_time + sum(layer.dense_time for layer in layers)
    budget = dense_total / target_speedup - other_time
    if budget <= 0:
        raise ValueError(f"target {target_speedup}x is out of reach: the untouched time alone takes {other_time / dense_total:.0%}")
    step = budget / resolution

    options = []  # per layer: [(cost in steps, value, pattern)]
    for layer in layers:
        table = _normalise(layer.speedups)
        options.append([(math.ceil(layer.dense_time / table[p] / step - 1e-9), layer.weights * mask_diversity(p), p)
                        for p in pareto_patterns(table)])

    best = np.full(resolution + 1, -np.inf)  # best[b]: best value of the layers so far using exactly b steps
    best[0] = 0.0
    choices = []
    for layer_options in options:
        new = np.full(resolution + 1, -np.inf)
        pick = np.full(resolution + 1, -1)
        for index, (cost, value, _) in enumerate(layer_options):
            if cost > resolution:
                continue
            candidate = np.full(resolution + 1, -np.inf)
            candidate[cost:] = best[: resolution + 1 - cost] + value
            better = candidate > new
            new[better], pick[better] = candidate[better], index
        best = new
        choices.append(pick)
    if not np.isfinite(best).any():
        fastest = sum(layer.dense_time / max(_normalise(layer.speedups).values()) for layer in layers)
        raise ValueError(f"no plan reaches {target_speedup}x: the fastest patterns give {dense_total / (other_time + fastest):.2f}x")

    spent = int(np.argmax(best))
    patterns = {}
    for layer, layer_options, pick in zip(reversed(layers), reversed(options), reversed(choices)):
        cost, _, pattern = layer_options[pick[spent]]
        patterns[layer.name] = pattern
        spent -= cost
    sparse_time = other_time + sum(layer.dense_time / _normalise(layer.speedups)[patterns[layer.name]] for layer in layers)
    log_div = sum(layer.weights * mask_diversity(patterns[layer.name]) for layer in layers)
    return LayerPlan({layer.name: patterns[layer.name] for layer in layers}, dense_total / sparse_time, log_div)
