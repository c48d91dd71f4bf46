"""`vnm profile`: measure the V:N:M op against dense cuBLAS on this GPU and write a speed table.

Every pattern is checked against the float64 reference first, then timed: the median of many calls,
each after an L2 flush, with CUDA events. The table's aggregate speedup per pattern is total dense time
over total sparse time across the given layer shapes (each counted once), which is what those layers
would gain end to end. Tables are JSON keyed by GPU name and token count; `SpeedTable.for_gpu` finds them.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .format import compress
from .pattern import VNMPattern
from .select import candidate_patterns, gpu_slug

SHIPPED_TABLES = Path(__file__).parent / "tables"
L2_FLUSH_BYTES = 256 * 2**20


def table_path(gpu: str, n_tokens: int, root: Path) -> Path:
    return root / f"speed-{gpu_slug(gpu)}-n{n_tokens}.json"


def cuda_median_ms(fn: Callable[[], object], repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream, flushing L2 before every timed call."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.double() - reference).norm() / reference.norm()).item()


def profile_shape(
    rows: int, cols: int, n_tokens: int, patterns: Iterable[VNMPattern], dtype: torch.dtype = torch.bfloat16,
    repeats: int = 50, max_rel_err: float = 1e-2, progress: bool = True,
) -> dict[str, dict[str, float]]:
    """{pattern: {dense_ms, vnm_ms, speedup, rel_err}} for one (rows x cols) layer and n_tokens tokens."""
    from .ops import linear

    gen = torch.Generator(device="cuda").manual_seed(rows * 7919 + cols)
    weight = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=gen)
    x = torch.randn(n_tokens, cols, device="cuda", dtype=dtype, generator=gen)
    dense_ms = cuda_median_ms(lambda: torch.matmul(x, weight.T), repeats)
    out = {}
    for p in tqdm(list(patterns), desc=f"{rows}x{cols}", disable=not progress, leave=False):
        t = compress(weight, p)
        reference = x.double() @ t.to_dense().double().T
        y = linear(x, t)
        err = relative_error(y, reference)
        if not err <= max_rel_err:
            raise RuntimeError(f"{p} on {rows}x{cols}, N={n_tokens}: relative error {err:.2e} > {max_rel_err}")
        vnm_ms = cuda_median_ms(lambda: linear(x, t), repeats)
        out[str(p)] = {"dense_ms": dense_ms, "vnm_ms": vnm_ms, "speedup": dense_ms / vnm_ms, "rel_err": err}
    return out


def profile(
    shapes: list[tuple[int, int]], n_tokens: int, patterns: list[VNMPattern] | None = None,
    dtype: torch.dtype = torch.bfloat16, repeats: int = 50, progress: bool = True,
) -> dict:
    """Measure every pattern on every shape; returns the table (see module docstring)."""
    if not torch.cuda.is_available():
        raise RuntimeError("vnm profile measures the GPU kernels and needs a CUDA device")
    if not shapes or n_tokens < 1:
        raise ValueError("profile needs at least one (rows, cols) shape and n_tokens >= 1")
    patterns = candidate_patterns() if patterns is None else [VNMPattern.parse(p) for p in patterns]
    distinct = list(dict.fromkeys(shapes))
    per_shape = {f"{r}x{c}": profile_shape(r, c, n_tokens, patterns, dtype, repeats, progress=progress) for r, c in distinct}
    speedups = {}
    for p in map(str, patterns):  # a shape listed k times (k such layers) counts k times
        dense = sum(per_shape[f"{r}x{c}"][p]["dense_ms"] for r, c in shapes)
        sparse = sum(per_shape[f"{r}x{c}"][p]["vnm_ms"] for r, c in shapes)
        speedups[p] = dense / sparse
    return {
        "gpu": torch.cuda.get_device_name(),
        "n_tokens": n_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": [list(s) for s in distinct],
        "layers_per_shape": {f"{r}x{c}": shapes.count((r, c)) for r, c in distinct},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "source": f"measured on {torch.cuda.get_device_name()}, N={n_tokens}, {len(shapes)} shapes",
        "speedups": speedups,
        "per_shape": per_shape,
    }


def write_table(table: dict, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = table_path(table["gpu"], table["n_tokens"], root)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,11008x4096' -> [(4096, 4096), (11008, 4096)]."""
    shapes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", item)
        if match is None or min(int(match[1]), int(match[2])) < 1:
            raise ValueError(f"shapes must look like 'RxC,RxC' with positive ints, got {item!r}")
        shapes.append((int(match[1]), int(match[2])))
    return shapes


def model_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear layer of a model, lm_head excluded, repeats kept."""
    return [(m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
