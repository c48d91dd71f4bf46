"""End-to-end speed: V:N:M (VNMLinear) vs dense (cuBLAS) vs 2:4 (cuSPARSELt), bf16, random-init weights.

    python bench/e2e.py                                   # all parts, all variants (GPU)
    python bench/e2e.py --part llama-prefill --part deit  # parts: llama-prefill, llama-decode, deit
    python bench/e2e.py --part llama-decode --variants dense,64:2:8 --batches 1,64   # one compile per batch: minutes each
    python bench/e2e.py --smoke                           # tiny configs on CPU: checks the script, not speed

LLaMA-2-7B architecture (transformers LlamaForCausalLM from its config): prefill 1x2048 and 8x512 tokens, decode
tokens/s at batch 1, 16, 64, 128 and 256 (greedy, static KV cache, one token per step). DeiT-base (timm deit_base_patch16_224):
images/s at batch 1 and 256. The linear layers of the blocks are swapped (heads and embeddings stay dense); masks are
magnitude masks, which is all timing needs. Every variant is first checked against its dense-masked twin (each
linear of the first block against an fp32 reference, then the whole model), and is timed only if it passes.

Each timed function runs compiled (torch.compile, mode="reduce-overhead": dense decodes fastest that way) where it
compiles, else under a CUDA graph, else eagerly (`--modes` reorders them); the mode is recorded per entry, so an
unfair comparison is visible. A profile of one eager call splits GPU kernel time into the
linear layers and the rest (attention, norms, rotary, ...), and names the largest kernels outside them.

Results merge into bench/results/e2e-<gpu>.json (keyed by model/phase/shape/variant, so parts can run in separate
calls) and bench/results/e2e-<gpu>.md is rebuilt from everything in the json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import re
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from vnmsparse import VNMPattern, magnitude_scores, vnm_mask
from vnmsparse.nn import VNMLinear
from vnmsparse.sparsify import SparsifyConfig, plan_layers, sparsify

PARTS = ("llama-prefill", "llama-decode", "deit")
VARIANTS = ("dense", "64:2:5", "64:2:5+copy", "64:2:8", "64:2:8+copy", "2:4")
COPY = "+copy"  # the pattern, its layers built with two_four_copy=True (sm_90, large N: a 2:4 copy, more memory)
MODES = ("compile", "graph", "eager")  # the first that runs: torch.compile(reduce-overhead) is the fastest dense
TWO_FOUR = VNMPattern(V=1, M=4)
TARGETS = "paper (Ampere, Spatha): DeiT-base 64:2:8 1.7x; LLaMA2-7B 64:2:5 1.49x (2:4: 1.26x)"


@dataclass(frozen=True)
class Setup:
    """Sizes and settings of one run: the real ones on a GPU, tiny ones for --smoke."""

    device: torch.device
    dtype: torch.dtype
    smoke: bool
    modes: tuple[str, ...]
    warmup: int
    iters: int
    batches: tuple[int, ...] = ()  # decode batch sizes asked for (--batches); empty: the defaults below

    @property
    def prefill_shapes(self) -> tuple[tuple[int, int], ...]:
        return ((1, 64), (2, 32)) if self.smoke else ((1, 2048), (8, 512))

    @property
    def decode_batches(self) -> tuple[int, ...]:
        return self.batches or ((1, 2) if self.smoke else (1, 16, 64, 128, 256))

    @property
    def prompt_len(self) -> int:
        return 16 if self.smoke else 256

    @property
    def decode_steps(self) -> int:
        return 4 if self.smoke else 64

    @property
    def image_batches(self) -> tuple[int, ...]:
        return (1, 4) if self.smoke else (1, 256)


# --- models ---------------------------------------------------------------------------------------------------


def build_llama(setup: Setup) -> nn.Module:
    """LLaMA-2-7B (or a 2-layer miniature for --smoke), weights N(0, 0.02), norms 1, on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    if setup.smoke:
        config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    else:  # meta-llama/Llama-2-7b-hf
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             rms_norm_eps=1e-5, tie_word_embeddings=False)
    with no_init_weights(), torch.device(setup.device):
        model = LlamaForCausalLM._from_config(config, dtype=setup.dtype, attn_implementation="sdpa")
    generator = torch.Generator(setup.device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def build_deit(setup: Setup) -> nn.Module:
    """DeiT-base (or a 2-block DeiT-tiny for --smoke), timm's random init, on the device."""
    import timm

    torch.manual_seed(0)
    name, kwargs = ("deit_tiny_patch16_224", {"depth": 2}) if setup.smoke else ("deit_base_patch16_224", {})
    return timm.create_model(name, pretrained=False, **kwargs).to(setup.device, setup.dtype).eval()


# --- the 2:4 baseline -----------------------------------------------------------------------------------------


class CusparseLtLinear(nn.Module):
    """y = x W^T + b with a 2:4 W through cuSPARSELt (`torch._cslt_compress` / `torch._cslt_sparse_mm`).

    PyTorch's `to_sparse_semi_structured` refuses sm_90 with its CUTLASS backend, so this calls cuSPARSELt directly.
    Rows of x are padded to a multiple of 8 (cuSPARSELt refuses N=1). `search` picks the algorithm per N.
    """

    ROW_MULTIPLE = 8

    def __init__(self, masked_weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = masked_weight.shape
        self.register_buffer("packed", torch._cslt_compress(masked_weight.contiguous()))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.alg_ids: dict[int, int] = {}
        self.searching = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        n = x2.shape[0]
        pad = -n % self.ROW_MULTIPLE
        if pad:
            x2 = nn.functional.pad(x2, (0, 0, 0, pad))
        if self.searching:
            self.alg_ids[x2.shape[0]] = torch._cslt_sparse_mm_search(self.packed, x2.t(), self.bias, transpose_result=True)
        y = torch._cslt_sparse_mm(self.packed, x2.t(), self.bias, transpose_result=True,
                                  alg_id=self.alg_ids.get(x2.shape[0], 0))  # (N', R)
        return y[:n].view(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def cslt_search(model: nn.Module):
    """Forwards inside this pick the fastest cuSPARSELt algorithm for each layer at the shapes they see."""
    layers = [m for m in model.modules() if isinstance(m, CusparseLtLinear)]
    for layer in layers:
        layer.searching = True
    try:
        yield
    finally:
        for layer in layers:
            layer.searching = False


# --- variants and their checks ----------------------------------------------------------------------------


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def check_layer(layer: nn.Module, masked: torch.Tensor, bias: torch.Tensor | None, rows: int) -> dict:
    """Error of `layer` against an fp32 x @ masked^T, beside the error of the dense bf16 layer on the same input.

    Passes within 2x the dense layer's own rounding error plus 1e-3 (flash-attention's style of tolerance).
    """
    x = torch.randn(rows, masked.shape[1], device=masked.device, dtype=masked.dtype)
    exact = nn.functional.linear(x.float(), masked.float(), None if bias is None else bias.float())
    dense = nn.functional.linear(x, masked, bias)
    with torch.no_grad():
        error, dense_error = _relative_error(layer(x), exact), _relative_error(dense, exact)
    return {"rows": rows, "error": error, "dense_error": dense_error, "ok": error <= 2 * dense_error + 1e-3}


@torch.no_grad()
def make_variant(dense: nn.Module, variant: str, example: torch.Tensor, setup: Setup) -> tuple[nn.Module, dict]:
    """A copy of `dense` with its block linears in `variant` form, and the checks against its dense-masked twin."""
    if variant == "dense":
        return dense, {"ok": True}
    model = copy.deepcopy(dense)
    pattern = TWO_FOUR if variant == "2:4" else VNMPattern.parse(variant.removesuffix(COPY))
    names = list(plan_layers(model, SparsifyConfig(pattern)))
    first_block = names[: max(1, len(names) // _block_count(model))]
    rows = (1, 16, 512, 2048) if variant.endswith(COPY) else (1, 16, 512)  # 2048: where the 2:4 copy runs
    for name in names:  # the dense-masked twin, in place
        linear = model.get_submodule(name)
        linear.weight.mul_(vnm_mask(magnitude_scores(linear.weight), pattern))
    reference = model(example)
    reference = reference.logits if hasattr(reference, "logits") else reference
    layer_checks = []
    for name in names:
        linear = model.get_submodule(name)
        if variant == "2:4":
            sparse = CusparseLtLinear(linear.weight, linear.bias)
        else:
            sparse = VNMLinear.from_linear(linear, pattern, mask=linear.weight != 0,  # the mask just applied
                                           two_four_copy=variant.endswith(COPY))
        if name in first_block:
            layer_checks += [dict(layer=name, **check_layer(sparse, linear.weight, linear.bias, n)) for n in rows]
        model.set_submodule(name, sparse)
    if variant == "2:4":
        with cslt_search(model):
            model(example)
    out = model(example)
    out = out.logits if hasattr(out, "logits") else out
    error = _relative_error(out, reference)
    agree = (out.float().argmax(-1) == reference.float().argmax(-1)).float().mean().item()
    # The layer checks are the strict test; this one catches wiring (a wrong or transposed layer gives an error near 1).
    whole = {"relative_error": error, "argmax_agreement": agree, "ok": error < 0.1}
    ok = whole["ok"] and all(c["ok"] for c in layer_checks)
    return model, {"ok": ok, "model": whole, "layers": layer_checks}


def _block_count(model: nn.Module) -> int:
    """How many transformer blocks the model has (LLaMA layers or ViT blocks)."""
    inner = getattr(model, "model", model)
    return len(getattr(inner, "layers", None) or getattr(inner, "blocks"))


# --- timing -------------------------------------------------------------------------------------------------


def _sync(setup: Setup) -> None:
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)


def median_ms(fn: Callable[[], object], setup: Setup) -> float:
    """Median wall time of `fn` in ms over `setup.iters` runs after `setup.warmup`."""
    for _ in range(setup.warmup):
        fn()
    times = []
    for _ in range(setup.iters):
        _sync(setup)
        start = time.perf_counter()
        fn()
        _sync(setup)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def runnable(fn: Callable[[], torch.Tensor], setup: Setup) -> tuple[Callable[[], torch.Tensor], str, list[str]]:
    """`fn` as a CUDA graph replay, a compiled function, or itself: the first mode in `setup.modes` that works.

    Returns (callable, mode, failures of the modes tried before it).
    """
    failures = []
    for mode in setup.modes:
        try:
            if mode == "graph":
                if setup.device.type != "cuda":
                    raise RuntimeError("CUDA graphs need a CUDA device")
                stream = torch.cuda.Stream(setup.device)
                stream.wait_stream(torch.cuda.current_stream(setup.device))
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        fn()
                torch.cuda.current_stream(setup.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = fn()

                def replay(graph=graph, out=out) -> torch.Tensor:
                    graph.replay()
                    return out

                replay()
                return replay, mode, failures
            if mode == "compile":
                compiled = torch.compile(fn, mode="reduce-overhead" if setup.device.type == "cuda" else "default")
                compiled()
                compiled()
                return compiled, mode, failures
            fn()
            return fn, mode, failures
        except Exception as error:  # noqa: BLE001 - any failure means: try the next mode, and say why
            failures.append(f"{mode}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
            torch._dynamo.reset()
    raise RuntimeError(f"no mode could run: {failures}")


@contextlib.contextmanager
def linear_ranges(model: nn.Module):
    """Mark every linear layer's forward as a profiler range named 'linear_layer'."""
    kinds = (nn.Linear, VNMLinear, CusparseLtLinear)
    open_ranges: list = []

    def enter(_module, _args):
        open_ranges.append(record_function("linear_layer"))
        open_ranges[-1].__enter__()

    def leave(_module, _args, _output):
        open_ranges.pop().__exit__(None, None, None)

    hooks = [h for m in model.modules() if isinstance(m, kinds)
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def time_split(model: nn.Module, fn: Callable[[], object], setup: Setup) -> dict:
    """Kernel time of one eager call split into linear layers and the rest, with the largest kernels outside."""
    cuda = setup.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with linear_ranges(model), profile(activities=activities) as prof:
        fn()
        _sync(setup)
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]  # kernels are counted via their ops

    def total(e) -> float:
        return e.device_time_total if cuda else e.cpu_time_total

    def self_time(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    def inside(e) -> bool:
        while e is not None:
            if e.name == "linear_layer":
                return True
            e = e.cpu_parent
        return False

    linear_us = sum(total(e) for e in events if e.name == "linear_layer" and not inside(e.cpu_parent))
    other: dict[str, float] = {}
    for e in events:
        if self_time(e) > 0 and not inside(e):
            other[e.name] = other.get(e.name, 0.0) + self_time(e)
    other_us = sum(other.values())
    top = sorted(other.items(), key=lambda kv: -kv[1])[:5]
    return {"linear_ms": linear_us / 1e3, "other_ms": other_us / 1e3,
            "linear_share": linear_us / max(linear_us + other_us, 1e-9),
            "top_other": [[name[:60], us / 1e3] for name, us in top]}


# --- the parts ----------------------------------------------------------------------------------------------


def _entry(phase: str, shape: str, variant: str, ms: float, work: float, unit: str, mode: str, failures: list,
           split: dict | None, check: dict) -> dict:
    return {"phase": phase, "shape": shape, "variant": variant, "ms": ms, "throughput": work / (ms / 1e3),
            "unit": unit, "mode": mode, "mode_failures": failures, "split": split, "check": check}


def llama_prefill(model: nn.Module, variant: str, check: dict, setup: Setup) -> list[dict]:
    """Prefill: one forward over batch x seq tokens, logits for the last position only (as generation does)."""
    entries = []
    for batch, seq in setup.prefill_shapes:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=setup.device)
        if any(isinstance(m, CusparseLtLinear) for m in model.modules()):
            with cslt_search(model), torch.no_grad():
                model(ids, use_cache=False, logits_to_keep=1)

        @torch.no_grad()
        def step(ids=ids):
            return model(ids, use_cache=False, logits_to_keep=1).logits

        fn, mode, failures = runnable(step, setup)
        ms = median_ms(fn, setup)
        entries.append(_entry("prefill", f"{batch}x{seq}", variant, ms, batch * seq, "tokens/s", mode, failures,
                              time_split(model, step, setup), check))
        del fn
        torch._dynamo.reset()
    return entries


def rewind(cache, length: int) -> None:
    """Make a static KV cache hold its first `length` tokens again, in place (CUDA graphs keep their addresses).

    Recent transformers (5.23 here) count the tokens of a StaticCache themselves (`cumulative_length` per layer)
    and ignore `cache_position`, so every timed decode step would append past the end without this.
    """
    for layer in getattr(cache, "layers", ()):
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)
        elif isinstance(counter, int):
            layer.cumulative_length = length


def llama_decode(model: nn.Module, variant: str, check: dict, setup: Setup) -> list[dict]:
    """Decode: greedy, one token per step for every sequence of the batch, after a prompt, with a static KV cache."""
    from transformers import StaticCache

    entries = []
    for batch in setup.decode_batches:
        cache = StaticCache(config=model.config, max_cache_len=setup.prompt_len + setup.decode_steps + 16)
        prompt = torch.randint(0, model.config.vocab_size, (batch, setup.prompt_len), device=setup.device)
        token = torch.zeros(batch, 1, dtype=torch.long, device=setup.device)
        position = torch.zeros(1, dtype=torch.long, device=setup.device)
        with torch.no_grad():
            logits = model(prompt, past_key_values=cache, cache_position=torch.arange(setup.prompt_len, device=setup.device),
                           logits_to_keep=1).logits
            token.copy_(logits[:, -1:].argmax(-1))
            if any(isinstance(m, CusparseLtLinear) for m in model.modules()):
                with cslt_search(model):
                    position.fill_(setup.prompt_len)
                    model(token, past_key_values=cache, cache_position=position)

        @torch.no_grad()
        def step():
            return model(token, past_key_values=cache, cache_position=position).logits

        rewind(cache, setup.prompt_len)
        position.fill_(setup.prompt_len)
        fn, mode, failures = runnable(step, setup)

        @torch.no_grad()
        def generate():  # the prompt stays cached; each run decodes the same decode_steps positions after it
            rewind(cache, setup.prompt_len)
            for i in range(setup.decode_steps):
                position.fill_(setup.prompt_len + i)
                token.copy_(fn()[:, -1:].argmax(-1))

        ms = median_ms(generate, setup)
        rewind(cache, setup.prompt_len)
        position.fill_(setup.prompt_len)
        entries.append(_entry("decode", f"batch {batch}", variant, ms, batch * setup.decode_steps, "tokens/s", mode,
                              failures, time_split(model, step, setup), check))
        del fn, cache
        torch._dynamo.reset()
    return entries


def deit(model: nn.Module, variant: str, check: dict, setup: Setup) -> list[dict]:
    """Images/s of one forward at each batch size."""
    entries = []
    for batch in setup.image_batches:
        images = torch.randn(batch, 3, 224, 224, device=setup.device, dtype=setup.dtype)
        if any(isinstance(m, CusparseLtLinear) for m in model.modules()):
            with cslt_search(model), torch.no_grad():
                model(images)

        @torch.no_grad()
        def step(images=images):
            return model(images)

        fn, mode, failures = runnable(step, setup)
        ms = median_ms(fn, setup)
        entries.append(_entry("images", f"batch {batch}", variant, ms, batch, "images/s", mode, failures,
                              time_split(model, step, setup), check))
        del fn
        torch._dynamo.reset()
    return entries


def _run_variant(dense: nn.Module, variant: str, example: torch.Tensor, measure: Callable, model_name: str, part: str,
                 setup: Setup) -> dict[str, dict]:
    """Convert, check, and (if the check passes) time one variant."""
    model, check = make_variant(dense, variant, example, setup)
    print(f"[{part}] {variant}: check {'ok' if check['ok'] else 'FAILED'} {json.dumps(check.get('model', {}))}", flush=True)
    if not check["ok"]:
        return {f"{model_name}/check/-/{variant}": {"model": model_name, "phase": "check", "shape": "-",
                                                    "variant": variant, "check": check}}
    results = {}
    for entry in measure(model, variant, check, setup):
        results[f"{model_name}/{entry['phase']}/{entry['shape']}/{variant}"] = {"model": model_name, **entry}
        print(f"[{part}] {variant} {entry['shape']}: {entry['throughput']:,.1f} {entry['unit']} ({entry['ms']:.2f} ms, "
              f"{entry['mode']}, linear {entry['split']['linear_share']:.0%})", flush=True)
    return results


def run_part(part: str, variants: list[str], setup: Setup, save: Callable[[dict[str, dict]], None]) -> None:
    """Build the part's model once, then for each variant: convert, check, time, and `save` its entries (so a run
    cut short keeps every variant it finished: one compiled LLaMA-2-7B decode batch takes minutes)."""
    llama = part.startswith("llama")
    dense = build_llama(setup) if llama else build_deit(setup)
    example = (torch.randint(0, dense.config.vocab_size, (1, 64), device=setup.device) if llama
               else torch.randn(2, 3, 224, 224, device=setup.device, dtype=setup.dtype))
    measure = {"llama-prefill": llama_prefill, "llama-decode": llama_decode, "deit": deit}[part]
    model_name = ("llama-tiny-smoke" if llama else "deit-tiny-smoke") if setup.smoke else ("llama2-7b" if llama else "deit-base")
    for variant in variants:
        if variant == "2:4" and setup.device.type != "cuda":
            print(f"[{part}] {variant}: skipped (cuSPARSELt needs CUDA)", flush=True)
            continue
        start = time.perf_counter()
        try:
            results = _run_variant(dense, variant, example, measure, model_name, part, setup)
        except Exception as error:  # noqa: BLE001 - one variant's failure must not lose the others' results
            message = f"{type(error).__name__}: {error}"[:500]
            print(f"[{part}] {variant}: ERROR {message}", flush=True)
            traceback.print_exc()
            results = {f"{model_name}/error/-/{variant}": {"model": model_name, "phase": "error", "shape": "-",
                                                           "variant": variant, "check": {"ok": False, "error": message}}}
        print(f"[{part}] {variant}: {time.perf_counter() - start:.0f} s", flush=True)
        save(results)
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()


# --- results ------------------------------------------------------------------------------------------------


def device_slug(device: torch.device, smoke: bool) -> str:
    """'h100', 'h200', 'a100', ... from the GPU's name; 'smoke-cpu' for --smoke on the CPU."""
    if device.type != "cuda":
        return f"smoke-{device.type}" if smoke else device.type
    name = torch.cuda.get_device_name(device)
    known = re.search(r"\b([ABHL]\d{2,3}|GH\d+|B\d{3}|RTX ?\d{4})\b", name, flags=re.I)
    slug = (known.group(1) if known else re.sub(r"[^A-Za-z0-9]+", "-", name)).lower().replace(" ", "")
    return f"smoke-{slug}" if smoke else slug


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "date": datetime.date.today().isoformat(), "device": str(device),
           "dtype": "bfloat16" if device.type == "cuda" else "float32"}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cusparselt=str(torch.backends.cusparselt.version()))
    return env


def markdown(data: dict) -> str:
    """The results as tables: throughput with speedup over dense, execution mode, and where the time goes."""
    env = data["environment"]
    lines = [f"# End-to-end speed on {env.get('gpu', env['device'])}", "",
             f"torch {env['torch']}, CUDA {env.get('cuda', '-')}, cuSPARSELt {env.get('cusparselt', '-')}, {env['date']}. "
             f"{env['dtype']}, random-init weights, magnitude masks; block linears swapped, heads and embeddings dense. "
             "Commands (each entry's is in the JSON): "
             + ", ".join(f"`{c}`" for c in dict.fromkeys(e.get("command", "python bench/e2e.py") for e in data["entries"].values()))
             + ". Speedups are over the dense model timed in the same run (`dense_throughput` in an entry; the dense "
             "column shows the latest dense run).", "", f"Targets: {TARGETS}.", ""]
    entries = [e for e in data["entries"].values() if e["phase"] not in ("check", "error")]
    groups = sorted({(e["model"], e["phase"]) for e in entries})
    for model, phase in groups:
        rows = [e for e in entries if (e["model"], e["phase"]) == (model, phase)]
        variants = [v for v in VARIANTS if any(e["variant"] == v for e in rows)]
        unit = rows[0]["unit"]
        lines += [f"## {model} {phase} ({unit}; speedup over dense)", "",
                  "| shape | " + " | ".join(variants) + " |", "| --- |" + " --- |" * len(variants)]
        for shape in dict.fromkeys(e["shape"] for e in rows):
            by_variant = {e["variant"]: e for e in rows if e["shape"] == shape}
            base = by_variant.get("dense")
            cells = []
            for v in variants:
                e = by_variant.get(v)
                if e is None:
                    cells.append("-")
                    continue
                dense = e.get("dense_throughput") or (base["throughput"] if base else None)
                speedup = f" ({e['throughput'] / dense:.2f}x)" if dense else ""
                cells.append(f"{e['throughput']:,.1f}{speedup}")
            lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        lines += ["", "| shape | variant | ms | mode | linear share of kernel time | outside linears: largest kernels (ms) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for e in rows:
            top = ", ".join(f"{name} {ms:.2f}" for name, ms in e["split"]["top_other"][:3])
            fell = f" (after {'; '.join(e['mode_failures'])})" if e["mode_failures"] else ""
            lines.append(f"| {e['shape']} | {e['variant']} | {e['ms']:.3f} | {e['mode']}{fell} | "
                         f"{e['split']['linear_share']:.0%} of {e['split']['linear_ms'] + e['split']['other_ms']:.2f} ms | {top} |")
        lines.append("")
    failed = [e for e in data["entries"].values() if e["phase"] in ("check", "error")]
    if failed:
        lines += ["## Failed checks and errors (not timed)", ""]
        lines += [f"- {e['model']} {e['variant']}: {json.dumps(e['check'])[:400]}" for e in failed]
        lines.append("")
    return "\n".join(lines)


def positive_ints(text: str) -> tuple[int, ...]:
    """'1,64' -> (1, 64); anything but positive integers is refused with the rule."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be positive integers, comma-separated, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=PARTS, help="run only these parts (repeatable; default all)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--modes", default=",".join(MODES), help="execution modes to try, in order (graph,compile,eager)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (or the GPU with --device cuda)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    parser.add_argument("--out", default=None, help="results folder (default bench/results; --smoke: /tmp/vnmsparse-e2e)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 20; smoke 2)")
    parser.add_argument("--batches", type=positive_ints, default=(),
                        help="llama-decode batch sizes, comma-separated (default 1,16,64,128,256): each compiles anew")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    modes = tuple(m.strip() for m in args.modes.split(","))
    if unknown or not variants or any(m not in MODES for m in modes):
        parser.error(f"--variants must be from {VARIANTS} and --modes from {MODES}")
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on the CPU")
    setup = Setup(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, smoke=args.smoke,
                  modes=modes, warmup=1 if args.smoke else 3, iters=args.iters or (2 if args.smoke else 20), batches=args.batches)
    out = Path(args.out or ("/tmp/vnmsparse-e2e" if args.smoke else Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"e2e-{device_slug(device, args.smoke)}"
    data = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {"entries": {}}
    data["environment"] = environment(device)

    command = "python " + shlex.join(["bench/e2e.py", *(sys.argv[1:] if argv is None else argv)])

    dense_now: dict[tuple[str, str, str], float] = {}  # dense throughput measured by this invocation

    def save(new: dict[str, dict]) -> None:
        for entry in new.values():  # a variant that now ran replaces its earlier failure
            entry["command"] = command
            for phase in ("check", "error"):
                data["entries"].pop(f"{entry['model']}/{phase}/-/{entry['variant']}", None)
            if "throughput" in entry:  # a speedup is against the dense of the same run, kept with the entry
                key = (entry["model"], entry["phase"], entry["shape"])
                if entry["variant"] == "dense":
                    dense_now[key] = entry["throughput"]
                elif key in dense_now:
                    entry["dense_throughput"] = dense_now[key]
        data["entries"].update(new)
        stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(data))

    for part in args.part or PARTS:
        run_part(part, variants, setup, save)
    print(markdown(data))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
