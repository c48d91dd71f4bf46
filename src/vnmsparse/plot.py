"""The selection picture: log K per weight against speedup, the Pareto front, and the chosen pattern."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping

from .pattern import VNMPattern
from .select import _normalise, mask_diversity, pareto_patterns


def _spaced(points: list[tuple[float, float]], first: int | None, dx: float = 0.08, dy: float = 0.045) -> list[int]:
    """Indices of the points to label, so that no two labels overlap: a point is labelled when, in axes fractions,
    it lies at least dx across or dy up from every point labelled before it (`first`, the choice, goes first)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    span = lambda v: (max(v) - min(v)) or 1.0  # noqa: E731
    frac = [((x - min(xs)) / span(xs), (y - min(ys)) / span(ys)) for x, y in points]
    order = ([first] if first is not None else []) + [i for i in range(len(points)) if i != first]
    kept: list[int] = []
    for i in order:
        if all(abs(frac[i][0] - frac[j][0]) >= dx or abs(frac[i][1] - frac[j][1]) >= dy for j in kept):
            kept.append(i)
    return kept


def plot_patterns(
    speedups: Mapping[VNMPattern | str, float], choice: VNMPattern | None, path: str | os.PathLike, title: str,
    target: float | None = None,
) -> None:
    """Write a PNG: every pattern as a point, the Pareto front as a line (labelled where labels fit), the speedup
    target as a dashed line and the choice circled (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'vnmsparse[plot]'") from error
    table = _normalise(speedups)
    front = pareto_patterns(table)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([table[p] for p in table], [mask_diversity(p) for p in table], s=12, c="0.6", label="patterns")
    ax.plot([table[p] for p in front], [mask_diversity(p) for p in front], "-o", ms=4, c="tab:blue", label="Pareto front")
    points = [(table[p], mask_diversity(p)) for p in front]
    for i in _spaced(points, front.index(choice) if choice in front else None):
        ax.annotate(str(front[i]), points[i], fontsize=7, xytext=(4, 4), textcoords="offset points")
    if target is not None:
        ax.axvline(target, ls="--", lw=1, c="tab:red", label=f"target {target:g}x")
    if choice is not None:
        ax.scatter([table[choice]], [mask_diversity(choice)], s=160, facecolors="none", edgecolors="tab:red",
                   linewidths=2, label=f"choice {choice}")
    ax.set_xlabel("speedup over dense")
    ax.set_ylabel("log K per weight (mask diversity)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.margins(x=0.08)  # room for the last label
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
