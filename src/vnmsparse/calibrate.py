"""Calibration statistics: the per-input-channel mean of x_j^2 seen by each linear layer, via forward hooks.

Two ways to feed them. One-shot (`collect_act_sq_mean`): one pass of the whole model, every layer sees dense
inputs. Sequential (`BlockRunner`), as Wanda and SparseGPT do: the inputs of the first block of a stack
(`find_blocks`) are captured once, then the blocks are run one at a time, so that a block's statistics can
be taken after the blocks before it have been pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


class ActivationStats:
    """Running mean of x_j^2 over all tokens fed to one linear layer (`add_batch` per forward)."""

    def __init__(self, in_features: int) -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        self.sum_sq += flat.float().pow(2).sum(dim=0, dtype=torch.float64).cpu()
        self.tokens += flat.shape[0]

    @property
    def act_sq_mean(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens were seen by this layer")
        return (self.sum_sq / self.tokens).float()


@contextmanager
def recording(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, ActivationStats]]:
    """Hook each named linear so that every forward adds its input to that layer's `ActivationStats`."""
    stats = {name: ActivationStats(m.in_features) for name, m in modules.items()}
    hooks = [m.register_forward_pre_hook(lambda _m, args, s=stats[n]: s.add_batch(args[0])) for n, m in modules.items()]
    try:
        yield stats
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and, for HF models, no KV cache, so that every forward is independent; restored after."""
    training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(training)
        if use_cache is not None:
            config.use_cache = use_cache


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def run_model(model: nn.Module, batch: torch.Tensor | Mapping[str, Any]) -> Any:
    """One forward of a calibration batch: a tensor is the first argument, a mapping the keyword arguments."""
    device = model_device(model)
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return model(batch.to(device))


@torch.no_grad()
def collect_act_sq_mean(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], names: Iterable[str], progress: bool = True
) -> dict[str, torch.Tensor]:
    """Run `batches` (token ids or model inputs) through `model` and return act_sq_mean per named linear."""
    modules = dict(model.named_modules())
    names = list(names)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no modules named {missing[:5]} in the model")
    with recording({n: modules[n] for n in names}) as stats:
        for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            run_model(model, batch)
    return {n: s.act_sq_mean for n, s in stats.items()}


def find_blocks(model: nn.Module, names: Iterable[str]) -> str | None:
    """The name of the nn.ModuleList / nn.Sequential whose children hold the most of the named layers.

    That is the stack of transformer blocks (`model.layers` in HF LLaMA, `blocks` in timm ViT); None when no
    container with at least two children holds any of them.
    """
    names = list(names)
    best, best_count = None, 0
    for container_name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        prefix = f"{container_name}." if container_name else ""
        count = sum(1 for n in names if n.startswith(prefix) and n[len(prefix):].split(".")[0].isdigit())
        if count > best_count:
            best, best_count = container_name, count
    return best


def block_index(name: str, blocks_name: str) -> int | None:
    """Which child of the block stack `blocks_name` holds layer `name` (None when it is outside the stack)."""
    prefix = f"{blocks_name}." if blocks_name else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".")[0]
    return int(head) if head.isdigit() else None


class _Stop(Exception):
    """Raised by a hook to end a forward once the first block's inputs are captured."""


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a block call: its first positional argument, or `hidden_states=` / `x=`."""
    if args:
        return args[0]
    for key in ("hidden_states", "x"):
        if key in kwargs:
            return kwargs[key]
    raise ValueError(f"cannot find the hidden-state input of a block among its arguments (keywords {sorted(kwargs)})")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same block call with its hidden-state input replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else "x"
    return args, {**kwargs, key: hidden}


def output_hidden(output: Any) -> torch.Tensor:
    """The hidden state a block returns: the output itself, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"a block returned {type(output).__name__}; sequential calibration needs a tensor or a tuple of them")


class BlockRunner:
    """The captured inputs of a stack of blocks, advanced one block at a time (sequential calibration)."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence[Any]) -> None:
        self.blocks = blocks
        self.inputs: list[tuple[tuple, dict]] = []
        self._capture(model, batches)

    @torch.no_grad()
    def _capture(self, model: nn.Module, batches: Sequence[Any]) -> None:
        """Record the first block's (args, kwargs) per batch; on the first batch also check that the stack is a
        plain chain (block i+1 is called on block i's output), which sequential calibration relies on."""
        previous: list[torch.Tensor | None] = [None]
        chained: list[bool] = []

        def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs.append((args, kwargs))
            if len(self.inputs) > 1:  # the first batch runs through, to check the chain
                raise _Stop

        def before(index: int):
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                if index > 0:
                    chained.append(_hidden_of(args, kwargs) is previous[0])
            return hook

        def after(_module: nn.Module, _args: tuple, output: Any) -> None:
            previous[0] = output_hidden(output)

        hooks = [self.blocks[0].register_forward_pre_hook(capture, with_kwargs=True)]
        hooks += [b.register_forward_pre_hook(before(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        hooks += [b.register_forward_hook(after) for b in self.blocks]
        try:
            for i, batch in enumerate(batches):
                try:
                    run_model(model, batch)
                except _Stop:
                    pass
                if i == 0:
                    for hook in hooks[1:]:
                        hook.remove()
                    if len(chained) != len(self.blocks) - 1 or not all(chained):
                        raise ValueError("sequential calibration needs each block to be called once per forward, on the "
                                         "previous block's output; this model does not (use sequential=False)")
        finally:
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def run(self, index: int) -> None:
        """Run block `index` on every captured input (hooks on its layers see them)."""
        for args, kwargs in self.inputs:
            self.blocks[index](*args, **kwargs)

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Replace the captured inputs by block `index`'s outputs: the inputs of block index + 1."""
        self.inputs = [
            _with_hidden(args, kwargs, output_hidden(self.blocks[index](*args, **kwargs))) for args, kwargs in self.inputs
        ]
