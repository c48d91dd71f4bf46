"""Permutation plans for whole models: the units follow the architecture, output permutations leave the model's
function unchanged, pruning after folding equals pruning in the permuted space, bad arguments are named."""

from __future__ import annotations

import pytest
import torch

from vnmsparse.masks import vnm_mask
from vnmsparse.pattern import VNMPattern
from vnmsparse.permute import (
    LayerPermutation,
    apply_output_permutations,
    compress_permuted,
    output_units,
    permute_model,
    plan_permutations,
)


# --- models ------------------------------------------------------------------------------------------------
def _llama(layers: int) -> torch.nn.Module:
    """An HF LLaMA with SmolLM2-135M's shapes (9 query heads on 3 KV heads of 64), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=128,
                         attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(config).eval()
    for module in model.modules():  # HF initialises biases to zero; random ones make the bias fold testable
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.02)
    return model


def _vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10).eval()


def _llama_run(model: torch.nn.Module) -> torch.Tensor:
    return model(torch.arange(24).view(2, 12) * 7 % 512).logits


def _vit_run(model: torch.nn.Module) -> torch.Tensor:
    return model(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))


MODELS = [pytest.param(lambda: _llama(2), _llama_run, id="llama"), pytest.param(_vit, _vit_run, id="vit")]


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in ("lm_head", "head")}


def _random_plan(model: torch.nn.Module, seed: int) -> dict[str, LayerPermutation]:
    """Random orders obeying each output unit's labels, folded into its consumers as the planner does."""
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for unit in output_units(model):
        rows = _linears(model)[unit.producers[0]].out_features
        labels = unit.labels if unit.labels is not None else torch.zeros(rows, dtype=torch.int64)
        perm = (labels.double() + torch.rand(rows, generator=g, dtype=torch.float64)).argsort()
        for name in unit.producers:
            plan[name] = LayerPermutation(perm, torch.arange(_linears(model)[name].in_features), perm, 0.0, 0.0)
        for name, source in unit.consumers:
            order = torch.arange(len(source)) + perm[source] - source
            plan[name] = LayerPermutation(torch.arange(_linears(model)[name].out_features), order, order, 0.0, 0.0)
    return plan


def test_output_units_follow_the_architecture_rules():
    llama = {u.producers: [n for n, _ in u.consumers] for u in output_units(_llama(2))}
    assert llama[("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")] == ["model.layers.0.mlp.down_proj"]
    assert llama[("model.layers.1.self_attn.v_proj",)] == ["model.layers.1.self_attn.o_proj"]
    assert len(llama) == 4  # q, k, o, down never move their outputs
    vit = {u.producers: [n for n, _ in u.consumers] for u in output_units(_vit())}
    assert vit == {("blocks.0.attn.qkv",): ["blocks.0.attn.proj"], ("blocks.0.mlp.fc1",): ["blocks.0.mlp.fc2"],
                   ("blocks.1.attn.qkv",): ["blocks.1.attn.proj"], ("blocks.1.mlp.fc1",): ["blocks.1.mlp.fc2"]}
    qkv = next(u for u in output_units(_vit()) if u.producers == ("blocks.0.attn.qkv",))
    assert len(qkv.labels[:384].unique()) == 384 and len(qkv.labels[384:].unique()) == 3  # q, k fixed; v per head


@pytest.mark.parametrize(("build", "run"), MODELS)
def test_output_permutations_leave_the_model_function_unchanged(build, run):
    model = build()
    with torch.no_grad():
        before = run(model)
        plan = _random_plan(model, seed=1)
        apply_output_permutations(model, plan)
        after = run(model)
    assert any(not torch.equal(p.row_order, torch.arange(len(p.row_order))) for p in plan.values())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def _scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: m.weight.detach().abs() * torch.rand(m.in_features, generator=g).exp() for n, m in _linears(model).items()}


@pytest.mark.parametrize(("build", "run", "pattern"),
                         [pytest.param(lambda: _llama(1), _llama_run, "16:2:8", id="llama"),
                          pytest.param(_vit, _vit_run, "16:2:5", id="vit")])
def test_pruning_after_folding_equals_pruning_in_permuted_space(build, run, pattern):
    """Planned orders, folded into neighbours and compressed weights, give the model pruned in permuted space."""
    folded, reference = build(), build()
    scores = _scores(folded)
    plan = permute_model(folded, scores, pattern, iters=1, chunk=32, progress=False)  # plan, then apply
    assert all(p.kept_after >= p.kept_before for p in plan.values())
    with torch.no_grad():
        for name, layer in _linears(folded).items():
            p = plan[name]
            layer.weight.copy_(compress_permuted(layer.weight, p.reorder(scores[name]), pattern, p.perm_in).to_dense())
        for name, layer in _linears(reference).items():  # prune W_p = P_o W P_i, then undo P_o and P_i
            p = plan[name]
            rows, cols = p.row_order, p.col_order[p.perm_in]
            permuted = layer.weight[rows][:, cols] * vnm_mask(scores[name][rows][:, cols], pattern)
            layer.weight[rows.unsqueeze(1), cols] = permuted
        torch.testing.assert_close(run(folded), run(reference), rtol=1e-5, atol=1e-5)


def test_plan_rejects_bad_arguments():
    model = _vit()
    with pytest.raises(TypeError, match="model"):
        plan_permutations("vit", {}, "16:2:8")
    with pytest.raises(TypeError, match="scores"):
        plan_permutations(model, [torch.rand(3, 3)], "16:2:8")
    with pytest.raises(ValueError, match="nope"):
        plan_permutations(model, {"nope": torch.rand(3, 3)}, "16:2:8")
    with pytest.raises(ValueError, match="shape"):
        plan_permutations(model, {"blocks.0.mlp.fc1": torch.rand(3, 3)}, "16:2:8")
    with pytest.raises(TypeError, match="perm_in"):
        compress_permuted(torch.rand(4, 8), torch.rand(4, 8), VNMPattern(4, 8), [0, 1, 2, 3, 4, 5, 6, 7])
