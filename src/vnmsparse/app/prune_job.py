"""The main job, `vnm prune`: prune a causal LM to V:N:M with calibration text, measure it, optionally save it.

Loads the model (default: the built-in SmolLM2-135M), measures the dense perplexity on the held-out evaluation
texts, prunes a copy with `sparsify` (and, for reference, another copy to 2:4 with RIA), measures again and
prints one table: layers, sparsity, parameters and bytes, perplexity per text, time, and on a GPU tokens/s.
Calibration text and evaluation texts never share a source (`data.check_disjoint`). When the pruned perplexity
is far above dense, it prints the `vnm recover` command that trains the model back.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..nn import VNMLinear
from ..ops import dispatch
from ..pattern import VNMPattern
from ..sparsify import Method, SparsifyConfig, SparsifyReport, sparsify

REFERENCE = VNMPattern(V=1, M=4)  # 2:4, the pattern every other tool offers
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NEEDS_RECOVERY = 1.5  # pruned perplexity above this many times dense, on any text: say that training is needed


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `vnm prune` on the `vnm` command's subparsers."""
    p = subparsers.add_parser("prune", help="prune a causal LM to V:N:M, report perplexity, size and speed",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (built in), an HF folder, or a .gguf file")
    p.add_argument("--pattern", type=pattern_arg, default=VNMPattern.parse("64:2:8"),
                   help="V:N:M, or 2:4 (= 64:2:4: the plain 2:4 mask, run by the kernels) (default 64:2:8)")
    p.add_argument("--method", choices=[m.value for m in Method], default="ria", help="importance criterion (default ria)")
    p.add_argument("--a", type=float, default=0.5, help="RIA activation exponent (default 0.5)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate block by block on the already-pruned model (default: one pass of the dense model)")
    p.add_argument("--permute", action="store_true", help="reorder channels before pruning (free at inference)")
    p.add_argument("--two-four-copy", action="store_true",
                   help="every pruned layer also holds a 2:4 copy of its weight, which serving batches and prefill run on sm_90 GPUs: faster, "
                   "for 2.5-3 times the layer's bytes (V:2:M with 5 <= M <= 8 and V <= 64)")
    add_text_arguments(p, "calib", "calibration")
    p.add_argument("--calib-chunks", type=positive_int, default=8, help="calibration chunks of --seq-len tokens (default 8)")
    p.add_argument("--eval-chunks", type=positive_int, default=16, help="evaluation chunks of --seq-len tokens (default 16)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="chunks per forward (default 8)")
    p.add_argument("--no-reference", action="store_true", help="skip the 2:4 RIA reference column")
    p.add_argument("--device", default="auto", help="'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--out", help="save the pruned model (and tokenizer) to this folder")
    p.set_defaults(run=run)
    return p


def pattern_arg(text: str) -> VNMPattern:
    """--pattern's type: `VNMPattern.parse`, with its reason kept (argparse would print only "invalid value")."""
    try:
        return VNMPattern.parse(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_text_arguments(p: argparse.ArgumentParser, train_flag: str, what: str) -> None:
    """--calib / --train and --eval: the text a job learns from and the held-out texts it is measured on."""
    from .data import HELD_OUT_TEXTS, TEXTS, TRAIN_TEXT

    p.add_argument(f"--{train_flag}", default=TRAIN_TEXT,
                   help=f"{what} text: one of {', '.join(sorted(TEXTS))}, or a UTF-8 file (default {TRAIN_TEXT}: "
                   "five of Austen's six novels)")
    p.add_argument("--eval", type=_text_list, default=list(HELD_OUT_TEXTS),
                   help=f"comma-separated evaluation texts, never sharing a source with --{train_flag} (default "
                   f"{','.join(HELD_OUT_TEXTS)}: the held-out novel, and another author)")


def _text_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one evaluation text")
    return names


def resolve_device(name: str) -> torch.device:
    """'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ...; checked before any model is loaded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA GPU is available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def read_texts(train: str, evals: list[str], train_flag: str = "--calib") -> tuple[str, dict[str, str]]:
    """The training (or calibration) text and the evaluation texts: each checked to exist (FileNotFoundError naming
    its flag) and to share no source with the others, before anything slow happens."""
    from .data import check_disjoint, check_text, read_text

    for flag, names in ((train_flag, [train]), ("--eval", evals)):
        for name in names:
            try:
                check_text(name)
            except FileNotFoundError as error:
                raise FileNotFoundError(f"{flag}: {error}") from None
    check_disjoint([train], evals)
    return read_text(train), {name: read_text(name) for name in evals}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


@dataclass
class Column:
    """One model's row of measurements: the dense one, the pruned one, or the 2:4 reference."""

    title: str
    report: SparsifyReport | None
    perplexity: dict[str, float]  # per evaluation text
    eval_seconds: float
    bytes: int  # weights of the whole model, in its dtype (compressed layers at their compressed size)
    layer_bytes: int | None = None  # the pruned layers, compressed (with their 2:4 copies, if asked for)
    throughput: dict[str, float] | None = None


def two_four_bytes(report: SparsifyReport) -> int:
    """Bytes of 2:4 layers as 2:4 hardware stores them: the kept values and a 2-bit index for each.

    (VNMTensor can hold 2:4 as V=1, but then it keeps 4 int32 column indices per row and group, more than
    the dense weight; no 2:4 library stores it that way.)
    """
    value_bytes = report.dense_bytes / report.params
    return round(report.kept * (value_bytes + 0.25))


def _is_two_four(report: SparsifyReport) -> bool:
    return all(layer.pattern == str(REFERENCE) for layer in report.layers)


def _model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer but the VNMLinear weights' (the report counts those), shared ones once."""
    seen = {id(t) for m in model.modules() if isinstance(m, VNMLinear) for t in m.buffers(recurse=False)}
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def throughput(model: nn.Module, ids: torch.Tensor, new_tokens: int = 64, repeats: int = 3) -> dict[str, float]:
    """Tokens/s of a prefill of `ids` and of greedy decoding `new_tokens` tokens at batch 1 (KV cache on).

    Each is the median of `repeats` runs after one untimed run of the same call (kernel builds, packing, caches).
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    prompt = ids[:1, :32]
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model(ids)
    prefill = ids.numel() / _median_seconds(lambda: model(ids), device, repeats)
    model.generate(prompt, **kwargs)
    decode = new_tokens / _median_seconds(lambda: model.generate(prompt, **kwargs), device, repeats)
    return {"prefill": prefill, "decode": decode}


def measure(
    title: str, model: nn.Module, report: SparsifyReport | None, eval_ids: dict[str, torch.Tensor],
    args: argparse.Namespace, device: torch.device,
) -> Column:
    """Perplexity on each evaluation text (and on a GPU, tokens/s) of one model."""
    from .evaluate import perplexity

    start = time.perf_counter()
    ppl = {name: perplexity(model, ids, batch_size=args.batch_size) for name, ids in eval_ids.items()}
    column = Column(title, report, ppl, time.perf_counter() - start, _model_bytes(model))
    if report is not None:
        column.layer_bytes = two_four_bytes(report) if _is_two_four(report) else report.held_bytes
        column.bytes += column.layer_bytes
    if device.type == "cuda":
        column.throughput = throughput(model, next(iter(eval_ids.values()))[: args.batch_size])
    return column


def _prune(
    model: nn.Module, pattern: VNMPattern, method: str, permute: bool, two_four_copy: bool, args: argparse.Namespace,
    calib_ids: torch.Tensor,
) -> SparsifyReport:
    """Sparsify `model` in place as the job's flags say."""
    config = SparsifyConfig(pattern=pattern, method=method, a=args.a, sequential=args.sequential, permute=permute,
                            calib_batch_size=args.batch_size, two_four_copy=two_four_copy)
    return sparsify(model, config, calib=calib_ids if method == "ria" else None)


def table(columns: list[Column], linears: int, total_seconds: float) -> str:
    """The job's result table, one column per model."""
    def mb(n: int) -> str:
        return f"{n / 1e6:,.1f} MB"

    rows: list[tuple[str, list[str]]] = [
        ("layers pruned", [f"{len(c.report.layers) if c.report else 0} / {linears}" for c in columns]),
        ("sparsity, pruned layers", [f"{c.report.sparsity:.2%}" if c.report else "-" for c in columns]),
        ("sparsity, whole model", [f"{c.report.model_sparsity:.2%}" if c.report else "-" for c in columns]),
        ("params, pruned layers", [f"{c.report.kept / 1e6:,.2f}M of {c.report.params / 1e6:,.2f}M" if c.report else "-"
                                   for c in columns]),
        ("bytes, pruned layers", [f"{mb(c.layer_bytes)} of {mb(c.report.dense_bytes)}" if c.report else "-"
                                  for c in columns]),
        ("bytes, whole model", [mb(c.bytes) for c in columns]),
        *((f"perplexity ({name})", [f"{c.perplexity[name]:,.2f}" for c in columns]) for name in columns[0].perplexity),
        ("time: prune or train, eval", [f"{c.report.seconds:.1f} s, {c.eval_seconds:.1f} s" if c.report else f"-, {c.eval_seconds:.1f} s"
                               for c in columns]),
    ]
    if any(c.report and c.report.kept_score for c in columns):
        rows.append(("score kept by masks, permuted", [
            f"{c.report.kept_score[0]:.3f} -> {c.report.kept_score[1]:.3f}" if c.report and c.report.kept_score else "-"
            for c in columns]))
    if columns[0].throughput is not None:
        rows += [("tokens/s, prefill", [f"{c.throughput['prefill']:,.0f}" for c in columns]),
                 ("tokens/s, decode (batch 1)", [f"{c.throughput['decode']:,.1f}" for c in columns])]
    width = max(len(name) for name, _ in rows) + 2
    cells = [max(len(c.title), *(len(v[i]) for _, v in rows)) + 2 for i, c in enumerate(columns)]
    lines = ["".ljust(width) + "".join(c.title.rjust(w) for c, w in zip(columns, cells))]
    lines += [name.ljust(width) + "".join(v.rjust(w) for v, w in zip(values, cells)) for name, values in rows]
    lines.append(f"total time {total_seconds:.0f} s")
    if any(c.report and _is_two_four(c.report) for c in columns):
        lines.append("2:4 bytes: values + a 2-bit index each (the cuSPARSELt layout)")
    if any(c.report and c.report.copy_bytes for c in columns):
        lines.append("+2:4 copy bytes: the pruned layers' weights and their 2:4 copies (held where the copy runs: sm_90)")
    for c in columns:
        idle = [layer for layer in (c.report.layers if c.report else []) if layer.two_four_copy and not layer.copy_bytes]
        if idle:
            lines.append(f"{c.title}: {len(idle)} of {len(c.report.layers)} layers hold no 2:4 copy: theirs would gather x "
                         f"(M = 5-7, or permuted), which runs only on layers of {dispatch.GATHERED_COPY_MIN_R} rows or more")
    return "\n".join(lines)


def check_two_four_copy(pattern: VNMPattern, two_four_copy: bool) -> None:
    """--two-four-copy needs a pattern whose weights can have the copy (`dispatch.two_four_copy_refusal`): checked
    before the model loads."""
    why = dispatch.two_four_copy_refusal(pattern.V, pattern.M) if two_four_copy else None
    if why is not None:
        raise ValueError(f"--two-four-copy needs {why}")


def check_out(out: str | None) -> None:
    """--out must be a folder (new or existing), not a file: checked before the model loads."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out!r} is a file; give a folder to save the model in")


def recovery_hint(columns: list[Column], command: list[str]) -> str | None:
    """When the last model's perplexity is above NEEDS_RECOVERY x dense on some text: what that means, and the
    `vnm recover` command to run (None when it is close enough to dense)."""
    dense, pruned = columns[0].perplexity, columns[-1].perplexity
    ratios = {name: pruned[name] / dense[name] for name in dense}
    if max(ratios.values()) <= NEEDS_RECOVERY:
        return None
    worst = max(ratios, key=ratios.get)
    return (f"The pruned model's perplexity is {ratios[worst]:,.1f}x dense on {worst}: one-shot pruning alone breaks it, "
            f"and it needs recovery (training with the dense model as teacher). Run:\n  {shlex.join(command)}")


def run(args: argparse.Namespace) -> int:
    """Run the job described by the parsed `vnm prune` arguments; prints the table, returns 0."""
    from .data import token_chunks
    from .models import load_causal_lm, model_path, model_reference

    start = time.perf_counter()
    device = resolve_device(args.device)
    model_path(args.model)
    check_out(args.out)
    check_two_four_copy(args.pattern, args.two_four_copy)
    calib_text, eval_texts = read_texts(args.calib, args.eval)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dense, tokenizer = load_causal_lm(args.model, dtype=dtype, device=device)
    calib_ids = token_chunks(tokenizer, calib_text, args.seq_len, args.calib_chunks)
    eval_ids = {name: token_chunks(tokenizer, text, args.seq_len, args.eval_chunks) for name, text in eval_texts.items()}
    linears = sum(1 for m in dense.modules() if type(m) is nn.Linear)
    mode = "sequential" if args.sequential else "one-shot"
    evaluation = ", ".join(f"{name} {len(ids)}x{args.seq_len}" for name, ids in eval_ids.items())
    print(f"vnm prune: {args.model} ({dtype}, {device}) -> {args.pattern} {args.method}"
          f"{f' ({mode})' if args.method == 'ria' else ''}; calibration {args.calib} {len(calib_ids)}x{args.seq_len} "
          f"tokens, evaluation {evaluation} tokens", flush=True)

    columns = [measure("dense", dense, None, eval_ids, args, device)]
    pruned = copy.deepcopy(dense)
    report = _prune(pruned, args.pattern, args.method, args.permute, args.two_four_copy, args, calib_ids)
    title = f"{args.pattern} {args.method}{' permuted' if args.permute else ''}{' +2:4 copy' if args.two_four_copy else ''}"
    columns.append(measure(title, pruned, report, eval_ids, args, device))
    source = [args.out] if args.out else ["--model", args.model, "--pattern", str(args.pattern)]
    hint = recovery_hint(columns, ["vnm", "recover", *source, "--out", f"{(args.out or 'pruned').rstrip('/')}-recovered"])
    if args.out:
        from ..checkpoint import save_pretrained

        pruned.vnm_sparsity["base_model"] = model_reference(args.model)  # the teacher and dense weights of `vnm recover`
        save_pretrained(pruned, args.out)
        tokenizer.save_pretrained(args.out)
    del pruned
    if not args.no_reference and args.pattern.M != REFERENCE.M:  # at M = 4 the mask is the reference's, for any V
        reference = copy.deepcopy(dense)
        ref_report = _prune(reference, REFERENCE, "ria", False, False, args, calib_ids)  # plain 2:4, as other tools do it
        columns.append(measure("2:4 ria (reference)", reference, ref_report, eval_ids, args, device))
        del reference
    print(table(columns, linears, time.perf_counter() - start))
    if hint:
        print(hint)
    if args.out:  # last: the line a user pastes
        folder = str(Path(args.out).resolve())
        print(f"saved to {folder}; to load it in Python:\n    import vnmsparse; model = vnmsparse.load_pretrained({folder!r})")
    return 0
