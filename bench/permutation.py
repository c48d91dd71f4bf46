"""V:N:M channel permutation (issue 5): kept score and perplexity on SmolLM2-135M, search time on a 4096 x 11008 layer.

    python bench/permutation.py          # writes bench/results/permutation.json and permutation.md

SmolLM2-135M: RIA scores (a=0.5) from act_sq_mean calibrated on Jane Austen; perplexity on Moby Dick; the same
token chunks for every row. Every nn.Linear but lm_head is pruned, without and with the permutation. Kept
fractions come from the real V:N:M mask. The permuted model is built the zero-cost way (`plan_permutations`,
`apply_output_permutations`, `compress_permuted`), so its perplexity is that of a deployable model.
Timing: a synthetic RIA-like 4096 x 11008 layer (LLaMA-7B's down_proj shape: |N(0,1)| weights, log-normal
activation scale per input column), both orders, full assignments and the blockwise mode. The search runs with
`--search-threads` threads (default 1: its tensors are small and this 2-core machine is shared, where OpenMP's
thread hand-offs cost more than they give); CPU seconds are recorded beside wall seconds, with the load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("VNMSPARSE_NO_KERNELS", "1")  # nothing here needs the CUDA kernels

import numpy as np
import scipy
import torch
import transformers

from vnmsparse.calibrate import collect_act_sq_mean
from vnmsparse.app.data import austen_text, moby_dick_text, token_chunks
from vnmsparse.app.evaluate import perplexity
from vnmsparse.format import compress
from vnmsparse.app.models import load_causal_lm
from vnmsparse.pattern import VNMPattern
from vnmsparse.permute import apply_output_permutations, compress_permuted, find_permutation, plan_permutations
from vnmsparse.scores import ria_scores


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment(args: argparse.Namespace) -> dict:
    """What ran where: command, CPU, library versions, threads and machine load."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"command": shlex.join(["python", *sys.argv]), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "scipy": scipy.__version__,
            "numpy": np.__version__, "transformers": transformers.__version__,
            "threads": {"search": args.search_threads, "model": torch.get_num_threads()},
            "load_average_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def with_threads(threads: int, fn, *args, **kwargs):
    """Run fn with torch limited to `threads`, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def pruned_copy(model: torch.nn.Module, scores: dict, pattern: VNMPattern, plan: dict | None) -> torch.nn.Module:
    """A copy of the model with every scored layer pruned to V:N:M (weights replaced by W * mask, same function
    as the compressed tensor), optionally with the permutation plan applied and folded."""
    pruned = copy.deepcopy(model)
    if plan is not None:
        apply_output_permutations(pruned, plan)
    with torch.no_grad():
        for name, s in scores.items():
            layer = pruned.get_submodule(name)
            if plan is None:
                tensor = compress(layer.weight, pattern, scores=s)
            else:
                tensor = compress_permuted(layer.weight, plan[name].reorder(s), pattern, plan[name].perm_in)
            layer.weight.copy_(tensor.to_dense())
    return pruned


def summarize(per_layer: list[dict]) -> dict:
    """Mean kept fraction before/after over all layers and per layer type."""
    by_type = defaultdict(list)
    for row in per_layer:
        by_type[row["type"]].append(row)
    mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {"all": {"layers": len(per_layer), "kept_before": mean(per_layer, "kept_before"),
                    "kept_after": mean(per_layer, "kept_after")},
            **{t: {"layers": len(rows), "kept_before": mean(rows, "kept_before"), "kept_after": mean(rows, "kept_after")}
               for t, rows in by_type.items()}}


def smollm2(args: argparse.Namespace) -> dict:
    """Dense, pruned and permuted+pruned perplexity of SmolLM2-135M, with per-layer kept fractions."""
    log("loading SmolLM2-135M")
    model, tokenizer = load_causal_lm()
    calib = token_chunks(tokenizer, austen_text(), args.seq_len, args.calib_chunks)
    evaluation = token_chunks(tokenizer, moby_dick_text(), args.seq_len, args.eval_chunks)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    log(f"calibrating {len(names)} layers on {len(calib)} x {args.seq_len} Austen tokens")
    acts = collect_act_sq_mean(model, calib.split(args.batch_size), names, progress=False)
    scores = {n: ria_scores(model.get_submodule(n).weight, acts[n]) for n in names}
    dense = perplexity(model, evaluation, batch_size=args.batch_size, progress=False)
    log(f"dense perplexity {dense:.2f}")
    result = {"calib_chunks": len(calib), "eval_chunks": len(evaluation), "seq_len": args.seq_len,
              "dense_perplexity": dense, "patterns": {}}
    for text in args.patterns:
        pattern = VNMPattern.parse(text)
        plain = perplexity(pruned_copy(model, scores, pattern, None), evaluation, args.batch_size, progress=False)
        runs = [permuted_run(args, model, scores, names, evaluation, pattern, seed) for seed in args.seeds]
        log(f"{pattern}: kept {runs[0]['kept']['all']['kept_before']:.4f} -> "
            + ", ".join(f"{r['kept']['all']['kept_after']:.4f}" for r in runs)
            + f"; perplexity {plain:.1f} -> " + ", ".join(f"{r['perplexity']:.1f}" for r in runs) + " (by seed)")
        result["patterns"][str(pattern)] = {"perplexity": plain, "permuted": runs}
    return result


def permuted_run(args: argparse.Namespace, model: torch.nn.Module, scores: dict, names: list[str],
                 evaluation: torch.Tensor, pattern: VNMPattern, seed: int) -> dict:
    """Plan the permutation with one seed, then prune the folded model and measure its perplexity."""
    start, cpu = time.perf_counter(), time.process_time()
    plan = with_threads(args.search_threads, plan_permutations, model, scores, pattern, iters=args.iters, seed=seed,
                        progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    per_layer = [{"name": n, "type": layer_type(n), "kept_before": plan[n].kept_before,
                  "kept_after": plan[n].kept_after} for n in names]
    ppl = perplexity(pruned_copy(model, scores, pattern, plan), evaluation, args.batch_size, progress=False)
    return {"seed": seed, "perplexity": ppl, "kept": summarize(per_layer), "search_seconds": seconds,
            "search_cpu_seconds": cpu_seconds, "per_layer": per_layer}


def synthetic_layer(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """RIA scores of a Gaussian weight with a log-normal activation scale per input column."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    return ria_scores(weight, torch.randn(cols, generator=g).exp())


def timing(args: argparse.Namespace) -> list[dict]:
    """Full and blockwise search on a 4096 x 11008 layer, both orders, per pattern."""
    scores = synthetic_layer(4096, 11008)
    rows = []
    for text in args.patterns:
        for chunk in (None, args.chunk):
            load = os.getloadavg()[0]
            start, cpu = time.perf_counter(), time.process_time()
            r = with_threads(args.search_threads, find_permutation, scores, text, iters=args.iters, chunk=chunk)
            row = {"shape": [4096, 11008], "pattern": text, "mode": "full" if chunk is None else f"blockwise (chunk={chunk})",
                   "kept_before": r.kept_before, "kept_after": r.kept_after, "seconds": time.perf_counter() - start,
                   "cpu_seconds": time.process_time() - cpu, "load_average_1min": load}
            log(f"4096x11008 {text} {row['mode']}: kept {r.kept_before:.4f} -> {r.kept_after:.4f}, "
                f"{row['seconds']:.0f} s wall, {row['cpu_seconds']:.0f} s CPU")
            rows.append(row)
    return rows


def markdown(record: dict) -> str:
    env, lm = record["environment"], record["smollm2"]
    lines = ["# V:N:M channel permutation", "",
             f"`{env['command']}` on {env['cpu']} ({env['cores']} cores), torch {env['torch']}, scipy {env['scipy']}, "
             f"transformers {env['transformers']}; search threads {env['threads']['search']}; "
             f"load average {env['load_average_start'][0]:.1f} at start, {env['load_average_end'][0]:.1f} at end "
             f"(the machine is shared: wall seconds include waiting; CPU seconds do not). {env['date']}.", "",
             f"## SmolLM2-135M, RIA, every linear but lm_head", "",
             f"Calibration: {lm['calib_chunks']} x {lm['seq_len']} tokens of Jane Austen; perplexity: "
             f"{lm['eval_chunks']} x {lm['seq_len']} tokens of Moby Dick. Dense perplexity **{lm['dense_perplexity']:.2f}**.",
             "", "| pattern | kept score, identity | kept score, permuted | perplexity, identity | perplexity, permuted "
             "| search s (CPU s) |", "|---|---|---|---|---|---|"]
    for pattern, p in lm["patterns"].items():
        first, k = p["permuted"][0], p["permuted"][0]["kept"]["all"]
        lines.append(f"| {pattern} | {k['kept_before']:.4f} | {k['kept_after']:.4f} | {p['perplexity']:.1f} | "
                     f"{first['perplexity']:.1f} | {first['search_seconds']:.0f} ({first['search_cpu_seconds']:.0f}) |")
    lines += ["", "The permuted column is the first search seed. Without fine-tuning these sparsities are far from "
              "dense and perplexity moves a lot with which weights go, so every seed run is listed:", ""]
    for pattern, p in lm["patterns"].items():
        lines.append(f"- {pattern}: " + "; ".join(f"seed {r['seed']}: kept {r['kept']['all']['kept_after']:.4f}, "
                                                 f"perplexity {r['perplexity']:.1f}" for r in p["permuted"]))
    first_kept = next(iter(lm["patterns"].values()))["permuted"][0]["kept"]
    types = [t for t in first_kept if t != "all"]
    lines += ["", "Kept score fraction by layer type (first seed, mean over the 30 layers; identity -> permuted):", "",
              "| pattern | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for pattern, p in lm["patterns"].items():
        kept = p["permuted"][0]["kept"]
        lines.append(f"| {pattern} | " + " | ".join(f"{kept[t]['kept_before']:.4f} -> {kept[t]['kept_after']:.4f}"
                                                  for t in types) + " |")
    lines += ["", "## Search time, 4096 x 11008 layer (synthetic RIA-like scores), both orders", "",
              "| pattern | mode | kept score, identity | kept score, permuted | wall s | CPU s | load (1 min) |",
              "|---|---|---|---|---|---|---|"]
    for row in record["timing"]:
        lines.append(f"| {row['pattern']} | {row['mode']} | {row['kept_before']:.4f} | {row['kept_after']:.4f} | "
                     f"{row['seconds']:.0f} | {row['cpu_seconds']:.0f} | {row['load_average_1min']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patterns", type=lambda s: s.split(","), default=["64:2:8", "64:2:5"])
    parser.add_argument("--calib-chunks", type=int, default=32)
    parser.add_argument("--eval-chunks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                        help="search seeds for the permuted SmolLM2 rows (the first one fills the main table)")
    parser.add_argument("--chunk", type=int, default=256, help="groups per assignment in the blockwise timing rows")
    parser.add_argument("--search-threads", type=int, default=1)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/permutation"))
    args = parser.parse_args()
    record = {"environment": environment(args), "smollm2": smollm2(args)}
    record["timing"] = [] if args.skip_timing else timing(args)
    record["environment"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    log(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
