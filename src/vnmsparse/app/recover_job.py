"""`vnm recover`: train a pruned causal LM back towards its dense model, measure it, save it.

Input: a folder written by `vnm prune --out` (its pattern, pruned layers and base model are read from it), or
`--model` and `--pattern` (pruned first, by one-shot RIA on the training text). The dense base model is the
distillation teacher and the start of training: three-staged LoRA re-scores the dense weights while masks are
dynamic, so the pruned checkpoint contributes its pattern and its layers, and is measured as the "before" column
(a checkpoint pruned with `--permute` is recovered in the model's own channel order).
The default method, three-staged LoRA with distillation, is the one that recovered most per GPU-minute in the
accuracy benchmark (bench/accuracy.py); `--method srste` and `--no-kd` choose the others. Every input is checked
before a model is loaded. On a GPU the model trains in float32 with bf16 autocast and is measured and saved in
bf16; on a CPU everything is float32 (slow: use `--steps` for a short run).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..pattern import VNMPattern
from .prune_job import (Column, add_text_arguments, check_out, measure, pattern_arg, positive_int, read_texts,
                        resolve_device, table)
from ..recover import METHODS, RecoverConfig, recover
from ..sparsify import SparsifyConfig, SparsifyReport, sparsify
from ..train import DistillConfig

DEFAULT_MINUTES = 10.0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `vnm recover` on the `vnm` command's subparsers."""
    p = subparsers.add_parser("recover", help="train a pruned model back (three-staged LoRA + distillation), "
                              "report perplexity before and after, save it", description=__doc__.split("\n\n")[1])
    p.add_argument("checkpoint", nargs="?", help="folder written by `vnm prune --out` (or give --pattern)")
    p.add_argument("--model", help="prune this model first ('smollm2-135m', an HF folder, a .gguf); needs --pattern")
    p.add_argument("--pattern", type=pattern_arg, help="V:N:M to prune --model to (instead of a checkpoint)")
    p.add_argument("--teacher", help="the dense model (default: the base model the checkpoint records, or --model)")
    p.add_argument("--out", help="save the recovered model (and tokenizer) to this folder")
    p.add_argument("--method", choices=METHODS, default="lora3",
                   help="lora3: three-staged LoRA (default; recovered most per GPU-minute, and trains only the factors, "
                   "so it has memory for the teacher); srste: SR-STE on every weight")
    p.add_argument("--no-kd", action="store_true", help="train on the language-model loss alone: no teacher in memory "
                   "(distillation holds a second copy of the dense model and its logits)")
    p.add_argument("--kd-weight", type=float, default=DistillConfig.weight,
                   help=f"share of the distillation term in the loss (default {DistillConfig.weight}; 1 = distillation only)")
    p.add_argument("--kd-temperature", type=float, default=DistillConfig.temperature,
                   help=f"distillation temperature (default {DistillConfig.temperature})")
    p.add_argument("--kd-hidden", type=float, default=DistillConfig.hidden_weight,
                   help="weight of block-output matching on top (default 0: off)")
    p.add_argument("--minutes", type=_positive_float, help=f"stop after this much training (default {DEFAULT_MINUTES:g} "
                   "when --steps is not given; the steps are then planned to fit)")
    p.add_argument("--steps", type=positive_int, help="training steps (with --minutes as well, whichever comes first)")
    p.add_argument("--lr", type=_positive_float, help="learning rate (default 1e-3 for lora3, 1e-4 for srste)")
    p.add_argument("--rank", type=positive_int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="chunks per step and per evaluation forward (default 16)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per chunk (default 512)")
    add_text_arguments(p, "train", "training and calibration")
    p.add_argument("--calib-chunks", type=positive_int, default=32, help="training chunks RIA is calibrated on (default 32)")
    p.add_argument("--eval-chunks", type=positive_int, default=64, help="evaluation chunks per text (default 64)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation (default 0)")
    p.set_defaults(run=run)
    return p


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


@dataclass
class Plan:
    """What the checked inputs say to do: the pattern, the layers (None: all `sparsify` prunes), the teacher."""

    pattern: VNMPattern
    layers: list[str] | None
    teacher: str
    pruned_from: dict  # the checkpoint's sparsity_config, or {} when pruning here


def plan(args: argparse.Namespace) -> Plan:
    """Check the source arguments and the checkpoint without loading a model; raises ValueError naming the option."""
    from ..checkpoint import read_sparsity_config
    from .models import BUILTIN, model_path

    if args.checkpoint and (args.model or args.pattern):
        raise ValueError("give a checkpoint folder, or --model and --pattern to prune first, not both")
    if not args.checkpoint and not args.pattern:
        raise ValueError("give a checkpoint folder written by `vnm prune --out`, or --pattern (and --model) to prune first")
    if args.checkpoint:
        _, sparsity = read_sparsity_config(args.checkpoint)
        patterns = sorted(set(sparsity.get("layers", {}).values()))
        if len(patterns) != 1:
            raise ValueError(f"{args.checkpoint} holds layers of patterns {patterns}; vnm recover trains one pattern")
        teacher = args.teacher or sparsity.get("base_model")
        if teacher is None:
            raise ValueError(f"{args.checkpoint} does not record the dense model it was pruned from: pass --teacher "
                             f"(the dense model: {BUILTIN!r}, an HF folder or a .gguf file)")
        result = Plan(VNMPattern.parse(patterns[0]), list(sparsity["layers"]), teacher, sparsity)
    else:
        result = Plan(args.pattern, None, args.teacher or args.model or BUILTIN, {})
    try:
        model_path(result.teacher)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"the dense model is not found ({error}); pass --teacher with its location") from None
    return result


def recover_config(args: argparse.Namespace, pattern: VNMPattern, device: torch.device) -> RecoverConfig:
    """The RecoverConfig the flags describe (validated: bad numbers raise before anything is loaded)."""
    distill = None if args.no_kd else DistillConfig(args.kd_weight, args.kd_temperature, args.kd_hidden)
    minutes = args.minutes if args.minutes is not None or args.steps is not None else DEFAULT_MINUTES
    return RecoverConfig(pattern, method=args.method, distill=distill, steps=args.steps, minutes=minutes, lr=args.lr,
                         rank=args.rank, alpha=float(args.rank), batch_size=args.batch_size,
                         autocast="bf16" if device.type == "cuda" else None, seed=args.seed)


def _pruned_column(args: argparse.Namespace, todo: Plan, dense: nn.Module, calib: torch.Tensor,
                   eval_ids: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Column:
    """The "before" column: the checkpoint as saved, or the dense model pruned here by one-shot RIA."""
    from ..checkpoint import load_pretrained

    if args.checkpoint:
        start = time.perf_counter()
        pruned = load_pretrained(args.checkpoint).to(device)
        report = SparsifyReport.of_model(pruned, time.perf_counter() - start)
        title = f"{todo.pattern} {todo.pruned_from.get('method', '')} (input)".replace("  ", " ")
    else:
        pruned = copy.deepcopy(dense).to(dtype)
        report = sparsify(pruned, SparsifyConfig(pattern=todo.pattern, method="ria", calib_batch_size=args.batch_size),
                          calib=calib.to(device), progress=False)
        title = f"{todo.pattern} ria one-shot"
    return measure(title, pruned, report, eval_ids, args, device)


def run(args: argparse.Namespace) -> int:
    """Run the job described by the parsed `vnm recover` arguments; prints the table, returns 0."""
    from ..checkpoint import save_pretrained
    from .data import token_chunks
    from .models import load_causal_lm, model_reference

    start = time.perf_counter()
    device = resolve_device(args.device)
    todo = plan(args)
    config = recover_config(args, todo.pattern, device)
    check_out(args.out)
    train_text, eval_texts = read_texts(args.train, args.eval, train_flag="--train")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what is measured and saved

    teacher, tokenizer = load_causal_lm(todo.teacher, dtype=torch.float32, device=device)
    train_ids = token_chunks(tokenizer, train_text, args.seq_len)
    if len(train_ids) < args.batch_size:
        raise ValueError(f"--train {args.train!r} has {len(train_ids)} chunks of {args.seq_len} tokens, fewer than "
                         f"--batch-size {args.batch_size}")
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(args.seed))
    calib = train_ids[order[: args.calib_chunks]]
    eval_ids = {name: token_chunks(tokenizer, text, args.seq_len, args.eval_chunks) for name, text in eval_texts.items()}
    linears = sum(1 for m in teacher.modules() if type(m) is nn.Linear)
    kd = "no distillation" if config.distill is None else f"distillation {asdict(config.distill)}"
    print(f"vnm recover: {args.checkpoint or todo.teacher} -> {todo.pattern} by {config.method}, {kd}; teacher "
          f"{todo.teacher}; training on {args.train} {len(train_ids)}x{args.seq_len} tokens; evaluation "
          + ", ".join(f"{name} {len(ids)}x{args.seq_len}" for name, ids in eval_ids.items())
          + f"; budget {f'{config.steps} steps' if config.steps else ''}"
          + f"{', ' if config.steps and config.minutes else ''}{f'{config.minutes:g} min' if config.minutes else ''}"
          + f"; {device}", flush=True)

    measured = teacher if dtype == torch.float32 else copy.deepcopy(teacher).to(dtype)
    columns = [measure("dense", measured, None, eval_ids, args, device)]
    del measured
    columns.append(_pruned_column(args, todo, teacher, calib, eval_ids, device, dtype))

    student = copy.deepcopy(teacher)
    result = recover(student, teacher if config.distill else None, train_ids, calib, config, todo.layers)
    del teacher
    student.to(dtype)
    t = result.train
    print(f"trained {t.steps} of {result.planned_steps} steps (planned from {result.planned_from}) in {t.seconds:.0f} s, "
          f"stopped by {t.stopped}", flush=True)
    student.vnm_sparsity = {  # the final masks are the trained weights' scores, RIA statistics of the dense model
        "method": config.score, "calibration": "one-shot" if config.score == "ria" else None,
        "a": config.a if config.score == "ria" else None, "permute": False, "calib_batches": len(calib),
        "base_model": model_reference(todo.teacher),
        "recovery": {"method": config.method, "distill": None if config.distill is None else asdict(config.distill),
                     "steps": t.steps, "seconds": round(t.seconds, 1), "train_text": args.train, "lr": config.learning_rate},
    }
    title = f"recovered ({config.method}{' + KD' if config.distill else ''}, {t.steps} steps)"
    columns.append(measure(title, student, SparsifyReport.of_model(student, t.seconds), eval_ids, args, device))
    print(table(columns, linears, time.perf_counter() - start))
    if args.out:
        save_pretrained(student, args.out)
        tokenizer.save_pretrained(args.out)
        folder = str(Path(args.out).resolve())
        print(f"saved to {folder}; to load it in Python:\n    import vnmsparse; model = vnmsparse.load_pretrained({folder!r})")
    return 0
