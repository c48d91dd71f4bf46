"""The selection picture: log K per weight against speedup, the Pareto front, and the chosen pattern."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping

from .pattern import VNMPattern
from .select import _normalise, mask_diversity, pareto_patterns


def plot_patterns(
    speedups: Mapping[VNMPattern | str, float], choice: VNMPattern | None, path: str | os.PathLike, title: str
) -> None:
    """Write a PNG: every pattern as a point, the Pareto front as a line, the choice circled (needs matplotlib)."""
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
    for p in front:
        ax.annotate(str(p), (table[p], mask_diversity(p)), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if choice is not None:
        ax.scatter([table[choice]], [mask_diversity(choice)], s=160, facecolors="none", edgecolors="tab:red",
                   linewidths=2, label=f"choice {choice}")
    ax.set_xlabel("speedup over dense")
    ax.set_ylabel("log K per weight (mask diversity)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
