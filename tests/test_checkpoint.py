"""save_pretrained / load_pretrained: identical reload, densified reload, and damaged folders refused."""

import json
import struct

import pytest
import torch
from torch import nn

from tiny_models import images, tiny_llama, tiny_vit, token_ids
from vnmsparse.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, save_pretrained
from vnmsparse.nn import VNMLinear
from vnmsparse.sparsify import SparsifyConfig, sparsify


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    model = tiny_llama()
    sparsify(model, SparsifyConfig("16:2:8", layers={"model.layers.1.mlp.down_proj": "32:2:16"}), calib=token_ids(),
             progress=False)
    folder = tmp_path_factory.mktemp("llama")
    save_pretrained(model, folder)
    return model, folder


def test_llama_reloads_identical(saved_llama):
    model, folder = saved_llama
    loaded = load_pretrained(folder)
    assert type(loaded) is type(model)
    assert_same_state(model, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert str(loaded.model.layers[1].mlp.down_proj.pattern) == "32:2:16"
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_config_records_the_sparsity(saved_llama):
    _, folder = saved_llama
    config = json.loads((folder / CONFIG_NAME).read_text())
    sparsity = config["sparsity_config"]
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert sparsity["version"] == "1" and sparsity["method"] == "ria" and sparsity["calibration"] == "one-shot"
    assert sparsity["layers"]["model.layers.0.self_attn.q_proj"] == "16:2:8"
    assert sparsity["layers"]["model.layers.1.mlp.down_proj"] == "32:2:16"
    assert len(sparsity["layers"]) == 14


def test_densify_gives_a_plain_hf_model(saved_llama):
    model, folder = saved_llama
    dense = load_pretrained(folder, densify=True)
    assert type(dense).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, VNMLinear) for m in dense.modules())
    assert not hasattr(dense.config, "sparsity_config")
    q = dense.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and torch.equal(q.weight, model.model.layers[0].self_attn.q_proj.weight.to_dense())
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, model(ids).logits)


def test_plain_transformers_refuses_the_folder_rather_than_loading_random_weights(saved_llama):
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(saved_llama[1])


def test_bfloat16_model_keeps_its_dtype(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    sparsify(model, SparsifyConfig("16:2:8"), progress=False)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.values.dtype == torch.bfloat16
    assert_same_state(model, loaded)


def test_vit_round_trip_into_a_given_model(tmp_path):
    model = tiny_vit()
    sparsify(model, SparsifyConfig("32:2:8"), calib=images(), progress=False)
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="pass model="):
        load_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, model=tiny_vit(seed=5))
    assert_same_state(model, loaded)
    dense = load_pretrained(tmp_path, densify=True, model=tiny_vit(seed=5))
    x = images(1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        torch.testing.assert_close(dense(x), model(x))


def data_offsets(path, name):
    """Byte range of tensor `name` inside a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    start, end = header[name]["data_offsets"]
    return 8 + length + start, 8 + length + end


@pytest.mark.parametrize("tensor, match", [
    ("model.layers.0.mlp.up_proj.values", "layer 'model.layers.0.mlp.up_proj'.*sha256"),
    ("model.layers.1.input_layernorm.weight", "sha256"),
])
def test_tampered_tensor_is_refused(saved_llama, tmp_path, tensor, match):
    _, folder = saved_llama
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = tmp_path / WEIGHTS_NAME
    start, _ = data_offsets(path, tensor)
    raw = bytearray(path.read_bytes())
    raw[start] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path)


def test_truncated_file_is_refused(saved_llama, tmp_path):
    _, folder = saved_llama
    (tmp_path / CONFIG_NAME).write_bytes((folder / CONFIG_NAME).read_bytes())
    (tmp_path / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_pretrained(tmp_path)


def test_config_that_disagrees_with_the_weights_is_refused(saved_llama, tmp_path):
    _, folder = saved_llama
    (tmp_path / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes())
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["sparsity_config"]["layers"]["model.layers.0.mlp.up_proj"] = "16:2:5"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj"):
        load_pretrained(tmp_path)


def test_folders_that_are_not_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no vnmsparse sparsity_config"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no VNMLinear"):
        save_pretrained(tiny_llama(), tmp_path / "dense")


def test_the_package_exports_save_and_load():
    import vnmsparse

    assert vnmsparse.save_pretrained is save_pretrained and vnmsparse.load_pretrained is load_pretrained
    assert vnmsparse.checkpoint.load_pretrained is load_pretrained


def _copy_with_config(folder, tmp_path, edit):
    (tmp_path / WEIGHTS_NAME).write_bytes((folder / WEIGHTS_NAME).read_bytes())
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(rms_norm_eps=1e-3), "checksum"),
    (lambda c: c.update(rope_theta=5e5), "checksum"),
    (lambda c: c["sparsity_config"].update(dtype="float99"), "dtype"),
    (lambda c: c.update(architectures=["BertModel"]), "checksum"),
    (lambda c: c.update(architectures=[5]), "architectures"),
    (lambda c: c.update(architectures="LlamaForCausalLM"), "architectures"),
    (lambda c: c["sparsity_config"].update(layers=list(c["sparsity_config"]["layers"])), "layers"),
])
def test_an_edited_config_is_refused(saved_llama, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(_copy_with_config(saved_llama[1], tmp_path, edit))


def test_a_failed_load_leaves_the_given_model_untouched(tmp_path):
    model = tiny_vit()
    sparsify(model, SparsifyConfig("32:2:8"), progress=False)
    save_pretrained(model, tmp_path)
    target = tiny_vit(seed=5)
    target.head = nn.Linear(192, 7)  # another number of classes: the checkpoint does not fit
    before = {k: v.clone() for k, v in target.state_dict().items()}
    modules = dict(target.named_modules())
    with pytest.raises(ValueError, match="head"):
        load_pretrained(tmp_path, model=target)
    assert dict(target.named_modules()).keys() == modules.keys()
    assert all(target.get_submodule(n) is m for n, m in modules.items())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


# --- the 2:4 copy: the flag is saved, the copy never ---------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_with_copies(tmp_path_factory):
    """A LLaMA whose MLP layers ask for the 2:4 copy and whose attention layers do not."""
    model = tiny_llama()
    sparsify(model, SparsifyConfig("16:2:8"), progress=False)
    for name, layer in model.named_modules():
        if isinstance(layer, VNMLinear) and ".mlp." in name:
            layer.two_four_copy = True
    folder = tmp_path_factory.mktemp("copies")
    save_pretrained(model, folder)
    return model, folder


def test_the_two_four_copy_flag_survives_save_and_load(saved_with_copies):
    model, folder = saved_with_copies
    flags = {n: m.two_four_copy for n, m in model.named_modules() if isinstance(m, VNMLinear)}
    assert sum(flags.values()) == 6
    assert json.loads((folder / CONFIG_NAME).read_text())["sparsity_config"]["two_four_copy"] == flags
    loaded = load_pretrained(folder)
    assert {n: m.two_four_copy for n, m in loaded.named_modules() if isinstance(m, VNMLinear)} == flags
    assert_same_state(model, loaded)  # the extra states carry the flags; no tensor of a copy is stored
    assert "two_four_copy" not in loaded.vnm_sparsity
    from vnmsparse.sparsify import SparsifyReport

    assert SparsifyReport.of_model(loaded).copy_bytes == SparsifyReport.of_model(model).copy_bytes > 0


def test_a_checkpoint_written_before_the_flag_loads_without_copies(saved_llama, tmp_path):
    # The module fixture's folder as an older build wrote it: no two_four_copy in sparsity_config, the checksum of
    # that config in the weights file.
    _, folder = saved_llama
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["sparsity_config"].pop("two_four_copy") == dict.fromkeys(config["sparsity_config"]["layers"], False)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vnmsparse.checkpoint import _config_checksum

    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(tmp_path / WEIGHTS_NAME), metadata={**metadata, "config_sha256": _config_checksum(config)})
    loaded = load_pretrained(tmp_path)
    assert not any(m.two_four_copy for m in loaded.modules() if isinstance(m, VNMLinear))


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(two_four_copy=True), "two_four_copy must map pruned layer names to true or false"),
    (lambda s: s["two_four_copy"].update({"model.layers.0.mlp.up_proj": "yes"}), "true or false, got"),
    (lambda s: s["two_four_copy"].update({"model.layers.0.mlp.up_proj": 1}), "true or false, got"),
    (lambda s: s["two_four_copy"].update({"lm_head": True}), "pruned layer names"),
])
def test_a_damaged_two_four_copy_record_is_refused(saved_with_copies, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(_copy_with_config(saved_with_copies[1], tmp_path, lambda c: edit(c["sparsity_config"])))


def test_a_copy_asked_for_a_weight_that_cannot_have_one_is_refused_before_the_model_changes(saved_llama, tmp_path):
    # The fixture's down_proj of block 1 is 32:2:16: a flag edited in (the config checksum aside) must not pass.
    _, folder = saved_llama
    target = tiny_llama(seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    edit = lambda c: c["sparsity_config"]["two_four_copy"].update({"model.layers.1.mlp.down_proj": True})  # noqa: E731
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.*two_four_copy needs a V:2:M pattern with 5 <= M <= 8"):
        load_pretrained(_copy_with_config(folder, tmp_path, edit), model=target)
    assert not any(isinstance(m, VNMLinear) for m in target.modules())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
