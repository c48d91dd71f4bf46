"""bench/accuracy.py's `recover` experiment runs end to end on the CPU, on a tiny model in seconds: every arm is
written as it ends, with held-out perplexities, curves and the issue-19 verdicts, and the ViT arms follow."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tiny_models import tiny_llama
from vnmsparse.app import data

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "accuracy.py"


def byte_tokenizer():
    """A Hugging Face fast tokenizer with one token per byte (256 ids), saved and loaded like any other."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture
def accuracy(monkeypatch):
    """The script as a module, reading 20,000 characters of each real text (the split is the real one)."""
    monkeypatch.setenv("VNMSPARSE_NO_KERNELS", "1")
    spec = importlib.util.spec_from_file_location("bench_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "read_text", lambda name: data.read_text(name)[:20_000])
    return module


def test_recover_experiment_smoke(accuracy, tmp_path):
    model = tmp_path / "tiny"
    tiny_llama().save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    out = tmp_path / "results" / "accuracy"
    accuracy.main(["recover", "--smoke", "--model", str(model), "--minutes", "0.02", "--vit-minutes", "0.02",
                   "--arms", "dense,oneshot-64:2:8,lora3-64:2:8,lora3kd-64:2:8", "--out", str(out), "--no-progress"])
    results = json.loads(out.with_suffix(".json").read_text())
    recover = results["experiments"]["recover"]
    assert recover["setup"]["eval_texts"] == ["persuasion", "mobydick"] and recover["setup"]["train_text"] == "austen-train"
    assert list(recover["arms"]) == ["dense", "oneshot-64:2:8", "lora3-64:2:8", "lora3kd-64:2:8"]
    for name in ("lora3-64:2:8", "lora3kd-64:2:8"):
        arm = recover["arms"][name]
        assert set(arm["ppl"]) == {"persuasion", "mobydick"} and arm["sparsity"] == 0.75
        assert arm["train"]["steps"] >= 1 and arm["planned_from"].startswith("minutes (probe:")
        assert arm["train"]["seconds"] <= 0.02 * 60 + 1.0  # the budget holds (one step may overrun it)
        assert arm["curve"][-1]["ppl"] == arm["ppl"] and arm["command"].startswith("python bench/accuracy.py recover")
    assert recover["arms"]["lora3kd-64:2:8"]["train"]["config"]["distill"]["weight"] == 0.9
    assert recover["arms"]["lora3-64:2:8"]["train"]["config"]["distill"] is None
    assert set(results["experiments"]["vit-recover"]["arms"]) == {"dense", "oneshot-64:2:8", "srste-64:2:8", "dense-more"}
    markdown = out.with_suffix(".md").read_text()
    for text in ("Persuasion (held out)", "| lora3kd-64:2:8 | 75.0% |", "Perplexity against minutes",
                 "lora3kd-64:2:8 at most 3x dense on both texts", "64:2:8: distillation beats no distillation",
                 "ViT on Fashion-MNIST: the recovery run"):
        assert text in markdown, text


def test_a_named_run_sits_beside_the_main_one_and_borrows_its_baselines(accuracy, tmp_path):
    model = tmp_path / "tiny"
    tiny_llama().save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    out = tmp_path / "accuracy"
    common = ["recover", "--smoke", "--model", str(model), "--minutes", "0.02", "--vit-minutes", "0", "--out", str(out),
              "--no-progress"]
    accuracy.main([*common, "--arms", "dense,lora3kd-64:2:8"])
    accuracy.main([*common, "--arms", "lora3kd-64:2:8", "--name", "recover-long", "--note", "Ran beside another job."])
    experiments = json.loads(out.with_suffix(".json").read_text())["experiments"]
    assert list(experiments["recover"]["arms"]) == ["dense", "lora3kd-64:2:8"]  # the named run did not overwrite it
    assert list(experiments["recover-long"]["arms"]) == ["lora3kd-64:2:8"]
    assert experiments["recover-long"]["setup"]["note"] == "Ran beside another job."
    markdown = out.with_suffix(".md").read_text()
    long = markdown[markdown.index("SmolLM2-135M recovery (long)"):]
    assert "Ran beside another job." in long and "Baselines (dense) from the main recovery run" in long
    assert "lora3kd-64:2:8 at most 3x dense on both texts" in long  # the ratio needs the borrowed dense arm


def test_recover_experiment_refuses_unknown_arms(accuracy, tmp_path):
    with pytest.raises(SystemExit, match="unknown arm"):
        accuracy.main(["recover", "--smoke", "--arms", "lora4-64:2:8", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="--minutes"):
        accuracy.main(["llm", "--minutes", "1", "--out", str(tmp_path / "a")])
    for bad in (["recover", "--name", "long"], ["recover", "--name", "recover-"], ["llm", "--name", "recover-x"],
                ["llm", "--note", "x"]):
        with pytest.raises(SystemExit, match="--name|--note"):
            accuracy.main([*bad, "--smoke", "--out", str(tmp_path / "a")])


def test_a_failed_arm_is_recorded_and_the_next_one_runs(accuracy, tmp_path, monkeypatch):
    model = tmp_path / "tiny"
    tiny_llama().save_pretrained(model)
    byte_tokenizer().save_pretrained(model)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(accuracy, "recover", out_of_memory)
    out = tmp_path / "accuracy"
    accuracy.main(["recover", "--smoke", "--model", str(model), "--vit-minutes", "0", "--arms",
                   "lora3kd-64:2:8,dense", "--out", str(out), "--no-progress"])
    arms = json.loads(out.with_suffix(".json").read_text())["experiments"]["recover"]["arms"]
    assert arms["lora3kd-64:2:8"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "ppl" in arms["dense"]
    assert "- lora3kd-64:2:8 failed: RuntimeError: CUDA out of memory" in out.with_suffix(".md").read_text()
