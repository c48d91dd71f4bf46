"""Run under torchrun (gloo, CPU): train a tiny block model with DDP and FSDP2, print each run's digests on rank 0.

Each rank is fed different data and calibrates RIA on its own batches, so identical results show that the
statistics are averaged and the masks agree across ranks.
"""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from vnmsparse.train import SRSTE, MaskSchedule, RIAScorer, StagedLoRA, TrainConfig, digest, gather_digests, train


class Block(nn.Module):
    """A residual MLP block: enough structure for FSDP units and RIA calibration."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class TinyNet(nn.Module):
    def __init__(self, width: int = 24, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def batches(rank: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 24, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(count)]


def run(method_name: str, strategy: str) -> dict:
    torch.manual_seed(0)  # same initial model on every rank
    model = TinyNet()
    rank = dist.get_rank()
    data = batches(rank, 24)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    scorer = RIAScorer.calibrate(model, [x for x, _ in data[:2]], names, progress=False)
    schedule = MaskSchedule(dense_frac=0.1, dynamic_frac=0.4, remask_every=3)
    if method_name == "lora":
        method = StagedLoRA("16:2:8", schedule=schedule, scorer=scorer, rank=4)
    else:
        method = SRSTE("16:2:8", schedule=schedule, scorer=scorer)
    result = train(model, method, data, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
                   TrainConfig(steps=20, lr=1e-2, strategy=strategy, progress=False))
    masks = digest({n: m for n, m in method.masks().items()})
    weights = digest({n: t.to_dense() for n, t in method.export().items()})
    return {"masks": gather_digests(masks), "weights": gather_digests(weights), "steps": result.steps,
            "remask_steps": result.remask_steps}


def main() -> None:
    dist.init_process_group("gloo")
    runs = {}
    for m, s in (("lora", "ddp"), ("lora", "fsdp"), ("srste", "ddp"), ("srste", "fsdp")):
        print(f"rank {dist.get_rank()}: {m}-{s}", file=sys.stderr, flush=True)  # where a failure happened, in the log
        runs[f"{m}-{s}"] = run(m, s)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(runs, f)
    gc.collect()  # free the wrapped models (reference cycles) while their process group is still alive
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
