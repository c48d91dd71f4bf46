"""The `vnm` command: one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from .pattern import VNMPattern
from .select import SpeedTable, mask_diversity, pareto_patterns, select_pattern


def _info(args: argparse.Namespace) -> int:
    p = VNMPattern.parse(args.pattern)
    dense = 2.0  # bf16 / fp16 bytes per weight
    per_weight = p.bytes_per_weight(dense)
    print(f"pattern            {p}")
    print(f"sparsity           {p.sparsity:.4f}  ({p.N} kept of every {p.M} per row, 4 columns per {p.V}x{p.M} block)")
    print(f"log K per weight   {mask_diversity(p):.4f}  (mask diversity, natural log)")
    print(f"bytes per weight   {per_weight:.4f} compressed vs {dense:.1f} dense (16-bit): {dense / per_weight:.2f}x smaller")
    return 0


def _select(args: argparse.Namespace) -> int:
    table = SpeedTable.load(args.table) if args.table else SpeedTable.analytic()
    print(f"speedups from: {table.source}")
    print(f"{'pattern':>10} {'speedup':>8} {'log K/weight':>13} {'sparsity':>9}")
    for p in pareto_patterns(table.speedups):
        print(f"{str(p):>10} {table.speedups[p]:>8.2f} {mask_diversity(p):>13.4f} {p.sparsity:>9.3f}")
    choice = select_pattern(args.target, table.speedups)
    print(f"choice for target {args.target}x: {choice} (speedup {table.speedups[choice]:.2f}, "
          f"log K/weight {mask_diversity(choice):.4f}, sparsity {choice.sparsity:.3f})")
    if args.plot:
        from .plot import plot_patterns

        plot_patterns(table.speedups, choice, args.plot, f"target {args.target}x; speedups: {table.source}")
        print(f"plot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vnm", description="V:N:M sparsity for transformers on Sparse Tensor Cores")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="sparsity, mask diversity and storage of a pattern")
    info.add_argument("pattern", help="V:N:M, e.g. 64:2:8")
    info.set_defaults(run=_info)

    sel = sub.add_parser("select", help="the Pareto front and the most diverse pattern meeting a speedup target")
    sel.add_argument("--target", type=float, required=True, help="required speedup over dense, e.g. 1.5")
    sel.add_argument("--table", help="JSON speed table measured on your GPU (default: the analytic estimate)")
    sel.add_argument("--plot", metavar="PNG", help="also write the Pareto picture to this PNG file")
    sel.set_defaults(run=_select)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"vnm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
