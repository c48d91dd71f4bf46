"""vnmsparse: V:N:M structured sparsity for transformers on GPU Sparse Tensor Cores.

The data path, top to bottom: weights -> scores (`scores`) -> mask (`masks`) -> compressed tensor
(`format`) -> matmul (`reference`, and the GPU kernels in `ops`) -> module.
"""

__version__ = "0.1.0"  # first: checkpoint.py records it

from .checkpoint import load_pretrained, save_pretrained
from .format import VNMTensor, compress, fold_input_permutation
from .masks import check_vnm, is_vnm, vnm_mask
from .nn import VNMLinear
from .pattern import VNMPattern
from .permute import find_permutation
from .reference import vnm_linear
from .scores import magnitude_scores, ria_scores
from .sparsify import SparsifyConfig, sparsify
from .select import SpeedTable, analytic_speedups, candidate_patterns, mask_diversity, pareto_patterns, select_pattern
from . import hf

hf.install()  # transformers' from_pretrained then knows "vnmsparse" checkpoints (registered when it is imported)

__all__ = [
    "VNMPattern",
    "VNMTensor",
    "VNMLinear",
    "SparsifyConfig",
    "sparsify",
    "SpeedTable",
    "analytic_speedups",
    "candidate_patterns",
    "check_vnm",
    "compress",
    "find_permutation",
    "fold_input_permutation",
    "is_vnm",
    "load_pretrained",
    "magnitude_scores",
    "mask_diversity",
    "pareto_patterns",
    "ria_scores",
    "save_pretrained",
    "select_pattern",
    "vnm_linear",
    "vnm_mask",
]
