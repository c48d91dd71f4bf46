"""How fast can any kernel read a decode case's bytes in kernel.py's harness? The floor under the decode targets.

    python bench/decode_floor.py                       # 4096^2, 11008x4096, 8192^2; 64:2:8 and 64:2:5; N = 1, 16

For each case, in one run and one harness (triton do_bench median, L2 flushed before every call, like
bench/kernel.py; and per call inside a CUDA graph over copies beyond L2):
  dense      cuBLAS y = x W^T
  vnm        vnmsparse.ops.linear on the packed weight
  read_vnm   the fastest of a sweep of Triton streaming-read kernels over exactly the packed weight's bytes
             (vectorised 16-byte loads, grid-stride, one int32 XOR per program so nothing is optimised away):
             what any V:N:M decode kernel must at least spend, with no gather, no MMA, no reduction
  read_dense the same read over the dense weight's bytes
  empty      a one-program Triton kernel that stores one word: the harness's per-call floor
A speedup target T is reachable in this harness only if dense / read_vnm >= T. Results go to
bench/results/decode-floor-<gpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

import vnmsparse as vs
from vnmsparse.ops import packed_layout
from vnmsparse import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import bench_ms, copies_for, gpu_slug, graph_ms  # noqa: E402

READ_CONFIGS = [(block, waves, warps) for block in (1024, 2048, 4096) for waves in (1, 2, 4, 8) for warps in (4, 8)]


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr):
    """XOR the int32 words src[pid*BLOCK + i*nprog*BLOCK ...] into out[pid]: a grid-stride streaming read."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=offs < n, other=0, cache_modifier=".cg")
    tl.store(out + pid, tl.xor_sum(acc, axis=0))


@triton.jit
def _empty_kernel(out):
    tl.store(out, 1)


def read_fn(buf: torch.Tensor, block: int, waves: int, warps: int, sms: int):
    """A launch of the read kernel over `buf` (int32 words) with `waves` programs per SM (at most one per block)."""
    n = buf.numel()
    programs = max(1, min(triton.cdiv(n, block), waves * sms))
    out = torch.empty(programs, dtype=torch.int32, device=buf.device)
    return lambda: _read_kernel[(programs,)](buf, out, n, BLOCK=block, num_warps=warps)


def check_read(buf: torch.Tensor, sms: int) -> None:
    """The read kernel really reads every word (the XOR of its outputs is the XOR of all words), before timing."""
    for block, waves, warps in READ_CONFIGS[:4]:
        n = buf.numel()
        programs = max(1, min(triton.cdiv(n, block), waves * sms))
        out = torch.full((programs,), -7, dtype=torch.int32, device=buf.device)
        _read_kernel[(programs,)](buf, out, n, BLOCK=block, num_warps=warps)
        got, want = np.bitwise_xor.reduce(out.cpu().numpy()), np.bitwise_xor.reduce(buf.cpu().numpy())
        if got != want:
            raise SystemExit(f"read kernel wrong: XOR {got} != {want} (block {block}, waves {waves})")


def best_read(nbytes: int, sms: int, args, device) -> tuple[float, float, str]:
    """(eager ms, graph ms, config) of the fastest read of `nbytes` random bytes; graph over copies beyond L2."""
    words = -(-nbytes // 4)
    gen = torch.Generator(device=device).manual_seed(nbytes)
    buf = torch.randint(-(2**31), 2**31 - 1, (words,), dtype=torch.int32, device=device, generator=gen)
    check_read(buf, sms)
    timed = {}
    for block, waves, warps in READ_CONFIGS:
        timed[(block, waves, warps)] = bench_ms(read_fn(buf, block, waves, warps, sms), args.warmup_ms, args.rep_ms)
    cfg = min(timed, key=timed.get)
    bufs = [buf] + [buf.clone() for _ in range(copies_for(nbytes) - 1)]
    graph = graph_ms([read_fn(b, *cfg, sms) for b in bufs])
    return timed[cfg], graph, f"BLOCK={cfg[0]} programs/SM={cfg[1]} warps={cfg[2]}"


def run(args) -> list[dict]:
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    empty_ms = bench_ms(lambda: _empty_kernel[(1,)](flag), args.warmup_ms, args.rep_ms)
    empty_graph = graph_ms([lambda: _empty_kernel[(1,)](flag)] * 8)
    print(f"empty kernel: {1e3 * empty_ms:.1f} us eager, {1e3 * empty_graph:.2f} us in a graph", flush=True)
    records = []
    for shape in args.shapes:
        R, C = (int(v) for v in shape.split("x"))
        W = torch.randn(R, C, device=dev, generator=gen).to(torch.bfloat16)
        dense_read = best_read(W.numel() * 2, sms, args, dev)
        for pattern in args.patterns:
            t = vs.compress(W, pattern)
            packed = packed_layout(t, dev)
            vnm_read = best_read(packed.nbytes, sms, args, dev)
            Wref = t.to_dense().to(torch.float64)
            ts = [t] + [vs.VNMTensor(t.values.clone(), t.columns.clone(), t.positions.clone(), t.pattern, t.shape)
                        for _ in range(copies_for(packed.nbytes) - 1)]
            Ws = [W] + [W.clone() for _ in range(copies_for(W.numel() * 2) - 1)]
            for N in args.n:
                x = torch.randn(N, C, device=dev, generator=gen).to(torch.bfloat16)
                y = ops.linear(x, t)
                ref = x.to(torch.float64) @ Wref.T
                err = float((y.to(torch.float64) - ref).norm() / ref.norm())
                if not err < 1e-2:
                    raise SystemExit(f"{shape} {pattern} N={N}: relative error {err:.2e} (> 1e-2)")
                rec = {
                    "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
                    "R": R, "C": C, "N": N, "pattern": pattern, "rel_err": float(f"{err:.3e}"),
                    "dense_bytes": W.numel() * 2, "vnm_bytes": packed.nbytes,
                    "dense_ms": bench_ms(lambda: torch.matmul(x, W.T), args.warmup_ms, args.rep_ms),
                    "vnm_ms": bench_ms(lambda: ops.linear(x, t), args.warmup_ms, args.rep_ms),
                    "read_dense_ms": dense_read[0], "read_vnm_ms": vnm_read[0], "read_vnm_config": vnm_read[2],
                    "empty_ms": empty_ms,
                    "dense_graph_ms": graph_ms([lambda Wi=Wi: torch.matmul(x, Wi.T) for Wi in Ws]),
                    "vnm_graph_ms": graph_ms([lambda ti=ti: ops.linear(x, ti) for ti in ts]),
                    "read_dense_graph_ms": dense_read[1], "read_vnm_graph_ms": vnm_read[1], "empty_graph_ms": empty_graph,
                }
                for mode in ("", "_graph"):
                    rec[f"speedup{mode}"] = rec[f"dense{mode}_ms"] / rec[f"vnm{mode}_ms"]
                    rec[f"read_ceiling{mode}"] = rec[f"dense{mode}_ms"] / rec[f"read_vnm{mode}_ms"]
                records.append(rec)
                print(f"{shape} N={N} {pattern}: eager dense {1e3 * rec['dense_ms']:.1f} vnm {1e3 * rec['vnm_ms']:.1f} "
                      f"read {1e3 * rec['read_vnm_ms']:.1f} us (x{rec['speedup']:.2f}, read ceiling x{rec['read_ceiling']:.2f}); "
                      f"graph dense {1e3 * rec['dense_graph_ms']:.1f} vnm {1e3 * rec['vnm_graph_ms']:.1f} "
                      f"read {1e3 * rec['read_vnm_graph_ms']:.1f} us (x{rec['speedup_graph']:.2f}, "
                      f"read ceiling x{rec['read_ceiling_graph']:.2f})", flush=True)
            del t, packed, ts, Wref
        del W, Ws
        torch.cuda.empty_cache()
    return records


def write(records: list[dict], command: str) -> None:
    out = Path(__file__).resolve().parent / "results"
    slug = gpu_slug(records[0]["gpu"])
    (out / f"decode-floor-{slug}.json").write_text(json.dumps({"command": command, "records": records}, indent=1) + "\n")
    us = lambda v: f"{1e3 * v:.1f}"  # noqa: E731
    lines = [
        f"# Decode floor on {records[0]['gpu']}",
        "",
        f"torch {records[0]['torch']}, triton {records[0]['triton']}, bf16; `{command}`. Microseconds per call: eager = "
        "triton do_bench median with L2 flushed before every call (bench/kernel.py's harness); graph = per call in a "
        "CUDA graph over weight copies beyond L2. read = the fastest of a sweep of streaming-read kernels over "
        "exactly the packed weight's bytes (no gather, no MMA, no reduction); read ceiling = dense / read: the "
        f"most any kernel that reads these bytes can show here. Empty one-program kernel: {us(records[0]['empty_ms'])} "
        f"eager, {us(records[0]['empty_graph_ms'])} in a graph.",
        "",
        "| R x C | N | pattern | packed MB | eager dense / vnm / read | vnm speedup | read ceiling | graph dense / vnm / read | vnm speedup | read ceiling |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in records:
        lines.append(
            f"| {r['R']}x{r['C']} | {r['N']} | {r['pattern']} | {r['vnm_bytes'] / 1e6:.1f} | "
            f"{us(r['dense_ms'])} / {us(r['vnm_ms'])} / {us(r['read_vnm_ms'])} | {r['speedup']:.2f}x | {r['read_ceiling']:.2f}x | "
            f"{us(r['dense_graph_ms'])} / {us(r['vnm_graph_ms'])} / {us(r['read_vnm_graph_ms'])} | "
            f"{r['speedup_graph']:.2f}x | {r['read_ceiling_graph']:.2f}x |")
    (out / f"decode-floor-{slug}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["4096x4096", "11008x4096", "8192x8192"])
    p.add_argument("--patterns", type=lambda s: s.split(","), default=["64:2:8", "64:2:5"])
    p.add_argument("--n", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16])
    p.add_argument("--warmup-ms", type=float, default=5)
    p.add_argument("--rep-ms", type=float, default=25)
    args = p.parse_args()
    if not torch.cuda.is_available() or ops.extension("cuda") is None:
        raise SystemExit("needs a CUDA GPU with the vnmsparse kernels")
    write(run(args), "python bench/decode_floor.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
