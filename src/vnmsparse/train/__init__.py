"""V:N:M-aware training: SR-STE masked fine-tuning and three-staged LoRA, single-process or under torchrun.

    method = StagedLoRA("64:2:5", rank=32)
    method.scorer = RIAScorer.calibrate(model, calib_batches, method.selected(model))
    result = train(model, method, batches, loss_fn, TrainConfig(steps=1000, lr=1e-3, autocast="bf16"))
    # or distilling the dense model:   TrainConfig(..., distill=DistillConfig()), teacher=dense_copy
    method.convert(model)            # the trained layers become compressed VNMLinear layers
"""

from .dist import digest, gather_digests
from .distill import DistillConfig, Distiller, kd_loss
from .lora import LoRALinear, from_peft
from .loop import TrainConfig, TrainResult, parallelize, train
from .masked import MaskedLinear, srste
from .methods import SRSTE, SparseMethod, default_filter
from .schedule import MaskSchedule
from .scoring import RIAScorer, Scorer, magnitude_scorer, make_scorer
from .staged import StagedLoRA

__all__ = [
    "DistillConfig",
    "Distiller",
    "LoRALinear",
    "MaskSchedule",
    "MaskedLinear",
    "RIAScorer",
    "SRSTE",
    "Scorer",
    "SparseMethod",
    "StagedLoRA",
    "TrainConfig",
    "TrainResult",
    "default_filter",
    "digest",
    "from_peft",
    "gather_digests",
    "kd_loss",
    "magnitude_scorer",
    "make_scorer",
    "parallelize",
    "srste",
    "train",
]
