"""Kernel benchmark: vnmsparse V:N:M linear vs cuBLAS dense vs cuSPARSELt 2:4, same run, same data.

    python bench/kernel.py                                  # the full sweep of issue 3
    python bench/kernel.py --shapes 4096x4096 --n 1,16 --patterns 64:2:8 --merge
    python bench/kernel.py --path wgmma --shapes 8192x8192 --n 4096 --variants   # sm_90a sparse wgmma (H100)
    python bench/kernel.py --permute ...                   # weights with a folded input (channel) permutation
    python bench/kernel.py --two-four-copy --patterns 64:2:8 ...   # V:2:8 at large N on its 2:4 copy (more memory)

One record per (R, C, N, pattern, dtype) in bench/results/kernel-<gpu>.json (merged with what is there when
--merge) and a markdown table beside it. y = x @ W^T with W (R x C) bf16 and x (N x C).

Timing: triton.testing.do_bench, median, after warm-up; it zeroes a 256 MB buffer before every repetition, so
each timed call starts with the weights and activations out of L2 (the "rotate beyond L2" requirement).
dense = torch.matmul(x, W.T); cslt24 = torch._cslt_sparse_mm on W pruned 2:4 (magnitude), compressed once with
torch._cslt_compress, with the algorithm torch._cslt_sparse_mm_search picks (null where cuSPARSELt refuses);
vnm = vnmsparse.ops.linear (the public path: custom op, dispatch, kernel).

Ceilings: decode (N <= 16) bytes moved / time against 3.0 TB/s (bytes = packed weight + x + y); tensor-core
path dense-equivalent TFLOP/s (2 R C N / time) against 950 x M / 4 (the mma.sp peak measured on the H100), and for
the sparse-wgmma path against 1979 x M / 4 (the datasheet's 2:4 peak; not yet measured here).
--path wgmma enables the sm_90a kernels (OpsConfig.wgmma), also times the mma.sp path of the same case
(`mma_sp_ms`), and writes kernel-<gpu>-wgmma.json so the committed mma.sp records stay as they are.
rel_err: ||y - ref|| / ||ref|| on the first 64 tokens against float64 W*mask.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import re
import sys
import time
from pathlib import Path

import torch

import vnmsparse as vs
from vnmsparse import ops
from vnmsparse.ops import dispatch, packed_layout, tuned, variants

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "8192x8192", "28672x8192", "768x768", "3072x768", "768x3072"]
NS = [1, 16, 128, 1024, 2048, 4096, 8192]
PATTERNS = ["64:2:5", "64:2:8", "128:2:8", "64:2:16", "64:2:4"]
HBM_TBPS = 3.0  # device-to-device copy, read + write, measured on the lent H100 (shared/ANCHORS.md)
MMA_SP_PEAK = 950.0  # dense-equivalent TFLOP/s of mma.sp m16n8k32 bf16 on the H100 (shared/tools/mma_peak.cu)
WGMMA_SP_PEAK = 1979.0  # dense-equivalent TFLOP/s of 2:4 sparse wgmma bf16, H100 SXM datasheet (unmeasured)


def gpu_slug(name: str) -> str:
    m = re.search(r"(H100|H200|H20|A100|A10G?|L40S?|L4|RTX\s*\d+|B200|GH200)", name, re.I)
    return re.sub(r"\W+", "", m.group(1)).lower() if m else re.sub(r"\W+", "-", name).strip("-").lower()


def bench_ms(fn, warmup_ms: float, rep_ms: float) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def capture(fns) -> torch.cuda.CUDAGraph:
    """fns run once eagerly (warm-up, lazy allocations), then captured back to back into one graph, replayed once."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    return graph


def graph_ms(fns, reps: int = 20) -> float:
    """Per-call time of fns[0], fns[1], ... captured back to back in one CUDA graph and replayed (median of 3 x reps).

    Each fn works on its own copy of the weights (`copies_for`), so consecutive calls stream from DRAM and no CPU
    launch overhead is timed: the steady state of a server's step.
    """
    graph = capture(fns)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (reps * len(fns)))
    return sorted(times)[1]


def copies_for(nbytes: int) -> int:
    """Weight copies whose bytes together exceed twice this GPU's L2 (at least 2, at most 64)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, min(64, -(-2 * l2 // max(nbytes, 1)) + 1))


def prune_24(W: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive columns."""
    R, C = W.shape
    g = W.view(R, C // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
    return (g * keep).view(R, C)


class Cslt:
    """cuSPARSELt 2:4 through PyTorch; every call may be refused (returns None)."""

    def __init__(self, W: torch.Tensor):
        self.error = None
        try:
            self.compressed = torch._cslt_compress(prune_24(W))
        except Exception as error:  # noqa: BLE001 - record the refusal
            self.compressed, self.error = None, f"{type(error).__name__}: {error}"

    def fn(self, x: torch.Tensor):
        if self.compressed is None:
            return None, self.error
        B = x.t()
        try:
            found = torch._cslt_sparse_mm_search(self.compressed, B)
            alg = found if isinstance(found, int) else int(found[0])
            torch._cslt_sparse_mm(self.compressed, B, alg_id=alg)
            torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001
            return None, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return (lambda: torch._cslt_sparse_mm(self.compressed, B, alg_id=alg)), None


def run(args) -> list[dict]:
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    gpu = torch.cuda.get_device_name(dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ext = ops.extension(dev)
    if ext is None:
        raise SystemExit(f"kernels unavailable: {ops.unavailable_reason(dev)}")
    arch = (props.major, props.minor)
    if args.path == "wgmma" and arch != (9, 0):
        raise SystemExit(f"--path wgmma needs an sm_90 GPU, this is sm_{arch[0]}{arch[1]}")
    if args.path != "auto":
        ops.set_config(ops.config().replace(wgmma=args.path == "wgmma"))
    records = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for shape in args.shapes:
        R, C = (int(v) for v in shape.split("x"))
        W = torch.randn(R, C, device=dev, generator=gen).to(dtype)
        cslt = Cslt(W) if not args.no_cslt else None
        xs = {N: torch.randn(N, C, device=dev, generator=gen).to(dtype) for N in args.n}
        dense_ms, dense_graph, cslt_ms, cslt_note = {}, {}, {}, {}
        Ws = None
        for N, x in xs.items():
            dense_ms[N] = bench_ms(lambda: torch.matmul(x, W.T), args.warmup_ms, args.rep_ms)
            if N <= variants.DECODE_MAX_N and not args.no_graph:
                Ws = Ws or [W] + [W.clone() for _ in range(copies_for(W.numel() * W.element_size()) - 1)]
                dense_graph[N] = graph_ms([lambda Wi=Wi: torch.matmul(x, Wi.T) for Wi in Ws])
            cslt_ms[N], cslt_note[N] = None, "skipped"
            if cslt is not None:
                fn, note = cslt.fn(x)
                cslt_note[N] = note
                if fn is not None:
                    cslt_ms[N] = bench_ms(fn, args.warmup_ms, args.rep_ms)
        for pattern in args.patterns:
            t = vs.compress(W, pattern)
            if args.permute:  # what V:N:M channel permutation leaves: kept columns anywhere, so kernels gather x
                t = vs.fold_input_permutation(t, torch.randperm(C, generator=torch.Generator().manual_seed(R + C)))
            packed = packed_layout(t, dev)
            Wref = t.to_dense().to(torch.float64)
            M = t.pattern.M
            copy = args.two_four_copy and dispatch.two_four_copy_refusal(t.pattern.V, M) is None
            ts = None
            for N, x in xs.items():
                window = packed.window
                if copy and dispatch.uses_two_four_copy(N, R, C, t.pattern.V, M, window, args.dtype, props.multi_processor_count,
                                                        arch, tuned.gpu_slug(props.name)):
                    window = 32  # ops.linear runs the weight's 2:4 copy (--two-four-copy)
                kernel = dispatch.choose(N, R, t.pattern.V, args.dtype, props.multi_processor_count, arch, window)
                vnm = functools.partial(ops.linear, x, t, two_four_copy=copy)  # the call every timing below makes
                y = vnm()
                torch.cuda.synchronize()
                k = min(N, 64)
                ref = x[:k].to(torch.float64) @ Wref.T
                err = float((y[:k].to(torch.float64) - ref).norm() / ref.norm())
                vnm_ms = bench_ms(vnm, args.warmup_ms, args.rep_ms)
                vnm_graph = None
                if N in dense_graph:
                    if ts is None:
                        ts = [t] + [
                            vs.VNMTensor(t.values.clone(), t.columns.clone(), t.positions.clone(), t.pattern, t.shape)
                            for _ in range(copies_for(packed.nbytes) - 1)
                        ]
                    vnm_graph = graph_ms([lambda ti=ti: ops.linear(x, ti, two_four_copy=copy) for ti in ts])
                rec = {
                    "gpu": gpu,
                    "torch": torch.__version__,
                    "R": R,
                    "C": C,
                    "N": N,
                    "pattern": pattern,
                    "dtype": args.dtype,
                    "window": packed.window,  # 0: kept columns anywhere (permuted), the kernels gather x
                    "two_four_copy": window != packed.window,  # ran on the weight's 2:4 copy (--two-four-copy)
                    "dense_ms": round(dense_ms[N], 5),
                    "vnm_ms": round(vnm_ms, 5),
                    "cslt24_ms": None if cslt_ms[N] is None else round(cslt_ms[N], 5),
                    "rel_err": float(f"{err:.3e}"),
                    "path": kernel.variant.kind,
                    "kernel": kernel.name,
                    "speedup": round(dense_ms[N] / vnm_ms, 3),
                    "cslt24_speedup": None if cslt_ms[N] is None else round(dense_ms[N] / cslt_ms[N], 3),
                    "cslt24_note": cslt_note[N] if cslt_ms[N] is None else None,
                }
                if vnm_graph is not None:
                    rec["dense_graph_ms"] = round(dense_graph[N], 5)
                    rec["vnm_graph_ms"] = round(vnm_graph, 5)
                    rec["graph_speedup"] = round(dense_graph[N] / vnm_graph, 3)
                if kernel.variant.kind == "decode":
                    moved = packed.nbytes + x.numel() * x.element_size() + N * R * x.element_size()
                    rec["gbps"] = round(moved / (vnm_ms * 1e-3) / 1e9, 1)
                    if vnm_graph is not None:
                        rec["graph_gbps"] = round(moved / (vnm_graph * 1e-3) / 1e9, 1)
                    rec["pct_of_ceiling"] = round(100 * rec["gbps"] / (HBM_TBPS * 1000), 1)
                    rec["ceiling"] = f"{HBM_TBPS} TB/s"
                else:
                    tflops = 2 * R * C * N / (vnm_ms * 1e-3) / 1e12
                    peak, peak_name = (WGMMA_SP_PEAK, "1979") if kernel.variant.kind.startswith("wgmma") else (MMA_SP_PEAK, "950")
                    rec["dense_equiv_tflops"] = round(tflops, 1)
                    rec["pct_of_ceiling"] = round(100 * tflops / (peak * M / 4), 1)
                    rec["ceiling"] = f"{peak * M / 4:.0f} TFLOP/s ({peak_name} x M/4)"
                if kernel.variant.kind == "wgmma":  # the mma.sp kernel on the same case, same run
                    with ops.configure(wgmma=False):
                        rec["mma_sp_ms"] = round(bench_ms(vnm, args.warmup_ms, args.rep_ms), 5)
                if kernel.variant.kind == "wgmma_window":  # the kernel the pack would get without its window, same run
                    gather = dispatch.choose(N, R, t.pattern.V, args.dtype, props.multi_processor_count, arch)
                    with ops.configure(kernel=gather.name):
                        rec["gather_kernel"] = gather.name
                        rec["gather_ms"] = round(bench_ms(vnm, args.warmup_ms, args.rep_ms), 5)
                if args.variants:
                    rec["variants_ms"] = {}
                    for cand in dispatch.candidates(N, t.pattern.V, args.dtype, arch, packed.window):
                        if cand.variant.kind != kernel.variant.kind:
                            continue
                        with ops.configure(kernel=cand.name):
                            rec["variants_ms"][cand.name] = round(bench_ms(vnm, args.warmup_ms, args.rep_ms), 5)
                records.append(rec)
                print(_line(rec), flush=True)
            del t, packed, Wref, ts
        del W, cslt, xs, Ws
        torch.cuda.empty_cache()
    return records


def _line(r: dict) -> str:
    ach = f"{r['gbps']:7.0f} GB/s" if "gbps" in r else f"{r.get('dense_equiv_tflops', 0):7.0f} TF/s"
    cs = "   -   " if r["cslt24_ms"] is None else f"{r['cslt24_ms']:7.4f}"
    graph = f"  graph {r['dense_graph_ms']:.4f}/{r['vnm_graph_ms']:.4f} x{r['graph_speedup']:.2f}" if "vnm_graph_ms" in r else ""
    if "mma_sp_ms" in r:
        graph = f"  mma.sp {r['mma_sp_ms']:.4f} (wgmma x{r['mma_sp_ms'] / r['vnm_ms']:.2f})"
    if "gather_ms" in r:
        graph = f"  gather {r['gather_ms']:.4f} (window x{r['gather_ms'] / r['vnm_ms']:.2f})"
    return (
        f"{r['R']:>5}x{r['C']:<5} N={r['N']:<5} {r['pattern']:>8} {r['path']:>6}  dense {r['dense_ms']:8.4f}  vnm {r['vnm_ms']:8.4f}"
        f"  x{r['speedup']:5.2f}  cslt {cs}  err {r['rel_err']:.1e}  {ach} {r['pct_of_ceiling']:5.1f}%{graph}"
    )


def write(records: list[dict], out_dir: Path, merge: bool, meta: dict, suffix: str = "") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = gpu_slug(records[0]["gpu"]) if records else "unknown"
    path = out_dir / f"kernel-{slug}{suffix}.json"
    key = lambda r: (r["R"], r["C"], r["N"], r["pattern"], r["dtype"])  # noqa: E731
    if merge and path.exists():
        old = json.loads(path.read_text())
        fresh = {key(r) for r in records}
        records = [r for r in old["records"] if key(r) not in fresh] + records
        meta = {**meta, "runs": old.get("meta", {}).get("runs", []) + meta.get("runs", [])}
    order = {s: i for i, s in enumerate(SHAPES)}
    records.sort(key=lambda r: (order.get(f"{r['R']}x{r['C']}", 99), r["R"], r["C"], PATTERNS.index(r["pattern"]) if r["pattern"] in PATTERNS else 99, r["N"]))
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown(records, meta))
    return path, md


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        f"# V:N:M kernel benchmark on {records[0]['gpu'] if records else '?'}",
        "",
        f"torch {records[0]['torch'] if records else '?'}; bf16; median of triton do_bench (L2 flushed before every call);"
        " speedup = dense_ms / vnm_ms (cuBLAS via torch.matmul, same run); cslt24 = cuSPARSELt 2:4 via torch._cslt_sparse_mm"
        " (searched algorithm), '-' where refused. Ceiling: decode GB/s vs 3.0 TB/s; tensor-core dense-equivalent TFLOP/s vs"
        " 950 x M/4 (mma.sp, measured peak) or 1979 x M/4 (wgmma, datasheet 2:4 peak). Graph columns (decode): per-call time inside one CUDA graph over weight copies larger than 2x L2 (no launch"
        " overhead, weights from DRAM). Generated by bench/kernel.py; runs: " + "; ".join(r.get("command", "") for r in meta.get("runs", [])),
        "",
        "| R x C | N | pattern | path | dense ms | vnm ms | vnm speedup | cslt24 ms | cslt24 speedup | rel err | achieved | % of ceiling | graph: dense / vnm ms (speedup) |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    if any("mma_sp_ms" in r or "gather_ms" in r for r in records):  # tensor-core rows: the alternative, same run
        lines[-2] = lines[-2].replace("graph: dense / vnm ms (speedup) |",
                                      "decode: graph dense / vnm ms (speedup); wgmma: mma.sp ms (wgmma over it); "
                                      "wgmma_window: gathering kernel ms (window over it) |")
    for r in records:
        ach = f"{r['gbps']:.0f} GB/s" if "gbps" in r else f"{r['dense_equiv_tflops']:.0f} TFLOP/s"
        cs = "-" if r["cslt24_ms"] is None else f"{r['cslt24_ms']:.4f}"
        csp = "-" if r["cslt24_speedup"] is None else f"{r['cslt24_speedup']:.2f}x"
        graph = f"{r['dense_graph_ms']:.4f} / {r['vnm_graph_ms']:.4f} ({r['graph_speedup']:.2f}x)" if "vnm_graph_ms" in r else ""
        if "mma_sp_ms" in r:
            graph = f"{r['mma_sp_ms']:.4f} ({r['mma_sp_ms'] / r['vnm_ms']:.2f}x)"
        if "gather_ms" in r:
            graph = f"{r['gather_ms']:.4f} ({r['gather_ms'] / r['vnm_ms']:.2f}x)"
        lines.append(
            f"| {r['R']}x{r['C']} | {r['N']} | {r['pattern']} | {r['path']} | {r['dense_ms']:.4f} | {r['vnm_ms']:.4f} | "
            f"{r['speedup']:.2f}x | {cs} | {csp} | {r['rel_err']:.1e} | {ach} | {r['pct_of_ceiling']:.0f}% | {graph} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=lambda s: s.split(","), default=SHAPES, help="RxC list, comma-separated")
    p.add_argument("--n", type=lambda s: [int(v) for v in s.split(",")], default=NS, help="token counts")
    p.add_argument("--patterns", type=lambda s: s.split(","), default=PATTERNS)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--merge", action="store_true", help="keep records of other cases already in the JSON")
    p.add_argument("--variants", action="store_true", help="also time every compiled kernel that can run each case")
    p.add_argument("--path", choices=("auto", "mma_sp", "wgmma"), default="auto",
                   help="tensor-core path: auto (dispatch default, VNMSPARSE_WGMMA), mma_sp, or wgmma (sm_90a; own JSON)")
    p.add_argument("--no-cslt", action="store_true")
    p.add_argument("--two-four-copy", action="store_true",
                   help="weights that can have a 2:4 copy (V:2:M, 5 <= M <= 8, V <= 64) run large N on it: "
                   "ops.linear(..., two_four_copy=True) (own JSON, -two-four)")
    p.add_argument("--permute", action="store_true",
                   help="fold a random input permutation into each weight (as channel permutation does): no chunk windows")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (launch-overhead-free) decode timings")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=40.0)
    args = p.parse_args(argv)
    t0 = time.time()
    records = run(args)
    meta = {
        "runs": [
            {
                "command": "python bench/kernel.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.time() - t0, 1),
                "kernels": len(variants.KERNELS),
            }
        ]
    }
    path, md = write(records, args.out, args.merge, meta, "-wgmma" if args.path == "wgmma" else "-two-four" if args.two_four_copy else "")
    print(f"wrote {path} and {md} ({len(records)} new records)")


if __name__ == "__main__":
    main()
