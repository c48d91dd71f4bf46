"""A sparsified transformers model under torch.compile's CUDA-graph modes: nothing the op needs (packed layouts,
split-k workspaces and counters) may be allocated lazily inside the compiled region's graph pool."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, token_ids

import vnmsparse as vs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_sparsified_llama_decodes_compiled(mode):
    torch._dynamo.reset()
    model = tiny_llama(dtype=torch.bfloat16)
    vs.sparsify(model, vs.SparsifyConfig(pattern="64:2:8"), progress=False)
    model = model.cuda()
    compiled = torch.compile(model, mode=mode, dynamic=False)
    ids = token_ids(n=2, seq_len=8).cuda()
    with torch.no_grad():
        for _ in range(3):  # greedy decode: each step a new length, a new graph
            eager = model(ids).logits
            got = compiled(ids).logits
            torch.testing.assert_close(got.float(), eager.float(), rtol=2e-2, atol=2e-2)
            ids = torch.cat([ids, eager[:, -1:].argmax(-1)], dim=1)
        again = compiled(ids[:, :-1]).logits  # a replay of a captured graph gives the same answer
        torch.testing.assert_close(again.float(), model(ids[:, :-1]).logits.float(), rtol=2e-2, atol=2e-2)
