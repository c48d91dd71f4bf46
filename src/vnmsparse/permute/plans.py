"""Which layers of a model can be reordered, and how: output permutations of a producer layer (rows) are undone
by its consumers' input order (columns), so a model computes the same function. `output_units` recognises the
units (LLaMA MLP and attention, timm MLP and attention), `plan_permutations` searches each unit's orders with
`search`, `apply_output_permutations` reorders the model, and `compress_permuted` folds a layer's input order
into its kept-column indices (free at inference)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..format import VNMTensor, compress, fold_input_permutation
from ..pattern import VNMPattern
from .search import check_score_matrix, find_joint_permutation, find_permutation


@dataclass(frozen=True)
class OutputUnit:
    """Layers that share one output order, and the layers whose input columns absorb it exactly.

    producers: linear layers whose rows (and biases) are reordered together (LLaMA gate_proj and up_proj).
    consumers: (name, source) pairs; source[c] is the producer row that consumer column c reads (for
               attention, the value dim of the KV head that the column's query head uses).
    labels: (R,) non-decreasing; a producer row only moves among equal labels (None: anywhere).
    """

    producers: tuple[str, ...]
    consumers: tuple[tuple[str, torch.Tensor], ...]
    labels: torch.Tensor | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return self.producers + tuple(name for name, _ in self.consumers)


@dataclass(frozen=True)
class LayerPermutation:
    """One linear layer's orders. After `apply_output_permutations` its weight is W[row_order][:, col_order];
    compress that as `compress_permuted(weight, self.reorder(scores), pattern, perm_in)`.

    row_order: (R,) output order applied to the layer (identity unless its outputs feed a consumer).
    col_order: (C,) input order applied to the layer (identity unless it consumes a reordered output).
    perm_in:   (C,) column order to compress in, over the reordered weight; folded into the compressed
               tensor's column indices, so it costs nothing at inference.
    kept_before / kept_after: kept score fraction of the original weight / of the one compressed.
    """

    row_order: torch.Tensor
    col_order: torch.Tensor
    perm_in: torch.Tensor
    kept_before: float
    kept_after: float

    def reorder(self, tensor: torch.Tensor) -> torch.Tensor:
        """An (R, C) per-weight tensor (scores, mask) in the order `apply_output_permutations` gives the weight."""
        return tensor[self.row_order.to(tensor.device)][:, self.col_order.to(tensor.device)]


def output_units(model: torch.nn.Module) -> list[OutputUnit]:
    """The places in `model` where an output order can change for free.

    Recognised: LLaMA-style MLPs (gate_proj and up_proj -> down_proj) and attention (v_proj -> o_proj,
    within each KV head, for every query head of its group; q/k never move: RoPE and q.k), and timm's
    `Mlp` (fc1 -> fc2) and `Attention` (the v part of qkv, within each head -> proj). Modules with a
    norm or gate between producer and consumer are left out. o_proj, down_proj, fc2 and proj feed the
    residual stream and keep their output order everywhere.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    units = []
    for prefix, module in model.named_modules():
        unit = _llama_mlp(prefix, module) or _llama_attention(prefix, module) or _timm_mlp(prefix, module) \
            or _timm_attention(prefix, module)
        if unit is not None:
            units.append(unit)
    return units


def _linears(module: torch.nn.Module, *names: str) -> list[torch.nn.Linear] | None:
    layers = [getattr(module, n, None) for n in names]
    return layers if all(isinstance(layer, torch.nn.Linear) for layer in layers) else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_identity(module: object) -> bool:
    return module is None or isinstance(module, torch.nn.Identity)


def _llama_mlp(prefix: str, module: torch.nn.Module) -> OutputUnit | None:
    layers = _linears(module, "gate_proj", "up_proj", "down_proj")
    if layers is None or not hasattr(module, "act_fn"):
        return None
    gate, up, down = layers
    if not gate.out_features == up.out_features == down.in_features:
        return None
    source = torch.arange(down.in_features)
    return OutputUnit((_join(prefix, "gate_proj"), _join(prefix, "up_proj")), ((_join(prefix, "down_proj"), source),))


def _llama_attention(prefix: str, module: torch.nn.Module) -> OutputUnit | None:
    layers = _linears(module, "q_proj", "k_proj", "v_proj", "o_proj")
    head_dim = getattr(module, "head_dim", None)
    if layers is None or not isinstance(head_dim, int) or hasattr(module, "v_norm"):
        return None
    v, o = layers[2], layers[3]
    if v.out_features % head_dim or o.in_features % head_dim or (o.in_features // head_dim) % (v.out_features // head_dim):
        return None
    group = (o.in_features // head_dim) // (v.out_features // head_dim)  # query heads per KV head
    column = torch.arange(o.in_features)
    source = (column // head_dim // group) * head_dim + column % head_dim
    labels = torch.arange(v.out_features) // head_dim
    return OutputUnit((_join(prefix, "v_proj"),), ((_join(prefix, "o_proj"), source),), labels)


def _timm_mlp(prefix: str, module: torch.nn.Module) -> OutputUnit | None:
    layers = _linears(module, "fc1", "fc2")
    if type(module).__name__ != "Mlp" or layers is None or not _is_identity(getattr(module, "norm", None)):
        return None
    if layers[0].out_features != layers[1].in_features:
        return None
    return OutputUnit((_join(prefix, "fc1"),), ((_join(prefix, "fc2"), torch.arange(layers[1].in_features)),))


def _timm_attention(prefix: str, module: torch.nn.Module) -> OutputUnit | None:
    layers = _linears(module, "qkv", "proj")
    head_dim = getattr(module, "head_dim", None)
    if type(module).__name__ != "Attention" or layers is None or not isinstance(head_dim, int):
        return None
    if not (_is_identity(getattr(module, "norm", None)) and getattr(module, "gate", None) is None):
        return None
    qkv, proj = layers
    width = proj.in_features  # heads * head_dim; qkv rows are [q | k | v], each head-major
    if qkv.out_features != 3 * width or width % head_dim:
        return None
    rows = torch.arange(3 * width)
    labels = torch.where(rows < 2 * width, rows, 2 * width + (rows - 2 * width) // head_dim)  # q, k fixed
    return OutputUnit((_join(prefix, "qkv"),), ((_join(prefix, "proj"), 2 * width + torch.arange(width)),), labels)


def plan_permutations(
    model: torch.nn.Module,
    scores: Mapping[str, torch.Tensor],
    pattern: VNMPattern | str,
    iters: int = 2,
    chunk: int | None = None,
    levels: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, LayerPermutation]:
    """Orders for every linear layer named in `scores` (name -> (out, in) importance of its weight).

    Output orders change only in `output_units` whose layers all have scores; every other layer gets an
    input order only. Apply the plan with `apply_output_permutations`, then compress each layer with
    `compress_permuted`. Search arguments as in `find_permutation`.
    """
    modules = _check_plan_args(model, scores)
    pattern = VNMPattern.parse(pattern)
    search = dict(iters=iters, chunk=chunk, levels=levels, seed=seed)
    units = [u for u in output_units(model) if all(name in scores for name in u.names)]
    names = [name for unit in units for name in unit.names]
    if len(names) != len(set(names)):
        raise ValueError("a layer belongs to two output units; chained reorders are not supported")
    plan: dict[str, LayerPermutation] = {}
    for unit in tqdm(units, desc="permutation plan", disable=not progress, leave=False):
        results = find_joint_permutation([scores[n] for n in unit.producers], pattern, out_labels=unit.labels, **search)
        for name, r in zip(unit.producers, results):
            plan[name] = LayerPermutation(r.perm_out, torch.arange(len(r.perm_in)), r.perm_in, r.kept_before, r.kept_after)
        for name, source in unit.consumers:
            col_order = torch.arange(len(source)) + results[0].perm_out[source] - source
            r = find_permutation(scores[name], pattern, optimize_out=False, **search)
            inverse = torch.empty_like(col_order)
            inverse[col_order] = torch.arange(len(col_order))
            plan[name] = LayerPermutation(torch.arange(modules[name].out_features), col_order, inverse[r.perm_in],
                                          r.kept_before, r.kept_after)
    for name in tqdm([n for n in scores if n not in plan], desc="permutation plan", disable=not progress, leave=False):
        r = find_permutation(scores[name], pattern, optimize_out=False, **search)
        plan[name] = LayerPermutation(r.perm_out, torch.arange(len(r.perm_in)), r.perm_in, r.kept_before, r.kept_after)
    return plan


@torch.no_grad()
def apply_output_permutations(model: torch.nn.Module, plan: Mapping[str, LayerPermutation]) -> None:
    """Reorder producer rows (and biases) and consumer columns in place; the model computes the same function.

    Apply a plan once, to the model it was made for: the orders are relative to the original weights.
    """
    modules = dict(model.named_modules())
    for name, layer in plan.items():
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"plan names {name!r}, which is not an nn.Linear of this model")
        module.weight.copy_(layer.reorder(module.weight))
        if module.bias is not None:
            module.bias.copy_(module.bias[layer.row_order.to(module.bias.device)])


def compress_permuted(weight: torch.Tensor, scores: torch.Tensor, pattern: VNMPattern | str,
                      perm_in: torch.Tensor) -> VNMTensor:
    """Compress weight[:, perm_in] with its V:N:M mask and fold perm_in back: the result reads x in W's order."""
    if not isinstance(perm_in, torch.Tensor):
        raise TypeError(f"perm_in must be a torch.Tensor, got {type(perm_in).__name__}")
    perm = perm_in.to(device=weight.device, dtype=torch.int64)
    return fold_input_permutation(compress(weight[:, perm], pattern, scores=scores[:, perm.to(scores.device)]), perm)


def permute_model(model: torch.nn.Module, scores: Mapping[str, torch.Tensor], pattern: VNMPattern | str,
                  **search: object) -> dict[str, LayerPermutation]:
    """`plan_permutations` then `apply_output_permutations`; returns the plan (for compression)."""
    plan = plan_permutations(model, scores, pattern, **search)
    apply_output_permutations(model, plan)
    return plan


# --- argument checks ------------------------------------------------------------------------------------


def _check_plan_args(model: object, scores: object) -> dict[str, torch.nn.Linear]:
    """The model's linear layers by name, after checking that `scores` names some of them with their shapes."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping of layer name -> score tensor, got {type(scores).__name__}")
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, s in scores.items():
        if name not in modules:
            raise ValueError(f"scores names {name!r}, which is not an nn.Linear of the model")
        check_score_matrix(s, f"scores[{name!r}]")
        if tuple(s.shape) != tuple(modules[name].weight.shape):
            raise ValueError(f"scores[{name!r}] has shape {tuple(s.shape)}, the weight {tuple(modules[name].weight.shape)}")
    return modules
