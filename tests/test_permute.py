"""V:N:M channel permutation: the search never loses score, and applying it never changes what a model computes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vnmsparse.masks import vnm_mask
from vnmsparse.pattern import VNMPattern
from vnmsparse.permute import (
    LayerPermutation,
    apply_output_permutations,
    compress_permuted,
    find_joint_permutation,
    find_permutation,
    kept_fraction,
    output_units,
    permute_model,
    plan_permutations,
)

@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are small: one thread avoids OpenMP overhead, which dominates on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PATTERNS = st.sampled_from(["1:2:4", "2:2:5", "4:2:8", "8:2:6", "3:2:7"])


def _is_permutation(p: torch.Tensor, n: int) -> bool:
    return p.dtype == torch.int64 and torch.equal(p.sort().values, torch.arange(n))


def _ria_like(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """|W| times a heavy-tailed per-column activation scale: the structure RIA scores have."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).abs() * torch.randn(cols, generator=g).exp()


@st.composite
def score_matrices(draw):
    rows, cols = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    values = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 10.0]), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float32).view(rows, cols)


@settings(max_examples=40, deadline=None)
@given(scores=score_matrices(), pattern=PATTERNS, optimize_out=st.booleans(), seed=st.integers(0, 3))
def test_search_returns_permutations_that_never_lose_score(scores, pattern, optimize_out, seed):
    r = find_permutation(scores, pattern, iters=2, optimize_out=optimize_out, seed=seed)
    rows, cols = scores.shape
    assert _is_permutation(r.perm_out, rows) and _is_permutation(r.perm_in, cols)
    assert r.kept_before == pytest.approx(kept_fraction(scores, pattern))
    assert r.kept_after == pytest.approx(kept_fraction(scores[r.perm_out][:, r.perm_in], pattern))
    assert r.kept_after >= r.kept_before
    if not optimize_out:
        assert torch.equal(r.perm_out, torch.arange(rows))


@settings(max_examples=15, deadline=None)
@given(scores=score_matrices(), head=st.integers(1, 6))
def test_rows_stay_within_their_labels(scores, head):
    labels = torch.arange(scores.shape[0]) // head
    r = find_permutation(scores, "2:2:5", out_labels=labels)
    assert torch.equal(labels[r.perm_out], labels)


def test_search_improves_real_structured_scores_in_both_orders():
    scores = _ria_like(128, 320)
    for pattern in ("32:2:8", "32:2:5"):
        inputs_only = find_permutation(scores, pattern, iters=1, optimize_out=False)
        both = find_permutation(scores, pattern, iters=1)
        assert inputs_only.kept_after > inputs_only.kept_before + 0.005
        assert both.kept_after > both.kept_before + 0.005
        assert not torch.equal(both.perm_out, torch.arange(128))


def test_never_worse_than_identity_even_when_sweeps_propose_worse(monkeypatch):
    """Scores that a V:N:M mask already keeps entirely: any other order can only lose, so identity must win."""
    scores = torch.rand(32, 40) * vnm_mask(torch.rand(32, 40), "8:2:5")
    worse = lambda S, pattern, slots, *rest: slots.flip(0)  # noqa: E731 - a deliberately bad sweep
    monkeypatch.setattr("vnmsparse.permute._column_sweep", worse)
    monkeypatch.setattr("vnmsparse.permute._row_sweep", lambda mats, pattern, slots, *rest: slots.flip(0))
    r = find_permutation(scores, "8:2:5")
    assert r.kept_before == r.kept_after == pytest.approx(1.0)
    assert torch.equal(r.perm_out, torch.arange(32)) and torch.equal(r.perm_in, torch.arange(40))


def test_blockwise_mode_is_valid_and_close_to_full():
    scores = _ria_like(128, 480, seed=1)
    full = find_permutation(scores, "32:2:8", iters=1)
    fast = find_permutation(scores, "32:2:8", iters=1, chunk=16)
    assert _is_permutation(fast.perm_in, 480) and _is_permutation(fast.perm_out, 128)
    assert fast.kept_after > fast.kept_before
    assert fast.kept_after > full.kept_after - 0.01


def test_joint_search_shares_rows_and_keeps_every_layer_at_least_identity():
    gate, up = _ria_like(96, 80, seed=2), _ria_like(96, 72, seed=3)
    a, b = find_joint_permutation([gate, up], "16:2:5")
    assert torch.equal(a.perm_out, b.perm_out)
    assert a.kept_after >= a.kept_before and b.kept_after >= b.kept_before
    assert a.kept_after + b.kept_after > a.kept_before + b.kept_before


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(scores=[[1.0, 2.0]]), TypeError, "scores"),
        (dict(scores=torch.ones(4, 4, dtype=torch.int64)), TypeError, "scores"),
        (dict(scores=torch.ones(8)), ValueError, "scores"),
        (dict(scores=torch.tensor([[1.0, float("nan")]])), ValueError, "scores"),
        (dict(scores=-torch.ones(2, 2)), ValueError, "scores"),
        (dict(pattern="64:3:8"), ValueError, "N"),
        (dict(pattern=8), TypeError, "pattern"),
        (dict(iters=1.5), TypeError, "iters"),
        (dict(iters=-1), ValueError, "iters"),
        (dict(levels=0), ValueError, "levels"),
        (dict(chunk=1), ValueError, "chunk"),
        (dict(optimize_out="yes"), TypeError, "optimize_out"),
        (dict(out_labels=torch.zeros(3, dtype=torch.int64)), ValueError, "out_labels"),
        (dict(out_labels=torch.tensor([1, 0, 0, 0, 0, 0, 0, 0])), ValueError, "out_labels"),
        (dict(out_labels=torch.zeros(8)), TypeError, "out_labels"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, match):
    args = dict(scores=torch.rand(8, 10), pattern="4:2:5") | kwargs
    with pytest.raises(error, match=match):
        find_permutation(**args)


def test_joint_search_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="row count"):
        find_joint_permutation([torch.rand(8, 10), torch.rand(6, 10)], "4:2:5")


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
