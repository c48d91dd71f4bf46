"""What a 2:4 copy's gather of x costs: the window kernel on a 64:2:5 copy, x gathered by the op, pre-gathered,
and gathered by `index_select` first (how the op did it before `vnm_gather.cu`).

    python bench/gather.py                        # -> bench/results/gather-<gpu>.{json,md}
    python bench/gather.py --shapes 4096x4096 --n 64,8192 --out /tmp

Per case, one window kernel (128 x 128 tile up to N = 256, 128 x 256 beyond), k-split 1, timed in CUDA graphs over
weight copies beyond 2x L2 (`serving.graph_us`): the call handed x and the copy's `inputs` (the binding gathers),
the call on x gathered beforehand (the gather's cost is the difference), and `index_select` then the call. The first
two outputs must be equal bit for bit. Bytes moved by a gather: N x (C + copy width) x 2; x is not rotated, so part
of it may come from L2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import gpu_slug  # noqa: E402
from serving import Case, graph_us  # noqa: E402

from vnmsparse import ops  # noqa: E402
from vnmsparse.ops import variants  # noqa: E402
from vnmsparse.ops.pack import copy_inputs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure(shapes: list[str], tokens: list[int]) -> list[dict]:
    ext = ops.extension("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    kernels = {k.name: k for k in variants.KERNELS}
    records = []
    for shape in shapes:
        R, C = (int(v) for v in shape.split("x"))
        case = Case(R, C, "64:2:5+copy", gen)
        p = case.packed
        bare = [dataclasses.replace(q, inputs=None) for q in case.copies]  # the same packs, handed gathered x
        for N in tokens:
            k = kernels["wgmma_window_bf16_m4_c2m1n128s6" if N <= 256 else "wgmma_window_bf16_m4_c2m1n256s4"].index
            x = torch.randn(N, C, device="cuda", generator=gen).to(torch.bfloat16)
            xg = copy_inputs(x, p.inputs).contiguous()
            equal = bool(torch.equal(case.run(ext, p, x, k, 1), case.run(ext, bare[0], xg, k, 1)))
            inside = graph_us([lambda q=q: case.run(ext, q, x, k, 1) for q in case.copies])
            before = graph_us([lambda q=q: case.run(ext, q, xg, k, 1) for q in bare])
            old = graph_us([lambda q=q, b=b: case.run(ext, b, copy_inputs(x, q.inputs), k, 1) for q, b in zip(case.copies, bare)])
            select = graph_us([lambda: copy_inputs(x, p.inputs)] * 8)
            moved = N * (C + p.shape[1]) * 2
            rec = {"shape": shape, "N": N, "kernel": variants.KERNELS[k].name, "equal": equal, "with_inputs_us": round(inside, 2),
                   "pregathered_us": round(before, 2), "index_select_then_run_us": round(old, 2),
                   "index_select_alone_us": round(select, 2), "gather_us": round(inside - before, 2),
                   "gather_tbps": round(moved / max(inside - before, 1e-3) / 1e6, 2),
                   "index_select_tbps": round(moved / select / 1e6, 2)}
            print(rec, flush=True)
            records.append(rec)
        del case
        torch.cuda.empty_cache()
    return records


def markdown(result: dict) -> str:
    lines = [f"# The 2:4 copy's gather of x ({result['gpu']})", "",
             f"torch {result['torch']}, bf16, {result['date']}; `{result['command']}`. 64:2:5 copies (1.2x the columns, "
             "padded to 64), one window kernel per case at k-split 1, CUDA graphs over weight copies beyond 2x L2. "
             "`gather` = the call handed x and `inputs` minus the call on x gathered beforehand (differences of two "
             "timings: noisy where they are a few us, and a negative one is noise); TB/s = N x (C + width) x 2 bytes "
             "over that time. x is the same tensor in every call of a graph, so part of it is read from L2 (as a layer's "
             "input just written by the kernel before would be): a rate above the device's copy bandwidth says that, "
             "or that the difference is noise (4096x14336 at N = 8192).", "",
             "| shape | N | op gathers (us) | x gathered before (us) | index_select + call (us) | gather (us) | gather TB/s | "
             "index_select alone (us) | index_select TB/s | outputs equal |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["records"]:
        lines.append(f"| {r['shape']} | {r['N']} | {r['with_inputs_us']} | {r['pregathered_us']} | "
                     f"{r['index_select_then_run_us']} | {r['gather_us']} | {r['gather_tbps'] if r['gather_us'] > 0 else '-'} | "
                     f"{r['index_select_alone_us']} | {r['index_select_tbps']} | {r['equal']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=["4096x4096", "4096x14336", "14336x4096"])
    parser.add_argument("--n", type=lambda s: [int(v) for v in s.split(",")], default=[64, 256, 1024, 8192])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/gather.py " + " ".join(sys.argv[1:]), "records": measure(args.shapes, args.n)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gather-{gpu_slug(result['gpu'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
