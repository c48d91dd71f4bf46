"""The serving sweep: every N a server sees, every LLaMA linear shape, V:N:M beside cuBLAS and PyTorch's 2:4.

    python bench/serving.py tune  [--shapes ...] [--patterns ...] [--n ...]   # -> src/vnmsparse/tables/dispatch-<gpu_slug>.json
    python bench/serving.py sweep [--shapes ...] [--patterns ...] [--n ...]   # -> bench/results/serving-<gpu>.{json,md,png}
    python bench/serving.py plot  bench/results/serving-<gpu>.json            # the picture again, from the JSON
    python bench/serving.py tables bench/results/serving-<gpu>.json           # -> src/vnmsparse/tables/speed-<gpu>-n*.json
    python bench/serving.py merge bench/results/serving-<gpu>.json NEW.json   # NEW's cases replace the same cases
    python bench/serving.py compare BASE.json NEW.json                        # two `tune` tables of one kernel change

`tune` times every compiled kernel that can run a case, at every k-split worth trying (stream-K included: ks0),
calling the extension directly, and writes the fastest per case as the GPU's measured dispatch table
(`vnmsparse.ops.tuned`). A pattern written `64:2:8+copy` (or `64:2:5+copy`) stands for the weight's per-layer 2:4
copy: `tune` times the window kernels on the copy's pack, its x gather included where it has one (the table then says, case by case, whether the copy beats the weight's own
pack: `dispatch.uses_two_four_copy`), `sweep` times `ops.linear(..., two_four_copy=True)` and records which layout
ran.
`merge` folds a sweep of some cases (a later run, e.g. after a kernel change) into the full sweep: each record
keeps the run it came from (its own cuBLAS and 2:4 times are from that same run), and the markdown lists the runs.
`compare` reads two `tune` tables of the same cases (before and after a kernel change, timed in one session) and
prints, per case, the best time over the candidates both timed, as a base / new ratio: per N, per kernel and per
k-split, with the cases each side won by more than 0.5%; where one build has kernels the other lacks, also the best
over each table's own candidates. Timing the base twice gives the noise to read it against.
`tables` turns a sweep into the speed tables `vnm select` reads for that GPU, at the token counts of decode, serving
and prefill: per pattern, the sum of cuBLAS times over the sweep's shapes divided by the sum of ours (so the larger
layers weigh more, as in a model). `sweep` times the public path (`vnmsparse.ops.linear`: the op, dispatch, kernel) beside cuBLAS dense
(`F.linear`) and PyTorch 2:4 (`F.linear` on `to_sparse_semi_structured`, cuSPARSELt) and writes JSON, a markdown
table and one speedup-against-N plot per shape.

Timing: each variant runs inside one CUDA graph over copies of its weight that together exceed 2x the L2, so
every call streams its weight from DRAM and no launch overhead is timed (a server's steady state); per-call time
is the median of 5 replays. Every case is checked first on fresh random data (never zeros) with a NaN-poisoned
output against float64 (relative error on the first 64 tokens). Ceilings measured in the same run: a 1 GiB
device copy (bytes read + written) and cuBLAS bf16 at 8192^3.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vnmsparse as vs
from vnmsparse import ops
from vnmsparse.ops import dispatch, packed_layout, tuned, variants

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import copies_for, gpu_slug, graph_ms  # noqa: E402

LLAMA_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "6144x4096", "14336x4096", "4096x14336", "8192x8192",
                "10240x8192", "28672x8192", "8192x28672"]
SERVING_NS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096, 8192]
TUNE_NS = [n for n in SERVING_NS if n <= 1024]
PATTERNS = ["64:2:5", "64:2:8", "128:2:8", "64:2:16"]
TOL = 1e-2  # bf16 operands, fp32 accumulation
RESULTS = Path(__file__).resolve().parent / "results"
TABLES = Path(__file__).resolve().parents[1] / "src" / "vnmsparse" / "tables"


def graph_us(calls) -> float:
    """Per-call microseconds of `calls` in one CUDA graph (`kernel.graph_ms`)."""
    return 1e3 * graph_ms(calls, reps=5)


def ceilings() -> dict:
    """Copy bandwidth (read + write, TB/s) and cuBLAS bf16 TFLOP/s at 8192^3, measured now. The copy is the faster
    of a device-to-device memcpy (in a graph a memcpy node, which may run on a copy engine) and an elementwise
    kernel that reads and writes the same bytes on the SMs, as the kernels measured against it do."""
    src = torch.empty(2**29, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)

    def tbps(call) -> float:
        return round(2 * src.numel() * 2 / (graph_us([call] * 4) * 1e-6) / 1e12, 2)

    memcpy = tbps(lambda: dst.copy_(src))
    kernel = tbps(lambda: torch.bitwise_not(src, out=dst))
    a = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
    mm = graph_us([lambda: a @ b] * 4)
    return {"copy_tbps": max(memcpy, kernel), "memcpy_tbps": memcpy, "kernel_copy_tbps": kernel,
            "cublas_tflops": round(2 * 8192**3 / (mm * 1e-6) / 1e12, 1)}


SMALLEST_BN = {kind: min(k.variant.BN for k in variants.KERNELS if k.variant.kind == kind) for kind in ("wgmma", "wgmma_window")}


def worth_timing(kernel: variants.Kernel, N: int) -> bool:
    """False for a sparse-wgmma tile more than half empty at N tokens where its kind has a narrower tile: never
    competitive. The narrowest tile of a kind is timed at any N (at N = 24 it beat the 32-token decode tiles)."""
    kind, BN = kernel.variant.kind, getattr(kernel.variant, "BN", 0)
    return kind not in SMALLEST_BN or BN == SMALLEST_BN[kind] or 2 * N >= BN
COPY = "+copy"  # pattern suffix: the weight's per-layer 2:4 copy (`ops.linear(..., two_four_copy=True)`)


class Case:
    """One weight shape and pattern on the GPU: the compressed weight, its packed copies (of the 2:4 copy's pack
    for a `+copy` pattern), a float64 dense reference."""

    def __init__(self, R: int, C: int, pattern: str, gen: torch.Generator):
        self.R, self.C = R, C
        self.two_four = pattern.endswith(COPY)
        W = (torch.randn(R, C, device="cuda", generator=gen) + 0.1).to(torch.bfloat16)
        self.tensor = vs.compress(W, pattern.removesuffix(COPY))
        self.pattern = self.tensor.pattern
        self.packed = packed_layout(self.tensor, torch.device("cuda"), two_four=self.two_four)
        self.copies = [self.packed] + [
            dataclasses.replace(self.packed, a_vals=self.packed.a_vals.clone(), a_meta=self.packed.a_meta.clone(),
                                cols=self.packed.cols.clone())
            for _ in range(copies_for(self.packed.nbytes) - 1)
        ]
        self.reference = self.tensor.to_dense().to(torch.float64)
        self.W = W

    def rel_err(self, x: torch.Tensor, y: torch.Tensor) -> float:
        k = min(x.shape[0], 64)
        ref = x[:k].to(torch.float64) @ self.reference.T
        if not torch.isfinite(y[:k]).all() or not torch.isfinite(y).all():
            return float("inf")
        return float((y[:k].to(torch.float64) - ref).norm() / ref.norm())

    def right(self, ext, x: torch.Tensor, kernel: variants.Kernel, ksplit: int) -> bool:
        """Whether `kernel` at `ksplit` fills a NaN-poisoned output with y within TOL of float64 (says so if not)."""
        out = torch.full((x.shape[0], self.R), float("nan"), device="cuda", dtype=torch.bfloat16)
        self.run(ext, self.packed, x, kernel.index, ksplit, out)
        err = self.rel_err(x, out)
        if not err <= TOL:
            print(f"WRONG {kernel.name} ks={ksplit} {self.R}x{self.C} {self.pattern} N={x.shape[0]}: rel err {err:.2e}", flush=True)
        return err <= TOL

    def run(self, ext, packed, x: torch.Tensor, kernel: int, ksplit: int, out=None) -> torch.Tensor:
        """One kernel on one of the packs; a pack that reads other columns than x's (a 2:4 copy's `inputs`) has the
        binding gather them first, as `ops.linear` does: the gather is part of what the copy costs."""
        return ext.run(x, packed.a_vals, packed.a_meta, packed.cols, None, self.R, packed.shape[1], self.pattern.V, kernel,
                       ksplit, out, packed.window, inputs=packed.inputs)


def ksplits(kernel: variants.Kernel, N: int, R: int, Kc: int, sms: int) -> list[int]:
    """The k-splits worth timing for a kernel: 1, its dispatch default, powers of two while the previous split
    left fewer than two waves of CTAs (beyond that a split only adds partial sums), and stream-K where the kernel
    has it (`variants.STREAM_K`, listed first)."""
    stages = getattr(kernel.variant, "stages", 1)
    most = max(1, kernel.k_steps(Kc) // (2 * (kernel.variant.warps if kernel.variant.kind == "decode" else stages)))
    tile_m, tile_n = kernel.tile
    tiles = -(-R // tile_m) * -(-N // tile_n)
    found = {1, min(dispatch.ksplit(kernel, N, R, Kc, sms), most)}
    ks = 2
    while ks <= min(most, 32) and tiles * ks // 2 < 2 * sms:
        found.add(ks)
        ks *= 2
    if kernel.streams_k:
        found.add(variants.STREAM_K)
    return sorted(found)


def tune(args) -> dict:
    ext = ops.extension("cuda")
    props = torch.cuda.get_device_properties(0)
    arch, sms = (props.major, props.minor), props.multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    entries, t0 = [], time.time()
    for shape in args.shapes:
        R, C = (int(v) for v in shape.split("x"))
        for pattern in args.patterns:
            case = Case(R, C, pattern, gen)
            Kc = case.packed.a_vals.shape[1]
            for N in args.n:
                if time.time() - t0 > args.budget_s:
                    print(f"time budget of {args.budget_s} s spent: stopping at {shape} {pattern} N={N}", flush=True)
                    return _table(entries, props.name, args)
                x = torch.randn(N, C, device="cuda", generator=gen).to(torch.bfloat16)
                timed = []
                for kernel in dispatch.candidates(N, case.pattern.V, "bf16", arch, case.packed.window):
                    if not worth_timing(kernel, N):
                        continue
                    if case.two_four and not kernel.window:
                        continue  # the copy serves the window kernel; elsewhere the weight's own pack runs
                    if args.kernels and f"{kernel.variant.kind}_{kernel.variant.tag}" not in args.kernels:
                        continue
                    for ks in ksplits(kernel, N, R, Kc, sms):
                        if not case.right(ext, x, kernel, ks):
                            continue
                        us = graph_us([lambda p=p: case.run(ext, p, x, kernel.index, ks) for p in case.copies])
                        timed.append((us, kernel, ks))
                if not timed:
                    print(f"{shape:>11} {pattern:>8} N={N:<5} no variant timed (--kernels?): the table keeps its entry", flush=True)
                    continue
                timed.sort(key=lambda t: t[0])
                us, best, ks = timed[0]
                entries.append({"V": case.pattern.V, "M": case.pattern.M, "R": R, "C": C, "Kc": Kc, "window": case.packed.window,
                                "N": N, "kind": best.variant.kind, "tag": best.variant.tag, "ksplit": ks, "us": round(us, 2),
                                "candidates_us": {f"{k.variant.kind}_{k.variant.tag}/{s}": round(u, 2) for u, k, s in timed}})
                runner = f"{timed[1][1].variant.kind}_{timed[1][1].variant.tag}/{timed[1][2]} {timed[1][0]:.1f}" if len(timed) > 1 else "-"
                print(f"{shape:>11} {pattern:>8} N={N:<5} best {best.variant.kind}_{best.variant.tag}/ks{ks} {us:8.2f} us"
                      f"  (next {runner}; {len(timed)} timed)", flush=True)
            del case
            torch.cuda.empty_cache()
    return _table(entries, props.name, args)


def _table(entries: list[dict], gpu: str, args) -> dict:
    return {"gpu": gpu, "torch": torch.__version__, "date": _now(), "command": _command(), "entries": entries}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _command() -> str:
    return "python bench/serving.py " + " ".join(sys.argv[1:])


def semi_structured(W: torch.Tensor):
    """PyTorch's 2:4 of W (magnitude, 2 of every 4 consecutive columns), or the error PyTorch gives."""
    from torch.sparse import to_sparse_semi_structured

    R, C = W.shape
    g = W.view(R, C // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
    try:
        return to_sparse_semi_structured((g * keep).view(R, C)), None
    except Exception as error:  # noqa: BLE001 - recorded as the reason the column is empty
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def _time_or_none(calls, check) -> tuple[float | None, str | None]:
    try:
        check()
        return graph_us(calls), None
    except Exception as error:  # noqa: BLE001 - PyTorch 2:4 refuses some N; the record says why
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def sweep(args) -> dict:
    props = torch.cuda.get_device_properties(0)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ceiling = ceilings()
    print(f"ceilings: {ceiling}", flush=True)
    records = []
    for shape in args.shapes:
        R, C = (int(v) for v in shape.split("x"))
        W = (torch.randn(R, C, device="cuda", generator=gen) + 0.1).to(torch.bfloat16)
        dense_copies = [W] + [W.clone() for _ in range(copies_for(W.numel() * 2) - 1)]
        sparse24, why24 = semi_structured(W)
        s24_copies = [sparse24] + [semi_structured(Wi)[0] for Wi in dense_copies[1:]] if sparse24 is not None else []
        cases = {p: Case(R, C, p, gen) for p in args.patterns}
        tensors = {p: [case.tensor] + [vs.VNMTensor(case.tensor.values.clone(), case.tensor.columns.clone(),
                                                    case.tensor.positions.clone(), case.pattern, case.tensor.shape)
                                       for _ in range(len(case.copies) - 1)] for p, case in cases.items()}
        for N in args.n:
            x = torch.randn(N, C, device="cuda", generator=gen).to(torch.bfloat16)
            dense = graph_us([lambda Wi=Wi: F.linear(x, Wi) for Wi in dense_copies])
            s24, s24_note = (None, why24) if sparse24 is None else _time_or_none(
                [lambda Si=Si: F.linear(x, Si) for Si in s24_copies], lambda: F.linear(x, sparse24))
            for pattern, case in cases.items():
                y = ops.linear(x, case.tensor, two_four_copy=case.two_four)
                err = case.rel_err(x, y)
                if not err <= TOL:
                    raise SystemExit(f"WRONG {shape} {pattern} N={N}: rel err {err:.2e}")
                us = graph_us([lambda t=t: ops.linear(x, t, two_four_copy=case.two_four) for t in tensors[pattern]])
                arch, sms, gpu = (props.major, props.minor), props.multi_processor_count, tuned.gpu_slug(props.name)
                own = packed_layout(case.tensor, torch.device("cuda"))
                on_copy = case.two_four and dispatch.uses_two_four_copy(N, R, C, case.pattern.V, case.pattern.M, own.window,
                                                                         "bf16", sms, arch, gpu)
                ran = case.packed if on_copy else own
                kernel_index, ks = dispatch.plan(N, R, case.pattern.V, ran.a_vals.shape[1], "bf16", sms, arch, ran.window, gpu)
                moved = ran.nbytes + 2 * N * (C + R)
                rec = {"R": R, "C": C, "N": N, "pattern": pattern, "dense_us": round(dense, 2), "vnm_us": round(us, 2),
                       "speedup": round(dense / us, 3), "s24_us": None if s24 is None else round(s24, 2),
                       "s24_speedup": None if s24 is None else round(dense / s24, 3), "s24_note": s24_note,
                       "kernel": variants.KERNELS[kernel_index].name, "ksplit": ks, "layout": "two_four" if on_copy else "vnm",
                       "rel_err": float(f"{err:.2e}"),
                       "vnm_tbps": round(moved / (us * 1e-6) / 1e12, 2), "dense_tbps": round(2 * (R * C + N * (C + R)) / (dense * 1e-6) / 1e12, 2),
                       "dense_equiv_tflops": round(2 * R * C * N / (us * 1e-6) / 1e12, 1)}
                rec["pct_of_copy_bw"] = round(100 * rec["vnm_tbps"] / ceiling["copy_tbps"], 1)
                records.append(rec)
                print(f"{shape:>11} N={N:<5} {pattern:>8} dense {dense:8.2f} vnm {us:8.2f} x{rec['speedup']:5.2f}  2:4 "
                      f"{'   -   ' if s24 is None else f'x{dense / s24:5.2f}'}  {rec['kernel']}/ks{ks}  {rec['vnm_tbps']:.2f} TB/s "
                      f"{rec['dense_equiv_tflops']:.0f} TF/s  err {err:.1e}", flush=True)
        del W, dense_copies, sparse24, s24_copies, cases, tensors
        torch.cuda.empty_cache()
    return {"gpu": props.name, "torch": torch.__version__, "cuda": torch.version.cuda, "date": _now(), "command": _command(),
            "ceilings": ceiling, "records": records}


def _run_of(result: dict) -> dict:
    return {k: result[k] for k in ("date", "command", "torch", "cuda", "ceilings")}


def merge(base: dict, new: dict) -> dict:
    """`base` with every case that `new` measured replaced by new's record; each record names its run."""
    key = lambda r: (r["R"], r["C"], r["N"], r["pattern"])  # noqa: E731
    runs = base.get("runs") or [_run_of(base)]
    fresh = {key(r): {**r, "run": len(runs)} for r in new["records"]}
    records = [fresh.pop(key(r), {**r, "run": r.get("run", 0)}) for r in base["records"]] + list(fresh.values())
    return {**base, "runs": [*runs, _run_of(new)], "records": records}


def table_key(entry: dict) -> tuple:
    """The case a dispatch-table entry measured: (V, M, R, C, window, N)."""
    return entry["V"], entry["M"], entry["R"], entry["C"], entry["window"], entry["N"]


def compare(base: dict, new: dict) -> str:
    """Markdown: base / new time per case (> 1: new faster), best over the candidates both tables timed, and per
    candidate; summarised per N, per kernel and per k-split (median, range, cases won by more than 0.5%). A change
    that only split calls run sees the unsplit candidates as its control. Where the builds timed different kernels
    (one adds or drops some), also the best over each table's own candidates: what the change does to the pick."""
    a, b = ({table_key(e): e["candidates_us"] for e in t["entries"] if e.get("candidates_us")} for t in (base, new))
    cases = sorted(a.keys() & b.keys())
    if not cases:
        raise ValueError("compare: the two tables have no case in common that both timed (candidates_us)")
    by_n: dict[int, list[float]] = {}
    by_n_own: dict[int, list[float]] = {}
    by_kernel: dict[str, list[float]] = {}
    by_split: dict[int, list[float]] = {}
    for case in cases:
        both = a[case].keys() & b[case].keys()
        if not both:
            continue
        by_n.setdefault(case[5], []).append(min(a[case][c] for c in both) / min(b[case][c] for c in both))
        by_n_own.setdefault(case[5], []).append(min(a[case].values()) / min(b[case].values()))
        for c in both:
            kernel, ks = c.split("/")
            by_kernel.setdefault(kernel, []).append(a[case][c] / b[case][c])
            by_split.setdefault(int(ks), []).append(a[case][c] / b[case][c])

    def row(label: str, ratios: list[float]) -> str:
        return (f"| {label} | {len(ratios)} | {statistics.median(ratios):.4f} | {min(ratios):.3f}-{max(ratios):.3f} | "
                f"{sum(r > 1.005 for r in ratios)} | {sum(r < 0.995 for r in ratios)} |")

    head = "| {} | cases | median base / new | range | new faster | base faster |\n| --- | ---: | ---: | --- | ---: | ---: |"
    lines = [f"Base: `{base.get('command', '?')}` ({base.get('date', '?')}); new: `{new.get('command', '?')}` "
             f"({new.get('date', '?')}). Ratio > 1: new faster; a side wins a case by more than 0.5%.", "",
             "Best time per case (over the kernel x k-split candidates both timed):", "", head.format("N"),
             *(row(str(n), by_n[n]) for n in sorted(by_n)), row("all", [r for v in by_n.values() for r in v]), "",
             *(["Best time per case over each table's own candidates (the builds timed different kernels):", "",
                head.format("N"), *(row(str(n), by_n_own[n]) for n in sorted(by_n_own)),
                row("all", [r for v in by_n_own.values() for r in v]), ""]
               if any(a[case].keys() != b[case].keys() for case in cases) else []),
             "Per kernel (each k-split both timed):", "", head.format("kernel"),
             *(row(k, by_kernel[k]) for k in sorted(by_kernel)), "",
             "Per k-split (every kernel timed at it; 0 = stream-K):", "", head.format("k-split"),
             *(row(str(ks), by_split[ks]) for ks in sorted(by_split))]
    return "\n".join(lines) + "\n"


def _copy_parts(ceiling: dict) -> str:
    """' (memcpy a, SM kernel b)' where the run measured both copies (runs before that measured the memcpy only)."""
    return f" (memcpy {ceiling['memcpy_tbps']}, SM kernel {ceiling['kernel_copy_tbps']})" if "memcpy_tbps" in ceiling else ""


def markdown(result: dict) -> str:
    recs = result["records"]
    patterns = list(dict.fromkeys(r["pattern"] for r in recs))
    runs = result.get("runs") or [_run_of(result)]
    lines = [f"# Serving sweep on {result['gpu']}", "",
             "Speedup = cuBLAS dense time / ours, both in CUDA graphs over weight copies > 2x L2, same run; 2:4 = PyTorch "
             "`to_sparse_semi_structured` (cuSPARSELt). bf16. " + ("Runs (each record's dense and 2:4 times are from its own run):"
                                                                   if len(runs) > 1 else "Run:"), ""]
    for i, run in enumerate(runs):
        n = sum(1 for r in recs if r.get("run", 0) == i)
        lines.append(f"- run {i}: {run['date']}, torch {run['torch']} (CUDA {run['cuda']}), `{run['command']}`; ceilings "
                     f"{run['ceilings']['copy_tbps']} TB/s device copy{_copy_parts(run['ceilings'])}, "
                     f"{run['ceilings']['cublas_tflops']} TFLOP/s cuBLAS bf16 "
                     f"8192^3; {n} records now from it")
    lines += ["", "## Worst case per pattern", "",
             "| pattern | N range | worst speedup | where | best speedup |", "| --- | --- | ---: | --- | ---: |"]
    for p in patterns:
        for lo, hi in ((1, 16), (17, 1024), (2048, 8192)):
            sel = [r for r in recs if r["pattern"] == p and lo <= r["N"] <= hi]
            if sel:
                worst, best = min(sel, key=lambda r: r["speedup"]), max(sel, key=lambda r: r["speedup"])
                lines.append(f"| {p} | {lo}-{hi} | {worst['speedup']:.2f}x | {worst['R']}x{worst['C']} N={worst['N']} "
                             f"({worst['kernel']}) | {best['speedup']:.2f}x |")
    for shape in dict.fromkeys(f"{r['R']}x{r['C']}" for r in recs):
        ns = sorted({r["N"] for r in recs if f"{r['R']}x{r['C']}" == shape})
        lines += ["", f"## {shape} (speedup over cuBLAS; dense us in the first row)", "",
                  "| | " + " | ".join(str(n) for n in ns) + " |", "| --- |" + " ---: |" * len(ns)]
        row = {(r["pattern"], r["N"]): r for r in recs if f"{r['R']}x{r['C']}" == shape}
        first = {n: row[(patterns[0], n)] for n in ns if (patterns[0], n) in row}
        lines.append("| dense us | " + " | ".join(f"{first[n]['dense_us']:.1f}" if n in first else "" for n in ns) + " |")
        for p in patterns:
            lines.append(f"| {p} | " + " | ".join(f"{row[(p, n)]['speedup']:.2f}" if (p, n) in row else "" for n in ns) + " |")
        lines.append("| 2:4 | " + " | ".join(f"{first[n]['s24_speedup']:.2f}" if n in first and first[n]["s24_speedup"] else "-"
                                            for n in ns) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """One panel per shape: speedup over cuBLAS against N (log axis), a line per pattern and PyTorch 2:4, 1.0x marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    shapes = list(dict.fromkeys(f"{r['R']}x{r['C']}" for r in recs))
    cols = min(5, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, shape in zip(axes.flat, shapes):
        sel = [r for r in recs if f"{r['R']}x{r['C']}" == shape]
        for p in dict.fromkeys(r["pattern"] for r in sel):
            pts = sorted((r["N"], r["speedup"]) for r in sel if r["pattern"] == p)
            ax.plot(*zip(*pts), marker="o", ms=3, label=p)
        pts = sorted({(r["N"], r["s24_speedup"]) for r in sel if r["s24_speedup"]})
        if pts:
            ax.plot(*zip(*pts), marker="x", ms=4, ls="--", color="gray", label="PyTorch 2:4")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(shape, fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xlabel("N (tokens)")
    for ax in axes.flat[len(shapes):]:
        ax.axis("off")
    axes[0][0].set_ylabel("speedup over cuBLAS")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"V:N:M linear vs cuBLAS bf16 on {result['gpu']} (CUDA graphs, weights from DRAM)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed_tables(result: dict, tokens: list[int], out_dir: Path) -> list[Path]:
    """`vnm select` tables (`select.SpeedTable` JSON) from a sweep, one per token count that the sweep measured."""
    written = []
    for n in tokens:
        recs = [r for r in result["records"] if r["N"] == n and not r["pattern"].endswith(COPY)]  # patterns only
        if not recs:
            raise SystemExit(f"--tokens: the sweep has no N = {n}")
        patterns = sorted({r["pattern"] for r in recs})
        speedups = {p: sum(r["dense_us"] for r in recs if r["pattern"] == p) / sum(r["vnm_us"] for r in recs if r["pattern"] == p)
                    for p in patterns}
        shapes = sorted({f"{r['R']}x{r['C']}" for r in recs})
        per_shape = {shape: {r["pattern"]: {"dense_ms": r["dense_us"] / 1e3, "vnm_ms": r["vnm_us"] / 1e3,
                                            "speedup": r["dense_us"] / r["vnm_us"], "rel_err": r["rel_err"]}
                             for r in recs if f"{r['R']}x{r['C']}" == shape} for shape in shapes}
        table = {"gpu": result["gpu"], "n_tokens": n, "dtype": "bfloat16", "shapes": shapes, "torch": result["torch"],
                 "source": f"measured on {result['gpu']}, N={n}, {len(shapes)} LLaMA shapes, {len(patterns)} patterns "
                           f"(bench/serving.py sweep, {result['date']})",
                 "speedups": speedups, "layers_per_shape": {shape: 1 for shape in shapes}, "per_shape": per_shape}
        path = out_dir / f"speed-{tuned.gpu_slug(result['gpu'])}-n{n}.json"
        path.write_text(json.dumps(table, indent=1) + "\n")
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("tune", "sweep", "plot", "tables", "merge", "compare"))
    parser.add_argument("json", nargs="?", type=Path, help="plot, tables, merge: the sweep JSON to read; compare: the base table")
    parser.add_argument("new_json", nargs="?", type=Path,
                        help="merge: the sweep whose cases replace the same cases; compare: the new table")
    parser.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[16, 256, 2048],
                        help="tables: token counts (decode, serving, prefill) to write tables for")
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=LLAMA_SHAPES, help="RxC list, comma-separated")
    parser.add_argument("--patterns", type=lambda s: s.split(","), default=PATTERNS)
    parser.add_argument("--n", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help=f"token counts (default: tune {TUNE_NS[0]}..{TUNE_NS[-1]}, sweep {SERVING_NS[0]}..{SERVING_NS[-1]})")
    parser.add_argument("--out", type=Path, default=None, help="output folder (tune: the tables folder; sweep: bench/results)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="tune: stop (and write what was measured) after this long")
    parser.add_argument("--merge", action="store_true", help="tune: keep the table's entries for cases not measured now")
    parser.add_argument("--kernels", type=lambda s: set(s.split(",")), default=None,
                        help="tune: time only these variants (kind_tag, as in the table's candidates_us, e.g. "
                             "wgmma_v64_c2m1n64s8), e.g. those that won a previous tune; default: every candidate")
    args = parser.parse_args(argv)
    if args.mode == "merge":
        if not (args.json and args.json.is_file() and args.new_json and args.new_json.is_file()):
            parser.error("merge needs two existing sweep JSON files: the full sweep, then the new one")
        result = merge(json.loads(args.json.read_text()), json.loads(args.new_json.read_text()))
        _write_sweep(result, args.json)
        return
    if args.mode == "compare":
        if not (args.json and args.json.is_file() and args.new_json and args.new_json.is_file()):
            parser.error("compare needs two existing tune tables (JSON): the base, then the new one")
        print(compare(json.loads(args.json.read_text()), json.loads(args.new_json.read_text())), end="")
        return
    if args.mode in ("plot", "tables"):
        if args.json is None or not args.json.is_file():
            parser.error(f"{args.mode} needs the sweep JSON (an existing file), got {args.json}")
        result = json.loads(args.json.read_text())
        if args.mode == "plot":
            plot(result, args.json.with_suffix(".png"))
        else:
            for path in speed_tables(result, args.tokens, args.out or TABLES):
                print(f"wrote {path}")
        return
    args.n = args.n or (TUNE_NS if args.mode == "tune" else SERVING_NS)
    gpu = torch.cuda.get_device_name(0)
    if args.mode == "tune":
        table = tune(args)
        out = (args.out or TABLES) / tuned.table_name(tuned.gpu_slug(gpu))
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.merge and out.exists():  # keep the cases this run did not measure
            fresh = {table_key(e) for e in table["entries"]}
            kept = [e for e in json.loads(out.read_text())["entries"] if table_key(e) not in fresh]
            table["entries"] = sorted(kept + table["entries"], key=table_key)
        out.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {out} ({len(table['entries'])} cases)")
    else:
        out = (args.out or RESULTS) / f"serving-{gpu_slug(gpu)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_sweep(sweep(args), out)


def _write_sweep(result: dict, out: Path) -> None:
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} (+ .md, .png; {len(result['records'])} records)")


if __name__ == "__main__":
    main()
