"""sparsify(): which layers, which masks, sequential vs one-shot calibration, and bad configs refused up front."""

import copy

import pytest
import torch
from torch import nn

from tiny_models import images, tiny_llama, tiny_vit, token_ids
from vnmsparse import is_vnm, magnitude_scores, ria_scores, vnm_mask
from vnmsparse.calibrate import collect_act_sq_mean
from vnmsparse.nn import VNMLinear
from vnmsparse.ops import two_four_tensor
from vnmsparse.sparsify import SparsifyConfig, SparsifyReport, plan_layers, sparsify

LLAMA_LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def sparse_layers(model) -> dict[str, VNMLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, VNMLinear)}


def test_llama_ria_prunes_every_block_linear_and_leaves_head_and_embeddings():
    model = tiny_llama()
    embed = model.model.embed_tokens.weight.clone()
    report = sparsify(model, SparsifyConfig("16:2:8"), calib=token_ids(), progress=False)
    assert isinstance(report, SparsifyReport)
    assert list(sparse_layers(model)) == LLAMA_LINEARS
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embed)
    for layer in sparse_layers(model).values():
        assert is_vnm(layer.weight.mask(), "16:2:8")
    assert (report.method, report.calibration) == ("ria", "one-shot")
    assert report.sparsity == pytest.approx(0.75)
    assert report.compressed_bytes < report.dense_bytes / 3
    assert model.vnm_sparsity["method"] == "ria"
    assert torch.isfinite(model(token_ids()).logits).all()


def test_magnitude_without_calibration_keeps_the_largest_weights():
    model = tiny_llama()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in LLAMA_LINEARS}
    report = sparsify(model, SparsifyConfig("16:2:5"), progress=False)
    assert report.method == "magnitude" and report.calibration is None
    for name, layer in sparse_layers(model).items():
        assert torch.equal(layer.weight.mask(), vnm_mask(magnitude_scores(dense[name]), "16:2:5"))


def test_one_shot_uses_the_dense_model_statistics():
    model, ids = tiny_llama(), token_ids()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in LLAMA_LINEARS}
    stats = collect_act_sq_mean(model, [ids], LLAMA_LINEARS, progress=False)
    sparsify(model, SparsifyConfig("16:2:8", sequential=False, a=0.5), calib=ids, progress=False)
    for name, layer in sparse_layers(model).items():
        assert torch.equal(layer.weight.mask(), vnm_mask(ria_scores(dense[name], stats[name]), "16:2:8"))


def test_sequential_block_sees_the_pruned_blocks_before_it():
    """Sequential = prune block 0 on dense statistics, then block 1 on statistics of the model with block 0 pruned."""
    ids = token_ids()
    sequential = tiny_llama()
    sparsify(sequential, SparsifyConfig("16:2:8", sequential=True), calib=ids, progress=False)
    by_hand = tiny_llama()
    for block in (r"model\.layers\.0\..*", r"model\.layers\.1\..*"):
        sparsify(by_hand, SparsifyConfig(None, layers={block: "16:2:8"}, sequential=False), calib=ids, progress=False)
    got, want = sparse_layers(sequential), sparse_layers(by_hand)
    assert list(got) == list(want)
    for name in got:
        assert torch.equal(got[name].weight.mask(), want[name].weight.mask()), name
    one_shot = tiny_llama()
    sparsify(one_shot, SparsifyConfig("16:2:8", sequential=False), calib=ids, progress=False)
    masks = sparse_layers(one_shot)
    assert torch.equal(masks["model.layers.0.mlp.up_proj"].weight.mask(), got["model.layers.0.mlp.up_proj"].weight.mask())
    assert not torch.equal(masks["model.layers.1.mlp.up_proj"].weight.mask(), got["model.layers.1.mlp.up_proj"].weight.mask())


def test_per_layer_patterns_by_name_and_regex():
    model = tiny_llama()
    config = SparsifyConfig("16:2:8", layers={"model.layers.0.mlp.down_proj": "32:2:5", r".*self_attn\..*": None,
                                              r"model\.layers\.\d\.mlp\.down_proj": "16:2:6"})
    sparsify(model, config, progress=False)
    patterns = {n: str(m.pattern) for n, m in sparse_layers(model).items()}
    assert patterns == {"model.layers.0.mlp.gate_proj": "16:2:8", "model.layers.0.mlp.up_proj": "16:2:8",
                        "model.layers.0.mlp.down_proj": "32:2:5", "model.layers.1.mlp.gate_proj": "16:2:8",
                        "model.layers.1.mlp.up_proj": "16:2:8", "model.layers.1.mlp.down_proj": "16:2:6"}


def test_filter_fn_and_calibration_as_keyword_batches():
    model, ids = tiny_llama(), token_ids()
    report = sparsify(model, SparsifyConfig("16:2:8"), calib=[{"input_ids": ids[:2]}, {"input_ids": ids[2:]}],
                      filter_fn=lambda module, name: "mlp" in name, progress=False)
    assert list(sparse_layers(model)) == [n for n in LLAMA_LINEARS if "mlp" in n]
    assert report.calib_batches == 2


def test_vit_blocks_pruned_with_image_calibration():
    model = tiny_vit()
    x = images()
    report = sparsify(model, SparsifyConfig("32:2:8", sequential=True), calib=x, progress=False)
    assert list(sparse_layers(model)) == [f"blocks.{i}.{p}" for i in range(2)
                                          for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert type(model.head) is nn.Linear and report.calibration == "sequential"
    dense = copy.deepcopy(model)
    for name, layer in sparse_layers(dense).items():
        dense.set_submodule(name, layer.to_linear())
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x))


BAD_CONFIGS = [
    (dict(layers={"model.layers.9.mlp.up_proj": "16:2:8"}), {}, ValueError, "matches no nn.Linear"),
    (dict(layers={r".*\.nothing_here": "16:2:8"}), {}, ValueError, "matches no nn.Linear"),
    (dict(layers={"model.layers.0.mlp": "16:2:8"}), {}, ValueError, "not an nn.Linear"),
    (dict(layers={"lm_head": "16:2:8"}), {}, ValueError, "shared with"),
    (dict(pattern="16:2:128"), {}, ValueError, "in_features=64 is less than M=128"),
    (dict(method="ria"), {}, ValueError, "needs calibration data"),
    (dict(), dict(calib="some text"), TypeError, "calib must be"),
    (dict(), dict(calib=[token_ids(), "text"]), TypeError, "every calib batch"),
    (dict(), dict(filter_fn="mlp"), TypeError, "filter_fn must be callable"),
    (dict(), dict(filter_fn=lambda m, n: False), ValueError, "no nn.Linear layer is selected"),
    (dict(blocks="model.norm", sequential=True), dict(calib=token_ids()), ValueError, "not an nn.ModuleList"),
    (dict(pattern="16:2:16", two_four_copy=True), {}, ValueError, "two_four_copy needs a V:2:M pattern with 5 <= M <= 8 and V <= 64"),
    (dict(pattern="128:2:8", two_four_copy=True), {}, ValueError, "not 128:2:8"),
    (dict(layers={r".*down_proj": "32:2:4"}, two_four_copy=True), {}, ValueError, "down_proj'.*not 32:2:4"),
]


@pytest.mark.parametrize("config_kwargs, call_kwargs, error, match", BAD_CONFIGS)
def test_bad_config_fails_before_any_weight_is_touched(config_kwargs, call_kwargs, error, match):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        sparsify(model, SparsifyConfig(**{"pattern": "16:2:8", **config_kwargs}), progress=False, **call_kwargs)
    assert not sparse_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(pattern=8), TypeError, "SparsifyConfig.pattern"),
    (dict(pattern="64:3:8"), ValueError, "SparsifyConfig.pattern"),
    (dict(layers=["model.layers.0.mlp.up_proj"]), TypeError, "SparsifyConfig.layers must be a mapping"),
    (dict(layers={"model.layers.(": "16:2:8"}), ValueError, "not a valid regex"),
    (dict(layers={"x": "16-2-8"}), ValueError, r"SparsifyConfig.layers\['x'\]"),
    (dict(method="wanda"), ValueError, "SparsifyConfig.method must be one of"),
    (dict(a=-1), ValueError, "SparsifyConfig.a"),
    (dict(sequential="yes"), TypeError, "SparsifyConfig.sequential must be a bool"),
    (dict(two_four_copy=1), TypeError, "SparsifyConfig.two_four_copy must be a bool"),
    (dict(exclude="lm_head"), TypeError, "SparsifyConfig.exclude"),
    (dict(calib_batch_size=0), ValueError, "calib_batch_size"),
    (dict(version=2), ValueError, "version"),
    (dict(pattern=None), ValueError, "selects nothing"),
])
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparsifyConfig(**kwargs)


def test_config_object_is_type_checked():
    with pytest.raises(TypeError, match="config must be a SparsifyConfig"):
        sparsify(tiny_llama(), {"pattern": "16:2:8"})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        plan_layers("model", SparsifyConfig())


def test_permute_keeps_more_score_and_the_function_of_the_reordered_model():
    """permute=True = reorder channels (function-preserving) then prune: rebuild that by hand and compare."""
    model, by_hand, ids = tiny_llama(), tiny_llama(), token_ids()
    from vnmsparse.permute import permute_model

    with torch.no_grad():
        dense_out = by_hand(ids).logits
    report = sparsify(model, SparsifyConfig("16:2:8", permute=True), progress=False)
    assert report.permute and all(layer.kept_score[1] >= layer.kept_score[0] for layer in report.layers)
    assert report.kept_score[1] > report.kept_score[0]
    scores = {n: magnitude_scores(by_hand.get_submodule(n).weight) for n in LLAMA_LINEARS}
    with torch.no_grad():
        permute_model(by_hand, scores, "16:2:8", progress=False)
        torch.testing.assert_close(by_hand(ids).logits, dense_out, rtol=1e-4, atol=1e-4)  # reordering is free
        for name, layer in sparse_layers(model).items():
            by_hand.get_submodule(name).weight.mul_(layer.weight.mask())
        torch.testing.assert_close(model(ids).logits, by_hand(ids).logits, rtol=1e-4, atol=1e-4)


def test_permute_on_vit_with_sequential_calibration():
    model = tiny_vit()
    report = sparsify(model, SparsifyConfig("32:2:8", permute=True, sequential=True), calib=images(), progress=False)
    assert len(report.layers) == 8 and all(layer.kept_score[1] >= layer.kept_score[0] for layer in report.layers)
    assert torch.isfinite(model(images(1))).all()


def test_a_pattern_string_is_shorthand_for_a_config():
    model = tiny_llama()
    report = sparsify(model, "16:2:8", progress=False)
    assert report.method == "magnitude" and {layer.pattern for layer in report.layers} == {"16:2:8"}


@pytest.mark.parametrize("pattern, permute", [("16:2:8", False), ("16:2:5", False), ("16:2:8", True)])
def test_two_four_copy_is_passed_to_every_layer_and_reported_with_its_bytes(pattern, permute):
    model = tiny_llama()
    report = sparsify(model, SparsifyConfig(pattern, two_four_copy=True, permute=permute), progress=False)
    layers = sparse_layers(model)
    assert all(m.two_four_copy and not m.holds_two_four_copy for m in layers.values())  # on the CPU: asked, not held
    # Unpermuted V:2:8 reads x as it is: every layer holds its copy on sm_90. At V:2:5 or permuted, the copy gathers x
    # first, which no call takes on layers this small (dispatch.GATHERED_COPY_MIN_R): none is held, none counted.
    held = pattern == "16:2:8" and not permute
    for layer in report.layers:
        # What the copy adds where it is held: the weight as V:2:4 over its columns laid out in quads (twice the
        # values of the V:2:8 form).
        copy, inputs = two_four_tensor(layers[layer.name].weight)
        assert inputs is None or not held
        copy_bytes = copy.nbytes if held else 0
        assert layer.two_four_copy and layer.copy_bytes == copy_bytes == layers[layer.name].two_four_copy_nbytes
        assert layer.held_bytes == layer.compressed_bytes + layer.copy_bytes
    assert report.copy_bytes == sum(r.copy_bytes for r in report.layers)
    if held:
        assert report.held_bytes > 2 * report.compressed_bytes
        assert f"2:4 copies of {len(report.layers)} layers, held on sm_90 GPUs" in str(report)
    else:
        assert report.held_bytes == report.compressed_bytes
        assert f"({len(report.layers)} layers asked for a 2:4 copy no call would run" in str(report)
    again = SparsifyReport.of_model(model)
    assert [(r.two_four_copy, r.copy_bytes) for r in again.layers] == [(r.two_four_copy, r.copy_bytes) for r in report.layers]
    plain = sparsify(tiny_llama(), SparsifyConfig("16:2:8"), progress=False)
    assert plain.copy_bytes == 0 and plain.held_bytes == plain.compressed_bytes and "2:4 cop" not in str(plain)
    assert not any(m.two_four_copy for m in plain.layers)
