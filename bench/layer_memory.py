"""GPU memory one linear layer holds after its first calls: each V:N:M pattern beside dense and PyTorch's 2:4.

    python bench/layer_memory.py                        # LLaMA shapes, the serving patterns -> bench/results/layer-memory-<gpu>.*
    python bench/layer_memory.py --shapes 4096x4096 --patterns 64:2:8 --out /tmp

A layer is built on the GPU from a random bf16 weight, then called at N = 16 and N = 4096 tokens.
"held" is `torch.cuda.memory_allocated()` after that, minus before, with the inputs, the outputs and the dense
weight it was made from freed: every tensor the layer or the op keeps (packed layouts, caches made on the first
call). "peak" is the most allocated above that during a call, outputs excluded: per-call workspaces (split-k
partials, x^T), returned after the call.
The split-k arrival counters are outside the caching allocator (one buffer of at least 16 KiB per stream, shared
by every layer; `vnm_binding.cpp`), so they are in neither column. Variants: `dense` (nn.Linear), each pattern
through `VNMLinear` in its default layout, the pattern with `+copy` as `VNMLinear(two_four_copy=True)` (the opt-in
2:4 copy), and `2:4` (`to_sparse_semi_structured` of a magnitude 2:4 weight, cuSPARSELt).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vnmsparse.nn import VNMLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import gpu_slug  # noqa: E402
from serving import semi_structured  # noqa: E402

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "14336x4096", "4096x14336", "8192x28672"]
PATTERNS = ["64:2:5", "64:2:8", "128:2:8", "64:2:16", "64:2:8+copy", "64:2:5+copy"]
TOKENS = (16, 4096)
COPY = "+copy"


class SemiStructured(nn.Module):
    """PyTorch's 2:4 linear: F.linear on a `to_sparse_semi_structured` weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        sparse, error = semi_structured(weight)
        if sparse is None:
            raise RuntimeError(error)
        self.weight = nn.Parameter(sparse, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def build(variant: str, weight: torch.Tensor) -> nn.Module:
    """The layer for `variant`, made on the GPU from `weight` (a CPU tensor); what it made on the way is freed."""
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device="cuda")
    dense.weight.data.copy_(weight)
    if variant == "dense":
        return dense
    if variant == "2:4":
        return SemiStructured(dense.weight.data)
    return VNMLinear.from_linear(dense, variant.removesuffix(COPY), two_four_copy=variant.endswith(COPY))


@torch.no_grad()
def measure(variant: str, weight: torch.Tensor) -> dict:
    """Bytes held after building the layer and its first calls, and the transient peak above that during a call."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer = build(variant, weight)
    after_build = torch.cuda.memory_allocated() - before
    peak = 0
    for n in TOKENS:
        x = torch.randn(n, weight.shape[1], dtype=weight.dtype, device="cuda")
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = layer(x)
        torch.cuda.synchronize()
        peak = max(peak, torch.cuda.max_memory_allocated() - start - y.numel() * y.element_size())
        if not torch.isfinite(y).all():  # after the peak is read: the check's own temporaries are not the layer's
            raise RuntimeError(f"{variant}: non-finite output at N = {n}")
        del x, y
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    del layer
    return {"held_bytes": held, "after_build_bytes": after_build, "peak_call_bytes": max(peak, 0)}


def run(shapes: list[str], patterns: list[str]) -> dict:
    # cuBLAS's workspace (32 MiB on Hopper, kept for the process) and cuSPARSELt's are made on their first calls:
    # made here first, so that no variant's "held" includes them.
    warm = torch.randn(64, 64, dtype=torch.bfloat16, device="cuda")
    F.linear(warm, warm)
    with contextlib.suppress(RuntimeError):  # no cuSPARSELt here: the 2:4 rows report why
        SemiStructured(warm)(warm)
    del warm
    rows = []
    for shape in shapes:
        R, C = map(int, shape.split("x"))
        weight = torch.randn(R, C, generator=torch.Generator().manual_seed(R * 31 + C)).to(torch.bfloat16)
        dense_bytes = R * C * 2
        for variant in ["dense", *patterns, "2:4"]:
            try:
                row = measure(variant, weight)
            except Exception as error:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
                row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            rows.append({"shape": shape, "variant": variant, "dense_bytes": dense_bytes, **row})
            print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": list(TOKENS),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(["bench/layer_memory.py", *sys.argv[1:]]), "rows": rows}


def markdown(result: dict) -> str:
    def mb(n: int) -> str:
        return f"{n / 1e6:,.1f}"

    lines = [f"# GPU memory one linear layer holds ({result['gpu']})", "",
             f"torch {result['torch']}, bf16, {result['date']}; `{result['command']}`. Held: allocated after building the layer and "
             f"one call at each N in {result['tokens']}, inputs and outputs freed. Peak: most allocated above that during a "
             "call, outputs excluded (workspaces returned after the call). The split-k counters (>= 16 KiB per stream, "
             "shared by all layers, outside the allocator) are in neither (see `bench/layer_memory.py`).", "",
             "| shape | variant | held MB | x dense weight | peak during a call MB |", "| --- | --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | - | - | {r['error']} |")
        else:
            peak = mb(r["peak_call_bytes"]) if "peak_call_bytes" in r else "-"
            lines.append(f"| {r['shape']} | {r['variant']} | {mb(r['held_bytes'])} | {r['held_bytes'] / r['dense_bytes']:.3f} "
                         f"| {peak} |")
    notes = result.get("notes", [])
    return "\n".join([*lines, *([""] + [f"- {note}" for note in notes] if notes else [])]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=SHAPES, help="RxC list, comma-separated")
    parser.add_argument("--patterns", type=lambda s: s.split(","), default=PATTERNS,
                        help="V:N:M list; a '+copy' suffix turns on the 2:4 copy")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    result = run(args.shapes, args.patterns)
    stem = args.out / f"layer-memory-{gpu_slug(result['gpu'])}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
