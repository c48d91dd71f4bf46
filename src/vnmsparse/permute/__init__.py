"""V:N:M channel permutation: `search` finds output and input orders that keep more importance (alternating linear
assignments); `plans` knows which layers of a model may be reordered together and applies the orders."""

from .plans import LayerPermutation, OutputUnit, apply_output_permutations, compress_permuted, output_units, permute_model, plan_permutations
from .search import PermutationResult, find_joint_permutation, find_permutation, kept_fraction

__all__ = [
    "LayerPermutation",
    "OutputUnit",
    "PermutationResult",
    "apply_output_permutations",
    "compress_permuted",
    "find_joint_permutation",
    "find_permutation",
    "kept_fraction",
    "output_units",
    "permute_model",
    "plan_permutations",
]
