"""`sparsify(model, config, calib)`: prune a model's nn.Linear layers to V:N:M and swap in `VNMLinear`s.

In the style of torchao's `sparsify_` and llm-compressor's `oneshot`: a validated config dataclass, an optional
`filter_fn(module, name)`, and calibration data for RIA. Everything the config says is checked against the model
before the first weight is touched, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import hf
from .calibrate import BlockRunner, block_index, calibration_mode, collect_act_sq_mean, find_blocks, recording
from .format import VALUE_DTYPES, VNMTensor, compress
from .nn import VNMLinear
from .ops import dispatch
from .pattern import VNMPattern
from .permute import compress_permuted, permute_model
from .scores import magnitude_scores, ria_scores

CONFIG_VERSION = 1
# Left dense unless named in `layers`: output heads and anything called an embedding.
DEFAULT_EXCLUDE = (r"(.*\.)?(lm_head|head|classifier)", r".*embed.*")

Calib = torch.Tensor | Mapping[str, Any] | Iterable[torch.Tensor | Mapping[str, Any]]
FilterFn = Callable[[nn.Module, str], bool]


class Method(str, Enum):
    """Importance criterion: RIA (needs calibration activations) or plain |W|."""

    RIA = "ria"
    MAGNITUDE = "magnitude"


def _pattern_or_none(value: Any, what: str) -> VNMPattern | None:
    if value is None:
        return None
    try:
        return VNMPattern.parse(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{what}: {error}") from None


@dataclass
class SparsifyConfig:
    """What to prune and how.

    pattern:    V:N:M for every selected nn.Linear (None: only the layers named in `layers`).
    layers:     per-layer patterns, {name or regex (full match): pattern or None}; None leaves a layer dense. An
                exact name wins over regexes, then the first matching regex; named layers ignore `exclude`.
    method:     "ria" or "magnitude"; None picks RIA when calibration data is given, else magnitude.
    a:          RIA's activation exponent.
    sequential: calibrate block by block, each block seeing the already-pruned ones before it (Wanda-style);
                False (default): one pass over the dense model. Only used by RIA. On SmolLM2-135M sequential
                is better at <= 60% sparsity (2:4, 64:2:5) and 3-5x worse at >= 67% (64:2:6..8); see
                bench/results/calib-modes-smollm2.md.
    blocks:     name of the nn.ModuleList / nn.Sequential of blocks for sequential mode (None: found).
    permute:    reorder channels so that the masks keep more importance (`vnmsparse.permute`): input orders for
                every layer and output orders where a consumer absorbs them (gate/up -> down, v -> o, fc1 -> fc2),
                all folded into the compressed tensors or the neighbouring weights, so free at inference.
    exclude:    regexes (full match) of layer names left dense unless named in `layers`.
    calib_batch_size: rows per forward when `calib` is one tensor.
    two_four_copy: every pruned layer also holds a 2:4 copy of its weight where the copy runs (packed on an sm_90
                GPU): faster serving batches and prefill for 2.5-3 times the layer's bytes (`VNMLinear`). Needs V:2:M
                patterns with 5 <= M <= 8 and V <= 64 (checked before any weight is touched); for some layers only,
                set `VNMLinear.two_four_copy` on them after sparsify.
    """

    pattern: VNMPattern | str | None = "64:2:8"
    layers: Mapping[str, VNMPattern | str | None] = field(default_factory=dict)
    method: Method | str | None = None
    a: float = 0.5
    sequential: bool = False
    blocks: str | None = None
    permute: bool = False
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    calib_batch_size: int = 8
    two_four_copy: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.pattern = _pattern_or_none(self.pattern, "SparsifyConfig.pattern")
        if not isinstance(self.layers, Mapping):
            raise TypeError(f"SparsifyConfig.layers must be a mapping {{name or regex: pattern}}, got {type(self.layers).__name__}")
        self.layers = {_regex(key, "SparsifyConfig.layers key").pattern: _pattern_or_none(value, f"SparsifyConfig.layers[{key!r}]")
                       for key, value in self.layers.items()}
        if self.method is not None:
            try:
                self.method = Method(self.method)
            except ValueError:
                raise ValueError(f"SparsifyConfig.method must be one of {[m.value for m in Method]} or None, "
                                 f"got {self.method!r}") from None
        if isinstance(self.a, bool) or not isinstance(self.a, (int, float)) or not 0 <= self.a < float("inf"):
            raise ValueError(f"SparsifyConfig.a must be a finite number >= 0, got {self.a!r}")
        for name in ("sequential", "permute", "two_four_copy"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SparsifyConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.blocks is not None and not isinstance(self.blocks, str):
            raise TypeError(f"SparsifyConfig.blocks must be a module name or None, got {self.blocks!r}")
        if isinstance(self.exclude, str) or not isinstance(self.exclude, Iterable):
            raise TypeError(f"SparsifyConfig.exclude must be a tuple of regexes, got {self.exclude!r}")
        self.exclude = tuple(_regex(r, "SparsifyConfig.exclude entry").pattern for r in self.exclude)
        if isinstance(self.calib_batch_size, bool) or not isinstance(self.calib_batch_size, int) or self.calib_batch_size < 1:
            raise ValueError(f"SparsifyConfig.calib_batch_size must be a positive int, got {self.calib_batch_size!r}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"SparsifyConfig.version {self.version!r} is not supported; this build reads {CONFIG_VERSION}")
        if self.pattern is None and not any(p is not None for p in self.layers.values()):
            raise ValueError("SparsifyConfig selects nothing: give a pattern, or patterns in layers")

    def resolve_method(self, calib: Calib | None) -> Method:
        """The method to use with this calibration data (RIA by default when there is some)."""
        method = self.method or (Method.RIA if calib is not None else Method.MAGNITUDE)
        if method is Method.RIA and calib is None:
            raise ValueError("method 'ria' needs calibration data: pass calib=, or use method='magnitude'")
        return method


def _regex(text: Any, what: str) -> re.Pattern:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    try:
        return re.compile(text)
    except re.error as error:
        raise ValueError(f"{what} {text!r} is not a valid regex: {error}") from None


def plan_layers(model: nn.Module, config: SparsifyConfig, filter_fn: FilterFn | None = None) -> dict[str, VNMPattern]:
    """{layer name: pattern} for every nn.Linear the config prunes; raises on anything it cannot do."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (module, name) -> bool, got {type(filter_fn).__name__}")
    modules = dict(model.named_modules())
    linears = {name: m for name, m in modules.items() if type(m) is nn.Linear}
    explicit: dict[str, str] = {}  # layer name -> the config.layers key that decides it
    for key in config.layers:
        if key in modules:
            if key not in linears:
                raise ValueError(f"SparsifyConfig.layers[{key!r}] names a {type(modules[key]).__name__}, not an nn.Linear")
            explicit[key] = key
            continue
        matched = [name for name in linears if re.fullmatch(key, name)]
        if not matched:
            raise ValueError(f"SparsifyConfig.layers[{key!r}] matches no nn.Linear in the model "
                             f"(layers look like {list(linears)[:3]})")
        for name in matched:
            explicit.setdefault(name, key)
    plan = {}
    for name, linear in linears.items():
        if filter_fn is not None and not filter_fn(linear, name):
            continue
        if name in explicit:
            pattern = config.layers[explicit[name]]
        elif any(re.fullmatch(r, name) for r in config.exclude):
            continue
        else:
            pattern = config.pattern
        if pattern is not None:
            plan[name] = pattern
    if not plan:
        raise ValueError("no nn.Linear layer is selected by this config and filter_fn")
    _check_servable(model, linears, plan)
    if config.two_four_copy:
        _check_two_four_copy(plan)
    return plan


def _check_two_four_copy(plan: Mapping[str, VNMPattern]) -> None:
    """Every planned layer's pattern can have the 2:4 copy the config asks for (`dispatch.two_four_copy_refusal`), so
    that `VNMLinear` will not refuse it halfway through."""
    for name, pattern in plan.items():
        why = dispatch.two_four_copy_refusal(pattern.V, pattern.M)
        if why is not None:
            raise ValueError(f"layer {name!r}: SparsifyConfig.two_four_copy needs {why}")


def _check_servable(model: nn.Module, linears: Mapping[str, nn.Linear], plan: Mapping[str, VNMPattern]) -> None:
    """Each planned layer must be a real, untied float weight at least one column group wide."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    for name, pattern in plan.items():
        weight = linears[name].weight
        if weight.dtype not in VALUE_DTYPES:
            raise TypeError(f"layer {name!r}: weight dtype {weight.dtype} cannot be compressed; use one of {VALUE_DTYPES}")
        if weight.device.type == "meta":
            raise ValueError(f"layer {name!r} is on the meta device; load its weights before sparsifying")
        if linears[name].in_features < pattern.M:
            raise ValueError(f"layer {name!r}: in_features={linears[name].in_features} is less than M={pattern.M}, "
                             f"so {pattern} cannot serve it (a V x M block needs M input columns)")
        tied = [o for o in owners[id(weight)] if o != f"{name}.weight"]
        if tied:
            raise ValueError(f"layer {name!r}: its weight is shared with {tied}; untie it or leave the layer dense")


def calib_batches(calib: Calib, batch_size: int) -> list[torch.Tensor | Mapping[str, Any]]:
    """Calibration data as a list of forward inputs: a tensor is split along dim 0, a mapping is one batch of
    keyword arguments, an iterable is taken batch by batch."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() < 1 or len(calib) == 0:
            raise ValueError(f"calib must have at least one row, got shape {tuple(calib.shape)}")
        return list(calib.split(batch_size))
    if isinstance(calib, Mapping):
        return [calib]
    if isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise TypeError(f"calib must be a tensor, a mapping of model inputs, or an iterable of them; got {type(calib).__name__}")
    batches = list(calib)
    if not batches:
        raise ValueError("calib is empty")
    bad = [type(b).__name__ for b in batches if not isinstance(b, (torch.Tensor, Mapping))]
    if bad:
        raise TypeError(f"every calib batch must be a tensor or a mapping of model inputs, got {bad[0]}")
    return batches


@dataclass
class LayerReport:
    """One pruned layer: its pattern, logical shape, stored (kept) weights and bytes; with `two_four_copy`, the bytes
    its 2:4 copy adds wherever the layer holds it (packed on an sm_90 GPU; on the CPU the layer does not hold it yet,
    and the report counts what it will hold there)."""

    name: str
    pattern: str
    shape: tuple[int, int]
    kept: int
    dense_bytes: int
    compressed_bytes: int  # the weight as stored (what a checkpoint holds)
    kept_score: tuple[float, float] | None = None  # with permute: fraction of the score the mask keeps, without / with
    two_four_copy: bool = False
    copy_bytes: int = 0  # `VNMLinear.two_four_copy_nbytes`

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def held_bytes(self) -> int:
        """Bytes the layer holds where it runs fastest: the weight and, if asked for, its 2:4 copy."""
        return self.compressed_bytes + self.copy_bytes

    @classmethod
    def of_layer(cls, name: str, layer: VNMLinear, weight: VNMTensor | None = None,
                 kept_score: tuple[float, float] | None = None) -> LayerReport:
        """The report of `layer`; `weight` is its weight where the caller has it (on a GPU `layer.weight` unpacks a
        copy of it)."""
        weight = layer.weight if weight is None else weight
        return cls(name, str(layer.pattern), weight.shape, int(weight.mask().sum()), weight.dense_nbytes, weight.nbytes,
                   kept_score, layer.two_four_copy, layer.two_four_copy_nbytes)


@dataclass
class SparsifyReport:
    """What `sparsify` did, with totals over the pruned layers and over the whole model."""

    layers: list[LayerReport]
    method: str
    calibration: str | None  # "sequential", "one-shot", or None (magnitude)
    a: float | None
    permute: bool
    calib_batches: int
    model_params: int  # parameters of the model before pruning (shared ones counted once)
    seconds: float

    @property
    def params(self) -> int:
        """Dense parameters of the pruned layers."""
        return sum(layer.params for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of the pruned layers' weights that are zero."""
        return 1.0 - self.kept / self.params

    @property
    def model_sparsity(self) -> float:
        """Fraction of all the model's parameters that were pruned."""
        return (self.params - self.kept) / self.model_params

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.compressed_bytes for layer in self.layers)

    @property
    def copy_bytes(self) -> int:
        """Bytes the layers' 2:4 copies add (`LayerReport.copy_bytes`)."""
        return sum(layer.copy_bytes for layer in self.layers)

    @property
    def held_bytes(self) -> int:
        """Bytes the pruned layers hold where they run fastest: weights and 2:4 copies."""
        return sum(layer.held_bytes for layer in self.layers)

    @classmethod
    def of_model(cls, model: nn.Module, seconds: float = 0.0) -> SparsifyReport:
        """The report of a model that already holds VNMLinear layers (a loaded checkpoint, a trained model),
        with how it was pruned read from its `vnm_sparsity` record where there is one."""
        layers = [LayerReport.of_layer(name, m) for name, m in model.named_modules() if isinstance(m, VNMLinear)]
        if not layers:
            raise ValueError("the model has no VNMLinear layer to report on")
        record = getattr(model, "vnm_sparsity", {})
        model_params = sum(p.numel() for p in model.parameters()) + sum(layer.params for layer in layers)
        return cls(layers, record.get("method", "-"), record.get("calibration"), record.get("a"),
                   bool(record.get("permute", False)), record.get("calib_batches", 0), model_params, seconds)

    def to_config(self) -> dict[str, Any]:
        """How the model was pruned, for a checkpoint's `sparsity_config` (which adds the layers and its version)."""
        return {"method": self.method, "calibration": self.calibration, "a": self.a, "permute": self.permute,
                "calib_batches": self.calib_batches}

    @property
    def kept_score(self) -> tuple[float, float] | None:
        """With permute: mean over layers of the score fraction the masks keep, without / with permutation."""
        kept = [layer.kept_score for layer in self.layers if layer.kept_score is not None]
        if not kept:
            return None
        return sum(k[0] for k in kept) / len(kept), sum(k[1] for k in kept) / len(kept)

    def __str__(self) -> str:
        permuted = f", permutation kept score {self.kept_score[0]:.3f} -> {self.kept_score[1]:.3f}" if self.kept_score else ""
        copies = sum(1 for layer in self.layers if layer.copy_bytes)
        idle = sum(layer.two_four_copy for layer in self.layers) - copies
        copy = (f" (+{self.copy_bytes / 2**20:.1f} MiB: the 2:4 copies of {copies} layers, held on sm_90 GPUs)"
                if copies else "")
        if idle:  # asked for, but no call would run it (ops.dispatch.two_four_copy_runs): never held
            copy += f" ({idle} layers asked for a 2:4 copy no call would run: too few rows for its x gather)"
        return (f"{len(self.layers)} layers pruned ({self.method}, {self.calibration or 'no calibration'}): "
                f"sparsity {self.sparsity:.2%} of {self.params:,} weights ({self.model_sparsity:.2%} of the model), "
                f"{self.dense_bytes / 2**20:.1f} -> {self.compressed_bytes / 2**20:.1f} MiB{copy}, {self.seconds:.1f} s{permuted}")


def _prune_group(
    model: nn.Module, names: list[str], plan: Mapping[str, VNMPattern], stats: Mapping[str, torch.Tensor],
    config: SparsifyConfig, bar: tqdm,
) -> list[LayerReport]:
    """Score a group of layers (one block, or the layers outside the blocks), optionally reorder their channels,
    compress them and put VNMLinears in their place. Layers without a statistic are scored by magnitude."""
    scores = {}
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        scores[name] = magnitude_scores(weight) if name not in stats else ria_scores(weight, stats[name], config.a)
    orders = {}
    if config.permute:  # output orders are applied to the dense weights here (the block computes the same function)
        for pattern in dict.fromkeys(plan[n] for n in names):
            subset = {n: scores[n] for n in names if plan[n] == pattern}
            orders.update(permute_model(model, subset, pattern, progress=False))
    reports = []
    for name in names:
        linear, order = model.get_submodule(name), orders.get(name)
        weight = linear.weight.detach()
        if order is None:
            tensor = compress(weight, plan[name], scores=scores[name])
        else:
            tensor = compress_permuted(weight, order.reorder(scores[name]), plan[name], order.perm_in)
        layer = VNMLinear(tensor, linear.bias, config.two_four_copy)
        model.set_submodule(name, layer)
        kept = None if order is None else (order.kept_before, order.kept_after)
        reports.append(LayerReport.of_layer(name, layer, tensor, kept))
        bar.update()
    return reports


def sparsify(
    model: nn.Module,
    config: SparsifyConfig | VNMPattern | str | None = None,
    calib: Calib | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> SparsifyReport:
    """Prune `model`'s nn.Linear layers in place to V:N:M, replacing them by VNMLinear; returns a report.

    `config`: a `SparsifyConfig`, or a pattern ("64:2:8") as shorthand for `SparsifyConfig(pattern=...)`.

    `calib`: token ids (n, seq_len) or model inputs (split into `config.calib_batch_size` rows), a mapping of
    keyword inputs, or an iterable of either. The result is also recorded on `model.vnm_sparsity` for
    `save_pretrained`.
    """
    start = time.perf_counter()
    if config is None or isinstance(config, (str, VNMPattern)):  # "64:2:8": SparsifyConfig(pattern="64:2:8")
        config = SparsifyConfig() if config is None else SparsifyConfig(pattern=config)
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig or a pattern such as '64:2:8', got {type(config).__name__}")
    plan = plan_layers(model, config, filter_fn)
    method = config.resolve_method(calib)
    model_params = sum(p.numel() for p in model.parameters())
    batches, calibration = [], None
    if method is Method.RIA:
        batches = calib_batches(calib, config.calib_batch_size)
        calibration = "sequential" if config.sequential else "one-shot"
    elif calib is not None:
        warnings.warn("calib is ignored by method='magnitude'", stacklevel=2)
    sequential = calibration == "sequential"
    blocks_name = _blocks_for(model, config, plan, required=sequential)

    with calibration_mode(model), tqdm(total=len(plan), desc="sparsify", disable=not progress) as bar:
        if sequential:
            layers = _sparsify_sequential(model, plan, batches, blocks_name, config, bar)
        else:
            stats = collect_act_sq_mean(model, batches, plan, progress=progress) if batches else {}
            layers = [r for names in _groups(plan, blocks_name) for r in _prune_group(model, names, plan, stats, config, bar)]

    report = SparsifyReport(layers, method.value, calibration, config.a if method is Method.RIA else None,
                            config.permute, len(batches), model_params, time.perf_counter() - start)
    model.vnm_sparsity = report.to_config()
    hf.attach(model)  # a transformers model's own save_pretrained can write it now
    return report


def _groups(plan: Mapping[str, VNMPattern], blocks_name: str | None) -> list[list[str]]:
    """Layer names grouped by block, in order, then the layers outside the blocks (channel orders never cross
    a block, and a block's scores are all that is held at once)."""
    per_block: dict[int | None, list[str]] = {}
    for name in plan:
        per_block.setdefault(None if blocks_name is None else block_index(name, blocks_name), []).append(name)
    return [per_block[i] for i in sorted(i for i in per_block if i is not None)] + ([per_block[None]] if None in per_block else [])


def _blocks_for(model: nn.Module, config: SparsifyConfig, plan: Mapping[str, VNMPattern], required: bool) -> str | None:
    """The block stack: the configured one (checked), or the one found; sequential calibration requires one."""
    if config.blocks is None:
        name = find_blocks(model, plan)
        if name is None and required:
            raise ValueError("sequential calibration found no nn.ModuleList / nn.Sequential of blocks holding the "
                             "layers to prune; set SparsifyConfig.blocks, or sequential=False")
        return name
    try:
        container = model.get_submodule(config.blocks)
    except AttributeError:
        raise ValueError(f"SparsifyConfig.blocks={config.blocks!r} names no module in the model") from None
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"SparsifyConfig.blocks={config.blocks!r} is a {type(container).__name__}, "
                         "not an nn.ModuleList or nn.Sequential")
    return config.blocks


def _sparsify_sequential(
    model: nn.Module, plan: Mapping[str, VNMPattern], batches: list, blocks_name: str, config: SparsifyConfig, bar: tqdm
) -> list[LayerReport]:
    """Prune block by block: statistics of block i are taken on the outputs of the already-pruned blocks < i.

    Layers outside the stack (a classifier named in `layers`, say) are calibrated last, in one pass of the
    model whose blocks are by then pruned.
    """
    groups = _groups(plan, blocks_name)
    inside = {block_index(g[0], blocks_name): g for g in groups if block_index(g[0], blocks_name) is not None}
    outside = [n for g in groups for n in g if block_index(n, blocks_name) is None]
    runner = BlockRunner(model, model.get_submodule(blocks_name), batches)
    layers = []
    last = max(inside, default=-1)
    for index in range(last + 1):
        names = inside.get(index, [])
        if names:
            with recording({n: model.get_submodule(n) for n in names}) as stats:
                runner.run(index)
            layers += _prune_group(model, names, plan, {n: s.act_sq_mean for n, s in stats.items()}, config, bar)
        if index < last:
            runner.advance(index)
    del runner
    if outside:
        stats = collect_act_sq_mean(model, batches, outside, progress=False)
        layers += _prune_group(model, outside, plan, stats, config, bar)
    return layers
