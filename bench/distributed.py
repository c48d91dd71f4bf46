"""Distributed V:N:M training and pruning under torchrun (issue 9). NCCL on GPUs, gloo on the CPU.

    torchrun --nproc_per_node 1 bench/distributed.py lora --strategy none   # the one-GPU reference
    torchrun --nproc_per_node 2 bench/distributed.py lora --strategy ddp
    torchrun --nproc_per_node 2 bench/distributed.py lora --strategy fsdp
    torchrun --nproc_per_node 2 bench/distributed.py prune                  # LLaMA-2-13B-sized, random init

lora: three-staged LoRA on SmolLM2-135M (Austen), a fixed global batch split over the ranks, so every world
size does the same optimisation; checks that all ranks end with bit-identical masks and merged weights and
reports steps/s and Moby Dick perplexity. prune: layer-by-layer RIA calibration and V:N:M pruning of a
decoder stack whose layers are split over the ranks (rank r holds a contiguous slice and passes the pruned
hidden states on to rank r+1); reports time and peak memory per rank. `--smoke` shrinks everything for gloo
on the CPU. Rank 0 merges each run by name into --out.json and rewrites --out.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("VNMSPARSE_NO_KERNELS", "1")  # training and pruning need no CUDA kernels

import torch
import torch.distributed as dist
from torch import nn

from vnmsparse.calibrate import recording
from vnmsparse.masks import vnm_mask
from vnmsparse.scores import ria_scores
from vnmsparse.train import MaskSchedule, RIAScorer, StagedLoRA, TrainConfig, default_filter, digest, gather_digests, train

RESULTS = Path("bench/results/distributed")
SMOKE_RESULTS = Path("out/distributed-smoke")
# LLaMA-2-13B's shape (hidden, intermediate, layers, heads, kv heads, vocab); "tiny" for gloo on the CPU.
SHAPES = {
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128),
}


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def setup() -> torch.device:
    """Join the process group torchrun describes; one GPU per rank where there are GPUs."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def save(args: argparse.Namespace, name: str, record: dict) -> None:
    """Rank 0 merges one run into the results JSON and rewrites the markdown."""
    if dist.get_rank() != 0:
        return
    out = Path(args.out)
    source = Path(args.merge_from or out.with_suffix(".json"))
    data = json.loads(source.read_text()) if source.is_file() else {"schema": 1, "runs": {}}
    data["runs"][name] = {**record, "command": args.command}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render_markdown(data))


def render_markdown(data: dict) -> str:
    lines = ["# Distributed V:N:M training and pruning", "", "Written by `bench/distributed.py`; commands are in the JSON.", ""]
    lora = {k: v for k, v in data["runs"].items() if v["mode"] == "lora"}
    if lora:
        lines += ["## Three-staged LoRA on SmolLM2-135M", "",
                  "| run | device | ranks | global batch | steps | steps/s | tokens/s | ppl | ranks identical |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in lora.items():
            lines.append(f"| {name} | {r['device']} | {r['world_size']} | {r['global_batch']} | {r['steps']} | "
                         f"{r['steps_per_second']:.2f} | {r['tokens_per_second']:,.0f} | {r['ppl']:.2f} | {r['identical']} |")
        lines.append("")
    prune = {k: v for k, v in data["runs"].items() if v["mode"] == "prune"}
    if prune:
        lines += ["## Layer-by-layer pruning, layers split over the ranks", "",
                  "| run | device | shape | pattern | rank | layers | busy s | wall s | peak GiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in prune.items():
            for p in r["per_rank"]:
                peak = "-" if p["peak_gib"] is None else f"{p['peak_gib']:.1f}"
                lines.append(f"| {name} | {r['device']} | {r['shape']} | {r['pattern']} | {p['rank']} | {p['layers']} | "
                             f"{p['busy_seconds']:.1f} | {p['wall_seconds']:.1f} | {peak} |")
        lines.append("")
    return "\n".join(lines)


# --- three-staged LoRA under DDP / FSDP ---------------------------------------------------------------------------
def load_lm(model: str, device: torch.device, args: argparse.Namespace):
    """(model, Austen chunks, Moby Dick chunks). 'random': SmolLM2's shape with random weights and random tokens,
    for when the GGUF or the texts are not at hand (ranks and speed still check out; perplexity means nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vnmsparse.app.data import austen_text, moby_dick_text, token_chunks
    from vnmsparse.app.models import load_causal_lm

    if model != "random":
        lm, tokenizer = load_causal_lm(model, device=device)
        return (lm, token_chunks(tokenizer, austen_text(), args.seq_len, args.train_chunks),
                token_chunks(tokenizer, moby_dick_text(), args.seq_len, args.eval_chunks))
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(0, config.vocab_size, (n, args.seq_len), generator=g)  # noqa: E731
    return LlamaForCausalLM(config).to(device).eval(), tokens(args.train_chunks or 2048), tokens(args.eval_chunks)


def rank_batches(chunks: torch.Tensor, global_batch: int, seed: int, device: torch.device):
    """Endless global batches in one seeded order on every rank; each rank takes its own contiguous slice."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = global_batch // world
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(chunks), generator=g).split(global_batch):
            if len(idx) == global_batch:
                yield chunks[idx[rank * per_rank : (rank + 1) * per_rank]].to(device)


def run_lora(args: argparse.Namespace, device: torch.device) -> None:
    from vnmsparse.app.evaluate import perplexity

    world = dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must divide by the {world} ranks")
    model, train_chunks, eval_chunks = load_lm(args.model, device, args)
    method = StagedLoRA(args.pattern, schedule=MaskSchedule(remask_every=args.remask_every), rank=args.rank,
                        alpha=float(args.rank))
    calib = train_chunks[: args.calib_chunks].tensor_split(world)[dist.get_rank()].to(device)  # each rank its share
    method.scorer = RIAScorer.calibrate(model, calib.split(4), method.selected(model), progress=False)
    log(f"lora {args.strategy} x{world} on {device_name(device)}: {len(method.selected(model))} layers, {args.steps} steps")
    config = TrainConfig(steps=args.steps, lr=args.lr, autocast="bf16" if device.type == "cuda" else None,
                         strategy=args.strategy, progress=dist.get_rank() == 0 and not args.no_progress)
    loss_fn = lambda m, ids: m(input_ids=ids, labels=ids, use_cache=False).loss  # noqa: E731
    result = train(model, method, rank_batches(train_chunks, args.global_batch, 0, device), loss_fn, config)
    masks = gather_digests(digest(method.masks()))
    weights = gather_digests(digest({n: t.to_dense() for n, t in method.export().items()}))
    model.eval()  # under FSDP every rank joins each forward, so all evaluate the same chunks
    ppl = perplexity(model, eval_chunks, batch_size=8, progress=False)
    identical = len(set(masks)) == 1 and len(set(weights)) == 1
    log(f"steps/s {result.steps_per_second:.2f}, ppl {ppl:.2f}, ranks identical: {identical}")
    save(args, f"lora-{args.strategy}-x{world}" + ("-random" if args.model == "random" else ""), {
        "mode": "lora", "strategy": args.strategy, "world_size": world, "device": device_name(device),
        "model": args.model, "pattern": args.pattern, "global_batch": args.global_batch, "seq_len": args.seq_len,
        "steps": result.steps, "seconds": result.seconds, "steps_per_second": result.steps_per_second,
        "tokens_per_second": result.steps_per_second * args.global_batch * args.seq_len, "ppl": ppl,
        "identical": identical, "mask_digests": masks, "weight_digests": weights, "remask_steps": result.remask_steps,
        "peak_gib_rank0": peak_memory_gib(device), "torch": torch.__version__})
    if not identical:
        raise SystemExit("ranks ended with different masks or weights")


# --- layer-by-layer pruning with the layers split over the ranks -----------------------------------------------
def build_layers(shape: dict, first: int, count: int, device: torch.device, dtype: torch.dtype):
    """This rank's decoder layers (random init, made on the device in `dtype`) and the rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(**shape, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(first)
            layers = nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(first, first + count))
            rotary = LlamaRotaryEmbedding(config)
    finally:
        torch.set_default_dtype(previous)
    return layers.eval(), rotary


@torch.no_grad()
def prune_layer(layer: nn.Module, hidden: torch.Tensor, rope, micro: int, pattern: str, a: float) -> torch.Tensor:
    """Calibrate one decoder layer on `hidden` (RIA statistics), prune its linears in place, return its new outputs."""
    linears = {n: m for n, m in layer.named_modules() if default_filter(m, n)}
    def run(h: torch.Tensor) -> torch.Tensor:  # no attention mask: sdpa runs causal
        out = layer(h, position_embeddings=rope)
        return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple
    with recording(linears) as stats:
        for h in hidden.split(micro):
            run(h)
    for name, linear in linears.items():
        mask = vnm_mask(ria_scores(linear.weight, stats[name].act_sq_mean, a), pattern)
        linear.weight.mul_(mask)
    return torch.cat([run(h) for h in hidden.split(micro)])


def run_prune(args: argparse.Namespace, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = SHAPES[args.shape]
    layers_total = shape["num_hidden_layers"]
    if layers_total < world:
        raise SystemExit(f"{args.shape} has {layers_total} layers, fewer than the {world} ranks")
    bounds = [layers_total * r // world for r in range(world + 1)]
    first, count = bounds[rank], bounds[rank + 1] - bounds[rank]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    layers, rotary = build_layers(shape, first, count, device, dtype)
    built = time.perf_counter() - start
    n, seq, d = args.calib_samples, args.calib_seq, shape["hidden_size"]
    hidden = torch.empty(n, seq, d, device=device, dtype=dtype)
    if rank == 0:  # the embedding output of random tokens: unit-scale hidden states
        torch.manual_seed(1234)
        hidden.normal_()
    position_ids = torch.arange(seq, device=device).unsqueeze(0)
    rope = rotary(hidden[:1], position_ids)
    log(f"prune {args.shape} {args.pattern} over {world} ranks: {n} x {seq} calibration tokens; built in {built:.1f} s")
    dist.barrier()
    wall = time.perf_counter()
    if rank > 0:
        dist.recv(hidden, src=rank - 1)
    busy = time.perf_counter()
    for layer in layers:
        hidden = prune_layer(layer, hidden, rope, args.micro_batch, args.pattern, 0.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    busy = time.perf_counter() - busy
    if rank < world - 1:
        dist.send(hidden.contiguous(), dst=rank + 1)
    dist.barrier()
    wall = time.perf_counter() - wall
    kept = sum(int((m.weight != 0).sum()) for layer in layers for n_, m in layer.named_modules() if default_filter(m, n_))
    total = sum(m.weight.numel() for layer in layers for n_, m in layer.named_modules() if default_filter(m, n_))
    mine = {"rank": rank, "layers": f"{first}-{first + count - 1}", "busy_seconds": busy, "wall_seconds": wall,
            "build_seconds": built, "peak_gib": peak_memory_gib(device), "density": kept / total}
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, mine)
    log("; ".join(f"rank {p['rank']}: layers {p['layers']}, busy {p['busy_seconds']:.1f} s, peak {p['peak_gib']} GiB"
                  for p in per_rank))
    save(args, f"prune-{args.shape}-{args.pattern}-x{world}", {
        "mode": "prune", "shape": args.shape, "pattern": args.pattern, "world_size": world, "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."), "calib_samples": n, "calib_seq": seq, "per_rank": per_rank,
        "torch": torch.__version__})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("lora", "prune"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for gloo on the CPU; results go to out/")
    parser.add_argument("--strategy", choices=("none", "ddp", "fsdp"), default="ddp")
    parser.add_argument("--model", default="smollm2-135m", help="lora: 'smollm2-135m', a .gguf/HF path, or 'random'")
    parser.add_argument("--pattern", default="64:2:5")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--remask-every", type=int, default=10)
    parser.add_argument("--train-chunks", type=int, default=None)
    parser.add_argument("--eval-chunks", type=int, default=128)
    parser.add_argument("--calib-chunks", type=int, default=32)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--out", default=None, help="results path without suffix (default bench/results/distributed)")
    parser.add_argument("--merge-from", default=None, help="results JSON to merge into (default: --out's .json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.command = (f"torchrun --standalone --nproc_per_node {os.environ.get('WORLD_SIZE', 1)} "
                    + shlex.join(["bench/distributed.py", *(sys.argv[1:] if argv is None else argv)]))
    if args.smoke:
        args.steps, args.global_batch, args.seq_len, args.rank = min(args.steps, 12), 4, 64, 4
        args.train_chunks, args.eval_chunks, args.calib_chunks, args.remask_every = 64, 4, 4, 2
        args.shape, args.calib_samples, args.calib_seq, args.micro_batch = "tiny", 4, 32, 2
    args.out = args.out or str(SMOKE_RESULTS if args.smoke else RESULTS)
    device = setup()
    try:
        (run_lora if args.mode == "lora" else run_prune)(args, device)
    finally:
        gc.collect()  # wrapped models hold reference cycles: free them while their process group is alive
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
