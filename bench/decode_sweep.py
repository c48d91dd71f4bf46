"""Sweep every decode kernel and k-split on the decode shapes, against the dispatcher's choice (issue 3).

The decode kernel reaches only 20-50% of HBM bandwidth at 4096x4096 (ncu: latency-bound), so the question is
whether more CTAs (a larger k-split, fewer 16-row tiles per warp) beat the dispatcher's cost model. Each
(kernel, ksplit) is checked against float64 on a poisoned output, then timed with triton's do_bench (L2 flushed
before every call) through the binding, so no Python op overhead is in the number.

    python bench/decode_sweep.py [--shapes 4096x4096,...] [--n 1,16] [--patterns 64:2:8,64:2:5] [--gather]

The weights are unpermuted, so the kernels take x by chunk windows (`PackedVNM.window`, what the op does);
`--gather` forces the per-column gather instead (the path of permuted weights), for an A/B of the two.
Writes bench/results/decode-sweep-<gpu>[-gather].json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from kernel import bench_ms, gpu_slug

import vnmsparse as vs
from vnmsparse import ops
from vnmsparse.ops import dispatch, packed_layout, variants


def sweep_case(ext, R: int, C: int, N: int, pattern: str, sms: int, arch, rep_ms: float, gather: bool) -> dict:
    """Time every (decode kernel, ksplit) for one case; the dispatcher's pick and the fastest."""
    gen = torch.Generator(device="cuda").manual_seed(R + C + N)
    t = vs.compress(torch.randn(R, C, device="cuda", generator=gen).to(torch.bfloat16), pattern)
    p = packed_layout(t, torch.device("cuda"))
    x = torch.randn(N, C, device="cuda", generator=gen).to(torch.bfloat16)
    ref = x.double() @ t.to_dense().double().T
    kc = p.a_vals.shape[1]
    window = 0 if gather else p.window
    chosen = dispatch.choose(N, R, t.pattern.V, "bf16", sms, arch)
    chosen_ks = dispatch.decode_ksplit(chosen, R, kc, sms)
    grid = []
    for k in dispatch.candidates(N, t.pattern.V, "bf16", arch):
        if k.variant.kind != "decode":
            continue
        for ks in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32} & set(range(1, max(1, kc // k.variant.warps) + 1))):
            out = torch.full((N, R), float("nan"), device="cuda", dtype=torch.bfloat16)
            ext.run(x, p.a_vals, p.a_meta, p.cols, None, R, C, t.pattern.V, k.index, ks, out, window)
            err = float((out.double() - ref).norm() / ref.norm())
            if not err <= 1e-2:
                raise RuntimeError(f"{k.name} ksplit={ks} on {R}x{C} N={N} {pattern}: relative error {err:.2e}")
            ms = bench_ms(lambda k=k, ks=ks: ext.run(x, p.a_vals, p.a_meta, p.cols, None, R, C, t.pattern.V, k.index,
                                                     ks, out, window), 5, rep_ms)
            grid.append({"kernel": k.name, "ksplit": ks, "ms": round(ms, 5), "rel_err": float(f"{err:.2e}")})
    dense_w = t.to_dense().to(torch.bfloat16)  # cuBLAS on the same (masked) weight, built once outside the timing
    dense = bench_ms(lambda: torch.matmul(x, dense_w.T), 5, rep_ms)
    best = min(grid, key=lambda g: g["ms"])
    pick = next(g for g in grid if g["kernel"] == chosen.name and g["ksplit"] == chosen_ks)
    return {"R": R, "C": C, "N": N, "pattern": pattern, "x_path": "window" if window else "gather",
            "dense_ms": round(dense, 5), "chosen": pick, "best": best, "grid": grid}


def markdown(gpu: str, records: list[dict]) -> str:
    lines = [f"# Decode kernel and k-split sweep on {gpu}", "",
             "Every decode kernel x ksplit through the binding (no Python op overhead), do_bench median with L2 flushed; "
             + ("every kernel gathers x by column (`python bench/decode_sweep.py --gather`)."
                if records and records[0]["x_path"] == "gather" else
                "the 16-token kernels copy x by chunk windows, the 8-token ones gather (`python bench/decode_sweep.py`)."),
             "",
             "| R x C | N | pattern | dense ms | dispatcher: kernel, ksplit | ms | x dense | fastest: kernel, ksplit | ms | x dense |",
             "| --- | ---: | --- | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in records:
        c, b = r["chosen"], r["best"]
        lines.append(f"| {r['R']}x{r['C']} | {r['N']} | {r['pattern']} | {r['dense_ms']:.4f} | {c['kernel']}, {c['ksplit']} | "
                     f"{c['ms']:.4f} | {r['dense_ms'] / c['ms']:.2f}x | {b['kernel']}, {b['ksplit']} | {b['ms']:.4f} | "
                     f"{r['dense_ms'] / b['ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,8192x8192,28672x8192")
    p.add_argument("--n", default="1,16")
    p.add_argument("--patterns", default="64:2:8,64:2:5")
    p.add_argument("--rep-ms", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--gather", action="store_true", help="take x by per-column gather even where windows apply")
    args = p.parse_args()
    ext = ops.extension("cuda")
    if ext is None:
        raise SystemExit(f"kernels unavailable: {ops.unavailable_reason('cuda')}")
    props = torch.cuda.get_device_properties(0)
    arch, gpu = (props.major, props.minor), torch.cuda.get_device_name()
    records = []
    for shape in args.shapes.split(","):
        R, C = (int(v) for v in shape.split("x"))
        for pattern in args.patterns.split(","):
            for N in (int(v) for v in args.n.split(",")):
                if N > variants.DECODE_MAX_N:
                    raise SystemExit(f"--n: decode covers N <= {variants.DECODE_MAX_N}, got {N}")
                r = sweep_case(ext, R, C, N, pattern, props.multi_processor_count, arch, args.rep_ms, args.gather)
                records.append(r)
                print(f"{shape:>11} N={N:<3} {pattern}  chosen {r['chosen']['kernel']}/{r['chosen']['ksplit']} "
                      f"{r['chosen']['ms']:.4f}  best {r['best']['kernel']}/{r['best']['ksplit']} {r['best']['ms']:.4f}  "
                      f"dense {r['dense_ms']:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decode-sweep-{gpu_slug(gpu)}{'-gather' if args.gather else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "records": records}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(gpu, records))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
