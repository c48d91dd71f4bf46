"""transformers interop: a sparsified model through its own save_pretrained / from_pretrained, and the dense export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tiny_models import tiny_llama, token_ids
from vnmsparse import load_pretrained, save_pretrained
from vnmsparse.app.cli import main
from vnmsparse.hf import QUANT_METHOD, export_dense
from vnmsparse.nn import VNMLinear
from vnmsparse.sparsify import SparsifyConfig, sparsify

LAYERS = {"model.layers.1.mlp.down_proj": "32:2:5"}


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_ids() if ids is None else ids).logits


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    model = tiny_llama()
    sparsify(model, SparsifyConfig("16:2:8", layers=LAYERS), calib=token_ids(), progress=False)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return model, folder


def test_save_pretrained_then_from_pretrained_gives_identical_logits(hf_saved):
    from transformers import AutoModelForCausalLM

    model, folder = hf_saved
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert config["quantization_config"]["layers"]["model.layers.1.mlp.down_proj"] == "32:2:5"
    assert (folder / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(isinstance(m, VNMLinear) for m in loaded.modules()) == 14
    assert str(loaded.model.layers[1].mlp.down_proj.pattern) == "32:2:5"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))
    loaded.save_pretrained(folder.parent / "again")  # and round again
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder.parent / "again")), logits(model))


def test_the_two_four_copy_flag_goes_through_transformers_save_and_load(tmp_path):
    # Carried by each layer's extra state in model.safetensors; the loader hands it to set_extra_state, then rebuild.
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    sparsify(model, SparsifyConfig("16:2:8", two_four_copy=True), progress=False)
    model.model.layers[0].mlp.up_proj.two_four_copy = False
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    flags = {n: m.two_four_copy for n, m in loaded.named_modules() if isinstance(m, VNMLinear)}
    assert flags == {n: m.two_four_copy for n, m in model.named_modules() if isinstance(m, VNMLinear)}
    assert sum(flags.values()) == 13 and not flags["model.layers.0.mlp.up_proj"]
    assert torch.equal(logits(loaded), logits(model))


def test_from_pretrained_in_another_dtype_and_dtype_moves(hf_saved):
    from transformers import AutoModelForCausalLM

    model, folder = hf_saved
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.up_proj.values.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.columns.dtype == torch.int32
    loaded.float()  # transformers refuses .float() on quantized models; V:N:M layers convert themselves
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0.1, atol=0.1)


def test_a_vnmsparse_checkpoint_can_be_saved_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    sparsify(model, "16:2:8", progress=False)
    save_pretrained(model, tmp_path / "vnm")
    loaded = load_pretrained(tmp_path / "vnm")
    loaded.save_pretrained(tmp_path / "hf")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), logits(model))
    assert "quantization_config" not in json.loads((tmp_path / "vnm" / "config.json").read_text())


def test_an_edited_pattern_is_refused(hf_saved, tmp_path):
    from transformers import AutoModelForCausalLM

    _, folder = hf_saved
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"] = "16:2:5"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="16:2"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("source", ["hf", "vnm"])
def test_dense_export_is_a_plain_transformers_checkpoint(hf_saved, tmp_path, source):
    from transformers import AutoModelForCausalLM

    model, folder = hf_saved
    if source == "vnm":
        save_pretrained(model, tmp_path / "vnm")
        folder = tmp_path / "vnm"
    (folder / "tokenizer_config.json").write_text("{}")
    assert main(["export", str(folder), "--dense", str(tmp_path / "dense")]) == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in config
    assert (tmp_path / "dense" / "tokenizer_config.json").is_file()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    q = dense.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and torch.equal(q.weight, model.model.layers[0].self_attn.q_proj.weight.to_dense())
    torch.testing.assert_close(logits(dense), logits(model))
    assert isinstance(model.model.layers[0].self_attn.q_proj, VNMLinear)  # the source model is untouched


def test_dense_export_refuses_a_used_folder(hf_saved, tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        export_dense(hf_saved[1], tmp_path)
    assert main(["export", str(tmp_path / "none"), "--dense", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("imports", ["import vnmsparse; from transformers import AutoModelForCausalLM",
                                     "from transformers import AutoModelForCausalLM; import vnmsparse"])
def test_loading_works_whichever_is_imported_first(hf_saved, imports):
    code = f"{imports}\nm = AutoModelForCausalLM.from_pretrained({str(hf_saved[1])!r})\n" \
           "print(type(m.model.layers[0].mlp.up_proj).__name__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("VNMLinear")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_pretrained_onto_a_gpu_holds_only_the_packed_layout(hf_saved):
    from transformers import AutoModelForCausalLM

    model, folder = hf_saved
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda")
    layer = loaded.model.layers[0].mlp.up_proj
    assert layer.values is None and layer.packed_vals.is_cuda
    ids = token_ids().cuda()
    reference = logits(model.to(torch.bfloat16), token_ids()).float()
    torch.testing.assert_close(logits(loaded, ids).float().cpu(), reference, rtol=0.05, atol=0.05)
    loaded.save_pretrained(folder.parent / "from-gpu")  # the canonical form, rebuilt from the packed one
    again = AutoModelForCausalLM.from_pretrained(folder.parent / "from-gpu", dtype=torch.bfloat16)
    assert again.model.layers[0].mlp.up_proj.weight == layer.weight.to(device="cpu")
    model.float()


def test_attach_makes_a_hand_swapped_model_saveable(tmp_path):
    from transformers import AutoModelForCausalLM

    from vnmsparse import hf

    model = tiny_llama()
    name = "model.layers.0.mlp.up_proj"
    model.set_submodule(name, VNMLinear.from_linear(model.get_submodule(name), "16:2:8"))
    hf.attach(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.get_submodule(name), VNMLinear) and torch.equal(logits(loaded), logits(model))
    plain = nn.Sequential(VNMLinear.from_linear(nn.Linear(16, 16), "16:2:8"))
    hf.attach(plain)  # not a transformers model: nothing to do
    assert not hasattr(plain, "hf_quantizer")
