"""The `vnm` command: one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import prune_job, recover_job
from ..ops.limits import M_RANGE, SUPPORTED_V
from ..pattern import VNMPattern
from ..select import SpeedTable, candidate_patterns, mask_diversity, pareto_patterns, select_pattern


def _info(args: argparse.Namespace) -> int:
    p = VNMPattern.parse(args.pattern)
    dense = 2.0  # bf16 / fp16 bytes per weight
    per_weight = p.bytes_per_weight(dense)
    print(f"pattern            {p}")
    print(f"sparsity           {p.sparsity:.4f}  ({p.N} kept of every {p.M} per row, 4 columns per {p.V}x{p.M} block)")
    print(f"log K per weight   {mask_diversity(p):.4f}  (mask diversity, natural log)")
    ratio = dense / per_weight
    size = (f"{ratio:.2f}x smaller" if ratio >= 1 else
            f"{1 / ratio:.2f}x LARGER: its column indices cost more than pruning saves; use a larger V")
    print(f"bytes per weight   {per_weight:.4f} compressed vs {dense:.1f} dense (16-bit): {size}")
    return 0


def _user_tables() -> Path:
    return Path(os.environ.get("VNMSPARSE_TABLES", Path.home() / ".cache" / "vnmsparse" / "tables"))


def _current_gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _check_output_file(path: str, flag: str) -> None:
    """Raise ValueError now, before any work, if a file cannot be written at `path`."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path!r} is a folder; give a file name")
    if not target.parent.is_dir():
        raise ValueError(f"{flag} {path!r}: the folder {str(target.parent)!r} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise ValueError(f"{flag} {path!r}: the folder {str(target.parent)!r} is not writable")


def _select(args: argparse.Namespace) -> int:
    if args.plot:
        _check_output_file(args.plot, "--plot")
    if args.table:
        if not Path(args.table).is_file():
            raise ValueError(f"--table {args.table!r}: no such file (a JSON table written by `vnm profile`)")
        table = SpeedTable.load(args.table)
    else:
        from ..profile import SHIPPED_TABLES

        table = SpeedTable.find(_current_gpu(), args.tokens, [_user_tables(), SHIPPED_TABLES])
    print(f"speedups from: {table.source}")
    print(f"{'pattern':>10} {'speedup':>8} {'log K/weight':>13} {'sparsity':>9}")
    for p in pareto_patterns(table.speedups):
        print(f"{str(p):>10} {table.speedups[p]:>8.2f} {mask_diversity(p):>13.4f} {p.sparsity:>9.3f}")
    choice = select_pattern(args.target, table.speedups)
    print(f"choice for target {args.target}x: {choice} (speedup {table.speedups[choice]:.2f}, "
          f"log K/weight {mask_diversity(choice):.4f}, sparsity {choice.sparsity:.3f})")
    if args.plot:
        from ..plot import plot_patterns

        plot_patterns(table.speedups, choice, args.plot, f"target {args.target}x; speedups: {table.source}", args.target)
        print(f"plot written to {args.plot}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from .. import profile

    if (args.model is None) == (args.shapes is None):
        raise ValueError("give exactly one of --model or --shapes")
    if args.shapes:
        shapes = profile.parse_shapes(args.shapes)
    else:
        from .models import load_causal_lm

        shapes = profile.model_shapes(load_causal_lm(args.model)[0])
    vs = [int(v) for v in args.vs.split(",")]
    low, _, high = args.ms.partition("-")
    patterns = candidate_patterns(vs, range(int(low), int(high or low) + 1))
    dtype = {"bf16": torch_dtype("bfloat16"), "fp16": torch_dtype("float16")}[args.dtype]
    table = profile.profile(shapes, args.tokens, patterns, dtype, args.repeats)
    path = profile.write_table(table, Path(args.out) if args.out else _user_tables())
    best = sorted(table["speedups"].items(), key=lambda kv: -kv[1])[:10]
    print(f"{table['source']}; fastest patterns:")
    for name, speedup in best:
        print(f"  {name:>9} {speedup:6.2f}x")
    print(f"table written to {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..hf import export_dense

    out = export_dense(args.source, args.dense)
    print(f"dense checkpoint written to {out} (pruned weights stored as zeros; load it with any transformers tool)")
    return 0


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vnm", description="V:N:M sparsity for transformers on Sparse Tensor Cores")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="sparsity, mask diversity and storage of a pattern")
    info.add_argument("pattern", help="V:N:M, e.g. 64:2:8")
    info.set_defaults(run=_info)

    sel = sub.add_parser("select", help="the Pareto front and the most diverse pattern meeting a speedup target")
    sel.add_argument("--target", type=float, required=True, help="required speedup over dense, e.g. 1.5")
    sel.add_argument("--table", help="JSON speed table (default: the one `vnm profile` measured on this GPU, "
                     "else the table shipped for it, else the analytic estimate)")
    sel.add_argument("--tokens", type=int, default=None, help="pick the table measured nearest this token count")
    sel.add_argument("--plot", metavar="PNG", help="also write the Pareto picture to this PNG file")
    sel.set_defaults(run=_select)

    prof = sub.add_parser("profile", help="measure every V:2:M pattern against dense cuBLAS on this GPU")
    prof.add_argument("--model", help="take the layer shapes from this model ('smollm2-135m', HF folder, .gguf)")
    prof.add_argument("--shapes", help="layer shapes as RxC,RxC (e.g. 4096x4096,11008x4096)")
    prof.add_argument("--tokens", type=int, default=16, help="tokens per matmul (N); 16 = decode (default)")
    prof.add_argument("--vs", default=",".join(map(str, SUPPORTED_V)), help="V values to sweep")
    prof.add_argument("--ms", default=f"{M_RANGE[0]}-{M_RANGE[1]}", help="M range to sweep, e.g. 4-32")
    prof.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    prof.add_argument("--repeats", type=int, default=30, help="timed calls per case (median)")
    prof.add_argument("--out", help="folder for the table (default ~/.cache/vnmsparse/tables)")
    prof.set_defaults(run=_profile)

    exp = sub.add_parser("export", help="write a pruned checkpoint as a plain transformers one (pruned weights zero)")
    exp.add_argument("source", help="a folder written by `vnm prune --out`, vnmsparse.save_pretrained or "
                     "model.save_pretrained")
    exp.add_argument("--dense", metavar="DIR", required=True,
                     help="new folder for the dense checkpoint, readable by any tool that loads transformers models")
    exp.set_defaults(run=_export)

    prune_job.add_parser(sub)
    recover_job.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"vnm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
